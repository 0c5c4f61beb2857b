"""Option objects: every flag pair refused where the options are built, errors that name option
fields (never CLI flags), and the one table through which the CLI prints flags instead."""

from __future__ import annotations

import ast
import dataclasses
import pickle
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from raypipe import cli
from raypipe.engine import vllm_backend
from raypipe.engine.generate import GenerationOptions
from raypipe.engine.models import ModelSpec, check_packages
from raypipe.errors import OPTIONS, InputError, MissingDependency, OptionError
from raypipe.extract import ExtractOptions
from raypipe.options import (
    HeadOptions,
    InferOptions,
    ModelOptions,
    OutputOptions,
    ProjectionOptions,
    RunOptions,
    ServeOptions,
    split_traits,
)
from raypipe.pipeline import localray

RAYPIPE = Path(cli.__file__).parent
OUT = OutputOptions(root=Path("/nonexistent"), experiment="e", prompt_set="p")
# Subcommand flags that set no option field: actions of their command, or viz's own.
NOT_OPTIONS = {"-h", "--help", "--stop", "--status", "--host"}  # status's --json is a bool
# Option fields no flag sets: from the experiment config, fixed defaults, nested objects; the
# mode comes from the command and the --capture / --from-activations switches.
NO_FLAG = {
    "action",  # serve's --stop / --status
    "model",
    "lora",
    "top_p",
    "sort_by_length",
    "max_padding",
    "early_stop",
    "mode",
    "output",
    "generation",
    "projection",
    "run",
}
OPTION_CLASSES = (
    ModelSpec,
    ModelOptions,
    GenerationOptions,
    ProjectionOptions,
    OutputOptions,
    RunOptions,
    InferOptions,
    ServeOptions,
    HeadOptions,
    ExtractOptions,
)


def _infer(mode="stream", model=None, projection=None, run=None, **output) -> InferOptions:
    return InferOptions(
        output=dataclasses.replace(OUT, **output),
        model=model or ModelOptions(),
        projection=projection or ProjectionOptions(),
        run=run or RunOptions(),
        mode=mode,
    )


@pytest.fixture
def vllm_installed(monkeypatch):
    """The vLLM checks ask only whether it is installed; here it is, whatever the machine."""
    monkeypatch.setattr(vllm_backend, "available", lambda: True)


# ---------------------------------------------------------------- the flag table


def _parser_flags() -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    return {
        flag
        for command in sub.choices.values()
        for action in command._actions
        for flag in action.option_strings
    }


def test_every_table_flag_is_a_flag_and_every_flag_is_in_the_table():
    flags = _parser_flags()
    assert set(cli.FLAGS.values()) <= flags
    assert flags - NOT_OPTIONS == set(cli.FLAGS.values())


def test_every_option_field_has_a_flag_or_is_known_to_have_none():
    fields = {f.name for cls in OPTION_CLASSES for f in dataclasses.fields(cls)}
    assert fields - NO_FLAG <= set(cli.FLAGS), sorted(fields - NO_FLAG - set(cli.FLAGS))
    assert not NO_FLAG & set(cli.FLAGS)


def test_the_table_follows_the_flag_names():
    # A field named like its flag maps to it; the few renamed ones are listed here.
    renamed = {
        "variant": "--model-variant",
        "generate_replicas": "--replicas",
        "project_replicas": "--replicas",
        "max_batch_size": "--batch-size",
        "json_files": "--json",
    }
    for name, flag in cli.FLAGS.items():
        assert flag == renamed.get(name, "--" + name.replace("_", "-")), name


# ---------------------------------------------------------------- errors name fields


BAD_SINGLE = [
    (lambda: ModelOptions(dtype="float8"), "dtype", "must be one of"),
    (lambda: ModelOptions(device="tpu"), "device", "unknown device"),
    (lambda: ModelOptions(device="cuda:x"), "device", "unknown device"),
    (lambda: ModelOptions(device_map="gpu"), "device_map", "must be one of"),
    (lambda: ModelOptions(device="cuda:1", device_map="auto"), "device_map", "`device` cuda:1"),
    (lambda: ModelSpec("m", Path("/c"), dtype="int8"), "dtype", "must be one of"),
    (lambda: GenerationOptions(max_new_tokens=0), "max_new_tokens", "at least 1"),
    (lambda: GenerationOptions(temperature=float("nan")), "temperature", ">= 0"),
    (lambda: GenerationOptions(top_p=0), "top_p", "(0, 1]"),
    (lambda: GenerationOptions(seed=2**64), "seed", "64 bits"),
    (lambda: GenerationOptions(max_batch_size=0), "max_batch_size", "at least 1"),
    (lambda: GenerationOptions(max_padding=2), "max_padding", "[0, 1]"),
    (lambda: ProjectionOptions(component="mlp"), "component", "must be one of"),
    (
        lambda: ProjectionOptions(component="attn_contribution", compile_prefill=True),
        "compile_prefill",
        "`component` residual",
    ),
    (lambda: ProjectionOptions(traits=("alpha",)), "traits", "part/part"),
    (lambda: ProjectionOptions(method="svm"), "method", "probe, mean_diff or gradient"),
    (lambda: ProjectionOptions(max_batch_tokens=0), "max_batch_tokens", "at least 1"),
    (lambda: dataclasses.replace(OUT, experiment="../e"), "experiment", "not a safe name"),
    (lambda: dataclasses.replace(OUT, prompt_set=""), "prompt_set", "non-empty"),
    (lambda: RunOptions(generate_replicas=0), "generate_replicas", "at least 1"),
    (lambda: RunOptions(tensor_parallel_size=0), "tensor_parallel_size", "at least 1"),
    (lambda: RunOptions(gpus_per_replica=65), "gpus_per_replica", "0..64"),
    (lambda: RunOptions(threads=0), "threads", "at least 1"),
    (lambda: RunOptions(tp=0), "tp", "1..64"),
    (lambda: RunOptions(backend="tpu"), "backend", "must be one of"),
    (lambda: _infer(mode="project"), "mode", "must be one of"),
    (lambda: ServeOptions(gpus=-1), "gpus", "0..64"),
    (lambda: ServeOptions(timeout=float("nan")), "timeout", "more than 0"),
    (lambda: ServeOptions(action="restart"), "action", "start, stop or status"),
    (lambda: HeadOptions(port=80), "port", "1024..65535"),
    (lambda: HeadOptions(num_gpus=-1), "num_gpus", "at least 0"),
    (lambda: ExtractOptions(Path("/r"), "e", batch_size=0), "batch_size", "at least 1"),
    (lambda: ExtractOptions(Path("/r"), "e", seed=-1), "seed", "at least 0"),
    (lambda: ExtractOptions(Path("/r"), "e", trait_set="a/../b"), "trait_set", "safe name"),
    (lambda: ExtractOptions(Path("/r"), "e", component="mlp"), "component", "must be one of"),
    (lambda: split_traits(" , "), "traits", "names no trait"),
]


@pytest.mark.parametrize("build, field, fragment", BAD_SINGLE, ids=[c[1] for c in BAD_SINGLE])
def test_a_bad_value_is_an_option_error_naming_its_field(build, field, fragment):
    with pytest.raises(InputError) as err:
        build()
    assert (err.value.where, err.value.field) == (OPTIONS, field)
    assert fragment in err.value.message
    assert "--" not in str(err.value)


PAIRS = [
    (
        dict(projection=ProjectionOptions(compile_prefill=True), run=RunOptions(tp=2)),
        "compile_prefill",
        "does not combine with `tp`",
    ),
    (
        dict(model=ModelOptions(device_map="auto"), run=RunOptions(tp=2)),
        "device_map",
        "`tp` shards each layer",
    ),
    (dict(run=RunOptions(backend="auto", tp=2)), "backend", "not with `tp`"),
    (
        dict(mode="from_activations", regenerate=True),
        "regenerate",
        "no model runs with `from_activations`",
    ),
    (dict(mode="capture", run=RunOptions(tp=2)), "tp", "not with `capture`"),
    (dict(mode="from_activations", run=RunOptions(tp=2)), "tp", "not with `from_activations`"),
    (dict(mode="generate", run=RunOptions(tp=2)), "tp", "not with `generate`"),
    (
        dict(model=ModelOptions(load_in_4bit=True), run=RunOptions(tp=2)),
        "tp",
        "does not combine with `load_in_4bit`",
    ),
    (
        dict(
            projection=ProjectionOptions(compile_prefill=True), run=RunOptions(gpus_per_replica=2)
        ),
        "compile_prefill",
        "`gpus_per_replica` 2 splits it",
    ),
    (
        dict(
            mode="capture",
            model=ModelOptions(device_map="balanced"),
            projection=ProjectionOptions(compile_prefill=True),
            run=RunOptions(gpus_per_replica=4),
        ),
        "compile_prefill",
        "splits it by layers",
    ),
    (
        dict(run=RunOptions(tensor_parallel_size=2)),
        "tensor_parallel_size",
        "shards vLLM's engine: give `backend` vllm",
    ),
    (dict(run=RunOptions(backend="vllm", tp=2)), "tp", "use `tensor_parallel_size`"),
    (
        dict(run=RunOptions(backend="vllm", tensor_parallel_size=2, gpus_per_replica=0.5)),
        "gpus_per_replica",
        "0.5: with `tensor_parallel_size` 2 each rank holds one whole GPU",
    ),
]


@pytest.mark.parametrize("kwargs, field, fragment", PAIRS, ids=[f"{p[1]}-{p[2]}" for p in PAIRS])
def test_a_bad_pair_is_refused_by_infer_options(kwargs, field, fragment):
    with pytest.raises(OptionError) as err:
        _infer(**kwargs)
    assert err.value.field == field and fragment in err.value.message


def test_backend_vllm_without_vllm_is_refused(monkeypatch):
    """(vLLM is installed in .venv: the machine without it is pretended here.)"""
    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    with pytest.raises(OptionError, match="backend: vllm is not installed"):
        _infer(run=RunOptions(backend="vllm"))


def test_vllm_pairs_are_refused_by_infer_options(vllm_installed):
    with pytest.raises(OptionError, match="load_in_4bit: bitsandbytes NF4 is not served"):
        _infer(model=ModelOptions(load_in_4bit=True), run=RunOptions(backend="vllm"))
    with pytest.raises(OptionError, match=r"seed: must be in 0\.\.4294967295 with `backend`"):
        InferOptions(
            output=OUT, generation=GenerationOptions(seed=2**32), run=RunOptions(backend="vllm")
        )
    _infer(run=RunOptions(backend="vllm"))  # the pair alone is fine
    InferOptions(output=OUT, generation=GenerationOptions(seed=-1))  # and so is -1 for torch


@pytest.mark.parametrize(
    "device, gpus, seen",
    [
        ("cuda:1", None, "1 GPU(s) it is given (`gpus_per_replica` unset), as cuda:0"),
        ("cuda:2", 2, "2 GPU(s) it is given (`gpus_per_replica` 2), as cuda:0 to cuda:1"),
        ("cuda:1", 0.5, "1 GPU(s)"),
    ],
)
def test_a_pinned_gpu_must_be_one_the_actor_sees(device, gpus, seen):
    with pytest.raises(OptionError) as err:
        _infer(model=ModelOptions(device=device), run=RunOptions(gpus_per_replica=gpus))
    assert err.value.field == "device" and seen in err.value.message
    with pytest.raises(OptionError, match="`gpus` 1"):
        ServeOptions(model=ModelOptions(device=device), gpus=1)
    ServeOptions(model=ModelOptions(device=device), gpus=1, action="stop")  # names the model


def test_a_pinned_gpu_the_actor_sees_passes():
    _infer(model=ModelOptions(device="cuda:1"), run=RunOptions(gpus_per_replica=2))
    _infer(model=ModelOptions(device="cuda:0"))
    # an actor given no GPU sees the node's; TP ranks, vLLM and a server place it themselves
    _infer(model=ModelOptions(device="cuda:3"), run=RunOptions(gpus_per_replica=0))
    _infer(model=ModelOptions(device="cuda:1"), run=RunOptions(tp=2))
    _infer(model=ModelOptions(device="cuda:1"), run=RunOptions(backend="auto"))
    ServeOptions(model=ModelOptions(device="cuda:1"), gpus=2)


def test_pairs_that_hold_pass():
    _infer(run=RunOptions(tp=2))
    _infer(model=ModelOptions(load_in_4bit=True, device_map="auto"))
    _infer(projection=ProjectionOptions(compile_prefill=True), run=RunOptions(gpus_per_replica=1))
    # one device however many GPUs: a CPU run, or a pinned GPU
    _infer(
        model=ModelOptions(device="cpu"),
        projection=ProjectionOptions(compile_prefill=True),
        run=RunOptions(gpus_per_replica=2),
    )
    _infer(mode="generate", projection=ProjectionOptions(compile_prefill=True))


def test_from_activations_loads_no_model_so_load_options_are_not_checked(vllm_installed):
    _infer(
        mode="from_activations",
        model=ModelOptions(load_in_4bit=True),
        projection=ProjectionOptions(compile_prefill=True),
        run=RunOptions(backend="vllm", gpus_per_replica=2),
    )


def test_a_missing_quantization_package_is_refused_with_the_options(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(MissingDependency, match="`load_in_4bit` needs the 'bitsandbytes'"):
        _infer(model=ModelOptions(load_in_4bit=True))
    _infer(mode="from_activations", model=ModelOptions(load_in_4bit=True))


# ---------------------------------------------------------------- pairs with the variant


def test_check_variant_reads_the_model_config_for_tp(tiny_model_dir):
    spec = ModelOptions().spec(str(tiny_model_dir), None)
    _infer(run=RunOptions(tp=2)).check_variant(spec)
    with pytest.raises(OptionError, match="tp: num_attention_heads=4 does not divide by 3"):
        _infer(run=RunOptions(tp=3)).check_variant(spec)
    with pytest.raises(OptionError, match="tp: num_key_value_heads=2 does not divide by 4"):
        _infer(run=RunOptions(tp=4)).check_variant(spec)


def test_check_variant_reads_the_model_config_for_vllm_tp(tiny_model_dir, vllm_installed):
    """vLLM shards heads evenly and key/value heads evenly or by whole replicas (4 query and
    2 key/value heads here), and the MLP (128 wide) evenly."""
    spec = ModelOptions().spec(str(tiny_model_dir), None)

    def run(n: int) -> RunOptions:  # on a cluster: the cores of this machine do not matter
        return RunOptions(address="127.0.0.1:6379", backend="vllm", tensor_parallel_size=n)

    for n in (1, 2, 4):
        _infer(run=run(n)).check_variant(spec)
    bad = {3: "num_attention_heads=4 does not divide by it", 8: "num_attention_heads=4"}
    for n, fragment in bad.items():
        with pytest.raises(OptionError, match=f"tensor_parallel_size: {n}: the model's {fragment}"):
            _infer(run=run(n)).check_variant(spec)
    cfg = SimpleNamespace(num_attention_heads=6, num_key_value_heads=4, intermediate_size=96)
    with pytest.raises(OptionError, match="num_key_value_heads=4 neither divides by it nor"):
        vllm_backend.check_tensor_parallel(cfg, 3)
    with pytest.raises(OptionError, match="num_key_value_heads=4 neither divides by it nor"):
        vllm_backend.check_tensor_parallel(cfg, 6)
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, intermediate_size=90)
    with pytest.raises(OptionError, match="intermediate_size=90 does not divide by it"):
        vllm_backend.check_tensor_parallel(cfg, 4)


def test_vllm_ranks_env_keeps_to_loopback_and_splits_the_cores():
    """What a vLLM engine's ranks are started with (set only where the user set nothing)."""
    lo = localray.loopback_interface()
    one = vllm_backend.rank_env(1, cpu=True, cores=[0])
    assert one == {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": lo}
    two = vllm_backend.rank_env(2, cpu=True, cores=[0, 1])
    assert two == {**one, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    gpu = vllm_backend.rank_env(2, cpu=False, cores=[0])
    assert gpu == {**one, "NCCL_SOCKET_IFNAME": lo}
    given = vllm_backend.rank_env(2, True, [0], given={"VLLM_CPU_OMP_THREADS_BIND": "0|0"})
    assert given == one  # the user's binding, however few cores, is theirs
    assert vllm_backend.cpu_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert vllm_backend.cpu_binding(2, [4, 5, 6]) == "4|5"  # the odd core serves the engine
    with pytest.raises(OptionError, match="tensor_parallel_size: 3 ranks on CPU need a core each"):
        vllm_backend.cpu_binding(3, [0, 1])


def test_check_variant_refuses_lora_with_tp_and_a_hub_lora_with_vllm(tmp_path, vllm_installed):
    lora = ModelOptions().spec("m", "someone/adapter")
    with pytest.raises(OptionError, match="tp: tensor parallelism does not support LoRA"):
        _infer(run=RunOptions(tp=2)).check_variant(lora)
    with pytest.raises(InputError) as err:
        _infer(run=RunOptions(backend="vllm")).check_variant(lora)
    assert (err.value.where, err.value.field) == ("someone/adapter", "lora")
    assert "`backend` vllm needs a local PEFT folder" in err.value.message
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    _infer(run=RunOptions(backend="vllm")).check_variant(ModelOptions().spec("m", str(folder)))
    _infer(mode="from_activations", run=RunOptions(backend="vllm")).check_variant(lora)


# ---------------------------------------------------------------- the CLI prints flags


@pytest.mark.parametrize(
    "error, line",
    [
        (OptionError("dtype", "must be one of x"), "--dtype: dtype: must be one of x"),
        # the flag's own name after it, as the user typed it
        (OptionError("generate_replicas", "must be at least 1"), "--replicas: replicas: must"),
        (OptionError("max_batch_size", "must be at least 1"), "--batch-size: batch_size: must"),
        (OptionError("variant", "unknown"), "--model-variant: model_variant: unknown"),
        (
            OptionError("tp", "projects in stream mode only, not with `from_activations`"),
            "--tp: tp: projects in stream mode only, not with --from-activations",
        ),
        (
            OptionError("load_in_4bit", "not served by `backend` vllm; use `backend` local"),
            "--load-in-4bit: load_in_4bit: not served by --backend vllm; use --backend local",
        ),
        # backticks around what is no option stay as they are; a field without a flag stays
        (OptionError("backend", "run `make vllm`"), "--backend: backend: run `make vllm`"),
        (OptionError("top_p", "must be in (0, 1]"), "options: top_p: must be in (0, 1]"),
        # a file's error keeps its file, and gets flags in its message
        (InputError("/a/b", "lora", "`backend` vllm needs x"), "/a/b: lora: --backend vllm needs"),
        (MissingDependency("vllm", "`backend` vllm", "vllm"), "--backend vllm needs the 'vllm'"),
    ],
)
def test_the_cli_prints_the_flag_for_a_field(error, line):
    assert cli._one_line(error).startswith(line)


def test_the_cli_prints_a_dependency_by_its_flag(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependency) as err:
        check_packages(True, None)
    line = cli._one_line(err.value)
    assert line == "--load-in-4bit needs the 'bitsandbytes' package: pip install 'raypipe[quant]'"


def test_an_option_error_from_a_ray_worker_arrives_whole():
    err = OptionError("tp", "does not combine with `load_in_4bit`")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is OptionError
    assert (back.where, back.field, back.message, str(back)) == (
        err.where,
        err.field,
        err.message,
        str(err),
    )


@pytest.mark.parametrize(
    "extra, mode",
    [
        ([], "stream"),
        (["--capture"], "capture"),
        (["--from-activations"], "from_activations"),
    ],
)
def test_infer_options_take_the_mode_from_the_command(extra, mode):
    base = ["--experiment", "e", "--prompt-set", "p"]
    args = cli.build_parser().parse_args(["infer", *base, *extra])
    assert cli.infer_options(args).mode == mode
    args = cli.build_parser().parse_args(["generate", *base])
    assert cli.infer_options(args).mode == "generate"


# ---------------------------------------------------------------- no flags below the CLI


def _raised_strings(tree: ast.AST):
    """(line, text) of every string inside a raise statement (f-string parts included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


def _all_strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def _flags(text: str) -> set[str]:
    """raypipe's flags in `text` (`pip install --no-deps` is not one)."""
    return set(FLAG.findall(text)) & _parser_flags()


BELOW_THE_CLI = [
    *sorted((RAYPIPE / "engine").glob("*.py")),
    RAYPIPE / "extract.py",
    RAYPIPE / "calibrate.py",
    RAYPIPE / "status.py",
]


@pytest.mark.parametrize("path", BELOW_THE_CLI, ids=lambda p: p.name)
def test_errors_below_the_cli_name_no_flag(path):
    hits = [(n, s) for n, s in _raised_strings(ast.parse(path.read_text())) if _flags(s)]
    assert not hits, f"{path.name}: {hits}"


def test_the_options_module_names_no_flag():
    path = RAYPIPE / "options.py"
    hits = [(n, s) for n, s in _all_strings(ast.parse(path.read_text())) if _flags(s)]
    assert not hits


def test_status_needs_no_model_package_for_a_lora_variant(tiny_root, monkeypatch, capsys):
    """`raypipe status` plans like infer but loads nothing: a missing peft is not its error."""
    import json

    adapter = tiny_root / "adapters" / "a"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (adapter / "adapter_model.bin").write_text("w")
    config = tiny_root / "experiments" / "tiny" / "config.json"
    data = json.loads(config.read_text())
    data["model_variants"]["base"]["lora"] = str(adapter)
    config.write_text(json.dumps(data))
    monkeypatch.setitem(sys.modules, "peft", None)
    argv = ["status", "--root", str(tiny_root), "--experiment", "tiny", "--prompt-set"]
    assert cli.main([*argv, "tests/small"]) == 0
    assert "responses: 0 present" in capsys.readouterr().out
