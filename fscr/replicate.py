"""Off the machine: a backup job's checkpoint copied to its `[[destination]]` entries.

Two kinds, each riding an existing tool rather than a transport of fscr's own
(docs/backups.md):

    [[destination]]
    kind = "ssh"                 # btrbk's model: fscr send | ssh HOST fscr receive
    host = "root@far"            # anything ssh takes as a destination (~/.ssh/config aliases)
    store = "/var/lib/fscr"      # optional: the far side's store
    ssh_config = "/etc/fscr/ssh_config"   # optional: ssh -F FILE
    fscr = "fscr"                # optional: the command that runs fscr on the far side
    [destination.retention]      # optional: applied there after each receive
    daily = 7

    [[destination]]
    kind = "restic"              # restic backup --stdin of the stream; restic forget
    repository = "sftp:backup@nas:/srv/restic"
    password_file = "/etc/fscr/restic.pass"   # optional: else restic's own environment
    options = ["sftp.command=ssh -F /etc/fscr/ssh_config nas -s sftp"]   # optional: restic -o

Each destination remembers (in <store>/replication/<job>.json) the newest checkpoint it was
last seen to hold, so that local pruning keeps the parent of its next incremental even while
it is down; the parent itself is always asked of the far side, never taken from that record.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from . import records, transfer
from .errors import FscrError, MissingDependency, NoSuchCheckpoint
from .fsutil import write_atomic
from .names import check_id
from .records import Meta, Record
from .retention import Policy
from .store import Store


class _Dest(Record, tag_field="kind"):
    """A [[destination]] entry; its `kind` picks the class (msgspec's tagged union)."""

    @property
    def kind(self) -> str:
        return self.__struct_config__.tag


class SshDestination(_Dest, tag="ssh"):
    # Never an ssh option.
    host: Annotated[str, Meta(min_length=1, pattern=r"^[^-\s]\S*\Z")]
    store: str | None = None
    ssh_config: str | None = None
    fscr: Annotated[str, Meta(min_length=1)] = "fscr"
    retention: Policy | None = None  # absent: the far side keeps everything (btrbk's default)

    @property
    def label(self) -> str:
        return f"ssh:{self.host}" + (f":{self.store}" if self.store else "")


class ResticDestination(_Dest, tag="restic"):
    repository: Annotated[str, Meta(min_length=1)]
    password_file: str | None = None
    options: list[str] = records.field(default_factory=list)
    retention: Policy | None = None  # absent: the job's retention

    @property
    def label(self) -> str:
        return f"restic:{self.repository}"


Destination = SshDestination | ResticDestination


@dataclass
class DestinationReport:
    destination: str
    kind: str
    status: str = "failed"  # "sent" or "failed"
    mode: str | None = None  # "full" or "incremental"
    parent: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    removed: list[str] = field(default_factory=list)  # pruned there by its retention
    error: str | None = None


def replicate(dests: list[Destination], job: str, ckpt_id: str,
              job_policy: Policy, store_dir: str | None) -> list[DestinationReport]:
    """Copy checkpoint `ckpt_id` to every destination, then apply each one's retention there.
    Never raises for a destination that fails: its report says why. What a failed transfer
    left on the far side is removed there (fscr receive's own cleanup; restic is interrupted
    before it writes a snapshot)."""
    reports = []
    for d in dests:
        r = DestinationReport(d.label, d.kind)
        t0 = time.monotonic()
        try:
            if isinstance(d, SshDestination):
                _to_ssh(d, job, ckpt_id, store_dir, r)
            else:
                _to_restic(d, job, ckpt_id, job_policy, store_dir, r)
        except FscrError as e:
            r.status, r.error = "failed", str(e)
        except OSError as e:
            r.status, r.error = "failed", f"{e.strerror or e}"
        r.seconds = round(time.monotonic() - t0, 3)
        reports.append(r)
    return reports


# ------------------------------------------------------------------------------ state

STATE_VERSION = 1


def _state_file(store: Store, job: str) -> Path:
    return store.root / "replication" / f"{job}.json"


def held(job: str, store_dir: str | None) -> dict[str, str]:
    """{destination label: the newest checkpoint of `job` it was last seen to hold}. A record
    that is missing, unreadable or of another version protects nothing (it only protects)."""
    f = _state_file(Store.open(store_dir), job)
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return {}
    got = data.get("held")
    return ({k: v for k, v in got.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(got, dict) else {})


def _remember(job: str, store_dir: str | None, label: str, ckpt_id: str) -> None:
    f = _state_file(Store.open(store_dir), job)
    f.parent.mkdir(mode=0o700, exist_ok=True)
    data = {"version": STATE_VERSION, "held": held(job, store_dir) | {label: ckpt_id}}
    write_atomic(f, json.dumps(data, sort_keys=True).encode())


def _newest_common(job: str, store_dir: str | None, theirs: set[str], new: str) -> str | None:
    ours = [m for m in Store.open(store_dir).list() if m.job == job and m.id != new]
    both = sorted((m.created, m.id) for m in ours if m.id in theirs)
    return both[-1][1] if both else None


# ------------------------------------------------------------------------------ ssh

def ssh_argv(d: SshDestination, *fscr_args: str) -> list[str]:
    # ssh hands the far side one command line for its shell: `fscr` is a shell fragment by
    # design (a path, or e.g. "sudo fscr"), every argument of ours is quoted.
    remote = " ".join([d.fscr, *(shlex.quote(a) for a in fscr_args)]
                      + (["--store", shlex.quote(d.store)] if d.store else []))
    config = ["-F", d.ssh_config] if d.ssh_config else []
    # A job never prompts, and a host that stops answering fails the destination within a
    # minute or so instead of hanging the run (the job's lock) forever.
    return ["ssh", *config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-o",
            "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", d.host, remote]


def ssh_fscr(d: SshDestination, *fscr_args: str) -> str:
    p = subprocess.run(ssh_argv(d, *fscr_args), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise FscrError(f"{' '.join(fscr_args[:1])} on {d.host} failed: {last_line(p.stderr)}")
    return p.stdout


def _finish(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """End of input for `proc` (if not given yet), then its output once it exits."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.stdin = None  # communicate() would flush it again
    out, err = proc.communicate()
    return out or b"", err or b""


def _stream_into(proc: subprocess.Popen[bytes], ckpt_id: str, store_dir: str | None,
                 stop: Callable[[], None], parent: str | None = None) -> tuple[int, bytes]:
    """Send checkpoint `ckpt_id` into `proc` (a far receive, restic) and wait for it: the
    bytes sent and its stderr. A reader that stopped reading says why itself (its exit code
    and stderr); interrupted here, `stop` makes it give up what it got before it is reaped."""
    sent = 0
    try:
        sent = transfer.send(ckpt_id, proc.stdin, parent=parent, store_dir=store_dir).bytes
    except BrokenPipeError:
        pass
    except BaseException:
        stop()
        _finish(proc)
        raise
    return sent, _finish(proc)[1]


def last_line(stderr: str | bytes) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("fscr: error: ")]  # fscr's line says it best
    return (ours or lines or ["no message"])[-1]


def _to_ssh(d: SshDestination, job: str, ckpt_id: str, store_dir: str | None,
            r: DestinationReport) -> None:
    try:
        listed = json.loads(ssh_fscr(d, "list", "--json"))["checkpoints"]
        theirs = {c["id"] for c in listed if c.get("job") == job}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise FscrError(f"fscr list on {d.host} did not answer in JSON") from None
    if ckpt_id in theirs:
        r.status, r.mode = "sent", "already there"
    else:
        r.parent = _newest_common(job, store_dir, theirs, ckpt_id)
        if r.parent:  # the far side holds it: until this send succeeds, it is the one to keep
            _remember(job, store_dir, d.label, r.parent)
        r.mode = "incremental" if r.parent else "full"
        proc = subprocess.Popen(ssh_argv(d, "receive", "--json"), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Interrupted, the far receive sees a truncated stream and removes what came.
        r.bytes, err = _stream_into(proc, ckpt_id, store_dir, proc.kill, r.parent)
        if proc.returncode != 0:
            raise FscrError(f"receive on {d.host} failed: {last_line(err)}")
        r.status = "sent"
    _remember(job, store_dir, d.label, ckpt_id)
    if d.retention is not None and not d.retention.empty():
        out = ssh_fscr(d, "prune", "--job", job, *_policy_args(d.retention), "--json")
        try:
            r.removed = json.loads(out)["remove"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FscrError(f"fscr prune on {d.host} did not answer in JSON") from None


def _policy_args(p: Policy) -> list[str]:
    return [a for k, v in records.plain(p).items() if v
            for a in (f"--{k.replace('_', '-')}", str(v))]


# ------------------------------------------------------------------------------ restic

def _restic(d: ResticDestination | None = None, repository: str | None = None,
            password_file: str | None = None,
            options: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    exe = shutil.which("restic")
    if exe is None:
        raise MissingDependency("restic is not installed (Debian: apt-get install restic)")
    if d is not None:
        repository, password_file, options = d.repository, d.password_file, d.options
    env = dict(os.environ) | {"RESTIC_REPOSITORY": repository or ""}
    if password_file:
        env["RESTIC_PASSWORD_FILE"] = password_file
    return [exe, *(a for o in options or [] for a in ("-o", o))], env


def stream_path(job: str, ckpt_id: str) -> str:
    """Where a checkpoint's stream lives in a restic snapshot (restic dump takes this path)."""
    return f"/{job}/{ckpt_id}.fscr"


def _to_restic(d: ResticDestination, job: str, ckpt_id: str, job_policy: Policy,
               store_dir: str | None, r: DestinationReport) -> None:
    # restic deduplicates by content, so every stream is a full one: unchanged data costs
    # nothing in the repository, and any snapshot restores on its own.
    r.mode = "full"
    restic, env = _restic(d)
    proc = subprocess.Popen(
        [*restic, "backup", "--quiet", "--stdin", "--stdin-filename",
         stream_path(job, ckpt_id)[1:], "--tag", f"fscr-job={job}", "--tag",
         f"fscr-id={ckpt_id}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # restic writes the snapshot on end of input only: interrupted (SIGINT), it writes none
    # (and removes its lock); the packs it uploaded are unreferenced until `restic prune`.
    r.bytes, err = _stream_into(proc, ckpt_id, store_dir,
                                lambda: proc.send_signal(signal.SIGINT))
    if proc.returncode != 0:
        raise FscrError(f"restic backup to {d.repository} failed: {last_line(err)}")
    r.status = "sent"
    _remember(job, store_dir, d.label, ckpt_id)
    policy = d.retention if d.retention is not None else job_policy
    if not policy.empty():
        r.removed = _forget(restic, env, job, policy)


def _forget(restic: list[str], env: dict[str, str], job: str, policy: Policy) -> list[str]:
    keep = {"keep_last": "--keep-last", "hourly": "--keep-hourly", "daily": "--keep-daily",
            "weekly": "--keep-weekly", "monthly": "--keep-monthly", "yearly": "--keep-yearly"}
    args = [a for k, v in records.plain(policy).items() if v for a in (keep[k], str(v))]
    # Each checkpoint has its own path, so restic's default grouping (host, paths) would put
    # each in a group of one: group this job's snapshots by host only.
    p = subprocess.run([*restic, "forget", "--json", "--tag", f"fscr-job={job}", "--group-by",
                        "host", *args, "--prune"], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise FscrError(f"restic forget failed: {last_line(p.stderr)}")
    removed = []
    try:  # --json prints the forget result on its first line; prune's report follows
        for group in json.loads(p.stdout.splitlines()[0]) or []:
            for snap in group.get("remove") or []:
                removed += [t.split("=", 1)[1] for t in snap.get("tags") or []
                            if t.startswith("fscr-id=")]
    except (json.JSONDecodeError, IndexError, AttributeError):
        pass  # restic's report is informative only; the forget itself succeeded
    return sorted(removed)


def restore_from_restic(ckpt_id: str, repository: str, password_file: str | None,
                        options: list[str], store_dir: str | None) -> transfer.Received:
    """Bring checkpoint `ckpt_id` back from a restic repository into the local store (restic
    dump piped into receive). On failure nothing of it stays here (receive's cleanup)."""
    check_id(ckpt_id)
    restic, env = _restic(repository=repository, password_file=password_file, options=options)
    p = subprocess.run([*restic, "snapshots", "--json", "--tag", f"fscr-id={ckpt_id}"],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise FscrError(f"restic snapshots failed: {last_line(p.stderr)}")
    snaps = sorted(json.loads(p.stdout or "[]") or [], key=lambda s: s["time"])
    if not snaps:
        raise NoSuchCheckpoint(f"no restic snapshot in {repository} holds checkpoint {ckpt_id}")
    snap = snaps[-1]
    path = next((x for x in snap["paths"] if x.endswith(f"/{ckpt_id}.fscr")), None)
    if path is None:
        raise NoSuchCheckpoint(f"restic snapshot {snap['short_id']} has no {ckpt_id}.fscr")
    proc = subprocess.Popen([*restic, "dump", snap["id"], path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        got = transfer.receive(proc.stdout, store_dir=store_dir)
    except BaseException:
        proc.kill()
        _finish(proc)
        raise
    _, err = _finish(proc)
    if proc.returncode != 0:  # the stream checked out whole, yet restic complains: say so
        raise FscrError(f"restic dump failed after a complete stream: {last_line(err)}")
    return got
