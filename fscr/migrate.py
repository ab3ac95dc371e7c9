"""fscr backup JOB --move-to HOST: the job's workload moved to one of its ssh destinations in
one command (docs/transfer.md).

First a checkpoint that leaves the workload running goes there (incremental when the far
side already holds one of the job's), so the stopped window carries only what changed since;
then a checkpoint with --kill, sent the same way; then `fscr doctor --for ID` and
`fscr restore ID` run there. Until the far restore has answered, any failure restores the
workload here from that last checkpoint, so it keeps running somewhere.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field

from . import errors, locks, pipeline, replicate
from .backup import Job, _target
from .errors import BadInput, Busy, FscrError
from .pipeline.checkpoint import CheckpointRequest, checkpoint
from .replicate import SshDestination


@dataclass
class MoveReport:
    job: str
    host: str
    status: str = "failed"  # "moved", "failed" (running here again), "unknown"
    id: str | None = None
    pid: int | None = None  # the restored root PID, there
    destinations: list[replicate.DestinationReport] = field(default_factory=list)
    seconds: float = 0.0
    stopped: float | None = None  # seconds the workload ran nowhere
    error: str | None = None
    exit_code: int = 0


def destination(job: Job, host: str) -> SshDestination:
    for d in job.destination:
        if isinstance(d, SshDestination) and d.host == host:
            return d
    raise BadInput(f"job {job.name} has no ssh destination with host = {host!r}")


def move(job: Job, host: str) -> MoveReport:
    """Move the workload to `host`. Never raises for an expected failure: the report says
    what happened, and where the workload runs."""
    t0 = time.monotonic()
    r = MoveReport(job.name, host)
    try:
        d = destination(job, host)
        with locks.hold([locks.backup_job_lock(job.name)], wait=0):
            _move(job, d, r)
    except Busy:
        r.error, r.exit_code = f"a backup of job {job.name} is running", Busy.exit_code
    except FscrError as e:
        r.error, r.exit_code = str(e), e.exit_code
    r.seconds = round(time.monotonic() - t0, 3)
    return r


def _checkpoint(job: Job, kill: bool) -> str:
    return checkpoint(CheckpointRequest(
        target=_target(job), volumes=job.snapshot.volumes, snapshot=job.snapshot.kind,
        lvm_size=job.snapshot.lvm_size, backend=job.backend.kind, tcp=job.tcp,
        allow=frozenset(job.allow), store=job.store, job=job.name, kill=kill)).id


def _send(job: Job, d: SshDestination, ckpt_id: str, r: MoveReport) -> None:
    [sent] = replicate.replicate([d], job.name, ckpt_id, job.retention, job.store)
    r.destinations.append(sent)
    if sent.status != "sent":
        raise FscrError(f"destination {d.label}: {sent.error}")


# Far restore failures after which no restored tree runs there: restoring here is safe.
_NOTHING_RUNS_THERE = frozenset(c.exit_code for c in (
    errors.NotRoot, errors.NoSuchCheckpoint, errors.CriuFailed, errors.BadManifest,
    errors.TreeStillRunning, errors.MissingDependency, errors.RestoreRolledBack, errors.Busy,
    errors.Refused, errors.BadInput, errors.PagesCorrupt)) | {2}  # 2: usage


def _here(job: Job, ckpt_id: str) -> None:
    """Restore the workload here again; if that fails too, say it runs nowhere."""
    try:
        pipeline.restore(ckpt_id, job.store)
    except FscrError as e:
        raise FscrError(f"{e}; restoring here failed too: the workload runs nowhere, "
                        f"checkpoint {ckpt_id} holds it") from None


def _move(job: Job, d: SshDestination, r: MoveReport) -> None:
    _send(job, d, _checkpoint(job, kill=False), r)
    r.id = _checkpoint(job, kill=True)
    stopped = time.monotonic()
    try:
        _send(job, d, r.id, r)
        replicate.ssh_fscr(d, "doctor", "--for", r.id, "--json")
    except FscrError as e:
        _here(job, r.id)  # nothing runs there: run here again
        e.args = (f"{e}; the workload runs here again",)
        raise
    except BaseException:
        _here(job, r.id)
        raise
    try:
        p = subprocess.run(replicate.ssh_argv(d, "restore", r.id, "--json"),
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except BaseException:  # ^C: ssh is gone, the far restore may go on without it
        r.status = "unknown"
        raise FscrError(f"interrupted during the restore on {d.host}: check `fscr list` "
                        f"there before restoring {r.id} here") from None
    if p.returncode != 0 and p.returncode not in _NOTHING_RUNS_THERE:
        # ssh's own failure (255), or one the far restore may have had after its tree ran
        r.status = "unknown"
        raise FscrError(f"the restore on {d.host} ended with status {p.returncode} "
                        f"({replicate.last_line(p.stderr)}): whether it runs there is not "
                        f"known; check `fscr list` there before restoring {r.id} here")
    if p.returncode != 0:
        _here(job, r.id)
        raise FscrError(f"restore on {d.host} failed: {replicate.last_line(p.stderr)}; "
                        "the workload runs here again")
    r.pid = json.loads(p.stdout).get("pid")
    r.status, r.stopped = "moved", round(time.monotonic() - stopped, 3)
