"""LVM snapshots through lvm2's own tools, for a volume that is a mounted logical volume.

Checkpoint: `lvcreate --snapshot` of the volume's LV in the frozen window, read-only, named
fscr_<id>_<n>. Device-mapper suspends the origin with its filesystem frozen (lockfs) while it
installs the snapshot, so the snapshot holds a clean filesystem and fscr calls no fsfreeze of
its own: an fsfreeze around lvcreate would even make dm's suspend fail (EBUSY) on kernels
before 6.8, which do not nest freezes. A classic snapshot needs room for the origin's changes
(--lvm-size, a size or a percentage of the origin); a thin one shares the pool and is left
inactive (lvm2's activation skip) until a restore needs it.

Restore puts a checkpoint's contents at the volume's path in one of two ways:
- mount (the default): a writable thin snapshot of the checkpoint's snapshot, or the classic
  snapshot itself read-only (a classic snapshot cannot be snapshotted, so only a --volumes-only
  restore may use it), mounted over the volume. The volume's LV stays mounted beneath, as it
  was: `umount <volume>` shows it again. The checkpoint's snapshot is never written.
- rollback (--rollback): the origin itself goes back, with `lvconvert --merge`. A rescue
  snapshot of the origin keeps what it held; the volume is unmounted, the merge is started and
  the origin deactivated and activated again, which is when lvm2 carries the merge out (a
  merge into an open origin waits for its next activation). A thin checkpoint merges a thin
  copy and keeps its snapshot; a classic one merges, and so uses up, its snapshot.

The commands are built by the functions below (docs/lvm.md lists them in order, and a test
checks the list against them). `lvs --reportformat json` is read through a validator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sh
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import (
    BadInput,
    BadManifest,
    BadVolume,
    MissingDependency,
    NoSpace,
    Refused,
    SnapshotFailed,
)
from ..fsutil import Mount, mount_at
from ..names import LV_PREFIX, VG_PATTERN, lv_rescue_name, lv_restored_name, lv_snapshot_name
from .devices import DeviceWatch, dm_device

DEFAULT_SIZE = "20%ORIGIN"
SIZE_PATTERN = re.compile(
    r"(?P<bytes>[0-9]+(\.[0-9]+)?[bBsSkKmMgGtT]?)|(?P<percent>[0-9]{1,3})%ORIGIN")
LVS_FIELDS = ("lv_name,vg_name,lv_uuid,lv_attr,lv_size,origin,pool_lv,segtype,snap_percent,"
              "lv_kernel_major,lv_kernel_minor")
VGS_FIELDS = "vg_name,vg_free,vg_extent_size"

Runner = Callable[[list[str]], str]
Row = TypeVar("Row", bound=BaseModel)


def unavailable() -> str | None:
    """Why LVM snapshots cannot be taken here, or None. `fscr doctor` shows the same reason."""
    if shutil.which("lvm") is None:
        return "lvm2 is not installed (apt-get install lvm2)"
    if not _device_mapper():
        return ("the kernel has no device-mapper (no 'device-mapper' in /proc/misc, and "
                "no dm_mod module to load): logical volumes and their snapshots "
                "cannot exist on this machine")
    return None


def _device_mapper() -> bool:
    # The kernel's own list: lvm2 creates /dev/mapper/control even where the driver is missing.
    if "device-mapper" in Path("/proc/misc").read_text():
        return True
    if shutil.which("modprobe") is None:
        return False
    subprocess.run(["modprobe", "-q", "dm_mod"], check=False)  # lvm2 would load it the same way
    return "device-mapper" in Path("/proc/misc").read_text()


def run(argv: list[str]) -> str:
    """Run one lvm2 (or mount) command; its last error line becomes fscr's error."""
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}  # fscr's own fds are none of lvm's
    try:
        return str(sh.Command(argv[0])(*argv[1:], _env=env))
    except sh.CommandNotFound:
        raise MissingDependency(f"{argv[0]} not found: install lvm2") from None
    except sh.ErrorReturnCode as e:
        lines = e.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1].strip() if lines else f"exit status {e.exit_code}"
        error = NoSpace if "Insufficient free space" in why else SnapshotFailed
        raise error(f"`{' '.join(argv)}` failed: {why}") from None


# ------------------------------------------------------------------------------ lvm2's report

class LogicalVolume(BaseModel):
    """One row of `lvs --reportformat json` (lvm2 reports every value as a string)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    lv_name: str = Field(pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
    vg_name: str = Field(pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
    lv_uuid: str
    lv_attr: str = Field(min_length=10)
    lv_size: int = Field(ge=0)
    origin: str
    pool_lv: str
    segtype: str
    snap_percent: str
    lv_kernel_major: int
    lv_kernel_minor: int

    @property
    def full(self) -> str:
        return f"{self.vg_name}/{self.lv_name}"

    @property
    def path(self) -> str:
        return f"/dev/{self.vg_name}/{self.lv_name}"

    @property
    def thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def classic_snapshot(self) -> bool:
        return self.lv_attr[0] in "sS"  # (s)napshot, merging (S)napshot

    @property
    def invalid(self) -> bool:
        """A classic snapshot that filled up: lvm2 dropped it, its contents are gone."""
        return self.lv_attr[4] in "IS" or (
            self.classic_snapshot and self.snap_percent.startswith("100"))

    @property
    def merging(self) -> bool:
        return self.lv_attr[0] == "S" or self.lv_attr[0] == "O"


class VolumeGroup(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    vg_name: str
    vg_free: int = Field(ge=0)
    vg_extent_size: int = Field(gt=0)


def lvs_command(vg: str | None = None) -> list[str]:
    return ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LVS_FIELDS,
            *([vg] if vg else [])]


def vgs_command(vg: str | None = None) -> list[str]:
    return ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VGS_FIELDS,
            *([vg] if vg else [])]


def parse_report(out: str, key: str, model: type[Row]) -> list[Row]:
    """The rows of an lvm2 JSON report ({"report": [{key: [...]}]}), each validated."""
    try:
        data = json.loads(out)
        rows = [row for part in data["report"] for row in part.get(key, [])]
        return TypeAdapter(list[model]).validate_python(rows)
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as e:
        first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise SnapshotFailed(f"cannot read lvm2's {key} report: {first}") from None


# -------------------------------------------------------------------------- the commands

def size_args(spec: str) -> list[str]:
    """lvcreate's size options for a classic snapshot: a size (lvm2 units, 512M, 2G) or a
    percentage of the origin (20%ORIGIN)."""
    m = SIZE_PATTERN.fullmatch(spec)
    if m is None or (m["percent"] is not None and not 0 < int(m["percent"]) <= 100):
        raise BadInput(f"invalid --lvm-size {spec!r}: use a size such as 2G or 512M, or a "
                        "percentage of the origin such as 20%ORIGIN")
    return ["--size", spec] if m["bytes"] else ["--extents", spec]


def size_bytes(spec: str, origin: LogicalVolume) -> int:
    m = SIZE_PATTERN.fullmatch(spec)
    assert m is not None  # size_args checked it
    if m["percent"]:
        return origin.lv_size * int(m["percent"]) // 100
    units = {"": 1 << 20, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
             "t": 1 << 40}  # no unit: lvm2 means MiB
    number = m["bytes"].rstrip("bBsSkKmMgGtT")
    return int(float(number) * units[m["bytes"][len(number):].lower()])


def snapshot_command(origin: LogicalVolume, name: str, size: str | None,
                     writable: bool = False, active: bool = False) -> list[str]:
    """lvcreate of a snapshot of `origin`: classic with `size`, thin (no size) if the origin is
    thin. A checkpoint's is read-only; a restore's copies and rescues are writable (lvm2 merges
    those), and a copy to mount is activated (a thin one would be skipped)."""
    argv = ["lvcreate", "--snapshot", "--name", name, "--permission", "rw" if writable else "r"]
    if active:
        argv += ["--setactivationskip", "n", "--activate", "y"]
    if not origin.thin:
        argv += size_args(size or DEFAULT_SIZE)
    return [*argv, origin.full]


def remove_command(lv: str) -> list[str]:
    return ["lvremove", "--yes", lv]


def mount_command(device: str, volume: Path, fstype: str, options: list[str]) -> list[str]:
    # XFS refuses a second filesystem with the UUID of a mounted one: a snapshot has its
    # origin's UUID, and the origin stays mounted beneath (or is the volume of another run).
    opts = [*options, *(["nouuid"] if fstype == "xfs" else [])]
    return ["mount", "-t", fstype, *(["-o", ",".join(opts)] if opts else []), device,
            str(volume)]


def merge_commands(origin: LogicalVolume, merged: str, mount: Mount) -> list[list[str]]:
    """Roll the origin back to the snapshot `merged`: unmount, start the merge, and cycle the
    origin's activation, which is when lvm2 carries a merge out; then mount it as it was."""
    return [
        ["umount", mount.point],
        ["lvconvert", "--merge", f"{origin.vg_name}/{merged}"],
        ["lvchange", "--activate", "n", origin.full],
        ["lvchange", "--activate", "y", origin.full],
        mount_command(origin.path, Path(mount.point), mount.fstype, _own_options(mount)),
    ]


def _own_options(mount: Mount) -> list[str]:
    # The mount's own flags (ro, nosuid, noatime...), which mount(8) always takes back; not
    # the filesystem's as the kernel shows them, some of which it does not take as options.
    return [o for o in mount.options.split(",") if o and o != "rw"]


# ------------------------------------------------------------------------------ the provider

class Lvm:
    name = "lvm"

    def __init__(self, size: str | None = None, rollback: bool = False, runner: Runner = run):
        if size is not None:
            size_args(size)
        self.size = size
        self.rollback = rollback
        self.run = runner
        self.checked: dict[Path, LogicalVolume] = {}

    # --- what lvm2 knows

    def lvs(self, vg: str | None = None) -> list[LogicalVolume]:
        return parse_report(self.run(lvs_command(vg)), "lv", LogicalVolume)

    def vgs(self, vg: str | None = None) -> list[VolumeGroup]:
        return parse_report(self.run(vgs_command(vg)), "vg", VolumeGroup)

    def lookup(self, lv_path: str) -> LogicalVolume | None:
        """The LV at /dev/<vg>/<name>, None if lvm2 does not know it."""
        vg, name = split(lv_path)
        if not any(g.vg_name == vg for g in self.vgs()):
            return None
        return next((lv for lv in self.lvs(vg) if lv.lv_name == name), None)

    def origin(self, volume: Path) -> tuple[LogicalVolume, Mount]:
        """The logical volume mounted at `volume`, found by its device number."""
        mount = mount_at(volume)
        if mount is None:
            raise BadVolume(f"volume {volume} is not a mount point: an LVM volume is a "
                            "mounted logical volume")
        found = [lv for lv in self.lvs() if (lv.lv_kernel_major, lv.lv_kernel_minor) == mount.dev]
        if not found:
            raise BadVolume(f"volume {volume} is mounted from {mount.source}, which is not an "
                            "LVM logical volume")
        return found[0], mount

    # --- checkpoint

    def check(self, volume: Path) -> None:
        require()
        lv, mount = self.origin(volume)
        self.checked[volume] = lv  # create() runs in the frozen window: no lvs there
        if mount.fstype == "btrfs":
            raise BadVolume(f"volume {volume} is btrfs: an LVM snapshot of it would show the "
                            "same filesystem UUID twice; use --snapshot btrfs")
        if lv.classic_snapshot:
            raise BadVolume(f"volume {volume} is mounted from {lv.full}, a classic snapshot: "
                            "lvm2 cannot snapshot it")
        if not lv.thin:
            spec = self.size or DEFAULT_SIZE
            need, vg = size_bytes(spec, lv), self.vgs(lv.vg_name)[0]
            if vg.vg_free < need:
                raise NoSpace(f"volume group {vg.vg_name} has {vg.vg_free >> 20} MiB free; a "
                              f"snapshot of {lv.full} of {spec} needs {need >> 20} MiB: "
                              "lower --lvm-size or extend the group")

    def create(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        lv = self.checked.get(volume) or self.origin(volume)[0]
        name = lv_snapshot_name(ckpt_id, n)
        if lv.thin:  # left inactive (lvm2's activation skip): no device to wait for
            self.run(snapshot_command(lv, name, None))
        else:
            self._made(snapshot_command(lv, name, self.size), lv.vg_name, name)
        return f"/dev/{lv.vg_name}/{name}"

    def _activated(self, argv: list[str], vg: str, name: str) -> str:
        """Run a command that activates LV `name` and wait for its device; the device node."""
        with DeviceWatch() as watch:
            self.run(argv)
            return watch.wait(dm_device(dm_name(vg, name)), f"logical volume {vg}/{name}")

    def _made(self, argv: list[str], vg: str, name: str) -> str:
        """Like _activated, for an lvcreate: an LV whose device never shows up is removed."""
        try:
            return self._activated(argv, vg, name)
        except SnapshotFailed:
            self.delete(f"/dev/{vg}/{name}")
            raise

    def find(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        try:
            lv, _ = self.origin(volume)
        except BadVolume:
            return None
        path = f"/dev/{lv.vg_name}/{lv_snapshot_name(ckpt_id, n)}"
        return path if self.exists(path) else None

    def exists(self, snapshot: str) -> bool:
        return self.lookup(snapshot) is not None

    def state(self, snapshot: str) -> str:
        lv = self.lookup(snapshot)
        if lv is None:
            return "missing"
        if lv.invalid:
            return "invalid: it filled up, its contents are lost"
        if lv.classic_snapshot:
            return f"present, {lv.snap_percent or '0'}% of its space used"
        return "present"

    def delete(self, snapshot: str) -> None:
        if self.exists(snapshot):
            self.run(remove_command(snapshot.removeprefix("/dev/")))

    # --- restore

    def check_restore(self, volume: Path, snapshot: str | None, processes: bool) -> None:
        require()
        snap = self.lookup(snapshot) if snapshot else None
        if snap is None:
            raise BadManifest(f"snapshot {snapshot} is missing (`lvs` does not list it)")
        if snap.invalid:
            raise BadManifest(f"snapshot {snap.full} is invalid: it filled up (a classic "
                              "snapshot holds only --lvm-size of changes to its origin), and "
                              "what it held is lost")
        lv, _ = self.origin(volume)
        if self.rollback:
            if snap.origin != lv.lv_name or snap.vg_name != lv.vg_name:
                raise Refused(f"--rollback: {volume} is mounted from {lv.full}, not from "
                              f"{snap.vg_name}/{snap.origin}, the snapshot's origin")
        elif not snap.thin and processes:
            raise Refused(f"snapshot {snap.full} is a classic snapshot: it can only be mounted "
                          "read-only, which a restored tree cannot write to. Use --rollback "
                          "(merge it into its origin) or --volumes-only (a read-only view)")

    def rescue(self, volume: Path, rescue: str, n: int) -> str:
        return f"/dev/{self.origin(volume)[0].vg_name}/{lv_rescue_name(rescue, n)}"

    def swap_in(self, snapshot: str, volume: Path, rescue: str,
                made: Callable[[str], None]) -> None:
        snap = self.lookup(snapshot)
        if snap is None:
            raise SnapshotFailed(f"snapshot {snapshot} is missing")
        if self.rollback:
            self._roll_back(snap, volume, rescue, made)
            return
        _, mount = self.origin(volume)
        if snap.thin:
            copy = restored_name(rescue)
            device = self._made(snapshot_command(snap, copy, None, writable=True, active=True),
                                snap.vg_name, copy)
            made(f"{snap.vg_name}/{copy}")
            options: list[str] = []
        else:
            device, options = snap.path, ["ro"]
            made(snap.full)
        self.run(mount_command(device, volume, mount.fstype, options))

    def _roll_back(self, snap: LogicalVolume, volume: Path, rescue: str,
                   made: Callable[[str], None]) -> None:
        origin, mount = self.origin(volume)
        vg = origin.vg_name
        # What the volume holds now, kept as the rescue; a classic one as large as the
        # checkpoint's snapshot, enough for the changes the merge makes to the origin.
        self.run(snapshot_command(origin, split(rescue)[1], None if origin.thin
                                  else f"{snap.lv_size}b", writable=True))
        # lvm2 merges a snapshot into its own origin, so the checkpoint's snapshot itself is
        # merged. A thin one is copied first, and the copy takes its name after the merge:
        # the checkpoint keeps its contents (a classic snapshot cannot be copied: used up).
        keep = restored_name(rescue) if snap.thin else ""
        if keep:
            try:
                self.run(snapshot_command(snap, keep, None))
            except SnapshotFailed:
                self.delete(rescue)
                raise
        made(f"merge:{vg}/{snap.lv_name}:{keep}")
        self._merge(origin, snap.lv_name, mount)
        if keep:
            self.run(["lvrename", vg, keep, snap.lv_name])

    def _merge(self, origin: LogicalVolume, merged: str, mount: Mount) -> None:
        umount, convert, deactivate, activate, remount = merge_commands(origin, merged, mount)
        if mount_at(Path(mount.point)) is not None:
            self.run(umount)  # busy: nothing has changed yet
        try:
            self.run(convert)
        except SnapshotFailed:
            self.run(remount)  # the origin is as it was: mounted again, the error stands
            raise
        # From here the merge is lvm2's to finish: it runs when the origin is next activated.
        self.run(deactivate)
        self._activated(activate, origin.vg_name, origin.lv_name)
        self.run(remount)

    def swapped(self, volume: Path, copy: str) -> bool:
        if copy.startswith("merge:"):  # rolled back: the merged snapshot is gone or merging,
            merged, _, keep = copy.removeprefix("merge:").partition(":")  # or renamed over
            lv = self.lookup(f"/dev/{merged}")
            vg = merged.partition("/")[0]
            return lv is None or lv.merging or (keep != "" and not self.exists(f"/dev/{vg}/{keep}"))
        try:
            return self.origin(volume)[0].full == copy
        except BadVolume:
            return False

    def swap_back(self, volume: Path, rescue: str) -> None:
        saved = self.lookup(rescue)
        if saved is not None:  # a rollback: merge back what the volume held before it
            origin = self.lookup(f"/dev/{saved.vg_name}/{saved.origin}")
            mount = mount_at(volume)
            if origin is None or mount is None:
                raise SnapshotFailed(f"cannot put {volume} back by itself: activate and mount "
                                     f"its LV, then `lvconvert --merge {saved.full}`")
            self._merge(origin, saved.lv_name, mount)
            return
        top, _ = self.origin(volume)  # a mount: fscr's LV is on top of the volume's own
        if top.lv_name.startswith(LV_PREFIX):
            self.run(["umount", str(volume)])
            if top.lv_name.startswith(f"{LV_PREFIX}restored_"):
                self.run(remove_command(top.full))

    def discard(self, volume: Path, rescue: str) -> None:
        for lv in (rescue, f"/dev/{split(rescue)[0]}/{restored_name(rescue)}"):
            self.delete(lv)

    def seal(self, rescue: str) -> None:
        self.run(["lvchange", "--permission", "r", rescue.removeprefix("/dev/")])


def require() -> None:
    why = unavailable()
    if why is not None:
        raise MissingDependency(f"--snapshot lvm: {why}")


def dm_name(vg: str, lv: str) -> str:
    """device-mapper's name for an LV: '-' inside either name is doubled."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def split(lv_path: str) -> tuple[str, str]:
    """(vg, name) of /dev/<vg>/<name>, refused unless the name is one fscr gives."""
    parts = lv_path.split("/")
    if len(parts) != 4 or parts[:2] != ["", "dev"] or not parts[3].startswith(LV_PREFIX) \
            or not re.fullmatch(VG_PATTERN, parts[2]):
        raise BadManifest(f"{lv_path} is not an LV fscr made (/dev/<vg>/{LV_PREFIX}...)")
    return parts[2], parts[3]


def restored_name(rescue: str) -> str:
    """The name of a restore's copy, from its rescue's: fscr_restored_<id>_<time>_<hex>_<n>."""
    stem, _, n = split(rescue)[1].removeprefix(LV_PREFIX).rpartition("_")
    return lv_restored_name(stem, int(n))
