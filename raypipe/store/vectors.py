"""Trait vectors, their metadata and steering results; `--layers` parsing and best-layer choice."""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import InputError
from raypipe.store.atomic import read_json
from raypipe.store.paths import (
    ExperimentPaths,
    check_name,
    check_relpath,
    desanitize_position,
    sanitize_position,
)
from raypipe.store.text import brief, check_text, printable

# trait-interp's methods, in the order ties go (any other method folder comes after, by name).
METHOD_PREFERENCE = ("probe", "mean_diff", "gradient")
COMPONENTS = ("residual", "attn_contribution")
MIN_COHERENCE = 77.0
MAX_VECTOR_FILE_BYTES = 64 * 2**20
# With fullmatch and ASCII digits: `$` also matches before a final newline, `\d` any digit.
_LAYER_FILE = re.compile(r"layer([0-9]{1,6})\.pt")


# ---------------------------------------------------------------- --layers


@dataclass(frozen=True)
class LayerSpec:
    """Parsed `--layers`: absolute layers plus offsets from each trait's best layer."""

    text: str
    absolute: tuple[int, ...] = ()
    best_offsets: tuple[int, ...] = ()


def parse_layers(text: str, n_layers: int, where: str = "--layers") -> LayerSpec:
    absolute: list[int] = []
    offsets: list[int] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise InputError(where, "layers", f"empty term in {text!r}")
        # Spaces beside + - : % change nothing ("best + 5"); between two letters or digits
        # they would join two numbers into one ("1 2" is not layer 12), so they are an error.
        if re.search(r"[0-9A-Za-z]\s+[0-9A-Za-z]", term):
            raise InputError(
                where,
                "layers",
                f"{term!r} has a space between two numbers or words; separate layers with "
                "commas (1,2)",
            )
        term = re.sub(r"\s+", "", term)
        if term == "all":
            absolute.extend(range(n_layers))
        elif m := re.fullmatch(r"best(?:([+-])([0-9]{1,6}))?", term):
            off = int(m.group(2) or 0)
            offsets.append(-off if m.group(1) == "-" else off)
        elif m := re.fullmatch(r"([0-9]{1,3})%-([0-9]{1,3})%", term):
            lo, hi = int(m.group(1)), int(m.group(2))
            if not 0 <= lo <= hi <= 100:
                raise InputError(where, "layers", f"bad percent range {term!r}")
            # As trait-interp computes it (int(n_layers * p), its float steps included); 100%
            # is the layer past the last, which it drops: here the last layer.
            first, end = int(n_layers * (lo / 100)), int(n_layers * (hi / 100))
            absolute.extend(range(first, min(end, n_layers - 1) + 1))
        elif m := re.fullmatch(r"([0-9]{1,6})-([0-9]{1,6})(?::([0-9]{1,6}))?", term):
            lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            if lo > hi or step < 1:
                raise InputError(where, "layers", f"bad range {term!r}")
            hi = min(hi, n_layers - 1) if hi == n_layers else hi  # `0-30` on 30 layers means all
            absolute.extend(range(lo, hi + 1, step))
        elif re.fullmatch(r"[0-9]{1,6}", term):
            absolute.append(int(term))
        else:
            raise InputError(
                where,
                "layers",
                f"cannot parse {term!r} (use best, best+N, best-N, N, A-B, A-B:S, P%-Q%, all)",
            )
    bad = sorted({layer for layer in absolute if layer >= n_layers})
    if bad:
        raise InputError(
            where,
            "layers",
            f"layer {bad[0]} is beyond the model depth: "
            f"it has {n_layers} layers (0-{n_layers - 1})",
        )
    return LayerSpec(
        text=text,
        absolute=tuple(dict.fromkeys(absolute)),
        best_offsets=tuple(dict.fromkeys(offsets)),
    )


# ---------------------------------------------------------------- vectors on disk


@dataclass(frozen=True)
class VectorSet:
    """All `layer{L}.pt` of one trait/method/position/component, with their metadata."""

    trait: str
    method: str
    position: str
    component: str
    dir: Path
    layer_files: dict[int, Path]
    metadata: dict
    has_metadata: bool = True  # False: no metadata.json (older trait-interp trees), baselines 0

    def layer_meta(self, layer: int) -> dict:
        return self.metadata.get("layers", {}).get(str(layer), {})


@dataclass(frozen=True)
class VectorSpec:
    """One vector chosen for projection: a trait at a layer, by its file.

    Stages get this, not the floats, and load the vector where they run (load_vectors): their
    constructor arguments stay a few hundred bytes whatever the hidden size, and an actor that
    Ray restarts rebuilds from the very bytes the plan checked (`digest`), or fails naming the
    file if it changed since.
    """

    trait: str
    method: str
    position: str
    component: str
    layer: int
    selection_source: str
    baseline: float
    file: Path
    digest: str  # sha256 of the file when the plan validated it


def list_traits(paths: ExperimentPaths, variant: str) -> list[str]:
    root = paths.extraction_dir()
    if not root.is_dir():
        return []
    return sorted(
        f"{cat.name}/{name.name}"
        for cat in root.iterdir()
        if cat.is_dir()
        for name in cat.iterdir()
        if (name / variant / "vectors").is_dir()
    )


def _finite(value) -> float | None:
    """`value` as a float if it is a finite number; JSON ints can be too big for any float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def _load_metadata(path: Path) -> dict | None:
    """The vector set's metadata.json; None when there is none (older trait-interp trees:
    baselines 0, as trait-interp reads them)."""
    if not path.exists():
        return None
    meta = read_json(path, "metadata")
    if not isinstance(meta, dict):
        raise InputError(path, "metadata", "must be a JSON object")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise InputError(path, "layers", "must be an object keyed by layer")
    for key, value in layers.items():
        at = f"layers.{printable(key)}"  # a key from the file: one error line whatever it holds
        if not isinstance(value, dict):
            raise InputError(path, at, "must be an object")
        baseline = value.get("baseline", 0.0)
        if _finite(baseline) is None:
            raise InputError(path, f"{at}.baseline", f"must be a finite number: {brief(baseline)}")
    return meta


def _position(meta: dict, folder: str, path: Path) -> str:
    """The extraction position: written to every projection file, and a steering path part.
    The metadata's, else the folder name read back (`response_all` -> `response[:]`)."""
    pos = meta.get("position")
    if pos is None:
        pos = desanitize_position(folder)
    if not isinstance(pos, str):
        raise InputError(path, "position", f"must be a string, got {brief(pos)}")
    check_text(pos, path, "position", controls=False)
    check_name(sanitize_position(pos), path, "position")
    return pos


def _method_order(method: str) -> tuple[int, str]:
    """Ties go probe, mean_diff, gradient, then any other method by name."""
    known = method in METHOD_PREFERENCE
    return (METHOD_PREFERENCE.index(method) if known else len(METHOD_PREFERENCE)), method


def find_vector_sets(
    paths: ExperimentPaths,
    trait: str,
    variant: str,
    component: str,
    method: str | None = None,
    position: str | None = None,
) -> list[VectorSet]:
    """Every `{pos}/{component}/{method}/` of the trait holding `layer*.pt` files, as trait-interp
    finds its candidates: any method folder, every position (`method`/`position` restrict it),
    ordered by method preference then position."""
    check_relpath(trait, "--traits", "traits", parts=2)
    base = paths.extraction_dir() / trait / variant / "vectors"
    if not base.is_dir():
        raise InputError(base, "traits", f"trait {trait!r} has no vectors for variant {variant!r}")
    found: list[VectorSet] = []
    for pos_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        if position is not None and pos_dir.name != sanitize_position(position):
            continue
        comp_dir = pos_dir / component
        if not comp_dir.is_dir():
            continue
        for d in sorted(comp_dir.iterdir()):
            if not d.is_dir() or (method is not None and d.name != method):
                continue
            files = {}
            for f in d.iterdir():
                if mm := _LAYER_FILE.fullmatch(f.name):
                    files[int(mm.group(1))] = f
            if not files:
                continue
            check_name(d.name, d, "method")
            meta_path = d / "metadata.json"
            meta = _load_metadata(meta_path)
            pos = _position(meta or {}, pos_dir.name, meta_path)
            found.append(
                VectorSet(
                    trait,
                    d.name,
                    pos,
                    component,
                    d,
                    dict(sorted(files.items())),
                    meta or {},
                    has_metadata=meta is not None,
                )
            )
    if not found:
        looked = f"{method or '*'} under {sanitize_position(position) if position else '*'}"
        raise InputError(
            base,
            "traits",
            f"trait {trait!r} has no {component} vectors (looked for {component}/{looked})",
        )
    return sorted(found, key=lambda v: (_method_order(v.method), v.position))


def find_vector_set(
    paths: ExperimentPaths,
    trait: str,
    variant: str,
    component: str,
    method: str | None = None,
    position: str | None = None,
) -> VectorSet:
    """The first of find_vector_sets: probe before mean_diff before gradient."""
    return find_vector_sets(paths, trait, variant, component, method, position)[0]


def _open_vector(path: Path):
    """torch.load of one vector file, every failure an InputError naming it."""
    import torch

    try:
        st = path.stat()
    except OSError as e:
        raise InputError(path, "vector", f"cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a folder, or a FIFO that torch.load would wait on
        raise InputError(path, "vector", "is not a file")
    if st.st_size > MAX_VECTOR_FILE_BYTES:
        raise InputError(
            path,
            "vector",
            f"is {st.st_size:,} bytes (limit {MAX_VECTOR_FILE_BYTES:,}); a vector is a few KB "
            "(a saved view keeps its whole storage: save v.clone())",
        )
    try:
        with warnings.catch_warnings():  # torch's warnings would add lines to the error
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, pickled objects, size claims, not a tensor file
        # torch's own message spans lines and suggests weights_only=False: never pass that on.
        raise InputError(
            path, "vector", f"not a loadable tensor file ({type(e).__name__})"
        ) from None


def _tensor_problem(t, hidden_size: int) -> str | None:
    """What makes `t` unusable as a dense 1-D real vector of `hidden_size`, if anything."""
    import torch

    if not isinstance(t, torch.Tensor):
        return f"must be a 1-D float tensor, got {type(t).__name__}"
    if t.is_meta:
        return "is a meta tensor: it has a shape but no values"
    if t.is_nested:
        return "is a nested tensor; save a 1-D float tensor"
    if t.layout != torch.strided:
        return f"is a sparse tensor ({t.layout}); save a dense one (v.to_dense())"
    if t.is_quantized:
        return f"is a quantized tensor ({t.dtype}); save a float one (v.dequantize())"
    if t.is_complex():
        return f"is complex ({t.dtype}); must be a real float tensor"
    if not t.is_floating_point():
        return f"has dtype {t.dtype}; must be a float tensor"
    if t.dim() != 1:
        return f"has shape {tuple(t.shape)}; must be a 1-D float tensor [hidden]"
    if t.shape[0] != hidden_size:
        return f"has size {t.shape[0]} but the model's hidden size is {hidden_size}"
    return None


def load_vector(path: Path, hidden_size: int | None) -> list[float]:
    """The vector in `path` as float32 values, checked; `hidden_size` None: any size (the
    plan checked it against the model already)."""
    import torch

    t = _open_vector(path)
    if hidden_size is None and isinstance(t, torch.Tensor) and t.dim() == 1:
        hidden_size = t.shape[0]
    if problem := _tensor_problem(t, hidden_size or 0):
        raise InputError(path, "vector", problem)
    t = t.detach()
    if not torch.isfinite(t).all():
        raise InputError(path, "vector", "contains NaN or infinite values")
    if not t.any():
        raise InputError(path, "vector", "is all zeros")
    # The projector works in float32: v / |v| there must be finite and nonzero.
    v = t.float()
    if not torch.isfinite(v).all():
        raise InputError(path, "vector", f"has values beyond the float32 range ({t.dtype})")
    if not v.any():
        raise InputError(path, "vector", f"its values are all zero in float32 ({t.dtype})")
    norm = float(torch.linalg.vector_norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        raise InputError(
            path, "vector", f"its norm is {norm} in float32; rescale it (only its direction counts)"
        )
    return v.tolist()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_vectors(specs, hidden_size: int | None) -> list[tuple[int, list[float]]]:
    """(layer, floats) of each VectorSpec, read from its file and checked against the digest
    the plan took (a file replaced mid-run would mix two vectors in one run's outputs)."""
    out = []
    for spec in specs:
        try:
            digest = file_digest(spec.file)
        except OSError as e:
            raise InputError(spec.file, "vector", f"cannot read: {e.strerror}") from None
        if digest != spec.digest:
            raise InputError(
                spec.file, "vector", "changed since this run was planned; run again to use it"
            )
        out.append((spec.layer, load_vector(spec.file, hidden_size)))
    return out


# ---------------------------------------------------------------- steering and best layer


@dataclass(frozen=True)
class SteeringRun:
    layer: int
    method: str
    component: str
    trait_mean: float
    coherence_mean: float


@dataclass(frozen=True)
class SteeringResults:
    direction: str
    baseline_trait_mean: float | None
    runs: tuple[SteeringRun, ...]


def _num(value, path: Path, field_name: str) -> float:
    out = _finite(value)
    if out is None:
        raise InputError(path, field_name, f"must be a finite number, got {brief(value)}")
    return out


def _json_line(line: str, path: Path, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {n}", f"malformed JSON: {e.msg}") from None
    except RecursionError:
        raise InputError(path, f"line {n}", "malformed JSON: nested too deeply") from None
    except ValueError:  # Python's limit on integer digits (4300 by default)
        raise InputError(
            path, f"line {n}", "malformed JSON: a number with too many digits"
        ) from None


def _opt_name(value, path: Path, field_name: str, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise InputError(path, field_name, f"must be a string, got {type(value).__name__}")
    return value


def load_steering(path: Path) -> SteeringResults | None:
    if not path.exists():
        return None
    if not path.is_file():
        raise InputError(path, "results", "is not a file")
    direction, baseline, runs = "positive", None, []
    try:
        # JSONL lines end at "\n" only: U+2028 and friends may sit unescaped inside strings.
        lines = path.read_text("utf-8").split("\n")
    except UnicodeDecodeError:
        raise InputError(path, "results", "not valid UTF-8") from None
    except OSError as e:
        raise InputError(path, "results", f"cannot read: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = _json_line(line, path, n)
        if not isinstance(obj, dict):
            raise InputError(path, f"line {n}", "must be a JSON object")
        kind = obj.get("type")
        if kind == "header":
            direction = obj.get("direction", "positive")
            if direction not in ("positive", "negative"):
                raise InputError(
                    path, f"line {n}.direction", f"unknown direction {brief(direction)}"
                )
        elif kind == "baseline":
            result = obj.get("result")
            if not isinstance(result, dict):
                raise InputError(path, f"line {n}.result", "must be an object")
            baseline = _num(result.get("trait_mean"), path, f"line {n}.result.trait_mean")
        else:
            result, config = obj.get("result"), obj.get("config")
            if not isinstance(result, dict) or not isinstance(config, dict):
                raise InputError(path, f"line {n}", "a run needs 'result' and 'config' objects")
            vecs = config.get("vectors")
            if not isinstance(vecs, list) or not vecs or not isinstance(vecs[0], dict):
                raise InputError(path, f"line {n}.config.vectors", "must be a non-empty list")
            first = vecs[0]
            layer = first.get("layer")
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise InputError(path, f"line {n}.config.vectors[0].layer", "must be an integer")
            at = f"line {n}.config.vectors[0]"
            runs.append(
                SteeringRun(
                    layer=layer,
                    method=_opt_name(first.get("method"), path, f"{at}.method", "probe"),
                    component=_opt_name(
                        first.get("component"), path, f"{at}.component", "residual"
                    ),
                    trait_mean=_num(result.get("trait_mean"), path, f"line {n}.result.trait_mean"),
                    coherence_mean=_num(
                        result.get("coherence_mean"), path, f"line {n}.result.coherence_mean"
                    ),
                )
            )
    return SteeringResults(direction, baseline, tuple(runs))


def steering_scores(vset: VectorSet, steering: SteeringResults) -> dict[int, float]:
    """Layer -> best steering delta of the set's vectors (SPEC 5): runs whose first vector is
    this layer, method and component, coherence at least MIN_COHERENCE; delta against the
    baseline line (0 without one), negated for a negative direction."""
    base = steering.baseline_trait_mean if steering.baseline_trait_mean is not None else 0.0
    sign = -1.0 if steering.direction == "negative" else 1.0
    scores: dict[int, float] = {}
    for run in steering.runs:
        if (
            run.layer in vset.layer_files
            and run.method == vset.method
            and run.component == vset.component
            and run.coherence_mean >= MIN_COHERENCE
        ):
            delta = sign * (run.trait_mean - base)
            scores[run.layer] = max(scores.get(run.layer, -math.inf), delta)
    return scores


@dataclass(frozen=True)
class BestVector:
    """The vector a trait's `best` stands for: a set (method, position) and a layer in it."""

    vset: VectorSet
    layer: int
    source: str  # "steering" or "effect_size"
    score: float

    @property
    def why(self) -> str:
        if self.source == "steering":
            return f"steering delta {self.score:+.2f}"
        return f"validation effect size {self.score:.2f}"


def choose_best(
    sets: Sequence[VectorSet], steering: dict[str, SteeringResults | None]
) -> BestVector | None:
    """Argmax over (method, position, layer) of the steering delta (`steering` by position),
    as trait-interp picks; ties to the lower layer, then probe, mean_diff, gradient. Without a
    usable run, the largest val_effect_size in the metadata (raypipe's addition). None when
    neither exists."""
    for source in ("steering", "effect_size"):
        found = []
        for vset in sets:
            if source == "steering":
                results = steering.get(vset.position)
                scores = steering_scores(vset, results) if results is not None else {}
            else:
                scores = {}
                for layer in vset.layer_files:
                    value = _finite(vset.layer_meta(layer).get("val_effect_size"))
                    if value is not None:
                        scores[layer] = value
            found += [(score, layer, vset) for layer, score in scores.items()]
        if found:
            score, layer, vset = min(
                found,
                key=lambda c: (-c[0], c[1], _method_order(c[2].method), c[2].position),
            )
            return BestVector(vset, layer, source, score)
    return None


def best_layer(vset: VectorSet, steering: SteeringResults | None) -> tuple[int, str, str]:
    """(layer, selection_source, why) within one vector set."""
    best = choose_best([vset], {vset.position: steering})
    if best is None:
        raise InputError(
            vset.dir,
            "layers",
            f"trait {vset.trait!r}: no usable steering results and no val_effect_size in "
            "metadata.json to pick a best layer; pass explicit --layers",
        )
    return best.layer, best.source, best.why


def trait_steering(
    paths: ExperimentPaths, trait: str, variants: Sequence[str], positions: Sequence[str]
) -> tuple[str | None, dict[str, SteeringResults | None]]:
    """(variant, {position: results}) of a trait's steering results: under the first of
    `variants` (the application variant first: the model that was steered, where trait-interp
    keeps them; then the extraction variant) that has a results file at any position."""
    for variant in dict.fromkeys(variants):
        files = {pos: paths.steering_results(trait, variant, pos) for pos in positions}
        if any(f.exists() for f in files.values()):
            return variant, {pos: load_steering(f) for pos, f in files.items()}
    return None, {}


def _nearest(layer: int, have: Sequence[int]) -> int:
    return min(have, key=lambda h: (abs(h - layer), h))


def resolve_vectors(
    paths: ExperimentPaths,
    traits: list[str],
    variant: str,
    component: str,
    layers: LayerSpec,
    n_layers: int,
    hidden_size: int,
    method: str | None = None,
    steering_variants: Sequence[str] = (),
) -> tuple[list[VectorSpec], list[str]]:
    """Every (trait, layer) vector to project, plus notes for the user (clamps, choices).

    `variant` holds the vectors (the extraction variant); steering results are read under
    `steering_variants` in order, then under `variant`. One vector set per trait: the best
    vector's (method, position), for `best` offsets and explicit layers alike, as trait-interp
    projects; explicit layers without any steering or effect size take the preferred set.
    """
    specs: list[VectorSpec] = []
    notes: list[str] = []
    for trait in dict.fromkeys(traits):
        sets = find_vector_sets(paths, trait, variant, component, method)
        positions = list(dict.fromkeys(v.position for v in sets))
        where, steering = trait_steering(paths, trait, [*steering_variants, variant], positions)
        best = choose_best(sets, steering)
        chosen: dict[int, str] = {}
        if layers.best_offsets:
            if best is None:
                looked = ", ".join(
                    str(paths.steering_results(trait, v, p).relative_to(paths.dir))
                    for v in dict.fromkeys([*steering_variants, variant])
                    for p in positions
                )
                raise InputError(
                    sets[0].dir.parents[2],
                    "layers",
                    f"trait {trait!r}: no usable steering results (looked for {looked}) and no "
                    "val_effect_size in metadata.json to pick a best layer; pass explicit --layers",
                )
            under = f", steering under {where}" if best.source == "steering" else ""
            notes.append(
                f"{trait}: best layer {best.layer} ({best.vset.method}, {best.vset.position}, "
                f"{best.why}{under})"
            )
        vset = best.vset if best is not None else sets[0]
        have = sorted(vset.layer_files)
        for off in layers.best_offsets:
            layer = best.layer + off
            if layer > n_layers - 1 or layer < 0:
                clamped = min(max(layer, 0), n_layers - 1)
                notes.append(
                    f"{trait}: best{off:+d} = layer {layer} is outside 0-{n_layers - 1}, "
                    f"clamped to {clamped}"
                )
                layer = clamped
            if layer not in vset.layer_files:
                snapped = _nearest(layer, [h for h in have if h < n_layers] or have)
                notes.append(
                    f"{trait}: best{off:+d} = layer {layer} has no {vset.method} vector, "
                    f"snapped to the nearest, layer {snapped}"
                )
                layer = snapped
            chosen.setdefault(layer, best.source)
        for layer in layers.absolute:
            chosen.setdefault(layer, "layers_arg")
        if chosen and not vset.has_metadata:
            notes.append(
                f"warning: {trait}: {vset.dir} has no metadata.json; its baselines are taken "
                "as 0 (as trait-interp reads such a tree)"
            )
        for layer, source in sorted(chosen.items()):
            if layer not in vset.layer_files:
                raise InputError(
                    vset.dir,
                    "layers",
                    f"trait {trait!r} has no {vset.method} vector at layer {layer} "
                    f"(has {_ranges(have)})",
                )
            path = vset.layer_files[layer]
            load_vector(path, hidden_size)  # validated here, before anything starts
            digest = file_digest(path)
            specs.append(
                VectorSpec(
                    trait=trait,
                    method=vset.method,
                    position=vset.position,
                    component=component,
                    layer=layer,
                    selection_source=source,
                    baseline=float(vset.layer_meta(layer).get("baseline", 0.0)),
                    file=path,
                    digest=digest,
                )
            )
    return specs, notes


def _ranges(layers: Sequence[int]) -> str:
    """`0-3, 7, 9-10` of sorted layers."""
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(out)
