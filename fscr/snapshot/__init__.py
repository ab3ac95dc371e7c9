"""Snapshot providers behind one small interface; the pipeline picks one by name.

A provider checks that a directory is a volume it can snapshot, creates a read-only snapshot
in the frozen window, deletes one, and at restore puts a snapshot back at the volume's path
while keeping the contents it replaced (the rescue snapshot).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import BadInput


class Provider(Protocol):
    name: str

    def check(self, volume: Path) -> None:
        """Raise BadVolume unless `volume` can be snapshotted and swapped by this provider."""

    def check_target(self, volume: Path) -> None:
        """Like check, for a restore: a volume that does not exist yet (a checkpoint received
        from another machine) is created from its snapshot."""

    def create(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        """A read-only snapshot of `volume`, named with `ckpt_id`; returns its path."""

    def delete(self, snapshot: str) -> None:
        """Remove a snapshot this provider created; a missing one is not an error."""

    def swap_in(self, snapshot: str, volume: Path, rescue: Path,
                made: Callable[[str], None]) -> None:
        """Put a writable copy of `snapshot` at `volume`; the replaced contents end at `rescue`.
        `made(copy id)` is called once the copy exists and before the swap, to journal it."""

    def swap_back(self, volume: Path, rescue: Path) -> None:
        """Undo swap_in: `rescue` goes back to `volume`, the restored copy is removed (or, if
        the restore created the volume, the volume is removed)."""

    def seal(self, rescue: Path) -> None:
        """Make a rescue snapshot read-only once the restore succeeded."""

    def identity(self, volume: Path) -> str | None:
        """What distinguishes this subvolume from every other (btrfs: its UUID), so that gc
        can tell whether a dead restore's swap happened."""


KINDS = ("btrfs", "none")


def get(name: str) -> Provider:
    """The provider called `name`; imported on demand (btrfs needs libbtrfsutil)."""
    if name == "btrfs":
        from .btrfs import Btrfs

        return Btrfs()
    if name == "none":
        from .none import NoSnapshot

        return NoSnapshot()
    raise BadInput(f"unknown snapshot kind {name!r} (known: {', '.join(KINDS)})")
