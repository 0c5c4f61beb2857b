"""calibration.json (SPEC section 8) and the running state beside it: read and written only here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypipe.errors import InputError
from raypipe.store.atomic import read_json, write_json, write_tensor
from raypipe.store.outputs import now_iso

STATE_FORMAT = 1


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
    """calibration.json (SPEC section 8) from a collector's `result()`."""
    return {
        "experiment": experiment,
        "model": model,
        "model_variant": variant,
        "source": source,
        "tokens_seen": result["tokens_seen"],
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
    if not is_complete(data):
        raise InputError(
            path,
            "complete",
            f"the calibration is partial ({data.get('tokens_seen')} tokens so far: a run was "
            "stopped before it finished); run `raypipe infer` without --remove-massive-dims to "
            "finish it, or `raypipe calibrate`",
        )
    aggregate = data.get("aggregate")
    if not isinstance(aggregate, dict):
        raise InputError(path, "aggregate", "must be an object holding massive_dims")
    dims = aggregate.get("massive_dims")
    if not isinstance(dims, list) or not all(isinstance(d, int) for d in dims):
        raise InputError(path, "aggregate.massive_dims", "must be a list of integers")
    return tuple(dims)


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
