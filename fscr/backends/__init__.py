"""Process-state backends behind one interface: check, dump, restore.

`criu` writes a process image; `freeze-only` writes none, for filesystem-consistent backups
taken at one frozen instant. A dump calls the pipeline's DumpHooks in one order whichever
backend runs: started (a helper runs), stop (freeze the tree), externals (the tree is
stopped: which files are external), dumped (the image is written and the tree still
stopped: snapshot the volumes). Then the pipeline thaws, or the backend has killed the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import BadInput


class DumpHooks(Protocol):
    """The pipeline's part of a dump, called by the backend in this order. An exception from
    a hook fails the dump: the backend has the tree released as it was (alive), then raises
    that exception."""

    def started(self, pid: int) -> None:
        """A helper process (CRIU) runs: journal it, so the watchdog and gc find it."""

    def stop(self) -> None:
        """Freeze the tree (CRIU's pre-dump: it has started up and seized nothing yet)."""

    def externals(self) -> list[str]:
        """The tree is stopped: re-check it, and name the files the dumper is to leave out
        of the image as external (CRIU keys file[mnt:ino]) because fscr relinks them."""

    def dumped(self) -> None:
        """The image is written and every task still stopped: make the volumes consistent
        with it (relink, snapshot, unrelink)."""


@dataclass(frozen=True)
class DumpRequest:
    root_pid: int
    images: Path
    log: Path
    freeze_cgroup: Path  # sysfs path of the cgroup fscr freezes at `stop`; CRIU must know it
    leave_running: bool  # False: the backend kills the tree after the dump
    tcp: str = "refuse"  # "established": dump connections (repair mode); "close": as closed
    netns: str | None = None  # run the dumper in this network namespace (setns), if given
    options: frozenset[str] = frozenset()  # "shell-job", "file-locks", "ext-unix-sk"


@dataclass(frozen=True)
class RestoreRequest:
    images: Path
    log: Path
    pidfile: Path  # written by CRIU once the tree runs; left for the caller to remove
    inherit: list[tuple[int, str]]  # (fd open in fscr, CRIU key) for every external file
    tcp: str = "refuse"
    netns: str | None = None
    options: frozenset[str] = frozenset()
    # A copy beside its original (restore --beside): restored in a mount namespace of its
    # own with these (source, target) bind mounts, into cgroup (kind, path) instead of the
    # one it was dumped from.
    binds: tuple[tuple[str, str], ...] = ()
    cgroup: tuple[str, str] | None = None
    # Memory served on demand by CRIU's lazy-pages daemon, which the caller has started
    # (fscr/lazy.py) with the same work directory.
    lazy: bool = False
    # Called once the tree is restored and before any of it runs (CRIU's post-restore):
    # raising makes CRIU kill the tree and fail, and is raised again by restore.
    before_resume: Callable[[], None] | None = None


class Backend(Protocol):
    name: str
    writes_image: bool

    def check(self, version: bool = False) -> None:
        """Raise MissingDependency unless this backend can run here (`version`: its tool's
        version too, now rather than when it starts)."""

    def dump(self, req: DumpRequest, hooks: DumpHooks) -> str | None:
        """Dump the tree, calling `hooks` in order (see DumpHooks). On failure raise, the
        tree left as `stop` found it (frozen, if it was frozen). Returns the name of a
        network lock left in place for the restore (--tcp established), if any."""

    def copied_unlinked(self, images: Path, under: list[Path]) -> list[str]:
        """Unlinked files under `under` the image holds a copy of (CRIU's ghost files)."""

    def restore(self, req: RestoreRequest, started: Callable[[int], None]) -> int:
        """Restore the tree detached; returns the root PID."""


def get(name: str) -> Backend:
    from .criu import Criu
    from .freeze_only import FreezeOnly

    backends: dict[str, Backend] = {"criu": Criu(), "freeze-only": FreezeOnly()}
    try:
        return backends[name]
    except KeyError:
        raise BadInput(f"unknown backend {name!r} (known: {', '.join(backends)})") from None
