"""`fscr run`: start a workload the way CRIU can checkpoint it whole.

Detached (new session), stdin from /dev/null, stdout and stderr to a log or /dev/null, no fd
inherited from the caller (else CRIU dumps pipes to processes outside the tree), in a fresh
cgroup of its own so it can be frozen atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, Busy
from ..names import FSCR_GROUP
from . import freezer
from .netns import entering, is_netns
from .target import name_cgroup
from .tree import read_stat

CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Started:
    pid: int
    cgroup: str  # as /proc/PID/cgroup shows it


def run(argv: list[str], name: str | None = None, log: str | None = None,
        netns: str | None = None, pidns: bool = False) -> Started:
    """Start `argv` detached in a fresh cgroup (and network namespace `netns`, joined by
    setns: only the network namespace changes, so CRIU can dump the tree from the host).
    With `pidns`, argv runs as init (PID 1) of a new PID namespace: its restores get the
    same PIDs inside, whatever is taken outside. On failure nothing is left running and the
    cgroup is removed."""
    if not argv:
        raise BadInput("fscr run needs a command after --")
    if netns is not None and not is_netns(netns):
        raise BadInput(f"{netns} is not a network namespace (e.g. /run/netns/NAME)")
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
    try:
        pid = (_start_init if pidns else _start)(argv, out, cg.path / "cgroup.procs", netns)
    except BaseException:
        cg.remove()
        raise
    finally:
        os.close(out)
    return Started(pid, cg.rel)


def _start(argv: list[str], out: int, procs: Path, netns: str | None) -> int:
    enter = entering(netns)

    def prepare() -> None:  # runs in the child, before exec
        if enter is not None:
            enter()
        procs.write_text("0")

    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 close_fds=True, start_new_session=True, preexec_fn=prepare)
    except (OSError, subprocess.SubprocessError) as e:
        raise BadInput(f"cannot start {argv[0]}: {getattr(e, 'strerror', None) or e}") from None
    return child.pid


def _start_init(argv: list[str], out: int, procs: Path, netns: str | None) -> int:
    """Fork a child that joins the cgroup (and netns), unshares its PID namespace and forks
    the init, which starts a session of its own inside (CRIU wants the session leader inside
    the namespace) and execs argv. The child reports the init's PID and exits; an exec that
    fails is reported through a close-on-exec pipe, as subprocess does."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise BadInput(f"cannot start {argv[0]}: no such file or command")
    enter = entering(netns)
    report_r, report_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child only
        try:
            os.close(report_r)
            os.close(err_r)
            if enter is not None:
                enter()
            procs.write_text("0")
            if _libc.unshare(CLONE_NEWPID) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")
            init = os.fork()
            if init == 0:
                try:
                    os.setsid()
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                    os.closerange(3, err_w)
                    os.closerange(err_w + 1, 1 << 16)
                    os.execv(exe, argv)
                except OSError as e:
                    os.write(err_w, f"{e.strerror}".encode())
                finally:
                    os._exit(127)
            os.write(report_w, str(init).encode())
            os._exit(0)
        except BaseException as e:
            os.write(err_w, str(e).encode()[:500])
            os._exit(127)
    os.close(report_w)
    os.close(err_w)
    try:
        reported = os.read(report_r, 32)
        error = b"".join(iter(lambda: os.read(err_r, 512), b""))
    finally:
        os.close(report_r)
        os.close(err_r)
        os.waitpid(child, 0)
    if error or not reported:
        if reported:
            _reap_failed(int(reported))
        raise BadInput(f"cannot start {argv[0]} in a new PID namespace: "
                       f"{error.decode(errors='replace') or 'the launcher died'}")
    return int(reported)


def _reap_failed(pid: int) -> None:
    """An init whose exec failed exits at once: make sure, so its cgroup can go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        st = read_stat(pid)
        if st is None or st.state in "ZX":
            return
        time.sleep(0.01)
