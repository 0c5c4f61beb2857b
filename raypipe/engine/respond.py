"""Prompt text -> chat-formatted ids -> generated ids -> the fields of a response record."""

from __future__ import annotations

from dataclasses import dataclass

from raypipe.engine.generate import (
    GenerationOptions,
    GenerationProgress,
    Generator,
    encode_prompt,
    format_prompt,
    token_strings,
)


@dataclass
class Response:
    prompt_text: str
    response_text: str
    token_ids: list[int]
    prompt_end: int
    tokens: list[str]
    error: str | None = None


class Responder:
    """Everything between a prompt item and its response fields, for a loop or a Ray stage."""

    def __init__(
        self,
        model,
        tokenizer,
        opts: GenerationOptions,
        chat: bool,
        context: int = 0,
        truncate: bool = False,
    ):
        self.tokenizer = tokenizer
        self.chat = chat
        self.context = context
        self.truncate = truncate
        self.max_new = opts.max_new_tokens
        self.generator = Generator(model, tokenizer, opts)

    def prepare(self, text: str, system_prompt: str | None) -> tuple[str, list[int], str | None]:
        prompt_text = format_prompt(self.tokenizer, text, system_prompt, self.chat)
        ids = encode_prompt(self.tokenizer, prompt_text, self.chat)
        if self.context and len(ids) + self.max_new > self.context:
            room = self.context - self.max_new
            if not self.truncate or room < 1:
                return (
                    prompt_text,
                    ids,
                    (
                        f"prompt is {len(ids)} tokens; with --max-new-tokens {self.max_new} it "
                        f"exceeds the model context of {self.context} (use --truncate to cut it)"
                    ),
                )
            ids = ids[-room:]  # keep the end: it holds the generation prompt
            prompt_text = self.tokenizer.decode(ids)
        return prompt_text, ids, None

    def respond(
        self, items: list[tuple[str, str | None]], progress: GenerationProgress | None = None
    ) -> list[Response]:
        prepared = [self.prepare(text, sp) for text, sp in items]
        todo = [i for i, (_, _, err) in enumerate(prepared) if err is None]
        ids = [prepared[i][1] for i in todo]
        generated = self.generator.generate(ids, progress) if todo else []
        by_index = dict(zip(todo, generated))
        out = []
        for i, (prompt_text, ids, err) in enumerate(prepared):
            if err is not None:
                out.append(Response(prompt_text, "", ids, len(ids), [], error=err))
                continue
            new = by_index[i]
            full = list(ids) + list(new)
            out.append(
                Response(
                    prompt_text=prompt_text,
                    response_text=self.tokenizer.decode(new, skip_special_tokens=True),
                    token_ids=full,
                    prompt_end=len(ids),
                    tokens=token_strings(self.tokenizer, full),
                )
            )
        return out
