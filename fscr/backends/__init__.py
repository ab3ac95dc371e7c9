"""Process-state backends behind one interface: check, dump, restore.

`criu` writes a process image; `freeze-only` writes none, for filesystem-consistent backups
taken at one frozen instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import BadInput


@dataclass(frozen=True)
class DumpRequest:
    root_pid: int
    images: Path
    log: Path
    freeze_cgroup: Path  # sysfs path of the frozen cgroup; CRIU must be told (else it hangs)
    externals: list[str]  # CRIU external-file keys: file[mnt:ino]
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


class Backend(Protocol):
    name: str
    writes_image: bool

    def check(self) -> None:
        """Raise MissingDependency unless this backend can run here."""

    def dump(self, req: DumpRequest, started: Callable[[int], None]) -> str | None:
        """Dump the frozen tree; on failure raise and leave the tree frozen, as found.
        `started` gets the PID of a helper process (CRIU) as soon as it runs. Returns the
        name of a network lock left in place for the restore (--tcp established), if any."""

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
