"""Open-file scan: which regular files a task tree holds, from /proc/PID/fd and fdinfo.

The record of one open file (OpenFile) is what relinking needs at checkpoint and what
restore needs to reopen it: path, inode, mount id, access flags and offset.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

DELETED = " (deleted)"


@dataclass(frozen=True)
class OpenFile:
    pid: int
    fd: int
    path: str  # the path the kernel shows, without " (deleted)"
    deleted: bool  # the path no longer names this inode
    flags: int  # open flags from fdinfo
    pos: int
    mnt_id: int
    dev: int
    ino: int
    nlink: int
    size: int
    mode: int
    uid: int
    gid: int

    @property
    def external_key(self) -> str:
        """CRIU's id for this file: file[<mnt_id hex>:<inode hex>] (criu/files-reg.c)."""
        return f"file[{self.mnt_id:x}:{self.ino:x}]"


def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def _is_deleted(target: str, st: os.stat_result) -> bool:
    if st.st_nlink == 0:
        return True
    if not target.endswith(DELETED):
        return False
    # A file really named "x (deleted)" still resolves to the same inode.
    try:
        cur = os.lstat(target)
        return (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino)
    except FileNotFoundError:
        return True


def open_files(pid: int) -> list[OpenFile]:
    """Every regular file `pid` holds open by fd. Files that vanish mid-scan are skipped."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = sorted(int(n) for n in os.listdir(fd_dir))
    except FileNotFoundError:
        return out
    for fd in fds:
        link = fd_dir / str(fd)
        try:
            target = os.readlink(link)
            st = os.stat(link)  # follows the magic link: the open inode itself
            info = _fdinfo(pid, fd)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        deleted = _is_deleted(target, st)
        path = target[: -len(DELETED)] if deleted and target.endswith(DELETED) else target
        out.append(
            OpenFile(
                pid=pid,
                fd=fd,
                path=path,
                deleted=deleted,
                flags=int(info["flags"], 8),
                pos=int(info["pos"]),
                mnt_id=int(info["mnt_id"]),
                dev=st.st_dev,
                ino=st.st_ino,
                nlink=st.st_nlink,
                size=st.st_size,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
            )
        )
    return out


def _uses_dev(pid: int, devs: set[int]) -> bool:
    base = Path(f"/proc/{pid}")
    links = [base / "cwd", base / "root", base / "exe"]
    try:
        links += [base / "fd" / n for n in os.listdir(base / "fd")]
        links += [base / "map_files" / n for n in os.listdir(base / "map_files")]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    for link in links:
        try:
            if os.stat(link).st_dev in devs:
                return True
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
    return False


def holders(devs: set[int], exclude: set[int]) -> list[int]:
    """PIDs outside `exclude` that hold a file, cwd, root or mapping on one of `devs`."""
    me = os.getpid()
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    return [p for p in pids if p not in exclude and p != me and _uses_dev(p, devs)]
