"""Small filesystem helpers with the durability fscr's records need."""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory (borg's SaveFile):
    a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Mount(NamedTuple):
    fstype: str
    point: str
    super_options: str
    source: str
    options: str  # the mount's own (rw, nosuid, relatime...), not the filesystem's
    dev: tuple[int, int]  # major, minor
    id: int = 0  # the mount id (mnt_id in fdinfo)


def mount_table() -> list[Mount]:
    """Every mount, from /proc/self/mountinfo, with the kernel's octal escapes (a space is
    \\040) decoded in the mount point and source."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split(" ")
            fstype, src, sopts = post.split(" ")[:3]
            major, minor = fields[2].split(":")
            out.append(Mount(fstype, _unescape(fields[4]), sopts.strip(), _unescape(src),
                             fields[5], (int(major), int(minor)), int(fields[0])))
    return out


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def mounts() -> list[tuple[str, str, str]]:
    """(fstype, mount point, super options) of every mount."""
    return [(m.fstype, m.point, m.super_options) for m in mount_table()]


def mount_at(path: Path) -> Mount | None:
    """The mount whose mount point `path` is (the last one, if several are stacked)."""
    real = os.path.realpath(path)
    found = [m for m in mount_table() if m.point == real]
    return found[-1] if found else None


def mount_of(path: Path) -> Mount | None:
    """The mount that holds `path`: the longest mount point above it (the last one mounted,
    if several are stacked)."""
    real = os.path.realpath(path)
    found = [m for m in mount_table()
             if real == m.point or real.startswith(m.point.rstrip("/") + "/")]
    return max(reversed(found), key=lambda m: len(m.point)) if found else None


def sha256_file(path: Path, advance: Callable[[int], None] | None = None) -> str:
    """`advance` hears of every chunk hashed (a progress meter)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


def sha256_files(paths: list[Path], advance: Callable[[int], None] | None = None) -> list[str]:
    """sha256_file of each path, in order, computed on every core (hashlib and reads release
    the GIL; a tree of N processes has N page images). Raises what a read raised."""
    if len(paths) < 2:
        return [sha256_file(p, advance) for p in paths]
    biggest_first = sorted(paths, key=lambda p: -os.stat(p).st_size)
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="fscr-sha256") as pool:
        digests = dict(zip(biggest_first, pool.map(lambda p: sha256_file(p, advance),
                                                   biggest_first), strict=True))
    return [digests[p] for p in paths]


def syncfs(path: Path) -> None:
    """Flush a filesystem's dirty data now, so a snapshot in the frozen window does not."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:  # Python has no os.syncfs
            os.sync()
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
