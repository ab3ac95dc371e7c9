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
    [[destination]]              # optional, any number: copies off the machine after each
    kind = "ssh"                 # checkpoint; or kind = "restic" (fscr/replicate.py,
    host = "root@far"            # docs/backups.md)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from . import locks, pipeline, preflight, records, replicate, retention
from .errors import BadInput, Busy, FscrError
from .pipeline.checkpoint import CheckpointRequest, checkpoint
from .process.target import Target
from .records import Id, Meta, PathText, Record
from .retention import Policy
from .store import Store

# A job's paths (PathText) hold no NUL byte either: load() checks every string of a job file
# for one (a system call cannot take it).


class TargetSection(Record):
    pid_file: PathText | None = None
    cgroup: PathText | None = None
    name: Id | None = None  # fscr run --name

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.pid_file, self.cgroup, self.name)) != 1:
            raise ValueError("give exactly one of pid_file, cgroup, name")


class SnapshotSection(Record, kw_only=True):  # kw_only: a required field after a default
    kind: Literal["btrfs", "lvm", "none"] = "btrfs"
    volumes: Annotated[list[PathText], Meta(min_length=1)]
    lvm_size: str | None = None  # a classic LVM snapshot's size, as --lvm-size

    def __post_init__(self) -> None:
        if self.lvm_size is not None and self.kind != "lvm":
            raise ValueError("lvm_size applies to kind = \"lvm\" only")


class BackendSection(Record):
    kind: Literal["criu", "freeze-only"] = "criu"


class Job(Record, kw_only=True):
    name: Id
    store: PathText | None = None
    tcp: Literal["refuse", "close"] = "refuse"
    allow: list[str] = records.field(default_factory=list)
    target: TargetSection
    snapshot: SnapshotSection
    backend: BackendSection = records.field(default_factory=BackendSection)
    retention: Policy = records.field(default_factory=Policy)
    destination: list[replicate.Destination] = records.field(default_factory=list)


def load(path: str) -> Job:
    """The job in file `path`; a wrong or missing key is one error naming file, key, need."""
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML: {e}") from None
    data.setdefault("name", Path(path).stem.replace("-", "_"))
    nul = _nul(data)
    if nul is not None:
        raise BadInput(f"{path}: key {nul}: holds a NUL byte")
    try:
        job = records.convert(data, Job)
    except records.Invalid as e:
        key, what = _key(e)
        raise BadInput(f"{path}: key {key}: {what}") from None
    unknown = set(job.allow) - set(preflight.KINDS)
    if unknown:
        raise BadInput(f"{path}: key allow: unknown kind(s) {sorted(unknown)}; known: "
                       f"{', '.join(preflight.KINDS)}")
    return job


def _nul(value: object, key: str = "") -> str | None:
    """The key of the first string in `value` (parsed TOML) that holds a NUL byte: no path,
    host or option fscr passes on can hold one, so a job file may hold none."""
    if isinstance(value, str):
        return key if "\0" in value else None
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for k, v in items:
        found = _nul(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


_FIELD = re.compile(r"Object (missing required|contains unknown) field `(.*)`")


def _key(e: Exception) -> tuple[str, str]:
    """(key, what is wrong) of a job file that does not validate, the key as the file names
    it ("snapshot.volumes.0"); a missing or unknown key is named itself, not its table."""
    where, what = records.why(e)
    m = _FIELD.fullmatch(what)
    if m is None:
        return ("(top level)" if where == "(top)" else where), what
    key = m[2] if where == "(top)" else f"{where}.{m[2]}"
    return key, "required, but missing" if m[1] == "missing required" else "unknown key"


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
    destinations: list[replicate.DestinationReport] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0


SKIPPED_EXIT = 20
PARTIAL_EXIT = 21


def run(job: Job, now: datetime | None = None,
        progress: pipeline.Progress = pipeline.quiet) -> RunReport:
    """One backup: checkpoint with --leave-running, copy it to each destination, then prune.
    Overlapping runs of one job do not interleave: the second is "skipped". A destination or
    the pruning failing makes the run "partial". Never raises for an expected failure: the
    report says what happened (status, exit code)."""
    t0 = time.monotonic()
    report = RunReport(job.name, "failed")
    try:
        with locks.hold([locks.backup_job_lock(job.name)], wait=0):
            m = checkpoint(CheckpointRequest(
                target=_target(job), volumes=job.snapshot.volumes, snapshot=job.snapshot.kind,
                lvm_size=job.snapshot.lvm_size,
                backend=job.backend.kind, tcp=job.tcp, allow=frozenset(job.allow),
                store=job.store, job=job.name), progress)
            report.id, report.freeze_window = m.id, m.durations.get("freeze_window")
            report.status = "success"
            report.destinations = replicate.replicate(job.destination, job.name, m.id,
                                                      job.retention, job.store)
            failed = [d for d in report.destinations if d.status == "failed"]
            if failed:
                report.status, report.exit_code = "partial", PARTIAL_EXIT
                report.error = "; ".join(f"destination {d.destination}: {d.error}"
                                         for d in failed)
            try:
                decision = prune(job, dry_run=False, now=now)
                report.kept, report.removed = decision.keep, decision.remove
                report.reasons = decision.reasons
            except FscrError as e:
                report.status, report.exit_code = "partial", PARTIAL_EXIT
                report.error = "; ".join(x for x in (report.error, str(e)) if x)
    except Busy:
        report.status, report.exit_code = "skipped", SKIPPED_EXIT
        report.error = f"another backup of job {job.name} is running"
    except FscrError as e:
        report.error, report.exit_code = str(e), e.exit_code
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def prune(job: Job, dry_run: bool, now: datetime | None = None) -> retention.Decision:
    """Remove the job's checkpoints (snapshots and images together) its policy no longer
    keeps; only checkpoints this job made are considered. The newest checkpoint each
    destination holds stays: it is the parent of that destination's next incremental."""
    labels = {d.label for d in job.destination}  # a destination removed from the job: no more
    parents = {k: v for k, v in replicate.held(job.name, job.store).items() if k in labels}
    return prune_checkpoints(job.name, job.store, job.retention, dry_run, now, parents)


def prune_checkpoints(job: str, store_dir: str | None, policy: Policy, dry_run: bool,
                      now: datetime | None = None,
                      parents: dict[str, str] | None = None) -> retention.Decision:
    """prune() by job name and policy (also what a destination's retention runs there)."""
    store = Store.open(store_dir)
    mine = [(m.id, datetime.fromisoformat(m.created)) for m in store.list() if m.job == job]
    tz = datetime.now().astimezone().tzinfo or UTC
    decision = retention.apply_policy(mine, policy, tz, now or datetime.now(UTC))
    for label, cid in (parents or {}).items():
        if cid in decision.remove:
            decision.remove.remove(cid)
            decision.keep.append(cid)
            decision.reasons.setdefault(cid, []).append(f"parent for destination {label}")
    if not dry_run:
        for cid in decision.remove:
            pipeline.delete(cid, store_dir)
    return decision


# ------------------------------------------------------------------------------ schedule

_UNITS = {"m": 1, "h": 60, "d": 24 * 60}  # minutes in each unit


def every(spec: str) -> tuple[int, str]:
    """`--every` as (n, unit), in the largest unit that divides it evenly (120m is 2h).
    ASCII digits only (isdigit() passes "²"); at most a year."""
    m = re.fullmatch(r"([0-9]{1,6})([mhd])", spec)
    minutes = int(m[1]) * _UNITS[m[2]] if m else 0
    if not 1 <= minutes <= 366 * 24 * 60:
        raise BadInput(f"--every {spec!r}: use a number from 1 and m, h or d, at most a year "
                       "(e.g. 15m, 1h, 1d)")
    unit = next(u for u in ("d", "h", "m") if minutes % _UNITS[u] == 0)
    return minutes // _UNITS[unit], unit


def _cron_fields(n: int, unit: str, spec: str) -> tuple[str, str, str]:
    """minute, hour, day-of-month. cron steps restart each hour, day or month, so only a
    step that divides its field runs evenly: any other interval is refused, not written
    wrong (61m would run once an hour; 7m would leave a 4-minute gap each hour)."""
    fits = {"m": 60, "h": 24, "d": 1}[unit]
    if fits % n:
        what = {"m": "a divisor of 60 minutes", "h": "a divisor of 24 hours",
                "d": "1d (cron steps restart each month)"}[unit]
        raise BadInput(f"--every {spec!r}: cron cannot run that evenly; use {what}, or a "
                       "systemd timer (--systemd)")
    step = f"*/{n}" if n > 1 else "*"
    return {"m": (step, "*", "*"), "h": ("0", step, "*"), "d": ("0", "0", "*")}[unit]


def _safe_path(path: str) -> str:
    """A path that goes into a unit file or a cron line: one line, printable."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise BadInput(f"{path!r}: a control character or newline in a path cannot go into "
                       "a systemd unit or a cron line; rename it")
    return path


def _systemd_word(word: str) -> str:
    """One word of ExecStart, quoted for systemd: "\\" and "\"" escaped inside double quotes,
    "%" (specifiers) and "$" (variables) doubled (systemd.service(5), "Command lines")."""
    quoted = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + quoted.replace("%", "%%").replace("$", "$$") + '"'


def _cron_word(word: str) -> str:
    """One word of a cron command: quoted for /bin/sh, and "%" escaped, since cron turns an
    unescaped one into a newline (crontab(5)) and strips the backslash of an escaped one."""
    return shlex.quote(word).replace("%", "\\%")


def _fscr() -> str:
    return shutil.which("fscr") or str(Path(sys.executable).parent / "fscr")


def schedule_files(job: Job, job_path: str, every_spec: str, systemd: bool) -> dict[str, str]:
    """{file name: content} of a systemd service+timer pair, or of a cron.d entry."""
    n, unit = every(every_spec)
    path, exe = _safe_path(os.path.realpath(job_path)), _safe_path(_fscr())
    unit_name = f"fscr-backup-{job.name}"
    if systemd:
        span = {"m": "min", "h": "h", "d": "d"}[unit]
        return {
            f"{unit_name}.service": (
                "[Unit]\n"
                f"Description=fscr backup job {job.name}\n\n"
                "[Service]\n"
                "Type=oneshot\n"
                # --quiet: the journal (or cron's mail) gets the run's summary line only
                f"ExecStart={_systemd_word(exe)} backup --quiet {_systemd_word(path)}\n"
                # 20: skipped, another run of this job still runs: not a failure
                "SuccessExitStatus=20\n"),
            f"{unit_name}.timer": (
                "[Unit]\n"
                f"Description=Run fscr backup job {job.name} every {n}{unit}\n\n"
                "[Timer]\n"
                f"OnBootSec={n}{span}\n"
                f"OnUnitActiveSec={n}{span}\n"
                "Persistent=true\n\n"
                "[Install]\n"
                "WantedBy=timers.target\n"),
        }
    minute, hour, day = _cron_fields(n, unit, every_spec)
    return {unit_name: (f"# fscr backup job {job.name}, every {n}{unit}\n"
                        "SHELL=/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
                        f"{minute} {hour} {day} * * root {_cron_word(exe)} backup --quiet "
                        f"{_cron_word(path)}\n")}


def default_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def default_dest(systemd: bool) -> Path:
    return Path("/etc/systemd/system" if systemd else "/etc/cron.d")
