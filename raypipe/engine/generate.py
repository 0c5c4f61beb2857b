"""Chat formatting and batched HF generation that keeps the exact generated token ids."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from raypipe.engine.batching import plan_batches
from raypipe.errors import OptionError

# `progress(new_tokens, prompts)` of a generate() call so far: the new tokens (up to each row's
# EOS, as kept), and the prompts done, the batch in flight counted by its share of the steps.
GenerationProgress = Callable[[int, float], None]
PROGRESS_EVERY_S = 0.5  # the count syncs with the device: only this often, never per token


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 50
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    max_batch_size: int = 64
    # Token budget per batch (batch size x padded length): long prompts get small batches.
    max_batch_tokens: int = 32768
    sort_by_length: bool = True
    # Cut a batch where a row would be padded by more than this share of the batch width, and
    # otherwise take the fewest batches (then the fewest padded tokens): every extra batch
    # costs a whole decode loop, padding only prompt tokens (measured on CPU: 0.25 -> 94,
    # 0.5 -> 121, 0.65 -> 144 new tok/s on bench/generation.py's mixed prompts; the prefill's
    # cost per pass, batching.overhead_tokens, leaves out the Python of each decode step).
    max_padding: float = 0.65

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", "must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise OptionError("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", "must be in (0, 1]")
        if not -(2**63) <= self.seed < 2**64:
            raise OptionError("seed", "must fit in 64 bits (torch.manual_seed takes no more)")
        if self.max_batch_size < 1:
            raise OptionError("max_batch_size", "must be at least 1")
        if self.max_batch_tokens < 1:
            raise OptionError("max_batch_tokens", "must be at least 1")
        if not 0 <= self.max_padding <= 1:
            raise OptionError("max_padding", "must be in [0, 1]")


def uses_chat_template(tokenizer, configured: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    return has if configured is None else (configured and has)


def format_prompt(tokenizer, text: str, system_prompt: str | None, chat: bool) -> str:
    """The exact prompt string the model sees (chat template with generation prompt)."""
    if not chat:
        return f"{system_prompt}\n\n{text}" if system_prompt else text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    # enable_thinking=False is ignored by templates without a thinking mode.
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def encode_prompt(tokenizer, prompt_text: str, chat: bool) -> list[int]:
    # The chat template already carries any BOS; plain text gets the tokenizer's specials.
    return tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]


_TOKEN_STRINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded on its own, as `tokenizer.batch_decode([[i] for i in ids])` gives them.
    A token's string depends on its id alone, so each tokenizer's are kept once decoded (at
    most its vocabulary): a batch decoded only its new ids (decoding thousands of ids one by
    one took a tenth of a small model's batch)."""
    known = _TOKEN_STRINGS.get(tokenizer)
    if known is None:
        known = _TOKEN_STRINGS.setdefault(tokenizer, {})
    new = list({i for i in ids if i not in known})
    if new:
        known.update(zip(new, tokenizer.batch_decode([[i] for i in new])))
    return [known[i] for i in ids]


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class Generator:
    """Batched `generate` over token-id prompts; returns response ids without the EOS."""

    def __init__(self, model, tokenizer, opts: GenerationOptions):
        self.model = model
        self.tokenizer = tokenizer
        self.opts = opts
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def generate(
        self, prompts: list[list[int]], progress: GenerationProgress | None = None
    ) -> list[list[int]]:
        """Response ids per prompt; `progress` hears how far it got while it decodes."""
        out: list[list[int] | None] = [None] * len(prompts)
        extra = self.opts.max_new_tokens
        plan = self.plan([len(p) for p in prompts])
        tokens, done = 0, 0  # of the batches before this one
        for batch in plan:
            step = None
            if progress is not None:
                step = partial(_in_flight, progress, tokens, done, len(batch), extra)
            for i, ids in zip(batch, self._generate_batch([prompts[i] for i in batch], step)):
                out[i] = ids
                tokens += len(ids)
            done += len(batch)
            if progress is not None:
                progress(tokens, done)
        return out  # type: ignore[return-value]

    def plan(self, lengths: list[int]) -> list[list[int]]:
        """Batches of prompt indices: within max_padding, the fewest (a batch costs more than
        any padding it saves), then the fewest padded tokens."""
        o = self.opts
        fewest = o.max_batch_tokens * max(1, len(lengths)) + 1
        extra = o.max_new_tokens
        return plan_batches(
            lengths,
            o.max_batch_tokens,
            o.max_batch_size,
            extra,
            o.sort_by_length,
            o.max_padding,
            fewest,
        )

    def _generate_batch(
        self, prompts: list[list[int]], step: Callable[[int, int], None] | None = None
    ) -> list[list[int]]:
        import torch

        device = self.model.device
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same column, where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        sample = self.opts.temperature > 0
        kwargs = dict(
            max_new_tokens=self.opts.max_new_tokens,
            do_sample=sample,
            pad_token_id=self.pad_id,
        )
        if sample:
            torch.manual_seed(self.opts.seed)
            kwargs.update(temperature=self.opts.temperature, top_p=self.opts.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if step is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_counter(width, self.eos, step)])
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs
            )
        new = seqs[:, width:].tolist()  # (B, new)
        results = []
        for ids in new:
            cut = next((k for k, t in enumerate(ids) if t in self.eos), len(ids))
            results.append(ids[:cut])
        return results


def _in_flight(
    progress: GenerationProgress,
    tokens: int,
    done: int,
    rows: int,
    extra: int,
    new: int,
    steps: int,
) -> None:
    """A batch in flight: `new` tokens after `steps` of its `extra` steps, after earlier ones."""
    progress(tokens + new, done + rows * min(1.0, steps / extra))


def _counter(width: int, eos: set[int], step: Callable[[int, int], None]):
    """A StoppingCriteria that never stops a row: HF calls it after every decode step with the
    ids so far, where it counts the new tokens (each row's up to its first EOS) and passes
    `step(new_tokens, steps)` on, at most every PROGRESS_EVERY_S. (A streamer would get
    each step's tokens copied to the host; this reads the device only when it reports.)"""
    import torch
    from transformers import StoppingCriteria

    class TokenCounter(StoppingCriteria):
        def __init__(self):
            self.last = time.monotonic()
            self.eos = None

        def __call__(self, input_ids, scores, **kwargs):
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY_S:
                self.last = now
                new = input_ids[:, width:]  # (B, steps)
                if self.eos is None:
                    self.eos = torch.tensor(sorted(eos), dtype=new.dtype, device=new.device)
                alive = torch.isin(new, self.eos).cumsum(dim=1) == 0  # before the row's EOS
                step(int(alive.sum()), new.shape[1])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenCounter()
