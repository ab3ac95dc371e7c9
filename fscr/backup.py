"""Scheduled backups: a job file (TOML), one run (checkpoint, then prune), and the timer or
cron entry that starts runs.

    name = "app"                 # optional; default: the file name without .toml
    store = "/var/lib/fscr"      # optional
    tcp = "close"                # optional: refuse (default), close; services restart clean
    allow = ["external-files"]   # optional preflight kinds to accept
    [target]                     # exactly one of:
    pid_file = "/run/app.pid"    # or: cgroup = "/sys/fs/cgroup/...", or: name = "<fscr run --name>"
    [snapshot]
    kind = "btrfs"               # or "lvm" (then lvm_size = "20%ORIGIN" for classic LVs), "none"
    volumes = ["/srv/app"]
    [backend]
    kind = "criu"                # or "freeze-only"
    [retention]                  # keep_last, hourly, daily, weekly, monthly, yearly
    keep_last = 3
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import locks, names, pipeline, preflight, retention
from .errors import BadInput, Busy, FscrError
from .process.target import Target
from .retention import Policy
from .store import Store


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, defer_build=True)


class TargetSection(_Section):
    pid_file: str | None = None
    cgroup: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TargetSection:
        if sum(x is not None for x in (self.pid_file, self.cgroup, self.name)) != 1:
            raise ValueError("give exactly one of pid_file, cgroup, name")
        return self


class SnapshotSection(_Section):
    kind: Literal["btrfs", "lvm", "none"] = "btrfs"
    volumes: list[str] = Field(min_length=1)
    lvm_size: str | None = None  # a classic LVM snapshot's size, as --lvm-size

    @model_validator(mode="after")
    def _size(self) -> SnapshotSection:
        if self.lvm_size is not None and self.kind != "lvm":
            raise ValueError("lvm_size applies to kind = \"lvm\" only")
        return self


class BackendSection(_Section):
    kind: Literal["criu", "freeze-only"] = "criu"


class Job(_Section):
    name: Annotated[str, Field(pattern=rf"^{names.ID_PATTERN}$")]
    store: str | None = None
    tcp: Literal["refuse", "close"] = "refuse"
    allow: list[str] = []
    target: TargetSection
    snapshot: SnapshotSection
    backend: BackendSection = BackendSection()
    retention: Policy = Policy()


def load(path: str) -> Job:
    """The job in file `path`; a wrong or missing key is one error naming file, key, need."""
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML: {e}") from None
    data.setdefault("name", Path(path).stem.replace("-", "_"))
    try:
        job = Job.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise BadInput(f"{path}: key {key}: {err['msg']}") from None
    unknown = set(job.allow) - set(preflight.KINDS)
    if unknown:
        raise BadInput(f"{path}: key allow: unknown kind(s) {sorted(unknown)}; known: "
                       f"{', '.join(preflight.KINDS)}")
    return job


def _target(job: Job) -> Target:
    t = job.target
    if t.pid_file is not None:
        try:
            return Target(pid=int(Path(t.pid_file).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            raise BadInput(f"cannot read a PID from {t.pid_file}") from None
    return Target(cgroup=t.cgroup) if t.cgroup is not None else Target(name=t.name)


@dataclass
class RunReport:
    job: str
    status: str  # "success", "partial", "failed", "skipped"
    id: str | None = None
    seconds: float = 0.0
    freeze_window: float | None = None
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    exit_code: int = 0


SKIPPED_EXIT = 20
PARTIAL_EXIT = 21


def run(job: Job, now: datetime | None = None,
        progress: pipeline.Progress = pipeline.quiet) -> RunReport:
    """One backup: checkpoint with --leave-running, then prune. Overlapping runs of one job
    do not interleave: the second is "skipped". Never raises for an expected failure: the
    report says what happened (status, exit code)."""
    t0 = time.monotonic()
    report = RunReport(job.name, "failed")
    try:
        with locks.hold([f"backup job {job.name}"], wait=0):
            m = pipeline.checkpoint(pipeline.CheckpointRequest(
                target=_target(job), volumes=job.snapshot.volumes, snapshot=job.snapshot.kind,
                lvm_size=job.snapshot.lvm_size,
                backend=job.backend.kind, tcp=job.tcp, allow=frozenset(job.allow),
                store=job.store, job=job.name), progress)
            report.id, report.freeze_window = m.id, m.durations.get("freeze_window")
            report.status = "success"
            try:
                decision = prune(job, dry_run=False, now=now)
                report.kept, report.removed = decision.keep, decision.remove
                report.reasons = decision.reasons
            except FscrError as e:
                report.status, report.error, report.exit_code = "partial", str(e), PARTIAL_EXIT
    except Busy:
        report.status, report.exit_code = "skipped", SKIPPED_EXIT
        report.error = f"another backup of job {job.name} is running"
    except FscrError as e:
        report.error, report.exit_code = str(e), e.exit_code
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def prune(job: Job, dry_run: bool, now: datetime | None = None) -> retention.Decision:
    """Remove the job's checkpoints (snapshots and images together) its policy no longer
    keeps; only checkpoints this job made are considered."""
    store = Store.open(job.store)
    mine = [(m.id, datetime.fromisoformat(m.created)) for m in store.list() if m.job == job.name]
    tz = datetime.now().astimezone().tzinfo or UTC
    decision = retention.apply_policy(mine, job.retention, tz, now or datetime.now(UTC))
    if not dry_run:
        for cid in decision.remove:
            pipeline.delete(cid, job.store)
    return decision


# ------------------------------------------------------------------------------ schedule

def _every(spec: str) -> tuple[int, str]:
    unit = spec[-1:]
    if unit not in ("m", "h", "d") or not spec[:-1].isdigit() or int(spec[:-1]) < 1:
        raise BadInput(f"--every {spec!r}: use a number and m, h or d (e.g. 15m, 1h, 1d)")
    return int(spec[:-1]), unit


def _fscr() -> str:
    return shutil.which("fscr") or str(Path(sys.executable).parent / "fscr")


def schedule_files(job: Job, job_path: str, every: str, systemd: bool) -> dict[str, str]:
    """{file name: content} of a systemd service+timer pair, or of a cron.d entry."""
    n, unit = _every(every)
    path, exe, unit_name = os.path.realpath(job_path), _fscr(), f"fscr-backup-{job.name}"
    if systemd:
        span = {"m": "min", "h": "h", "d": "d"}[unit]
        return {
            f"{unit_name}.service": (
                "[Unit]\n"
                f"Description=fscr backup job {job.name}\n\n"
                "[Service]\n"
                "Type=oneshot\n"
                f"ExecStart={exe} backup {path}\n"
                # 20: skipped, another run of this job still runs: not a failure
                "SuccessExitStatus=20\n"),
            f"{unit_name}.timer": (
                "[Unit]\n"
                f"Description=Run fscr backup job {job.name} every {every}\n\n"
                "[Timer]\n"
                f"OnBootSec={n}{span}\n"
                f"OnUnitActiveSec={n}{span}\n"
                "Persistent=true\n\n"
                "[Install]\n"
                "WantedBy=timers.target\n"),
        }
    minute, hour, day = "*", "*", "*"
    if unit == "m":
        minute = f"*/{n}" if n > 1 else "*"
    elif unit == "h":
        minute, hour = "0", f"*/{n}" if n > 1 else "*"
    else:
        minute, hour, day = "0", "0", f"*/{n}" if n > 1 else "*"
    return {unit_name: (f"# fscr backup job {job.name}, every {every}\n"
                        "SHELL=/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
                        f"{minute} {hour} {day} * * root {exe} backup {path}\n")}


def default_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def default_dest(systemd: bool) -> Path:
    return Path("/etc/systemd/system" if systemd else "/etc/cron.d")
