"""The runner's test bed, and the undoing of everything a test run leaves behind.

A loopback btrfs filesystem of its own; one area per test and mode on it; commands run with a
deadline; and cleanup that proves each thing is the run's own before it removes it: processes
by PID (this process is their child subreaper, so every orphan of a test, CRIU or fscr comes
to it), the cgroups `fscr run` made for the run, network-lock rules and tables that appeared
during the run, subvolumes and checkpoints in the run's own areas.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import btrfsutil

from fscr.process import freezer

PR_SET_CHILD_SUBREAPER = 36
IPTABLES = ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy")
SOCCR_MARK = "0xc114"  # the mark CRIU's iptables lock rules carry (criu/netfilter.c)
LEGACY_NAMES = {"iptables-legacy": "/proc/net/ip_tables_names",
                "ip6tables-legacy": "/proc/net/ip6_tables_names"}


class Timeout(Exception):
    """A stage outlived the test's deadline; what ran was killed."""


@dataclass(frozen=True)
class Done:
    rc: int
    out: str
    err: str


def _prctl_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of `pid`, None when it is gone."""
    try:
        # A task's name is any bytes (one named b"sl\xffeep" ran here): not always UTF-8.
        raw = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rpartition(")")[2].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running or stopped: neither gone nor a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def children() -> list[int]:
    """This process's children, from /proc."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None and st[1] == me:
            out.append(int(name))
    return out


class Reaper:
    """Makes this process the child subreaper of everything it starts, and reaps the dead
    (PID 1 here reaps orphans late; CRIU needs a killed tree's PIDs free to restore it)."""

    def __init__(self) -> None:
        self.keep: set[int] = set()  # children being waited for by their Popen
        self.before: set[int] = set()

    def __enter__(self) -> Reaper:
        self.before = set(children())
        _prctl_subreaper(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_orphans()
        _prctl_subreaper(False)

    def reap(self) -> None:
        """Collect every dead child except those in `keep`."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            if info.si_pid not in self.keep:
                os.waitpid(info.si_pid, 0)
                continue
            for pid in children():  # the first waitable one is kept: look at the others
                if pid not in self.keep and (st := _stat(pid)) and st[0] == "Z":
                    os.waitpid(pid, os.WNOHANG)
            return

    def kill_orphans(self) -> list[int]:
        """SIGKILL the children this process adopted since __enter__ (a test's daemons, a
        hook's helper) and reap them; returns their PIDs."""
        killed = [p for p in children() if p not in self.before and p not in self.keep
                  and alive(p)]
        for pid in killed:
            _kill(pid)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in killed) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        self.reap()
        return killed

    def wait_gone(self, pid: int, deadline: float) -> bool:
        """Until `pid` is gone or a zombie (reaping as it goes); False at the deadline."""
        while alive(pid):
            if time.monotonic() > deadline:
                return False
            self.reap()
            time.sleep(0.01)
        self.reap()
        return True

    def run(self, argv: list[str], deadline: float, *, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Done:
        """Run `argv` in a session of its own, reaping orphans while it runs. Past the
        deadline its process group is SIGKILLed and Timeout raised."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=env, cwd=cwd, start_new_session=True)
            self.keep.add(proc.pid)
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        _killpg(proc.pid)
                        proc.wait()
                        raise Timeout(shlex.join(argv[:3]))
                    self.reap()
                    time.sleep(0.01)
            finally:
                self.keep.discard(proc.pid)
            out.seek(0)
            err.seek(0)
            return Done(proc.returncode, out.read().decode(errors="replace"),
                        err.read().decode(errors="replace"))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_cgroup(rel: str, reaper: Reaper) -> None:
    """Thaw, SIGKILL by PID and remove cgroup `rel` and the cgroups below it (fscr run made
    it for this run). Leaves it in place, still populated, only if its tasks outlive 10 s."""
    cg = freezer.at(rel)
    if not cg.exists():
        return
    groups = sorted((p for p in cg.path.rglob("*") if p.is_dir()), reverse=True) + [cg.path]
    deadline = time.monotonic() + 10
    while True:
        pids = [int(x) for g in groups if g.is_dir()
                for x in (g / "cgroup.procs").read_text().split()]
        if not pids or time.monotonic() > deadline:
            break
        for g in groups:
            if g.is_dir() and freezer.Cgroup(cg.kind, g).frozen():
                freezer.Cgroup(cg.kind, g).thaw()
        for pid in pids:
            _kill(pid)
        reaper.reap()
        time.sleep(0.02)
    for g in groups:
        try:
            g.rmdir()
        except OSError:
            pass


class Firewall:
    """The network-lock state CRIU and fscr create: nftables tables named CRIU-*, CRIU's
    iptables lock (per-connection DROP rules marked 0xc114, in the `ip filter`/`ip6 filter`
    tables iptables-nft makes for them). `undo_since` removes what appeared after a snapshot
    and is provably the run's own: a lock a failed restore left would keep the test's ports
    blocked, and the host may be running other checkpoints meanwhile."""

    def __init__(self) -> None:
        self.tools = [t for t in IPTABLES if shutil.which(t)]

    def snapshot(self) -> dict[str, set[str]]:
        state = {"nft": set(self._tables())}
        for tool in self.tools:
            state[tool] = self._rules(tool)
        return state

    def undo_since(self, before: dict[str, set[str]], tables: set[str],
                   iptables: bool) -> list[str]:
        """Remove the CRIU tables named in `tables` (the run's own, from fscr's output and
        CRIU's logs) that appeared since `before`; when `iptables` (the run's CRIU or test
        used iptables), also CRIU's lock rules and the emptied `filter` tables that appeared.
        Returns what was removed."""
        undone = []
        for tool in self.tools if iptables else []:
            for rule in sorted(self._rules(tool) - before.get(tool, set())):
                if SOCCR_MARK in rule:
                    subprocess.run([tool, "-w", "-t", "filter", "-D", *shlex.split(rule)[1:]],
                                   capture_output=True)
                    undone.append(f"{tool} {rule}")
        for table in sorted(set(self._tables()) - before["nft"]):
            family, name = table.split(" ", 1)
            if name in tables or (iptables and name == "filter" and self._empty(family, name)):
                subprocess.run(["nft", "delete", "table", family, name], capture_output=True)
                undone.append(f"nft table {table}")
        return undone

    @staticmethod
    def _rules(tool: str) -> set[str]:
        # Asking iptables-legacy about a table creates it (it is built in here, so it would
        # stay for good): ask only when the kernel already lists a legacy filter table.
        names = LEGACY_NAMES.get(tool)
        if names is not None:
            try:
                if "filter" not in Path(names).read_text().split():
                    return set()
            except FileNotFoundError:
                return set()
        out = subprocess.run([tool, "-w", "-t", "filter", "-S"], capture_output=True,
                             text=True).stdout
        return {x for x in out.splitlines() if x.startswith("-A ")}

    @staticmethod
    def _tables() -> list[str]:
        out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True)
        if out.returncode != 0:
            return []
        items = json.loads(out.stdout).get("nftables", [])
        return [f"{t['table']['family']} {t['table']['name']}" for t in items
                if "table" in t and (t["table"]["name"].startswith("CRIU-")
                                     or t["table"]["name"] == "filter")]

    @staticmethod
    def _empty(family: str, name: str) -> bool:
        out = subprocess.run(["nft", "-j", "list", "table", family, name], capture_output=True,
                             text=True)
        return out.returncode == 0 and not any(
            "rule" in x for x in json.loads(out.stdout).get("nftables", []))


@dataclass(frozen=True)
class Area:
    """Where one test runs in one mode. `root`/test/zdtm/static is the test's volume (a
    subvolume) and `root`/test the hooks' working directory, as in CRIU's tree, so a hook's
    relative paths (zdtm/static/..., ../lib) resolve; `work` (off the volume's filesystem)
    holds CRIU's images and fscr's store."""

    root: Path
    work: Path

    @property
    def hook_cwd(self) -> Path:
        return self.root / "test"

    @property
    def volume(self) -> Path:
        return self.root / "test" / "zdtm" / "static"

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def store(self) -> Path:
        return self.work / "store"


class Bed:
    """A loopback btrfs filesystem under `root` (a sparse image, a loop device, a mount),
    removed whole by close()."""

    def __init__(self, root: Path) -> None:
        self.root, self.mnt, self.img = root, root / "m", root / "btrfs.img"
        self.pycache = root / "pyc"  # fscr's bytecode, compiled once per run
        self.loop = ""
        self.areas = 0

    def open(self, size_gb: int = 8) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.img, "wb") as f:
            f.truncate(size_gb << 30)
        self.loop = _sh("losetup", "--find", "--show", str(self.img))
        _sh("mkfs.btrfs", "-q", self.loop)
        _sh("mount", self.loop, str(self.mnt))

    def close(self) -> None:
        """Unmount, detach and delete everything under root (retrying a busy unmount)."""
        if self.loop:
            for _ in range(50):
                if subprocess.run(["mountpoint", "-q", str(self.mnt)]).returncode != 0:
                    break
                if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = ""
        if subprocess.run(["mountpoint", "-q", str(self.mnt)]).returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)

    def area(self, mode: str, test: str, lib: Path) -> Area:
        """A fresh area: directories, `lib` linked to CRIU's lib (pycriu for hooks), and the
        volume as a new subvolume. Its path is short (/var/tmp/fzc.*/m/<n>/test/zdtm/static,
        as long as a usual CRIU checkout's): tests bind unix sockets by absolute path, which
        may not exceed 107 bytes."""
        self.areas += 1
        a = Area(self.mnt / str(self.areas), self.root / "work" / mode / test)
        self.remove(a)
        a.volume.parent.mkdir(parents=True)
        (a.root / "lib").symlink_to(lib)
        btrfsutil.create_subvolume(str(a.volume))
        a.work.mkdir(parents=True)
        return a

    def remove(self, a: Area) -> None:
        """Delete an area's subvolumes (its volume, fscr's snapshots and rescues beside it),
        deepest first, then its directories and its work directory."""
        if a.root.exists():
            subvolumes = [Path(d) for d, _, _ in os.walk(a.root)
                          if Path(d) != a.root and btrfsutil.is_subvolume(d)]
            for sv in sorted(subvolumes, key=lambda p: len(p.parts), reverse=True):
                try:
                    btrfsutil.delete_subvolume(str(sv))
                except btrfsutil.BtrfsUtilError:
                    pass  # what stays goes with the filesystem at close()
            shutil.rmtree(a.root, ignore_errors=True)
        shutil.rmtree(a.work, ignore_errors=True)


@contextmanager
def bed(root: Path, size_gb: int = 8) -> Iterator[Bed]:
    """A Bed that is removed on the way out, also on failure and ^C."""
    b = Bed(root)
    try:
        b.open(size_gb)
        yield b
    finally:
        b.close()


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
