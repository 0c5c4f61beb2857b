"""The spine of every job: declared stages, the backends that build them, one loop to run them.

A stage declares what it runs (a class: an actor pool that builds its engine once; a function:
stateless tasks), the columns it needs and produces, and the resources it asks for, computed
once from the validated plan. A backend is a function registered under a name that turns the
job into its list of stages; the job picks one backend (`backend_for`) and runs the list. A
new backend is one registration and its stage class, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from raypipe.errors import RaypipeError


@dataclass(frozen=True)
class Resources:
    """What each actor (or task) of a stage asks Ray for."""

    num_cpus: float
    num_gpus: float = 0.0
    replicas: int | None = None  # actors in the pool; None: stateless tasks
    batch_size: int | None = None  # rows per call; None: Ray Data's blocks as they come
    # Calls one actor runs at once (an async stage: several blocks in flight); None: one.
    max_concurrency: int | None = None

    def __post_init__(self):
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise RaypipeError(f"resources: negative request {self}")
        if self.replicas is not None and self.replicas < 1:
            raise RaypipeError(f"resources: replicas must be at least 1, got {self.replicas}")
        if self.max_concurrency is not None and (self.replicas is None or self.max_concurrency < 1):
            raise RaypipeError(f"resources: max_concurrency needs actors and at least 1: {self}")


@dataclass(frozen=True)
class Stage:
    """One declared step of a job over a Ray Data dataset of pandas batches."""

    name: str
    run: type | Callable  # a class (actor pool, built once per actor) or a function (tasks)
    args: dict = field(repr=False)  # the class's constructor kwargs, or the function's kwargs
    needs: tuple[str, ...]
    produces: tuple[str, ...]
    resources: Resources

    def apply(self, ds):
        import ray

        r = self.resources
        common = dict(batch_format="pandas", num_cpus=r.num_cpus, batch_size=r.batch_size)
        if r.num_gpus:
            common["num_gpus"] = r.num_gpus
        if r.max_concurrency:
            common["max_concurrency"] = r.max_concurrency
        if r.replicas is None:
            return ds.map_batches(self.run, fn_kwargs=self.args, **common)
        return ds.map_batches(
            self.run,
            fn_constructor_kwargs=self.args,
            compute=ray.data.ActorPoolStrategy(size=r.replicas),
            **common,
        )


def check_chain(stages: list[Stage], given: tuple[str, ...]) -> None:
    """Each stage's columns must come from the one before (or the input rows): a job that
    cannot work fails here, before Ray runs anything, naming the stage."""
    have = set(given)
    for stage in stages:
        missing = [c for c in stage.needs if c not in have]
        if missing:
            raise RaypipeError(
                f"job: stage {stage.name} needs columns {missing} that the stage before it "
                f"does not produce (it has {sorted(have)})"
            )
        have = set(stage.produces)


# A backend turns a job (raypipe.pipeline.job.Job) into its stages.
BACKENDS: dict[str, Callable] = {}


def backend(name: str) -> Callable:
    """Register `build(job) -> list[Stage]` as backend `name`."""

    def register(build: Callable) -> Callable:
        if name in BACKENDS:
            raise RaypipeError(f"backend {name!r} is registered twice")
        BACKENDS[name] = build
        return build

    return register


def run_stages(ds, stages: list[Stage]):
    """The loop every job runs."""
    for stage in stages:
        ds = stage.apply(ds)
    return ds
