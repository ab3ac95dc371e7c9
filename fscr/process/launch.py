"""`fscr run`: start a workload the way CRIU can checkpoint it whole.

Detached (new session), stdin from /dev/null, stdout and stderr to a log or /dev/null, no fd
inherited from the caller (else CRIU dumps pipes to processes outside the tree), in a fresh
cgroup of its own so it can be frozen atomically.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, Busy
from ..names import FSCR_GROUP
from . import freezer
from .netns import entering
from .target import name_cgroup


@dataclass(frozen=True)
class Started:
    pid: int
    cgroup: str  # as /proc/PID/cgroup shows it


def run(argv: list[str], name: str | None = None, log: str | None = None,
        netns: str | None = None) -> Started:
    """Start `argv` detached in a fresh cgroup (and network namespace `netns`, joined by
    setns: only the network namespace changes, so CRIU can dump the tree from the host)."""
    if not argv:
        raise BadInput("fscr run needs a command after --")
    if netns is not None and not os.path.exists(netns):
        raise BadInput(f"no network namespace {netns}")
    rel = name_cgroup(name) if name else f"{FSCR_GROUP}/run_{secrets.token_hex(4)}"
    cg = freezer.at(rel)
    if cg.exists() and cg.procs():
        raise Busy(f"a workload named {name} is already running (cgroup {cg.path})")
    # O_APPEND: CRIU skips its size check only for files opened so (criu/files-reg.c); any
    # other log that grows after the checkpoint would fail restore with "bad size".
    try:
        out = (os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log
               else os.open(os.devnull, os.O_WRONLY))
    except OSError as e:
        raise BadInput(f"cannot open log {log}: {e.strerror}") from None
    cg = freezer.ensure(rel)
    procs = cg.path / "cgroup.procs"

    enter = entering(netns)

    def prepare() -> None:  # runs in the child, before exec
        if enter is not None:
            enter()
        Path(procs).write_text("0")

    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 close_fds=True, start_new_session=True,
                                 preexec_fn=prepare)
    except OSError as e:
        cg.remove()
        raise BadInput(f"cannot start {argv[0]}: {e.strerror}") from None
    finally:
        os.close(out)
    return Started(child.pid, cg.rel)
