"""The names of everything a run creates, in one place. Each carries the checkpoint id, so
cleanup can prove a thing is fscr's own, and restore can check that a manifest names only
these (a manifest is untrusted input)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BadInput

# Ids and names: no '-', which separates id and counter in unlink-at-restart-<id>-<n>.
ID_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.]{0,63}"
RESCUE_PATTERN = rf"rescue_{ID_PATTERN}_[0-9]{{8}}T[0-9]{{6}}Z_[0-9a-f]{{4}}"
COPY_PATTERN = rf"copy_{ID_PATTERN}_[0-9]{{8}}T[0-9]{{6}}Z_[0-9a-f]{{4}}"
SNAPDIR = ".fscr-snapshots"
FSCR_GROUP = "fscr"  # every cgroup fscr creates lives under this name in its hierarchy
RELINK_DIR = Path("lost+found/checkpoint")
RELINK_PREFIX = "unlink-at-restart-"


def check_id(value: str, what: str = "checkpoint id") -> str:
    if not re.fullmatch(ID_PATTERN, value):
        raise BadInput(
            f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ . (not starting with .)")
    return value


def is_rescue(name: str) -> bool:
    return re.fullmatch(RESCUE_PATTERN, name) is not None


def is_copy(name: str) -> bool:
    """A copy restored beside its original (restore --beside): copy_<id>_<time>_<hex>."""
    return re.fullmatch(COPY_PATTERN, name) is not None


def copy_path(volume: Path, copy: str, n: int) -> Path:
    """The writable clone of volume n a copy runs on (mounted at the volume's path in the
    copy's own mount namespace)."""
    return snapshot_root(volume) / copy / str(n)


def copy_cgroup(copy: str) -> str:
    """The cgroup (below fscr's group) a copy is restored into."""
    return f"{FSCR_GROUP}/{copy}"


def snapshot_root(volume: Path) -> Path:
    """Snapshots live beside the volume, on the same filesystem: <parent>/.fscr-snapshots."""
    return volume.parent / SNAPDIR


def snapshot_path(volume: Path, ckpt_id: str, n: int) -> Path:
    return snapshot_root(volume) / ckpt_id / str(n)


def rescue_path(volume: Path, rescue: str, n: int) -> Path:
    return snapshot_root(volume) / rescue / str(n)


# LVM: snapshots live in the origin's volume group, named fscr_<id>_<n>; a restore's rescue (the
# contents --rollback replaced) fscr_rescue_<id>_<time>_<hex>_<n>, and the writable copy a restore
# mounts or merges fscr_restored_<id>_<time>_<hex>_<n>. lvm2 lists them as /dev/<vg>/<name>.
VG_PATTERN = r"(?!\.\.?(?:/|$))[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}"  # lvm2's, not . or .."
LV_PREFIX = "fscr_"


def lv_snapshot_name(ckpt_id: str, n: int) -> str:
    return f"{LV_PREFIX}{ckpt_id}_{n}"


def lv_rescue_name(rescue: str, n: int) -> str:
    return f"{LV_PREFIX}{rescue}_{n}"


def lv_restored_name(rescue: str, n: int) -> str:
    return f"{LV_PREFIX}restored_{rescue.removeprefix('rescue_')}_{n}"


def is_lvm_snapshot(path: str, ckpt_id: str, n: int) -> bool:
    """Whether `path` is /dev/<vg>/fscr_<id>_<n>: the only LV a manifest may name."""
    name = re.escape(lv_snapshot_name(ckpt_id, n))
    return re.fullmatch(rf"/dev/{VG_PATTERN}/{name}", path) is not None


def relink_name(ckpt_id: str, n: int) -> str:
    return f"{RELINK_PREFIX}{ckpt_id}-{n}"


def ckpt_cgroup(ckpt_id: str) -> str:
    """The cgroup (below fscr's group) a tree is moved into when it shares its own."""
    return f"ckpt_{ckpt_id}"
