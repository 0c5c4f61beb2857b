"""`raypipe extract`: contrastive pairs -> mean_diff and probe vectors at every layer.

Traits are `category/name` with pairs at `datasets/traits/{category}/{name}/pairs.json`;
`--trait-set` names the category extracted when no `--traits` are given."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypipe.engine.hooks import COMPONENTS
from raypipe.engine.models import resolve_model_path
from raypipe.errors import OPTIONS, InputError, OptionError
from raypipe.options import ModelOptions
from raypipe.store.atomic import write_json, write_tensor
from raypipe.store.experiment import load_experiment
from raypipe.store.outputs import now_iso
from raypipe.store.pairs import list_trait_data, load_trait_data
from raypipe.store.paths import ExperimentPaths, check_name, check_relpath

METHODS = ("mean_diff", "probe")
# Of a trait's time, its hidden states; the rest is fitting the probes (embedded model, CPU:
# 44-256 s of hidden states against 0.5-33 s of fits per starter trait).
HIDDEN_SHARE = 0.9


@dataclass(frozen=True)
class ExtractOptions:
    root: Path
    experiment: str
    trait_set: str = "starter_traits"
    traits: tuple[str, ...] | None = None
    component: str = "residual"
    position: str = "response[:]"
    val_fraction: float = 0.25
    seed: int = 0
    batch_size: int = 32
    force: bool = False
    model: ModelOptions = ModelOptions()

    def __post_init__(self):
        check_name(self.experiment, OPTIONS, "experiment")
        check_name(self.trait_set, OPTIONS, "trait_set")  # a category: its traits are set/name
        if self.traits is not None:
            for t in self.traits:
                check_relpath(t, OPTIONS, "traits", parts=2)
        if self.component not in COMPONENTS:
            raise OptionError("component", f"must be one of {COMPONENTS}")
        if not 0 < self.val_fraction < 1:
            raise OptionError("val_fraction", "must be between 0 and 1")
        if self.seed < 0:
            raise OptionError("seed", "must be at least 0 (numpy seeds the split with it)")
        if self.batch_size < 1:
            raise OptionError("batch_size", "must be at least 1")
        from raypipe.engine.activations import position_range

        try:
            position_range(self.position, 1, 2)
        except ValueError as e:
            raise OptionError("position", str(e)) from None


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split by pair, so both sides of a pair land on the same side of the split."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _done(paths: ExperimentPaths, trait: str, variant: str, opts: ExtractOptions) -> bool:
    return all(
        (
            paths.vectors_dir(trait, variant, opts.position, opts.component, m) / "metadata.json"
        ).is_file()
        for m in METHODS
    )


def _work(bar, start: int, n_layers: int, part: float) -> float:
    """The share of the whole run done, `part` of the way through the trait whose layers
    begin at `start` on the bar (its hidden states, then its fits)."""
    return (start + part * n_layers) / bar.total


def run_extract(opts: ExtractOptions, out=None, console=None) -> dict[str, dict]:
    """Returns {trait: {"layer", "val_acc", "val_effect_size", "method"}} at each best layer.
    The table goes to `out`, above a bar over traits x layers on `console`."""
    import torch

    from raypipe.engine.activations import position_range, segment_means
    from raypipe.engine.generate import encode_prompt, format_prompt, uses_chat_template
    from raypipe.engine.hooks import decoder_layers
    from raypipe.engine.models import load_model
    from raypipe.engine.vectors import evaluate, mean_diff, probe
    from raypipe.pipeline.console import current

    out = out or sys.stdout
    console = console or current()
    paths = ExperimentPaths(opts.root, opts.experiment)
    config = load_experiment(paths)
    variant = config.variant(opts.model.variant, "extraction")
    folder = paths.traits_dir
    traits = list(opts.traits) if opts.traits else list_trait_data(folder, opts.trait_set)
    if not traits:
        raise InputError(paths.trait_data_dir(opts.trait_set), "trait_set", "no */pairs.json found")
    data = {t: load_trait_data(folder, t) for t in traits}  # validate all before loading a model
    todo = [t for t in traits if opts.force or not _done(paths, t, variant.name, opts)]
    report: dict[str, dict] = {}
    if not todo:
        print(f"extract: vectors for {len(traits)} traits exist (use --force to redo)", file=out)
        return report
    m = opts.model
    spec = m.spec(variant.model, variant.lora)
    console.note(f"extract: {len(todo)} trait(s); loading {variant.model}")  # a minute, first
    resolve_model_path(spec.model, spec.cache_dir)
    model, tok = load_model(spec)
    chat = uses_chat_template(tok, config.use_chat_template)
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers))
    with console.progress(len(todo) * n_layers, "trait-layers", "extract") as bar:
        head = f"{'trait':<24} {'pairs':>5} {'best':>4} {'val acc':>8} {'effect':>7}  method"
        bar.write(head, file=out)
        for trait in todo:
            bar.phase(f"{trait}: hidden states")
            td = data[trait]
            seqs, ranges = [], []
            for pair in td.pairs:
                prompt_ids = encode_prompt(tok, format_prompt(tok, pair.prompt, None, chat), chat)
                for text in (pair.positive, pair.negative):
                    resp = tok(text, add_special_tokens=False)["input_ids"]
                    full = prompt_ids + resp
                    seqs.append(full)
                    ranges.append(position_range(opts.position, len(prompt_ids), len(full)))
            start, n_seqs = bar.done, len(seqs)

            def read(n: int, trait=trait, start=start, n_seqs=n_seqs) -> None:
                work = _work(bar, start, n_layers, HIDDEN_SHARE * n / n_seqs)
                bar.update(start, f"{trait}: hidden states {n}/{n_seqs}", work=work)

            pad = tok.pad_token_id or 0
            acts = segment_means(
                model, seqs, ranges, layers, opts.component, opts.batch_size, pad, progress=read
            )  # (2P, L, D)
            pos_all, neg_all = acts[0::2], acts[1::2]
            train, val = split(len(td.pairs), opts.val_fraction, opts.seed)
            best = None
            bar.phase(f"{trait}: fitting")
            for method in METHODS:
                vdir = paths.vectors_dir(trait, variant.name, opts.position, opts.component, method)
                meta_layers = {}
                for layer in layers:
                    tp, tn = pos_all[train, layer], neg_all[train, layer]
                    v = mean_diff(tp, tn) if method == "mean_diff" else probe(tp, tn)
                    stats = evaluate(v, (tp, tn), (pos_all[val, layer], neg_all[val, layer]))
                    meta_layers[str(layer)] = stats
                    write_tensor(vdir / f"layer{layer}.pt", torch.tensor(v, dtype=torch.float32))
                    if method == "probe" and (best is None or stats["val_effect_size"] > best[1]):
                        best = (layer, stats["val_effect_size"], stats["val_acc"])
                    if method == METHODS[-1]:  # the slow one: probes
                        fit = HIDDEN_SHARE + (1 - HIDDEN_SHARE) * (layer + 1) / n_layers
                        work = _work(bar, start, n_layers, fit)
                        bar.update(bar.done + 1, status=f"{trait}: fitting", work=work)
                # metadata last: its presence marks the vector set complete
                write_json(
                    vdir / "metadata.json",
                    {
                        "model": variant.model,
                        "trait": trait,
                        "method": method,
                        "component": opts.component,
                        "position": opts.position,
                        "layers": meta_layers,
                        "timestamp": now_iso(),
                        "n_train": int(len(train)),
                        "n_val": int(len(val)),
                        "seed": opts.seed,
                        "source": f"datasets/traits/{trait}/pairs.json",
                    },
                )
            report[trait] = {
                "layer": best[0],
                "val_effect_size": best[1],
                "val_acc": best[2],
                "method": "probe",
            }
            row = f"{trait:<24} {len(td.pairs):>5} {best[0]:>4} {best[2]:>8.2f} {best[1]:>7.2f}"
            bar.write(f"{row}  probe", file=out)
    return report
