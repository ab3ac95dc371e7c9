"""The freeze watchdog: a small process, in a session of its own, that thaws the frozen cgroup
if fscr dies (even by SIGKILL or the OOM killer) or the window outlasts --max-freeze.

fscr starts it, waits for its "ready" line before freezing, and holds the write end of its
stdin. Closing that pipe after writing "done" ends it quietly; end-of-file without "done"
means fscr is gone. Whenever it acts, it first lets a running CRIU finish (CRIU's parasite is
inside the tasks: killing CRIU mid-dump is the last resort, at the deadline), then thaws,
then prints "fired: <why>" on its stdout, which fscr reads to abort a run whose window was
cut short.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import FscrError
from .journal import Run, read
from .process.freezer import Cgroup
from .process.tree import Task, settle

GRACE = 10.0  # seconds a dying fscr's CRIU may take to finish before it is killed
STARTUP = 30.0  # seconds the watchdog may take to start (a Python start-up: ~0.1 s)


@dataclass
class Watchdog:
    """fscr's handle on its watchdog process."""

    proc: subprocess.Popen[bytes]
    why: str | None = None  # once read from the watchdog: its one line is read once

    @classmethod
    def start(cls, cg: Cgroup, journal: Path, max_freeze: float) -> Watchdog:
        """Start the watchdog and return once it runs. The wait keeps its start-up (a Python
        interpreter and its imports, ~0.1 s of CPU) out of the frozen window, where on a
        small machine it took a core from CRIU; and a watchdog that cannot start refuses
        the freeze instead of leaving it unguarded."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "fscr.watchdog", cg.kind, str(cg.path), str(journal),
             str(max_freeze)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        fd, got = proc.stdout.fileno(), b""  # type: ignore[union-attr]
        deadline = time.monotonic() + STARTUP
        while not got.endswith(b"\n"):
            left = deadline - time.monotonic()
            chunk = os.read(fd, 1) if left > 0 and select.select([fd], [], [], left)[0] else b""
            if not chunk:
                proc.kill()
                proc.wait()
                raise FscrError("the freeze watchdog did not start: nothing was frozen")
            got += chunk
        return cls(proc)

    def fired(self) -> str | None:
        """Why the watchdog thawed the tree, or None while it has not."""
        if self.why is None:
            fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
            if select.select([fd], [], [], 0)[0]:
                line = os.read(fd, 4096).decode().strip()
                self.why = line.removeprefix("fired: ") or "the watchdog ended"
        return self.why

    def stop(self) -> str | None:
        """End the watchdog; returns why it fired, if it did."""
        why = self.fired()
        try:
            self.proc.stdin.write(b"done\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        self.proc.wait()
        if why is None:
            rest = self.proc.stdout.read().decode().strip()  # type: ignore[union-attr]
            why = rest.removeprefix("fired: ") or None
        self.proc.stdout.close()  # type: ignore[union-attr]
        return why


def _criu_of(journal: Path) -> Task | None:
    started = Run(journal, read(journal)).events("criu")
    return Task(started[-1].pid, started[-1].starttime) if started else None


def main(kind: str, path: str, journal: str, max_freeze: str) -> None:
    # Not for us: a ^C to fscr's group, a SIGTERM or SIGHUP to the whole cgroup (systemctl
    # stop of a backup service): the watchdog ends when fscr's pipe closes, having thawed.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    deadline = time.monotonic() + float(max_freeze)
    cg, jpath = Cgroup(kind, Path(path)), Path(journal)
    os.write(1, b"ready\n")  # fscr freezes only now
    got = b""
    while True:
        left = deadline - time.monotonic()
        ready = select.select([0], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            why, grace = f"the tree was frozen longer than --max-freeze {max_freeze}s", 0.0
            break
        chunk = os.read(0, 64)
        got += chunk
        if b"done" in got:
            return
        if not chunk:
            why, grace = "fscr died while the tree was frozen", GRACE
            break
    criu = _criu_of(jpath)
    if criu is not None:
        settle(criu, grace)
    if cg.exists():
        cg.thaw()
    try:
        os.write(1, f"fired: {why}\n".encode())
    except BrokenPipeError:
        pass


if __name__ == "__main__":
    main(*sys.argv[1:])
