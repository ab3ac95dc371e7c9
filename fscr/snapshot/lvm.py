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
- rollback (--rollback, classic snapshots): the origin itself goes back. A rescue snapshot of
  the origin keeps what it held; the volume is unmounted and `lvconvert --merge` merges the
  checkpoint's snapshot into the closed origin (lvm2 would put off a merge into an open
  origin until its next activation, so fscr refuses an origin still open elsewhere) and
  returns once it is done; the volume is mounted again. The merge uses the snapshot up.
  A thin volume restores writable by mount; merging a thin snapshot would detach the volume's
  other thin snapshots (its rescue among them) from it, leaving no way back: refused.

The commands are built by the functions below (docs/lvm.md lists them in order, and a test
checks the list against them). `lvs --reportformat json` is read through a validator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self, TypeVar

import sh

from .. import records
from ..errors import (
    BadInput,
    BadManifest,
    BadStream,
    BadVolume,
    MissingDependency,
    NoSpace,
    Refused,
    SnapshotFailed,
)
from ..fsutil import Mount, mount_at
from ..names import LV_PREFIX, VG_PATTERN, lv_rescue_name, lv_restored_name, lv_snapshot_name
from ..records import Meta, Record, Struct
from .devices import DeviceWatch, dm_device

DEFAULT_SIZE = "20%ORIGIN"
SIZE_PATTERN = re.compile(
    r"(?P<bytes>[0-9]+(\.[0-9]+)?[bBsSkKmMgGtT]?)|(?P<percent>[0-9]{1,3})%ORIGIN")
LVS_FIELDS = ("lv_name,vg_name,lv_uuid,lv_attr,lv_size,origin,pool_lv,segtype,snap_percent,"
              "lv_kernel_major,lv_kernel_minor")
VGS_FIELDS = "vg_name,vg_free,vg_extent_size"

Runner = Callable[[list[str]], str]
Row = TypeVar("Row", bound="_Row")


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
        error = NoSpace if "insufficient free space" in why.lower() else SnapshotFailed
        raise error(f"`{' '.join(argv)}` failed: {why}") from None


# ------------------------------------------------------------------------------ lvm2's report

class _Row(Struct, frozen=True):
    """One row of an lvm2 JSON report. A key fscr does not ask for is ignored; `of` reads the
    values lvm2 gives as strings, then validates strictly."""

    numbers: ClassVar[tuple[str, ...]] = ()  # the fields lvm2 reports as strings of digits

    @classmethod
    def of(cls, row: object) -> Self:
        if isinstance(row, dict):  # anything else: convert says what is wrong
            row = {k: int(v) if k in cls.numbers and isinstance(v, str)
                   and re.fullmatch(r"-?[0-9]+", v) else v for k, v in row.items()}
            name = row.get("lv_name")
            if isinstance(name, str) and name[:1] == "[" and name[-1:] == "]":
                row["lv_name"] = name[1:-1]  # lvm2 shows a hidden LV's name in brackets
        return records.convert(row, cls)


LvmName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*\Z")]


class LogicalVolume(_Row):
    """One row of `lvs --reportformat json`."""

    numbers = ("lv_size", "lv_kernel_major", "lv_kernel_minor")
    lv_name: LvmName
    vg_name: LvmName
    lv_uuid: str
    lv_attr: Annotated[str, Meta(min_length=10)]
    lv_size: Annotated[int, Meta(ge=0)]
    origin: str
    pool_lv: str
    segtype: str
    snap_percent: str
    lv_kernel_major: int  # -1: not active
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
        return self.lv_attr[0] in "sS" and not self.thin  # (s)napshot, merging (S)napshot

    @property
    def open(self) -> bool:
        return self.lv_attr[5] == "o"

    @property
    def invalid(self) -> bool:
        """A classic snapshot that filled up: lvm2 dropped it, its contents are gone."""
        return self.lv_attr[4] in "IS" or (
            self.classic_snapshot and self.snap_percent.startswith("100"))

    @property
    def merging(self) -> bool:
        return self.lv_attr[0] == "S" or self.lv_attr[0] == "O"


class VolumeGroup(_Row):
    """One row of `vgs --reportformat json`."""

    numbers = ("vg_free", "vg_extent_size")
    vg_name: str
    vg_free: Annotated[int, Meta(ge=0)]
    vg_extent_size: Annotated[int, Meta(gt=0)]


def lvs_command(vg: str | None = None) -> list[str]:
    # -a: lvm2 hides a classic snapshot while it merges ([name]); fscr must still see it.
    return ["lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
            LVS_FIELDS, *([vg] if vg else [])]


def vgs_command(vg: str | None = None) -> list[str]:
    return ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VGS_FIELDS,
            *([vg] if vg else [])]


def parse_report(out: str, key: str, model: type[Row]) -> list[Row]:
    """The rows of an lvm2 JSON report ({"report": [{key: [...]}]}), each validated."""
    try:
        data = json.loads(out)
        return [model.of(row) for part in data["report"] for row in part.get(key, [])]
    except records.Invalid as e:
        where, what = records.why(e)
        raise SnapshotFailed(f"cannot read lvm2's {key} report: {what} at {where}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SnapshotFailed(f"cannot read lvm2's {key} report: {e}") from None


# -------------------------------------------------------------------------- the commands

def size_args(spec: str) -> list[str]:
    """lvcreate's size options for a classic snapshot: a size (lvm2 units, 512M, 2G) or a
    percentage of the origin (20%ORIGIN)."""
    m = SIZE_PATTERN.fullmatch(spec)
    if m is None or (m["percent"] is not None and not 0 < int(m["percent"]) <= 100) or (
            m["bytes"] and m["bytes"][-1] in "bB" and not (  # lvm2: whole 512-byte sectors
                m["bytes"][:-1].isdigit() and int(m["bytes"][:-1]) % 512 == 0)):
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


class Remount(Struct, frozen=True):  # a key it does not know is ignored
    """Where and how a volume was mounted, to mount it again after a merge."""

    point: str
    fstype: str
    options: list[str]  # the mount's own flags (ro, nosuid, noatime...), not "rw"

    @classmethod
    def of(cls, mount: Mount) -> Remount:
        # Not the filesystem's options as the kernel shows them: mount(8) refuses some.
        return cls(point=mount.point, fstype=mount.fstype,
                   options=[o for o in mount.options.split(",") if o and o != "rw"])


def merge_commands(origin: LogicalVolume, merged: str, mount: Remount) -> list[list[str]]:
    """Roll the origin back to its snapshot `merged`: unmount, merge (lvconvert returns once
    the merge into the closed origin is done, and removes the snapshot), mount again."""
    return [
        ["umount", mount.point],
        ["lvconvert", "--merge", "--interval", "1", f"{origin.vg_name}/{merged}"],
        remount_command(origin, mount),
    ]


def remount_command(origin: LogicalVolume, mount: Remount) -> list[str]:
    return mount_command(origin.path, Path(mount.point), mount.fstype, mount.options)


# ------------------------------------------------------------------------------ the provider

class LvmSwap(Record):
    """What a restore's swap_in did, journaled (as JSON) before it changes the volume: how
    the volume gets the checkpoint's contents, and the LV that gives them."""

    how: Literal["mount", "merge"]
    lv: str  # vg/name: the LV mounted over the volume, or the snapshot merged into it
    origin: str  # vg/name: the volume's own LV
    mount: Remount  # the volume's mount before the restore


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
        rows = parse_report(self.run(lvs_command(vg)), "lv", LogicalVolume)
        return list({lv.lv_uuid: lv for lv in rows}.values())  # one row per segment

    def vgs(self, vg: str | None = None) -> list[VolumeGroup]:
        return parse_report(self.run(vgs_command(vg)), "vg", VolumeGroup)

    def lookup(self, lv_path: str) -> LogicalVolume | None:
        """The LV fscr made at /dev/<vg>/<name>, None if lvm2 does not know it."""
        return self._find(*split(lv_path))

    def _find(self, vg: str, name: str) -> LogicalVolume | None:
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

    def _need_room(self, lv: LogicalVolume, need: int, what: str) -> None:
        vg = self.vgs(lv.vg_name)[0]
        need = -(-need // vg.vg_extent_size) * vg.vg_extent_size  # lvm2 takes whole extents
        if vg.vg_free < need:
            raise NoSpace(f"volume group {vg.vg_name} has {vg.vg_free >> 20} MiB free; {what} "
                          f"needs {need >> 20} MiB")

    # --- checkpoint

    def check(self, volume: Path) -> None:
        require()
        lv, mount = self.origin(volume)
        if mount.fstype == "btrfs":
            raise BadVolume(f"volume {volume} is btrfs: an LVM snapshot of it would show the "
                            "same filesystem UUID twice; use --snapshot btrfs")
        if lv.classic_snapshot:
            raise BadVolume(f"volume {volume} is mounted from {lv.full}, a classic snapshot: "
                            "lvm2 cannot snapshot it")
        if not lv.thin:
            spec = self.size or DEFAULT_SIZE
            self._need_room(lv, size_bytes(spec, lv), f"a snapshot of {lv.full} of {spec} "
                            "(lower --lvm-size or extend the group)")
        self.checked[volume] = lv  # create() runs in the frozen window: no lvs there

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
            if snap.thin:
                raise Refused(f"--rollback merges classic snapshots; {snap.full} is thin: "
                              "restore it without --rollback (a writable copy is mounted)")
            if snap.origin != lv.lv_name or snap.vg_name != lv.vg_name:
                raise Refused(f"--rollback: {volume} is mounted from {lv.full}, not from "
                              f"{snap.vg_name}/{snap.origin}, the snapshot's origin")
            if snap.open:  # lvm2 would put the merge off until the snapshot is closed
                raise Refused(f"--rollback: snapshot {snap.full} is open (mounted by a "
                              "--volumes-only restore?): unmount it first")
            self._need_room(lv, self._rescue_bytes(snap, lv),
                            f"the rescue snapshot of {lv.full} (what --rollback replaces)")
        elif not snap.thin and processes:
            raise Refused(f"snapshot {snap.full} is a classic snapshot: it can only be mounted "
                          "read-only, which a restored tree cannot write to. Use --rollback "
                          "(merge it into its origin) or --volumes-only (a read-only view)")

    def _rescue_bytes(self, snap: LogicalVolume, origin: LogicalVolume) -> int:
        # The merge copies up to the snapshot's size into the origin, and the restored tree
        # writes on: room for both, or the rescue fills up and is lost.
        need = snap.lv_size + size_bytes(DEFAULT_SIZE, origin)
        return -(-need // 512) * 512

    def rescue(self, volume: Path, rescue: str, n: int) -> str:
        return f"/dev/{self.origin(volume)[0].vg_name}/{lv_rescue_name(rescue, n)}"

    def owns_rescue(self, name: str, path: str) -> bool:
        # lv_rescue_name: fscr_<name>_<n>, in any volume group
        n = Path(path).name.removeprefix(lv_rescue_name(name, 0)[:-1])
        return n != Path(path).name and n.isascii() and n.isdigit() \
            and Path(path).name == lv_rescue_name(name, int(n))

    def swap_in(self, snapshot: str, volume: Path, rescue: str,
                made: Callable[[str], None]) -> None:
        snap = self.lookup(snapshot)
        if snap is None:
            raise SnapshotFailed(f"snapshot {snapshot} is missing")
        origin, mount = self.origin(volume)
        if self.rollback:
            self.run(snapshot_command(origin, split(rescue)[1],
                                      f"{self._rescue_bytes(snap, origin)}b", writable=True))
            swap = LvmSwap(how="merge", lv=snap.full, origin=origin.full, mount=Remount.of(mount))
            made(records.encode(swap).decode())
            self._merge(origin, snap.lv_name, swap.mount)
            return
        if snap.thin:
            copy = restored_name(rescue)
            device = self._made(snapshot_command(snap, copy, None, writable=True, active=True),
                                snap.vg_name, copy)
            swap = LvmSwap(how="mount", lv=f"{snap.vg_name}/{copy}", origin=origin.full,
                        mount=Remount.of(mount))
            options = swap.mount.options  # the volume's own flags: nosuid, noexec, ro...
        else:
            device = snap.path
            swap = LvmSwap(how="mount", lv=snap.full, origin=origin.full, mount=Remount.of(mount))
            options = [*dict.fromkeys([*swap.mount.options, "ro"])]
        made(records.encode(swap).decode())
        self.run(mount_command(device, volume, mount.fstype, options))

    def _merge(self, origin: LogicalVolume, merged: str, mount: Remount) -> None:
        umount, convert, remount = merge_commands(origin, merged, mount)
        if mount_at(Path(mount.point)) is not None:
            self.run(umount)  # busy: nothing has changed
        try:
            self._closed(origin)
            self.run(convert)
        except SnapshotFailed:
            self.run(remount)  # the origin is as it was: mounted again, the error stands
            raise
        # For a closed origin lvconvert returns once the merge is done and the snapshot gone;
        # a snapshot still there means lvm2 put the merge off (something opened one of them).
        left = self._find(origin.vg_name, merged)
        if left is not None:
            raise SnapshotFailed(
                f"lvm2 put off the merge of {left.full} into {origin.full} (one of them was "
                f"opened meanwhile); {mount.point} stays unmounted: `lvchange --refresh "
                f"{origin.full}` starts it, then mount it and run `fscr gc`")
        self.run(remount)

    def _closed(self, origin: LogicalVolume) -> None:
        """Wait a little for the origin to be closed after its umount (udev's blkid may look
        at it for a moment, as lvm2's own in-use check allows for); refuse if it stays open:
        lvm2 would put the merge off until its next activation, unseen."""
        for _ in range(25):
            now = self._find(origin.vg_name, origin.lv_name)
            if now is None or not now.open:
                return
            time.sleep(0.2)
        raise SnapshotFailed(f"{origin.full} is still open after its umount (mounted in another "
                             "mount namespace, or held by a process); refusing to merge")

    def swapped(self, volume: Path, copy: str) -> bool:
        swap = _swap(copy)
        if swap.how == "merge":  # the merged snapshot is gone, or merging
            lv = self.lookup(f"/dev/{swap.lv}")
            return lv is None or lv.merging
        try:
            return self.origin(volume)[0].full == swap.lv
        except BadVolume:
            return False

    def leftover(self, volume: Path, rescue: str) -> bool:
        return self.exists(rescue) or self.exists(_restored_path(rescue))

    def undo(self, volume: Path, rescue: str, copy: str | None) -> None:
        swap = _swap(copy) if copy is not None else None
        done = copy is not None and self.swapped(volume, copy)
        if swap is not None and swap.how == "merge":
            vg, name = split(rescue)
            if done:  # the origin holds the checkpoint's contents: merge the rescue back
                saved = self._find(vg, name)
                base = self._find(*swap.origin.split("/"))
                if base is None:
                    raise SnapshotFailed(f"cannot put {volume} back: {swap.origin} is gone")
                if saved is not None and not saved.merging:
                    self._merge(base, name, swap.mount)
                elif mount_at(Path(swap.mount.point)) is None:
                    # The rescue's merge ran (or runs: the origin shows its result already)
                    # before fscr died: only the mount is left to do.
                    self.run(remount_command(base, swap.mount))
                return
            base = self._find(*swap.origin.split("/"))  # not merged: the origin as it was
            if mount_at(Path(swap.mount.point)) is None and base is not None:
                self.run(remount_command(base, swap.mount))  # fscr died after the umount
            self.delete(rescue)
            return
        if done and swap is not None:  # fscr's LV is mounted over the volume's own
            self.run(["umount", str(volume)])
        self.delete(_restored_path(rescue))  # never the checkpoint's own snapshot
        self.delete(rescue)

    def seal(self, rescue: str) -> None:
        lv = self.lookup(rescue)
        if lv is not None and lv.lv_attr[1] != "r":  # lvchange refuses "already read only"
            self.run(["lvchange", "--permission", "r", lv.full])

    clones = False

    def clone(self, snapshot: str, dest: Path) -> None:
        raise Refused("restore --beside needs btrfs: a copy of an LVM snapshot would have to "
                      "be mounted for it, which fscr does not do yet")

    # A logical volume has no send stream fscr could frame (docs/lvm.md says how to move one):
    # send refuses an LVM checkpoint before writing a byte, receive a stream that names one.
    sends = False

    def send(self, snapshot: str, parent: str | None, write: Callable[[bytes], None]) -> None:
        raise Refused(f"{snapshot} is an LVM snapshot: send carries btrfs snapshots only")

    def receive(self, volume: Path, ckpt_id: str, n: int,
                read: Callable[[Callable[[bytes], None]], object],
                made: Callable[[str], None]) -> str:
        raise BadStream("the stream's checkpoint names LVM snapshots, which streams never carry")


def _swap(copy: str) -> LvmSwap:
    try:
        return records.decode(copy, LvmSwap)
    except (records.Invalid, RecursionError):  # RecursionError: a deep value Remount skips
        raise BadManifest(f"a journal names an LVM swap fscr does not know: {copy[:80]}") \
            from None


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


def _restored_path(rescue: str) -> str:
    return f"/dev/{split(rescue)[0]}/{restored_name(rescue)}"


def restored_name(rescue: str) -> str:
    """The name of a restore's copy, from its rescue's: fscr_restored_<id>_<time>_<hex>_<n>."""
    stem, _, n = split(rescue)[1].removeprefix(LV_PREFIX).rpartition("_")
    return lv_restored_name(stem, int(n))
