"""Read-only access to an experiments tree for the dashboard: discovery, checks, score modes."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.errors import InputError
from raypipe.store.atomic import read_json as read_json_file
from raypipe.store.calibration import MAX_HIDDEN_DIM, calibration_dims
from raypipe.store.experiment import ExperimentConfig, parse_experiment
from raypipe.store.paths import RECORD_SUFFIX, TABLE_SUFFIX, ExperimentPaths, experiments_dir
from raypipe.store.scores import ScoreMode, center, normalize_projections
from raypipe.store.text import json_kind, shown_json

SEGMENTS = ("prompt", "response")


class ApiError(Exception):
    """A request the dashboard refuses; `status` is the HTTP code, the message goes to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def file_error(status: int, where: str, field: str, message: str) -> ApiError:
    """An ApiError worded as the CLI words bad input: `WHERE: FIELD: message`."""
    return ApiError(status, str(InputError(where, field, message)))


@dataclass(frozen=True)
class Calibration:
    """A variant's massive-activation calibration as the dashboard uses it (SPEC section 8).

    `problem` (`FILE: FIELD: message`) is set when the file is there but unusable: the
    dashboard then offers no cleaning and says why, and the variant's other views still work.
    """

    massive_dims: tuple[int, ...] = ()
    problem: str | None = None

    def __post_init__(self) -> None:
        if not all(type(d) is int and 0 <= d < MAX_HIDDEN_DIM for d in self.massive_dims):
            raise ValueError(f"massive dims must be hidden-state indices: {self.massive_dims}")
        if self.problem is not None and self.massive_dims:
            raise ValueError("an unusable calibration has no massive dims")

    @property
    def usable(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class Config:
    """An experiment's config.json as the dashboard uses it (SPEC section 2).

    `config` is the store's reading of it, None when there is no file or the store refuses
    it; `problem` (`FILE: FIELD: message`) says why it was refused.
    """

    config: ExperimentConfig | None = None
    problem: str | None = None

    def __post_init__(self) -> None:
        if self.problem is not None and self.config is not None:
            raise ValueError("a refused config has no contents")

    def defaults(self, variants: list[str]) -> dict[str, str | None]:
        """The default extraction and application variants among those with outputs: the
        config's (the store's rule: a missing default is the first declared variant), else the
        first variant with outputs."""
        first = variants[0] if variants else None
        config = self.config
        chosen = (
            {"extraction": config.extraction_variant, "application": config.application_variant}
            if config is not None
            else {}
        )
        return {
            role: chosen[role] if chosen.get(role) in variants else first
            for role in ("extraction", "application")
        }

    def model(self, variant: str) -> tuple[str | None, str | None]:
        """The model and LoRA adapter the config gives a variant (None where it gives none)."""
        spec = self.config.variants.get(variant) if self.config is not None else None
        return (spec.model, spec.lora) if spec is not None else (None, None)


def natural_key(name: str) -> tuple[int, int, str]:
    # Prompt ids are usually integers stored as strings: "10" must sort after "9".
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def finite_list(values: np.ndarray) -> list[float | None]:
    """Floats for JSON; NaN and inf become null because browsers' JSON.parse rejects them."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def _member(obj: Any, key: str, field: str) -> Any:
    """`obj[key]` of a projection entry, or a ValueError naming `field` (the key's path)."""
    if not isinstance(obj, dict):
        owner = field.rsplit(".", 1)[0] if "." in field else "entry"
        raise ValueError(f"{owner}: must be an object, not {json_kind(obj)}")
    if key not in obj:
        raise ValueError(f"{field}: missing")
    return obj[key]


def _numbers(value: Any, field: str) -> np.ndarray:
    """A JSON list of numbers as float64, null items as NaN; anything else is a ValueError."""
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        out = None
    if out is None or out.ndim != 1:
        raise ValueError(f"{field}: must be a list of numbers, not {_shape(value)}")
    return out


def _shape(value: Any) -> str:
    return "a list holding other things" if isinstance(value, list) else json_kind(value)


def _baseline(entry: dict[str, Any]) -> float:
    value = _member(entry, "baseline", "baseline")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"baseline: must be a number, not {json_kind(value)}")
    return float(value)


def segment_scores(
    entry: dict[str, Any],
    segment: str,
    mode: str,
    centered: bool = False,
    cleaned: bool = False,
    already_centered: bool = False,
) -> np.ndarray:
    """Scores of one projection entry's segment in a score mode (SPEC section 6).

    Every mode is the store's math (`raypipe.store.scores`) on the entry's raw scores and
    norms, as the overview's SQL has it. The file's `normalized_*` arrays are not read: they
    hold 0.0 where no score is defined (as trait-interp writes them), where the dashboard
    shows none. Cleaned modes use the massive-dim-cleaned scores and norms. Data of the wrong
    shape is a ValueError that starts with the field's path in the entry.
    """
    score = ScoreMode(mode, centered)
    at = "cleaned." if cleaned else ""
    source = _member(entry, "cleaned", "cleaned") if cleaned else entry
    raw = _numbers(_member(source, segment, at + segment), at + segment)
    shift = score.shifts(already_centered)
    if shift:
        raw = center(raw, _baseline(entry))
    if mode == "raw" or raw.size == 0:
        return raw
    norms = _member(source, "token_norms", f"{at}token_norms")
    field = f"{at}token_norms.{segment}"
    norms = _numbers(_member(norms, segment, field), field)
    if norms.shape != raw.shape:
        raise ValueError(
            f"{field}: {norms.size} norms for {raw.size} {segment} scores; they must match"
        )
    return normalize_projections(raw, norms, mode)


def tokens_and_end(
    tokens: Any, end: Any, where: str, row: str | None = None
) -> tuple[list[str], int]:
    """A response's tokens and prompt_end, checked to fit each other (SPEC section 7).

    `where` is the file; `row` names the prompt when the file is a table of many.
    """
    of = f" (prompt {row})" if row is not None else ""
    if not isinstance(tokens, list):
        kind = json_kind(tokens)
        raise file_error(422, where, "tokens", f"must be a list of strings, not {kind}{of}")
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            kind = json_kind(token)
            raise file_error(422, where, f"tokens[{i}]", f"must be a string, not {kind}{of}")
    if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= len(tokens):
        shown = shown_json(end)
        message = f"must be an integer from 0 to {len(tokens)}, got {shown}{of}"
        raise file_error(422, where, "prompt_end", message)
    return tokens, end


@dataclass(frozen=True)
class Table:
    """A Parquet table of the tree: its path, and the name messages give it (under the root)."""

    path: Path
    where: str

    def __post_init__(self) -> None:
        if not self.path.is_absolute():
            raise ValueError(f"a table path must be absolute: {self.path}")


class Tree:
    """The `experiments/` folder under a root; every name from a request is checked here.

    Names are matched against what exists on disk and every resolved path must stay under
    `root/experiments`, so `..`, absolute paths and symlinks out of the tree all read as 404.
    The server makes one Tree per request: folder listings are memoized for that request
    only, since a pipeline may be writing new prompts while the dashboard runs.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.base = experiments_dir(self.root)
        self._memo: dict[tuple, Any] = {}

    def _once(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # -- path safety -------------------------------------------------------------------------

    def inside(self, path: Path) -> Path:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # symlink loops, names too long for the filesystem
            raise ApiError(404, "not found") from None
        if not resolved.is_relative_to(self.base.resolve()):
            raise ApiError(404, "not found")
        return resolved

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else path.name

    def read_json(self, path: Path) -> Any:
        """A parsed JSON file of the tree; 404 when absent, 422 naming file and field if broken."""
        where = self.rel(path)
        try:
            path = self.inside(path)
        except ApiError:
            raise file_error(
                422, where, "file", "links outside the experiments tree, or in a loop"
            ) from None
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise file_error(404, where, "file", "missing") from None
        except OSError as err:
            raise file_error(422, where, "file", f"cannot read: {err.strerror}") from None
        if not stat.S_ISREG(mode):
            # A named pipe would block the request forever; a folder cannot be parsed.
            raise file_error(422, where, "file", "not a regular file")
        try:
            return read_json_file(path)
        except InputError as err:
            status = 404 if err.message == "file not found" else 422
            raise file_error(status, where, err.field, err.message) from None

    def _subdirs(self, path: Path) -> list[str]:
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)
        )

    # -- experiments and variants ------------------------------------------------------------

    def experiments(self) -> list[str]:
        return self._once(
            ("experiments",),
            lambda: [n for n in self._subdirs(self.base) if self._safe_dir(self.base / n)],
        )

    def _safe_dir(self, path: Path) -> bool:
        try:
            self.inside(path)
        except ApiError:
            return False
        return True

    def paths(self, experiment: str) -> ExperimentPaths:
        """The store's paths of an experiment that exists (404 for any other name)."""
        if experiment not in self.experiments():
            raise ApiError(404, f"unknown experiment {experiment!r}")
        return ExperimentPaths(self.root, experiment)

    def config(self, experiment: str) -> Config:
        """The experiment's config.json as the store reads it (`raypipe.store.experiment`).

        No file is no config. A file that is not a JSON object at all is a 422; one the store
        refuses a field of is kept as its `problem`, since the dashboard only takes defaults
        and model names from it and the outputs are still there to show.
        """
        path = self.paths(experiment).config
        if not path.exists():
            return Config()
        data = self.read_json(path)
        where = self.rel(path)
        if not isinstance(data, dict):
            raise file_error(422, where, "config", f"must be a JSON object, not {json_kind(data)}")
        try:
            return Config(parse_experiment(Path(where), data))
        except InputError as err:
            return Config(problem=str(err))

    def variants(self, experiment: str) -> list[str]:
        inference = self.paths(experiment).inference_root
        return self._once(
            ("variants", experiment),
            lambda: [n for n in self._subdirs(inference) if self._safe_dir(inference / n)],
        )

    def variant_paths(self, experiment: str, variant: str) -> ExperimentPaths:
        """The store's paths of an experiment with this variant's outputs (404 otherwise)."""
        if variant not in self.variants(experiment):
            raise ApiError(404, f"unknown variant {variant!r} in experiment {experiment!r}")
        return self.paths(experiment)

    def calibration(self, experiment: str, variant: str) -> Calibration | None:
        """The variant's calibration: None when it has none, unusable when the file is broken
        or partial (`raypipe.store.calibration` decides which dims a file offers)."""
        path = self.variant_paths(experiment, variant).calibration_file(variant)
        if not os.path.lexists(path):
            return None
        try:
            data = self.read_json(path)
            return Calibration(calibration_dims(self.rel(path), data))
        except ApiError as err:
            return Calibration(problem=err.message)
        except InputError as err:
            return Calibration(problem=str(err))

    # -- prompt sets and prompts -------------------------------------------------------------

    def prompt_sets(self, experiment: str, variant: str) -> list[str]:
        """Prompt sets with response JSONs or a projections Parquet table, as `a/b` paths."""
        paths = self.variant_paths(experiment, variant)
        return self._once(
            ("prompt_sets", experiment, variant), lambda: self._find_sets(paths, variant)
        )

    def _find_sets(self, paths: ExperimentPaths, variant: str) -> list[str]:
        found: set[str] = set()
        responses = paths.responses_root(variant)
        for dirpath, dirnames, filenames in os.walk(responses):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if any(_is_named(f, RECORD_SUFFIX) for f in filenames):
                found.add(Path(dirpath).relative_to(responses).as_posix())
        tables = paths.parquet_dir(variant, "projections")
        for dirpath, dirnames, filenames in os.walk(tables):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(tables)
            for f in filenames:
                if _is_named(f, TABLE_SUFFIX):
                    found.add((rel / f[: -len(TABLE_SUFFIX)]).as_posix())
        found.discard(".")
        return sorted(found)

    def check_prompt_set(self, experiment: str, variant: str, prompt_set: str) -> str:
        if prompt_set not in self.prompt_sets(experiment, variant):
            raise ApiError(
                404, f"unknown prompt set {prompt_set!r} for variant {variant!r} of {experiment!r}"
            )
        return prompt_set

    def responses_dir(self, experiment: str, variant: str, prompt_set: str) -> Path:
        self.check_prompt_set(experiment, variant, prompt_set)
        return self.inside(self.paths(experiment).responses_dir(variant, prompt_set))

    def prompt_ids(self, experiment: str, variant: str, prompt_set: str) -> list[str]:
        folder = self.responses_dir(experiment, variant, prompt_set)
        return _record_ids(folder)

    def _check_prompt_id(self, prompt_id: str) -> str:
        # The id becomes a file name: it must name a file in its folder, never another one.
        bad = not prompt_id or prompt_id.startswith(".")
        if bad or any(c in prompt_id for c in ("/", "\\", "\x00")):
            raise ApiError(404, f"unknown prompt id {prompt_id!r}")
        return prompt_id

    def response(self, experiment: str, variant: str, prompt_set: str, prompt_id: str) -> dict:
        """A response JSON whose tokens and prompt_end are checked to fit."""
        self.responses_dir(experiment, variant, prompt_set)
        file = self.paths(experiment).response_file(
            variant, prompt_set, self._check_prompt_id(prompt_id)
        )
        path = self.inside(file)
        if not path.is_file():
            raise ApiError(
                404, f"no response for prompt {prompt_id!r} in {prompt_set!r} ({variant!r})"
            )
        data = self.read_json(path)
        if not isinstance(data, dict):
            raise file_error(422, self.rel(path), "response", "must be a JSON object")
        tokens_and_end(data.get("tokens"), data.get("prompt_end"), self.rel(path))
        return data

    # -- traits and projections --------------------------------------------------------------

    def traits(self, experiment: str, variant: str, prompt_set: str) -> list[str]:
        """Traits (`category/name`) that have a projections folder for this prompt set."""
        self.check_prompt_set(experiment, variant, prompt_set)
        paths = self.paths(experiment)
        return self._once(
            ("traits", experiment, variant, prompt_set),
            lambda: self._find_traits(paths, variant, prompt_set),
        )

    def _find_traits(self, paths: ExperimentPaths, variant: str, prompt_set: str) -> list[str]:
        out = []
        projections = paths.projections_root(variant)
        for category in self._subdirs(projections):
            for name in self._subdirs(projections / category):
                trait = f"{category}/{name}"
                folder = paths.projections_dir(variant, trait, prompt_set)
                if folder.is_dir() and self._safe_dir(folder):
                    out.append(trait)
        return out

    def check_trait(self, experiment: str, variant: str, prompt_set: str, trait: str) -> str:
        if trait not in self.traits(experiment, variant, prompt_set):
            raise ApiError(
                404, f"unknown trait {trait!r} for {prompt_set!r} in variant {variant!r}"
            )
        return trait

    def projection_file(
        self, experiment: str, variant: str, trait: str, prompt_set: str, prompt_id: str
    ) -> Path:
        """Where the projection JSON of one prompt for one trait is (or would be)."""
        self.check_trait(experiment, variant, prompt_set, trait)
        file = self.paths(experiment).projection_file(
            variant, trait, prompt_set, self._check_prompt_id(prompt_id)
        )
        return self.inside(file)

    def projection(
        self, experiment: str, variant: str, trait: str, prompt_set: str, prompt_id: str
    ) -> dict | None:
        """The projection JSON of one prompt for one trait, or None when it was not written."""
        path = self.projection_file(experiment, variant, trait, prompt_set, prompt_id)
        return self._read_projection(path) if path.is_file() else None

    def _read_projection(self, path: Path) -> dict:
        data = self.read_json(path)
        entries = data.get("projections") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise file_error(422, self.rel(path), "projections", "must be a list of objects")
        return data

    def first_projection(
        self, experiment: str, variant: str, trait: str, prompt_set: str
    ) -> dict | None:
        """Any one projection file of a trait, to learn its layers without reading them all."""
        self.check_trait(experiment, variant, prompt_set, trait)
        paths = self.paths(experiment)
        folder = self.inside(paths.projections_dir(variant, trait, prompt_set))
        for pid in _record_ids(folder):
            # As for one prompt's projection, only a regular file counts as written.
            path = paths.projection_file(variant, trait, prompt_set, pid)
            if path.is_file():
                return self._read_projection(path)
        return None

    # -- Parquet -----------------------------------------------------------------------------

    def parquet(self, experiment: str, variant: str, table: str, prompt_set: str) -> Table | None:
        """`parquet/{projections|responses}/{prompt_set}.parquet`, or None when absent."""
        self.check_prompt_set(experiment, variant, prompt_set)
        path = self.paths(experiment).parquet_file(variant, table, prompt_set)
        if not path.is_file():
            return None
        return Table(self.inside(path), self.rel(path))


def _is_named(name: str, suffix: str) -> bool:
    return name.endswith(suffix) and not name.startswith(".")


def _record_ids(folder: Path) -> list[str]:
    """Prompt ids of the `{id}.json` files in a folder, in natural order."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    ids = [n[: -len(RECORD_SUFFIX)] for n in names if _is_named(n, RECORD_SUFFIX)]
    return sorted(ids, key=natural_key)
