"""--snapshot none: no filesystem copy; the volumes are only scanned for open files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import BadVolume


class NoSnapshot:
    name = "none"

    def check(self, volume: Path) -> None:
        if not volume.is_dir():
            raise BadVolume(f"volume {volume} is not a directory")

    def create(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        return None

    def delete(self, snapshot: str) -> None:
        pass

    def check_target(self, volume: Path) -> None:
        self.check(volume)

    def swap_in(self, snapshot: str, volume: Path, rescue: Path,
                made: Callable[[str], None]) -> None:
        pass

    def swap_back(self, volume: Path, rescue: Path) -> None:
        pass

    def seal(self, rescue: Path) -> None:
        pass

    def identity(self, volume: Path) -> str | None:
        return None
