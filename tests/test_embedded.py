"""Integration on the embedded SmolLM2-135M: greedy answers, real extraction, real inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raypipe.cli import main
from raypipe.engine.generate import GenerationOptions, uses_chat_template
from raypipe.engine.models import ModelSpec, load_model
from raypipe.engine.respond import Responder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    import os

    cache = Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser()
    return load_model(ModelSpec("smollm2-135m-instruct", cache, dtype="float32"))


def test_greedy_answer_is_paris(smol):
    model, tok = smol
    responder = Responder(
        model, tok, GenerationOptions(max_new_tokens=20), uses_chat_template(tok, None)
    )
    (res,) = responder.respond([("What is the capital of France?", None)])
    assert res.response_text == "The capital of France is Paris."
    assert (
        res.token_ids[: res.prompt_end]
        == tok(res.prompt_text, add_special_tokens=False)["input_ids"]
    )


def test_token_strings_equal_one_by_one_decoding(smol):
    """The kept token strings are what decoding each id alone gives, on first sight and
    again: specials, byte pieces of an emoji, accents, repeats."""
    from raypipe.engine.generate import token_strings

    _, tok = smol
    text = "<|im_start|>user\nCafé 🦜 déjà vu, déjà vu!<|im_end|>\n  \t spaces"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [0, 1, 2, tok.vocab_size - 1]
    want = tok.batch_decode([[i] for i in ids])
    assert token_strings(tok, ids) == want
    assert token_strings(tok, ids[::-1]) == want[::-1]  # all kept now
    assert token_strings(tok, []) == []


def test_extract_then_infer(ray_session, tmp_path, capsys):
    root = tmp_path
    shutil.copytree(
        REPO / "experiments" / "starter",
        root / "experiments" / "starter",
        ignore=shutil.ignore_patterns("extraction", "inference", "steering"),
    )
    trait_src = REPO / "datasets" / "traits" / "starter_traits" / "formality"
    shutil.copytree(trait_src, root / "datasets/traits/starter_traits/formality")
    (root / "datasets/inference/demo").mkdir(parents=True)
    general = json.loads((REPO / "datasets/inference/starter_prompts/general.json").read_text())
    general["prompts"] = general["prompts"][:4]
    (root / "datasets/inference/demo/four.json").write_text(json.dumps(general))
    assert main(["extract", "--root", str(root), "--experiment", "starter"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("starter_traits/formality"))
    val_acc = float(row.split()[3])
    assert val_acc >= 0.8, table  # formal vs casual register separates cleanly on this model
    meta = json.loads(
        next((root / "experiments/starter/extraction").rglob("metadata.json")).read_text()
    )
    assert {"baseline", "val_effect_size", "train_acc", "norm"} <= set(meta["layers"]["0"])
    args = [
        "infer",
        "--root",
        str(root),
        "--experiment",
        "starter",
        "--prompt-set",
        "demo/four",
        "--max-new-tokens",
        "12",
        "--quiet",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "starter_traits/formality" in out and "done 4" in out
    proj = root / "experiments/starter/inference/instruct/projections/starter_traits/formality"
    proj = proj / "demo/four"
    files = sorted(proj.glob("*.json"))
    assert len(files) == 4
    rec = json.loads(files[0].read_text())
    assert [e["selection_source"] for e in rec["projections"]] == ["effect_size", "effect_size"]
