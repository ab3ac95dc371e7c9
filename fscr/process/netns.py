"""The network namespace of a tree, and how the checkpoint treats it.

- host: the tree shares fscr's namespace; nothing to do.
- external: the tree lives in a namespace it did not create (`ip netns add` + `fscr run
  --netns`, a container's): CRIU runs with only its network namespace switched to the tree's
  (setns, like `nsenter --net`), so the namespace stays outside the image, and restore puts
  the tree back into the same namespace, found by its /run/netns path (or a process that
  holds it). Never `ip netns exec`: it also unshares the mount namespace, and CRIU then fails
  with "unreachable sharing".
- own: the tree's root created it and nothing else holds it: CRIU dumps it whole and
  recreates it at restore.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import BadTarget, FscrError
from ..fsutil import mounts
from .tree import Task, all_pids, read_stat

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@dataclass(frozen=True)
class Placement:
    treatment: str  # "host", "external" or "own"
    inode: int
    path: str | None = None  # a bind mount of it (/run/netns/NAME), for external
    holder: Task | None = None  # an outside process in it, when no bind mount exists


def _bind_mount_of(ino: int) -> str | None:
    for fstype, point, _ in mounts():
        if fstype != "nsfs":
            continue
        try:
            if os.stat(point).st_ino == ino:
                return point
        except OSError:
            continue
    return None


def classify(root: int, tree: set[int]) -> Placement:
    ino = inode(root)
    if ino == inode(os.getpid()):
        return Placement("host", ino)
    path = _bind_mount_of(ino)
    if path is not None:
        return Placement("external", ino, path=path)
    for pid in all_pids():
        if pid in tree:
            continue
        try:
            if inode(pid) == ino and (st := read_stat(pid)) is not None:
                return Placement("external", ino, holder=Task(pid, st.starttime))
        except OSError:
            continue
    return Placement("own", ino)


def resolve(p: Placement) -> str | None:
    """The nsfs path to join for CRIU at restore (None: host or own, nothing to join)."""
    if p.treatment != "external":
        return None
    if p.path is not None:
        if not os.path.exists(p.path):
            raise BadTarget(f"the checkpoint's network namespace {p.path} is gone; recreate "
                            "it (its interfaces and addresses) before restoring")
        return p.path
    if p.holder is not None and p.holder.alive():
        return f"/proc/{p.holder.pid}/ns/net"
    raise BadTarget(f"the checkpoint's network namespace (inode {p.inode}) is gone: no bind "
                    "mount and its holder process exited")


NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: which kind it is (linux/nsfs.h)


def is_netns(path: str) -> bool:
    """Whether `path` is a network namespace (a /run/netns bind mount, /proc/PID/ns/net),
    asked of the kernel: any other file would only fail later, in setns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _setns(path: str) -> None:
    """Move the calling thread into network namespace `path` (and nothing else)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def join(path: str) -> Iterator[None]:
    """The calling thread in network namespace `path` for the block, then back in its own.
    Sockets made inside stay in `path`'s namespace. Use it in a thread of its own: the rest
    of fscr must not run in another namespace meanwhile."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(path)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to fscr's own namespace")
    finally:
        os.close(own)


def entering(path: str | None) -> Callable[[], None] | None:
    """A preexec function that moves the child into network namespace `path` (and nothing
    else) before it execs."""
    if path is None:
        return None
    return lambda: _setns(path)


def run_in(path: str | None, argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              preexec_fn=entering(path))
    except (OSError, subprocess.SubprocessError) as e:
        raise FscrError(f"cannot run {argv[0]} in network namespace {path}: {e}") from None
