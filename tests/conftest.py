"""Shared test bed: real loopback btrfs volumes, a scratch store, workloads in cgroups of
their own, and the fscr command line run as a user runs it.

Everything a fixture creates it removes at teardown, even when the test fails: the processes
it started (by PID, found in the cgroups it created), mounts, loop devices, cgroups.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fscr.names import FSCR_GROUP
from fscr.process import freezer

HERE = Path(__file__).parent
WORKLOAD = HERE / "workloads" / "w.py"
FSCR = Path(sys.executable).parent / "fscr"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def fscr_cgroup_parent() -> Iterator[None]:
    """fscr creates its cgroups under <hierarchy>/fscr; remove that group after the session
    if the tests brought it into being (and nothing else lives in it)."""
    parent = freezer.at(FSCR_GROUP).path
    existed = parent.exists()
    yield
    if not existed and parent.exists():
        for child in sorted(parent.rglob("*/"), reverse=True):
            if child.is_dir():
                child.rmdir()  # fails loudly if a test left a non-empty cgroup
        parent.rmdir()


@dataclass
class Volume:
    """A btrfs subvolume `path` on a fresh loopback filesystem mounted at `mnt`."""

    mnt: Path
    path: Path
    img: Path
    loop: str = ""
    size: int = 1 << 30

    def make(self) -> None:
        with open(self.img, "wb") as f:
            f.truncate(self.size)
        self.loop = sh("losetup", "--find", "--show", str(self.img))
        sh("mkfs.btrfs", "-q", self.loop)
        sh("mount", self.loop, str(self.mnt))

    def destroy(self) -> None:
        if self.loop:
            if subprocess.run(["mountpoint", "-q", str(self.mnt)]).returncode == 0:
                _umount(self.mnt)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = ""
        self.img.unlink(missing_ok=True)

    def recreate(self, size: int | None = None) -> None:
        """"Another machine": the filesystem destroyed, a new empty one at the same place."""
        self.destroy()
        self.size = size or self.size
        self.make()


@pytest.fixture
def btrfs_volume(tmp_path: Path, workloads: Workloads) -> Iterator[Volume]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    v = Volume(mnt, mnt / "vol", tmp_path / "btrfs.img")
    try:
        v.make()
        sh("btrfs", "subvolume", "create", str(v.path))
        yield v
    finally:
        workloads.kill_all()  # restored processes hold files on the volume
        v.destroy()


def _umount(mnt: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"cannot unmount {mnt}: still busy")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@dataclass
class Workloads:
    """Starts workloads with `fscr run` and remembers their cgroups, so teardown can kill
    exactly the processes the test started (and their restored successors) by PID."""

    cgroups: list[str] = field(default_factory=list)

    def start(self, kind: str, *args: str, name: str | None = None,
              netns: str | None = None, pidns: bool = False) -> tuple[int, str]:
        """Start workload `kind` of tests/workloads/w.py; returns its PID and name."""
        return self.run(sys.executable, str(WORKLOAD), kind, *args, name=name, netns=netns,
                        pidns=pidns)

    def run(self, *argv: str, name: str | None = None, netns: str | None = None,
            pidns: bool = False) -> tuple[int, str]:
        name = name or f"t{secrets.token_hex(4)}"
        where = (["--netns", netns] if netns else []) + (["--pidns"] if pidns else [])
        out = fscr("run", "--name", name, *where, "--json", "--", *argv)
        info = json.loads(out.stdout)
        self.cgroups.append(info["cgroup"])
        return info["pid"], name

    def pids(self) -> list[int]:
        out = []
        for rel in self.cgroups:
            cg = freezer.at(rel)
            if cg.exists():
                out += cg.procs()
        return out

    def kill_all(self) -> None:
        for rel in self.cgroups:
            cg = freezer.at(rel)
            if not cg.exists():
                continue
            if cg.frozen():
                cg.thaw()
            for pid in cg.procs():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # Until no thread is left, not only no process: else the rmdir fails (EBUSY).
            wait_for(lambda cg=cg: not cg.populated(), 30, f"workload in {rel} to die")
            cg.remove()
        self.cgroups.clear()


def counter_with_neighbour(workloads: Workloads, vol: Path) -> tuple[int, int, freezer.Cgroup]:
    """A counter on `vol` and a second, unrelated counter (on vol/n) moved into the same
    cgroup: a tree that is not alone in its cgroup. Returns both PIDs and the cgroup."""
    pid, _ = workloads.start("counter", str(vol))
    cg = freezer.cgroup_of(pid)
    (vol / "n").mkdir()
    neighbour, _ = workloads.start("counter", str(vol / "n"))
    cg.add(neighbour)
    return pid, neighbour, cg


@pytest.fixture
def workloads() -> Iterator[Workloads]:
    w = Workloads()
    yield w
    w.kill_all()


def fscr(*args: str, store: Path | None = None, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the fscr command line as a user would."""
    full_env = dict(os.environ) | (env or {})
    if store is not None:
        full_env["FSCR_STORE"] = str(store)
    proc = subprocess.run([str(FSCR), *args], capture_output=True, text=True, env=full_env,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"fscr {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def ask(vol: Path, name: str, timeout: float = 30) -> dict:
    """A workload's report: w.py writes VOL/<name>.json when VOL/report-<name>.json appears.
    The report is removed once read, so the next request waits for a fresh one."""
    (vol / f"report-{name}.json").touch()
    out = vol / f"{name}.json"
    report = json.loads(wait_for(lambda: out.exists() and out.read_text(), timeout,
                                 f"the {name} report"))
    out.unlink()
    return report


def wait_unlinked(pid: int, path: Path, timeout: float = 30) -> None:
    """Until `pid` holds `path` open by fd with its name gone ("(deleted)")."""
    def targets() -> list[str]:
        out = []
        for n in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{n}"))
            except FileNotFoundError:  # closed since the listing (the workload starting up)
                continue
        return out

    wait_for(lambda: f"{path} (deleted)" in targets(), timeout,
             f"{path} to be written and unlinked")


def take_pid(pid: int) -> subprocess.Popen[bytes]:
    """A `sleep` that has PID `pid`: the kernel hands out the PID after ns_last_pid, as CRIU
    itself does. Waits until the PID is free (the host's init may reap late). The caller
    kills it."""
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, f"PID {pid} to be free")
    for _ in range(100):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    raise AssertionError(f"could not start a process with PID {pid}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # comm may be any bytes
            return f.read().rsplit(b")", 1)[1].split()[0] not in b"ZX"
    except FileNotFoundError:
        return False


def lines(path: Path) -> list[int]:
    """The integers a counter wrote, one per line (a torn last line is dropped)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [int(x) for x in text.split("\n")[:-1] if x]


@dataclass
class Net:
    """Two network namespaces of the test's own, joined by a veth pair: a (server side,
    10.213.0.1) and b (client side, 10.213.0.2). Only these addresses, inside these
    namespaces, are ever used."""

    a: str
    b: str
    a_ip: str = "10.213.0.1"
    b_ip: str = "10.213.0.2"

    def path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    def exec(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, check=True)


@pytest.fixture
def net() -> Iterator[Net]:
    tag = secrets.token_hex(3)
    n = Net(f"fscr_a_{tag}", f"fscr_b_{tag}")
    made = []
    try:
        for ns in (n.a, n.b):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        sh("ip", "link", "add", f"va{tag}", "netns", n.a, "type", "veth",
           "peer", "name", f"vb{tag}", "netns", n.b)
        for ns, dev, ip in ((n.a, f"va{tag}", n.a_ip), (n.b, f"vb{tag}", n.b_ip)):
            n.exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            n.exec(ns, "ip", "link", "set", dev, "up")
            n.exec(ns, "ip", "link", "set", "lo", "up")
        yield n
    finally:
        for ns in made:  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d fscr: ")


def said(stderr: str) -> list[str]:
    """stderr's lines without the timestamped progress lines (fscr/progress.py) a command
    prints when stderr is no terminal: what a failure says to the user."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]
