"""--snapshot none: no filesystem copy; the volumes are only scanned for open files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import BadStream, BadVolume, FscrError, Refused


class NoSnapshot:
    name = "none"

    def check(self, volume: Path) -> None:
        if not volume.is_dir():
            raise BadVolume(f"volume {volume} is not a directory")

    def create(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        return None

    def find(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        return None

    def exists(self, snapshot: str) -> bool:
        return False

    def state(self, snapshot: str) -> str:
        return "none"

    def delete(self, snapshot: str) -> None:
        pass

    def check_restore(self, volume: Path, snapshot: str | None, processes: bool) -> None:
        self.check(volume)

    def rescue(self, volume: Path, rescue: str, n: int) -> str:
        return ""

    def owns_rescue(self, name: str, path: str) -> bool:
        return False  # it makes no rescue

    def swap_in(self, snapshot: str, volume: Path, rescue: str,
                made: Callable[[str], None]) -> None:
        pass

    def swapped(self, volume: Path, copy: str) -> bool:
        return False

    def leftover(self, volume: Path, rescue: str) -> bool:
        return False

    def undo(self, volume: Path, rescue: str, copy: str | None) -> None:
        pass

    def seal(self, rescue: str) -> None:
        pass

    clones = False

    def clone(self, snapshot: str, dest: Path) -> None:
        raise Refused("a checkpoint without snapshots (--snapshot none) has no volume to run "
                      "a copy from")

    # A checkpoint without snapshots travels as its images alone: no volume record to make.
    sends = True

    def send(self, snapshot: str, parent: str | None, write: Callable[[bytes], None]) -> None:
        raise FscrError("a checkpoint without snapshots (--snapshot none) has none to send")

    def receive(self, volume: Path, ckpt_id: str, n: int,
                read: Callable[[Callable[[bytes], None]], object],
                made: Callable[[str], None]) -> str:
        raise BadStream("the stream is corrupt (a volume record in a checkpoint without "
                        "snapshots)")
