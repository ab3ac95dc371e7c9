"""--backend freeze-only: no process image. The checkpoint is the volumes' snapshots, taken
while the tree was frozen, so the files are consistent with one instant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import Refused
from . import DumpHooks, DumpRequest, RestoreRequest


class FreezeOnly:
    name = "freeze-only"
    writes_image = False

    def check(self, version: bool = False) -> None:
        pass

    def dump(self, req: DumpRequest, hooks: DumpHooks) -> str | None:
        # The same stages as CRIU's, without an image: the pipeline reads the same for both.
        hooks.stop()
        hooks.externals()
        hooks.dumped()
        return None

    def copied_unlinked(self, images: Path, under: list[Path]) -> list[str]:
        return []

    def restore(self, req: RestoreRequest, started: Callable[[int], None]) -> int:
        raise Refused("a freeze-only checkpoint holds no process image: it restores volumes only")
