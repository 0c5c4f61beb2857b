"""Massive-activation calibration on a tiny Llama with one planted massive dim."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM

from raypipe.calibrate import run_calibrate
from raypipe.engine.calibration import CalibrationCollector, passive
from raypipe.engine.generate import encode_prompt, format_prompt
from raypipe.engine.hooks import pad_right
from raypipe.engine.projector import Projector
from raypipe.options import ModelOptions
from raypipe.store.paths import ExperimentPaths
from tests.conftest import PROMPTS
from tests.tiny import saved_vectors, tiny_llama, tiny_tokenizer, write_prompt_set

DIM = 7  # the planted massive dim
JUNK = 240  # a pad id whose embedding is huge in JUNK_DIM: padding must never be counted
JUNK_DIM = 3
# An attention-sink-like token (ids 203+ are outside the tiny tokenizer's vocabulary): its
# whole hidden state is inflated, with SINK_DIM about 700x its own median but far above the
# median of the sequence's hidden state, as at SmolLM2-135M's first token.
SINK = 250
SINK_DIM = 5


def planted_llama() -> LlamaForCausalLM:
    """tiny_llama with o_proj biases: layer 1 adds 1e4 to dim 7 of every token's residual;
    plus the JUNK and SINK embeddings above."""
    cfg = tiny_llama().config
    cfg.attention_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for block in model.model.layers:
            attn = block.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.zero_()
        model.model.layers[1].self_attn.o_proj.bias[DIM] = 1e4
        emb = model.model.embed_tokens.weight
        emb[JUNK, JUNK_DIM] = 1e5
        gen = torch.Generator().manual_seed(3)
        emb[SINK] = 2 * torch.randn(emb.shape[1], generator=gen)
        emb[SINK, SINK_DIM] = 1e3
    return model


@pytest.fixture(scope="module")
def model():
    return planted_llama()


@pytest.fixture(scope="module")
def seqs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 17, 4, 12, 6)]


def hook_ids(model) -> set[tuple[str, int]]:
    """Every forward (pre-)hook on the model. Compared before and after, not against empty:
    transformers adds its own permanent hooks the first time hidden states are requested."""
    return {
        (name, hid)
        for name, m in model.named_modules()
        for hid in (*m._forward_hooks, *m._forward_pre_hooks)
    }


def observe_all(model, batches, **kwargs) -> dict:
    c = CalibrationCollector(model, **kwargs)
    for batch in batches:
        c.observe(*pad_right(batch, JUNK, "cpu"))
    return c.result()


def assert_close(a, b, path="result"):
    """Same structure, same ints, floats equal to fp32 summation noise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"{path}: {a} != {b}"
    else:
        assert a == b, path


def test_flags_exactly_the_planted_dim(model, seqs):
    res = observe_all(model, [seqs])
    agg = res["aggregate"]
    assert res["tokens_seen"] == sum(map(len, seqs))
    assert agg["n_prompts"] == len(seqs)
    assert agg["massive_dims"] == [DIM]
    assert agg["massive_by_layer"]["0"] == []
    for layer in ("1", "2", "3"):
        (entry,) = agg["massive_by_layer"][layer]
        assert entry["dim"] == DIM and entry["sequence_fraction"] == 1.0
        assert entry["massive_tokens"] == res["tokens_seen"]
        assert 9e3 < entry["max"] < 1.1e4 and entry["ratio"] > 1e4
        assert agg["top_dims_by_layer"][layer][0] == DIM
    # trait-interp's shape: per dim a list over layers (here layers 0-3), relative magnitude.
    assert len(agg["dim_magnitude_by_layer"][str(DIM)]) == 4
    # One dim holding nearly all of the mean: about D (64) times the average over dims.
    assert min(agg["dim_magnitude_by_layer"][str(DIM)][1:]) > 50
    assert set(agg["layer_norms"]) == {"0", "1", "2", "3"}
    assert set(agg["consecutive_cosine"]) == {"0", "1", "2"}
    json.dumps(res, allow_nan=False)


def test_reference_median_of_the_sequence_not_the_token(model, seqs):
    with_sink = [[SINK] + s for s in seqs]
    by_layer = observe_all(model, [with_sink])["aggregate"]
    assert by_layer["massive_dims"] == [SINK_DIM, DIM]
    assert [e["dim"] for e in by_layer["massive_by_layer"]["0"]] == [SINK_DIM]
    by_token = observe_all(model, [with_sink], reference="token")["aggregate"]
    assert by_token["massive_dims"] == [DIM]


def test_stats_match_hidden_states(seqs):
    """Ground truth: HF's hidden_states[L + 1] is block L's output (last layer: final norm)."""
    model = planted_llama()  # a model of its own: output_hidden_states leaves hooks behind
    seq = seqs[1]
    res = observe_all(model, [[seq]])["aggregate"]
    with torch.no_grad():
        hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    means = {}
    for layer in range(len(hs) - 2):
        h = hs[layer + 1][0]  # (T, D)
        key = str(layer)
        assert math.isclose(res["layer_norms"][key], float(h.norm(dim=-1).mean()), rel_tol=1e-5)
        assert math.isclose(res["layer_medians"][key], float(h.abs().median(-1).values.median()))
        means[layer] = mean = h.mean(0)  # signed, as trait-interp ranks the top dims
        assert res["top_dims_by_layer"][key] == mean.abs().topk(5).indices.tolist()
    for d, row in res["dim_magnitude_by_layer"].items():
        for layer, value in enumerate(row[: len(means)]):
            want = float(means[layer][int(d)].abs() / means[layer].abs().mean())
            assert math.isclose(value, want, rel_tol=1e-4)
    for layer in range(len(means) - 1):
        cos = torch.nn.functional.cosine_similarity(means[layer], means[layer + 1], dim=0)
        assert math.isclose(res["consecutive_cosine"][str(layer)], float(cos), abs_tol=1e-5)


def test_padding_is_excluded(model, seqs):
    # Pads are JUNK, whose embedding would be a massive JUNK_DIM at layer 0 if it were counted.
    padded = observe_all(model, [seqs])
    single = observe_all(model, [[s] for s in seqs])
    assert_close(padded, single)
    assert all(
        e["dim"] != JUNK_DIM for v in padded["aggregate"]["massive_by_layer"].values() for e in v
    )


def test_budget_cuts_in_row_order_and_stops(model, seqs):
    before = hook_ids(model)
    a, b = seqs[0], seqs[1]
    c = CalibrationCollector(model, budget=len(a) + 5)
    assert c.observe(*pad_right([a, b], JUNK, "cpu")) == len(a) + 5
    assert c.done and c.tokens_seen == len(a) + 5
    assert c.observe(*pad_right([a], JUNK, "cpu")) == 0
    # Under causal attention b's first 5 tokens are the same as b[:5] alone.
    assert_close(c.result(), observe_all(model, [[a, b[:5]]]))
    assert hook_ids(model) == before


def test_hooks_removed_on_error(model, seqs):
    before = hook_ids(model)
    ids, mask = pad_right(seqs, JUNK, "cpu")
    c = CalibrationCollector(model)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        c.observe(ids, mask[:, :-1])
    assert hook_ids(model) == before
    with pytest.raises(KeyError):
        with passive(model):
            assert hook_ids(model) != before
            raise KeyError("boom")
    assert hook_ids(model) == before


def test_passive_detaches_itself_at_budget(model, seqs):
    before = hook_ids(model)
    ids, mask = pad_right(seqs, JUNK, "cpu")
    with passive(model, budget=20) as c:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        # The full forward reached the last layer, so the hooks came off inside the block.
        assert c.done and not c.attached
        assert hook_ids(model) == before
    assert c.tokens_seen == 20
    assert_close(c.result(), observe_all(model, [seqs], budget=20))


def test_passive_with_early_stopping_projector(model, seqs):
    before = hook_ids(model)
    gen = torch.Generator().manual_seed(2)
    vectors = [(1, torch.randn(64, generator=gen)), (0, torch.randn(64, generator=gen))]
    proj = Projector(model, vectors, pad_id=JUNK)  # stops after layer 1
    plain = proj.project(seqs)
    with passive(model, budget=10_000) as c:
        hooked = proj.project(seqs)
    for x, y in zip(plain, hooked):
        assert (x.scores == y.scores).all() and (x.norms == y.norms).all()
    res = c.result()
    agg = res["aggregate"]
    assert res["tokens_seen"] == sum(map(len, seqs)) and agg["n_prompts"] == len(seqs)
    assert set(agg["layer_norms"]) == {"0", "1"}  # layers 2 and 3 never ran
    assert agg["massive_dims"] == [DIM]
    full = observe_all(model, [seqs])["aggregate"]
    for key in ("0", "1"):
        assert_close(agg["massive_by_layer"][key], full["massive_by_layer"][key])
        assert math.isclose(agg["layer_norms"][key], full["layer_norms"][key], rel_tol=1e-4)
    assert hook_ids(model) == before

    # Budget met in a forward that stopped early: the next forward's pre-hook detaches.
    with passive(model, budget=5) as c:
        proj.project(seqs[:2])
        assert c.done and c.tokens_seen == 5
        proj.project(seqs[2:])
        assert not c.attached and hook_ids(model) == before
        assert c.tokens_seen == 5


@pytest.mark.parametrize("overhead", [0, 10**6])
def test_passive_counts_real_tokens_however_batched(model, seqs, overhead):
    """A right-padded prefill runs without its mask (hooked_prefill), yet the collector still
    sees only real tokens: one batch padded to the longest row (a large cost per pass) and
    batches with no padding (none) give the statistics of observing every sequence alone."""
    vectors = [(3, torch.ones(64))]
    proj = Projector(model, vectors, pad_id=JUNK)
    proj.overhead = overhead
    batches = proj._batches([len(s) for s in seqs])
    assert (len(batches) == 1) == (overhead > 0)
    with passive(model, budget=10_000) as c:
        proj.project(seqs)
    assert c.tokens_seen == sum(map(len, seqs))
    assert_close(c.result(), observe_all(model, [[s] for s in seqs]))


def test_passive_counts_prefill_not_decode(model, seqs):
    a, b = seqs[2], seqs[4]
    width = max(len(a), len(b))
    # Left padding, as generate() wants it.
    ids = torch.tensor([[JUNK] * (width - len(s)) + s for s in (a, b)])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in (a, b)])
    with passive(model) as c:
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert c.tokens_seen == len(a) + len(b)
    assert c.result()["aggregate"]["n_prompts"] == 2


def test_run_calibrate_writes_the_file(tiny_root, tmp_path):
    folder = tmp_path / "planted"
    planted_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    exp = tiny_root / "experiments" / "planted"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        json.dumps({"model_variants": {"base": {"model": str(folder)}}})
    )
    write_prompt_set(tiny_root, "neutral/calibration", PROMPTS)
    opts = ModelOptions(dtype="float32", device="cpu")
    out = io.StringIO()
    record = run_calibrate(tiny_root, "planted", model=opts, max_tokens=60, out=out)

    path = ExperimentPaths(tiny_root, "planted").calibration_file("base")
    on_disk = json.loads(path.read_text())
    assert on_disk == record
    assert on_disk["experiment"] == "planted" and on_disk["model_variant"] == "base"
    assert on_disk["model"] == str(folder)
    assert on_disk["source"] == "raypipe calibrate:neutral/calibration"
    assert on_disk["tokens_seen"] == 60
    agg = on_disk["aggregate"]
    for key in ("n_prompts", "top_dims_by_layer", "dim_magnitude_by_layer", "layer_norms"):
        assert key in agg
    assert agg["massive_dims"] == [DIM]
    assert f"massive dims: [{DIM}]" in out.getvalue()

    # What --remove-massive-dims reads back.
    from raypipe.pipeline.plan import _massive_dims

    assert _massive_dims(ExperimentPaths(tiny_root, "planted"), "base") == (DIM,)

    # Exists: skipped without a model load; --force redoes it.
    out = io.StringIO()
    assert run_calibrate(tiny_root, "planted", model=opts, out=out) == record
    assert "exists" in out.getvalue()
    again = run_calibrate(tiny_root, "planted", model=opts, force=True, out=io.StringIO())
    tok = tiny_tokenizer()
    lengths = [len(encode_prompt(tok, format_prompt(tok, p, None, True), True)) for p in PROMPTS]
    assert again["tokens_seen"] == sum(lengths) and again["aggregate"]["n_prompts"] == len(PROMPTS)


def test_one_replica_collects_the_calibration(tiny_root, tiny_model_dir):
    """Replicas built for the same first run: only the first claims the calibration; when it
    is done (or its process is gone) the claim is free for a restarted replica."""
    from raypipe.engine.models import ModelSpec
    from raypipe.pipeline.stages import CalibrationTarget, ProjectStage

    spec = ModelSpec(str(tiny_model_dir), tiny_root / "cache", dtype="float32")
    target = CalibrationTarget(
        path=tiny_root / "cal" / "calibration.json",
        experiment="tiny",
        model="tiny",
        variant="base",
        source="test",
        budget=8,
    )
    args = (spec, saved_vectors([(1, [1.0] * 64)]), "residual", None, 1024)
    first = ProjectStage(*args, calibration=target)
    second = ProjectStage(*args, calibration=target)
    assert first.collector is not None and second.collector is None
    assert second.projector.early_stop  # a replica that does not collect keeps early stop
    batch = pd.DataFrame(
        {"prompt_id": ["a"], "token_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9]], "project": [True]}
    )
    batch["error"] = None
    second(batch)
    assert not target.path.exists()  # the replica without the claim wrote nothing
    first(batch)  # 9 tokens fill the budget of 8: done, and the claim is let go
    assert first.collector is None and target.path.is_file()
    third = ProjectStage(*args, calibration=target)
    assert third.collector is not None


def _target(path, expected=(), budget=5000):
    from raypipe.store.calibration import CalibrationTarget

    return CalibrationTarget(
        path=path,
        experiment="tiny",
        model="tiny",
        variant="base",
        source="test",
        budget=budget,
        prompt_set="s",
        expected=frozenset(expected),
    )


def test_collector_state_goes_on_in_another_collector(model, seqs, tmp_path):
    """A collection stopped after some batches and carried on from its saved state (through the
    sidecar file) ends where one uninterrupted collection does."""
    from raypipe.store.calibration import (
        calibration_record,
        read_state,
        state_file,
        write_calibration,
        write_state,
    )

    batches = [seqs[:2], seqs[2:]]
    first = CalibrationCollector(model)
    first.observe(*pad_right(batches[0], JUNK, "cpu"))
    target = _target(tmp_path / "calibration.json")
    record = calibration_record("tiny", "tiny", "base", "test", first.result())
    write_calibration(target.path, record, complete=False)
    write_state(target, [("s", "0"), ("s", "1")], ["test"], first.state_dict())
    saved = read_state(target)
    assert saved["counted"] == [["s", "0"], ["s", "1"]] and saved["sources"] == ["test"]
    again = CalibrationCollector(model)
    again.load_state_dict(saved["collector"])
    again.observe(*pad_right(batches[1], JUNK, "cpu"))
    assert_close(again.result(), observe_all(model, batches))
    with pytest.raises(ValueError, match="budget"):
        CalibrationCollector(model, budget=10).load_state_dict(saved["collector"])
    # Only beside a partial calibration of the same model and budget is a state carried on.
    assert read_state(_target(target.path, budget=10)) is None
    write_calibration(target.path, record, complete=True)
    assert not state_file(target.path).exists() and read_state(target) is None


def _batch(ids, seqs):
    batch = pd.DataFrame(
        {"prompt_id": list(ids), "token_ids": list(seqs), "project": [True] * len(ids)}
    )
    batch["error"] = None
    return batch


def test_project_stage_goes_on_with_a_killed_collection(tiny_root, tiny_model_dir, tmp_path):
    """A replica killed after its first batch, then the resumed run: fed only the prompts left
    (their projections were written) or the first batch again too (they were not), the
    calibration is the one an uninterrupted run collects, each prompt counted once."""
    import shutil

    from raypipe.engine.models import ModelSpec
    from raypipe.pipeline.stages import ProjectStage
    from raypipe.store.calibration import state_file

    spec = ModelSpec(str(tiny_model_dir), tiny_root / "cache", dtype="float32")
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(7, 200, (n,), generator=gen).tolist() for n in (9, 17, 4, 12, 6, 3)]
    ids = [str(i) for i in range(len(seqs))]
    b1, b2 = _batch(ids[:3], seqs[:3]), _batch(ids[3:], seqs[3:])
    args = (spec, saved_vectors([(1, [1.0] * 64)]), "residual", None, 1024)

    def collect(path, *batches):
        stage = ProjectStage(*args, calibration=_target(path, ids))
        for b in batches:
            stage(b)
        if stage.claim is not None:
            stage.claim.close()  # the replica's process is gone: so is its lock
        return json.loads(path.read_text()) if path.is_file() else None

    want = collect(tmp_path / "ref" / "calibration.json", b1, b2)
    assert want["complete"] is True and want["tokens_seen"] == sum(map(len, seqs))
    killed = tmp_path / "killed" / "calibration.json"
    partial = collect(killed, b1)
    assert partial["complete"] is False and partial["tokens_seen"] == sum(map(len, seqs[:3]))
    assert state_file(killed).is_file()
    for name, batches in (("rest", (b2,)), ("again", (b1, b2))):
        shutil.copytree(killed.parent, tmp_path / name)
        got = collect(tmp_path / name / "calibration.json", *batches)
        assert got["complete"] is True
        assert got["tokens_seen"] == want["tokens_seen"], name
        assert_close(got["aggregate"], want["aggregate"], name)
        assert not state_file(tmp_path / name / "calibration.json").exists()


def test_partial_calibration_is_no_source_of_massive_dims(tiny_root, capsys):
    from raypipe.cli import main
    from raypipe.store.calibration import calibration_record, write_calibration

    path = ExperimentPaths(tiny_root, "tiny").calibration_file("base")
    result = {"tokens_seen": 83, "aggregate": {"n_prompts": 2, "massive_dims": [7]}}
    write_calibration(path, calibration_record("tiny", "m", "base", "t", result), complete=False)
    args = ["infer", "--root", str(tiny_root), "--experiment", "tiny", "--prompt-set"]
    args += ["tests/small", "--layers", "1", "--remove-massive-dims"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}: complete: the calibration is partial (83 tokens" in err
    status = ["status", "--root", str(tiny_root), "--experiment", "tiny", "--prompt-set"]
    assert main([*status, "tests/small", "--layers", "1"]) == 0
    assert "calibration: partial, 83 tokens from 2 prompts" in capsys.readouterr().out
