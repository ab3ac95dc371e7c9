"""Snapshot providers behind one small interface; the pipeline picks one by name.

A provider checks that a directory is a volume it can snapshot, creates a read-only snapshot
in the frozen window, deletes one, and at restore puts a snapshot back at the volume's path
while keeping the contents it replaced (the rescue snapshot). A provider that can also streams
a snapshot out and receives one back (fscr send and receive: transfer.py frames the stream,
the provider fills and empties its volume records).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeAlias

from ..errors import BadInput, FscrError

Copy: TypeAlias = str
"""What a provider's swap_in hands back (through `made`) once the volume's writable copy
exists: opaque to the pipeline, journaled as the "copy" event, and handed back unchanged to
the same provider's `swapped` and `undo`, so a gc after a crash can finish or undo the swap.
btrfs: the copy subvolume's UUID (a subvolume at the volume's path with that UUID means the
swap happened); LVM: a snapshot.lvm.LvmSwap record as JSON (how: mount or merge, the LVs,
the volume's mount); none: ""."""


class Provider(Protocol):
    """A snapshot is named by a string: a path (btrfs), or /dev/<vg>/<lv> (LVM)."""

    name: str

    # checkpoint
    def check(self, volume: Path) -> None:
        """Raise BadVolume (or MissingDependency) unless `volume` can be snapshotted by this
        provider: called before anything is frozen."""

    def create(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        """A read-only snapshot of `volume`, named with `ckpt_id` and `n`; returns its name."""

    def find(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        """The snapshot (or the remains of one) `create` makes for these, if it exists."""

    def exists(self, snapshot: str) -> bool: ...

    def state(self, snapshot: str) -> str:
        """For `fscr show`: present, missing, or (a classic LVM snapshot) how full, invalid."""

    def delete(self, snapshot: str) -> None:
        """Remove a snapshot this provider created; a missing one is not an error."""

    # restore
    def check_restore(self, volume: Path, snapshot: str | None, processes: bool) -> None:
        """Raise unless `snapshot` can be put back at `volume` (with a tree to restore, if
        `processes`). A btrfs volume that does not exist yet (a checkpoint received from
        another machine) is created from its snapshot."""

    def rescue(self, volume: Path, rescue: str, n: int) -> str:
        """The name the contents a restore replaces get, for the restore called `rescue`."""

    def swap_in(self, snapshot: str, volume: Path, rescue: str,
                made: Callable[[Copy], None]) -> None:
        """Put a writable copy of `snapshot` at `volume`, keeping what it replaces at
        `rescue` (where the provider does). `made(copy)` is called once the copy exists and
        before the swap, to journal it; on a failure before that, nothing is left behind."""

    def swapped(self, volume: Path, copy: Copy) -> bool:
        """Whether the swap of `copy` (as passed to made) into `volume` happened."""

    def leftover(self, volume: Path, rescue: str) -> bool:
        """Whether a swap_in that died before calling made left anything behind."""

    def undo(self, volume: Path, rescue: str, copy: Copy | None) -> None:
        """Undo a swap_in, however far it got (`copy` is what it passed to made, if it did):
        the volume holds again what it held before, and what the restore made is removed."""

    def seal(self, rescue: str) -> None:
        """Make a rescue read-only once the restore succeeded."""

    def owns_rescue(self, name: str, path: str) -> bool:
        """Whether `path` is one of the snapshots `rescue(_, name, n)` names: delete removes
        only those, whatever a rescue record under the store says."""

    # restore --beside
    clones: bool  # whether clone works: a copy beside the original needs it

    def clone(self, snapshot: str, dest: Path) -> None:
        """A writable copy of `snapshot` at `dest` (a directory fscr names), leaving the
        volume alone; on failure nothing is left at `dest`."""

    # send and receive (docs/transfer.md)
    sends: bool  # whether snapshots travel in a stream: send refuses a checkpoint otherwise

    def send(self, snapshot: str, parent: str | None, write: Callable[[bytes], None]) -> None:
        """Pass `snapshot` to `write` in chunks, as a delta against `parent` (the same
        volume's snapshot in an earlier checkpoint) when given; raise FscrError if that
        fails."""

    def receive(self, volume: Path, ckpt_id: str, n: int,
                read: Callable[[Callable[[bytes], None]], object],
                made: Callable[[str], None]) -> str:
        """Make the snapshot `create` would have named for these from what `read(sink)` passes
        to `sink` (one volume record's payload); return its name. `made(name)` is called
        before anything is written there, to journal it; the caller deletes it on a failure.
        A payload this provider cannot use raises BadStream."""


KINDS = ("btrfs", "lvm", "none")


def get(name: str, size: str | None = None, rollback: bool = False) -> Provider:
    """The provider called `name`, imported on demand (btrfs needs libbtrfsutil). `size` is a
    classic LVM snapshot's size, `rollback` a restore by merging into the LVM origin."""
    if name != "lvm" and (size is not None or rollback):
        raise BadInput(f"{'--lvm-size' if size else '--rollback'} applies to LVM snapshots, "
                       f"not to --snapshot {name}")
    if name == "btrfs":
        from .btrfs import Btrfs

        return Btrfs()
    if name == "lvm":
        from .lvm import Lvm

        return Lvm(size=size, rollback=rollback)
    if name == "none":
        from .none import NoSnapshot

        return NoSnapshot()
    raise BadInput(f"unknown snapshot kind {name!r} (known: {', '.join(KINDS)})")


def state_of(kind: str, snapshot: str) -> str:
    """A snapshot's state for show, list and doctor: present, missing, how full (a classic
    LVM snapshot), or why it cannot be told."""
    try:
        return get(kind).state(snapshot)
    except FscrError as e:
        return f"unknown ({e})"
