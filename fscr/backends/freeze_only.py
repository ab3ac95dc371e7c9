"""--backend freeze-only: no process image. The checkpoint is the volumes' snapshots, taken
while the tree was frozen, so the files are consistent with one instant."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Refused
from . import DumpRequest, RestoreRequest


class FreezeOnly:
    name = "freeze-only"
    writes_image = False

    def check(self) -> None:
        pass

    def dump(self, req: DumpRequest, started: Callable[[int], None]) -> str | None:
        return None

    def restore(self, req: RestoreRequest, started: Callable[[int], None]) -> int:
        raise Refused("a freeze-only checkpoint holds no process image: it restores volumes only")
