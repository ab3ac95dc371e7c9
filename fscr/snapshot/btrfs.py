"""btrfs snapshots through libbtrfsutil: O(1) read-only snapshots beside the volume, and a
restore that swaps subvolumes with renameat2(RENAME_EXCHANGE) so the volume path never goes
missing."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import btrfsutil

from ..errors import BadManifest, BadStream, BadVolume, FscrError, NoSpace, Refused, SnapshotFailed
from ..fsutil import mount_at, mount_of, private_dir
from ..names import rescue_path, snapshot_path

CHUNK = 1 << 20

RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (both must exist)."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        e = ctypes.get_errno()
        raise OSError(e, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(e)}")


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, or already gone


def _mkdir_private(path: Path) -> None:
    private_dir(path, Refused)


class Btrfs:
    name = "btrfs"

    def check(self, volume: Path) -> None:
        try:
            is_sub = btrfsutil.is_subvolume(volume)
        except btrfsutil.BtrfsUtilError as e:
            raise BadVolume(f"volume {volume} is not a btrfs subvolume ({e.strerror})") from None
        except FileNotFoundError:
            raise BadVolume(f"volume {volume} does not exist") from None
        if not is_sub:
            raise BadVolume(f"volume {volume} is not a btrfs subvolume")
        # From the mount table: os.path.ismount says yes for every subvolume (st_dev differs).
        if mount_at(volume) is not None:
            raise BadVolume(
                f"volume {volume} is a mount point: restore swaps it by rename, so mount its "
                "parent and use a subvolume below it"
            )
        nested = next(iter(btrfsutil.SubvolumeIterator(str(volume))), None)
        if nested is not None:
            raise BadVolume(
                f"volume {volume} holds the nested subvolume {nested[0]}: btrfs snapshots are "
                "not recursive"
            )

    def create(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        dest = snapshot_path(volume, ckpt_id, n)
        try:
            _mkdir_private(dest.parent.parent)
            _mkdir_private(dest.parent)
            btrfsutil.create_snapshot(str(volume), str(dest), read_only=True)
        except (btrfsutil.BtrfsUtilError, OSError) as e:
            _rmdir_quietly(dest.parent)  # the <id> directory, if this run made it empty
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space for a snapshot of {volume}") from None
            raise SnapshotFailed(f"snapshot of {volume} at {dest} failed: {e.strerror}") from None
        return str(dest)

    def find(self, volume: Path, ckpt_id: str, n: int) -> str | None:
        path = snapshot_path(volume, ckpt_id, n)
        return str(path) if path.exists() or path.parent.exists() else None

    def exists(self, snapshot: str) -> bool:
        return Path(snapshot).exists()

    def state(self, snapshot: str) -> str:
        return "present" if Path(snapshot).is_dir() else "missing"

    def delete(self, snapshot: str) -> None:
        path = Path(snapshot)
        if btrfsutil_exists(path):
            btrfsutil.delete_subvolume(str(path))
        _rmdir_quietly(path.parent)  # the <id> directory, once its last snapshot is gone

    def check_restore(self, volume: Path, snapshot: str | None, processes: bool) -> None:
        if volume.exists() or volume.is_symlink():
            self.check(volume)
        elif not volume.parent.is_dir():
            raise BadVolume(f"volume {volume} is missing, and so is its parent directory")
        if snapshot is None or not Path(snapshot).is_dir():
            raise BadManifest(f"snapshot {snapshot} is missing")

    def rescue(self, volume: Path, rescue: str, n: int) -> str:
        return str(rescue_path(volume, rescue, n))

    def owns_rescue(self, name: str, path: str) -> bool:
        return Path(path).parent.name == name  # rescue_path: .../<name>/<n>

    def swap_in(self, snapshot: str, volume: Path, rescue: str,
                made: Callable[[str], None]) -> None:
        # A writable snapshot of the checkpoint's read-only one, made at the rescue path and
        # then exchanged: the old contents land at the rescue path, the volume never vanishes.
        # On a machine that received the checkpoint the volume may not exist yet: the copy is
        # then renamed into place, and there is no rescue.
        path = Path(rescue)
        _mkdir_private(path.parent.parent)
        _mkdir_private(path.parent)
        try:
            btrfsutil.create_snapshot(snapshot, rescue, read_only=False)
        except btrfsutil.BtrfsUtilError as e:
            _rmdir_quietly(path.parent)
            raise SnapshotFailed(f"cannot copy snapshot {snapshot}: {e.strerror}") from None
        made(identity(path) or "")
        try:
            if volume.exists():
                exchange(path, volume)
            else:
                os.rename(path, volume)
                _rmdir_quietly(path.parent)
        except OSError as e:
            btrfsutil.delete_subvolume(rescue)
            _rmdir_quietly(path.parent)
            raise SnapshotFailed(f"cannot put {snapshot} back at {volume}: {e}") from None

    def swapped(self, volume: Path, copy: str) -> bool:
        return identity(volume) == copy

    def leftover(self, volume: Path, rescue: str) -> bool:
        return Path(rescue).exists()

    def undo(self, volume: Path, rescue: str, copy: str | None) -> None:
        path = Path(rescue)
        if copy is None or not self.swapped(volume, copy):
            self.delete(rescue)  # the copy, never swapped in
        elif path.exists():
            exchange(path, volume)
            btrfsutil.delete_subvolume(rescue)
            _rmdir_quietly(path.parent)
        else:  # the restore created the volume: there was nothing before it
            btrfsutil.delete_subvolume(str(volume))

    def seal(self, rescue: str) -> None:
        btrfsutil.set_subvolume_read_only(rescue, True)

    clones = True

    def clone(self, snapshot: str, dest: Path) -> None:
        _mkdir_private(dest.parent.parent)
        _mkdir_private(dest.parent)
        try:
            btrfsutil.create_snapshot(snapshot, str(dest), read_only=False)
        except btrfsutil.BtrfsUtilError as e:
            _rmdir_quietly(dest.parent)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space for a copy of {snapshot}") from None
            raise SnapshotFailed(f"cannot copy snapshot {snapshot}: {e.strerror}") from None

    sends = True

    def send(self, snapshot: str, parent: str | None, write: Callable[[bytes], None]) -> None:
        argv = ["btrfs", "send", "-q", *(["-p", parent] if parent else []), snapshot]

        def drain(proc: subprocess.Popen[bytes]) -> None:
            while data := proc.stdout.read(CHUNK):
                write(data)

        code, err = _piped(argv, subprocess.DEVNULL, subprocess.PIPE, drain)
        if code != 0:
            raise FscrError(f"btrfs send of {snapshot} failed: {err}")

    def receive(self, volume: Path, ckpt_id: str, n: int,
                read: Callable[[Callable[[bytes], None]], object],
                made: Callable[[str], None]) -> str:
        dest = snapshot_path(volume, ckpt_id, n)
        _on_btrfs(volume)
        if dest.exists():
            raise BadStream(f"{dest} already exists here")
        _mkdir_private(dest.parent.parent)  # .fscr-snapshots: root's own, never a symlink
        _mkdir_private(dest.parent)
        made(str(dest))
        stopped = False

        def feed(proc: subprocess.Popen[bytes]) -> None:
            nonlocal stopped
            try:
                read(proc.stdin.write)
            except BrokenPipeError:
                stopped = True  # btrfs receive gave up mid-stream: its stderr says why

        code, err = _piped(["btrfs", "receive", "-q", str(dest.parent)], subprocess.PIPE,
                           subprocess.DEVNULL, feed)
        if code != 0 or stopped:
            raise BadStream(f"btrfs receive of volume {volume} failed: "
                            f"{err or 'it stopped reading the stream'}")
        if not dest.exists():
            raise BadStream(f"the stream's snapshot of {volume} is not named {dest.name}")
        return str(dest)


def _piped(argv: list[str], stdin: int, stdout: int,
           work: Callable[[subprocess.Popen[bytes]], None]) -> tuple[int, str]:
    """Run btrfs send or receive while `work` drains or feeds its pipe; its exit code and
    stderr. If `work` fails (the stream's reader went away, the stream is corrupt) btrfs is
    killed: its own failure is then not the news."""
    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    try:
        work(proc)
    except BaseException:
        proc.kill()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except BrokenPipeError:
                pass  # receive's unread buffer: it exited, its code and stderr tell
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    return code, err


def _on_btrfs(volume: Path) -> None:
    """The volume's parent must be a directory on btrfs: snapshots are received beside it."""
    parent = volume.parent
    if not parent.is_dir():
        raise BadStream(f"{parent} does not exist here: mount the btrfs filesystem that will "
                        f"hold {volume} first")
    try:
        btrfsutil.subvolume_id(str(parent))  # the subvolume holding it: only btrfs has one
    except btrfsutil.BtrfsUtilError:
        mount = mount_of(parent)  # only to name what it is instead
        raise BadStream(f"{parent} is not on a btrfs filesystem "
                        f"({mount.fstype if mount else 'unknown'}): cannot receive the "
                        f"snapshot of {volume}") from None


def identity(volume: Path) -> str | None:
    """What tells this subvolume from every other (its UUID): gc compares it with the copy a
    dead restore journaled, to tell whether the swap happened."""
    try:
        return btrfsutil.subvolume_info(str(volume)).uuid.hex()
    except (btrfsutil.BtrfsUtilError, FileNotFoundError):
        return None


def btrfsutil_exists(path: Path) -> bool:
    try:
        return btrfsutil.is_subvolume(str(path))
    except (btrfsutil.BtrfsUtilError, FileNotFoundError):
        return False
