"""The end-of-run report: counts, speed, where the outputs are, and a per-trait table."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from raypipe.pipeline.console import shown_path
from raypipe.pipeline.job import Summary
from raypipe.pipeline.plan import InferPlan
from raypipe.store.text import printable

VIZ_URL = "http://127.0.0.1:8765/"  # `raypipe viz` with its defaults


def trait_table(plan: InferPlan) -> list[dict]:
    """Per trait at its best layer: mean response score and the prompt that scored highest
    (computed on the table's columns: a run of any size is read as arrays, not row dicts)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = plan.paths.parquet_file(plan.variant, "projections", plan.prompts.name)
    if not path.is_file():
        return []
    table = pq.read_table(path, columns=["prompt_id", "trait", "layer", "response_scores"])
    lengths = pc.list_value_length(table["response_scores"])
    table = table.filter(pc.fill_null(pc.greater(lengths, 0), False))
    best = {}
    for v in plan.vectors:
        if v.selection_source != "layers_arg":
            best.setdefault(v.trait, v.layer)
        else:
            best.setdefault(v.trait, None)
    out = []
    for trait, layer in best.items():
        rows = table.filter(pc.equal(table["trait"], trait))
        if layer is None and rows.num_rows:
            layer = rows["layer"][0].as_py()
        rows = rows.filter(pc.equal(rows["layer"], layer))
        if not rows.num_rows:
            continue
        scores = rows["response_scores"].combine_chunks()
        lengths = pc.list_value_length(scores).to_numpy()
        flat = pc.list_flatten(scores).to_numpy(zero_copy_only=False).astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        means = np.add.reduceat(flat, starts) / lengths
        top = int(means.argmax())
        top_id = rows["prompt_id"][top].as_py()
        out.append(
            {
                "trait": trait,
                "layer": layer,
                "n": rows.num_rows,
                "mean": float(means.mean()),
                "top_id": top_id,
                "top_score": float(means[top]),
            }
        )
    texts = _texts_of(plan, {row["top_id"] for row in out})
    for row in out:
        row["top_prompt"] = texts.get(row["top_id"], "")
    return out


def _texts_of(plan: InferPlan, ids: set[str]) -> dict[str, str]:
    """Those prompts' texts, read from the set (which the driver does not hold) in one pass."""
    found: dict[str, str] = {}
    if not ids:
        return found
    for item in plan.prompts.iter_items():
        if item.id in ids:
            found[item.id] = item.text
            if len(found) == len(ids):
                break
    return found


def shell_word(text: str) -> str:
    """`text` as one word for bash: in double quotes where that reads well, else in single."""
    if "!" in text or not text.isprintable():  # history expansion; newlines and the like
        return shlex.quote(text)
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def _raypipe_command() -> str:
    """How to run raypipe from here: `raypipe` when that is this one, else its script's path."""
    script = Path(sys.executable).parent / "raypipe"
    found = shutil.which("raypipe")
    if found and script.exists() and os.path.samefile(found, script):
        return "raypipe"
    if script.exists():
        return shlex.quote(shown_path(script))
    return f"{shlex.quote(shown_path(sys.executable))} -m raypipe.cli"


def duckdb_command(
    table: Path, sql_for, cli: str | None = None, module: bool | None = None
) -> list[str]:
    """The shell lines that run `sql_for(from_clause)` on a Parquet file with DuckDB: its CLI
    when one is on PATH, else this Python's duckdb module (installed first when missing)."""
    literal = "'" + shown_path(table).replace("'", "''") + "'"
    sql = sql_for(literal)
    cli = shutil.which("duckdb") if cli is None else cli
    if cli:
        return [f"duckdb -c {shell_word(sql)}"]
    python = shlex.quote(shown_path(sys.executable))
    have = importlib.util.find_spec("duckdb") is not None if module is None else module
    run = f"{python} -c " + shell_word(f"import duckdb; duckdb.sql({json.dumps(sql)}).show()")
    return [run] if have else [f"{python} -m pip install duckdb", run]


def _scores_sql(source: str) -> str:
    return (
        "SELECT trait, method, layer, count(*) AS prompts, "
        "round(avg(list_avg(response_scores)), 3) AS mean_response_score "
        f"FROM {source} GROUP BY ALL ORDER BY ALL"
    )


def _responses_sql(source: str) -> str:
    return (
        "SELECT prompt_id, len(token_ids) - prompt_end AS new_tokens, "
        f"left(response, 60) AS response FROM {source} ORDER BY prompt_id LIMIT 10"
    )


def next_commands(plan: InferPlan) -> list[str]:
    """What a user runs next: the dashboard on this prompt set, and DuckDB on its table."""
    p, v, name = plan.paths, plan.variant, plan.prompts.name
    root = "" if os.path.abspath(p.root) == os.path.abspath(os.getcwd()) else p.root
    viz = f"{_raypipe_command()} viz" + (f" --root {shlex.quote(shown_path(root))}" if root else "")
    query = urlencode({"experiment": p.experiment, "variant": v, "prompt_set": name})
    lines = [f"{viz}    # then open {VIZ_URL}#/overview?{query}"]
    scores, responses = p.parquet_file(v, "projections", name), p.parquet_file(v, "responses", name)
    if scores.is_file():
        lines += duckdb_command(scores, _scores_sql)
    elif responses.is_file():
        lines += duckdb_command(responses, _responses_sql)
    return lines


def print_summary(
    plan: InferPlan, s: Summary, traits_table: bool = True, out=None, log_file=None
) -> None:
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
    if log_file is not None:
        p(f"  log: {e(shown_path(log_file))}")
    rows = trait_table(plan) if traits_table else []
    if rows:
        p("")
        p(f"  {'trait':<24} {'layer':>5} {'mean resp':>10}  highest-scoring prompt")
        for r in rows:
            text = e(r["top_prompt"].replace("\n", " "))
            text = text if len(text) <= 60 else text[:57] + "..."
            trait, top_id = e(r["trait"]), e(r["top_id"])
            p(f"  {trait:<24} {r['layer']:>5} {r['mean']:>10.3f}  [{top_id}] {text}")
    p("")
    p("  next:")
    for line in next_commands(plan):
        p(f"    {line}")
