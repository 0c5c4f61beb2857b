"""JSON endpoints of the dashboard: query checks at the edge, then payloads for each view."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from raypipe.store.scores import SCORE_MODES
from raypipe.viz import tables
from raypipe.viz.data import (
    ApiError,
    Tree,
    finite_list,
    natural_key,
    segment_scores,
    tokens_and_end,
)

MAX_PARAM_LEN = 512
PREVIEW_JSON_LIMIT = 1000  # above this many prompts, previews only come from Parquet
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Query:
    """Query-string parameters of one request; unknown, repeated or malformed ones are 400."""

    def __init__(self, raw: str, allowed: set[str]) -> None:
        try:
            pairs = parse_qsl(raw, keep_blank_values=True, max_num_fields=32)
        except ValueError as err:
            raise ApiError(400, f"malformed query string: {err}") from None
        self.values: dict[str, str] = {}
        for key, value in pairs:
            if key in self.values:
                raise ApiError(400, f"parameter {key!r} given more than once")
            if len(value) > MAX_PARAM_LEN:
                raise ApiError(400, f"parameter {key!r} is too long")
            self.values[key] = value
        unknown = sorted(set(self.values) - allowed)
        if unknown:
            takes = ", ".join(sorted(allowed)) or "no parameters"
            raise ApiError(400, f"unknown parameter {unknown[0]!r}; this endpoint takes {takes}")

    def text(self, name: str) -> str:
        value = self.values.get(name)
        if value is None or value == "":
            raise ApiError(400, f"missing parameter {name!r}")
        if "\x00" in value:
            raise ApiError(400, f"parameter {name!r} contains a NUL byte")
        return value

    def optional(self, name: str) -> str | None:
        return self.text(name) if self.values.get(name) else None

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.values.get(name) or default
        if value not in options:
            raise ApiError(400, f"parameter {name!r} must be one of {', '.join(options)}")
        return value

    def flag(self, name: str) -> bool:
        value = self.values.get(name, "0").lower()
        if value in _TRUE:
            return True
        if value in _FALSE or value == "":
            return False
        raise ApiError(400, f"parameter {name!r} must be 0 or 1, got {value!r}")

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.optional_integer(name, lo, hi)
        return default if value is None else value

    def optional_integer(self, name: str, lo: int, hi: int) -> int | None:
        value = self.values.get(name)
        if value is None or value == "":
            return None
        try:
            number = int(value)
        except ValueError:
            raise ApiError(400, f"parameter {name!r} must be an integer, got {value!r}") from None
        if not lo <= number <= hi:
            raise ApiError(400, f"parameter {name!r} must be between {lo} and {hi}")
        return number


# -- values read from files, as the page may show them ------------------------------------------


def _text(value: Any) -> str | None:
    """A field the page shows as text; a file may hold anything there (NaN, objects...)."""
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    # JSON has no NaN or infinity, and browsers' JSON.parse rejects them.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _texts(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _int_list(value: Any) -> list[int] | None:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        return None
    return value


# -- discovery -------------------------------------------------------------------------------


def experiments(tree: Tree, q: Query) -> dict[str, Any]:
    out = []
    for name in tree.experiments():
        item: dict[str, Any] = {"name": name}
        try:
            item["variants"] = tree.variants(name)
            config = tree.config(name)
            item["defaults"] = config.defaults(item["variants"])
            if config.problem is not None:
                item["config_warning"] = config.problem
        except ApiError as err:
            # One broken config must not hide the other experiments.
            item["error"] = err.message
        out.append(item)
    return {"experiments": out}


def variants(tree: Tree, q: Query) -> dict[str, Any]:
    experiment = q.text("experiment")
    names = tree.variants(experiment)
    config = tree.config(experiment)
    out = []
    for name in names:
        model, lora = config.model(name)
        calibration = tree.calibration(experiment, name)
        usable = calibration is not None and calibration.usable
        out.append(
            {
                "name": name,
                "model": model,
                "lora": lora,
                "has_calibration": usable,
                "massive_dims": list(calibration.massive_dims) if usable else [],
                "calibration_warning": calibration.problem if calibration else None,
            }
        )
    return {
        "experiment": experiment,
        "defaults": config.defaults(names),
        "variants": out,
        "config_warning": config.problem,
    }


def prompt_sets(tree: Tree, q: Query) -> dict[str, Any]:
    experiment, variant = q.text("experiment"), q.text("variant")
    out = []
    for name in tree.prompt_sets(experiment, variant):
        out.append(
            {
                "name": name,
                "n_prompts": len(tree.prompt_ids(experiment, variant, name)),
                "has_parquet": tree.parquet(experiment, variant, "projections", name) is not None,
            }
        )
    return {"prompt_sets": out}


def prompts(tree: Tree, q: Query) -> dict[str, Any]:
    experiment, variant, prompt_set = q.text("experiment"), q.text("variant"), q.text("prompt_set")
    ids = tree.prompt_ids(experiment, variant, prompt_set)
    table = tree.parquet(experiment, variant, "responses", prompt_set)
    previews: dict[str, str] | None = None
    warnings: list[str] = []
    if table is not None:
        try:
            previews = tables.previews(table)
        except ApiError as err:
            # Previews only label the prompt list: a broken table must not hide the prompts.
            warnings.append(err.message)
    if previews is None and len(ids) <= PREVIEW_JSON_LIMIT:
        previews = {}
        for pid in ids:
            try:
                text = tree.response(experiment, variant, prompt_set, pid).get("response")
            except ApiError:
                continue
            previews[pid] = (_text(text) or "")[:90]
    return {
        "prompts": [{"id": pid, "preview": (previews or {}).get(pid, "")} for pid in ids],
        "warnings": warnings,
    }


def traits(tree: Tree, q: Query) -> dict[str, Any]:
    experiment, variant, prompt_set = q.text("experiment"), q.text("variant"), q.text("prompt_set")
    out = []
    for trait in tree.traits(experiment, variant, prompt_set):
        item: dict[str, Any] = {"trait": trait}
        try:
            sample = tree.first_projection(experiment, variant, trait, prompt_set) or {}
        except ApiError as err:
            # One broken file must not hide the other traits; this one has nothing to offer.
            sample = {}
            item["error"] = err.message
        entries = sample.get("projections") or []
        item.update(
            layers=sorted({L for e in entries if (L := _layer(e)) is not None}),
            methods=sorted({str(e.get("method")) for e in entries}),
            component=_text(_meta(sample).get("component")),
            has_cleaned=any("cleaned" in e for e in entries),
        )
        out.append(item)
    return {"traits": out}


def _meta(data: dict[str, Any]) -> dict[str, Any]:
    meta = data.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _layer(entry: dict[str, Any]) -> int | None:
    layer = entry.get("layer")
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else None


# -- Trait Dynamics --------------------------------------------------------------------------


def _score_pair(
    entry: dict[str, Any], mode: str, centered: bool, cleaned: bool, already: bool, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and response scores of one entry; `where` ("FILE: projections[i]") names it."""
    try:
        p = segment_scores(entry, "prompt", mode, centered, cleaned, already)
        r = segment_scores(entry, "response", mode, centered, cleaned, already)
    except ValueError as err:
        raise ApiError(422, f"{where}.{err}") from None
    return p, r


def _centered_at_source(data: dict[str, Any]) -> bool:
    return _meta(data).get("centered") is True


def prompt(tree: Tree, q: Query) -> dict[str, Any]:
    experiment, variant = q.text("experiment"), q.text("variant")
    prompt_set, prompt_id = q.text("prompt_set"), q.text("prompt_id")
    mode = q.choice("mode", SCORE_MODES, "raw")
    centered, cleaned = q.flag("centered"), q.flag("cleaned")

    response = tree.response(experiment, variant, prompt_set, prompt_id)
    tokens, end = response["tokens"], response["prompt_end"]
    calibration = tree.calibration(experiment, variant)
    out_traits, missing, skipped, warnings = [], [], [], []
    if calibration is not None and not calibration.usable:
        warnings.append(f"{calibration.problem} (massive-dim cleaning is off for {variant})")
    for trait in tree.traits(experiment, variant, prompt_set):
        data = tree.projection(experiment, variant, trait, prompt_set, prompt_id)
        if data is None:
            missing.append(trait)
            continue
        meta = _meta(data)
        already = _centered_at_source(data)
        where = tree.rel(tree.projection_file(experiment, variant, trait, prompt_set, prompt_id))
        series = []
        for i, entry in enumerate(data["projections"]):
            layer = _layer(entry)
            label = f"{trait} L{layer}"
            if cleaned and "cleaned" not in entry:
                skipped.append({"trait": trait, "layer": layer, "reason": "no cleaned"})
                continue
            p, r = _score_pair(
                entry, mode, centered, cleaned, already, f"{where}: projections[{i}]"
            )
            if p.size != end or r.size != len(tokens) - end:
                warnings.append(
                    f"{label}: {p.size}+{r.size} scores for {end}+{len(tokens) - end} tokens"
                )
            block = entry.get("cleaned")
            dims = _int_list(block.get("dims")) if isinstance(block, dict) else None
            series.append(
                {
                    "layer": layer,
                    "method": _text(entry.get("method")),
                    "selection_source": _text(entry.get("selection_source")),
                    "baseline": _number(entry.get("baseline")),
                    "has_cleaned": "cleaned" in entry,
                    "cleaned_dims": dims,
                    "prompt": finite_list(p),
                    "response": finite_list(r),
                }
            )
        out_traits.append(
            {
                "trait": trait,
                "component": _text(meta.get("component")),
                "position": _text(meta.get("position")),
                "centered_at_source": already,
                "series": series,
            }
        )
    if cleaned and not any(t["series"] for t in out_traits):
        raise ApiError(400, f"no massive-dim-cleaned scores for prompt {prompt_id!r}")
    return {
        "experiment": experiment,
        "variant": variant,
        "prompt_set": prompt_set,
        "prompt_id": prompt_id,
        "mode": mode,
        "centered": centered,
        "cleaned": cleaned,
        "calibration": (
            {"massive_dims": list(calibration.massive_dims)}
            if calibration is not None and calibration.usable
            else None
        ),
        "calibration_warning": calibration.problem if calibration else None,
        "response": {
            "tokens": tokens,
            "prompt_end": end,
            **{
                key: _text(response.get(key))
                for key in (
                    "prompt",
                    "response",
                    "system_prompt",
                    "inference_model",
                    "prompt_note",
                    "capture_date",
                )
            },
            "tags": _texts(response.get("tags")),
        },
        "traits": out_traits,
        "missing_traits": missing,
        "skipped": skipped,
        "warnings": warnings,
    }


# -- Model Analysis --------------------------------------------------------------------------


# A projection entry, whether its scores were centered when projected, and where it is.
Found = tuple[dict[str, Any], bool, str]


class _Pair:
    """The arguments shared by both model-diff endpoints, checked once."""

    def __init__(self, tree: Tree, q: Query) -> None:
        self.tree = tree
        self.experiment = q.text("experiment")
        self.prompt_set = q.text("prompt_set")
        self.a, self.b = q.text("variant_a"), q.text("variant_b")
        self.trait = q.text("trait")
        self.mode = q.choice("mode", SCORE_MODES, "raw")
        self.centered, self.cleaned = q.flag("centered"), q.flag("cleaned")
        for variant in (self.a, self.b):
            tree.check_trait(self.experiment, variant, self.prompt_set, self.trait)
        self.layers = self._common_layers()
        if not self.layers:
            raise ApiError(404, f"trait {self.trait!r} has no layer projected in both variants")
        layer = q.optional_integer("layer", 0, 10_000)
        method = q.optional("method")
        choices = [(m, L) for m, L in self.layers if (layer is None or L == layer)]
        choices = [(m, L) for m, L in choices if method is None or m == method]
        if not choices:
            have = ", ".join(f"{m} L{L}" for m, L in self.layers)
            raise ApiError(
                404, f"no projection for that layer/method in both variants (have {have})"
            )
        self.method, self.layer = choices[0]

    def _common_layers(self) -> list[tuple[str, int]]:
        found = []
        for variant in (self.a, self.b):
            sample = self.tree.first_projection(
                self.experiment, variant, self.trait, self.prompt_set
            )
            entries = (sample or {}).get("projections") or []
            found.append(
                {(str(e.get("method")), L) for e in entries if (L := _layer(e)) is not None}
            )
        return sorted(found[0] & found[1], key=lambda ml: (ml[1], ml[0]))

    def entry(self, data: dict | None, where: str) -> Found | None:
        """The pair's entry in a projection JSON (`where` is its file), if it has one."""
        if data is None:
            return None
        for i, e in enumerate(data["projections"]):
            if _layer(e) == self.layer and str(e.get("method")) == self.method:
                return e, _centered_at_source(data), f"{where}: projections[{i}]"
        return None

    def scores(self, found: Found, variant: str) -> np.ndarray:
        entry, already, where = found
        if self.cleaned and "cleaned" not in entry:
            raise ApiError(400, f"no massive-dim-cleaned scores in variant {variant!r}")
        p, r = _score_pair(entry, self.mode, self.centered, self.cleaned, already, where)
        return np.concatenate([p, r])

    def describe(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "prompt_set": self.prompt_set,
            "variant_a": self.a,
            "variant_b": self.b,
            "trait": self.trait,
            "layer": self.layer,
            "method": self.method,
            "layers": [{"method": m, "layer": L} for m, L in self.layers],
            "mode": self.mode,
            "centered": self.centered,
            "cleaned": self.cleaned,
        }


def _common_prefix(x: list[str], y: list[str]) -> int:
    n = min(len(x), len(y))
    for i in range(n):
        if x[i] != y[i]:
            return i
    return n


def _diff(
    pair: _Pair,
    tokens: tuple[list[str], list[str]],
    ends: tuple[int, int],
    scores: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Per-token B - A on the tokens both variants share from the start (same context)."""
    (ta, tb), (ea, eb), (sa, sb) = tokens, ends, scores
    for t, s, v in ((ta, sa, pair.a), (tb, sb, pair.b)):
        if s.size != len(t):
            raise ApiError(422, f"variant {v!r}: {s.size} scores for {len(t)} tokens")
    common = _common_prefix(ta, tb)
    diff = np.full(len(ta), np.nan)
    diff[:common] = sb[:common] - sa[:common]
    return {"common": common, "diff": diff, "match": ta == tb and ea == eb}


def compare(tree: Tree, q: Query) -> dict[str, Any]:
    """Per-prompt summary of B - A on response tokens, from Parquet when both tables exist."""
    pair = _Pair(tree, q)
    exp, ps = pair.experiment, pair.prompt_set
    ids = {v: tree.prompt_ids(exp, v, ps) for v in (pair.a, pair.b)}
    common_ids = sorted(set(ids[pair.a]) & set(ids[pair.b]), key=natural_key)
    load_entry, load_tokens, source = _loaders(tree, pair)
    rows, missing = [], []
    for pid in common_ids:
        found = (load_entry(pair.a, pid), load_entry(pair.b, pid))
        toks = (load_tokens(pair.a, pid), load_tokens(pair.b, pid))
        if None in found or None in toks:
            missing.append(pid)
            continue
        scores = (pair.scores(found[0], pair.a), pair.scores(found[1], pair.b))
        (ta, ea), (tb, eb) = toks
        d = _diff(pair, (ta, tb), (ea, eb), scores)
        resp_diff = d["diff"][ea:]
        ok = np.isfinite(resp_diff)
        row: dict[str, Any] = {
            "prompt_id": pid,
            "n_tokens": len(ta) - ea,
            "n_compared": int(ok.sum()),
            "tokens_match": d["match"],
            "mean_a": _mean(scores[0][ea:]),
            "mean_b": _mean(scores[1][eb:]),
            "mean_diff": None,
            "max_diff": None,
            "max_at": None,
            "max_token": None,
        }
        if ok.any():
            at = int(np.nanargmax(np.where(ok, resp_diff, -np.inf)))
            row.update(
                mean_diff=float(resp_diff[ok].mean()),
                max_diff=float(resp_diff[at]),
                max_at=at,
                max_token=ta[ea + at],
            )
        rows.append(row)
    return {**pair.describe(), "source": source, "rows": rows, "missing": missing}


def _mean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def _loaders(
    tree: Tree, pair: _Pair
) -> tuple[Callable[[str, str], Any], Callable[[str, str], Any], str]:
    exp, ps = pair.experiment, pair.prompt_set
    paths = {
        v: (tree.parquet(exp, v, "projections", ps), tree.parquet(exp, v, "responses", ps))
        for v in (pair.a, pair.b)
    }
    if not pair.cleaned and all(p and r for p, r in paths.values()):
        # Parquet has no cleaned arrays; otherwise it is the same data and far faster to scan.
        entries = {
            v: tables.projection_entries(p, pair.trait, pair.method, pair.layer)
            for v, (p, _) in paths.items()
        }
        toks = {v: tables.response_tokens(r) for v, (_, r) in paths.items()}
        for v, (_, r) in paths.items():
            for pid, (t, end) in toks[v].items():
                tokens_and_end(t, end, r.where, row=pid)
        if all(entries.values()):
            return (
                lambda v, pid: entries[v].get(pid),
                lambda v, pid: toks[v].get(pid),
                "parquet",
            )

    def entry(v: str, pid: str) -> Found | None:
        where = tree.rel(tree.projection_file(exp, v, pair.trait, ps, pid))
        return pair.entry(tree.projection(exp, v, pair.trait, ps, pid), where)

    def tokens(v: str, pid: str) -> tuple[list[str], int]:
        response = tree.response(exp, v, ps, pid)
        return response["tokens"], response["prompt_end"]

    return entry, tokens, "json"


def compare_prompt(tree: Tree, q: Query) -> dict[str, Any]:
    """Per-token scores of both variants on one prompt and their difference."""
    pair = _Pair(tree, q)
    pid = q.text("prompt_id")
    exp, ps = pair.experiment, pair.prompt_set
    responses = [tree.response(exp, v, ps, pid) for v in (pair.a, pair.b)]
    (ta, ea), (tb, eb) = ((r["tokens"], r["prompt_end"]) for r in responses)
    found = []
    for v in (pair.a, pair.b):
        where = tree.rel(tree.projection_file(exp, v, pair.trait, ps, pid))
        hit = pair.entry(tree.projection(exp, v, pair.trait, ps, pid), where)
        if hit is None:
            raise ApiError(
                404, f"prompt {pid!r} has no {pair.trait} L{pair.layer} projection in {v!r}"
            )
        found.append(hit)
    sa, sb = pair.scores(found[0], pair.a), pair.scores(found[1], pair.b)
    d = _diff(pair, (ta, tb), (ea, eb), (sa, sb))
    return {
        **pair.describe(),
        "prompt_id": pid,
        "tokens": ta,
        "prompt_end": ea,
        "tokens_b": None if d["match"] else tb,
        "prompt_end_b": eb,
        "tokens_match": d["match"],
        "common_prefix": d["common"],
        "a": finite_list(sa),
        "b": finite_list(sb),
        "diff": finite_list(d["diff"]),
        "response_a": _text(responses[0].get("response")),
        "response_b": _text(responses[1].get("response")),
    }


# -- Overview --------------------------------------------------------------------------------


def overview(tree: Tree, q: Query) -> dict[str, Any]:
    experiment, variant, prompt_set = q.text("experiment"), q.text("variant"), q.text("prompt_set")
    mode = q.choice("mode", SCORE_MODES, "raw")
    centered = q.flag("centered")
    bins = q.optional_integer("bins", 1, 200)  # None: chosen per trait from the prompt count
    top = q.integer("top", 5, 1, 100)
    table = tree.parquet(experiment, variant, "projections", prompt_set)
    if table is None:
        expected = tree.paths(experiment).parquet_file(variant, "projections", prompt_set)
        raise ApiError(
            404,
            f"no Parquet table for prompt set {prompt_set!r} in variant {variant!r} "
            f"(expected {tree.rel(expected)})",
        )
    responses = tree.parquet(experiment, variant, "responses", prompt_set)
    result = tables.overview(table, responses, mode, centered, bins, top)
    return {
        "experiment": experiment,
        "variant": variant,
        "prompt_set": prompt_set,
        "mode": mode,
        "centered": centered,
        **result,
    }


Endpoint = Callable[[Tree, Query], dict[str, Any]]

_SCORES = {"mode", "centered", "cleaned"}
_PAIR = {"experiment", "prompt_set", "variant_a", "variant_b", "trait", "layer", "method"}

ROUTES: dict[str, tuple[Endpoint, set[str]]] = {
    "/api/experiments": (experiments, set()),
    "/api/variants": (variants, {"experiment"}),
    "/api/prompt_sets": (prompt_sets, {"experiment", "variant"}),
    "/api/prompts": (prompts, {"experiment", "variant", "prompt_set"}),
    "/api/traits": (traits, {"experiment", "variant", "prompt_set"}),
    "/api/prompt": (
        prompt,
        {"experiment", "variant", "prompt_set", "prompt_id"} | _SCORES,
    ),
    "/api/compare": (compare, _PAIR | _SCORES),
    "/api/compare_prompt": (compare_prompt, _PAIR | _SCORES | {"prompt_id"}),
    "/api/overview": (
        overview,
        {"experiment", "variant", "prompt_set", "mode", "centered", "bins", "top"},
    ),
}
