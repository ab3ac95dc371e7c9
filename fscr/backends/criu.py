"""CRIU, driven as a subprocess: found, checked, dump and restore side by side."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CriuFailed, MissingDependency, NoSpace
from ..process.mountns import chain, private_binds
from ..process.netns import entering
from . import DumpRequest, RestoreRequest
from .criu_log import explain, lock_table, mentions

MIN_VERSION = (4, 2, 1)
# Where scripts/setup installs it; FSCR_CRIU_PREFIX moves it, for setup and fscr alike.
OWN_PREFIX = "/opt/fscr/criu-4.2.1"


@dataclass(frozen=True)
class Found:
    path: str | None
    version: tuple[int, ...] | None
    why: str  # how it was chosen, or why none was


def version_of(path: str) -> tuple[int, ...] | None:
    """CRIU's version, asked once per binary (path, inode, mtime) and process: a run of
    `criu --version` costs ~10 ms, and the dump asks again inside the frozen window."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _version_of(path, st.st_ino, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _version_of(path: str, _ino: int, _mtime_ns: int) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    m = re.search(r"Version:\s*([0-9][0-9.]*)", out)
    return tuple(int(x) for x in m.group(1).strip(".").split(".")) if m else None


def find() -> Found:
    """CRIU in this order: $FSCR_CRIU, fscr's own versioned prefix, PATH; >= 4.2.1 required."""
    env = os.environ.get("FSCR_CRIU")
    if env:
        candidates = [(env, "from FSCR_CRIU")]
    else:
        own = os.environ.get("FSCR_CRIU_PREFIX", OWN_PREFIX) + "/sbin/criu"
        candidates = [(own, "fscr's own build"), (shutil.which("criu"), "from PATH")]
    tried = []
    for path, how in candidates:
        if not path or not os.access(path, os.X_OK):
            tried.append(f"{path or 'criu on PATH'}: not found")
            continue
        ver = version_of(path)
        if ver is None or ver < MIN_VERSION:
            shown = ".".join(map(str, ver)) if ver else "unknown"
            tried.append(f"{path}: version {shown} < 4.2.1")
            continue
        return Found(path, ver, how)
    return Found(None, None, "; ".join(tried))


def require() -> str:
    found = find()
    if found.path is None:
        raise MissingDependency(f"CRIU >= 4.2.1 not found ({found.why}); run scripts/setup")
    return found.path


def _run(argv: list[str], log: Path, what: str, started: Callable[[int], None],
         netns: str | None, pass_fds: tuple[int, ...] = (),
         binds: tuple[tuple[str, str], ...] = ()) -> None:
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, pass_fds=pass_fds,
                                preexec_fn=chain(entering(netns), private_binds(list(binds))))
    except (OSError, subprocess.SubprocessError) as e:
        raise CriuFailed(f"cannot start CRIU {what}: {e}") from None
    try:
        started(proc.pid)
    finally:
        _, stderr = proc.communicate()
    if proc.returncode != 0:
        if mentions(log, "No space left on device") or "No space left" in stderr:
            raise NoSpace(f"CRIU {what} failed: no space left on device (log: {log})")
        why = explain(log, stderr)
        raise CriuFailed(what, why.cause, why.hint, log)


def _tcp_options(tcp: str) -> list[str]:
    # nftables, not CRIU's default iptables: its lock is a table of its own, named after the
    # dump's run id (CRIU-<uuid>), so each checkpoint's lock can be found and removed alone.
    if tcp == "established":
        return ["--tcp-established", "--network-lock", "nftables"]
    if tcp == "close":
        return ["--tcp-close"]
    return []


def _options(options: frozenset[str]) -> list[str]:
    """What preflight found the tree needs: a terminal, file locks, unix datagram sockets
    whose peer is outside (restored disconnected)."""
    known = {"shell-job": "--shell-job", "file-locks": "--file-locks",
             "ext-unix-sk": "--ext-unix-sk"}
    return [known[o] for o in sorted(options)]


class Criu:
    name = "criu"
    writes_image = True

    def check(self) -> None:
        require()

    def dump(self, req: DumpRequest, started: Callable[[int], None]) -> str | None:
        argv = [require(), "dump", "-t", str(req.root_pid), "-D", str(req.images),
                "-o", str(req.log), "-v3", "--freeze-cgroup", str(req.freeze_cgroup)]
        if req.leave_running:
            argv.append("--leave-running")
        # A connection whose handshake completed while the tree was stopped waits, not yet
        # accepted, in a listener's queue: CRIU cannot dump it ("In-flight connection") and
        # fails the whole dump. Skipped, it is served by the running tree (or, restored, its
        # client sees a reset and retries, as for any server restart).
        argv.append("--skip-in-flight")
        argv += _tcp_options(req.tcp) + _options(req.options)
        for key in req.externals:
            argv += ["--external", key]
        _run(argv, req.log, "dump", started, req.netns)
        return lock_table(req.log) if req.tcp == "established" else None

    def restore(self, req: RestoreRequest, started: Callable[[int], None]) -> int:
        pidfile = req.pidfile
        pidfile.unlink(missing_ok=True)
        # -W: CRIU writes stats-restore to its work dir; the image dir must stay as dumped
        # (its files are checksummed in the manifest). -v2: fscr reads only the errors; at
        # info level the log of 10 processes of 64 MB is 9 MB and costs 0.2 s (debug: 20 MB,
        # 0.5 s).
        argv = [require(), "restore", "-D", str(req.images), "-W", str(req.images.parent),
                "-o", str(req.log), "-v2", "--restore-detached", "--pidfile", str(pidfile)]
        argv += _tcp_options(req.tcp) + _options(req.options)
        if req.lazy:
            argv.append("--lazy-pages")
        for fd, key in req.inherit:
            argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
        if req.cgroup is not None:
            # CRIU names cgroup2's controller "" ("[controller:]/newroot", criu/config.c).
            kind, path = req.cgroup
            argv += ["--cgroup-root", f"{'' if kind == 'v2' else 'freezer'}:{path}"]
        _run(argv, req.log, "restore", started, req.netns, tuple(fd for fd, _ in req.inherit),
             req.binds)
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            raise CriuFailed(f"CRIU restore wrote no pidfile {pidfile} (log: {req.log})") from None
