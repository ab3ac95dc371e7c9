"""Progress on long work, for the person waiting: the stages of a run with their times, and
meters of bytes (done, rate, ETA where the total is known).

Always on stderr, never on stdout (stdout is data: an id, JSON, or `send`'s stream). On a
terminal it is drawn with rich (a live line that moves, then one line per finished stage); on
anything else, plain timestamped lines a log keeps: one per finished stage with its time, a
stage's start too once it has run for STILL seconds (so a log shows what hangs), a meter
every PLAIN_EVERY seconds and once at its end. `--quiet`, `--json` and FSCR_QUIET=1 turn it off.

The library takes a `Progress` (a callable given stage names, pipeline.common); a Reporter
is one, and `meter()`/`finished()` give the extras to a Reporter only, so library code never
asks what it was given.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from . import units

Mode = Literal["rich", "plain", "off"]
# Seconds between two plain lines of one meter: often enough to see it move in a log,
# rarely enough that a 10-minute send is a screenful.
PLAIN_EVERY = float(os.environ.get("FSCR_PROGRESS_EVERY", "5"))
STILL = 2.0


class Meter:
    """Bytes done of one piece of work. Thread-safe: hashing threads advance it together."""

    def __init__(self, rep: Reporter | None, what: str, total: int | None) -> None:
        self.rep, self.what, self.total = rep, what, total
        self.done = 0
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._task: Any = None
        self._said = self.t0

    def advance(self, n: int) -> None:
        if self.rep is not None:
            with self._lock:
                self.done += n
                self.rep._update(self)

    def set(self, n: int) -> None:
        if self.rep is not None:
            with self._lock:
                self.done = n
                self.rep._update(self)

    def text(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.t0
        done = units.size(self.done)
        if final:
            return f"{self.what}: {done} in {units.duration(elapsed)} " \
                   f"({units.rate(self.done, elapsed)})"
        parts = [f"{done} of {units.size(self.total)}" if self.total else done,
                 units.rate(self.done, elapsed)]
        if self.total and self.done and elapsed > 0:
            left = max(0.0, (self.total - self.done) * elapsed / self.done)
            parts.append(f"ETA {units.duration(left)}")
        return f"{self.what}: " + ", ".join(parts)

    def finish(self, ok: bool = True) -> None:
        """The work is over: its last line (done, time, rate), unless it failed."""
        if self.rep is not None:
            self.rep._close_meter(self, ok)
            self.rep = None  # once

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.finish(ok=exc_type is None)


class Reporter:
    """What a command shows while it works. Use it as a context manager: leaving it clears
    the live display before the command prints its result."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._lock = threading.RLock()
        self._live: Any = None  # rich.progress.Progress, started on first use
        self._stage: tuple[str, Any] | None = None

    # -- a Progress: the stage named begins (or a one-off word, like a lock wait)
    def __call__(self, stage: str) -> None:
        if self.mode == "off":
            return
        with self._lock:
            self._end_stage()
            if self.mode == "plain":
                t0 = datetime.now().astimezone()
                timer = threading.Timer(STILL, self._line, [f"{stage}… (since {t0:%H:%M:%S})"])
                timer.daemon = True
                timer.start()
                self._stage = (stage, timer)
            else:
                self._stage = (stage, self._rich().add_task(stage, total=None, detail=""))

    def stage_done(self, stage: str, seconds: float) -> None:
        if self.mode == "off":
            return
        with self._lock:
            if self._stage is not None and self._stage[0] == stage:
                self._end_stage()
            if self.mode == "plain":
                self._line(f"{stage} done in {units.duration(seconds)}")
            else:
                self._rich().console.print(f"  [green]✓[/green] {stage:<14} "
                                           f"[dim]{units.duration(seconds)}[/dim]",
                                           highlight=False)

    def meter(self, what: str, total: int | None = None) -> Meter:
        m = Meter(None if self.mode == "off" else self, what, total)
        if self.mode == "rich":
            with self._lock:
                m._task = self._rich().add_task(what, total=total or None, detail="")
        return m

    def close(self) -> None:
        with self._lock:
            self._end_stage()
            if self._live is not None:
                self._live.stop()
                self._live = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- drawing
    def _update(self, m: Meter) -> None:
        with self._lock:
            if self.mode == "rich" and self._live is not None and m._task is not None:
                self._live.update(m._task, completed=m.done, detail=m.text()[len(m.what) + 2:])
            elif self.mode == "plain" and time.monotonic() - m._said >= PLAIN_EVERY:
                m._said = time.monotonic()
                self._line(m.text())

    def _close_meter(self, m: Meter, ok: bool) -> None:
        with self._lock:
            if self.mode == "rich" and self._live is not None and m._task is not None:
                self._live.remove_task(m._task)
                if ok:
                    self._live.console.print(f"  [green]✓[/green] {m.text(final=True)}",
                                             highlight=False)
            elif self.mode == "plain" and ok:
                self._line(m.text(final=True))

    def _end_stage(self) -> None:
        if self._stage is not None:
            if isinstance(self._stage[1], threading.Timer):
                self._stage[1].cancel()
            elif self._live is not None:
                self._live.remove_task(self._stage[1])
        self._stage = None

    def _line(self, text: str) -> None:
        stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
        sys.stderr.write(f"{stamp} fscr: {text}\n")
        sys.stderr.flush()

    def _rich(self) -> Any:
        if self._live is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            self._live = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24), TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._live.start()
        return self._live


def reporter(quiet: bool = False) -> Reporter:
    """The right Reporter for this process's stderr: rich on a terminal, plain lines
    otherwise, off when asked for quiet (also FSCR_QUIET=1)."""
    if quiet or os.environ.get("FSCR_QUIET", "") not in ("", "0"):
        return Reporter("off")
    return Reporter("rich" if sys.stderr.isatty() else "plain")


def meter(progress: Callable[[str], None], what: str, total: int | None = None) -> Meter:
    """A meter on `progress` if it draws them, else one that counts nothing."""
    if isinstance(progress, Reporter):
        return progress.meter(what, total)
    return Meter(None, what, total)


def finished(progress: Callable[[str], None], stage: str, seconds: float) -> None:
    if isinstance(progress, Reporter):
        progress.stage_done(stage, seconds)


@contextmanager
def watching(progress: Callable[[str], None], what: str, directory: Path,
             every: float = 0.25) -> Iterator[None]:
    """While the body runs (CRIU writing its images), a meter of the bytes in `directory`,
    polled by a thread: CRIU says nothing of its progress, its files grow."""
    m = meter(progress, what)
    if m.rep is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every):
            m.set(bytes_in(directory))

    t = threading.Thread(target=poll, name="fscr-progress", daemon=True)
    t.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        t.join()
        m.set(bytes_in(directory))
        m.finish(ok)


def bytes_in(directory: Path) -> int:
    total = 0
    try:
        with os.scandir(directory) as it:
            for e in it:
                try:
                    total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue  # removed while we looked
    except OSError:
        pass
    return total
