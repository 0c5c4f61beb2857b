"""The experiment tree against ground truth: prompt sets, names, layers, best layer, outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.errors import InputError
from raypipe.store import atomic
from raypipe.store.experiment import load_experiment
from raypipe.store.outputs import (
    RESPONSE_KEYS,
    VectorInfo,
    projection_entry,
    projection_record,
    read_projection,
    read_response,
    response_record,
    write_projection,
    write_response,
)
from raypipe.store.pairs import load_trait_data
from raypipe.store.parquet import build_parquet
from raypipe.store.paths import ExperimentPaths, check_name, check_relpath, sanitize_position
from raypipe.store.prompts import MAX_PROMPT_CHARS, load_prompt_set
from raypipe.store.vectors import (
    LayerSpec,
    best_layer,
    file_digest,
    find_vector_set,
    load_steering,
    load_vector,
    load_vectors,
    parse_layers,
    resolve_vectors,
)

# ---------------------------------------------------------------- helpers


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _prompts(tmp_path: Path, name: str, obj) -> Path:
    _write(tmp_path / "datasets" / "inference" / f"{name}.json", obj)
    return tmp_path / "datasets"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- prompt sets


def test_prompt_set_object_shape(tmp_path):
    datasets = _prompts(
        tmp_path,
        "starter_prompts/general",
        {
            "name": "general",
            "description": "d",
            "system_prompt": "be brief",
            "prompts": [
                {"id": 0, "text": "zero", "note": "first", "extra": [1, 2]},
                {"id": "b", "text": "bee", "system_prompt": "be long"},
                {"id": 12, "prompt": "via prompt"},
                {"id": "t", "text": "text wins", "prompt": "not this"},
                {"id": "e", "text": "empty own system", "system_prompt": ""},
            ],
        },
    )
    ps = load_prompt_set(datasets, "starter_prompts/general")
    assert ps.name == "starter_prompts/general"
    assert ps.path == datasets / "inference" / "starter_prompts" / "general.json"
    got = [(p.id, p.text, p.system_prompt, p.note) for p in ps.items]
    assert got == [
        ("0", "zero", "be brief", "first"),
        ("b", "bee", "be long", None),
        ("12", "via prompt", "be brief", None),
        ("t", "text wins", "be brief", None),
        ("e", "empty own system", "", None),  # an explicit "" overrides the top-level prompt
    ]
    assert all(isinstance(p.id, str) for p in ps.items)


def test_prompt_set_bare_list(tmp_path):
    datasets = _prompts(tmp_path, "flat", [{"id": 3, "prompt": "p"}, {"id": "x-1.a", "text": "t"}])
    ps = load_prompt_set(datasets, "flat")
    assert [(p.id, p.text, p.system_prompt, p.note) for p in ps.items] == [
        ("3", "p", None, None),
        ("x-1.a", "t", None, None),
    ]


def test_prompt_set_keeps_surrogate_pairs_and_control_characters(tmp_path):
    # "\ud83d\ude00" in JSON is one character (an emoji), unlike a lone surrogate; control
    # characters are text the model may be asked about (they are escaped only when printed).
    path = tmp_path / "datasets" / "inference" / "u.json"
    path.parent.mkdir(parents=True)
    path.write_text(r'[{"id": 0, "text": "smile \ud83d\ude00 \u001b[2J", "note": "\u202e"}]')
    (item,) = load_prompt_set(tmp_path / "datasets", "u").items
    assert item.text == "smile \U0001f600 \x1b[2J" and item.note == "\u202e"
    assert item.text.encode("utf-8")


def test_prompt_set_limit_is_inclusive(tmp_path):
    datasets = _prompts(tmp_path, "big", [{"id": 0, "text": "a" * MAX_PROMPT_CHARS}])
    assert len(load_prompt_set(datasets, "big").items[0].text) == MAX_PROMPT_CHARS
    datasets = _prompts(tmp_path, "big", [{"id": 0, "text": "a" * (MAX_PROMPT_CHARS + 1)}])
    with pytest.raises(InputError) as e:
        load_prompt_set(datasets, "big")
    assert e.value.field == "prompts[0].text"


@pytest.mark.parametrize(
    "items, field",
    [
        ([{"id": 1, "text": "a"}, {"id": "1", "text": "b"}], "prompts[1].id"),
        ([{"id": True, "text": "a"}], "prompts[0].id"),
        ([{"id": "../x", "text": "a"}], "prompts[0].id"),
        ([{"id": 0, "text": " \n"}], "prompts[0].text"),
        ([{"id": 0, "prompt": 5}], "prompts[0].prompt"),
    ],
)
def test_prompt_set_errors_name_the_item(tmp_path, items, field):
    datasets = _prompts(tmp_path, "bad", {"prompts": items})
    with pytest.raises(InputError) as e:
        load_prompt_set(datasets, "bad")
    assert e.value.field == field
    assert e.value.where == str(datasets / "inference" / "bad.json")


def test_trait_pairs_with_a_lone_surrogate_name_the_pair(tmp_path):
    pairs = [{"prompt": "p", "positive": "yes", "negative": "no"} for _ in range(4)]
    pairs[2]["negative"] = "no \udc80"
    folder = tmp_path / "traits"
    _write(folder / "cat" / "t" / "pairs.json", {"pairs": pairs})
    with pytest.raises(InputError) as e:
        load_trait_data(folder, "cat/t")
    assert (e.value.where, e.value.field) == (str(folder / "cat/t/pairs.json"), "pairs[2].negative")
    assert "\\udc80 at index 3" in e.value.message


# ---------------------------------------------------------------- names and paths


@pytest.mark.parametrize(
    "position, expected",
    [
        ("response[:5]", "response__5"),
        ("response[:]", "response_all"),
        ("prompt[-1]", "prompt_-1"),
        ("response", "response"),
    ],
)
def test_sanitize_position(position, expected):
    assert sanitize_position(position) == expected


def test_paths_follow_the_spec_layout(tmp_path):
    p = ExperimentPaths(tmp_path, "e")
    exp = tmp_path / "experiments" / "e"
    assert p.vector_file("cat/t", "base", "response[:5]", "residual", "probe", 0) == (
        exp / "extraction/cat/t/base/vectors/response__5/residual/probe/layer0.pt"
    )
    assert p.steering_results("cat/t", "base", "response[:]") == (
        exp / "steering/cat/t/base/response_all/steering/results.jsonl"
    )
    assert p.response_file("v", "a/b", "7") == exp / "inference/v/responses/a/b/7.json"
    assert p.projection_file("v", "cat/t", "a/b", "7") == (
        exp / "inference/v/projections/cat/t/a/b/7.json"
    )
    assert p.raw_file("v", "residual", "s", "7") == exp / "inference/v/raw/residual/s/7.pt"
    assert p.calibration_file("v") == exp / "inference/v/massive_activations/calibration.json"


@pytest.mark.parametrize("value", ["0\n", "tiny\n", "a.b\n", "\n", "0\r\n"])
def test_a_final_newline_is_not_a_safe_name(value):
    with pytest.raises(InputError) as e:
        check_name(value, "where", "field")
    assert e.value.field == "field"
    with pytest.raises(InputError):
        check_relpath(f"cat/{value}", "where", "field")
    with pytest.raises(InputError):
        check_relpath(f"{value}/name", "where", "field")


# ---------------------------------------------------------------- --layers


@pytest.mark.parametrize(
    "text, n_layers, absolute, offsets",
    [
        ("best", 30, (), (0,)),
        ("best,best+5", 30, (), (0, 5)),
        ("best-3, best+0", 30, (), (-3, 0)),
        ("0", 30, (0,), ()),
        ("0,7,29", 30, (0, 7, 29), ()),
        ("5-8", 30, (5, 6, 7, 8), ()),
        ("0-30:5", 31, (0, 5, 10, 15, 20, 25, 30), ()),
        ("2-9:3", 30, (2, 5, 8), ()),
        ("all", 4, (0, 1, 2, 3), ()),
        ("0%-100%", 5, (0, 1, 2, 3, 4), ()),
        ("50%-50%", 5, (2,), ()),
        ("25%-75%", 9, (2, 3, 4, 5, 6), ()),
        ("3,3,1-3,best,best", 4, (3, 1, 2), (0,)),  # duplicates collapse, order kept
        ("1, 2 ,best+1", 4, (1, 2), (1,)),
        (" 1 , 2 ", 4, (1, 2), ()),
        # spaces beside + - : % cannot join two numbers: the meaning is plain
        ("best + 2, best - 1", 30, (), (2, -1)),
        ("5 - 8", 30, (5, 6, 7, 8), ()),
        ("0-30 : 10", 31, (0, 10, 20, 30), ()),
        ("0 % - 100 %", 5, (0, 1, 2, 3, 4), ()),
    ],
)
def test_parse_layers(text, n_layers, absolute, offsets):
    spec = parse_layers(text, n_layers)
    assert isinstance(spec, LayerSpec)
    assert spec.absolute == absolute
    assert spec.best_offsets == offsets


def test_parse_layers_percent_bounds_follow_trait_interp():
    # SPEC 4: int(n_layers * p), as trait-interp's parse_layers: 30%-60% of 30 layers is 9-18.
    assert parse_layers("30%-60%", 30).absolute == tuple(range(9, 19))
    assert parse_layers("30%-60%", 26).absolute == tuple(range(7, 16))  # int(7.8), int(15.6)
    assert parse_layers("0%-100%", 30).absolute == tuple(range(30))  # 100% is past the last


@pytest.mark.parametrize("text", ["4", "0,4", "2-6", "0-9:3"])
def test_parse_layers_beyond_depth_names_the_depth(text):
    with pytest.raises(InputError) as e:
        parse_layers(text, 4)
    assert e.value.where == "--layers"
    assert e.value.field == "layers"
    assert "4 layers" in e.value.message and "0-3" in e.value.message


@pytest.mark.parametrize(
    "text", ["", "x", "best+", "best*2", "3-1", "1-3:0", "10%-5%", "50%-120%", "1,,2", "-1", "1.5"]
)
def test_parse_layers_rejects(text):
    with pytest.raises(InputError) as e:
        parse_layers(text, 30)
    assert e.value.field == "layers"


@pytest.mark.parametrize("text", ["1 2", "1\t2", "1\u00a02", "best 5", "best+1 0", "al l", "1-2 0"])
def test_parse_layers_never_joins_numbers_across_a_space(text):
    # "1 2" used to mean layer 12: it may mean 1,2 as well, so it is an error that says so.
    with pytest.raises(InputError) as e:
        parse_layers(text, 30)
    assert (e.value.where, e.value.field) == ("--layers", "layers")
    assert "comma" in e.value.message


# ---------------------------------------------------------------- steering and best layer

RUN = "response[:]"


def _run(layer, trait, coherence, method="probe", component="residual"):
    return {
        "result": {"trait_mean": trait, "coherence_mean": coherence, "n": 5},
        "config": {
            "vectors": [
                {
                    "layer": layer,
                    "component": component,
                    "position": RUN,
                    "method": method,
                    "weight": 4.0,
                }
            ]
        },
    }


def _steering(root: Path, lines, trait="behavior/alpha") -> Path:
    path = ExperimentPaths(root, "tiny").steering_results(trait, "base", RUN)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def _header(direction="positive"):
    return {"type": "header", "direction": direction, "trait": "behavior/alpha"}


def _baseline(trait_mean=10.0):
    return {"type": "baseline", "result": {"trait_mean": trait_mean, "coherence_mean": 90.0}}


def _best(root: Path, lines):
    paths = ExperimentPaths(root, "tiny")
    vset = find_vector_set(paths, "behavior/alpha", "base", "residual")
    assert vset.method == "probe"  # the default preference
    return best_layer(vset, load_steering(_steering(root, lines)))


def test_best_layer_positive_direction_filters_runs(tiny_root):
    lines = [
        _header("positive"),
        _baseline(10.0),
        _run(0, 15.0, 80.0),  # +5
        _run(1, 11.0, 95.0),  # +1 ...
        _run(1, 20.0, 77.0),  # ... +10 at exactly the coherence bar: kept, the max for layer 1
        _run(2, 90.0, 76.9),  # incoherent: ignored
        _run(3, 90.0, 99.0, method="mean_diff"),  # other method: ignored
        _run(3, 90.0, 99.0, component="attn_contribution"),  # other component: ignored
        _run(9, 90.0, 99.0),  # no such vector: ignored
        _run(3, 12.0, 90.0),  # +2
    ]
    assert _best(tiny_root, lines)[:2] == (1, "steering")


def test_best_layer_negative_direction(tiny_root):
    lines = [
        _header("negative"),
        _baseline(10.0),
        _run(0, 4.0, 80.0),  # -(4-10) = +6
        _run(1, 8.0, 80.0),  # +2
        _run(2, 0.0, 50.0),  # +10 but incoherent
        _run(3, 20.0, 99.0),  # -10
    ]
    layer, source, why = _best(tiny_root, lines)
    assert (layer, source) == (0, "steering")
    assert "+6.00" in why


def test_best_layer_ties_go_to_the_lower_layer(tiny_root):
    lines = [_header(), _baseline(0.0), _run(3, 5.0, 80.0), _run(2, 5.0, 80.0), _run(1, 4.0, 80)]
    assert _best(tiny_root, lines)[:2] == (2, "steering")


def test_best_layer_header_order_does_not_matter(tiny_root):
    lines = [_run(2, 1.0, 80.0), _run(3, 3.0, 80.0), _baseline(2.0), _header("negative")]
    assert _best(tiny_root, lines)[:2] == (2, "steering")


@pytest.mark.parametrize(
    "lines",
    [
        [_header(), _baseline(0.0), _run(3, 50.0, 70.0), _run(2, 50.0, 76.99)],  # all incoherent
        [_header(), _baseline(0.0), _run(3, 50.0, 90.0, method="mean_diff")],  # other method
        [_header(), _baseline(0.0)],  # no runs
    ],
)
def test_best_layer_falls_back_to_effect_size(tiny_root, lines):
    # tests/tiny.py: probe val_effect_size is 0.0, 1.1, 0.2, 0.3 for layers 0-3.
    layer, source, why = _best(tiny_root, lines)
    assert (layer, source) == (1, "effect_size")
    assert "1.10" in why


def test_a_steering_file_without_baseline_line_has_baseline_zero(tiny_root):
    # SPEC 2: "a file without a baseline line uses a baseline trait_mean of 0" (as trait-interp).
    lines = [_header(), _run(3, 50.0, 90.0), _run(2, 40.0, 90.0)]
    assert _best(tiny_root, lines) == (3, "steering", "steering delta +50.00")


def test_best_layer_without_steering_file(tiny_root):
    paths = ExperimentPaths(tiny_root, "tiny")
    vset = find_vector_set(paths, "tone/beta", "base", "residual", method="mean_diff")
    assert load_steering(paths.steering_results("tone/beta", "base", RUN)) is None
    # mean_diff val_effect_size: 0, 1, 0, 0 -> layer 1
    assert best_layer(vset, None)[:2] == (1, "effect_size")


def test_effect_size_ties_go_to_the_lower_layer(tiny_root):
    paths = ExperimentPaths(tiny_root, "tiny")
    vset = find_vector_set(paths, "behavior/alpha", "base", "residual")
    meta_path = vset.dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for layer, value in {"0": 0.5, "1": 0.9, "2": 0.9, "3": 0.9}.items():
        meta["layers"][layer]["val_effect_size"] = value
    meta_path.write_text(json.dumps(meta))
    vset = find_vector_set(paths, "behavior/alpha", "base", "residual")
    assert best_layer(vset, None)[:2] == (1, "effect_size")


def test_no_steering_and_no_effect_size_is_an_error(tiny_root):
    paths = ExperimentPaths(tiny_root, "tiny")
    vset = find_vector_set(paths, "behavior/alpha", "base", "residual")
    meta = json.loads((vset.dir / "metadata.json").read_text())
    for entry in meta["layers"].values():
        entry.pop("val_effect_size")
    (vset.dir / "metadata.json").write_text(json.dumps(meta))
    vset = find_vector_set(paths, "behavior/alpha", "base", "residual")
    with pytest.raises(InputError) as e:
        best_layer(vset, None)
    assert e.value.where == str(vset.dir)
    assert "behavior/alpha" in e.value.message


def test_load_steering_parses_all_line_kinds(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [_header("negative"), _baseline(3.5), _run(2, 1.0, 80.0)]
    path.write_text("\r\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    res = load_steering(path)
    assert res.direction == "negative"
    assert res.baseline_trait_mean == 3.5
    assert [(r.layer, r.method, r.component, r.trait_mean, r.coherence_mean) for r in res.runs] == [
        (2, "probe", "residual", 1.0, 80.0)
    ]


def test_load_steering_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "results.jsonl"
    header = {**_header(), "question": "first line\u2028second line"}
    lines = [header, _baseline(1.0), _run(0, 2.0, 80.0)]
    path.write_text(
        "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8"
    )
    assert len(load_steering(path).runs) == 1


def test_a_steering_run_without_method_is_a_probe_run(tiny_root):
    # SPEC 2: "A run vector without `method` means `probe`" (it used to match no method).
    run = _run(2, 30.0, 90.0)
    del run["config"]["vectors"][0]["method"]
    assert _best(tiny_root, [_header(), _baseline(10.0), _run(1, 15.0, 90.0), run]) == (
        2,
        "steering",
        "steering delta +20.00",
    )


def test_a_bad_steering_value_is_quoted_briefly(tmp_path):
    path = tmp_path / "results.jsonl"
    run = _run(2, "x" * 1_000_000, 90.0)
    path.write_text("\n".join(json.dumps(x) for x in [_header(), _baseline(1.0), run]))
    with pytest.raises(InputError) as e:
        load_steering(path)
    assert e.value.field == "line 3.result.trait_mean"
    assert len(e.value.message) < 120 and e.value.message.endswith("...")


# ---------------------------------------------------------------- vector files


@pytest.mark.parametrize(
    "make",
    [
        lambda v: v,
        lambda v: v.half(),
        lambda v: v.bfloat16(),
        lambda v: v.double(),
        lambda v: v.requires_grad_(),
        lambda v: torch.nn.Parameter(v),
        lambda v: torch.stack([v, v], 1)[:, 0],  # a strided view: its storage is saved whole
    ],
    ids=["float32", "float16", "bfloat16", "float64", "requires_grad", "parameter", "view"],
)
def test_load_vector_takes_any_dense_real_float_vector(tmp_path, make, recwarn):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    saved = make(v.clone())
    torch.save(saved, tmp_path / "layer0.pt")
    got = load_vector(tmp_path / "layer0.pt", 64)
    assert got == saved.detach().float().tolist()
    assert not [w for w in recwarn if "vectors.py" in w.filename]


def test_only_ascii_layer_files_are_layers(tiny_root):
    # `$` matched before a final newline and `\d` matches any script's digits: "layer٣.pt"
    # was layer 3, and "layer0.pt\n" could stand in for layer 0.
    paths = ExperimentPaths(tiny_root, "tiny")
    folder = find_vector_set(paths, "behavior/alpha", "base", "residual").dir
    for name in ("layer0.pt\n", "layer\u0663.pt", "layer\uff11.pt", "layer2.pt.bak"):
        (folder / name).write_bytes(b"not a tensor")
    vset = find_vector_set(paths, "behavior/alpha", "base", "residual")
    assert vset.layer_files == {i: folder / f"layer{i}.pt" for i in range(4)}


def test_load_vector_reads_the_legacy_torch_format(tmp_path):
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    torch.save(v, tmp_path / "layer0.pt", _use_new_zipfile_serialization=False)
    assert load_vector(tmp_path / "layer0.pt", 64) == v.tolist()


# ---------------------------------------------------------------- resolve_vectors


def test_resolve_vectors_clamps_best_plus_n(tiny_root):
    paths = ExperimentPaths(tiny_root, "tiny")
    specs, notes = resolve_vectors(
        paths,
        ["behavior/alpha", "tone/beta"],
        "base",
        "residual",
        parse_layers("best,best+5,best-5", 4),
        n_layers=4,
        hidden_size=64,
    )
    got = [(s.trait, s.layer, s.selection_source, s.method) for s in specs]
    assert got == [
        ("behavior/alpha", 0, "effect_size", "probe"),
        ("behavior/alpha", 1, "effect_size", "probe"),
        ("behavior/alpha", 3, "effect_size", "probe"),
        ("tone/beta", 0, "effect_size", "probe"),
        ("tone/beta", 1, "effect_size", "probe"),
        ("tone/beta", 3, "effect_size", "probe"),
    ]
    text = "\n".join(notes)
    assert "behavior/alpha: best+5 = layer 6 is outside 0-3, clamped to 3" in text
    assert "behavior/alpha: best-5 = layer -4 is outside 0-3, clamped to 0" in text
    assert "tone/beta: best layer 1" in text
    for s in specs:  # the vectors are the files' values and baselines are the metadata's
        f = paths.vector_file(s.trait, "base", RUN, "residual", "probe", s.layer)
        assert s.file == f and s.digest == file_digest(f)
        assert load_vectors([s], 64) == [(s.layer, torch.load(f, weights_only=True).tolist())]
        assert s.baseline == 0.25 * s.layer
        assert s.position == RUN


def test_resolve_vectors_steering_and_explicit_layers(tiny_root):
    _steering(tiny_root, [_header(), _baseline(0.0), _run(2, 9.0, 90.0)])
    specs, _ = resolve_vectors(
        ExperimentPaths(tiny_root, "tiny"),
        ["behavior/alpha"],
        "base",
        "residual",
        parse_layers("0,best,2,best+1", 4),
        n_layers=4,
        hidden_size=64,
    )
    assert [(s.layer, s.selection_source) for s in specs] == [
        (0, "layers_arg"),
        (2, "steering"),
        (3, "steering"),
    ]


def test_resolve_vectors_method_override(tiny_root):
    specs, _ = resolve_vectors(
        ExperimentPaths(tiny_root, "tiny"),
        ["tone/beta"],
        "base",
        "residual",
        parse_layers("0", 4),
        n_layers=4,
        hidden_size=64,
        method="mean_diff",
    )
    assert [(s.method, s.layer, s.selection_source) for s in specs] == [
        ("mean_diff", 0, "layers_arg")
    ]


def test_resolve_vectors_falls_back_to_mean_diff(tiny_root):
    probe = ExperimentPaths(tiny_root, "tiny").vectors_dir(
        "tone/beta", "base", RUN, "residual", "probe"
    )
    for f in probe.iterdir():
        f.unlink()
    specs, _ = resolve_vectors(
        ExperimentPaths(tiny_root, "tiny"),
        ["tone/beta"],
        "base",
        "residual",
        parse_layers("1", 4),
        n_layers=4,
        hidden_size=64,
    )
    assert [s.method for s in specs] == ["mean_diff"]


# ---------------------------------------------------------------- experiment config


def _config(root: Path, obj) -> ExperimentPaths:
    _write(root / "experiments" / "e" / "config.json", obj)
    return ExperimentPaths(root, "e")


def test_load_experiment_missing_defaults_take_the_first_variant(tmp_path):
    cfg = load_experiment(
        _config(tmp_path, {"model_variants": {"b": {"model": "m1"}, "a": {"model": "m2"}}})
    )
    assert cfg.extraction_variant == "b" and cfg.application_variant == "b"
    assert cfg.variant(None).name == "b"
    assert cfg.variant("a").model == "m2"
    assert cfg.use_chat_template is None


def test_load_experiment_partial_defaults(tmp_path, monkeypatch):
    adapter = tmp_path / "adapters" / "x"
    _write(adapter / "adapter_config.json", {"peft_type": "LORA"})
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(
        _config(
            tmp_path,
            {
                "defaults": {"application": "it"},
                "model_variants": {
                    "base": {"model": "m"},
                    "it": {"model": "m-it", "lora": "adapters/x"},
                },
                "use_chat_template": False,
            },
        )
    )
    assert cfg.extraction_variant == "base"
    assert cfg.application_variant == "it"
    assert cfg.variants["it"].lora == "adapters/x"  # as written in config.json
    assert cfg.variant(None, "application").lora == str(adapter.resolve())  # as loaded
    assert cfg.variant(None, "extraction").name == "base"
    assert cfg.use_chat_template is False


def test_unknown_variant_names_the_flag(tmp_path):
    cfg = load_experiment(_config(tmp_path, {"model_variants": {"base": {"model": "m"}}}))
    with pytest.raises(InputError) as e:
        cfg.variant("nope")
    assert (e.value.where, e.value.field) == ("--model-variant", "model_variant")


# ---------------------------------------------------------------- atomic writes


class Boom(Exception):
    pass


def _partial_then_raise(fh):
    fh.write(b"half a file")
    raise Boom


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(Boom):
        atomic._atomic(target, _partial_then_raise)
    assert _files(tmp_path / "sub") == []


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = atomic.write_json(tmp_path / "out.json", {"v": 1})
    with pytest.raises(Boom):
        atomic._atomic(target, _partial_then_raise)
    with pytest.raises(KeyboardInterrupt):
        atomic._atomic(target, lambda fh: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(TypeError):
        atomic.write_tensor(target, threading.Lock())  # torch.save cannot pickle a lock
    assert _files(tmp_path) == ["out.json"]
    assert json.loads(target.read_text()) == {"v": 1}


def test_write_with_cleans_up_its_temp_name(tmp_path):
    def fill(name):
        Path(name).write_bytes(b"partial")
        raise Boom

    with pytest.raises(Boom):
        atomic.write_with(tmp_path / "t.parquet", fill)
    assert _files(tmp_path) == []
    atomic.write_with(tmp_path / "t.parquet", lambda name: Path(name).write_bytes(b"ok"))
    assert _files(tmp_path) == ["t.parquet"]


def test_write_json_refuses_nan_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError):
        atomic.write_json(tmp_path / "x.json", {"score": math.nan})
    assert _files(tmp_path) == []


def test_write_json_is_lossless(tmp_path):
    obj = {"text": 'café ☕ \u2028 "q" \\ \n', "f": 0.1 + 0.2, "big": 2**70, "none": None}
    path = atomic.write_json(tmp_path / "x.json", obj)
    assert json.loads(path.read_bytes().decode("utf-8")) == obj
    assert atomic.read_json(path) == obj


# ---------------------------------------------------------------- response / projection JSON


def _response(prompt_id: int = 0) -> dict:
    ids = [5, 6, 7, 8, 9 + prompt_id]
    return response_record(
        prompt=f"<|user|> hi {prompt_id} </s> <|assistant|>",
        response="é ☕ done",
        system_prompt=None if prompt_id else "sys",
        tokens=["<|user|>", "hi", "</s>", "é", "done"],
        token_ids=np.array(ids, dtype=np.int64),  # numpy ints become plain ints
        prompt_end=np.int64(3),
        model="tiny",
        note="n" if prompt_id == 0 else None,
    )


def test_response_round_trip(tmp_path):
    rec = _response()
    assert tuple(rec) == RESPONSE_KEYS
    path = write_response(tmp_path / "r" / "0.json", rec)
    assert read_response(path) == rec
    raw = json.loads(path.read_text("utf-8"))
    assert raw["token_ids"] == [5, 6, 7, 8, 9] and raw["prompt_end"] == 3
    assert raw["prompt_note"] == "n" and raw["tags"] == [] and raw["system_prompt"] == "sys"
    assert datetime.fromisoformat(raw["capture_date"]).tzinfo is not None
    assert _files(tmp_path / "r") == ["0.json"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"token_ids": []}, "token_ids"),
        ({"token_ids": [1, -2, 3, 4, 5]}, "token_ids"),
        ({"token_ids": [1, True, 3, 4, 5]}, "token_ids"),
        ({"prompt_end": 0}, "prompt_end"),
        ({"prompt_end": 6}, "prompt_end"),
        ({"tokens": ["a"]}, "tokens"),
        ({"response": None}, "response"),
        # a reused response goes on to Parquet: strings must be strings, and UTF-8 encodable
        ({"prompt": "a\ud800"}, "prompt"),
        ({"response": "\udc00 b"}, "response"),
        ({"tokens": ["a", "b", "\ud800", "d", "e"]}, "tokens[2]"),
        ({"tokens": [1, 2, 3, 4, 5]}, "tokens[0]"),
        ({"system_prompt": 5}, "system_prompt"),
        ({"system_prompt": "\ud800"}, "system_prompt"),
        ({"inference_model": ["m"]}, "inference_model"),
        ({"capture_date": "\udfff"}, "capture_date"),
    ],
)
def test_read_response_rejects(tmp_path, change, field):
    path = tmp_path / "0.json"
    path.write_text(json.dumps({**_response(), **change}))
    with pytest.raises(InputError) as e:
        read_response(path)
    assert (e.value.where, e.value.field) == (str(path), field)


def _arrays(seed: int, n: int = 7):
    g = np.random.default_rng(seed)
    scores = g.normal(size=n).astype(np.float32)
    norms = g.uniform(1.0, 5.0, size=n).astype(np.float32)
    return scores, norms


INFO = VectorInfo("behavior/alpha", "probe", RUN, 2, "steering", 0.75)


@pytest.mark.parametrize("centered", [False, True])
def test_projection_entry_matches_ground_truth(centered):
    scores, norms = _arrays(0)
    e = projection_entry(INFO, scores, norms, prompt_end=3, centered=centered)
    s = scores.astype(np.float64) - (0.75 if centered else 0.0)
    n = norms.astype(np.float64)
    assert (e["method"], e["layer"], e["selection_source"], e["baseline"]) == (
        "probe",
        2,
        "steering",
        0.75,
    )
    np.testing.assert_allclose(e["prompt"], s[:3], rtol=1e-6)
    np.testing.assert_allclose(e["response"], s[3:], rtol=1e-6)
    assert e["token_norms"]["prompt"] == norms[:3].tolist()
    assert e["token_norms"]["response"] == norms[3:].tolist()
    np.testing.assert_allclose(e["normalized_prompt"], s[:3] / n[:3].mean(), rtol=1e-6)
    np.testing.assert_allclose(e["normalized_response"], s[3:] / n[3:].mean(), rtol=1e-6)


def test_projection_entry_with_cleaned_scores():
    scores, norms = _arrays(1, 5)
    cs, cn = scores - 1.0, norms * 0.5
    e = projection_entry(INFO, scores, norms, 2, centered=True, cleaned=(cs, cn, [np.int64(7)]))
    assert e["cleaned"]["dims"] == [7]
    np.testing.assert_allclose(e["cleaned"]["response"], cs[2:] - 0.75, rtol=1e-6)
    assert e["cleaned"]["token_norms"]["prompt"] == cn[:2].tolist()


def _projection(prompt_id: str, n_prompt=3, n_resp=4, layers=(0, 2), seed=0) -> dict:
    entries = []
    for i, layer in enumerate(layers):
        scores, norms = _arrays(seed * 10 + i, n_prompt + n_resp)
        info = VectorInfo("behavior/alpha", "probe", RUN, layer, "effect_size", 0.25 * layer)
        entries.append(projection_entry(info, scores, norms, n_prompt, centered=False))
    return projection_record(
        prompt_id=prompt_id,
        prompt_set="tests/small",
        n_prompt_tokens=n_prompt,
        n_response_tokens=n_resp,
        component="residual",
        position=RUN,
        centered=False,
        entries=entries,
    )


def test_projection_round_trip_is_exact(tmp_path):
    rec = _projection("4")
    path = write_projection(tmp_path / "4.json", rec)
    back = read_projection(path)
    assert back == rec
    meta = back["metadata"]
    assert meta["prompt_id"] == "4" and meta["n_prompt_tokens"] == 3
    assert meta["score_mode"] == "raw+normalized" and meta["centered"] is False
    datetime.fromisoformat(meta["projection_date"])
    for i, entry in enumerate(back["projections"]):
        # every float32 score survives JSON exactly
        scores, _ = _arrays(i)
        assert np.array_equal(np.float32(entry["prompt"] + entry["response"]), scores)


# ---------------------------------------------------------------- Parquet


IDS = ["0", "2", "10"]  # numeric order, not text order
TRAITS = ["behavior/alpha", "tone/beta"]


def _tree(tmp_path: Path) -> ExperimentPaths:
    paths = ExperimentPaths(tmp_path, "tiny")
    for n, pid in enumerate(IDS):
        write_response(paths.response_file("base", "tests/small", pid), _response(n))
        for t, trait in enumerate(TRAITS):
            write_projection(
                paths.projection_file("base", trait, "tests/small", pid),
                _projection(pid, seed=10 * n + t),
            )
    # files that are not projections of this set must not become rows
    (paths.projection_file("base", TRAITS[0], "tests/small", "0").parent / ".0.json.tmp-x").touch()
    write_projection(paths.projection_file("base", TRAITS[0], "other", "0"), _projection("0"))
    return paths


def test_parquet_build_survives_a_file_named_with_a_superscript_digit(tmp_path):
    # "²".isdigit() is True but int("²") raises: a stray "².json" crashed the build at the
    # end of a run. Such a name sorts after the numeric ids, with the other names.
    paths = _tree(tmp_path)
    stray = paths.response_file("base", "tests/small", "\u00b2")
    write_response(stray, _response(0))
    build_parquet(paths, "base", "tests/small")
    import pyarrow.parquet as pq

    table = pq.read_table(paths.parquet_file("base", "responses", "tests/small"))
    assert table.column("prompt_id").to_pylist() == [*IDS, "\u00b2"]


def test_capture_layer_keys_are_ascii_digits(tmp_path):
    from raypipe.store.captures import read_capture

    acts = {"residual": torch.zeros(1, 4)}
    seg = {"text": "t", "tokens": ["a"], "token_ids": [1], "activations": {"\u00b2": acts}}
    torch.save({"prompt": seg, "response": seg}, tmp_path / "0.pt")
    with pytest.raises(InputError) as e:
        read_capture(tmp_path / "0.pt")
    assert e.value.field == "prompt.activations.\u00b2"


def test_parquet_round_trip_pyarrow_and_duckdb(tmp_path):
    import pyarrow.parquet as pq

    duckdb = pytest.importorskip("duckdb")
    paths = _tree(tmp_path)
    first = build_parquet(paths, "base", "tests/small")
    proj_file, n_proj = first["projections"]
    resp_file, n_resp = first["responses"]
    assert proj_file == paths.parquet_file("base", "projections", "tests/small")
    assert (n_proj, n_resp) == (len(IDS) * len(TRAITS) * 2, len(IDS))

    again = build_parquet(paths, "base", "tests/small")  # a rebuild replaces, never appends
    assert {k: v[1] for k, v in again.items()} == {"projections": 12, "responses": 3}
    assert sorted(p.name for p in proj_file.parent.iterdir()) == ["small.parquet"]
    assert sorted(p.name for p in resp_file.parent.iterdir()) == ["small.parquet"]

    rows = pq.read_table(proj_file).to_pylist()
    assert len(rows) == 12
    keys = {(r["prompt_id"], r["trait"], r["method"], r["layer"], r["component"]) for r in rows}
    assert len(keys) == 12  # one row per (prompt, trait, method, layer, component)
    for r in rows:
        rec = read_projection(
            paths.projection_file("base", r["trait"], "tests/small", r["prompt_id"])
        )
        e = next(x for x in rec["projections"] if x["layer"] == r["layer"])
        assert r["prompt_set"] == "tests/small"
        assert r["prompt_scores"] == e["prompt"]
        assert r["response_scores"] == e["response"]
        assert r["prompt_norms"] == e["token_norms"]["prompt"]
        assert r["response_norms"] == e["token_norms"]["response"]
        assert r["normalized_prompt"] == e["normalized_prompt"]
        assert r["normalized_response"] == e["normalized_response"]
        assert r["baseline"] == e["baseline"] and r["selection_source"] == "effect_size"
        assert (r["n_prompt_tokens"], r["n_response_tokens"]) == (3, 4)
        assert (r["position"], r["centered"]) == (RUN, False)

    responses = pq.read_table(resp_file).to_pylist()
    assert [r["prompt_id"] for r in responses] == IDS
    for n, r in enumerate(responses):
        want = _response(n)
        assert r["token_ids"] == want["token_ids"] and r["tokens"] == want["tokens"]
        assert (r["prompt"], r["response"], r["prompt_end"]) == (
            want["prompt"],
            want["response"],
            3,
        )
        assert r["model"] == "tiny" and r["system_prompt"] == want["system_prompt"]

    con = duckdb.connect()
    q = f"read_parquet('{proj_file}')"
    assert con.execute(f"select count(*) from {q}").fetchone()[0] == 12
    dup = con.execute(
        f"select count(*) from (select prompt_id, trait, method, layer, component, count(*) c "
        f"from {q} group by all having c > 1)"
    ).fetchone()[0]
    assert dup == 0
    one = rows[5]
    got = con.execute(
        f"select response_scores, len(prompt_scores) from {q} "
        "where prompt_id = ? and trait = ? and layer = ?",
        [one["prompt_id"], one["trait"], one["layer"]],
    ).fetchall()
    assert len(got) == 1
    np.testing.assert_array_equal(np.float32(got[0][0]), np.float32(one["response_scores"]))
    assert got[0][1] == 3
    ids = con.execute(f"select prompt_id, len(token_ids) from read_parquet('{resp_file}')")
    assert sorted(ids.fetchall()) == sorted((pid, 5) for pid in IDS)


def test_parquet_of_an_empty_set_has_the_schema(tmp_path):
    import pyarrow.parquet as pq

    paths = ExperimentPaths(tmp_path, "tiny")
    out = build_parquet(paths, "base", "nothing")
    assert out["projections"][1] == 0 and out["responses"][1] == 0
    table = pq.read_table(out["projections"][0])
    assert table.num_rows == 0 and "response_scores" in table.schema.names


def _trait_interp_dumps_compact(obj) -> str:
    """trait-interp's utils/json.py `dumps_compact` (its inference writes responses with it),
    as it is there, for the layout raypipe's files must have (ensure_ascii aside)."""
    import re

    s = json.dumps(obj, indent=2, ensure_ascii=False)
    return re.sub(
        r"\[\s*\n\s*([^\[\]{}]*?)\s*\n\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        s,
        flags=re.DOTALL,
    )


def test_json_files_have_trait_interps_layout_one_line_per_array(tmp_path):
    """Objects indented, a list of numbers or strings on one line (trait-interp's layout,
    written by the C encoder: an indented score array took 2-3x as long to write); the same
    values; NaN refused."""
    record = {
        "metadata": {"prompt_id": "7", "n": 3, "none": None, "ok": True, "empty": {}, "e": []},
        "projections": [
            {"layer": i, "prompt": [0.1 * i, -1e-07, 2.5e20, 3], "tokens": ["é", '"q"']}
            for i in range(3)
        ],
        "nested": [[1, 2], [3]],
        1: 2.5,
    }
    path = atomic.write_json(tmp_path / "r.json", record)
    text = path.read_text(encoding="utf-8")
    assert text == _trait_interp_dumps_compact(record)
    assert json.loads(text) == json.loads(json.dumps(record))
    assert '"prompt": [0.0, -1e-07, 2.5e+20, 3],' in text
    # (trait-interp's regex splits a list whose strings hold brackets; raypipe keeps it whole.)
    assert atomic.dumps_compact({"t": ["[x]", "a,b"]}) == '{\n  "t": ["[x]", "a,b"]\n}'
    with pytest.raises(ValueError):
        atomic.write_json(tmp_path / "nan.json", {"x": [float("nan")]})
    assert not (tmp_path / "nan.json").exists()


def test_json_files_written_together_are_whole_or_absent(tmp_path):
    """write_json_files: every file as write_json writes it; where one cannot be written, an
    error naming it, and none of the batch visible, no temp file left."""
    from raypipe.errors import OutputError

    files = [(tmp_path / "a" / f"{i}.json", {"i": i, "s": [i, i + 0.5]}) for i in range(20)]
    atomic.write_json_files(files)
    for path, obj in files:
        assert path.read_text(encoding="utf-8") == atomic.dumps_compact(obj)
    (tmp_path / "blocked").write_text("a file where a folder must go")
    bad = [
        (tmp_path / "b" / "0.json", {"x": 1}),
        (tmp_path / "blocked" / "1.json", {"x": 2}),
        (tmp_path / "b" / "2.json", {"x": 3}),
    ]
    with pytest.raises(OutputError, match="blocked/1.json"):
        atomic.write_json_files(bad)
    assert list((tmp_path / "b").iterdir()) == []
    with pytest.raises(ValueError):  # a NaN: refused before any file is made
        atomic.write_json_files([(tmp_path / "c" / "0.json", {"x": float("nan")})])
    assert not (tmp_path / "c").exists()
    atomic.write_json_files([])


def test_json_files_commit_once_per_filesystem(tmp_path, monkeypatch):
    """A batch of files is committed by one syncfs per filesystem it lies on (then each file's
    own fsync reports its errors): files on two filesystems, two calls, every file whole."""
    import tempfile

    other = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    atomic._syncfs([])  # resolve the C library's syncfs (or its absence) first
    if not atomic._LIBC:
        pytest.skip("no syncfs(2) here: the fsyncs alone commit the files")
    calls = []
    real = atomic._LIBC
    monkeypatch.setattr(atomic, "_LIBC", lambda fd: calls.append(os.fstat(fd).st_dev) or real(fd))
    try:
        files = [(tmp_path / "x" / f"{i}.json", {"i": i}) for i in range(5)]
        if other is not None:
            files += [(other / f"{i}.json", {"j": i}) for i in range(3)]
        atomic.write_json_files(files)
        for path, obj in files:
            assert path.read_text(encoding="utf-8") == atomic.dumps_compact(obj)
        devices = {p.stat().st_dev for p, _ in files}
        assert sorted(calls) == sorted(devices)
        calls.clear()
        atomic.write_json_files([(tmp_path / "one.json", {"k": 1})])  # one file: its fsync
        assert calls == []
    finally:
        if other is not None:
            shutil.rmtree(other, ignore_errors=True)


JSON_DOCUMENTS = [
    "[]",
    '[{"id": 1}]',
    ' [ {"id":1} , {"id":"b","x":[1,2,{"y":"]"}]} ] ',
    '{"prompts": [{"id": 1}], "system_prompt": "s"}',
    '{"system_prompt": 3, "prompts": []}',
    '{"prompts": 5}',
    '{"x": [1,2]}',
    "{}",
    "5",
    "",
    "[1,",
    "[1,]",
    '{"a": 1,}',
    "{1: 2}",
    "[1] x",
    '{"prompts": [1]} ]',
    '{"prompts": [1], "prompts": [2]}',
    '[{"id": 1e999999}]',
    "[" * 100000 + "]" * 100000,
    '[{"a": 1}\n,\n{"b": 2] ]',
    "\ufeff[]",
    "[1 2]",
    "[" + "1" * 5000 + "]",
    "[NaN]",
    b'[{"id": 0, "text": "caf\xe9"}]',  # not UTF-8
]


@pytest.mark.parametrize("text", JSON_DOCUMENTS, ids=lambda t: repr(t[:20]))
def test_a_json_set_read_item_by_item_reads_as_the_whole_document(tmp_path, text):
    """A .json set is parsed a value at a time (its items are never all held as objects):
    the same items, system prompt and, for a broken document, the same one-line error as
    json.loads of the whole document gives."""
    from raypipe.store import prompts

    path = tmp_path / "s.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))

    def whole():
        data = atomic.read_json(path, "prompt_set")
        system_prompt = None
        if isinstance(data, dict):
            system_prompt = prompts._opt_str(data, "system_prompt", path, "system_prompt")
            if "prompts" not in data:
                raise InputError(path, "prompts", "missing (expected a list of prompts)")
            data = data["prompts"]
        if not isinstance(data, list):
            raise InputError(path, "prompts", f"must be a list, got {type(data).__name__}")
        return data, system_prompt

    def outcome(read):
        try:
            items, system_prompt = read()
            return list(items), system_prompt
        except InputError as e:
            return str(e)

    assert outcome(lambda: prompts._json_items(path)) == outcome(whole)
