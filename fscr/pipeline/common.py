"""What checkpoint and restore share: stage timing and progress, ids."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..journal import Journal
from ..process.tree import read_stat
from ..progress import finished, meter

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..store import Store

Progress = Callable[[str], None]


def quiet(stage: str) -> None:
    pass


def new_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "_" + secrets.token_hex(2)


@dataclass
class Timings:
    """Durations of the named stages, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)
    progress: Progress = quiet

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 6)
        finished(self.progress, name, self.seconds[name])  # only a stage that succeeded


def noting_pid(journal: Journal) -> Callable[[int], None]:
    """A callback that journals a started CRIU's identity, so gc and the watchdog find it."""
    def started(pid: int) -> None:
        st = read_stat(pid)
        journal.note("criu", pid=pid, starttime=st.starttime if st else 0)
    return started


def in_background(fn: Callable[..., None], *args: object) -> Callable[[], None]:
    """Start fn(*args) in a thread; the returned function waits for it and raises what it
    raised. (hashlib and file reads release the GIL.)"""
    pool = ThreadPoolExecutor(1, thread_name_prefix="fscr-verify")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)  # the thread ends with fn; future.result() waits for it
    return future.result


def verify_in_background(store: Store, m: Manifest, progress: Progress,
                         which: Callable[[str], bool] | None = None,
                         what: str = "checksum") -> Callable[[], None]:
    """The images' checksums (of those `which` selects by name, default all), on another
    core, with a meter named `what`: the returned function waits for them and raises what
    the check raised (BadManifest for a corrupt image)."""
    chosen = [i for i in m.images if which is None or which(i.name)]
    shown = meter(progress, what, sum(i.size for i in chosen)) if chosen else None

    def verify() -> None:
        # The meter ends with the hashing, not when it is waited for (a restore waits for
        # the page images only at CRIU's post-restore): its time and rate are the hashing's.
        ok = False
        try:
            store.verify_images(m, shown.advance if shown else None, which)
            ok = True
        finally:
            if shown is not None:
                shown.finish(ok)
    return in_background(verify)
