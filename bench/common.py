"""Shared benchmark helpers: models (embedded or random real shapes), timing, token batches."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
    ),
}


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-weights", action="store_true", help="random model of --shape")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    return p


def load(args):
    """(model, pad_id) on args.device: the embedded model, or random weights of a real shape."""
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        from raypipe.engine.hostmem import tune_host_allocator

        if args.device == "cpu":
            tune_host_allocator()  # as load_model does for raypipe (off: RAYPIPE_MALLOC_TUNING=0)

        cfg = LlamaConfig(**SHAPES[args.shape], pad_token_id=0)
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(old)
        return model.eval(), 0
    from raypipe.engine.models import ModelSpec, load_model

    spec = ModelSpec(
        "smollm2-135m-instruct",
        Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser(),
        dtype=args.dtype,
        device=args.device,
    )
    model, tok = load_model(spec)
    return model, tok.pad_token_id or 0


def token_batches(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Rounds:
    """Wall times of candidates timed side by side: `rounds` rounds, and within a round every
    candidate runs each unit of work (a batch, say) right after the others did, in an order that
    rotates. These VMs drift by up to 2x over tens of seconds (measured: a full pass took 3.4 s
    in one round and 6.1 s two rounds earlier), so a ratio is only trusted where both sides ran
    under the same conditions: each round gives one ratio, and a ratio is their median."""

    def __init__(self, fns: dict, device: str, rounds: int, units: int = 1):
        self.names = list(fns)
        for name in self.names:  # warm-up: one pass over every unit
            for i in range(units):
                fns[name](i)
        sync(device)
        self.times: list[dict[str, float]] = []
        n = len(self.names)
        for r in range(rounds):
            tot = dict.fromkeys(self.names, 0.0)
            for i in range(units):
                k = (r + i) % n
                for name in self.names[k:] + self.names[:k]:
                    t = time.perf_counter()
                    fns[name](i)
                    sync(device)
                    tot[name] += time.perf_counter() - t
            self.times.append(tot)

    def seconds(self, name) -> float:
        """Median over rounds of the candidate's time for all units."""
        return statistics.median(t[name] for t in self.times)

    def ratio(self, a, b) -> float:
        """Median over rounds of time(a) / time(b)."""
        return statistics.median(t[a] / t[b] for t in self.times)

    def spread(self, a, b) -> tuple[float, float]:
        ratios = [t[a] / t[b] for t in self.times]
        return min(ratios), max(ratios)


class Elsewhere:
    """Candidates that run in a second process, started fresh (spawn) with `env` added, and are
    called from this one batch by batch: `build(args)` there returns {name: fn(unit)}, and
    `self[name]` here is a function of a unit that runs it there and waits, so it can take its
    turn in `Rounds` beside local candidates. Used to time the common ways as a user's own
    script runs them: without raypipe's allocator settings (RAYPIPE_MALLOC_TUNING=0)."""

    def __init__(self, build, args, env: dict[str, str]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fork would inherit this process's malloc settings
        self.conn, theirs = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.proc = ctx.Process(target=_serve, args=(build, args, theirs), daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.names = self._reply()  # sent once the model is loaded

    def _call(self, msg):
        self.conn.send(msg)
        return self._reply()

    def _reply(self):
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark process failed: {value}")
        return value

    def __getitem__(self, name):
        return lambda unit: self._call((name, unit))

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(timeout=60)


def _serve(build, args, conn) -> None:
    try:
        fns = build(args)
    except Exception as e:  # report, so the parent does not wait forever
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", list(fns)))
    while (msg := conn.recv()) != "stop":
        name, unit = msg
        try:
            value = fns[name](unit)
            sync(args.device)
            conn.send(("ok", value))
        except Exception as e:
            conn.send(("error", f"{name}: {type(e).__name__}: {e}"))


def emit(result: dict) -> None:
    """Last line of every benchmark: one JSON object of its ratios."""
    print(json.dumps(result))
