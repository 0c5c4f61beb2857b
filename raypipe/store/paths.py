"""Every path of the experiment tree (SPEC section 2), and the rules for names that become paths."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import InputError
from raypipe.store.text import brief

# Used with fullmatch: `$` would also match before a final newline, letting "0\n" through.
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_NAME_LEN = 200
EXPERIMENTS = "experiments"  # the folder under a root that holds every experiment
RECORD_SUFFIX = ".json"  # a response or projection file: `{prompt_id}.json`
TABLE_SUFFIX = ".parquet"  # a Parquet table: `{prompt_set}.parquet`
PARTS_SUFFIX = ".parts"  # its parts written as a run goes: `{prompt_set}.parts/*.part`
PART_SUFFIX = ".part"  # not `.parquet`: a glob over the tables never picks up a part


def check_name(value: str, where: str | Path, field: str) -> str:
    """A single path component: letters, digits, `_ . -`, never `..`, never hidden."""
    if not isinstance(value, str) or not value:
        raise InputError(where, field, f"must be a non-empty string, got {brief(value)}")
    if len(value) > MAX_NAME_LEN or not _SAFE_PART.fullmatch(value) or ".." in value:
        raise InputError(
            where, field, f"{brief(value)} is not a safe name (letters, digits, '_', '.', '-' only)"
        )
    return value


def check_relpath(value: str, where: str | Path, field: str, parts: int | None = None) -> str:
    """A relative path of safe components separated by '/', optionally with an exact depth."""
    if not isinstance(value, str) or not value.strip("/"):
        raise InputError(where, field, f"must be a non-empty path, got {brief(value)}")
    pieces = value.strip("/").split("/")
    if parts is not None and len(pieces) != parts:
        shape = "/".join(["part"] * parts)
        raise InputError(where, field, f"{brief(value)} must have the form {shape}")
    for piece in pieces:
        check_name(piece, where, field)
    return "/".join(pieces)


def sanitize_position(position: str) -> str:
    """Path form of a position: `response[:5]` -> `response__5`, `response[:]` -> `response_all`,
    `prompt[-1]` -> `prompt_-1`."""
    out = position.replace("[:]", "_all")
    return out.replace("[", "_").replace(":", "_").replace("]", "")


def desanitize_position(folder: str) -> str:
    """The position a folder name stands for, as trait-interp reads it back (for vector sets
    without metadata.json): `response_all` -> `response[:]`, `response__5` -> `response[:5]`,
    `response_-5_` -> `response[-5:]`, `prompt_-1` -> `prompt[-1]`."""
    if folder.endswith("_all"):
        return f"{folder[:-4]}[:]"
    frame, sep, piece = folder.partition("_")
    if not sep:
        return folder
    if piece.startswith("_"):
        return f"{frame}[:{piece[1:]}]"
    if piece.endswith("_"):
        return f"{frame}[{piece[:-1]}:]"
    return f"{frame}[{piece}]"


def experiments_dir(root: Path) -> Path:
    """The folder of every experiment under `root`."""
    return Path(root) / EXPERIMENTS


@dataclass(frozen=True)
class ExperimentPaths:
    """Paths of one experiment under `root/experiments/{name}`; root also holds `datasets/`."""

    root: Path
    experiment: str

    @property
    def dir(self) -> Path:
        return experiments_dir(self.root) / self.experiment

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def traits_dir(self) -> Path:
        """`datasets/traits/`: one folder per trait `category/name`, as trait-interp's."""
        return self.datasets / "traits"

    def trait_data_dir(self, trait_set: str) -> Path:
        return self.traits_dir / trait_set

    # extraction
    def extraction_dir(self) -> Path:
        return self.dir / "extraction"

    def vectors_dir(
        self, trait: str, variant: str, position: str, component: str, method: str
    ) -> Path:
        return (
            self.dir
            / "extraction"
            / trait
            / variant
            / "vectors"
            / sanitize_position(position)
            / component
            / method
        )

    def vector_file(
        self, trait: str, variant: str, position: str, component: str, method: str, layer: int
    ) -> Path:
        return self.vectors_dir(trait, variant, position, component, method) / f"layer{layer}.pt"

    def steering_results(self, trait: str, variant: str, position: str) -> Path:
        return (
            self.dir
            / "steering"
            / trait
            / variant
            / sanitize_position(position)
            / "steering"
            / "results.jsonl"
        )

    # inference
    @property
    def inference_root(self) -> Path:
        """The folder holding one folder per model variant."""
        return self.dir / "inference"

    def inference_dir(self, variant: str) -> Path:
        return self.inference_root / variant

    def responses_root(self, variant: str) -> Path:
        return self.inference_dir(variant) / "responses"

    def responses_dir(self, variant: str, prompt_set: str) -> Path:
        return self.responses_root(variant) / prompt_set

    def response_file(self, variant: str, prompt_set: str, prompt_id: str) -> Path:
        return self.responses_dir(variant, prompt_set) / f"{prompt_id}{RECORD_SUFFIX}"

    def projections_root(self, variant: str) -> Path:
        return self.inference_dir(variant) / "projections"

    def projections_dir(self, variant: str, trait: str, prompt_set: str) -> Path:
        return self.projections_root(variant) / trait / prompt_set

    def projection_file(self, variant: str, trait: str, prompt_set: str, prompt_id: str) -> Path:
        return self.projections_dir(variant, trait, prompt_set) / f"{prompt_id}{RECORD_SUFFIX}"

    def raw_file(self, variant: str, component: str, prompt_set: str, prompt_id: str) -> Path:
        """Where a capture is written: `raw/residual/` whatever the component, as trait-interp
        keeps every component of a prompt in this one file (and reads it only there)."""
        return self.raw_files(variant, component, prompt_set, prompt_id)[0]

    def raw_files(
        self, variant: str, component: str, prompt_set: str, prompt_id: str
    ) -> tuple[Path, ...]:
        """Where a capture of `component` is looked for: `raw/residual/`, then a folder of the
        component's own (`raw/attn_contribution/`, as older raypipe runs wrote it)."""
        raw = self.inference_dir(variant) / "raw"
        names = dict.fromkeys(("residual", component))
        return tuple(raw / name / prompt_set / f"{prompt_id}.pt" for name in names)

    def run_log(self, variant: str, prompt_set: str, command: str, stamp: str) -> Path:
        """What a run printed besides raypipe's own lines (Ray's, HF's, the workers')."""
        return self.inference_dir(variant) / "logs" / prompt_set / f"{command}-{stamp}.log"

    def extract_log(self, stamp: str) -> Path:
        # Not under extraction/: trait-interp reads every folder there as a trait category.
        return self.dir / "logs" / f"extract-{stamp}.log"

    def calibration_file(self, variant: str) -> Path:
        return self.inference_dir(variant) / "massive_activations" / "calibration.json"

    def parquet_dir(self, variant: str, table: str) -> Path:
        """The folder of one table kind (`projections` or `responses`), one file per set."""
        return self.inference_dir(variant) / "parquet" / table

    def parquet_file(self, variant: str, table: str, prompt_set: str) -> Path:
        return self.parquet_dir(variant, table) / f"{prompt_set}{TABLE_SUFFIX}"

    def parquet_parts(self, variant: str, table: str, prompt_set: str) -> Path:
        """Where workers write a table's rows as a run goes, folded in by the next compaction."""
        return self.parquet_dir(variant, table) / f"{prompt_set}{PARTS_SUFFIX}"
