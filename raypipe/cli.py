"""Command line: parse flags into option objects once, validate, then call the pipeline."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import time
from pathlib import Path

from raypipe.engine.generate import GenerationOptions
from raypipe.engine.models import DEVICE_MAPS
from raypipe.errors import OPTIONS, InputError, RaypipeError, user_error
from raypipe.options import (
    BACKENDS,
    HeadOptions,
    InferOptions,
    ModelOptions,
    OutputOptions,
    ProjectionOptions,
    RunOptions,
    ServeOptions,
    split_traits,
)
from raypipe.pipeline.console import session, shown_path
from raypipe.store.paths import ExperimentPaths
from raypipe.store.text import printable
from raypipe.store.vectors import METHOD_PREFERENCE as METHODS

# Option field -> the flag that sets it. Errors below the CLI name option fields (an
# OptionError's field, `field` in a message); printing one, the CLI names the flag instead.
# The modes `capture` and `from_activations` are switches of their own.
FLAGS = {
    "address": "--address",
    "backend": "--backend",
    "batch_size": "--batch-size",
    "cache_dir": "--cache-dir",
    "capture": "--capture",
    "centered": "--centered",
    "compile_prefill": "--compile-prefill",
    "component": "--component",
    "device": "--device",
    "device_map": "--device-map",
    "dtype": "--dtype",
    "experiment": "--experiment",
    "force": "--force",
    "from_activations": "--from-activations",
    "generate_replicas": "--replicas",
    "json_files": "--json",
    "gpus": "--gpus",
    "gpus_per_replica": "--gpus-per-replica",
    "layers": "--layers",
    "load_in_4bit": "--load-in-4bit",
    "max_batch_size": "--batch-size",
    "max_batch_tokens": "--max-batch-tokens",
    "max_new_tokens": "--max-new-tokens",
    "max_tokens": "--max-tokens",
    "method": "--method",
    "model_variant": "--model-variant",
    "num_cpus": "--num-cpus",
    "num_gpus": "--num-gpus",
    "port": "--port",
    "position": "--position",
    "project_replicas": "--replicas",
    "prompt_set": "--prompt-set",
    "quiet": "--quiet",
    "regenerate": "--regenerate",
    "remove_massive_dims": "--remove-massive-dims",
    "root": "--root",
    "seed": "--seed",
    "temperature": "--temperature",
    "tensor_parallel_size": "--tensor-parallel-size",
    "threads": "--threads",
    "timeout": "--timeout",
    "tp": "--tp",
    "trait_set": "--trait-set",
    "traits": "--traits",
    "truncate": "--truncate",
    "val_fraction": "--val-fraction",
    "variant": "--model-variant",
    "verbose": "--verbose",
}
_NAMED = re.compile(r"`([a-z][a-z0-9_]*)`")


def _root(args) -> Path:
    return Path(args.root or os.environ.get("RAYPIPE_ROOT") or ".").resolve()


def _cache(args) -> Path:
    return Path(
        args.cache_dir or os.environ.get("RAYPIPE_CACHE") or "~/.cache/raypipe"
    ).expanduser()


def _model_options(args) -> ModelOptions:
    return ModelOptions(
        dtype=args.dtype,
        device=args.device,
        load_in_4bit=args.load_in_4bit,
        cache_dir=_cache(args),
        variant=args.model_variant,
        device_map=args.device_map,
    )


# `raypipe infer --help` shows its flags in these groups, in this order (as the README lists them).
GROUPS = {
    "data": "what to read",
    "model": "which model, and how to load it",
    "generation": "the responses",
    "projection": "the trait scores",
    "cluster": "where and how wide it runs",
    "output": "what is written and shown",
}


def _groups(p: argparse.ArgumentParser, names=tuple(GROUPS)) -> dict:
    return {name: p.add_argument_group(name, GROUPS[name]) for name in names}


def _common(p: argparse.ArgumentParser, g: dict | None = None) -> None:
    g = g or _groups(p, ("data", "model", "output"))
    data, model = g["data"], g["model"]
    data.add_argument(
        "--root", help="folder holding experiments/ and datasets/ [cwd, $RAYPIPE_ROOT]"
    )
    data.add_argument("--experiment", required=True, help="folder under experiments/ [required]")
    model.add_argument("--model-variant", help="variant from config.json [config default]")
    model.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16 [auto=bf16]")
    model.add_argument("--device", default="auto", help="auto|cpu|cuda [auto]")
    model.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 [off]")
    model.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        help="split the model over the GPUs a worker has (accelerate) [automatic: split "
        "when a worker has several GPUs, e.g. --gpus-per-replica 2 without --tp]",
    )
    model.add_argument(
        "--cache-dir", help="converted-model cache [~/.cache/raypipe, $RAYPIPE_CACHE]"
    )
    g["shown"] = g["output"].add_mutually_exclusive_group()
    g["shown"].add_argument(
        "--quiet", action="store_true", help="no progress and no notes, only the summary [off]"
    )


def _verbose(g: dict, what: str) -> None:
    g["shown"].add_argument(
        "--verbose",
        action="store_true",
        help=f"show {what} live on the console too (the log file gets them either way) [off]",
    )


def _run_flags(p: argparse.ArgumentParser, g: dict) -> None:
    data, gen, cluster, output = g["data"], g["generation"], g["cluster"], g["output"]
    data.add_argument(
        "--prompt-set", required=True, help="path under datasets/inference/ [required]"
    )
    data.add_argument(
        "--truncate",
        action="store_true",
        help="cut prompts longer than the context instead of reporting them [off]",
    )
    gen.add_argument(
        "--regenerate", action="store_true", help="generate even if responses exist [off]"
    )
    gen.add_argument(
        "--max-new-tokens", type=int, default=50, help="tokens to generate per prompt [50]"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    output.add_argument(
        "--json",
        default="all",
        choices=("all", "none"),
        help="per-prompt JSON files beside the Parquet tables (trait-interp reads them); none: "
        "the tables only [all]",
    )
    cluster.add_argument(
        "--backend",
        default="local",
        choices=BACKENDS,
        help="local: load the model in this job | auto: use a `raypipe serve` model server when "
        "one is up for the model, else local | vllm: generate and project in one vLLM engine "
        "(hooks in its model; --capture keeps the HF capture) [local]",
    )
    cluster.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM: ranks per replica, a GPU each (on CPU: cores of their own) [1]",
    )
    cluster.add_argument("--address", help="Ray cluster address [a local Ray on loopback]")
    cluster.add_argument(
        "--replicas", type=int, default=1, help="generation and projection replicas [1]"
    )
    cluster.add_argument("--batch-size", type=int, default=64, help="prompts per batch [64]")
    cluster.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker [all cores; 1 for a CPU model under 4M weights]",
    )
    cluster.add_argument(
        "--gpus-per-replica",
        type=float,
        help="GPUs per actor [1 if the cluster has GPUs when the job starts, else 0]",
    )
    _verbose(g, "Ray's and HF's logs, bars and warnings")


def _component_flag(group) -> None:
    group.add_argument(
        "--component",
        default="residual",
        choices=("residual", "attn_contribution"),
        help="hooked output [residual]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "infer",
        help="generate, then project every token onto trait vectors",
        usage="raypipe infer --experiment E --prompt-set P [flags]",
        description="Generate responses, then project every token's hidden state onto trait "
        "vectors. Defaults in brackets.",
    )
    g = _groups(p)
    _common(p, g)
    _run_flags(p, g)
    proj = g["projection"]
    proj.add_argument(
        "--layers",
        default="best,best+5",
        help="best, best+N, best-N, N, A-B, A-B:S, P%%-Q%%, all [best,best+5]",
    )
    proj.add_argument("--traits", help="comma list of category/name [all extracted]")
    proj.add_argument("--method", choices=METHODS, help="only this method [best of all]")
    _component_flag(proj)
    proj.add_argument(
        "--centered", action="store_true", help="subtract each vector's baseline [off]"
    )
    proj.add_argument(
        "--remove-massive-dims",
        action="store_true",
        help="also write scores with calibrated massive dims removed [off]",
    )
    g["output"].add_argument(
        "--force", action="store_true", help="overwrite existing projection files [off]"
    )
    proj.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="prefill token budget [16384]"
    )
    proj.add_argument(
        "--compile-prefill",
        action="store_true",
        help="torch.compile the decoder blocks for the prefill: faster on long runs, after a "
        "one-off compile per worker (about 15 s on the embedded model) [off]",
    )
    g["cluster"].add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks per projection replica (a model too big for one device) [1]",
    )
    mode = proj.add_mutually_exclusive_group()
    mode.add_argument(
        "--capture", action="store_true", help="save raw activations, no projection [off]"
    )
    mode.add_argument(
        "--from-activations",
        action="store_true",
        help="project saved raw activations (no model) [off]",
    )

    p = sub.add_parser(
        "generate",
        help="generate responses only",
        usage="raypipe generate --experiment E --prompt-set P [flags]",
        description="Generate responses only. Defaults in brackets.",
    )
    g = _groups(p, ("data", "model", "generation", "cluster", "output"))
    _common(p, g)
    _run_flags(p, g)

    p = sub.add_parser(
        "serve", help="keep the experiment's model loaded on a running Ray cluster (--backend auto)"
    )
    _common(p)
    p.add_argument(
        "--address",
        help="Ray cluster address [$RAY_ADDRESS, else the `ray start` / `raypipe head` cluster "
        "running on this machine]",
    )
    p.add_argument("--gpus", type=float, help="GPUs for the server [1 if the cluster has GPUs]")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads in the server [all cores; 1 for a CPU model under 4M weights]",
    )
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds to wait for the model to load [1800]"
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--stop", action="store_true", help="stop the server for this model")
    action.add_argument(
        "--status", action="store_true", help="say whether one is up; exit 1 if not"
    )

    p = sub.add_parser(
        "head",
        help="start a Ray head on loopback for `raypipe serve` on this machine (`ray start "
        "--head`, kept to loopback and offline); --stop stops that head only",
    )
    p.add_argument("--port", type=int, default=6379, help="GCS port [6379]")
    p.add_argument("--num-cpus", type=int, help="CPUs the head offers [all]")
    p.add_argument("--num-gpus", type=int, help="GPUs the head offers [all visible]")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--stop", action="store_true", help="stop the head raypipe started")
    action.add_argument("--status", action="store_true", help="say whether it runs; exit 1 if not")

    p = sub.add_parser(
        "extract",
        help="compute mean_diff and probe vectors from contrastive pairs",
        usage="raypipe extract --experiment E [flags]",
        description="Compute mean_diff and probe vectors at every layer from contrastive pairs. "
        "Defaults in brackets.",
    )
    g = _groups(p, ("data", "model", "projection", "cluster", "output"))
    _common(p, g)
    data, out = g["data"], g["output"]
    data.add_argument(
        "--trait-set",
        default="starter_traits",
        help="category folder under datasets/traits/ whose traits ({set}/{name}) to extract "
        "[starter_traits]",
    )
    data.add_argument("--traits", help="comma list of category/name [all in the trait set]")
    proj = g["projection"]
    _component_flag(proj)
    proj.add_argument(
        "--position", default="response[:]", help="token positions to average [response[:]]"
    )
    proj.add_argument(
        "--val-fraction", type=float, default=0.25, help="pairs held out for validation [0.25]"
    )
    proj.add_argument("--seed", type=int, default=0, help="seed of the train/validation split [0]")
    g["cluster"].add_argument("--batch-size", type=int, default=32, help="pairs per forward [32]")
    out.add_argument("--force", action="store_true", help="recompute vectors that exist [off]")
    _verbose(g, "HF's logs, bars and warnings")

    p = sub.add_parser("calibrate", help="find massive activation dims on a neutral prompt set")
    _common(p)
    p.add_argument(
        "--prompt-set",
        default="neutral/calibration",
        help="path under datasets/inference/ [neutral/calibration]",
    )
    p.add_argument("--max-tokens", type=int, default=5000, help="prefill token budget [5000]")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    p.add_argument("--force", action="store_true", help="recompute an existing calibration")

    p = sub.add_parser("status", help="count finished, missing and stray files (no Ray, no model)")
    p.add_argument("--root", help="folder holding experiments/ and datasets/ [cwd, $RAYPIPE_ROOT]")
    p.add_argument("--experiment", required=True)
    p.add_argument("--prompt-set", required=True, help="under datasets/inference/, comma list")
    p.add_argument("--model-variant", help="variant from config.json [config default]")
    p.add_argument("--cache-dir", help="converted-model cache [~/.cache/raypipe, $RAYPIPE_CACHE]")
    p.add_argument("--layers", default="best,best+5", help="as for infer [best,best+5]")
    p.add_argument("--traits", help="comma list of category/name [all extracted]")
    p.add_argument("--method", choices=METHODS, help="only this method [best of all]")
    p.add_argument("--component", default="residual", choices=("residual", "attn_contribution"))
    p.add_argument("--json", action="store_true", help="print the counts as JSON")

    p = sub.add_parser("viz", help="serve the dashboard over an experiments tree")
    p.add_argument("--root", help="folder holding experiments/ [cwd, $RAYPIPE_ROOT]")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    return parser


def _mode(args) -> str:
    if args.command == "generate":
        return "generate"
    if getattr(args, "capture", False):
        return "capture"
    return "from_activations" if getattr(args, "from_activations", False) else "stream"


def infer_options(args) -> InferOptions:
    return InferOptions(
        output=OutputOptions(
            root=_root(args),
            experiment=args.experiment,
            prompt_set=args.prompt_set,
            regenerate=args.regenerate,
            force=getattr(args, "force", False),
            truncate=args.truncate,
            json_files=args.json,
        ),
        model=_model_options(args),
        generation=GenerationOptions(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            max_batch_size=args.batch_size,
        ),
        projection=ProjectionOptions(
            component=getattr(args, "component", "residual"),
            layers=getattr(args, "layers", "best"),
            traits=split_traits(getattr(args, "traits", None)),
            method=getattr(args, "method", None),
            centered=getattr(args, "centered", False),
            remove_massive_dims=getattr(args, "remove_massive_dims", False),
            max_batch_tokens=getattr(args, "max_batch_tokens", 16384),
            compile_prefill=getattr(args, "compile_prefill", False),
        ),
        run=RunOptions(
            address=args.address,
            generate_replicas=args.replicas,
            project_replicas=args.replicas,
            batch_size=args.batch_size,
            threads=args.threads,
            backend=args.backend,
            quiet=args.quiet,
            gpus_per_replica=args.gpus_per_replica,
            tensor_parallel_size=args.tensor_parallel_size,
            tp=getattr(args, "tp", 1),
        ),
        mode=_mode(args),
    )


def cmd_infer(args) -> int:
    from raypipe.engine.models import check_packages
    from raypipe.pipeline.job import run_infer
    from raypipe.pipeline.plan import plan_infer
    from raypipe.pipeline.report import print_summary

    opts = infer_options(args)  # every pair of flags is checked here
    project = opts.mode != "generate"
    plan = plan_infer(opts, need_vectors=project)  # and those that need the model variant
    if opts.mode != "from_activations":  # what the workers will import (peft for a LoRA)
        check_packages(plan.model.spec.load_in_4bit, plan.model.spec.lora)
    log = plan.paths.run_log(plan.variant, plan.prompts.name, args.command, _stamp())
    with session(log, quiet=args.quiet, verbose=args.verbose) as con:
        summary = run_infer(plan)
    tables = opts.mode in ("stream", "from_activations")
    print_summary(plan, summary, traits_table=tables, log_file=con.log_path)
    return 1 if summary.failed else 0


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def cmd_extract(args) -> int:
    from raypipe.extract import ExtractOptions, run_extract

    traits = split_traits(args.traits)
    opts = ExtractOptions(
        root=_root(args),
        experiment=args.experiment,
        trait_set=args.trait_set,
        traits=traits,
        component=args.component,
        position=args.position,
        val_fraction=args.val_fraction,
        seed=args.seed,
        batch_size=args.batch_size,
        force=args.force,
        model=_model_options(args),
    )
    log = ExperimentPaths(opts.root, opts.experiment).extract_log(_stamp())
    with session(log, quiet=args.quiet, verbose=args.verbose) as con:
        run_extract(opts, out=io.StringIO() if args.quiet else con.out, console=con)
    if con.log_path is not None and not args.quiet:
        print(f"  log: {printable(shown_path(con.log_path))}")
    return 0


def cmd_calibrate(args) -> int:
    from raypipe.calibrate import run_calibrate

    run_calibrate(
        _root(args),
        args.experiment,
        args.prompt_set,
        model=_model_options(args),
        max_tokens=args.max_tokens,
        force=args.force,
        batch_size=args.batch_size,
        out=io.StringIO() if args.quiet else None,
    )
    return 0


def cmd_serve(args) -> int:
    import ray

    from raypipe.engine.models import check_packages, resolve_model_path
    from raypipe.pipeline import localray, server
    from raypipe.pipeline.plan import plan_serve

    opts = ServeOptions(
        model=_model_options(args),
        gpus=args.gpus,
        threads=args.threads,
        timeout=args.timeout,
        action="stop" if args.stop else "status" if args.status else "start",
    )
    _, info = plan_serve(_root(args), args.experiment, opts.model)
    spec, name = info.spec, server.server_name(info.spec)
    if opts.action == "start":
        check_packages(spec.load_in_4bit, spec.lora)  # here, not in the server after Ray starts
        resolve_model_path(spec.model, spec.cache_dir)  # convert an alias here, once
    address, source = args.address, "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    if not address:
        address, source = localray.started_cluster(), "the `ray start` cluster on this machine"
    if not address:
        raise RaypipeError(
            "serve: no Ray cluster runs on this machine to hold the server; start one with "
            "`raypipe head`, or pass --address"
        )
    localray.join(address, source, log_to_driver=False, logging_level="WARNING")
    try:
        if opts.action == "stop":
            stopped = server.stop_server(spec)
            print(f"{'stopped' if stopped else 'no'} model server {name} for {spec.model}")
            return 0
        if opts.action == "status":
            handle, found = server.find_server(spec)
            print(server.describe(name, found) if handle is not None else found)
            return 0 if handle is not None else 1
        gpus = opts.gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        _, found, started = server.start_server(
            spec, gpus, threads=opts.threads, timeout_s=opts.timeout
        )
        print(f"{'started' if started else 'already up:'} {server.describe(name, found)}")
        variant = f" --model-variant {args.model_variant}" if args.model_variant else ""
        print(
            "jobs use it with --backend auto; stop it with: "
            f"raypipe serve --experiment {args.experiment}{variant} --stop"
        )
        return 0
    finally:
        ray.shutdown()


def cmd_head(args) -> int:
    from raypipe.pipeline import localray

    if args.stop:
        stopped = localray.stop_head()
        print(f"stopped the Ray head at {stopped['address']}" if stopped else "no head was up")
        return 0
    status = localray.head_status()
    if args.status:
        print(
            f"Ray head at {status['address']} ({len(status['pids'])} processes)"
            if status
            else "no raypipe head runs"
        )
        return 0 if status else 1
    opts = HeadOptions(port=args.port, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    address = localray.start_head(opts.port, opts.num_cpus, opts.num_gpus)
    print(
        f"started a Ray head at {address} (loopback only); `raypipe serve` and "
        "`--backend auto` jobs on this machine use it; stop it with: raypipe head --stop"
    )
    return 0


def _flags_in(text: str) -> str:
    """`field` in a message -> that field's flag (names that are no option keep their quotes)."""
    return _NAMED.sub(lambda m: FLAGS.get(m.group(1), m.group(0)), text)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, RaypipeError):
        # A read-only tree, a full disk, a folder that vanished: the file and the reason.
        where = f"{e.filename}: " if e.filename else ""
        # strerror may carry Ray's retry annotations; errno is the cause itself.
        return f"{where}{os.strerror(e.errno) if e.errno else e.strerror or e}"
    if isinstance(e, InputError):
        where, field = e.where, e.field
        if where == OPTIONS and field in FLAGS:
            # An option's error names the flag that set it, then the flag's own name:
            # `--replicas: replicas:` for generate_replicas, as the user typed it.
            where = FLAGS[field]
            field = where.removeprefix("--").replace("-", "_")
        text = f"{where}: {field}: {_flags_in(e.message)}"
    else:
        text = _flags_in(str(e))
    text = text.strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # raypipe never downloads weights
    try:
        if args.command in ("infer", "generate"):
            return cmd_infer(args)
        if args.command == "extract":
            return cmd_extract(args)
        if args.command == "calibrate":
            return cmd_calibrate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "head":
            return cmd_head(args)
        if args.command == "status":
            from raypipe.status import main_status

            return main_status(args, _root(args), _cache(args))
        if args.command == "viz":
            from raypipe.viz.server import main as viz_main

            viz = ["--root", str(_root(args)), "--host", args.host, "--port", str(args.port)]
            return viz_main(viz)
    except Exception as e:
        # Raised inside a Ray worker, the cause arrives wrapped (RayTaskError,
        # UserCodeException): print the cause in one line, not the remote traceback. Anything
        # else is a bug, and keeps its traceback.
        cause = user_error(e)
        if cause is None:
            raise
        print(f"raypipe: error: {printable(_one_line(cause))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raypipe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
