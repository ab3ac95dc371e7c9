"""Cgroups that can freeze a task tree atomically: cgroup v2 `cgroup.freeze`, v1 `freezer.state`.

Freezing a cgroup stops every task in it at once, so no fork escapes between scan and dump.
v2 is preferred; v1's freezer hierarchy is used where no cgroup2 mount exists.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadTarget, MissingDependency
from ..fsutil import mounts


# The cgroup mounts are looked up once per process: they do not move under a running fscr,
# and a restore asks for the cgroups of a dozen PIDs, each a parse of /proc/self/mountinfo
# (thousands of lines on a host with containers).
@functools.cache
def v2_root() -> Path | None:
    for fstype, mnt, _ in mounts():
        if fstype == "cgroup2":
            return Path(mnt)
    return None


@functools.cache
def v1_freezer_root() -> Path | None:
    for fstype, mnt, sopts in mounts():
        if fstype == "cgroup" and "freezer" in sopts.split(","):
            return Path(mnt)
    return None


@dataclass(frozen=True)
class Cgroup:
    """One cgroup in the v2 hierarchy or the v1 freezer hierarchy, by absolute sysfs path."""

    kind: str  # "v2" or "v1"
    path: Path

    @property
    def rel(self) -> str:
        """The path as /proc/PID/cgroup shows it, e.g. /fscr/app."""
        root = v2_root() if self.kind == "v2" else v1_freezer_root()
        rel = self.path.relative_to(root)
        return "/" if rel == Path(".") else f"/{rel}"

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def frozen(self) -> bool:
        if self.kind == "v2":
            return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze every task and wait until the kernel says they all are."""
        self._set(True)
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                self.thaw()
                raise BadTarget(f"cgroup {self.path} did not freeze within {timeout:.0f}s")
            time.sleep(0.001)

    def thaw(self) -> None:
        self._set(False)

    def _set(self, frozen: bool) -> None:
        if self.kind == "v2":
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def exists(self) -> bool:
        return self.path.is_dir()

    def populated(self) -> bool:
        """Whether any task is still in it: a killed process leaves cgroup.procs while its
        threads are still exiting, and the cgroup cannot be removed until they have."""
        if self.kind == "v2":
            return "populated 1" in (self.path / "cgroup.events").read_text().splitlines()
        return bool((self.path / "tasks").read_text().split())

    def remove(self) -> None:
        """Remove the cgroup if it is empty; one that still holds tasks (EBUSY) stays."""
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def hierarchy() -> tuple[str, Path]:
    """The freezer fscr uses here: ("v2", root) when cgroup2 is mounted, else v1's freezer."""
    root = v2_root()
    if root is not None:
        return "v2", root
    root = v1_freezer_root()
    if root is not None:
        return "v1", root
    raise MissingDependency("no cgroup freezer: neither cgroup2 nor the v1 freezer is mounted")


def cgroup_of(pid: int) -> Cgroup:
    """The cgroup of `pid` in the freezer hierarchy fscr uses."""
    kind, root = hierarchy()
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text(errors="surrogateescape").splitlines()
    except FileNotFoundError:
        raise BadTarget(f"no such process: {pid}") from None
    for line in lines:
        hid, controllers, rel = line.split(":", 2)
        if (kind == "v2" and hid == "0" and controllers == "") or (
            kind == "v1" and "freezer" in controllers.split(",")
        ):
            return Cgroup(kind, root / rel.lstrip("/"))
    raise BadTarget(f"process {pid} is in no {kind} cgroup")


def at(rel: str) -> Cgroup:
    """The cgroup with path `rel` (as /proc/PID/cgroup shows it) in fscr's hierarchy."""
    kind, root = hierarchy()
    return Cgroup(kind, root / rel.lstrip("/"))


def from_user_path(path: str) -> Cgroup:
    """A --cgroup argument: an absolute sysfs path, or a path relative to the hierarchy root."""
    kind, root = hierarchy()
    p = Path(path)
    full = p if p.is_absolute() and p.is_relative_to(root) else root / path.lstrip("/")
    # "..", or a symlink, must not lead out of the hierarchy: fscr writes cgroup files there.
    full = Path(os.path.normpath(full))
    if not (full.is_relative_to(root) and full.is_dir()
            and full.resolve().is_relative_to(root.resolve())):
        raise BadTarget(f"no such cgroup: {path}")
    if full == root:
        raise BadTarget("refusing to freeze the root cgroup")
    return Cgroup(kind, full)


def ensure(rel: str) -> Cgroup:
    """Make sure cgroup `rel` exists and is thawed (new or restored tasks land in it)."""
    cg = at(rel)
    cg.path.mkdir(parents=True, exist_ok=True)
    if cg.frozen():
        cg.thaw()
    return cg
