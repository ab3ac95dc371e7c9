"""Relinking: keep the data of unlinked-but-open files in the snapshot, and undo it at restore.

Checkpoint side: each unlinked file a task holds open gets a name under
<volume>/lost+found/checkpoint/unlink-at-restart-<id>-<n> while the tree is frozen, so the
snapshot holds its data; the live volume loses the name again before thaw.
Restore side: the same name in the restored volume is reopened with the original flags and
offset, handed to CRIU, and unlinked once the tree runs, so the tasks see it unlinked again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from ..errors import FscrError, NoSpace, Refused
from ..manifest import Relink
from ..names import RELINK_DIR, RELINK_PREFIX, relink_name
from ..process.files import OpenFile

FICLONE = 0x40049409
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
# Test facility: force the sparse copy even where reflink works (docs/testing.md).
FORCE_COPY_ENV = "FSCR_TEST_FORCE_COPY"
# Flags that describe how a file is open, as opposed to how it was created.
REOPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_NOATIME


def _open_dir_nofollow(base: int, name: str, create: bool) -> int:
    """Open directory `name` under fd `base`, refusing symlinks and directories not owned by
    root. With `create`, make it if missing and make sure it is 0700: relinks must not be
    reachable by other users."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=base)
        except FileExistsError:
            pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(f"{name} in the volume is not a plain directory; refusing it") from e
        raise
    st = os.fstat(fd)
    if st.st_uid != 0:
        os.close(fd)
        raise Refused(f"{name} in the volume is not owned by root; refusing to use it")
    if create and stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def open_relink_dir(volume: Path, create: bool = True) -> int:
    """fd of <volume>/lost+found/checkpoint, root-owned 0700, reached without following links."""
    vol = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lf = _open_dir_nofollow(vol, RELINK_DIR.parts[0], create)
        try:
            return _open_dir_nofollow(lf, RELINK_DIR.parts[1], create)
        finally:
            os.close(lf)
    finally:
        os.close(vol)


def _set_nocow_like(src: int, dst: int) -> None:
    """FICLONE from a NOCOW file into a COW one fails (EINVAL): give the empty target the
    source's NOCOW attribute first."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(src, FS_IOC_GETFLAGS, buf)
    except OSError:
        return
    if int.from_bytes(buf[:4], "little") & FS_NOCOW_FL:
        fcntl.ioctl(dst, FS_IOC_SETFLAGS, (FS_NOCOW_FL).to_bytes(8, "little"))


def _sparse_copy(src: int, dst: int, size: int) -> None:
    """Copy data extents only (SEEK_DATA/SEEK_HOLE), so holes stay holes."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        off = data
        # Plain reads and writes: copy_file_range would quietly reflink on btrfs, and this
        # path exists for where reflink is not possible.
        while off < hole:
            chunk = os.pread(src, min(hole - off, 1 << 20), off)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                n = os.pwrite(dst, view, off)
                view = view[n:]
                off += n
        pos = hole
    os.ftruncate(dst, size)


def _clone_or_copy(of: OpenFile, dirfd: int, name: str) -> str:
    src = os.open(of.source, os.O_RDONLY)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        dst = os.open(name, flags, 0o600, dir_fd=dirfd)
        try:
            method = "copy"
            if not os.environ.get(FORCE_COPY_ENV):
                _set_nocow_like(src, dst)
                try:
                    fcntl.ioctl(dst, FICLONE, src)
                    method = "reflink"
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                        raise
            if method == "copy":
                _sparse_copy(src, dst, of.size)
            # CRIU refuses a file whose mode differs from the dump ("has bad mode"); the
            # times are the file's too (a program may compare them, ZDTM's file_attr does).
            os.fchown(dst, of.uid, of.gid)
            os.fchmod(dst, of.mode)
            st = os.fstat(src)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(dst)
        finally:
            os.close(dst)
    except BaseException:
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(src)
    return method


def relink(of: OpenFile, volume: Path, ckpt_id: str, n: int) -> Relink:
    """Give the unlinked file `of` the name unlink-at-restart-<id>-<n> in `volume`.

    A hard link when the inode still has a link (or is an O_TMPFILE), else a reflink or a
    sparse copy with the same mode and owner. On failure nothing is left under that name.
    """
    name = relink_name(ckpt_id, n)
    dirfd = -1
    try:
        dirfd = open_relink_dir(volume)
        try:
            # With dst_dir_fd, os.link is linkat(..., AT_SYMLINK_FOLLOW): it links the inode
            # behind the magic link, not the link itself.
            os.link(of.source, name, dst_dir_fd=dirfd)
            method = "link"
        except FileNotFoundError:  # nlink == 0: userspace cannot link it back
            method = _clone_or_copy(of, dirfd, name)
        os.fsync(dirfd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on {volume} to preserve unlinked file {of.path}") from e
        raise FscrError(f"cannot relink {of.path} ({of.source}): {e.strerror}") from e
    finally:
        if dirfd >= 0:
            os.close(dirfd)
    return Relink(
        n=n,
        volume=str(volume),
        name=name,
        original_path=of.path,
        pid=of.pid,
        fd=of.fd,
        kind=of.kind,
        key=of.external_key,
        flags=of.flags,
        pos=of.pos,
        size=of.size,
        mode=of.mode,
        nlink=of.nlink,
        method=method,
    )


def _ours(names: list[str], ckpt_id: str) -> list[str]:
    prefix = f"{RELINK_PREFIX}{ckpt_id}-"
    return sorted(n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())


def list_relinks(volume: Path, ckpt_id: str) -> list[str]:
    """The unlink-at-restart-<id>-<n> names of checkpoint `ckpt_id` present in `volume`."""
    try:
        dirfd = open_relink_dir(volume, create=False)
    except FileNotFoundError:
        return []
    try:
        return _ours(os.listdir(dirfd), ckpt_id)
    finally:
        os.close(dirfd)


def remove_relinks(volume: Path, ckpt_id: str) -> list[str]:
    """Remove every unlink-at-restart-<id>-<n> of checkpoint `ckpt_id` from `volume`; the
    names carry the id, so only this checkpoint's relinks can match. Returns what it removed."""
    try:
        dirfd = open_relink_dir(volume, create=False)
    except FileNotFoundError:
        return []
    try:
        removed = _ours(os.listdir(dirfd), ckpt_id)
        if removed and os.fstatvfs(dirfd).f_flag & os.ST_RDONLY:
            return []  # a read-only view of a snapshot (LVM) keeps them, as the snapshot does
        for name in removed:
            os.unlink(name, dir_fd=dirfd)
        if removed:
            os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return removed


def present(volume: Path, name: str) -> bool:
    """True if `volume` (a snapshot, say) holds relink `name` as a regular file, reached
    without following symlinks."""
    try:
        dirfd = open_relink_dir(volume, create=False)
    except (FileNotFoundError, Refused):
        return False
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False
    finally:
        os.close(dirfd)


def reopen(rec: Relink, volume: Path) -> int:
    """Restore side: open the relinked file in the restored `volume` as the task had it open
    (access mode, flags, offset). The caller hands the fd to CRIU and closes it."""
    dirfd = open_relink_dir(volume, create=False)
    try:
        fd = os.open(rec.name, (rec.flags & REOPEN_FLAGS) | os.O_NOFOLLOW, dir_fd=dirfd)
    finally:
        os.close(dirfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != rec.mode:
        os.close(fd)
        raise Refused(f"relinked file {rec.name} in {volume} is not the file of the checkpoint")
    os.lseek(fd, rec.pos, os.SEEK_SET)
    return fd
