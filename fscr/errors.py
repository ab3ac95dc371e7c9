"""Every expected failure is an FscrError: one line for the user and an exit code of its own.

The codes are part of the interface (scripts and monitoring rely on them); docs/exit-codes.md
lists them. Anything that is not an FscrError is a bug and is shown with its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class FscrError(Exception):
    """Base class: the message is printed as one line, the process exits with `exit_code`.
    Raised itself for any other expected failure (and `fscr gc` exits so when a step
    failed)."""

    exit_code = 1


class NotRoot(FscrError):
    """Not run as root: fscr freezes cgroups and runs CRIU."""

    exit_code = 3


def require_root() -> None:
    """The one root check: Store.open makes it, and the commands that need root without a
    store (`fscr run`, a backup before its job names a store) call it themselves."""
    if os.geteuid() != 0:
        raise NotRoot("fscr must run as root (it freezes cgroups, runs CRIU and keeps a "
                      "root-only store)")


class BadTarget(FscrError):
    """No such PID or cgroup, or a target fscr refuses (PID 1, fscr itself, the root cgroup)."""

    exit_code = 4


class BadVolume(FscrError):
    """A --volume that is not a btrfs subvolume fscr can snapshot and swap."""

    exit_code = 5


class NoSuchCheckpoint(FscrError):
    """No checkpoint (or rescue snapshot, or copy) of that id in the store."""

    exit_code = 6


class CriuFailed(FscrError):
    """CRIU ran and failed: the message quotes the error of its log that explains why, a
    hint where fscr knows one, and names the log (kept under <store>/failed/)."""

    exit_code = 7

    def __init__(self, what: str, cause: str, hint: str | None = None,
                 log: Path | None = None) -> None:
        self.what, self.cause, self.hint, self.log = what, cause, hint, log
        hint_text = f"; {hint}" if hint else ""
        super().__init__(f"CRIU {what} failed: {cause}{hint_text}"
                         + (f" (log: {log})" if log else ""))

    def kept_at(self, log: Path) -> CriuFailed:
        """The same failure, its log now at `log`."""
        return CriuFailed(self.what, self.cause, self.hint, log)


class SnapshotFailed(FscrError):
    """Taking, restoring or deleting a snapshot failed."""

    exit_code = 8


class BadManifest(FscrError):
    """The manifest or an image file is missing, corrupt or fails validation."""

    exit_code = 9


class TreeStillRunning(FscrError):
    """Restore would clash with a live tree of the same checkpoint (use --replace)."""

    exit_code = 10


class MissingDependency(FscrError):
    """CRIU, btrfs support or a cgroup freezer is not available."""

    exit_code = 11


class NoSpace(FscrError):
    """No space left on the device of the store or of a volume."""

    exit_code = 12


class RestoreRolledBack(FscrError):
    """CRIU failed after the volumes were swapped; they were swapped back."""

    exit_code = 13


class Busy(FscrError):
    """Another fscr run holds the lock on this workload or volume."""

    exit_code = 14


class Raced(Busy):
    """The tree changed while it was stopped in a way that would have made CRIU copy an
    unlinked file into the image; the run was undone (checkpoint retries it once)."""


class Refused(FscrError):
    """The request is understood but unsafe (e.g. --snapshot none with unlinked files)."""

    exit_code = 15


class BadInput(FscrError):
    """A malformed argument or job file: a checkpoint id that is taken or invalid, a name,
    an interval, a path that cannot go into a unit file."""

    exit_code = 16


class BadStore(BadInput):
    """The store is a file, cannot be created, or is a symlink or another user's."""

    def __init__(self, what: str) -> None:
        super().__init__(f"store: {what}")


class FreezeTimeout(FscrError):
    """The watchdog thawed the tree (--max-freeze passed, or fscr was dying): run aborted."""

    exit_code = 17


class BadStream(FscrError):
    """A send stream that is truncated, corrupt, of an unknown version, or does not fit here."""

    exit_code = 18


class MissingParent(FscrError):
    """An incremental stream whose parent checkpoint this store has not received."""

    exit_code = 19


class PagesCorrupt(FscrError):
    """restore --lazy: a page image failed its checksum after the tree had started; the tree
    was killed and the volumes put back."""

    exit_code = 22
