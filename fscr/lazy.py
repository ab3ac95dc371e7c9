"""Lazy restore: CRIU's lazy-pages daemon serves the tree's memory over userfaultfd, so a
restored process runs (and answers) before its memory is back.

`criu lazy-pages` is started before `criu restore --lazy-pages`; both meet on the socket
`lazy-pages.socket` in the work directory they share. The restored tasks fault their
anonymous pages in from the daemon, which meanwhile copies the rest in the background and
exits once every page is in. It must never be killed before that: a userfaultfd that goes
away leaves the untransferred pages reading as zeroes. So a restore waits for it, and the
journal names it, so that gc waits for it too (gc.py, as for CRIU itself).

The page images are checksummed while the tree already runs (`is_page_image` tells them
from the images checked before anything is touched); a corrupt one is caught after the
tree has started, and the restore then kills the tree and puts the volumes back.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .backends.criu import find, require
from .errors import CriuFailed, FscrError
from .process.tree import Task, descendants, read_stat

SOCKET = "lazy-pages.socket"  # CRIU's name for it (criu/uffd.c, LAZY_PAGES_SOCK_NAME)


def is_page_image(name: str) -> bool:
    """The images the daemon serves: the memory itself (pages-N.img), the bulk of a big
    process's image, verified while the tree runs."""
    return name.startswith("pages-") and name.endswith(".img")


def available() -> tuple[bool, str]:
    """Whether this kernel and CRIU can restore lazily: userfaultfd, and its non-cooperative
    events (fork, mremap, exit of the restored tasks), as `criu check --feature` sees them."""
    found = find()
    if found.path is None:
        return False, "no CRIU"
    missing = [feat for feat in ("uffd", "uffd-noncoop")
               if subprocess.run([found.path, "check", "--feature", feat],
                                 capture_output=True).returncode != 0]
    if missing:
        return False, f"kernel or CRIU lacks {', '.join(missing)} (userfaultfd)"
    return True, "userfaultfd with non-cooperative events: `fscr restore --lazy` works"


def start(images: Path, workdir: Path, log: Path, started: Callable[[Task], None]) -> Task:
    """Start the daemon for `images`, detached; it is listening when this returns. `started`
    gets it first thing (to journal it). Raises CriuFailed if it does not start."""
    pidfile = workdir / "lazy-pages.pid"
    pidfile.unlink(missing_ok=True)
    (workdir / SOCKET).unlink(missing_ok=True)
    # --daemon: CRIU forks once its socket listens, and the parent exits; so when run()
    # returns, restore can connect. -v2 as for restore: only errors are read.
    argv = [require(), "lazy-pages", "-D", str(images), "-W", str(workdir), "-o", str(log),
            "-v2", "--daemon", "--pidfile", str(pidfile)]
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    finally:
        pidfile.unlink(missing_ok=True)
    st = read_stat(pid) if pid > 0 else None
    if out.returncode != 0 or st is None:
        why = (out.stderr.strip().splitlines() or ["no daemon running"])[-1]
        raise CriuFailed("lazy-pages", why, None, log)
    daemon = Task(pid, st.starttime)
    started(daemon)
    return daemon


def wait(daemon: Task, timeout: float) -> bool:
    """Wait until the daemon has handed over every page and exited; False on timeout (it
    is left running: killing it would zero the pages not yet copied)."""
    deadline = time.monotonic() + timeout
    while daemon.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop(daemon: Task) -> None:
    """Kill the daemon: only once the tree it serves is dead or being killed."""
    daemon.kill()


def kill_tree(root: int) -> None:
    """SIGKILL the restored tree (its memory is not the checkpoint's) and wait until it is
    gone."""
    try:
        tasks = descendants(root)
    except FscrError:  # gone already: nothing to kill
        return
    for t in tasks:
        t.kill()
    deadline = time.monotonic() + 10
    while any(t.alive() for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.02)
