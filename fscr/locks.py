"""Locks per workload and per volume, so two runs never interleave on the same thing.

flock(2) on files in /run/fscr/locks (tmpfs, root-only): the kernel drops a lock when its
holder dies, so a killed fscr never leaves a stale lock. Each file records its holder's PID
for the message a waiting run shows.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput, Busy

LOCK_DIR = Path(os.environ.get("FSCR_LOCK_DIR", "/run/fscr/locks"))


def _default_wait() -> float:
    """FSCR_LOCK_WAIT seconds (default 5); read when a lock is taken, so a bad value is one
    line of the command that waits, not an error at import."""
    raw = os.environ.get("FSCR_LOCK_WAIT", "5")
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= 86400:  # nan fails every comparison
        raise BadInput(f"FSCR_LOCK_WAIT={raw[:40]!r}: use seconds from 0 to 86400")
    return wait


# ---------------------------------------------------------------------------- the lock keys
# Every lock's name is built here, so two commands that must exclude each other (a restore
# and gc, a checkpoint and delete) build the same key for the same thing.

def volume_lock(path: Path) -> str:
    return f"volume {os.path.realpath(path)}"


def restore_lock(ckpt_id: str) -> str:
    """Held by every restore of a checkpoint: they share its pidfile and its restore log."""
    return f"restore of checkpoint {ckpt_id}"


def workload_lock(pid: int, starttime: int) -> str:
    """The workload rooted at this task (PID and start time: a reused PID is another one)."""
    return f"workload PID {pid} (start {starttime})"


def backup_job_lock(job: str) -> str:
    """Held by a backup run of job `job` and by a move of its workload: they never overlap."""
    return f"backup job {job}"


def _path(key: str) -> Path:
    return LOCK_DIR / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")


def _holder(fd: int) -> str:
    data = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return f"PID {data}" if data else "another fscr run"


@contextmanager
def hold(keys: list[str], notify: Callable[[str], None] = lambda _: None,
         wait: float | None = None) -> Iterator[None]:
    """Hold every lock in `keys` (taken in sorted order: no deadlock between runs), waiting up
    to `wait` seconds for each; raise Busy naming the holder otherwise."""
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    wait = _default_wait() if wait is None else wait
    fds: list[int] = []
    try:
        for key in sorted(set(keys)):
            fd = os.open(_path(key), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            deadline = time.monotonic() + wait
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise Busy(f"{key} is busy: {_holder(fd)} holds it; try again later")
                if not told:
                    notify(f"waiting for {key} ({_holder(fd)} holds it)")
                    told = True
                time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing drops the flock
