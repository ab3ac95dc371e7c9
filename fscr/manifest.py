"""The checkpoint record: versioned JSON, validated on every read.

A manifest is input at restore time (it may have been copied, edited or corrupted), so it is
parsed by strict pydantic models: one class per record gives both the JSON and its validation.
Its whole-file sha256 lives beside it in manifest.json.sha256; that gives integrity against
corruption and edits, not authenticity.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import names
from .errors import BadManifest

SCHEMA_VERSION = 1

Id = Annotated[str, Field(pattern=rf"^{names.ID_PATTERN}$")]
AbsPath = Annotated[str, Field(min_length=1, max_length=4096)]


class Record(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", defer_build=True)


def _absolute_clean(v: str) -> str:
    p = PurePosixPath(v)
    if not p.is_absolute() or ".." in p.parts or "\0" in v:
        raise ValueError(f"not a clean absolute path: {v!r}")
    return v


class TaskRecord(Record):
    pid: int = Field(gt=0)
    starttime: int = Field(ge=0)


class CgroupRecord(Record):
    kind: Literal["v2", "v1"]
    path: str  # as /proc/PID/cgroup shows it: where the tree was frozen and dumped from
    original: str  # where the tree lived before; differs when fscr moved it for the window

    @field_validator("path", "original")
    @classmethod
    def _clean(cls, v: str) -> str:
        return _absolute_clean(v)


class VolumeRecord(Record):
    n: int = Field(ge=0)
    path: AbsPath
    snapshot: str | None  # absolute path of the read-only snapshot; None with --snapshot none

    @field_validator("path")
    @classmethod
    def _clean(cls, v: str) -> str:
        return _absolute_clean(v)


class Relink(Record):
    n: int = Field(ge=0)
    volume: AbsPath
    name: Annotated[str, Field(pattern=rf"^{names.RELINK_PREFIX}{names.ID_PATTERN}-[0-9]+$")]
    original_path: AbsPath
    pid: int = Field(gt=0)
    fd: int = Field(ge=-1)  # -1: held by a mapping or as the executable
    kind: Literal["fd", "map", "exe"]
    key: Annotated[str, Field(pattern=r"^file\[[0-9a-f]+:[0-9a-f]+\]$")]
    flags: int = Field(ge=0)
    pos: int = Field(ge=0)
    size: int = Field(ge=0)
    mode: int = Field(ge=0, le=0o7777)
    nlink: int = Field(ge=0)
    method: Literal["link", "reflink", "copy"]


class ImageFile(Record):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,255}$")]
    size: int = Field(ge=0)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SocketRecord(Record):
    pid: int = Field(gt=0)
    fd: int = Field(ge=0)
    inode: int = Field(ge=0)
    family: Literal["tcp", "tcp6", "udp", "udp6", "unix"]
    type: str = Field(max_length=16)
    state: str = Field(max_length=16)
    local: str = Field(max_length=4096)
    remote: str = Field(max_length=4096)


class LeakRecord(Record):
    """A resource outside the checkpoint that the user accepted (--allow)."""

    kind: Literal["external-files", "shared-memory", "pipes", "unix-sockets", "namespaces",
                  "devices", "shm"]
    pid: int = Field(gt=0)
    what: str = Field(max_length=4096)
    detail: str = Field(max_length=4096)


class UnchangedRecord(Record):
    """A read-only file outside the volumes (a binary, a library): verified at restore."""

    path: AbsPath
    size: int = Field(ge=0)
    mtime_ns: int = Field(ge=0)


class NetnsRecord(Record):
    """How the tree's network namespace is treated (fscr/process/netns.py)."""

    treatment: Literal["host", "external", "own"]
    inode: int = Field(ge=0)
    path: AbsPath | None = None
    holder: TaskRecord | None = None

    @field_validator("path")
    @classmethod
    def _clean(cls, v: str | None) -> str | None:
        return None if v is None else _absolute_clean(v)

    @model_validator(mode="after")
    def _how_found(self) -> NetnsRecord:
        # Only a namespace the tree joined is found again at restore: by its bind mount or
        # by a process in it, one of the two.
        if (self.treatment == "external") != (self.path is not None or self.holder is not None):
            raise ValueError(f"a {self.treatment} network namespace names no path or holder"
                             if self.treatment == "external" else
                             f"a {self.treatment} network namespace names a path or holder")
        return self


class Manifest(Record):
    schema_version: Literal[1]
    id: Id
    created: str
    hostname: str
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
    netlock: Annotated[str, Field(pattern=r"^CRIU-[0-9a-f-]{21}([0-9a-f-]{15})?$")] | None
    images: list[ImageFile]
    image_bytes: int = Field(ge=0)
    durations: dict[str, float]

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, origin: str) -> Manifest:
        try:
            m = cls.model_validate_json(raw, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top)"
            raise BadManifest(f"{origin}: invalid at {where}: {err['msg']}") from None
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
