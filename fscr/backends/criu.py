"""CRIU, driven over its RPC interface (`criu swrk` on a socketpair, as runc, crun and podman
drive it): found, checked, dump and restore side by side.

Notifications are on, so a dump hands fscr CRIU's stages (DumpHooks): `pre-dump` before it
seizes anything (fscr freezes), `query-ext-files` once the tree is stopped (fscr names the
external files), `post-dump` with the images written and every task still stopped (fscr
relinks and snapshots). Failures come back as CRIU's own message and error number; its log is
still written (and kept on failure) for the line that explains them.
"""

from __future__ import annotations

import array
import errno
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import netlock
from ..errors import CriuFailed, MissingDependency, NoSpace
from ..process.mountns import chain, private_binds
from ..process.netns import entering
from . import DumpHooks, DumpRequest, RestoreRequest
from .criu_images import ghosts
from .criu_log import explain, explains, mentions

MIN_VERSION = (4, 2, 1)
# Where scripts/setup installs it; FSCR_CRIU_PREFIX moves it, for setup and fscr alike.
OWN_PREFIX = "/opt/fscr/criu-4.2.1"


@dataclass(frozen=True)
class Found:
    path: str | None
    why: str  # how it was chosen, or why none was


def version_of(path: str) -> tuple[int, ...] | None:
    """`criu --version` of a binary (doctor's report). A run does not ask it this way: the
    exec costs ~6-10 ms of every command; the CRIU a run starts says it over RPC (Swrk)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Version:\s*([0-9][0-9.]*)", out)
    return tuple(int(x) for x in m.group(1).strip(".").split(".")) if m else None


def shown(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def find() -> Found:
    """CRIU in this order: $FSCR_CRIU, fscr's own versioned prefix, PATH; the first that
    exists is used, and must be >= 4.2.1 (asked when a run starts it)."""
    env = os.environ.get("FSCR_CRIU")
    if env:
        candidates = [(env, "from FSCR_CRIU")]
    else:
        own = os.environ.get("FSCR_CRIU_PREFIX", OWN_PREFIX) + "/sbin/criu"
        candidates = [(own, "fscr's own build"), (shutil.which("criu"), "from PATH")]
    for path, how in candidates:
        if path and os.access(path, os.X_OK):
            return Found(path, how)
    return Found(None, "; ".join(f"{path or 'criu on PATH'}: not found" for path, _ in candidates))


def require(version: bool = False) -> str:
    """The CRIU to run. `version`: ask `criu --version` now (an exec, ~6-10 ms) for a caller
    that cannot wait for the version the started CRIU tells over RPC (Swrk): a restore that
    kills a running tree or merges an LVM snapshot before CRIU starts, the bench, ZDTM."""
    found = find()
    if found.path is None:
        raise MissingDependency(f"CRIU >= 4.2.1 not found ({found.why}); run scripts/setup")
    if version:
        v = version_of(found.path)
        if v is None or v < MIN_VERSION:
            raise MissingDependency(_too_old(found.path, v))
    return found.path


def _too_old(path: str, version: tuple[int, ...] | None) -> str:
    return f"{path} is CRIU {shown(version)}: fscr needs >= 4.2.1; run scripts/setup"


def rpc() -> ModuleType:
    """pycriu's rpc_pb2, loaded alone: importing pycriu itself loads every image module
    (~50 ms), which a restore does not need. Registered under pycriu's own name, so a later
    `import pycriu` reuses it instead of registering rpc.proto twice."""
    name = "pycriu.rpc_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("pycriu")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("pycriu (CRIU 4.2.1's Python bindings) is not installed; "
                                "run scripts/setup")
    path = Path(next(iter(spec.submodule_search_locations))) / "rpc_pb2.py"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None or not path.exists():
        raise MissingDependency(f"pycriu has no {path.name}; run scripts/setup")
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = mod
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise MissingDependency(f"pycriu's RPC messages do not load ({e}); run scripts/setup") \
            from None
    return mod


_MAX_MSG = 1 << 20  # a criu_resp is a few hundred bytes; a datagram larger is cut
_MAX_FDS = 4


class Swrk:
    """One `criu swrk` process and its end of the socketpair: requests out, responses in.

    CRIU learns fscr's PID from the socket (SO_PEERCRED) and opens the directory fds fscr
    names through /proc/<fscr>/fd/N."""

    def __init__(self, what: str, log: Path, netns: str | None,
                 pass_fds: tuple[int, ...] = (), binds: tuple[tuple[str, str], ...] = (),
                 own_group: bool = False):
        self.what, self.log = what, log
        path = require()
        self.sk, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # CRIU says little on stderr (its log is the log file); a file, not a pipe, so
        # nothing blocks if it does say more.
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [path, "swrk", str(theirs.fileno())], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self.stderr,
                pass_fds=(theirs.fileno(), *pass_fds),
                # own_group (dumps): a ^C or SIGHUP at the terminal reaches fscr alone, which
                # ends the run through the socket at CRIU's next step; signalled itself, CRIU
                # would die mid-dump (its parasite in the tasks, a TCP lock left in place).
                # A restore stays in the terminal's group: a --shell-job tree is given it.
                process_group=0 if own_group else None,
                preexec_fn=chain(entering(netns), private_binds(list(binds))))
        except (OSError, subprocess.SubprocessError) as e:
            self.sk.close()
            self.stderr.close()
            raise CriuFailed(what, f"cannot start CRIU: {e}") from None
        finally:
            theirs.close()
        try:
            self._check_version(path)
        except BaseException:
            self.proc.kill()
            self.close()
            self.stderr.close()
            raise

    def _check_version(self, path: str) -> None:
        """Asked of the CRIU just started, which then waits for the run's own request
        (keep_open): no exec of `criu --version` in every command (~6-10 ms)."""
        pb = rpc()
        self.sk.settimeout(10)  # a binary that is no CRIU may never answer
        try:
            self.send(pb.criu_req(type=pb.VERSION, keep_open=True))
            resp = self.recv()
        except CriuFailed:  # no answer at all: not a CRIU that speaks this RPC
            said = (self.stderr_text().strip().splitlines() or ["nothing on stderr"])[-1]
            raise MissingDependency(f"{path} gave no answer to CRIU's VERSION request ({said}): "
                                    "CRIU >= 4.2.1 is required; run scripts/setup") from None
        self.sk.settimeout(None)
        if not resp.success or not resp.HasField("version"):
            raise MissingDependency(f"{path} does not tell its version over RPC: CRIU >= 4.2.1 "
                                    "is required; run scripts/setup")
        v = resp.version
        version = (v.major_number, v.minor_number, v.sublevel)
        if version < MIN_VERSION:
            raise MissingDependency(_too_old(path, version))

    def send(self, req: Any) -> None:
        try:
            self.sk.send(req.SerializeToString())
        except OSError as e:
            raise self.gone(e) from None

    def recv(self) -> Any:
        try:
            data, anc, _, _ = self.sk.recvmsg(_MAX_MSG, socket.CMSG_SPACE(_MAX_FDS * 4))
        except OSError as e:
            raise self.gone(e) from None
        for level, kind, payload in anc:  # an fd CRIU hands over (a pty master): not ours
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            raise self.gone(None)
        resp = rpc().criu_resp()
        resp.ParseFromString(data)
        return resp

    def gone(self, e: OSError | None) -> CriuFailed:
        """CRIU closed the socket without an answer: it died (or was killed)."""
        if isinstance(e, TimeoutError):  # asked with a time limit (its version): it hangs
            self.proc.kill()
        self.close()
        why = explain(self.log, self.stderr_text())
        if why.cause == "CRIU gave no message":
            code = self.proc.returncode
            cause = f"CRIU exited without an answer (status {code})" + (f": {e}" if e else "")
            return CriuFailed(self.what, cause, None, self.log)
        return CriuFailed(self.what, why.cause, why.hint, self.log)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def close(self) -> None:
        """Close fscr's end and reap CRIU (it exits once its request is served)."""
        self.sk.close()  # idempotent, as is wait
        interrupted = False
        while True:  # a second ^C must not thaw the tree before CRIU has let it go
            try:
                self.proc.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def failed(self, resp: Any) -> CriuFailed | NoSpace:
        """CRIU's own error (cr_errmsg, cr_errno), with the line of its log that explains it
        where the log says more than the last error."""
        if mentions(self.log, "No space left on device") or resp.cr_errno == errno.ENOSPC:
            return NoSpace(f"CRIU {self.what} failed: no space left on device "
                           f"(log: {self.log})")
        why = explain(self.log, self.stderr_text())
        own = resp.cr_errmsg.strip().rstrip(".") if resp.HasField("cr_errmsg") else ""
        if own and not explains(own):
            own = ""
        if why.cause == "CRIU gave no message":
            cause = own or why.cause
        else:
            cause = why.cause if not own or own in why.cause else f"{why.cause} (CRIU: {own})"
        if resp.HasField("cr_errno") and resp.cr_errno:
            cause += f" [errno {resp.cr_errno}: {os.strerror(resp.cr_errno)}]"
        return CriuFailed(self.what, cause, why.hint, self.log)


def _serve(swrk: Swrk, req: Any, answer: Callable[[str, Any], Any]) -> Any:
    """Send `req` and answer CRIU's notifications until its final response; returns it.

    `answer(script, notify)` runs fscr's part of a stage and returns the criu_opts to send
    back (or None). If it raises, CRIU is told the stage failed (it then releases the tree
    as it found it) and, once CRIU has answered, the hook's exception is raised: the cause is
    fscr's, not CRIU's."""
    pb = rpc()
    try:
        return _notified(swrk, req, answer, pb)
    except BaseException:
        # ^C or a bug while CRIU waits on fscr: closing the socket makes CRIU fail its run
        # at once (letting the tree go) instead of waiting on a dead peer.
        swrk.close()
        raise


def _notified(swrk: Swrk, req: Any, answer: Callable[[str, Any], Any], pb: ModuleType) -> Any:
    hook_error: BaseException | None = None
    swrk.send(req)
    while True:
        resp = swrk.recv()
        if resp.type != pb.NOTIFY:
            swrk.close()
            if hook_error is not None:
                raise hook_error
            if not resp.success:
                raise swrk.failed(resp)
            return resp
        reply = pb.criu_req(type=pb.NOTIFY, notify_success=True)
        if hook_error is None:
            try:
                opts = answer(resp.notify.script, resp.notify)
                if opts is not None:
                    reply.opts.CopyFrom(opts)
            except BaseException as e:  # told to CRIU, re-raised once it has let go
                hook_error = e
                reply.notify_success = False
        else:
            reply.notify_success = False
        try:
            swrk.send(reply)
        except CriuFailed:
            if hook_error is not None:
                raise hook_error from None
            raise


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _base_opts(images: int, work: int, log: Path, level: int,
               options: frozenset[str], tcp: str) -> Any:
    """What dump and restore share: where images and log go (directories CRIU opens as
    /proc/<fscr>/fd/N; the log is named in the work dir), the stages as notifications, what
    preflight found the tree needs (a terminal, file locks, unix sockets whose peer is
    outside, restored disconnected) and the TCP mode."""
    opts = rpc().criu_opts(images_dir_fd=images, work_dir_fd=work, log_file=log.name,
                           log_level=level, notify_scripts=True)
    opts.shell_job = "shell-job" in options
    opts.file_locks = "file-locks" in options
    opts.ext_unix_sk = "ext-unix-sk" in options
    # nftables, not CRIU's default iptables: its lock is a table of its own, named after the
    # dump's run id (netlock.py), so each checkpoint's lock can be found and removed alone.
    if tcp == "established":
        opts.tcp_established = True
        opts.network_lock = rpc().NFTABLES
    elif tcp == "close":
        opts.tcp_close = True
    return opts


class Criu:
    name = "criu"
    writes_image = True

    def check(self, version: bool = False) -> None:
        require(version)
        rpc()

    def dump(self, req: DumpRequest, hooks: DumpHooks) -> str | None:
        pb = rpc()
        images, work = _dir_fd(req.images), _dir_fd(req.log.parent)
        try:
            # -v3 (info): "Dumping finished successfully" and the run id are logged there.
            opts = _base_opts(images, work, req.log, 3, req.options, req.tcp)
            opts.pid = req.root_pid
            opts.leave_running = req.leave_running
            # fscr freezes this cgroup itself on pre-dump; CRIU must be told (a frozen task
            # it was not told of hangs its seize), and then seizes the frozen tasks at once.
            opts.freeze_cgroup = str(req.freeze_cgroup)
            # A connection whose handshake completed while the tree was stopped waits, not
            # yet accepted, in a listener's queue: CRIU cannot dump it ("In-flight
            # connection") and fails the whole dump. Skipped, it is served by the running
            # tree (or, restored, its client sees a reset and retries).
            opts.tcp_skip_in_flight = True

            def answer(script: str, _notify: Any) -> Any:
                if script == "pre-dump":
                    hooks.stop()
                elif script == "query-ext-files":
                    # criu_opts' images_dir_fd is a required field; CRIU reads `external`.
                    return pb.criu_opts(images_dir_fd=-1, external=hooks.externals())
                elif script == "post-dump":
                    hooks.dumped()
                return None

            swrk = Swrk("dump", req.log, req.netns, own_group=True)
            try:
                hooks.started(swrk.proc.pid)
            except BaseException:
                swrk.proc.kill()
                swrk.close()
                raise
            _serve(swrk, pb.criu_req(type=pb.DUMP, opts=opts), answer)
        finally:
            os.close(images)
            os.close(work)
        return netlock.of_images(req.images) if req.tcp == "established" else None

    def copied_unlinked(self, images: Path, under: list[Path]) -> list[str]:
        return ghosts(images, under)

    def restore(self, req: RestoreRequest, started: Callable[[int], None]) -> int:
        pb = rpc()
        pidfile = req.pidfile
        pidfile.unlink(missing_ok=True)
        images, work = _dir_fd(req.images), _dir_fd(req.log.parent)
        try:
            # The work dir, not the image dir, takes the log and stats-restore: the image dir
            # must stay as dumped (its files are checksummed in the manifest). Level 2: fscr
            # reads only the errors; at info level the log of 10 processes of 64 MB is 9 MB
            # and costs 0.2 s.
            opts = _base_opts(images, work, req.log, 2, req.options, req.tcp)
            if req.binds:
                _by_path(opts, req.images, req.log.parent)
            for fd, key in req.inherit:
                opts.inherit_fd.add(key=key, fd=fd)
            if req.cgroup is not None:
                # CRIU names cgroup2's controller "" ("[controller:]/newroot", criu/config.c).
                kind, path = req.cgroup
                opts.cg_root.add(ctrl="" if kind == "v2" else "freezer", path=path)
            opts.lazy_pages = req.lazy  # RPC's lazy_pages is --lazy-pages

            def answer(script: str, notify: Any) -> None:
                # The tree exists from here (it resumes after pre-resume): its root's PID is
                # written where gc looks, in case fscr dies before CRIU's answer.
                if script == "post-restore":
                    if notify.HasField("pid"):
                        _write_pid(pidfile, notify.pid)
                    if req.before_resume is not None:
                        req.before_resume()

            swrk = Swrk("restore", req.log, req.netns, tuple(fd for fd, _ in req.inherit),
                        req.binds)
            try:
                started(swrk.proc.pid)
            except BaseException:
                swrk.proc.kill()
                swrk.close()
                raise
            resp = _serve(swrk, pb.criu_req(type=pb.RESTORE, opts=opts), answer)
        finally:
            os.close(images)
            os.close(work)
            (req.log.parent / _CONF).unlink(missing_ok=True)
        return resp.restore.pid


_CONF = "criu-rpc.conf"


def _by_path(opts: Any, images: Path, work: Path) -> None:
    """Name the image and work directories by path, not by fscr's fds: a CRIU started in a
    mount namespace of its own (restore --beside) reaching its work dir through
    /proc/<fscr>/fd/N lands on a mount of fscr's namespace, where it cannot mount its cgroup
    yard (EINVAL). The work dir has no RPC field of its own: only CRIU's RPC config file
    sets it by path."""
    opts.images_dir_fd = -1
    opts.images_dir = str(images)
    opts.ClearField("work_dir_fd")
    conf = work / _CONF
    conf.write_text(f"work-dir {work}\n")
    opts.config_file = str(conf)


def _write_pid(path: Path, pid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{pid}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
