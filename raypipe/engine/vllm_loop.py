"""One vLLM engine stepped by one thread of its own, shared by any number of callers.

Each caller (a thread, or an event loop through `agenerate`) hands over a group of requests and
gets back that group's outputs, with what raypipe's hooks kept for them, once all are done; in
the meantime the engine runs every caller's requests in the same continuous batch. So several
Ray blocks are in flight on one engine and it never drains between them.

Why not vLLM's AsyncLLM (vllm 0.32): it always runs the engine core in a second process
(`EngineCoreClient.make_client` refuses asyncio without multiprocessing, whatever
VLLM_ENABLE_V1_MULTIPROCESSING says); inside a Ray actor vLLM then spawns it, which costs 15-26 s
of start-up on CPU, and nothing stops that process when the actor is SIGKILLed (no parent-death
check), so a killed driver can leave an engine holding a GPU. Here the engine core is the
in-process one of `vllm.LLM`: start-up in seconds, nothing to orphan. Everything that touches
the engine (building it, adding requests, stepping, collective_rpc) runs on the loop's thread,
one thing at a time, so the hooks' host-side store is never read mid-step, and on CPU the
worker's OpenMP threads stay bound to the one thread that runs the model.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

_STOP = object()


@dataclass
class _Group:
    """One caller's requests: done when each has its final output."""

    ids: list[str]
    collect: str | None  # the hook slot whose rows are fetched for them when done
    future: Future
    outputs: dict[str, Any] = field(default_factory=dict)


class EngineLoop:
    """A thread that builds `vllm.LLM` with `make_llm` and then serves `generate` and `call`."""

    def __init__(self, make_llm: Callable[[], Any], hooked: bool, name: str = "raypipe-vllm"):
        self.hooked = hooked  # the engine's workers have raypipe's MonitorWorker methods
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        ready: Future = Future()
        self._thread = threading.Thread(
            target=self._main, args=(make_llm, ready), name=name, daemon=True
        )
        self._thread.start()
        self.llm = ready.result()  # the engine's build error, if any, is raised here

    # ------------------------------------------------------------------ callers' side

    def submit(
        self,
        prompts: list[list[int]],
        params,
        lora_request=None,
        collect: str | None = None,
        tag: str = "",
    ) -> Future:
        """A future of (vLLM's outputs in prompt order, per prompt the rows the hooks of slot
        `collect` kept, or None). Request ids are `{tag}{group}.{index}` (hooks can pick a
        tag's requests out)."""
        future: Future = Future()
        if self._dead is not None:
            future.set_exception(RuntimeError(f"vLLM's engine has stopped: {self._dead}"))
            return future
        self._cmds.put(("generate", (prompts, params, lora_request, collect, tag), future))
        if not self._thread.is_alive():  # stopped between the check and the put
            self._fail_queued()
        return future

    def generate(self, prompts, params, lora_request=None, collect=None, tag=""):
        """`submit` and wait: for callers on plain threads."""
        return self.submit(prompts, params, lora_request, collect, tag).result()

    async def agenerate(self, prompts, params, lora_request=None, collect=None, tag=""):
        """`submit` awaited: for callers on an event loop."""
        return await asyncio.wrap_future(self.submit(prompts, params, lora_request, collect, tag))

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(llm) on the engine's thread between two steps (collective_rpc and the like)."""
        future: Future = Future()
        if self._dead is not None:
            raise RuntimeError(f"vLLM's engine has stopped: {self._dead}")
        self._cmds.put(("call", fn, future))
        return future.result()

    def rpc(self, method: str, *args) -> list:
        return self.call(lambda llm: llm.collective_rpc(method, args=args))

    def close(self) -> None:
        """Stops the thread and the engine (requests still running fail)."""
        if self._thread.is_alive():
            self._cmds.put(_STOP)
            self._thread.join()

    # ------------------------------------------------------------------ the engine's thread

    def _main(self, make_llm: Callable[[], Any], ready: Future) -> None:
        try:
            llm = make_llm()
        except BaseException as e:
            self._dead = e
            ready.set_exception(e)
            return
        ready.set_result(llm)
        engine = llm.llm_engine
        groups: dict[str, _Group] = {}  # request id -> its caller's group
        stepped = False  # since the engine was last idle
        try:
            while True:
                if not self._serve(llm, groups, block=not engine.has_unfinished_requests()):
                    break
                if engine.has_unfinished_requests():
                    stepped = True
                    for out in engine.step():
                        group = groups.pop(out.request_id, None) if out.finished else None
                        if group is not None:
                            group.outputs[out.request_id] = out
                            if len(group.outputs) == len(group.ids):
                                self._finish(llm, group)
                if stepped and not groups and not engine.has_unfinished_requests():
                    # Idle: rows no caller waits for (of a request aborted, or one scheduled
                    # once more after it stopped) are dropped.
                    stepped = False
                    if self.hooked:
                        llm.collective_rpc("raypipe_drop")
        except BaseException as e:  # the engine failed: every caller hears it, none waits
            self._dead = e
            for group in {id(g): g for g in groups.values()}.values():
                if not group.future.done():
                    group.future.set_exception(e)
            raise
        finally:
            self._dead = self._dead or RuntimeError("closed")
            self._fail_queued()
            llm.llm_engine.engine_core.shutdown()

    def _serve(self, llm, groups: dict[str, _Group], block: bool) -> bool:
        """Runs the queued commands (waiting for one when the engine is idle); False on stop."""
        try:
            cmd = self._cmds.get(block=block)
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            kind, payload, future = cmd
            if kind == "call":
                try:
                    future.set_result(payload(llm))
                except Exception as e:
                    future.set_exception(e)
            else:
                self._add(llm, groups, payload, future)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True

    def _add(self, llm, groups: dict[str, _Group], payload, future: Future) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompts, params, lora_request, collect, tag = payload
        params = params.clone()
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when done
        # "group.index": the worker's trace shows which caller's requests shared a step.
        g = next(self._ids)
        group = _Group([f"{tag}{g}.{i}" for i in range(len(prompts))], collect, future)
        engine = llm.llm_engine
        added = []
        try:
            for rid, ids in zip(group.ids, prompts):
                engine.add_request(
                    rid, TokensPrompt(prompt_token_ids=list(ids)), params, lora_request=lora_request
                )
                added.append(rid)
        except Exception as e:  # a prompt vLLM refuses: its group fails before any step ran
            if added:
                engine.abort_request(added)
            future.set_exception(e)
            return
        if not group.ids:
            future.set_result(([], []))
        for rid in group.ids:
            groups[rid] = group

    def _finish(self, llm, group: _Group) -> None:
        outputs = [group.outputs[rid] for rid in group.ids]
        try:
            rows = collect(llm, group.ids, slot=group.collect) if group.collect else {}
        except Exception as e:  # the hooks failed (reported at collect): this group hears it
            group.future.set_exception(e)
            return
        group.future.set_result((outputs, [rows.get(rid) for rid in group.ids]))

    def _fail_queued(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd is not _STOP and not cmd[2].done():
                cmd[2].set_exception(RuntimeError(f"vLLM's engine has stopped: {self._dead}"))


def collect(
    llm, request_ids: list[str], drop_rest: bool = False, slot: str = "main"
) -> dict[str, Any]:
    """The rows rank 0's hooks (of `slot`) kept for these requests (other ranks hook none)."""
    for blob in llm.collective_rpc("raypipe_collect", args=(request_ids, drop_rest, slot)):
        got = pickle.loads(blob)
        if got is not None:
            return got
    raise RuntimeError("no vLLM worker has raypipe's hooks installed")
