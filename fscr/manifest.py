"""The checkpoint record: versioned JSON, validated on every read.

A manifest is input at restore time (it may have been copied, edited or corrupted), so it is
parsed strictly (records.py): one class per record gives both the JSON and its validation.
Its whole-file sha256 lives beside it in manifest.json.sha256; that gives integrity against
corruption and edits, not authenticity.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from . import names, records
from .errors import BadManifest
from .records import Id, Meta, PathText

SCHEMA_VERSION = 1

Pid = Annotated[int, Meta(gt=0)]
Count = Annotated[int, Meta(ge=0)]
Text = Annotated[str, Meta(max_length=4096)]
ImageName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,255}\Z")]  # also a stream's header
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]


def recordable(v: object) -> None:
    """Every string of a record can be written as UTF-8 JSON and passed to a system call:
    no NUL, no lone surrogate (a file name that is not UTF-8, as os.fsdecode gives it)."""
    if isinstance(v, str):
        if "\0" in v:
            raise ValueError(f"holds a NUL byte: {v[:80]!r}")
        try:
            v.encode()
        except UnicodeEncodeError:
            raise ValueError(f"is not UTF-8: {v[:80]!r}") from None
    elif isinstance(v, (list, tuple)):
        for x in v:
            if isinstance(x, records.Struct):
                continue  # nested records check their own strings
            recordable(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            recordable(k)
            recordable(x)


class Record(records.Record):
    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            v = getattr(self, name)
            if not isinstance(v, records.Struct):  # nested records check their own strings
                try:
                    recordable(v)
                except ValueError as e:
                    raise ValueError(f"{name} {e}") from None


def describe(text: str, limit: int = 4096) -> str:
    """A description (of a leak) cut to what a manifest holds: a long path stays readable."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _absolute_clean(v: str) -> None:
    p = PurePosixPath(v)
    if not p.is_absolute() or ".." in p.parts or "\0" in v:
        raise ValueError(f"not a clean absolute path: {v!r}")


class TaskRecord(Record):
    pid: Pid
    starttime: Count


class CgroupRecord(Record):
    kind: Literal["v2", "v1"]
    path: str  # as /proc/PID/cgroup shows it: where the tree was frozen and dumped from
    original: str  # where the tree lived before; differs when fscr moved it for the window

    def __post_init__(self) -> None:
        super().__post_init__()
        _absolute_clean(self.path)
        _absolute_clean(self.original)


class VolumeRecord(Record):
    n: Count
    path: PathText
    snapshot: str | None  # absolute path of the read-only snapshot; None with --snapshot none

    def __post_init__(self) -> None:
        super().__post_init__()
        _absolute_clean(self.path)


class Relink(Record):
    n: Count
    volume: PathText
    name: Annotated[str, Meta(pattern=rf"^{names.RELINK_PREFIX}{names.ID_PATTERN}-[0-9]+\Z")]
    original_path: PathText
    pid: Pid
    fd: Annotated[int, Meta(ge=-1)]  # -1: held by a mapping or as the executable
    kind: Literal["fd", "map", "exe"]
    key: Annotated[str, Meta(pattern=r"^file\[[0-9a-f]+:[0-9a-f]+\]\Z")]
    flags: Count
    pos: Count
    size: Count
    mode: Annotated[int, Meta(ge=0, le=0o7777)]
    nlink: Count
    method: Literal["link", "reflink", "copy"]


class ImageFile(Record):
    name: ImageName
    size: Count
    sha256: Sha256


class SocketRecord(Record):
    pid: Pid
    fd: Count
    inode: Count
    family: Literal["tcp", "tcp6", "udp", "udp6", "unix"]
    type: Annotated[str, Meta(max_length=16)]
    state: Annotated[str, Meta(max_length=16)]
    local: Text
    remote: Text


class LeakRecord(Record):
    """A resource outside the checkpoint that the user accepted (--allow)."""

    kind: Literal["external-files", "shared-memory", "pipes", "unix-sockets", "namespaces",
                  "devices", "shm"]
    pid: Pid
    what: Text
    detail: Text


class UnchangedRecord(Record):
    """A read-only file outside the volumes (a binary, a library): verified at restore."""

    path: PathText
    size: Count
    mtime_ns: Count


class NetnsRecord(Record):
    """How the tree's network namespace is treated (fscr/process/netns.py)."""

    treatment: Literal["host", "external", "own"]
    inode: Count
    path: PathText | None = None
    holder: TaskRecord | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path is not None:
            _absolute_clean(self.path)
        # Only a namespace the tree joined is found again at restore: by its bind mount or
        # by a process in it, one of the two.
        if (self.treatment == "external") != (self.path is not None or self.holder is not None):
            raise ValueError(f"a {self.treatment} network namespace names no path or holder"
                             if self.treatment == "external" else
                             f"a {self.treatment} network namespace names a path or holder")


def _aware_time(v: str) -> None:
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {v[:80]!r}") from None
    if t.tzinfo is None:
        raise ValueError(f"has no time zone: {v[:80]!r}")


class Manifest(Record, kw_only=True):  # pidns has a default, the fields after it none
    schema_version: Literal[1]
    id: Id
    created: Annotated[str, Meta(max_length=64)]
    hostname: Annotated[str, Meta(max_length=255)]
    job: Id | None  # the backup job that made it, if any
    backend: Literal["criu", "freeze-only"]
    snapshot: Literal["btrfs", "lvm", "none"]
    mode: Literal["leave-running", "kill"]
    root: TaskRecord
    lineage: TaskRecord  # the root first checkpointed, across restores (store.py)
    tasks: list[TaskRecord]
    cgroup: CgroupRecord
    volumes: list[VolumeRecord]
    relinks: list[Relink]
    tcp: Literal["refuse", "established", "close"]
    sockets: list[SocketRecord]
    allowed: list[Literal["external-files", "shared-memory", "pipes", "unix-sockets",
                          "namespaces", "devices"]]
    leaks: list[LeakRecord]
    unchanged: list[UnchangedRecord]
    needs: list[Literal["shell-job", "file-locks", "ext-unix-sk"]]  # CRIU options it implies
    netns: NetnsRecord
    pidns: bool = False  # the root is init of a PID namespace of its own (fscr run --pidns)
    # CRIU's nftables table that keeps --tcp established connections silent until restore
    # (21 characters of CRIU's run id; 36 in checkpoints of fscr 0.1, which named it whole)
    netlock: Annotated[str, Meta(pattern=r"^CRIU-[0-9a-f-]{21}([0-9a-f-]{15})?\Z")] | None
    images: list[ImageFile]
    image_bytes: Count
    durations: dict[str, float]

    def __post_init__(self) -> None:
        super().__post_init__()
        _aware_time(self.created)

    def to_bytes(self) -> bytes:
        return records.encode(self, indent=2) + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, origin: str) -> Manifest:
        try:
            m = records.decode(raw, cls)
        except records.Invalid as e:
            where, what = records.why(e)
            raise BadManifest(f"{origin}: invalid at {where}: {what}") from None
        m._check_confinement()
        return m

    def _check_confinement(self) -> None:
        """Everything restore, gc or delete will touch is named by fscr's own rules for this
        id: nothing else can be reached through a crafted manifest."""
        def bad(what: str) -> BadManifest:
            return BadManifest(f"checkpoint {self.id}: {what}")

        vols = [v.path for v in self.volumes]
        if len(set(vols)) != len(vols) or [v.n for v in self.volumes] != list(range(len(vols))):
            raise bad("volumes are repeated or misnumbered")
        for v in self.volumes:
            if self.snapshot == "lvm":  # the volume group is the origin's: only the name is ours
                if v.snapshot is None or not names.is_lvm_snapshot(v.snapshot, self.id, v.n):
                    want = f"/dev/<vg>/{names.lv_snapshot_name(self.id, v.n)}"
                    raise bad(f"volume {v.path} names snapshot {v.snapshot}, expected {want}")
                continue
            want = (None if self.snapshot == "none"
                    else str(names.snapshot_path(Path(v.path), self.id, v.n)))
            if v.snapshot != want:
                raise bad(f"volume {v.path} names snapshot {v.snapshot}, expected {want}")
        for r in self.relinks:
            if r.volume not in vols:
                raise bad(f"relink {r.name} names volume {r.volume}, not in the checkpoint")
            if r.name != names.relink_name(self.id, r.n):
                raise bad(f"relink {r.name} does not belong to this checkpoint")
        cg = self.cgroup
        moved = f"/{names.FSCR_GROUP}/{names.ckpt_cgroup(self.id)}"
        if cg.path != cg.original and cg.path != moved:
            raise bad(f"cgroup {cg.path} is neither the tree's own ({cg.original}) nor {moved}")
        if len({(t.pid, t.starttime) for t in self.tasks}) != len(self.tasks) or (
                self.tasks and self.tasks[0] != self.root):
            raise bad("task list is inconsistent with the root task")


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
