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
    r"tests/small: 100%\|█+\| 10/10 prompts \[\d+:\d\d<00:00, generated 10, failed 0, "
    r"[\d,]+ tok/s\]"
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
        r"\[raypipe\] tests/small: 10/10 prompts \| generated 10 \| failed 0 \| [\d,]+ tok/s \| "
        r"\d+:\d\d elapsed, ETA 0:00",
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
