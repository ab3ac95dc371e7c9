"""Open-file scan: which regular files a task holds, by fd (/proc/PID/fd and fdinfo), by
memory mapping (/proc/PID/map_files) and as its executable (/proc/PID/exe).

The record of one open file (OpenFile) is what relinking needs at checkpoint and what
restore needs to reopen it: how to reach the inode, its mount id, access flags and offset.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .tree import all_pids

DELETED = " (deleted)"


@dataclass(frozen=True)
class OpenFile:
    pid: int
    fd: int  # -1 for a mapping or the executable
    kind: str  # "fd", "map" or "exe"
    source: str  # the /proc magic link that reaches the open inode
    path: str  # the path the kernel shows, without " (deleted)"
    deleted: bool  # the path no longer names this inode
    flags: int  # open flags (fdinfo), for unlinked fds; O_RDONLY otherwise
    pos: int
    mnt_id: int  # 0 unless deleted (only unlinked files need CRIU's external key)
    dev: int
    ino: int
    nlink: int
    size: int
    mode: int
    uid: int
    gid: int

    @property
    def external_key(self) -> str:
        """CRIU's id for this file: file[<mnt_id hex>:<inode hex>] (criu/files-reg.c). CRIU
        looks it up for fds, mappings and the executable alike."""
        return f"file[{self.mnt_id:x}:{self.ino:x}]"


def _fdinfo(path: str) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
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


def _record(pid: int, fd: int, kind: str, source: str) -> OpenFile | None:
    """The OpenFile behind magic link `source`, or None if it is gone or not a regular file.
    Flags, offset and mount id are read only for unlinked files, the ones relinked: this
    scan runs inside the frozen window."""
    try:
        target = os.readlink(source)
        st = os.stat(source)  # follows the magic link: the open inode itself
        if not stat.S_ISREG(st.st_mode):
            return None
        deleted = _is_deleted(target, st)
        if not deleted:
            info, flags, pos = {"mnt_id": "0"}, 0, 0
        elif kind == "fd":
            info = _fdinfo(f"/proc/{pid}/fdinfo/{fd}")
            flags, pos = int(info["flags"], 8), int(info["pos"])
        else:  # no fdinfo for these: an O_PATH fd of our own tells the mount id
            o = os.open(source, os.O_PATH)
            try:
                info = _fdinfo(f"/proc/self/fdinfo/{o}")
            finally:
                os.close(o)
            flags, pos = os.O_RDONLY, 0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    path = target[: -len(DELETED)] if deleted and target.endswith(DELETED) else target
    return OpenFile(pid=pid, fd=fd, kind=kind, source=source, path=path, deleted=deleted,
                    flags=flags, pos=pos, mnt_id=int(info["mnt_id"]), dev=st.st_dev,
                    ino=st.st_ino, nlink=st.st_nlink, size=st.st_size,
                    mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def open_files(pid: int) -> list[OpenFile]:
    """Every regular file `pid` holds: its fds, its exe, its file mappings (one per inode).
    Files that vanish mid-scan are skipped."""
    links = [(int(n), "fd", f"/proc/{pid}/fd/{n}")
             for n in sorted(_listdir(f"/proc/{pid}/fd"), key=int)]
    links.append((-1, "exe", f"/proc/{pid}/exe"))
    links += [(-1, "map", f"/proc/{pid}/map_files/{n}")
              for n in sorted(_listdir(f"/proc/{pid}/map_files"))]
    out: list[OpenFile] = []
    mapped: set[tuple[int, int]] = set()
    for fd, kind, source in links:
        f = _record(pid, fd, kind, source)
        if f is None:
            continue
        if kind == "map":
            if (f.dev, f.ino) in mapped:
                continue
            mapped.add((f.dev, f.ino))
        out.append(f)
    return out


def _uses_dev(pid: int, devs: set[int]) -> bool:
    base = f"/proc/{pid}"
    links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"]
    links += [f"{base}/fd/{n}" for n in _listdir(f"{base}/fd")]
    links += [f"{base}/map_files/{n}" for n in _listdir(f"{base}/map_files")]
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
    return [p for p in all_pids() if p not in exclude and p != me and _uses_dev(p, devs)]


def watched(pid: int) -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every inode that an inotify or fanotify fd of `pid` watches,
    from fdinfo (`sdev` is the superblock's device, in the kernel's encoding)."""
    out: set[tuple[int, int, int]] = set()
    for n in _listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}") not in ("anon_inode:inotify",
                                                           "anon_inode:[fanotify]"):
                continue
            lines = Path(f"/proc/{pid}/fdinfo/{n}").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in lines:
            if not line.startswith(("inotify ", "fanotify ")) or " sdev:" not in line:
                continue
            fields = dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
            sdev = int(fields["sdev"], 16)
            out.add((sdev >> 20, sdev & 0xFFFFF, int(fields["ino"], 16)))
    return out
