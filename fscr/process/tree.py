"""Find a task tree in /proc and identify its tasks so a reused PID is never mistaken.

A task is (PID, start time): field 22 of /proc/PID/stat, in clock ticks since boot. Two
processes can share a PID over time, never both values.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadTarget

PROC = Path("/proc")


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    starttime: int


def read_stat(pid: int) -> Stat | None:
    """The parsed /proc/PID/stat, or None when the process is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text(errors="surrogateescape")  # comm: any bytes
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'.
    head, _, tail = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    # fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    return Stat(pid, comm, fields[0], int(fields[1]), int(fields[19]))


@dataclass(frozen=True)
class Task:
    pid: int
    starttime: int

    def alive(self) -> bool:
        """True while this very process (not a later one with its PID) exists."""
        st = read_stat(self.pid)
        return st is not None and st.starttime == self.starttime and st.state not in "ZX"

    def kill(self) -> None:
        """SIGKILL this very process if it still lives (a PID reused since is left alone;
        between the check and the signal, a PID is not reused without a wrap of its space)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir(PROC) if d.isdigit()]


def task_of(pid: int) -> Task:
    st = read_stat(pid)
    if st is None or st.state in "ZX":
        raise BadTarget(f"no such process: {pid}")
    return Task(pid, st.starttime)


def _children(pid: int) -> list[int] | None:
    """Children of `pid` from /proc/PID/task/*/children (None where the kernel lacks it)."""
    out: list[int] = []
    try:
        for tid in os.listdir(PROC / str(pid) / "task"):
            out += [int(c) for c in (PROC / str(pid) / "task" / tid / "children").read_text()
                    .split()]
    except FileNotFoundError:
        return None if not (PROC / str(pid)).exists() else out
    return out


def descendants(root: int) -> list[Task]:
    """`root` and every live descendant, root first, parents before children. Walks the
    tree through /proc/PID/task/*/children: cheap, as it runs inside the frozen window."""
    out = [task_of(root)]
    i = 0
    while i < len(out):
        kids = _children(out[i].pid)
        if kids is None:
            return _descendants_by_scan(root)
        for pid in sorted(kids):
            st = read_stat(pid)
            if st is not None and st.state not in "ZX":
                out.append(Task(pid, st.starttime))
        i += 1
    return out


def _descendants_by_scan(root: int) -> list[Task]:
    children: dict[int, list[Stat]] = {}
    for pid in all_pids():
        st = read_stat(pid)
        if st is not None and st.state not in "ZX":
            children.setdefault(st.ppid, []).append(st)
    out = [task_of(root)]
    i = 0
    while i < len(out):
        for st in sorted(children.get(out[i].pid, []), key=lambda s: s.pid):
            out.append(Task(st.pid, st.starttime))
        i += 1
    return out


def is_pidns_init(pid: int) -> bool:
    """Whether `pid` is the init (PID 1) of a PID namespace below the host's (`fscr run
    --pidns`): CRIU then dumps the namespace, and restores recreate it."""
    try:
        for line in (PROC / str(pid) / "status").read_text(errors="surrogateescape").splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                return len(ids) > 1 and ids[-1] == "1"
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def ancestors(pid: int) -> list[int]:
    """PIDs from `pid` up to PID 1, both included."""
    chain = []
    while pid > 0:
        chain.append(pid)
        st = read_stat(pid)
        if st is None:
            break
        pid = st.ppid
    return chain


def refuse_unsafe_root(pid: int) -> None:
    """Refuse targets that can never be checkpointed: PID 1, kernel threads, fscr itself."""
    if pid == 1:
        raise BadTarget("refusing to checkpoint PID 1 (the host's init)")
    st = read_stat(pid)
    if st is None or st.state in "ZX":
        raise BadTarget(f"no such process: {pid}")
    if pid == 2 or st.ppid == 2:
        raise BadTarget(f"PID {pid} ({st.comm}) is a kernel thread")
    own = set(ancestors(os.getpid()))
    tree_pids = {t.pid for t in descendants(pid)}
    if own & tree_pids:
        raise BadTarget(f"PID {pid} is fscr itself or one of its ancestors")


def settle(task: Task, grace: float) -> None:
    """Wait up to `grace` seconds for a helper (CRIU) to finish, then SIGKILL it. CRIU's
    parasite code may be inside the tasks it works on: killing it is the last resort."""
    deadline = time.monotonic() + grace
    while task.alive():
        if time.monotonic() >= deadline:
            task.kill()
        time.sleep(0.01)
