"""`raypipe calibrate`: massive-activation calibration of a variant on a neutral prompt set."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from raypipe.errors import OptionError
from raypipe.options import ModelOptions
from raypipe.store.calibration import (
    calibration_record,
    is_complete,
    read_calibration,
    write_calibration,
)
from raypipe.store.experiment import load_experiment
from raypipe.store.paths import ExperimentPaths
from raypipe.store.prompts import load_prompt_set

DEFAULT_PROMPT_SET = "neutral/calibration"


def format_report(record: dict[str, Any]) -> str:
    """Per layer: each flagged dim, its peak |h| and how many times the layer's median that is."""
    agg = record["aggregate"]
    lines = [
        f"calibrate: {record['tokens_seen']} tokens from {agg['n_prompts']} prompts, "
        f"{len(agg['layer_norms'])} layers"
    ]
    rows = [(layer, e) for layer, entries in agg["massive_by_layer"].items() for e in entries]
    if not rows:
        # Say what came closest, so "none" can be told apart from "just under the cutoff".
        # dim_magnitude_by_layer (trait-interp's shape): per dim, |mean h_d| relative to the
        # layer's average over dims, in layer order.
        layers = sorted(agg["layer_norms"], key=int)
        best = max(
            (
                (mag, layers[i], int(d))
                for d, row in agg["dim_magnitude_by_layer"].items()
                for i, mag in enumerate(row[: len(layers)])
            ),
            default=None,
        )
        lines.append("no massive dims")
        if best:
            lines.append(
                f"largest mean h: dim {best[2]} at layer {best[1]}, {best[0]:.0f}x the average dim"
            )
        return "\n".join(lines)
    lines.append(
        f"{'layer':>5} {'dim':>6} {'max |h|':>10} {'median':>8} {'x median':>9} {'seqs':>5}"
    )
    for layer, e in rows:
        ratio = f"{e['ratio']:.0f}x" if e["ratio"] is not None else "-"
        lines.append(
            f"{layer:>5} {e['dim']:>6} {e['max']:>10.1f} {e['median']:>8.3f} {ratio:>9} "
            f"{e['sequence_fraction']:>5.0%}"
        )
    lines.append(f"massive dims: {agg['massive_dims']}")
    return "\n".join(lines)


def run_calibrate(
    root: Path,
    experiment: str,
    prompt_set: str = DEFAULT_PROMPT_SET,
    model: ModelOptions | None = None,
    max_tokens: int = 5000,
    force: bool = False,
    ratio: float = 1000.0,
    batch_size: int = 16,
    out=None,
) -> dict[str, Any]:
    """Collect calibration stats for the variant (`model.variant`, else the application
    default) and write `inference/{V}/massive_activations/calibration.json`; returns it."""
    import torch

    from raypipe.engine.calibration import CalibrationCollector
    from raypipe.engine.generate import encode_prompt, format_prompt, uses_chat_template
    from raypipe.engine.hooks import model_device, pad_right
    from raypipe.engine.models import load_model, text_config

    out = out or sys.stdout
    model = model or ModelOptions()
    if max_tokens < 1:
        raise OptionError("max_tokens", "must be at least 1")
    if batch_size < 1:
        raise OptionError("batch_size", "must be at least 1")
    if not ratio > 0:
        raise OptionError("ratio", "must be above 0")
    paths = ExperimentPaths(Path(root), experiment)
    config = load_experiment(paths)
    variant = config.variant(model.variant, "application")
    target = paths.calibration_file(variant.name)
    existing = None if force else read_calibration(target)
    if existing is not None and is_complete(existing):
        print(f"calibrate: {target} exists (use --force to redo)", file=out)
        return existing
    if existing is not None:
        print(f"calibrate: {target} is partial (a stopped run); collecting again", file=out)
    prompts = load_prompt_set(paths.datasets, prompt_set)  # validated before the model loads
    spec = model.spec(variant.model, variant.lora)
    lm, tok = load_model(spec)
    chat = uses_chat_template(tok, config.use_chat_template)
    context = getattr(text_config(lm.config), "max_position_embeddings", None)
    seqs = []
    for item in prompts.iter_items():
        ids = encode_prompt(tok, format_prompt(tok, item.text, item.system_prompt, chat), chat)
        seqs.append(ids[:context] if context else ids)
    collector = CalibrationCollector(lm, budget=max_tokens, ratio=ratio)
    device = model_device(lm)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        # Prompt order, not length order: the budget keeps the first prompts of the set.
        for start in range(0, len(seqs), batch_size):
            if collector.done:
                break
            ids, mask = pad_right(seqs[start : start + batch_size], pad_id, device)  # (B, T)
            collector.observe(ids, mask)
    record = calibration_record(
        experiment,
        variant.model,
        variant.name,
        f"raypipe calibrate:{prompts.name}",
        collector.result(),
    )
    record = {**record, "complete": True}
    write_calibration(target, record, complete=True)
    print(format_report(record), file=out)
    print(f"calibrate: wrote {target}", file=out)
    return record
