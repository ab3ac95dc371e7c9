"""Mount namespaces: a private one for a copy restored beside its original, and the check
that a tree shares fscr's own (else CRIU would have to dump its whole mount table).

A copy restored with `fscr restore --beside` sees a writable clone of each volume's snapshot
at the volume's own path, bind-mounted in a mount namespace CRIU is started in (restored tasks
inherit CRIU's namespace, since the tree shared the host's at the dump); the original and the
rest of the machine keep seeing the live volume.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def private_binds(binds: list[tuple[str, str]]) -> Callable[[], None] | None:
    """A preexec function: a new mount namespace whose mounts propagate nowhere, with each
    (source, target) bind-mounted. None when there is nothing to bind."""
    if not binds:
        return None

    def enter() -> None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        for source, target in binds:
            _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None),
                   f"mount --bind {source} {target}")

    return enter


def shares_mine(pid: int) -> bool:
    """Whether `pid` lives in fscr's own mount namespace."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except (FileNotFoundError, ProcessLookupError):
        return True  # gone: whatever refuses it next says so


def chain(*fns: Callable[[], None] | None) -> Callable[[], None] | None:
    """One preexec function running each given one in order."""
    todo = [f for f in fns if f is not None]
    if not todo:
        return None

    def run() -> None:
        for f in todo:
            f()

    return run
