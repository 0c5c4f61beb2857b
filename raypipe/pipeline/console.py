"""raypipe's terminal: one live bar (or plain lines), its own notes, and the rest in a log file.

A run's console shows raypipe's lines only. Everything else this process prints goes to the
run's log file (`inference/{V}/logs/...`): Ray's log records (its handlers write to whatever
`sys.stderr` is when they emit), Ray Data's progress blocks (it logs them, not bars, when
`sys.stdout` is no terminal), what C++ code writes to fds 1 and 2 (the core worker's errors,
Ray's token warning), Python warnings, and the workers' output, which Ray forwards to the
driver's `sys.stdout`/`sys.stderr` (`log_to_driver=True`; with False it would stay in Ray's
session folder under /tmp, where no user looks). HF's own bars are turned off in the driver
and, through Ray's `worker_process_setup_hook`, in every worker: in a log file a bar is noise.

On a terminal the progress is a tqdm bar; elsewhere (CI, `ray job logs`, a pipe) a plain
`[raypipe] ...` line at most every PLAIN_EVERY_S seconds, and at least every HEARTBEAT_S while
nothing finishes. `--verbose` copies the log to the console live (and uses the plain lines).
Between finished prompts the bar still moves: the clock asks a `watching` poll (the workers'
live counts, pipeline/live.py) each tick for fields and the share of the work done, which
fills the bar and gives the ETA; the count of prompts done stays that of finished ones.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from raypipe.errors import user_error
from raypipe.store.text import printable

PLAIN_EVERY_S = 5.0
HEARTBEAT_S = 30.0
REFRESH_S = 1.0  # the bar's clock ticks even while a long batch runs
LIVE_AT_MOST = 0.99  # of the bar the workers' counts may fill
# Ray's worker-log prefix is coloured unless this says no: escape codes have no place in a file.
_ENV = {"RAY_COLOR_PREFIX": "0"}
WORKER_SETUP_HOOK = "raypipe.pipeline.console.quiet_worker"


def quiet_worker() -> None:
    """Ray's worker_process_setup_hook: no HF bars in a worker (they would land in the log)."""
    _hf_bars(False)


def _hf_bars(on: bool) -> bool:
    """Turn HF's progress bars (transformers, huggingface_hub) on or off; returns whether
    transformers' were on before."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    if on:
        tf_logging.enable_progress_bar()
        hub.enable_progress_bars()
    else:
        tf_logging.disable_progress_bar()
        hub.disable_progress_bars()
    return was


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds + 0.5)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


# What a poll gives the bar: its fields, and the share of the whole work done (None: unknown).
Poll = Callable[[], "tuple[dict[str, object], float | None] | None"]


def _field(name: str, value: str) -> str:
    """`generated 12`, but `1,234 new tokens` and `98 tok/s`: a unit goes after its number."""
    return f"{value} {name}" if name.endswith(("/s", "tokens")) else f"{name} {value}"


class Progress:
    """Counts done of a total, with named fields (generated, failed, tok/s, ...)."""

    def __init__(self, console: Console, total: int, unit: str, desc: str, status: str) -> None:
        self.console, self.total, self.unit, self.desc = console, total, unit, desc
        self.done = 0
        self.work: float | None = None  # share of the work done, where it is known
        self.fields: dict[str, str] = {}
        self.status = status
        self.start = time.monotonic()
        self.idle_until = self.start  # last seen with nothing done: the ETA's rate starts there
        self._lock = threading.Lock()
        self._poll: Poll | None = None
        self._polling = threading.Lock()  # held while a poll runs

    def update(self, done: int, status: str = "", work: float | None = None, **fields) -> None:
        """`done` so far (not an increment); `status` says what runs now; `work` the share of
        the whole work done, when known (it fills the bar); fields as shown."""
        with self._lock:
            self.done = done
            self.status = status
            self._set(work, fields)
            self._show(final=done >= self.total)

    def live(self, work: float | None = None, **fields) -> None:
        """Counts from the workers between updates: what a `watching` poll returned."""
        with self._lock:
            if self.done >= self.total:
                return  # the final numbers are the finished prompts'
            self.status = ""  # work is going on: no phase to name
            changed = self._set(work, fields)
            self._show_live(changed)

    def _set(self, work: float | None, fields: dict) -> bool:
        shown = {k.replace("_", " "): str(v) for k, v in fields.items()}
        changed = shown != self.fields
        self.fields, self.work = shown, work
        if self.fraction() <= 0:
            self.idle_until = time.monotonic()
        return changed

    @contextmanager
    def watching(self, poll: Poll) -> Iterator[None]:
        """While inside, the clock calls `poll` every tick and shows what it returns; on the
        way out it waits for a poll under way to end (what it asks may go away then)."""
        self._poll = poll
        try:
            yield
        finally:
            with self._polling:
                self._poll = None

    def _ask(self) -> None:
        with self._polling:
            got = self._poll() if self._poll is not None else None
        if got is None and self.fraction() <= 0:
            self.idle_until = time.monotonic()  # still starting: no rate to reckon from yet
        if got is not None:
            fields, work = got
            self.live(work, **fields)

    def phase(self, status: str) -> None:
        with self._lock:
            self.status = status
            self._show(final=False)

    def fraction(self) -> float:
        """Share of the work done: finished prompts, or the workers' count when further (short
        of the whole until every prompt is done: their outputs are still being written)."""
        done = self.done / self.total if self.total else 1.0
        return max(done, min(self.work or 0.0, LIVE_AT_MOST))

    def eta(self) -> float | None:
        if self.done >= self.total:
            return 0.0
        frac = self.fraction()
        if frac <= 0:
            return None
        return (time.monotonic() - self.idle_until) * (1 - frac) / frac

    def line(self) -> str:
        """The plain form: `12/40 prompts | generated 12 | failed 0 | 312 tok/s | ...`."""
        parts = [f"{self.done}/{self.total} {self.unit}"]
        parts += [_field(k, v) for k, v in self._shown()]
        elapsed = time.monotonic() - self.start
        parts.append(f"{_fmt_s(elapsed)} elapsed" + (f", ETA {_fmt_s(self.eta())}"))
        if self.status:
            parts.append(self.status)
        return " | ".join(parts)

    def _shown(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.fields.items()]

    def _show(self, final: bool) -> None:
        raise NotImplementedError

    def _show_live(self, changed: bool) -> None:
        self._show(final=False)

    def tick(self) -> None:
        """Called every REFRESH_S by the console's clock."""
        self._ask()

    def write(self, line: str, file=None) -> None:
        """A line above the progress (a note, or a result row on `file`)."""
        print(line, file=file or self.console.err, flush=True)

    def close(self) -> None:
        pass


class PlainProgress(Progress):
    """One `[raypipe] ...` line at most every PLAIN_EVERY_S (the last one always)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._last = None  # monotonic time of the last line

    def _show(self, final: bool) -> None:
        now = time.monotonic()
        if final or self._last is None or now - self._last >= PLAIN_EVERY_S:
            self._emit(now)

    def _emit(self, now: float) -> None:
        self._last = now
        self.console._print(f"[raypipe] {printable(self.desc)}: {self.line()}")

    def _show_live(self, changed: bool) -> None:
        now = time.monotonic()
        if changed and (self._last is None or now - self._last >= PLAIN_EVERY_S):
            self._emit(now)

    def tick(self) -> None:
        self._ask()
        with self._lock:
            now = time.monotonic()
            if self.done < self.total and now - (self._last or self.start) >= HEARTBEAT_S:
                self._emit(now)


class BarProgress(Progress):
    """A tqdm bar: prompts done of total, ETA, then the fields."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.bar = _tqdm_class()(
            self,
            total=self.total,
            desc=printable(self.desc),
            unit=f" {self.unit}",
            file=self.console.err,
            ncols=self._width(),
            mininterval=0.2,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
            + f"{printable(self.unit and ' ' + self.unit)}"
            + " [{elapsed}<{remaining}{postfix}]",
            disable=False,
            leave=True,
        )
        self._postfix()

    def _postfix(self) -> None:
        bits = [_field(k, v) for k, v in self._shown()]
        if self.status and self.done < self.total:
            bits.append(self.status)
        self.bar.set_postfix_str(printable(", ".join(bits)), refresh=False)

    def _width(self) -> int:
        """The terminal's width now (a resized window redraws at its new width); 100 where
        the terminal does not say (a pty nobody sized reports 0). All of it: the live fields
        need the room (at 120 the demo's last line lost its tok/s)."""
        try:
            return os.get_terminal_size(self.console.err.fileno()).columns or 100
        except (AttributeError, ValueError, OSError):
            return 100

    def _show(self, final: bool) -> None:
        self.bar.n = self.done
        self.bar.ncols = self._width()
        self._postfix()
        self.bar.refresh()

    def tick(self) -> None:
        self._ask()
        with self._lock:
            self.bar.ncols = self._width()
            self.bar.refresh()

    def meter(self) -> dict:
        """What tqdm draws instead of its own reckoning: the fill from the share of the work
        done (the count shown is still the prompts done), and the ETA from that share."""
        eta = self.eta()
        return {
            "n": self.fraction() * self.total if self.done < self.total else self.total,
            "n_fmt": str(self.done),
            "remaining": "?" if eta is None else _tqdm_class().format_interval(eta),
        }

    def write(self, line: str, file=None) -> None:
        with self._lock:
            self.bar.clear()
            print(line, file=file or self.console.err, flush=True)
            self.bar.refresh()

    def close(self) -> None:
        with self._lock:
            self._postfix()
            self.bar.close()


_TQDM = None


def _tqdm_class():
    """tqdm, drawing from its owner's meter (imported on the first bar)."""
    global _TQDM
    if _TQDM is None:
        from tqdm import tqdm

        class Bar(tqdm):
            def __init__(self, owner: BarProgress, **kwargs) -> None:
                self.owner = owner
                super().__init__(**kwargs)

            @property
            def format_dict(self):
                return {**super().format_dict, **self.owner.meter()}

        _TQDM = Bar
    return _TQDM


class QuietProgress(Progress):
    def _show(self, final: bool) -> None:
        pass

    def tick(self) -> None:
        pass  # nothing shown: nothing to ask for

    def write(self, line: str, file=None) -> None:
        if file is not None:  # results still go where they are asked to
            print(line, file=file, flush=True)


class Console:
    """Where raypipe's own lines go: `err` for notes and the bar, `out` for results."""

    def __init__(self, err=None, out=None, *, quiet: bool = False, verbose: bool = False):
        self.err = err if err is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.quiet, self.verbose = quiet, verbose
        self.tty = _isatty(self.err)
        self.log_path: Path | None = None
        self._bar: Progress | None = None

    def _print(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def note(self, msg: str) -> None:
        """A line of raypipe's own (above the bar, if one is up); none when quiet."""
        if self.quiet:
            return
        line = f"[raypipe] {printable(msg)}"
        if self._bar is not None:
            self._bar.write(line)
        else:
            self._print(line)

    @contextmanager
    def progress(
        self,
        total: int,
        unit: str = "prompts",
        desc: str = "",
        quiet: bool = False,
        status: str = "starting",
    ) -> Iterator[Progress]:
        """The run's progress: a bar on a terminal, plain lines elsewhere, nothing when quiet."""
        if self.quiet or quiet:
            kind = QuietProgress
        elif self.tty and not self.verbose:
            kind = BarProgress
        else:
            kind = PlainProgress
        bar = kind(self, total, unit, desc, status)
        self._bar, stop = bar, threading.Event()

        def clock() -> None:
            while not stop.wait(REFRESH_S):
                bar.tick()

        ticker = threading.Thread(target=clock, name="raypipe-console-clock", daemon=True)
        ticker.start()
        try:
            yield bar
        finally:
            stop.set()
            ticker.join()
            self._bar = None
            bar.close()


def shown_path(path: Path | str) -> str:
    """A path as a user in this folder would type it: relative when it lies below the cwd."""
    path = os.path.abspath(path)  # not resolve(): a venv's python is a symlink to keep
    try:
        return str(Path(path).relative_to(os.path.abspath(os.getcwd())))
    except (ValueError, OSError):
        return path


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


_CURRENT: Console | None = None


def current() -> Console:
    """The console of the command now running; outside one, a plain console on the process's
    streams as they are (a library call, a test)."""
    return _CURRENT if _CURRENT is not None else Console()


def note(msg: str, quiet: bool = False) -> None:
    if not quiet:
        current().note(msg)


def _terminal(stream, fd_of_stream: int | None):
    """A stream on what `stream` writes to now, that survives fds 1 and 2 being redirected: a
    new file on a dup of its fd when it has one, else the object itself (pytest's capture)."""
    if fd_of_stream is None:
        return stream, None
    fd = os.dup(fd_of_stream)
    enc = getattr(stream, "encoding", None) or "utf-8"
    return open(fd, "w", buffering=1, encoding=enc, errors="backslashreplace"), fd


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


@contextmanager
def session(log_path: Path | None, *, quiet: bool = False, verbose: bool = False):
    """One command's console. With `log_path`, every other output of this process (fds 1
    and 2, `sys.stdout`, `sys.stderr`) is appended to that file until the end (with
    `verbose`, copied to the terminal too). On an error the log is named, and the error then
    goes to the terminal as the CLI prints it."""
    global _CURRENT
    sys.stdout.flush()
    sys.stderr.flush()
    err, err_fd = _terminal(sys.stderr, _fileno(sys.stderr))
    out, out_fd = _terminal(sys.stdout, _fileno(sys.stdout))
    con = Console(err, out, quiet=quiet, verbose=verbose)
    previous, _CURRENT = _CURRENT, con
    if log_path is None:
        try:
            yield con
        finally:
            _CURRENT = previous
            _close(err, err_fd, out, out_fd)
        return
    made = _make_dirs(log_path.parent)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    con.log_path = log_path
    saved = {1: os.dup(1), 2: os.dup(2)}
    streams = sys.stdout, sys.stderr
    env = {k: os.environ.get(k) for k in _ENV}
    tee = _Tee(log_fd, err) if verbose else None
    target = tee.write_fd if tee else log_fd
    os.dup2(target, 1)
    os.dup2(target, 2)
    sink = open(os.dup(target), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    sys.stdout = sys.stderr = sink
    os.environ.update(_ENV)
    bars_were = None
    failed = False
    try:
        bars_were = _hf_bars(False)
        yield con
    except BaseException as e:
        # Bad input is one line and leaves nothing behind (its log included); anything else
        # keeps its log and names it.
        failed = "bad input" if isinstance(e, Exception) and user_error(e) else "error"
        raise
    finally:
        sink.flush()
        sys.stdout, sys.stderr = streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        sink.close()
        if tee is not None:
            tee.close()
        os.close(log_fd)
        if failed == "bad input" or not log_path.stat().st_size:  # leave the tree as it was
            log_path.unlink(missing_ok=True)
            for d in made:
                try:
                    d.rmdir()
                except OSError:
                    break  # something else is in it now
            con.log_path = None
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if bars_were:
            _hf_bars(True)
        _CURRENT = previous
        if failed == "error" and con.log_path is not None:
            print(f"[raypipe] the run's log: {printable(log_path)}", file=err, flush=True)
        _close(err, err_fd, out, out_fd)


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest first."""
    made = []
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for d in reversed(made):
        d.mkdir(exist_ok=True)
    return made


def _close(err, err_fd, out, out_fd) -> None:
    for stream, fd in ((err, err_fd), (out, out_fd)):
        if fd is not None:
            stream.close()
        else:
            stream.flush()


class _Tee:
    """--verbose: what goes to the log is also shown on the console, as it comes."""

    def __init__(self, log_fd: int, console) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.log_fd, self.console = log_fd, console
        self.thread = threading.Thread(target=self._pump, name="raypipe-verbose", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while True:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                break
            os.write(self.log_fd, chunk)
            try:
                self.console.write(chunk.decode("utf-8", "backslashreplace"))
                self.console.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        os.close(self.write_fd)
        # A process started during the run (a Ray daemon) may still hold the pipe: wait a
        # little for the end of the data, then stop reading.
        self.thread.join(timeout=2.0)
        if not self.thread.is_alive():
            os.close(self.read_fd)
