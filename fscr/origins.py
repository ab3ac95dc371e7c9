"""What this host recorded of the workloads it checkpointed and restored: the only records a
restore trusts for what it may kill and which cgroup it may use. A manifest names, it does
not authorise: it may come from another machine, a backup disk or a crafted file, and its
digest proves integrity only (docs/security.md).

<store>/origins/<id>.json        written when this host commits checkpoint <id>, or first
                                 restores one it received: this machine and boot, the
                                 workload's lineage, its cgroup, the tasks dumped
<store>/lineages/<pid>_<start>.json
                                 the tasks restores brought back, per workload and boot

Tasks are (PID, start time), and start times count from boot: a record of another boot names
nothing (the same PID and start time may belong to another process after a reboot), and a
record of another machine (a copied store) neither tasks nor cgroups. Lineage files of fscr
0.1 (a bare list, boot unknown) name nothing either; the next restore rewrites them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from . import records
from .errors import Refused
from .fsutil import write_atomic
from .manifest import Manifest
from .records import Id, Meta, Record

Pair = tuple[Annotated[int, Meta(gt=0)], Annotated[int, Meta(ge=0)]]  # (PID, start time)
Short = Annotated[str, Meta(max_length=64)]


class CgroupOf(Record):
    kind: Literal["v2", "v1"]
    path: Annotated[str, Meta(max_length=4096)]  # where the tree was dumped from, or restored
    original: Annotated[str, Meta(max_length=4096)]  # where it lived (fscr moved it if differs)


class Origin(Record, kw_only=True):
    version: Literal[1] = 1
    id: Id
    machine: Short
    boot: Short
    lineage: Pair
    cgroup: CgroupOf
    tasks: list[Pair]


class Lineage(Record, kw_only=True):
    version: Literal[1] = 1
    boot: Short
    tasks: list[Pair]


@cache
def machine_id() -> str:
    """/etc/machine-id (32 hex digits; a digest of it if it holds something else)."""
    try:
        raw = Path("/etc/machine-id").read_bytes().strip()
    except OSError:
        return "unknown"
    text = raw.decode("ascii", "replace")
    return text if 0 < len(text) <= 64 and text.isalnum() else hashlib.sha256(raw).hexdigest()


@cache
def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _dir(store_root: Path, name: str) -> Path:
    d = store_root / name
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def record(store_root: Path, ckpt_id: str, lineage: tuple[int, int], cgroup: CgroupOf,
           tasks: list[tuple[int, int]]) -> None:
    """Record what this host knows of checkpoint `ckpt_id`: made here (the tasks dumped), or
    received and restored here (no task: none of them ran here)."""
    try:
        rec = records.checked(Origin(id=ckpt_id, machine=machine_id(), boot=boot_id(),
                                     lineage=lineage, cgroup=cgroup, tasks=tasks))
    except records.Invalid as e:  # a record nobody could read back would name nothing
        raise Refused(f"checkpoint {ckpt_id} cannot be recorded on this host: "
                      f"{records.why(e)[1]}") from None
    write_atomic(_dir(store_root, "origins") / f"{ckpt_id}.json", records.encode(rec))


def made_here(store_root: Path, m: Manifest) -> None:
    """Record checkpoint `m`, which this host has just made (call before its commit: a
    record without a checkpoint names nothing; a checkpoint without one is treated as
    received)."""
    record(store_root, m.id, (m.lineage.pid, m.lineage.starttime),
           CgroupOf(kind=m.cgroup.kind, path=m.cgroup.path, original=m.cgroup.original),
           [(t.pid, t.starttime) for t in m.tasks])


def of(store_root: Path, ckpt_id: str) -> Origin | None:
    """This host's record of checkpoint `ckpt_id`, or None: none written here (received,
    made by fscr 0.1, or another machine's store), or one that fails validation."""
    try:
        rec = records.decode((store_root / "origins" / f"{ckpt_id}.json").read_bytes(), Origin)
    except (OSError, records.Invalid):
        return None
    return rec if rec.id == ckpt_id and rec.machine == machine_id() else None


def forget(store_root: Path, ckpt_id: str) -> None:
    (store_root / "origins" / f"{ckpt_id}.json").unlink(missing_ok=True)


def live_tasks(store_root: Path, rec: Origin) -> list[tuple[int, int]]:
    """The tasks of this boot that fscr recorded for the workload of `rec`: the ones it
    dumped, and those restores brought back since."""
    dumped = list(rec.tasks) if rec.boot == boot_id() else []
    return dumped + incarnations(store_root, rec.lineage)


# A workload's lineage is the (PID, start time) of the root first checkpointed. Restored
# tasks get the checkpoint's PIDs but new start times; each restore records them under the
# lineage, so a later --replace, from any checkpoint of that workload, finds its tree.

def _lineage_file(store_root: Path, lineage: tuple[int, int]) -> Path:
    return _dir(store_root, "lineages") / f"{lineage[0]}_{lineage[1]}.json"


def incarnations(store_root: Path, lineage: tuple[int, int]) -> list[tuple[int, int]]:
    """The restored tasks recorded under `lineage` in this boot (none if the record is of
    another boot, or unreadable)."""
    try:
        rec = records.decode(_lineage_file(store_root, lineage).read_bytes(), Lineage)
    except (OSError, records.Invalid):
        return []
    return list(rec.tasks) if rec.boot == boot_id() else []


def record_incarnation(store_root: Path, lineage: tuple[int, int],
                       tasks: list[tuple[int, int]],
                       alive: Callable[[tuple[int, int]], bool]) -> None:
    """Add a restored tree's tasks to its lineage; tasks no longer alive are dropped."""
    keep = [t for t in incarnations(store_root, lineage) if alive(t)]
    rec = Lineage(boot=boot_id(), tasks=sorted(set(keep + tasks)))
    write_atomic(_lineage_file(store_root, lineage), records.encode(rec))


def lineage_of(store_root: Path, task: tuple[int, int]) -> tuple[int, int]:
    """The lineage `task` belongs to: the one whose restores brought it back, else its own."""
    for f in _dir(store_root, "lineages").glob("*_*.json"):
        pid, _, start = f.stem.partition("_")
        if not (pid.isascii() and pid.isdigit() and start.isascii() and start.isdigit()):
            continue  # not a name fscr gives
        lineage = (int(pid), int(start))
        if task in incarnations(store_root, lineage):
            return lineage
    return task
