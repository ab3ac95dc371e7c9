"""The checkpoint record: versioned JSON, validated on every read.

A manifest is input at restore time (it may have been copied, edited or corrupted), so it is
parsed by strict pydantic models: one class per record gives both the JSON and its validation.
Its whole-file sha256 lives beside it in manifest.json.sha256; that gives integrity against
corruption and edits, not authenticity.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadInput, BadManifest

SCHEMA_VERSION = 1
ID_RE = re.compile(r"[A-Za-z0-9_.]{1,64}")


def check_id(value: str, what: str = "checkpoint id") -> str:
    """Ids and names: [A-Za-z0-9_.]{1,64}, not starting with '.'. No '-': it separates id and
    counter in unlink-at-restart-<id>-<n>."""
    if not ID_RE.fullmatch(value) or value.startswith("."):
        raise BadInput(
            f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ . (not starting with .)")
    return value


Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,63}$")]
AbsPath = Annotated[str, Field(min_length=1, max_length=4096)]


class Record(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


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
    name: Annotated[str, Field(pattern=r"^unlink-at-restart-[A-Za-z0-9_.]{1,64}-[0-9]+$")]
    original_path: AbsPath
    pid: int = Field(gt=0)
    fd: int = Field(ge=0)
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


class Manifest(Record):
    schema_version: Literal[1]
    id: Id
    created: str
    hostname: str
    backend: Literal["criu", "freeze-only"]
    snapshot: Literal["btrfs", "none"]
    mode: Literal["leave-running", "kill"]
    root: TaskRecord
    lineage: TaskRecord  # the root first checkpointed, across restores (store.py)
    tasks: list[TaskRecord]
    cgroup: CgroupRecord
    volumes: list[VolumeRecord]
    relinks: list[Relink]
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
        vols = {v.path for v in self.volumes}
        for r in self.relinks:
            if r.volume not in vols:
                raise BadManifest(f"relink {r.name} names volume {r.volume}, not in the checkpoint")
            if not r.name.startswith(f"unlink-at-restart-{self.id}-"):
                raise BadManifest(f"relink {r.name} does not belong to checkpoint {self.id}")


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
