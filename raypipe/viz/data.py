"""Read-only access to an experiments tree for the dashboard: discovery, checks, score modes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCORE_MODES = ("raw", "normalized", "cosine")
SEGMENTS = ("prompt", "response")


class ApiError(Exception):
    """A request the dashboard refuses; `status` is the HTTP code, the message goes to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def natural_key(name: str) -> tuple[int, int, str]:
    # Prompt ids are usually integers stored as strings: "10" must sort after "9".
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def finite_list(values: np.ndarray) -> list[float | None]:
    """Floats for JSON; NaN and inf become null because browsers' JSON.parse rejects them."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def segment_scores(
    entry: dict[str, Any],
    segment: str,
    mode: str,
    centered: bool = False,
    cleaned: bool = False,
    already_centered: bool = False,
) -> np.ndarray:
    """Scores of one projection entry's segment in a score mode (SPEC section 6).

    Centering subtracts the vector's baseline from the raw scores before any division, since
    the baseline is in raw units. Cleaned modes use the massive-dim-cleaned scores and norms.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}")
    source = entry["cleaned"] if cleaned else entry
    raw = np.asarray(source[segment], dtype=np.float64)
    shift = centered and not already_centered
    if shift:
        raw = raw - float(entry["baseline"])
    if mode == "raw" or raw.size == 0:
        return raw
    norms = np.asarray(source["token_norms"][segment], dtype=np.float64)
    if norms.shape != raw.shape:
        raise ApiError(
            422, f"{segment} scores and norms differ in length ({raw.size} vs {norms.size})"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "normalized":
            stored = entry.get(f"normalized_{segment}")
            if stored is not None and not shift and not cleaned:
                return np.asarray(stored, dtype=np.float64)
            return raw / norms.mean()
        return np.where(norms > 0, raw / np.where(norms > 0, norms, 1.0), np.nan)


class Tree:
    """The `experiments/` folder under a root; every name from a request is checked here.

    Names are matched against what exists on disk and every resolved path must stay under
    `root/experiments`, so `..`, absolute paths and symlinks out of the tree all read as 404.
    The server makes one Tree per request: folder listings are memoized for that request
    only, since a pipeline may be writing new prompts while the dashboard runs.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.base = self.root / "experiments"
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
        path = self.inside(path)
        try:
            with path.open("rb") as fh:
                return json.load(fh)
        except FileNotFoundError:
            raise ApiError(404, f"missing file {self.rel(path)}") from None
        except (OSError, ValueError) as err:
            raise ApiError(422, f"cannot read {self.rel(path)}: {err}") from None

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

    def experiment_dir(self, experiment: str) -> Path:
        if experiment not in self.experiments():
            raise ApiError(404, f"unknown experiment {experiment!r}")
        return self.inside(self.base / experiment)

    def config(self, experiment: str) -> dict[str, Any]:
        path = self.experiment_dir(experiment) / "config.json"
        if not path.exists():
            return {}
        config = self.read_json(path)
        if not isinstance(config, dict):
            raise ApiError(422, f"{self.rel(path)} is not a JSON object")
        return config

    def variants(self, experiment: str) -> list[str]:
        inference = self.experiment_dir(experiment) / "inference"
        return self._once(
            ("variants", experiment),
            lambda: [n for n in self._subdirs(inference) if self._safe_dir(inference / n)],
        )

    def variant_dir(self, experiment: str, variant: str) -> Path:
        if variant not in self.variants(experiment):
            raise ApiError(404, f"unknown variant {variant!r} in experiment {experiment!r}")
        return self.inside(self.experiment_dir(experiment) / "inference" / variant)

    def calibration(self, experiment: str, variant: str) -> dict[str, Any] | None:
        path = self.variant_dir(experiment, variant) / "massive_activations" / "calibration.json"
        if not path.is_file():
            return None
        data = self.read_json(path)
        dims = (data.get("aggregate") or {}).get("massive_dims") if isinstance(data, dict) else None
        return {"massive_dims": [int(d) for d in dims or []]}

    # -- prompt sets and prompts -------------------------------------------------------------

    def prompt_sets(self, experiment: str, variant: str) -> list[str]:
        """Prompt sets with response JSONs or a projections Parquet table, as `a/b` paths."""
        vdir = self.variant_dir(experiment, variant)
        return self._once(("prompt_sets", experiment, variant), lambda: self._find_sets(vdir))

    def _find_sets(self, vdir: Path) -> list[str]:
        found: set[str] = set()
        responses = vdir / "responses"
        for dirpath, dirnames, filenames in os.walk(responses):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if any(f.endswith(".json") and not f.startswith(".") for f in filenames):
                found.add(Path(dirpath).relative_to(responses).as_posix())
        tables = vdir / "parquet" / "projections"
        for dirpath, dirnames, filenames in os.walk(tables):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(tables)
            for f in filenames:
                if f.endswith(".parquet") and not f.startswith("."):
                    found.add((rel / f[: -len(".parquet")]).as_posix())
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
        return self.inside(self.variant_dir(experiment, variant) / "responses" / prompt_set)

    def prompt_ids(self, experiment: str, variant: str, prompt_set: str) -> list[str]:
        folder = self.responses_dir(experiment, variant, prompt_set)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        ids = [n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")]
        return sorted(ids, key=natural_key)

    def _prompt_file(self, folder: Path, prompt_id: str) -> Path:
        if not prompt_id or "/" in prompt_id or "\\" in prompt_id or "\x00" in prompt_id:
            raise ApiError(404, f"unknown prompt id {prompt_id!r}")
        if prompt_id.startswith("."):
            raise ApiError(404, f"unknown prompt id {prompt_id!r}")
        return self.inside(folder / f"{prompt_id}.json")

    def response(self, experiment: str, variant: str, prompt_set: str, prompt_id: str) -> dict:
        folder = self.responses_dir(experiment, variant, prompt_set)
        path = self._prompt_file(folder, prompt_id)
        if not path.is_file():
            raise ApiError(
                404, f"no response for prompt {prompt_id!r} in {prompt_set!r} ({variant!r})"
            )
        data = self.read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ApiError(422, f"{self.rel(path)} has no token list")
        return data

    # -- traits and projections --------------------------------------------------------------

    def traits(self, experiment: str, variant: str, prompt_set: str) -> list[str]:
        """Traits (`category/name`) that have a projections folder for this prompt set."""
        self.check_prompt_set(experiment, variant, prompt_set)
        projections = self.variant_dir(experiment, variant) / "projections"
        return self._once(
            ("traits", experiment, variant, prompt_set),
            lambda: self._find_traits(projections, prompt_set),
        )

    def _find_traits(self, projections: Path, prompt_set: str) -> list[str]:
        out = []
        for category in self._subdirs(projections):
            for name in self._subdirs(projections / category):
                folder = projections / category / name / prompt_set
                if folder.is_dir() and self._safe_dir(folder):
                    out.append(f"{category}/{name}")
        return out

    def check_trait(self, experiment: str, variant: str, prompt_set: str, trait: str) -> str:
        if trait not in self.traits(experiment, variant, prompt_set):
            raise ApiError(
                404, f"unknown trait {trait!r} for {prompt_set!r} in variant {variant!r}"
            )
        return trait

    def projection(
        self, experiment: str, variant: str, trait: str, prompt_set: str, prompt_id: str
    ) -> dict | None:
        """The projection JSON of one prompt for one trait, or None when it was not written."""
        self.check_trait(experiment, variant, prompt_set, trait)
        folder = self.variant_dir(experiment, variant) / "projections" / trait / prompt_set
        path = self._prompt_file(folder, prompt_id)
        return self._read_projection(path) if path.is_file() else None

    def _read_projection(self, path: Path) -> dict:
        data = self.read_json(path)
        entries = data.get("projections") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ApiError(422, f"{self.rel(path)} has no projections list")
        return data

    def first_projection(
        self, experiment: str, variant: str, trait: str, prompt_set: str
    ) -> dict | None:
        """Any one projection file of a trait, to learn its layers without reading them all."""
        folder = self.inside(
            self.variant_dir(experiment, variant) / "projections" / trait / prompt_set
        )
        try:
            names = sorted(
                (n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")),
                key=lambda n: natural_key(n[: -len(".json")]),
            )
        except FileNotFoundError:
            return None
        return self._read_projection(folder / names[0]) if names else None

    # -- Parquet -----------------------------------------------------------------------------

    def parquet(self, experiment: str, variant: str, table: str, prompt_set: str) -> Path | None:
        """`parquet/{projections|responses}/{prompt_set}.parquet`, or None when absent."""
        self.check_prompt_set(experiment, variant, prompt_set)
        path = self.variant_dir(experiment, variant) / "parquet" / table / f"{prompt_set}.parquet"
        if not path.is_file():
            return None
        return self.inside(path)
