"""The end-of-run report: right numbers, and nothing from the inputs that a terminal would obey."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from raypipe.cli import build_parser, infer_options
from raypipe.pipeline.job import Summary
from raypipe.pipeline.plan import InferPlan, plan_infer
from raypipe.pipeline.report import print_summary, trait_table
from raypipe.store.outputs import VectorInfo, projection_entry, projection_record, write_projection
from raypipe.store.parquet import build_parquet
from raypipe.store.text import printable
from tests.tiny import write_prompt_set

# What a terminal acts on instead of showing: C0, DEL, C1, line/paragraph separators, bidi
# controls; and lone surrogates, which a UTF-8 terminal cannot even be sent.
UNPRINTABLE = (
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u061c", "\u200e", "\u200f", "\u2028", "\u2029"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\ud800", "\udfff"]
)
HOSTILE = [
    "clear \x1b[2J the screen",
    "retitle \x1b]0;pwned\x07 the window",
    "flip \u202eevil\u202c text",
    "c1 \x9b31m csi and \x85 nel",
    "bell \x07 del \x7f tab\tnew\nline",
]


def test_printable_escapes_every_control_and_keeps_the_rest():
    for ch in UNPRINTABLE:
        out = printable(f"a{ch}b")
        assert out.isprintable() and out.isascii(), repr(ch)
        assert out == "a" + repr(ch)[1:-1] + "b"
    kept = "café 東京 \U0001f468\u200d\U0001f469 ü \\x1b plain"  # ZWJ emoji, a real backslash
    assert printable(kept) == kept
    assert printable("\x1b[2J") == "\\x1b[2J" and printable("\u202e") == "\\u202e"
    assert printable(3) == "3"


def _plan(root: Path) -> InferPlan:
    args = build_parser().parse_args(
        [
            "infer",
            "--root",
            str(root),
            "--experiment",
            "tiny",
            "--prompt-set",
            "tests/hostile",
            "--layers",
            "best",
            "--quiet",
        ]
    )
    return plan_infer(infer_options(args))


def _write_scores(plan: InferPlan, means: dict[str, float]) -> None:
    """One projection file per prompt and trait, response scores averaging `means[id]`."""
    for v in plan.vectors:
        info = VectorInfo(v.trait, v.method, v.position, v.layer, v.selection_source, v.baseline)
        for pid, mean in means.items():
            scores = np.array([0.0, 0.0, mean - 1.0, mean + 1.0], np.float32)  # 2 + 2 tokens
            norms = np.ones(4, np.float32)
            entry = projection_entry(info, scores, norms, prompt_end=2, centered=False)
            record = projection_record(
                prompt_id=pid,
                prompt_set=plan.prompts.name,
                n_prompt_tokens=2,
                n_response_tokens=2,
                component=v.component,
                position=v.position,
                centered=False,
                entries=[entry],
            )
            path = plan.paths.projection_file(plan.variant, v.trait, plan.prompts.name, pid)
            write_projection(path, record)
    build_parquet(plan.paths, plan.variant, plan.prompts.name)


@pytest.fixture
def hostile_root(tiny_root: Path, tmp_path: Path) -> Path:
    # The root itself holds an escape sequence: output paths are printed too.
    root = tmp_path / "runs \x1b[31mred\x1b[0m"
    shutil.copytree(tiny_root / "experiments", root / "experiments")
    write_prompt_set(root, "tests/hostile", HOSTILE)
    return root


@pytest.mark.parametrize("top", range(len(HOSTILE)))
def test_summary_escapes_what_came_from_inputs(hostile_root: Path, top: int):
    plan = _plan(hostile_root)
    means = {str(i): float(i == top) * 5.0 + i * 0.1 for i in range(len(HOSTILE))}
    _write_scores(plan, means)
    summary = Summary(
        total=5,
        done=3,
        failed=2,
        failures=[
            ("3", "RuntimeError: token \x1b[2J\x1b]0;t\x07\u202e in\nthe message"),
            ("file", f"{hostile_root}/x.json: broken \x9b (left out of Parquet)"),
        ],
        outputs={"parquet": str(plan.paths.parquet_file(plan.variant, "projections", "x"))},
    )
    out = io.StringIO()
    print_summary(plan, summary, out=out)
    text = out.getvalue()

    body = text.replace("\n", "")  # print's own line ends are the only control characters
    assert not [ch for ch in UNPRINTABLE if ch in body], text
    lines = text.splitlines()
    assert len(lines) == len(text.split("\n")) - 1  # no line was split by a message's "\n"
    assert "  failed 3: RuntimeError: token \\x1b[2J\\x1b]0;t\\x07\\u202e in\\nthe message" in lines
    assert any("runs \\x1b[31mred\\x1b[0m" in line for line in lines)

    # The table still reports the right prompt: the one that scored highest, escaped.
    rows = trait_table(plan)
    assert {r["trait"] for r in rows} == {"behavior/alpha", "tone/beta"}
    for r in rows:
        assert r["top_id"] == str(top) and r["top_prompt"] == HOSTILE[top]
        assert r["mean"] == pytest.approx(np.mean(list(means.values())), abs=1e-6)
        shown = printable(HOSTILE[top].replace("\n", " "))[:57]
        row = [line for line in lines if line.startswith(f"  {r['trait']}")]
        assert len(row) == 1 and f"[{top}] {shown}" in row[0], (row, shown)
    table = "\n".join(lines[lines.index("  next:") - 3 : lines.index("  next:")])  # then next:
    layer_col = re.findall(r"^  \S+\s+(\d+)\s", table, re.M)
    assert layer_col == ["1", "1"]  # best by effect size in the tiny metadata

    reread = json.loads(
        plan.paths.projection_file(plan.variant, "behavior/alpha", "tests/hostile", "0").read_text()
    )
    assert reread["metadata"]["prompt_id"] == "0"  # files are written, never escaped


def test_trait_table_reads_the_prompt_set_once(hostile_root: Path, monkeypatch):
    """The top prompt of every trait comes from one pass over the set (the driver holds only
    ids): a pass per trait read a 100,000-prompt .json set again for each, after the run."""
    from raypipe.store.prompts import PromptSet

    plan = _plan(hostile_root)
    _write_scores(plan, {str(i): float(i) for i in range(len(HOSTILE))})
    passes = []
    real = PromptSet.iter_items

    def counted(self):
        passes.append(1)
        yield from real(self)

    monkeypatch.setattr(PromptSet, "iter_items", counted)
    rows = trait_table(plan)
    assert len(rows) == 2 and len(passes) == 1
    assert {r["top_prompt"] for r in rows} == {HOSTILE[len(HOSTILE) - 1]}
