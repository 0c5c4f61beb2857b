"""The end-of-run report: counts, speed, where the outputs are, and a per-trait table."""

from __future__ import annotations

import sys

import numpy as np

from raypipe.pipeline.job import Summary
from raypipe.pipeline.plan import InferPlan
from raypipe.store.text import printable


def trait_table(plan: InferPlan) -> list[dict]:
    """Per trait at its best layer: mean response score and the prompt that scored highest."""
    import pyarrow.parquet as pq

    path = plan.paths.parquet_file(plan.variant, "projections", plan.prompts.name)
    if not path.is_file():
        return []
    table = pq.read_table(
        path, columns=["prompt_id", "trait", "layer", "selection_source", "response_scores"]
    ).to_pylist()
    texts = {item.id: item.text for item in plan.prompts.items}
    best = {}
    for v in plan.vectors:
        if v.selection_source != "layers_arg":
            best.setdefault(v.trait, v.layer)
        else:
            best.setdefault(v.trait, None)
    out = []
    for trait, layer in best.items():
        rows = [
            r
            for r in table
            if r["trait"] == trait
            and (layer is None or r["layer"] == layer)
            and r["response_scores"]
        ]
        if layer is None and rows:
            layer = rows[0]["layer"]
            rows = [r for r in rows if r["layer"] == layer]
        if not rows:
            continue
        means = np.array([float(np.mean(r["response_scores"])) for r in rows])
        top = rows[int(means.argmax())]
        out.append(
            {
                "trait": trait,
                "layer": layer,
                "n": len(rows),
                "mean": float(means.mean()),
                "top_id": top["prompt_id"],
                "top_score": float(means.max()),
                "top_prompt": texts.get(top["prompt_id"], ""),
            }
        )
    return out


def print_summary(plan: InferPlan, s: Summary, traits_table: bool = True, out=None) -> None:
    """Prompt text, ids, error messages, trait names and paths come from inputs or the model:
    each is escaped (printable) before it is padded, and every line once more as it is printed,
    so no escape sequence or bidi control reaches the terminal and a message's newline cannot
    start a line of its own."""
    out = out or sys.stdout
    e = printable

    def p(line: str = "") -> None:
        print(printable(line), file=out)

    p("")
    p(f"raypipe: {e(plan.paths.experiment)} / {e(plan.variant)} / {e(plan.prompts.name)}")
    p(
        f"  prompts: {s.total} | done {s.done} | skipped {s.skipped} (already complete) | "
        f"failed {s.failed} | generated {s.generated}"
    )
    if s.seconds:
        p(
            f"  throughput: {s.tokens:,} tokens in {s.seconds:.1f} s "
            f"= {s.tokens_per_second:,.0f} tok/s"
        )
    for pid, err in s.failures[:20]:
        p(f"  failed {e(pid)}: {e(err)}")
    if len(s.failures) > 20:
        p(f"  ... and {len(s.failures) - 20} more failures")
    for name, where in s.outputs.items():
        p(f"  {e(name)}: {e(where)}")
    if not traits_table:
        return
    rows = trait_table(plan)
    if rows:
        p("")
        p(f"  {'trait':<24} {'layer':>5} {'mean resp':>10}  highest-scoring prompt")
        for r in rows:
            text = e(r["top_prompt"].replace("\n", " "))
            text = text if len(text) <= 60 else text[:57] + "..."
            trait, top_id = e(r["trait"]), e(r["top_id"])
            p(f"  {trait:<24} {r['layer']:>5} {r['mean']:>10.3f}  [{top_id}] {text}")
