"""Option objects: errors that name option fields (never CLI flags), and the one table through
which the CLI prints flags instead."""

from __future__ import annotations

import ast
import dataclasses
import pickle
import re
from pathlib import Path

import pytest

from raypipe import cli
from raypipe.engine.generate import GenerationOptions
from raypipe.engine.models import ModelSpec
from raypipe.errors import OPTIONS, InputError, MissingDependency, OptionError
from raypipe.extract import ExtractOptions
from raypipe.options import (
    InferOptions,
    ModelOptions,
    OutputOptions,
    ProjectionOptions,
    RunOptions,
    split_traits,
)

RAYPIPE = Path(cli.__file__).parent
OUT = OutputOptions(root=Path("/nonexistent"), experiment="e", prompt_set="p")
# Subcommand flags that set no option field: actions of their command, or viz's own.
NOT_OPTIONS = {"-h", "--help", "--json", "--stop", "--status", "--host"}
# Option fields no flag sets: from the experiment config, fixed defaults, nested objects; the
# mode comes from the command and the --capture / --from-activations switches.
NO_FLAG = {
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
    ExtractOptions,
)


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
    }
    for name, flag in cli.FLAGS.items():
        assert flag == renamed.get(name, "--" + name.replace("_", "-")), name


# ---------------------------------------------------------------- errors name fields


BAD_SINGLE = [
    (lambda: ModelSpec("m", Path("/c"), dtype="int8"), "dtype", "must be one of"),
    (lambda: ModelSpec("m", Path("/c"), device="tpu"), "device", "unknown device"),
    (lambda: ModelSpec("m", Path("/c"), device_map="gpu"), "device_map", "must be one of"),
    (
        lambda: ModelSpec("m", Path("/c"), device="cuda:1", device_map="auto"),
        "device_map",
        "`device` cuda:1",
    ),
    (lambda: GenerationOptions(max_new_tokens=0), "max_new_tokens", "at least 1"),
    (lambda: GenerationOptions(temperature=float("nan")), "temperature", ">= 0"),
    (lambda: GenerationOptions(top_p=0), "top_p", "(0, 1]"),
    (lambda: GenerationOptions(max_batch_size=0), "max_batch_size", "at least 1"),
    (lambda: GenerationOptions(max_padding=2), "max_padding", "[0, 1]"),
    (lambda: ProjectionOptions(component="mlp"), "component", "must be one of"),
    (
        lambda: ProjectionOptions(component="attn_contribution", compile_prefill=True),
        "compile_prefill",
        "`component` residual",
    ),
    (lambda: ProjectionOptions(traits=("alpha",)), "traits", "part/part"),
    (lambda: ProjectionOptions(method="svm"), "method", "probe or mean_diff"),
    (lambda: ProjectionOptions(max_batch_tokens=0), "max_batch_tokens", "at least 1"),
    (lambda: dataclasses.replace(OUT, experiment="../e"), "experiment", "not a safe name"),
    (lambda: dataclasses.replace(OUT, prompt_set=""), "prompt_set", "non-empty"),
    (lambda: RunOptions(generate_replicas=0), "generate_replicas", "at least 1"),
    (lambda: RunOptions(tensor_parallel_size=0), "tensor_parallel_size", "at least 1"),
    (lambda: RunOptions(gpus_per_replica=65), "gpus_per_replica", "0..64"),
    (lambda: RunOptions(threads=0), "threads", "at least 1"),
    (lambda: RunOptions(tp=0), "tp", "1..64"),
    (lambda: RunOptions(backend="tpu"), "backend", "must be one of"),
    (
        lambda: InferOptions(
            output=OUT, projection=ProjectionOptions(compile_prefill=True), run=RunOptions(tp=2)
        ),
        "compile_prefill",
        "does not combine with `tp`",
    ),
    (lambda: ExtractOptions(Path("/r"), "e", val_fraction=1), "val_fraction", "between 0 and 1"),
    (lambda: ExtractOptions(Path("/r"), "e", position="middle"), "position", "middle"),
    (lambda: split_traits(" , "), "traits", "names no trait"),
]


@pytest.mark.parametrize("build, field, fragment", BAD_SINGLE, ids=[c[1] for c in BAD_SINGLE])
def test_a_bad_value_is_an_option_error_naming_its_field(build, field, fragment):
    with pytest.raises(InputError) as err:
        build()
    assert (err.value.where, err.value.field) == (OPTIONS, field)
    assert fragment in err.value.message
    assert "--" not in str(err.value)


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
