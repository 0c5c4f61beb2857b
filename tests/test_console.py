"""What `raypipe infer` shows: a live bar and a clean summary on a terminal, plain lines elsewhere,
everything else in the run's log file; the next commands it prints run as printed."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from raypipe.cli import GROUPS, build_parser
from raypipe.pipeline.console import Console
from raypipe.pipeline.report import duckdb_command, shell_word

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--experiment", "tiny", "--prompt-set", "tests/small", "--dtype", "float32"]
ARGS += ["--max-new-tokens", "6", "--batch-size", "4"]  # 10 prompts: batches of 4, 4, 2
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(
    r"tests/small: 100%\|█+\| 10/10 prompts \[\d+:\d\d<00:00, generated 10, projected 10, "
    r"failed 0, 60 new tokens, [\d,]+ tok/s\]"
)
NOT_OURS = ("INFO", "WARNING", "Traceback", "Running Dataset", "MapWorker", "core_worker")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}


def _command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "raypipe.cli", "infer", *ARGS, *extra]


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: each `\\r` returns to column 0 and what follows
    overwrites, as tqdm's redraws do (escape sequences dropped)."""
    lines = []
    for line in CSI.sub("", raw.replace("\r\n", "\n")).split("\n"):
        shown: list[str] = []
        for piece in line.split("\r"):
            shown[: len(piece)] = piece
        lines.append("".join(shown).rstrip())
    return lines


def run_in_pty(cmd: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal as its stdin, stdout and stderr; all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, cols
    os.set_blocking(master, False)
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=60)
    return rc, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture
def tiny_cwd(tiny_root: Path) -> Path:
    return tiny_root  # runs in the root, as `make demo` does: paths print relative to it


@pytest.mark.slow
def test_infer_on_a_terminal_shows_one_bar_and_the_summary(tiny_cwd: Path):
    rc, raw = run_in_pty(_command(), tiny_cwd)
    shown = screen(raw)
    text = "\n".join(shown)
    assert rc == 0, text
    # Live: the bar was drawn before any prompt was done, and at the end it reads 10/10.
    assert re.search(r"tests/small:\s+0%\|", raw), raw
    assert any(BAR.fullmatch(line) for line in shown), text
    assert "raypipe: tiny / base / tests/small" in text and "done 10" in text
    for word in NOT_OURS:
        assert word not in text, text
    # Every line on the screen is raypipe's: its notes, the bar, the summary.
    for line in shown:
        assert not line or line.startswith(("[raypipe] ", "tests/small: ", "raypipe: ", "  ")), line
    logs = list((tiny_cwd / "experiments/tiny/inference/base/logs/tests/small").glob("*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert "Running Dataset" in log  # Ray Data's progress blocks went there
    rel = logs[0].relative_to(tiny_cwd)
    assert f"  log: {rel}" in shown
    # The next commands, as printed, run: the DuckDB one reads the table.
    at = shown.index("  next:")
    viz, query = shown[at + 1].strip(), shown[at + 2].strip()
    assert viz.split("    # then open ")[0].endswith(" viz")
    assert "#/overview?experiment=tiny&variant=base&prompt_set=tests%2Fsmall" in viz
    got = subprocess.run(["bash", "-c", query], cwd=tiny_cwd, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert "behavior/alpha" in got.stdout and "tone/beta" in got.stdout


@pytest.mark.slow
def test_infer_without_a_terminal_prints_plain_lines(tiny_cwd: Path):
    proc = subprocess.run(
        _command(), cwd=tiny_cwd, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("[raypipe] ") for line in lines), proc.stderr
    progress = [line for line in lines if line.startswith("[raypipe] tests/small: ")]
    assert re.fullmatch(
        r"\[raypipe\] tests/small: 10/10 prompts \| generated 10 \| projected 10 \| failed 0 \| "
        r"60 new tokens \| [\d,]+ tok/s \| \d+:\d\d elapsed, ETA 0:00",
        progress[-1],
    ), progress
    assert "done 10" in proc.stdout and "  next:" in proc.stdout
    for word in NOT_OURS:
        assert word not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_verbose_shows_the_log_live_and_quiet_shows_only_the_summary(tiny_cwd: Path):
    verbose = subprocess.run(
        _command("--verbose", "--regenerate", "--force"),
        cwd=tiny_cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "Running Dataset" in verbose.stderr  # Ray Data's blocks, live
    assert "[raypipe] tests/small: 10/10 prompts" in verbose.stderr
    logs = list((tiny_cwd / "experiments/tiny/inference/base/logs/tests/small").glob("*.log"))
    assert "Running Dataset" in logs[0].read_text()  # and in the file too
    quiet = subprocess.run(
        _command("--quiet", "--regenerate", "--force"),
        cwd=tiny_cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "done 10" in quiet.stdout


def test_shell_words_reach_the_program_unchanged(tmp_path: Path):
    for text in ["plain", "it's", 'say "hi"', "$HOME `id` \\n", "wow!", "two\nlines", "é 東京"]:
        got = subprocess.run(
            ["bash", "-c", f"printf %s {shell_word(text)}"], capture_output=True, text=True
        )
        assert got.stdout == text, (text, shell_word(text))


def test_duckdb_command_reads_the_table_in_each_form(tmp_path: Path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "it's a $dir"
    folder.mkdir()
    pq.write_table(pa.table({"trait": ["a/b"], "layer": [3]}), folder / "t.parquet")
    monkeypatch.chdir(tmp_path)

    def sql(source: str) -> str:
        return f"SELECT trait, layer FROM {source}"

    forms = [duckdb_command(folder / "t.parquet", sql, cli="", module=True)]
    if shutil.which("duckdb"):
        forms.append(duckdb_command(folder / "t.parquet", sql))
    for lines in forms:
        assert len(lines) == 1
        got = subprocess.run(["bash", "-c", lines[0]], capture_output=True, text=True)
        assert got.returncode == 0, (lines, got.stderr)
        assert "a/b" in got.stdout and "3" in got.stdout
    missing = duckdb_command(folder / "t.parquet", sql, cli="", module=False)
    assert missing[0].endswith(" -m pip install duckdb") and missing[1] == forms[0][0]


def _help_groups(command: str) -> list[tuple[str, list]]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return [(g.title, g._group_actions) for g in sub._action_groups if g._group_actions]


def test_infer_help_groups_its_flags_with_their_defaults():
    groups = _help_groups("infer")
    assert [title for title, _ in groups] == ["options", *GROUPS]  # options: just --help
    for title, actions in groups[1:]:
        for action in actions:
            assert re.search(r"\[.+\]$", action.help or ""), (title, action.option_strings)
    text = subprocess.run(
        _command("--help")[:4] + ["--help"], env=_env(), capture_output=True, text=True
    ).stdout
    assert text.startswith("usage: raypipe infer --experiment E --prompt-set P [flags]")
    assert "\ncluster:\n" in text and "--replicas REPLICAS   generation and projection" in text


def test_extract_help_groups_its_flags_with_their_defaults():
    groups = _help_groups("extract")
    assert [t for t, _ in groups] == ["options", "data", "model", "projection", "cluster", "output"]
    for _, actions in groups[1:]:
        for action in actions:
            assert re.search(r"\[.+\]$", action.help or ""), action.option_strings


def test_notes_go_above_a_bar_and_plain_lines_are_spaced(tmp_path: Path):
    import io

    err = io.StringIO()
    con = Console(err, io.StringIO())
    with con.progress(3, desc="set") as bar:
        for done in (1, 2, 3):
            bar.update(done, generated=done)
        con.note("a note")
    lines = err.getvalue().splitlines()
    # Not a terminal: the first and last updates print (the middle one came too soon), then
    # the note.
    assert [line.split(" | ")[0] for line in lines] == [
        "[raypipe] set: 1/3 prompts",
        "[raypipe] set: 3/3 prompts",
        "[raypipe] a note",
    ]


# ---------------------------------------------------------------- live progress within a batch

LIVE = re.compile(
    r"tests/small:\s+(\d+)%\|[^|]*\| (\d+)/10 prompts \[[^\]]*?generated (\d+), projected (\d+), "
    r"failed 0(?:, ([\d,]+) new tokens)?"
)
# One batch of 10 that takes a while: several seconds of decoding (the tiny model on its one
# thread makes about 4k tokens a second here).
LONG = ["--max-new-tokens", "2000", "--batch-size", "10"]


@pytest.fixture
def long_cwd(tiny_root: Path, tmp_path_factory) -> Path:
    """The tiny tree on a model with room for 2000 new tokens after each prompt."""
    import json

    from tests.tiny import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("models") / "long", positions=2048)
    path = tiny_root / "experiments/tiny/config.json"
    config = json.loads(path.read_text())
    config["model_variants"]["base"]["model"] = str(model)
    path.write_text(json.dumps(config))
    return tiny_root


def new_tokens_written(root: Path) -> int:
    """Ground truth: the new tokens of the responses on disk."""
    import json

    folder = root / "experiments/tiny/inference/base/responses/tests/small"
    recs = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    assert len(recs) == 10
    return sum(len(r["token_ids"]) - r["prompt_end"] for r in recs)


def states(raw: str) -> list[tuple[int, int, int, int, int]]:
    """Every redraw of the bar: (percent, done, generated, projected, new tokens)."""
    out = []
    for piece in CSI.sub("", raw).replace("\r\n", "\n").replace("\n", "\r").split("\r"):
        m = LIVE.match(piece)
        if m:
            pct, done, gen, proj, tokens = m.groups()
            out.append(
                (int(pct), int(done), int(gen), int(proj), int((tokens or "0").replace(",", "")))
            )
    return out


@pytest.mark.slow
def test_the_bar_moves_while_its_one_batch_generates(long_cwd: Path):
    rc, raw = run_in_pty(_command(*LONG), long_cwd)
    text = "\n".join(screen(raw))
    assert rc == 0, text
    seen = states(raw)
    truth = new_tokens_written(long_cwd)
    # Mid-generation: tokens counted, the bar filled part way, while no prompt is done yet.
    mid = [s for s in seen if s[1] == 0 and 0 < s[4] < truth]
    assert mid, seen
    assert all(pct > 0 for pct, *_ in mid) and all(pct < 100 for pct, *_ in mid), mid
    # It only goes forward, and ends on the rows' own numbers: nothing was counted twice.
    tokens = [s[4] for s in seen]
    assert tokens == sorted(tokens), seen
    assert seen[-1] == (100, 10, 10, 10, truth), seen
    assert "done 10" in text and "Traceback" not in text


@pytest.mark.slow
def test_plain_lines_show_the_live_counts_during_a_batch(long_cwd: Path):
    proc = subprocess.run(
        _command(*LONG), cwd=long_cwd, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[raypipe] tests/")]
    live = [
        line
        for line in lines
        if re.match(
            r"\[raypipe\] tests/small: 0/10 prompts \| generated 0 \| projected 0 \| "
            r"failed 0 \| [1-9][\d,]* new tokens \| [\d,]+ tok/s \| \d+:\d\d elapsed, ETA \d",
            line,
        )
    ]
    assert live, lines
    assert lines[-1].startswith("[raypipe] tests/small: 10/10 prompts | generated 10 | ")
    assert f"| {new_tokens_written(long_cwd):,} new tokens |" in lines[-1]


def test_generation_tells_its_tokens_as_it_decodes(tiny_model_dir: Path, tmp_path, monkeypatch):
    import raypipe.engine.generate as generate
    from raypipe.engine.generate import GenerationOptions, Generator
    from raypipe.engine.models import ModelSpec, load_model

    monkeypatch.setattr(generate, "PROGRESS_EVERY_S", 0.0)  # every step, to see each one
    model, tok = load_model(ModelSpec(str(tiny_model_dir), tmp_path / "cache", dtype="float32"))
    gen = Generator(model, tok, GenerationOptions(max_new_tokens=8, max_batch_size=3))
    prompts = [tok(t)["input_ids"] for t in ("the old man", "go", "is it hot", "say one", "help")]
    heard: list[tuple[int, float]] = []
    out = gen.generate(prompts, lambda tokens, done: heard.append((tokens, done)))
    assert heard[-1] == (sum(map(len, out)), 5)
    assert [t for t, _ in heard] == sorted(t for t, _ in heard)
    assert [d for _, d in heard] == sorted(d for _, d in heard)
    assert any(0 < d < 3 and d != int(d) for _, d in heard), heard  # within the first batch
    assert gen.generate(prompts) == out  # counting changes nothing generated


def _batch(ids: list[str]):
    import pandas as pd

    n = len(ids)
    return pd.DataFrame(
        {
            "prompt_set": ["s"] * n,
            "prompt_id": ids,
            "text": ["the old man", "go home", "is it hot", "say one thing"][:n],
            "system_prompt": [None] * n,
            "note": [None] * n,
            "generate": [True] * n,
            "project": [True] * n,
        }
    )


def _generate_stage(root: Path, model_dir: Path, progress):
    from raypipe.engine.generate import GenerationOptions
    from raypipe.engine.models import ModelSpec
    from raypipe.pipeline.stages import GenerateStage, ResponseSource
    from raypipe.store.paths import ExperimentPaths

    spec = ModelSpec(str(model_dir), root / "cache", dtype="float32")
    source = ResponseSource(ExperimentPaths(root, "tiny"), "base", "tiny")
    opts = GenerationOptions(max_new_tokens=5)
    return GenerateStage(spec, opts, None, 256, False, source, progress=progress)


def _until(poll, ok, tries: int = 100):
    """The view's totals once `ok` holds (reports are fire-and-forget: they land a bit later)."""
    got = None
    for _ in range(tries):
        got = poll()
        if got is not None and ok(got):
            return got
        time.sleep(0.1)
    raise AssertionError(f"never reached: {got}")


def test_a_batch_run_again_is_counted_once(ray_session, tiny_root: Path, tiny_model_dir: Path):
    from raypipe.pipeline import live

    board = live.start_board()
    try:
        view = live.LiveView(board)
        stage = _generate_stage(tiny_root, tiny_model_dir, live.Reporter(board))
        first = stage(_batch(["a", "b", "c"]))
        new = sum(len(t) - e for t, e in zip(first["token_ids"], first["prompt_end"]))
        _until(view.poll, lambda t: t.get("generated") == 3)
        # Ray runs a batch again when its actor died: a new actor, the same rows.
        again = _generate_stage(tiny_root, tiny_model_dir, live.Reporter(board))
        again(_batch(["a", "b", "c"]))
        d = stage(_batch(["d"]))
        got = _until(view.poll, lambda t: t.get("generated") == 4)
        assert got["generated"] == 4 and got["gen_work"] == 4
        assert got["tokens"] == new + len(d["token_ids"][0]) - d["prompt_end"][0]
    finally:
        live.stop_board(board)


def test_a_gone_board_costs_the_run_nothing(ray_session, tiny_root: Path, tiny_model_dir: Path):
    from raypipe.pipeline import live

    board = live.start_board()
    view = live.LiveView(board)
    stage = _generate_stage(tiny_root, tiny_model_dir, live.Reporter(board))
    before = stage(_batch(["a", "b"]))
    _until(view.poll, lambda t: t.get("generated") == 2)
    live.stop_board(board)  # the driver is gone: its board with it
    after = stage(_batch(["a", "b"]))
    assert list(after["response_text"]) == list(before["response_text"])
    assert view.poll(timeout=5) is None  # the bar just stops hearing


def test_the_view_keeps_its_counts_when_the_board_restarts(ray_session):
    from raypipe.pipeline import live

    board = live.start_board()
    try:
        view, reporter = live.LiveView(board), live.Reporter(board)
        reporter.send("one", {"generated": 3})
        _until(view.poll, lambda t: t.get("generated") == 3)
        first = view.epoch
        ray_session.kill(board, no_restart=False)  # Ray restarts it, empty
        sent = 0

        def restarted():
            nonlocal sent
            sent += 1
            reporter.send(f"two-{sent}", {"generated": 1})
            return view.poll(timeout=5)

        got = _until(restarted, lambda t: view.epoch != first)
        # The new board holds only what came after; what was seen before it stays.
        assert got["generated"] >= 4
        assert view.batches["one"] == {"generated": 3}
    finally:
        live.stop_board(board)


def test_a_watched_bar_fills_with_the_work_and_counts_finished_prompts():
    import io

    from raypipe.pipeline.console import BarProgress

    err = io.StringIO()
    bar = BarProgress(Console(err, io.StringIO()), 10, "prompts", "set", "waiting")
    answers = iter([None, ({"generated": 0, "new_tokens": "120"}, 0.4)])
    with bar.watching(lambda: next(answers)):
        bar.tick()
        assert bar.status == "waiting"  # no answer yet: the phase stays
        bar.tick()
    bar.tick()  # no longer watched: nothing asked (a third answer would raise)
    bar.update(10, work=1.0, generated=10)
    bar.close()
    drawn = [CSI.sub("", p) for p in err.getvalue().split("\r")]
    live = [p for p in drawn if " 40%|" in p]
    assert live and all(
        "| 0/10 prompts [" in p and "generated 0, 120 new tokens" in p for p in live
    )
    assert "waiting" not in live[-1]
    assert "100%|" in drawn[-1] and "10/10 prompts" in drawn[-1]


def test_plain_lines_show_live_counts_at_most_every_few_seconds():
    import io

    from raypipe.pipeline.console import PLAIN_EVERY_S, PlainProgress

    err = io.StringIO()
    bar = PlainProgress(Console(err, io.StringIO()), 4, "prompts", "set", "")
    counts = iter([10, 20, 30, 30])
    with bar.watching(lambda: ({"new_tokens": next(counts)}, 0.1)):
        bar.tick()  # 10: the first line
        bar.tick()  # 20: too soon after it
        bar._last -= PLAIN_EVERY_S  # as if that long had passed
        bar.tick()  # 30: printed
        bar._last -= PLAIN_EVERY_S
        bar.tick()  # 30 again: nothing new to say
    lines = err.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == ["10 new tokens", "30 new tokens"], lines
    assert lines[0].startswith("[raypipe] set: 0/4 prompts | ") and "ETA " in lines[0]


def test_the_extract_bar_moves_through_the_hidden_states(tiny_root: Path):
    import io
    import json

    from raypipe.extract import ExtractOptions, run_extract
    from raypipe.options import ModelOptions

    words = ["good", "bad", "hot", "old", "new", "big", "small", "long"]
    pairs = [
        {"prompt": f"say {w}", "positive": f"{w} is good", "negative": f"{w} is bad"} for w in words
    ]
    folder = tiny_root / "datasets/traits/behavior/alpha"
    folder.mkdir(parents=True)
    (folder / "pairs.json").write_text(json.dumps({"pairs": pairs}))
    err = io.StringIO()
    con = Console(err, io.StringIO())
    con.tty = True  # a bar, drawn into the buffer
    opts = ExtractOptions(
        root=tiny_root,
        experiment="tiny",
        traits=("behavior/alpha",),
        batch_size=4,  # 16 sequences: 4 batches
        force=True,
        model=ModelOptions(dtype="float32", cache_dir=tiny_root / "cache"),
    )
    run_extract(opts, out=io.StringIO(), console=con)
    drawn = [CSI.sub("", p) for p in err.getvalue().split("\r")]
    reading = [p for p in drawn if "hidden states " in p and "| 0/4 trait-layers" in p]
    shown = [re.search(r"(\d+)%\|.*hidden states (\d+)/16", p).groups() for p in reading]
    assert [n for _, n in shown][-1] == "16", shown
    assert int(shown[-1][0]) > int(shown[0][0]), shown  # filled while no layer was fitted yet
    assert "100%|" in drawn[-1] and "4/4 trait-layers" in drawn[-1]
