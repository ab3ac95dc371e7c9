"""What `fscr list` and `fscr show` add for a reader: the type of each entry, the workload's
name, and how much disk a snapshot holds on its own. Exact numbers for --json; cli_store
renders them with fscr.units."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from . import origins
from .fsutil import mount_of
from .manifest import Manifest
from .names import FSCR_GROUP
from .store import Store

# `fscr run --name NAME` starts the workload in cgroup fscr/NAME (process.target.name_cgroup);
# anonymous runs get fscr/run_<hex>, which names nothing.
_NAMED = re.compile(rf"^/?{FSCR_GROUP}/(?!run_)([A-Za-z0-9_.]+)$")


def workload_name(m: Manifest) -> str | None:
    """The name given at `fscr run --name`, read from the cgroup the tree lived in."""
    found = _NAMED.match(m.cgroup.original)
    return found.group(1) if found else None


def type_of(store: Store, m: Manifest) -> str:
    """"received" (by `fscr receive`) or "checkpoint" (made here)."""
    if store.was_received(m.id):
        return "received"
    # Before receive left its mark: a checkpoint this host never recorded came from elsewhere.
    return "checkpoint" if origins.of(store.root, m.id) is not None else "received"


def exclusive_bytes(paths: list[str]) -> dict[str, int | None]:
    """Bytes only each btrfs snapshot holds (what deleting it frees), from btrfs quota
    groups; None where btrfs cannot say: quotas off on that filesystem (`btrfs quota
    enable` turns them on; fscr does not, they cost every write), or not btrfs at all."""
    by_mount: dict[str, dict[int, int] | None] = {}
    out: dict[str, int | None] = {}
    for p in paths:
        mnt = mount_of(Path(p))
        ident = _subvolume_id(p)
        if mnt is None or mnt.fstype != "btrfs" or ident is None:
            out[p] = None
            continue
        if mnt.point not in by_mount:
            by_mount[mnt.point] = _qgroups(mnt.point)
        table = by_mount[mnt.point]
        out[p] = None if table is None else table.get(ident)
    return out


def _subvolume_id(path: str) -> int | None:
    import btrfsutil
    try:
        return btrfsutil.subvolume_id(path)
    except (OSError, btrfsutil.BtrfsUtilError):
        return None


def _qgroups(mount: str) -> dict[int, int] | None:
    """{subvolume id: exclusive bytes}, or None when quotas are off."""
    try:
        out = subprocess.run(["btrfs", "qgroup", "show", "--raw", mount], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    table = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].startswith("0/") and fields[2].isdigit():
            table[int(fields[0][2:])] = int(fields[2])
    return table


def made_at(name: str) -> str | None:
    """When a rescue snapshot or copy was made, from its name (<kind>_<id>_<time>_<hex>),
    as an ISO time."""
    found = re.search(r"_([0-9]{8}T[0-9]{6}Z)_[0-9a-f]{4}$", name)
    if not found:
        return None
    return datetime.strptime(found.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).isoformat()
