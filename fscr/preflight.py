"""Preflight: what of a tree lives outside the checkpoint's reach, found before freezing.

A tree that shares live state with processes outside it cannot be restored to one consistent
instant. Each such resource is a leak of one kind; by default any leak refuses the
checkpoint, and `--allow KIND,...` accepts kinds explicitly (recorded in the manifest):

  external-files  files open or mapped writable on filesystems that are not the volumes;
                  restored by reopening the path (its size must match then, see CRIU).
                  Shared anonymous memory, memfd and SysV shm are not files: they are
                  inside the checkpoint (CRIU dumps them) unless a process outside the tree
                  maps or holds the same object
  shared-memory   shared anonymous memory or a memfd that a process outside the tree maps
                  or holds too; restored as the tree's own (the outside process no longer
                  shares its writes)
  pipes           pipes and fifos whose other end an outside process holds; restored
                  disconnected (the task sees EOF or EPIPE, as if the peer had died)
  unix-sockets    unix sockets whose peer is outside; datagram ones are restored
                  disconnected (CRIU --ext-unix-sk), stream ones cannot be and stay refused
  namespaces      namespaces other than the host's that outside processes share
                  (a network namespace joined with `fscr run --netns` is handled, not a leak)
  devices         device files other than null, zero, random, urandom and terminals
  shm             SysV shared memory in an IPC namespace shared with outside processes:
                  CRIU cannot checkpoint it; always refused

Not leaks: TCP connections (decided by --tcp alone), append-only files (logs: CRIU accepts
their growth), and read-only files outside the volumes (binaries, libraries), which are
recorded with size and mtime and verified at restore.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .process.files import DELETED
from .process.tree import Task, all_pids, read_stat

if TYPE_CHECKING:
    from .process.sockets import Socket

KINDS = ("external-files", "shared-memory", "pipes", "unix-sockets", "namespaces", "devices",
         "shm")
NEVER_ALLOWED = {"shm"}
HARMLESS_DEVICES = {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/full",
                    "/dev/tty", "/dev/ptmx", "/dev/console"}
NAMESPACES = ("ipc", "uts", "mnt", "pid", "cgroup", "user")


@dataclass(frozen=True)
class Leak:
    kind: str
    pid: int
    what: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.what} (PID {self.pid}{', ' + self.detail if self.detail else ''})"


@dataclass(frozen=True)
class Unchanged:
    """A read-only file outside the volumes, verified at restore."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class Report:
    leaks: list[Leak] = field(default_factory=list)
    sockets: list[Socket] = field(default_factory=list)
    unchanged: list[Unchanged] = field(default_factory=list)
    needs: set[str] = field(default_factory=set)  # "shell-job", "file-locks", "ext-unix-sk"

    def refused(self, allow: set[str]) -> list[Leak]:
        out = []
        for leak in self.leaks:
            stream = leak.kind == "unix-sockets" and "stream" in leak.what
            if leak.kind in NEVER_ALLOWED or leak.kind not in allow or stream:
                out.append(leak)
        return out

    @property
    def connections(self) -> list[Socket]:
        """TCP connections: not leaks, decided by --tcp."""
        return [s for s in self.sockets if s.connected_tcp]

    def as_dict(self) -> dict:
        return {"leaks": [asdict(x) for x in self.leaks],
                "connections": [s.describe() for s in self.connections],
                "unchanged": [asdict(x) for x in self.unchanged], "needs": sorted(self.needs)}


class Holders:
    """Who holds which pipe, socket, shared-memory object or unlinked file, over every
    process: each map is built on first use only, as the scan of all processes is the
    costliest part of a preflight (it also runs while frozen)."""

    def __init__(self) -> None:
        self._map: dict[str, set[int]] | None = None
        self._hidden: dict[tuple[int, int], set[int]] | None = None

    def of(self, target: str) -> set[int]:
        if self._map is None:
            self._map = _holders()
        return self._map.get(target, set())

    def of_hidden(self, dev: int, ino: int) -> set[int]:
        """PIDs that map or hold by fd object (dev, ino): shared memory, a memfd, a file no
        name reaches any more."""
        if self._hidden is None:
            self._hidden = _hidden_holders()
        return self._hidden.get((dev, ino), set())


def _holders() -> dict[str, set[int]]:
    """{fd link target ("pipe:[N]", "socket:[N]"): PIDs holding it}, over every process."""
    out: dict[str, set[int]] = {}
    for pid in all_pids():
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for n in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{n}")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # gone, or a process even root may not inspect (PID 1 here)
            if target.startswith(("pipe:[", "socket:[")):
                out.setdefault(target, set()).add(pid)
    return out


SHMEM_NAMES = ("/dev/zero (deleted)", "/memfd:", "/SYSV")


def _is_shmem(path: str) -> bool:
    """Shared anonymous memory (the kernel names it /dev/zero), a memfd or a SysV segment:
    objects on the kernel's internal shmem mount that no path outside can reach."""
    return path.startswith(SHMEM_NAMES)


def _hidden_holders() -> dict[tuple[int, int], set[int]]:
    """{(dev, inode) of an object no path reaches: PIDs mapping it or holding it by fd}, over
    every process. Shared memory is read from the maps' text (device and inode are columns
    of it); only unlinked files and memfds are stat-ed (a btrfs file's device differs there)."""
    out: dict[tuple[int, int], set[int]] = {}
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        links = [f"/proc/{pid}/fd/{n}" for n in fds]
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            if _is_shmem(parts[5]):
                major, _, minor = parts[3].partition(":")
                dev = os.makedev(int(major, 16), int(minor, 16))
                out.setdefault((dev, int(parts[4])), set()).add(pid)
            elif parts[5].endswith(DELETED):
                links.append(f"/proc/{pid}/map_files/{parts[0]}")
        for link in links:
            try:
                target = os.readlink(link)
                if target.startswith("/memfd:") or target.endswith(DELETED):
                    st = os.stat(link)
                    out.setdefault((st.st_dev, st.st_ino), set()).add(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return out


def _comm(pid: int) -> str:
    st = read_stat(pid)
    return f"PID {pid} ({st.comm})" if st else f"PID {pid}"


def _is_tty(path: str) -> bool:
    return path.startswith(("/dev/pts/", "/dev/tty"))


def _fifo_holders(dev: int, ino: int, tree: set[int]) -> list[int]:
    out = []
    for pid in all_pids():
        if pid in tree:
            continue
        try:
            for n in os.listdir(f"/proc/{pid}/fd"):
                st = os.stat(f"/proc/{pid}/fd/{n}")
                if (st.st_dev, st.st_ino) == (dev, ino):
                    out.append(pid)
                    break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def _scan_fds(t: Task, devs: set[int], tree: set[int], holders: Holders,
              r: Report) -> None:
    base = f"/proc/{t.pid}/fd"
    try:
        names = sorted(os.listdir(base), key=int)
    except (FileNotFoundError, ProcessLookupError):
        return
    for n in names:
        try:
            target = os.readlink(f"{base}/{n}")
            st = os.stat(f"{base}/{n}")
            with open(f"/proc/{t.pid}/fdinfo/{n}") as f:
                info = f.read()
            flags = int(info.split("flags:")[1].split()[0], 8)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if "\nlock:" in info:  # fdinfo lists the file locks held through this fd
            r.needs.add("file-locks")
        if target.startswith("pipe:["):
            outside = sorted(holders.of(target) - tree)
            if outside:
                r.leaks.append(Leak("pipes", t.pid, f"fd {n} {target}",
                                    "other end held by " + ", ".join(map(_comm, outside))))
        elif stat.S_ISFIFO(st.st_mode):
            outside = _fifo_holders(st.st_dev, st.st_ino, tree)
            if outside:
                r.leaks.append(Leak("pipes", t.pid, f"fd {n} fifo {target}",
                                    "other end held by " + ", ".join(map(_comm, outside))))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            if _is_tty(target):
                r.needs.add("shell-job")
            elif target not in HARMLESS_DEVICES:
                r.leaks.append(Leak("devices", t.pid, f"fd {n} {target}"))
        elif stat.S_ISREG(st.st_mode) and st.st_dev not in devs:
            mode = flags & os.O_ACCMODE
            if _is_shmem(target):  # a memfd, or shared memory reopened via map_files
                _hidden("shared-memory", t.pid, f"fd {n} {target}", (st.st_dev, st.st_ino),
                        tree, holders, r)
            elif st.st_nlink == 0:  # no name reaches it: CRIU copies it (a ghost file)
                _hidden("external-files", t.pid, f"fd {n} {target}", (st.st_dev, st.st_ino),
                        tree, holders, r)
            elif mode == os.O_RDONLY:
                if _verifiable(target):
                    r.unchanged.append(Unchanged(target, st.st_size, st.st_mtime_ns))
            elif mode == os.O_WRONLY and flags & os.O_APPEND:
                continue  # a log: CRIU accepts an append-only file that grew
            else:
                r.leaks.append(Leak("external-files", t.pid, f"fd {n} {target}",
                                    "open for writing outside the volumes"))


def _verifiable(path: str) -> bool:
    """A read-only file whose size and mtime mean something at restore: a binary, a library,
    a configuration file. Not /proc or /sys (their mtimes are the reader's clock), nor what
    has no path (nsfs "net:[N]", anon inodes)."""
    return path.startswith("/") and not path.startswith(("/proc/", "/sys/"))


def _hidden(kind: str, pid: int, what: str, obj: tuple[int, int], tree: set[int],
            holders: Holders, r: Report) -> None:
    """Shared anonymous memory, a memfd, or a file unlinked outside the volumes: no path
    reaches it, and CRIU dumps it with the tree (an unlinked file as a ghost file, up to its
    --ghost-limit). A leak only when a process outside the tree maps or holds the same
    object: it would go on sharing what the restored tree no longer does."""
    outside = sorted(holders.of_hidden(*obj) - tree)
    if outside:
        r.leaks.append(Leak(kind, pid, what,
                            "also mapped or held by " + ", ".join(map(_comm, outside))))


def _scan_maps(t: Task, devs: set[int], tree: set[int], holders: Holders, r: Report,
               seen: set[tuple[int, int]], shared_ipc: bool) -> None:
    try:
        lines = open(f"/proc/{t.pid}/maps").read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        perms, path = parts[1], parts[5]
        major, _, minor = parts[3].partition(":")
        obj = (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
        if obj in seen:
            continue
        seen.add(obj)
        if path.startswith("/[aio]"):
            continue  # an AIO ring: the task's own, dumped by CRIU with its context
        if path.startswith("/SYSV"):
            if shared_ipc:
                r.leaks.append(Leak("shm", t.pid, f"SysV shared memory {path.split()[0]}",
                                    "its IPC namespace is the host's, shared with processes "
                                    "outside the tree"))
            continue  # in the tree's own IPC namespace: CRIU dumps it with the namespace
        if _is_shmem(path):
            _hidden("shared-memory", t.pid, f"mapping {path}", obj, tree, holders, r)
            continue
        try:  # maps shows a btrfs file's filesystem device, stat its subvolume's
            st = os.stat(f"/proc/{t.pid}/map_files/{parts[0]}")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if st.st_dev in devs:
            continue
        if not stat.S_ISREG(st.st_mode):
            if path not in HARMLESS_DEVICES:
                r.leaks.append(Leak("devices", t.pid, f"mapping {path}"))
        elif st.st_nlink == 0:
            _hidden("external-files", t.pid, f"mapping {path}", (st.st_dev, st.st_ino), tree,
                    holders, r)
        elif "w" in perms and perms.endswith("s"):
            r.leaks.append(Leak("external-files", t.pid, f"mapping {path}",
                                "shared and writable outside the volumes"))
        elif not path.endswith(" (deleted)") and _verifiable(path):
            r.unchanged.append(Unchanged(path, st.st_size, st.st_mtime_ns))


def _scan_unix(tasks: list[Task], tree: set[int], holders: Holders,
               r: Report) -> None:
    # Loaded here, not at the top: restore imports this module for changed() only, and
    # sock_diag's ctypes and socket cost its start-up ~7 ms. (The checkpoint's first scan
    # runs before the freeze, so the window never pays for the import.)
    from .process import sockets as sockets_mod
    r.sockets = sockets_mod.scan(tasks)
    for s in r.sockets:
        if s.family == "unix" and s.remote:
            outside = sorted(holders.of(f"socket:[{s.remote}]") - tree)
            if outside:
                r.leaks.append(Leak("unix-sockets", s.pid,
                                    f"fd {s.fd} unix {s.type} {s.local or '(unnamed)'}",
                                    "peer held by " + ", ".join(map(_comm, outside))))
                if s.type == "dgram":
                    r.needs.add("ext-unix-sk")


def host_ns(ns: str) -> int:
    """The host's namespace of kind `ns`: PID 1's, or fscr's own where PID 1 cannot be
    inspected (a sandbox's init may refuse even root)."""
    try:
        return os.stat(f"/proc/1/ns/{ns}").st_ino
    except PermissionError:
        return os.stat(f"/proc/self/ns/{ns}").st_ino


def _scan_namespaces(root: int, tree: set[int], r: Report) -> None:
    host = {ns: host_ns(ns) for ns in NAMESPACES}
    mine = {ns: os.stat(f"/proc/{root}/ns/{ns}").st_ino for ns in NAMESPACES}
    foreign = {ns for ns in NAMESPACES if mine[ns] != host[ns]}
    if not foreign:
        return
    for pid in all_pids():
        if pid in tree:
            continue
        for ns in sorted(foreign):
            try:
                if os.stat(f"/proc/{pid}/ns/{ns}").st_ino == mine[ns]:
                    r.leaks.append(Leak("namespaces", root, f"{ns} namespace {mine[ns]}",
                                        f"shared with {_comm(pid)}"))
                    foreign.discard(ns)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue


def run(tasks: list[Task], devs: set[int]) -> Report:
    """The preflight report for `tasks` (root first) with volumes on devices `devs`."""
    tree = {t.pid for t in tasks}
    holders = Holders()
    r = Report()
    seen: set[tuple[int, int]] = set()
    shared_ipc = os.stat(f"/proc/{tasks[0].pid}/ns/ipc").st_ino == host_ns("ipc")
    for t in tasks:
        _scan_fds(t, devs, tree, holders, r)
        _scan_maps(t, devs, tree, holders, r, seen, shared_ipc)
    _scan_unix(tasks, tree, holders, r)
    _scan_namespaces(tasks[0].pid, tree, r)
    r.unchanged = sorted(set(r.unchanged), key=lambda u: u.path)
    return r


CAP_SYS_RESOURCE = 24


def _ids(pid: int) -> tuple[str, str] | None:
    """The Uid: and Gid: lines of /proc/PID/status (real, effective, saved, fs)."""
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    got = {ln.split(":")[0]: " ".join(ln.split()[1:4]) for ln in lines
           if ln.startswith(("Uid:", "Gid:"))}
    return got.get("Uid", ""), got.get("Gid", "")


def undumpable_users(tasks: list[Task]) -> list[str]:
    """Tasks CRIU cannot dump from here: it reads each task's resource limits with prlimit(2),
    which needs CAP_SYS_RESOURCE unless the task's user and group ids are all the caller's.
    Empty where fscr has the capability."""
    caps = next((ln.split()[1] for ln in open("/proc/self/status").read().splitlines()
                 if ln.startswith("CapEff:")), "0")
    if int(caps, 16) >> CAP_SYS_RESOURCE & 1:
        return []
    mine = _ids(os.getpid())
    out = []
    for t in tasks:
        ids = _ids(t.pid)
        if ids is not None and ids != mine:
            out.append(f"{_comm(t.pid)} runs as uid {ids[0].split()[0]} gid "
                       f"{ids[1].split()[0]}")
    return out


def changed(files: list) -> list[str]:  # noqa: ANN001 - Unchanged or the manifest's record
    """Paths of recorded read-only files (path, size, mtime_ns) that are missing or differ
    now: restore refuses, doctor --for reports them."""
    out = []
    for u in files:
        try:
            st = os.stat(u.path)
            if (st.st_size, st.st_mtime_ns) == (u.size, u.mtime_ns):
                continue
        except OSError:
            pass
        out.append(u.path)
    return out


def refusal(leaks: list[Leak]) -> str:
    """One line: the refused leaks by kind, and what the user can do."""
    by_kind: dict[str, list[str]] = {}
    for leak in leaks:
        by_kind.setdefault(leak.kind, []).append(leak.describe())
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in by_kind.items())
    kinds = sorted(set(by_kind) - NEVER_ALLOWED)
    hint = f" Accept with --allow {','.join(kinds)}" if kinds else ""
    never = " (shm can never be allowed; unix stream sockets to outside peers cannot be restored)"
    return (f"preflight: {len(leaks)} resource(s) of the tree live outside the checkpoint: "
            f"{listed}.{hint}{never if set(by_kind) & {'shm', 'unix-sockets'} else ''}")
