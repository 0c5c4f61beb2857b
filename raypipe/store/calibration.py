"""calibration.json (SPEC section 8) and the running state beside it: read and written only here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypipe.errors import InputError
from raypipe.store.atomic import read_json, write_json, write_tensor
from raypipe.store.outputs import now_iso
from raypipe.store.text import json_kind, shown_json

STATE_FORMAT = 2  # 2: signed sums (trait-interp's top dims rank by the signed mean)


@dataclass(frozen=True)
class CalibrationTarget:
    """Where a run collects a variant's calibration passively, and the prompts the run covers.

    `expected` holds the ids of the run's prompt set: once every one of them is counted the
    calibration is complete even below the token budget (a short prompt set), whichever run,
    killed or not, counted each.
    """

    path: Path
    experiment: str
    model: str
    variant: str
    source: str
    budget: int = 5000
    prompt_set: str = ""
    expected: frozenset[str] = frozenset()

    def __post_init__(self):
        if self.budget < 1:
            raise ValueError(f"calibration budget must be at least 1 token, got {self.budget}")


def state_file(path: Path) -> Path:
    """raypipe's private running state beside `calibration.json` (sums, counts, the prompts
    counted): what lets a killed run's collection go on where it stopped."""
    path = Path(path)
    return path.parent / f".{path.stem}.state.pt"


def calibration_record(
    experiment: str, model: str, variant: str, source: str, result: dict[str, Any]
) -> dict[str, Any]:
    """calibration.json (SPEC section 8) from a collector's `result()`. `source` is
    `"{command}:{prompt set}"`, several joined by " + " (a collection spread over runs);
    `prompt_set` names the sets, and `is_calibration` is true: this is the variant's
    calibration file, as trait-interp marks its own."""
    sets = [part.partition(":")[2] or part for part in source.split(" + ")]
    return {
        "experiment": experiment,
        "model": model,
        "model_variant": variant,
        "source": source,
        "tokens_seen": result["tokens_seen"],
        "prompt_set": " + ".join(dict.fromkeys(sets)),
        "is_calibration": True,
        "aggregate": result["aggregate"],
        "timestamp": now_iso(),
    }


def read_calibration(path: Path) -> dict[str, Any] | None:
    """The calibration at `path`, or None when there is none; InputError if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return None
    data = read_json(path, "calibration")
    if not isinstance(data, dict):
        raise InputError(path, "calibration", "must be a JSON object")
    return data


def is_complete(record: dict[str, Any]) -> bool:
    """The one rule: a calibration is complete unless marked partial. raypipe marks it
    `"complete": false` while a run is still collecting it; trait-interp writes no flag."""
    return record.get("complete") is not False


def calibration_complete(path: Path) -> bool:
    """True when `path` holds a complete calibration; an unreadable one is collected again."""
    try:
        record = read_calibration(path)
    except InputError:
        return False
    return record is not None and is_complete(record)


def write_calibration(path: Path, record: dict[str, Any], complete: bool) -> Path:
    """The one writer of calibration.json; a complete one takes its running state away."""
    out = write_json(path, {**record, "complete": bool(complete)})
    if complete:
        drop_state(path)
    return out


def mark_complete(path: Path) -> None:
    """A run saw all its prompts through: what it collected is the calibration."""
    record = read_calibration(path)
    if record is None:
        return
    if not is_complete(record):
        write_calibration(path, record, complete=True)
    drop_state(path)


MAX_HIDDEN_DIM = 2**31  # any real hidden-state index is far below; beyond is not a dimension
# trait-interp writes no massive_dims; its viewer's default cleaning takes the dims that rank
# in the top 5 of at least 3 layers, so a file of its own gives the dims its viewer would.
DERIVED_TOP = 5
DERIVED_MIN_LAYERS = 3


def _dims(where: str | Path, field: str, value: Any) -> list[int]:
    """A JSON list of hidden-state indices, or an InputError naming the item that is not one."""
    if not isinstance(value, list):
        raise InputError(where, field, f"must be a list of integers, not {json_kind(value)}")
    for i, d in enumerate(value):
        if type(d) is not int or not 0 <= d < MAX_HIDDEN_DIM:
            raise InputError(
                where,
                f"{field}[{i}]",
                f"must be a hidden-state index (an integer from 0), got {shown_json(d)}",
            )
    return value


def _derived_dims(where: str | Path, aggregate: dict[str, Any]) -> tuple[int, ...]:
    field = "aggregate.top_dims_by_layer"
    by_layer = aggregate.get("top_dims_by_layer")
    if by_layer is None:
        raise InputError(
            where, "aggregate", "has neither massive_dims nor top_dims_by_layer to derive them"
        )
    if not isinstance(by_layer, dict):
        raise InputError(where, field, f"must be an object, not {json_kind(by_layer)}")
    counts: dict[int, int] = {}
    for layer, dims in by_layer.items():
        for d in set(_dims(where, f"{field}.{layer}", dims)[:DERIVED_TOP]):
            counts[d] = counts.get(d, 0) + 1
    return tuple(sorted(d for d, n in counts.items() if n >= DERIVED_MIN_LAYERS))


def calibration_dims(where: str | Path, record: Any) -> tuple[int, ...]:
    """The massive dims a parsed calibration.json (SPEC section 8) offers, sorted; an
    InputError naming `where` and the field when it offers none: not an object, partial (a run
    is collecting it, or was stopped), or a malformed aggregate. A file without massive_dims
    (written by trait-interp) has them derived from its top_dims_by_layer."""
    if not isinstance(record, dict):
        raise InputError(where, "calibration", f"must be a JSON object, not {json_kind(record)}")
    if not is_complete(record):
        seen = record.get("tokens_seen")
        seen = seen if type(seen) is int else "?"
        raise InputError(
            where,
            "complete",
            f"the calibration is partial ({seen} tokens so far: a run is collecting it, or "
            "was stopped before it finished)",
        )
    if "aggregate" not in record:
        raise InputError(where, "aggregate", "missing")
    aggregate = record["aggregate"]
    if not isinstance(aggregate, dict):
        raise InputError(where, "aggregate", f"must be an object, not {json_kind(aggregate)}")
    if "massive_dims" not in aggregate:
        return _derived_dims(where, aggregate)
    return tuple(sorted(set(_dims(where, "aggregate.massive_dims", aggregate["massive_dims"]))))


def massive_dims(path: Path) -> tuple[int, ...]:
    """The flagged dims, for --remove-massive-dims: from a complete calibration only."""
    path = Path(path)
    data = read_calibration(path)
    if data is None:
        raise InputError(
            path,
            "calibration",
            "--remove-massive-dims needs a calibration; run `raypipe calibrate` first",
        )
    try:
        return calibration_dims(path, data)
    except InputError as err:
        if err.field != "complete":
            raise
        raise InputError(
            path,
            "complete",
            f"{err.message}; run `raypipe infer` without --remove-massive-dims to finish it, "
            "or `raypipe calibrate`",
        ) from None


def _identity(target: CalibrationTarget) -> dict[str, Any]:
    from raypipe.engine.calibration import DEFAULT_CRITERION

    return {
        "format": STATE_FORMAT,
        "model": target.model,
        "variant": target.variant,
        "budget": target.budget,
        "criterion": DEFAULT_CRITERION,
    }


def read_state(target: CalibrationTarget) -> dict[str, Any] | None:
    """The running state of the collection to go on with, or None to start afresh.

    Only beside a partial calibration.json: the stage writes that file first and this one
    second, so a state is never ahead of the calibration it belongs to (a kill between the two
    leaves it one batch behind, and that batch is counted again). A state of another model,
    budget or criterion, or one that cannot be read, is not carried on.
    """
    try:
        record = read_calibration(target.path)
    except InputError:
        return None
    if record is None or is_complete(record):
        return None
    path = state_file(target.path)
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return None  # a foreign or damaged file: the collection starts again
    if not isinstance(state, dict) or state.get("identity") != _identity(target):
        return None
    return state


def write_state(
    target: CalibrationTarget,
    counted: list[tuple[str, str]],
    sources: list[str],
    collector: dict[str, Any],
) -> Path:
    """`collector` is CalibrationCollector.state_dict(); `counted` the (prompt_set, prompt_id)
    of every prompt it has taken tokens from."""
    state = {
        "identity": _identity(target),
        "counted": [list(k) for k in counted],
        "sources": list(sources),
        "collector": collector,
    }
    return write_tensor(state_file(target.path), state)


def drop_state(path: Path) -> None:
    state_file(path).unlink(missing_ok=True)
