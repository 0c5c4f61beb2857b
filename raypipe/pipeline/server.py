"""Model server: a named, detached Ray actor that keeps one model loaded across jobs.

`raypipe serve` starts it on a running cluster; `--backend auto` finds it by name (the name
is derived from the model spec, so a server only ever serves the model it was started for)
and runs the pipeline's own stages inside it, on the model it holds, instead of loading the
model in every job. Without a server for the job's model, `auto` loads locally.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict

import pandas as pd

from raypipe.engine.models import ModelSpec
from raypipe.errors import RaypipeError

NAMESPACE = "raypipe"
MAX_STAGES = 16  # stage objects a server keeps (one per job stage replica); oldest dropped
READY_TIMEOUT_S = 30.0
MAX_SERVER_DEATHS = 3  # restarts of the server one batch waits through before it fails
RESTART_WAIT_S = 1800.0  # a restarted server reloads its model: as long as `serve --timeout`


def spec_identity(spec: ModelSpec) -> dict:
    """What makes two specs load the same weights the same way (the cache folder does not)."""
    d = asdict(spec)
    d.pop("cache_dir", None)
    return {k: (str(v) if v is not None and not isinstance(v, bool) else v) for k, v in d.items()}


def server_name(spec: ModelSpec) -> str:
    key = json.dumps(spec_identity(spec), sort_keys=True)
    return "raypipe-serve-" + hashlib.sha1(key.encode()).hexdigest()[:12]


class ModelServer:
    """Holds (model, tokenizer); runs stage calls on it one at a time (max_concurrency=1)."""

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        from raypipe.pipeline.stages import load_for_stage

        t0 = time.time()
        self.spec = spec
        self.loaded = load_for_stage(spec, threads)
        self.load_seconds = time.time() - t0
        self.started = time.time()
        self.calls = 0
        self.stages: OrderedDict[str, object] = OrderedDict()

    def info(self) -> dict:
        return {
            "identity": spec_identity(self.spec),
            "model": self.spec.model,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(next(self.loaded[0].parameters()).device),
            "started": self.started,
            "load_seconds": round(self.load_seconds, 2),
            "calls": self.calls,
            "stages": len(self.stages),
        }

    def open(self, key: str, kind: str, kwargs: dict) -> None:
        """Build a job's stage on the held model (kwargs as for a local stage, less `loaded`)."""
        from raypipe.pipeline.stages import MODEL_STAGES

        stage = MODEL_STAGES[kind](**kwargs, loaded=self.loaded)
        self.stages[key] = stage
        while len(self.stages) > MAX_STAGES:
            self.stages.popitem(last=False)

    def run(self, key: str, batch: pd.DataFrame) -> pd.DataFrame | None:
        """None when `key` is unknown (dropped, or the server restarted): the caller re-opens."""
        stage = self.stages.get(key)
        if stage is None:
            return None
        self.stages.move_to_end(key)
        self.calls += 1
        return stage(batch)

    def close(self, key: str) -> None:
        self.stages.pop(key, None)


def find_server(spec: ModelSpec, timeout_s: float = READY_TIMEOUT_S):
    """(handle, info) of a ready server for `spec` on the connected cluster, else (None, why)."""
    import ray

    name = server_name(spec)
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None, f"no model server {name} is up for {spec.model}"
    try:
        info = ray.get(handle.info.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return None, f"model server {name} is still loading after {timeout_s:.0f} s"
    except ray.exceptions.RayError as e:
        return None, f"model server {name} does not answer ({type(e).__name__})"
    if info.get("identity") != spec_identity(spec):
        return None, f"model server {name} holds another model ({info.get('model')})"
    return handle, info


def start_server(
    spec: ModelSpec,
    gpus: float,
    cpus: float = 1.0,
    threads: int | None = None,
    timeout_s: float = 1800.0,
) -> tuple[object, dict, bool]:
    """Start (or find) the detached server for `spec`; waits until the model is loaded, at most
    `timeout_s` (a cluster that can never place it, or a load that hangs, ends in an error and
    no half-started server). Returns (handle, info, started): False when one was already up."""
    import ray

    name = server_name(spec)
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
        started = False
    except ValueError:
        handle = (
            ray.remote(ModelServer)
            .options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",  # outlives this driver: it holds the model across jobs
                get_if_exists=True,  # two `serve` calls racing get one server
                max_concurrency=1,  # one stage call at a time: hooks on a shared model
                max_restarts=-1,  # a crashed server reloads; jobs re-open their stages
                num_cpus=cpus,
                num_gpus=gpus,
            )
            .remote(spec, threads)
        )
        started = True
    try:
        info = ray.get(handle.info.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        if started:
            ray.kill(handle, no_restart=True)
        raise RaypipeError(
            f"model server {name} was not up within {timeout_s:.0f} s (does a node have "
            f"{cpus:g} CPU and {gpus:g} GPU free?); stopped it"
            if started
            else f"model server {name} was not up within {timeout_s:.0f} s"
        ) from None
    except ray.exceptions.RayError as e:
        ray.kill(handle, no_restart=True)
        raise RaypipeError(f"model server {name} failed to load {spec.model}: {e}") from None
    return handle, info, started


def stop_server(spec: ModelSpec) -> bool:
    """Kill the server for `spec`; False when none was up."""
    import ray

    try:
        handle = ray.get_actor(server_name(spec), namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


def describe(name: str, info: dict) -> str:
    age = time.time() - info["started"]
    return (
        f"model server {name}: {info['model']} on {info['device']} "
        f"(host {info['host']}, pid {info['pid']}, up {age / 60:.1f} min, "
        f"{info['calls']} stage calls so far)"
    )


class ServedStage:
    """A Ray Data stage that forwards each batch to the model server's copy of a stage.

    Holds no model: the server runs the same GenerateStage / ProjectStage / CaptureStage code
    on the model it keeps loaded, so results equal a local run's.
    """

    def __init__(self, server: str, kind: str, stage_kwargs: dict):
        import ray

        from raypipe.pipeline.stages import MODEL_STAGES

        if kind not in MODEL_STAGES:
            raise RaypipeError(f"stage {kind}: cannot run on a model server")
        self.kind, self.kwargs = kind, stage_kwargs
        self.key = f"{kind}-{uuid.uuid4().hex}"
        try:
            self.server = ray.get_actor(server, namespace=NAMESPACE)
        except ValueError:
            raise RaypipeError(f"stage {kind}: model server {server} is gone") from None
        ray.get(self.server.open.remote(self.key, kind, stage_kwargs))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import ray
        from ray.exceptions import RayActorError

        deaths = 0
        while True:
            try:
                out = ray.get(self.server.run.remote(self.key, batch))
                if out is None:  # the server dropped this stage or restarted: build it again
                    ray.get(self.server.open.remote(self.key, self.kind, self.kwargs))
                    out = ray.get(self.server.run.remote(self.key, batch))
                return out
            except RayActorError as e:  # died, or restarting (ActorUnavailableError)
                # The server died under this batch; Ray restarts it (max_restarts=-1) and it
                # reloads the model. Wait for that, then run the batch again: a stage call is
                # idempotent (what it writes, it rewrites whole), so a rerun gives the same rows.
                deaths += 1
                if deaths > MAX_SERVER_DEATHS:
                    raise RaypipeError(
                        f"stage {self.kind}: model server died {deaths} times under one "
                        f"batch ({type(e).__name__}); see `raypipe serve --status`"
                    ) from None
                self._wait_for_restart()

    def _wait_for_restart(self) -> None:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            left = deadline - time.monotonic()
            try:
                ray.get(self.server.info.remote(), timeout=max(left, 0.1))
                return
            except ActorUnavailableError:  # restarting: Ray answers at once, so ask again
                if left <= 0:
                    break
                time.sleep(0.5)
            except GetTimeoutError:
                break
            except ActorDiedError as e:
                raise RaypipeError(f"stage {self.kind}: model server is gone: {e}") from None
        raise RaypipeError(
            f"stage {self.kind}: model server died and was not back within {RESTART_WAIT_S:.0f} s"
        )

    def __del__(self):
        try:
            self.server.close.remote(self.key)
        except Exception:
            pass  # interpreter shutdown or server gone: the server's LRU drops it anyway
