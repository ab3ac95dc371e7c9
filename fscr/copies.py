"""Copies restored beside their original (`fscr restore ID --beside`): the record of each, its
state, and its removal.

A copy runs from writable clones of the checkpoint's snapshots (<parent>/.fscr-snapshots/
<copy>/<n>), mounted at the volumes' paths in a mount namespace of its own, in the cgroup
fscr/<copy>; its name is copy_<id>_<time>_<hex>. The store keeps <store>/copies/<copy>.json,
so `fscr list` shows it and `fscr delete <copy>` stops it and removes what it ran on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Literal

from . import records, snapshot
from .errors import FscrError, NoSuchCheckpoint
from .fsutil import write_atomic
from .names import COPY_PATTERN, copy_cgroup, copy_path, is_copy
from .process import freezer
from .records import Id, Meta, PathText, Record


class CopyVolume(Record):
    path: PathText  # the volume, as the copy sees it
    clone: PathText  # where it lives on the host


# kw_only: `version` comes first in the record (and in `fscr list --json`) but has a default.
class Copy(Record, kw_only=True):
    version: Literal[1] = 1
    name: Annotated[str, Meta(pattern=rf"^{COPY_PATTERN}\Z")]
    id: Id
    kind: Literal["btrfs"]
    volumes: list[CopyVolume]
    cgroup: Annotated[str, Meta(max_length=4096)]  # as /proc/PID/cgroup shows it

    def confined(self) -> bool:
        """Everything it names is what fscr names for this copy: delete touches nothing else."""
        return (self.cgroup == f"/{copy_cgroup(self.name)}"
                and all(v.clone == str(copy_path(Path(v.path), self.name, n))
                        for n, v in enumerate(self.volumes)))


def _dir(store_root: Path) -> Path:
    d = store_root / "copies"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def add(store_root: Path, rec: Copy) -> None:
    # Built in Python, so not validated yet: checked, so that listed() reads back what it wrote.
    write_atomic(_dir(store_root) / f"{rec.name}.json", records.encode(records.checked(rec)))


def listed(store_root: Path) -> list[Copy]:
    """Every valid copy record (one that fails validation, or names what is not its own, is
    left out: it cannot be acted on)."""
    out = []
    for p in sorted((store_root / "copies").glob("*.json")):  # none: no directory made
        try:
            rec = records.decode(p.read_bytes(), Copy)
        except (OSError, records.Invalid):
            continue
        if rec.name == p.stem and rec.confined():
            out.append(rec)
    return out


def running(rec: Copy) -> list[int]:
    """The PIDs of the copy's tree (its own cgroup), none once it has exited."""
    cg = freezer.at(rec.cgroup)
    return cg.procs() if cg.exists() else []


def delete(store_root: Path, name: str) -> list[str]:
    """Stop copy `name` (SIGKILL to every task of its own cgroup), remove its clones and its
    cgroup, then its record. Returns what was removed."""
    if not is_copy(name):
        raise NoSuchCheckpoint(f"invalid copy name {name!r}")
    rec = next((c for c in listed(store_root) if c.name == name), None)
    if rec is None:
        raise NoSuchCheckpoint(f"no copy {name} in {store_root}")
    cg = freezer.at(rec.cgroup)
    removed = []
    if cg.exists():
        pids = cg.procs()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while cg.populated():
            if time.monotonic() > deadline:
                raise FscrError(f"copy {name}: tasks {cg.procs()} did not die")
            time.sleep(0.02)
        cg.remove()
        removed += [f"stopped PID {p}" for p in pids] + [f"cgroup {rec.cgroup}"]
    provider = snapshot.get(rec.kind)
    for v in rec.volumes:
        provider.delete(v.clone)
        removed.append(v.clone)
    (_dir(store_root) / f"{name}.json").unlink(missing_ok=True)
    return removed
