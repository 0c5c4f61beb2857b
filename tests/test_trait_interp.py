"""raypipe on a tree laid out by trait-interp (tests/ti_tree.py): it reads it, picks the vectors
trait-interp would pick, and writes files of trait-interp's shape (issue 16, SPEC 2, 4, 5, 7, 8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.errors import InputError
from raypipe.store.calibration import calibration_record, massive_dims
from raypipe.store.captures import read_capture
from raypipe.store.pairs import list_trait_data, load_trait_data
from raypipe.store.paths import ExperimentPaths, desanitize_position, sanitize_position
from raypipe.store.prompts import load_prompt_set
from raypipe.store.vectors import parse_layers, resolve_vectors
from tests import ti_tree as ti
from tests.tiny import tiny_llama

REPO = Path(__file__).resolve().parents[1]
TRAITS = list(ti.VECTORS)

# The keys trait-interp's writer puts in a projection file (utils/process_activations.py) and
# its viewer (visualization/views/trait-dynamics.js) reads.
TI_METADATA = {
    "prompt_id",
    "prompt_set",
    "n_prompt_tokens",
    "n_response_tokens",
    "multi_vector",
    "n_vectors",
    "component",
    "position",
    "centered",
    "projection_date",
}
TI_ENTRY = {"method", "layer", "selection_source", "baseline", "prompt", "response", "token_norms"}


@pytest.fixture
def ti_root(tmp_path, tiny_model_dir) -> Path:
    ti.write_tree(tmp_path, tiny_model_dir)
    return tmp_path


def _resolve(root: Path, layers: str, **kw):
    paths = ExperimentPaths(root, ti.EXPERIMENT)
    spec = parse_layers(layers, ti.N_LAYERS)
    return resolve_vectors(
        paths,
        TRAITS,
        ti.EXTRACTION,
        "residual",
        spec,
        ti.N_LAYERS,
        ti.HIDDEN,
        steering_variants=(ti.APPLICATION,),
        **kw,
    )


# ---------------------------------------------------------------- reading the tree


def test_picks_the_vectors_trait_interp_picks(ti_root):
    specs, notes = _resolve(ti_root, "best")
    got = {s.trait: (s.method, s.position, s.layer) for s in specs}
    assert got == ti.EXPECTED_BEST
    assert {s.selection_source for s in specs} == {"steering"}
    text = "\n".join(notes)
    assert "emotion/joy: best layer 2 (mean_diff, response[:5], steering delta +45.00" in text
    assert "steering under instruct" in text
    assert "safety/refusal: best layer 1 (probe, prompt[-1], steering delta +40.00" in text
    assert "persona/sycophancy: best layer 3 (mean_diff, response[:], steering delta +70.00" in text
    assert "steering under base" in text  # the extraction variant, its only results
    # A vector folder without metadata.json: baseline 0, said once, not an error.
    (refusal,) = [s for s in specs if s.trait == "safety/refusal"]
    assert refusal.baseline == 0.0
    assert sum("no metadata.json" in n for n in notes) == 1
    (joy,) = [s for s in specs if s.trait == "emotion/joy"]
    assert joy.baseline == pytest.approx(0.3)  # the metadata's layer 2 baseline
    assert joy.file.parts[-4:] == ("response__5", "residual", "mean_diff", "layer2.pt")


def test_method_restricts_the_candidates(ti_root):
    specs, _ = _resolve(ti_root, "best", method="probe")
    got = {s.trait: (s.method, s.position, s.layer) for s in specs}
    # joy: probe's best is L2 (the method-less run, +40) over response[:] L3 (+35), L1 (+30)
    assert got["emotion/joy"] == ("probe", "response[:5]", 2)
    assert got["persona/sycophancy"] == ("probe", "response[:]", 2)


def test_gradient_is_a_candidate(ti_root):
    # The decoy made coherent: gradient L3 (+80) wins, as any method folder competes.
    path = ti_root / "experiments/ti/steering/emotion/joy/instruct/response__5/steering"
    results = path / "results.jsonl"
    results.write_text(
        results.read_text().replace('"coherence_mean": 40.0', '"coherence_mean": 80')
    )
    specs, _ = _resolve(ti_root, "best")
    (joy,) = [s for s in specs if s.trait == "emotion/joy"]
    assert (joy.method, joy.position, joy.layer) == ("gradient", "response[:5]", 3)


def test_best_plus_n_clamps_then_snaps_to_a_layer_with_a_vector(ti_root):
    folder = ti_root / "experiments/ti/extraction/emotion/joy/base/vectors/response__5/residual"
    (folder / "mean_diff" / "layer1.pt").unlink()
    specs, notes = _resolve(ti_root, "best,best-1,best+5")
    joy = [s.layer for s in specs if s.trait == "emotion/joy"]
    assert joy == [0, 2, 3]  # best 2; best-1 = 1 has no vector: 0 and 2 are as near, the lower
    text = "\n".join(notes)
    assert "emotion/joy: best-1 = layer 1 has no mean_diff vector, snapped to the nearest" in text
    assert "emotion/joy: best+5 = layer 7 is outside 0-3, clamped to 3" in text
    # explicit layers are what was asked: a missing one is an error that names it
    with pytest.raises(InputError, match="no mean_diff vector at layer 1"):
        _resolve(ti_root, "1")


def test_layer_percent_ranges_as_trait_interp():
    assert parse_layers("30%-60%", 30).absolute == tuple(range(9, 19))


def test_positions_read_back_from_folder_names():
    for pos in ("response[:]", "response[:5]", "prompt[-1]", "response[-5:]", "all[:]"):
        assert desanitize_position(sanitize_position(pos)) == pos


def test_a_trait_interp_calibration_is_read(ti_root):
    paths = ExperimentPaths(ti_root, ti.EXPERIMENT)
    # No massive_dims: derived as trait-interp's viewer does (top 5 of at least 3 layers).
    assert massive_dims(paths.calibration_file(ti.APPLICATION)) == (1, 2, 3, 4, 7)


def test_raw_residual_captures_hold_two_components_and_one_is_response_only(ti_root):
    paths = ExperimentPaths(ti_root, ti.EXPERIMENT)
    rec = read_capture(paths.raw_file(ti.APPLICATION, "attn_contribution", ti.PROMPT_SET, "0"))
    assert set(rec["prompt"]["activations"][0]) == {"residual", "attn_contribution"}
    assert rec["response_only"] is False
    only = read_capture(paths.raw_file(ti.APPLICATION, "residual", ti.PROMPT_SET, "2"))
    assert only["response_only"] is True and only["prompt"]["activations"] == {}
    assert paths.raw_file(ti.APPLICATION, "attn_contribution", ti.PROMPT_SET, "0").parts[-4] == (
        "residual"
    )


def test_an_empty_note_is_no_note(ti_root):
    items = load_prompt_set(ti_root / "datasets", ti.PROMPT_SET).items
    assert [i.note for i in items] == [None, None, None]


def test_starter_traits_are_named_as_the_guide_says():
    traits = REPO / "datasets" / "traits"
    names = list_trait_data(traits, "starter_traits")
    assert len(names) == 6 and "starter_traits/sycophancy" in names
    assert all(n.startswith("starter_traits/") and n.count("/") == 1 for n in names)
    assert len(load_trait_data(traits, "starter_traits/sycophancy").pairs) >= 4


# ---------------------------------------------------------------- writing trait-interp's shapes


def _shape(value):
    """The JSON shape of a value: dict keys kept for fixed-key objects, lists by item shape."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else value


def test_calibration_written_in_trait_interp_shape(ti_root):
    ours = _calibration(tiny_llama())
    theirs = json.loads(
        ExperimentPaths(ti_root, ti.EXPERIMENT).calibration_file(ti.APPLICATION).read_text()
    )
    for key in ("experiment", "model", "model_variant", "prompt_set", "is_calibration"):
        assert key in ours
    a, b = ours["aggregate"], theirs["aggregate"]
    n_layers = len(a["layer_norms"])
    for field in ("top_dims_by_layer", "layer_norms"):
        assert set(a[field]) == {str(i) for i in range(n_layers)} == set(b[field])
    # per dim a list over layers, as the viewer plots it against layers 0..n-1
    for row in a["dim_magnitude_by_layer"].values():
        assert isinstance(row, list) and len(row) == n_layers
        assert all(isinstance(x, float) for x in row)
    assert set(a["dim_magnitude_by_layer"]) == {
        str(d) for v in a["top_dims_by_layer"].values() for d in v
    }
    assert set(a["consecutive_cosine"]) == {str(i) for i in range(n_layers - 1)}
    assert isinstance(a["massive_dims"], list)  # raypipe's addition


def _calibration(model) -> dict:
    from raypipe.engine.calibration import CalibrationCollector

    collector = CalibrationCollector(model, budget=200)
    g = torch.Generator().manual_seed(0)
    collector.observe(torch.randint(3, 128, (3, 12), generator=g))
    record = calibration_record(
        "ti", "tiny", "instruct", "raypipe calibrate:neutral/x", collector.result()
    )
    assert record["prompt_set"] == "neutral/x" and record["is_calibration"] is True
    return record


def _viewer_entries(data: dict) -> list[dict]:
    """trait-dynamics.js: the list-of-vectors shape is read only when metadata.multi_vector."""
    assert data["metadata"].get("multi_vector") is True
    assert isinstance(data["projections"], list)
    return data["projections"]


def infer_cli(root: Path, experiment: str, *extra: str) -> int:
    from raypipe.cli import main

    args = ["infer", "--root", str(root), "--experiment", experiment, "--quiet"]
    return main([*args, "--dtype", "float32", "--batch-size", "4", *extra])


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v.float() / v.float().norm()


@pytest.mark.usefixtures("ray_session")
def test_from_activations_writes_trait_interp_files(ti_root):
    paths = ExperimentPaths(ti_root, ti.EXPERIMENT)
    args = ["--prompt-set", ti.PROMPT_SET, "--from-activations", "--layers", "best,best+1"]
    assert infer_cli(ti_root, ti.EXPERIMENT, *args) == 0
    for trait, (method, position, best) in ti.EXPECTED_BEST.items():
        for pid, (p_ids, r_ids) in ti.TOKENS.items():
            data = json.loads(
                paths.projection_file(ti.APPLICATION, trait, ti.PROMPT_SET, pid).read_text()
            )
            entries = _viewer_entries(data)
            meta = data["metadata"]
            assert TI_METADATA <= set(meta)
            assert meta["n_vectors"] == len(entries) and meta["position"] == position
            assert meta["component"] == "residual" and meta["prompt_id"] == pid
            layers = sorted({best, min(best + 1, ti.N_LAYERS - 1)})
            assert [e["layer"] for e in entries] == layers
            assert set(data["activation_norms"]) == {"prompt", "response"}
            assert set(data["activation_norms"]["response"]) == {str(x) for x in layers}
            only = pid == ti.RESPONSE_ONLY
            assert meta["n_prompt_tokens"] == (0 if only else len(p_ids))
            assert meta["n_response_tokens"] == len(r_ids)
            for e in entries:
                assert TI_ENTRY <= set(e) and e["method"] == method
                assert e["selection_source"] == "steering"
                folder = sanitize_position(position)
                v = _unit(ti.vector(trait, folder, method, e["layer"]))
                for seg in ("prompt", "response"):
                    if seg == "prompt" and only:
                        assert e["prompt"] == [] and e["token_norms"]["prompt"] == []
                        assert data["activation_norms"]["prompt"][str(e["layer"])] == 0.0
                        continue
                    h = ti.activations(pid, seg, "residual")[e["layer"]].float()
                    np.testing.assert_allclose(e[seg], (h @ v).numpy(), rtol=1e-5, atol=1e-5)
                    norms = h.norm(dim=-1).numpy()
                    np.testing.assert_allclose(e["token_norms"][seg], norms, rtol=1e-5)
                    mean = data["activation_norms"][seg][str(e["layer"])]
                    assert mean == pytest.approx(float(norms.mean()), rel=1e-5)

    # attn_contribution from the same raw/residual files (trait-interp keeps both there).
    args = [
        *args[:3],
        "--layers",
        "1",
        "--component",
        "attn_contribution",
        "--traits",
        "emotion/joy",
    ]
    assert infer_cli(ti_root, ti.EXPERIMENT, *args) == 0
    data = json.loads(
        paths.projection_file(ti.APPLICATION, "emotion/joy", ti.PROMPT_SET, "1").read_text()
    )
    (entry,) = _viewer_entries(data)
    assert (data["metadata"]["component"], entry["method"], entry["layer"]) == (
        "attn_contribution",
        "probe",
        1,
    )
    h = ti.activations("1", "response", "attn_contribution")[1].float()
    v = _unit(ti.vector("emotion/joy", "response__5", "probe", 1, "attn_contribution"))
    np.testing.assert_allclose(entry["response"], (h @ v).numpy(), rtol=1e-5, atol=1e-5)
