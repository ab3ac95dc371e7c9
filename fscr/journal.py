"""A journal per run: every side effect is noted (and fsynced) before it is made.

<store>/journal/<id>.<op>.<pid>.jsonl holds one JSON object per line: first who runs
("begin", with the fscr PID and start time, and the format's version), then each effect
("move", "freeze", "relink", "snapshot", "criu", "swap", ...). EVENTS below defines each one:
its payload, which runs write it, what gc does with it (docs/crash-safety.md's table is made
from it). A run that finishes removes its journal; one whose owner is gone is unfinished, and
`fscr gc` reads it to undo or complete what the run did.

Test facilities (docs/testing.md): FSCR_TEST_KILL_AT=<event> makes fscr SIGKILL itself right
after it noted that event, to prove every stage is recoverable; FSCR_TEST_PAUSE_AT=<event>:<s>
makes it sleep there, to stretch a stage (the watchdog's --max-freeze is tested so);
FSCR_TEST_KILL_CRIU_AT=<event> makes fscr SIGKILL the CRIU its journal names right after it
noted that event (CRIU dying while it holds the tree stopped).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from . import records
from .names import ID_PATTERN
from .process.tree import Task, read_stat
from .records import Id, Meta, field

KILL_AT_ENV = "FSCR_TEST_KILL_AT"
PAUSE_AT_ENV = "FSCR_TEST_PAUSE_AT"
KILL_CRIU_AT_ENV = "FSCR_TEST_KILL_CRIU_AT"


# --- the events: one definition each -------------------------------------------------------
#
# Every line of a journal is one of these. A line whose event is not listed here, or whose
# fields are not its payload's, makes the journal damaged: gc then reports it and leaves it
# (and what it names) to a human rather than guess. docs/crash-safety.md's table is rendered
# from this list, and tests/test_crash.py checks it matches and kills fscr at each event.

VERSION = 1  # of the journal's format; in `begin` as "v" (a journal without it is version 1)

Pid = Annotated[int, Meta(ge=0)]
Path_ = Annotated[str, Meta(min_length=1)]


class Payload(records.Record):
    """What follows an event's name on its line; strict, so a damaged line never reaches gc."""


class Begin(Payload, forbid_unknown_fields=False, kw_only=True):
    """The first line of a journal: whose run it is, and what tells gc where to look. Read
    back by gc and by every command (notice_unfinished), so validated: a damaged one is
    reported, never a Python error. Extra keys are let through (a journal of fscr 0.1)."""

    v: Literal[1] = 1
    op: Annotated[str, Meta(pattern=r"^[a-z_-]{1,32}\Z")]
    id: Id
    pid: Pid
    starttime: Pid
    volumes: list[Path_] = field(default_factory=list)
    snapshot: str = "btrfs"  # the provider's name
    beside: str | None = None  # restore --beside: the copy's name
    cgroup: dict[str, Any] | None = None  # restore: the tree's (origins.CgroupOf; 0.1: none)
    lazy: bool = False
    volumes_only: bool = False
    rollback: bool = False


class Nothing(Payload):
    pass


class TaskOf(Payload):
    pid: Pid
    starttime: Pid


class Isolate(Payload):
    root: Pid
    starttime: Pid


class Move(Payload):
    pid: Pid
    cgroup: Path_
    kind: str
    original: str


class Dump(Payload):
    images: Path_


class Frozen(Payload):
    cgroup: Path_
    kind: str


class Thawed(Payload):
    cgroup: Path_


class RelinkMade(Payload):
    volume: Path_
    name: Path_


class SnapshotMade(Payload):
    volume: Path_
    n: Annotated[int, Meta(ge=0)]


class Draft(Payload):
    manifest: dict[str, Any]


class Kill(Payload):
    """The tasks killed: by checkpoint --kill after its commit, by restore --replace before
    it swaps (gc reads the latter, to tell a tree it killed from one still running)."""

    tasks: list[Annotated[list[Pid], Meta(min_length=2, max_length=2)]]


class Swapping(Payload):
    volume: Path_
    snapshot: Path_
    rescue: Path_
    name: Path_


class CopyMade(Payload):
    volume: Path_
    made: Path_ = field(name="copy")  # on its line as "copy"


class Restored(Payload):
    pid: Pid


class Clone(Payload):
    volume: Path_
    path: Path_


class CgroupMade(Payload):
    path: Path_


class Subvolume(Payload):
    path: Path_


@dataclass(frozen=True)
class Event:
    name: str
    payload: type[Payload]
    # Which runs write it (checkpoint, restore, beside: restore --beside, receive), each with
    # what else it needs to (an option, a kind of tree; None: every such run does).
    runs: dict[str, str | None]
    follows: str  # what the line announces (made right after it is written)
    gc: str  # how gc undoes or completes it, if the run died after it


# The options and trees that make a run write an event (Event.runs).
KILL_OPT, TCP_OPT, REPLACE_OPT, LAZY_OPT = ("--kill", "--tcp established", "--replace",
                                            "--lazy")
SHARED, UNLINKED, SNAPSHOTS = ("a tree sharing its cgroup", "unlinked-but-open files",
                               "volumes with snapshots")

_ALL = dict.fromkeys(("checkpoint", "restore", "beside", "receive"))
_CRIU = dict.fromkeys(("checkpoint", "restore", "beside"))
_CKPT: dict[str, str | None] = {"checkpoint": None}

# Listed in about the order runs write them (a checkpoint kills after its commit, a restore
# before its swaps).
EVENTS: dict[str, Event] = {e.name: e for e in [
    Event("begin", Begin, _ALL,
          "who runs (PID and start time), the volumes, the snapshot kind; the format's "
          "version `v`", "-"),
    Event("isolate", Isolate, _CKPT,
          "the tree's root (PID and start time) is looked at for its cgroup",
          "nothing to undo (a `move` follows if the tree shares its cgroup)"),
    Event("move", Move, {"checkpoint": SHARED},
          "a task moved into `fscr/ckpt_<id>` (its original cgroup)",
          "moved back, cgroup removed"),
    Event("dump", Dump, _CKPT,
          "CRIU about to start, its images written into the checkpoint's directory",
          "the checkpoint's directory removed unless committed"),
    Event("criu", TaskOf, _CRIU,
          "CRIU started (`criu swrk`: its PID and start time), before anything is frozen",
          "waited for (killed after a grace time); see restored"),
    Event("freeze", Frozen, _CKPT,
          "CRIU's `pre-dump` notification: the cgroup frozen", "thawed"),
    Event("relink", RelinkMade, {"checkpoint": UNLINKED},
          "CRIU's `post-dump` notification (images written, every task stopped): "
          "`unlink-at-restart-<id>-<n>` created on a volume", "removed"),
    Event("snapshot", SnapshotMade, _CKPT,
          "`post-dump`: `.fscr-snapshots/<id>/<n>` created (LVM: the LV `fscr_<id>_<n>` in "
          "the volume's group)", "deleted, unless the checkpoint was committed"),
    Event("draft", Draft, {"checkpoint": TCP_OPT},
          "`post-dump`: the manifest, before fscr answers (CRIU then kills the tree)",
          "committed with the images' checksums if CRIU's log says it finished; else the "
          "network lock (named from `inventory.img`) is removed"),
    Event("dumped", Nothing, _CKPT, "CRIU answered: the dump is done", "-"),
    Event("commit", Nothing, _CKPT, "the manifest is written",
          "a committed checkpoint is kept"),
    Event("kill", Kill, {"checkpoint": KILL_OPT, "restore": REPLACE_OPT},
          f"checkpoint `{KILL_OPT}`: the tree (its tasks) killed after the commit; restore "
          f"`{REPLACE_OPT}`: the running tree killed to free its PIDs",
          "checkpoint: the commit is kept, the cgroup thawed; restore: if none of the tasks "
          "lives, the swaps undone and the checkpoint restored again (`--replace`)"),
    Event("thawed", Thawed, _CKPT, "the cgroup thawed", "thawed"),
    Event("swap", Swapping, {"restore": SNAPSHOTS},
          "a snapshot is about to be swapped in at its volume, the volume kept as `rescue`",
          "swapped back if the swap happened (btrfs: the volume's UUID is the copy's; LVM: "
          "the copy is mounted there, or the merge started: the rescue is merged back); else "
          "the unused copy (and rescue) deleted"),
    Event("copy", CopyMade, {"restore": SNAPSHOTS},
          "a writable copy of the snapshot made (btrfs: its UUID; LVM: the LV mounted, or "
          "the snapshot merged), then swapped in", "as for swap"),
    Event("lazy", TaskOf, {"restore": LAZY_OPT},
          "CRIU's lazy-pages daemon started (its PID and start time)",
          "with a restored tree: the daemon left alone (killing it would zero the pages it "
          "has not copied; it exits once every page is in); without one: the daemon stopped, "
          "the swaps undone"),
    Event("clone", Clone, {"beside": None},
          "a writable clone `.fscr-snapshots/copy_<id>_<time>_<hex>/<n>` made",
          "removed unless CRIU restored the copy (then its relinks are unlinked)"),
    Event("cgroup", CgroupMade, {"beside": None}, "the copy's cgroup `fscr/copy_...` made",
          "removed unless CRIU restored the copy (then the copy is recorded)"),
    Event("restored", Restored, {"restore": None, "beside": None},
          "CRIU restored the tree, which runs (at its `post-restore` notification fscr "
          "writes the root's PID to `restore.pid`)",
          "if `restore.pid` names a task in the checkpoint's cgroup: completed (the tree "
          "recorded, relinks unlinked, rescue sealed and listed); else rolled back (CRIU "
          "over RPC gives up when fscr dies before the tree runs)"),
    Event("verified", Nothing, {"restore": LAZY_OPT},
          "the page images verified while the tree runs",
          "page images not yet verified are verified by gc: if corrupt, the tree is killed "
          "and the swaps undone"),
    Event("subvolume", Subvolume, {"receive": None},
          "the provider's receive about to make the snapshot `path` (btrfs: `btrfs receive`)",
          "removed"),
]}


def written_by(run: str, *when: str) -> list[str]:
    """The events a run writes (in its order), given what else it has (Event.runs)."""
    return [e.name for e in EVENTS.values() if run in e.runs and e.runs[run] in (None, *when)]


def table() -> str:
    """docs/crash-safety.md's table of events, rendered from their definitions."""
    rows = ["| event | written by | what follows it | how gc undoes or completes it |",
            "| --- | --- | --- | --- |"]
    for e in EVENTS.values():
        by = ", ".join(r + (f" ({w})" if w else "") for r, w in e.runs.items())
        rows.append(f"| {e.name} | {by} | {e.follows} | {e.gc} |")
    return "\n".join(rows) + "\n"


def invalid(entry: object) -> str | None:
    """Why a journal line is not one fscr writes (None if it is)."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    name = entry.get("event")
    event = EVENTS.get(name) if isinstance(name, str) else None
    if event is None:
        return f"unknown event {name!r}"
    try:
        records.convert(_payload(entry), event.payload)
    except records.Invalid as e:
        where, what = records.why(e)
        return f"{name}: {what}" if where == "(top)" else f"{name}.{where}: {what}"
    return None


@dataclass
class Journal:
    path: Path

    @classmethod
    def begin(cls, store_root: Path, ckpt_id: str, op: str, **data: Any) -> Journal:
        """Start the journal of a run; `data` (volumes, snapshot kind) tells gc where to look.
        One journal per run: a retry never appends to (or removes) a dead run's journal."""
        path = store_root / "journal" / f"{ckpt_id}.{op}.{os.getpid()}.jsonl"
        j = cls(path)
        me = read_stat(os.getpid())
        j.note("begin", v=VERSION, op=op, id=ckpt_id, pid=os.getpid(),
               starttime=me.starttime if me else 0, **data)
        return j

    def note(self, event: str, **data: Any) -> None:
        """Write `event` (one of EVENTS, its payload checked: a line gc could not read is a
        bug caught here, in the run that would write it) and fsync it."""
        records.convert(data, EVENTS[event].payload)
        line = json.dumps({"event": event, **data}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.environ.get(KILL_AT_ENV) == event:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(KILL_CRIU_AT_ENV) == event:
            criu = Run(self.path, read(self.path)).events("criu")
            if criu and Task(criu[-1].pid, criu[-1].starttime).alive():
                os.kill(criu[-1].pid, signal.SIGKILL)
        pause_event, _, seconds = os.environ.get(PAUSE_AT_ENV, "").partition(":")
        if pause_event == event:
            time.sleep(float(seconds))

    def close(self) -> None:
        """The run finished (or was fully undone): nothing is left for gc."""
        self.path.unlink(missing_ok=True)


def read(path: Path) -> list[dict[str, Any]]:
    """The journal's entries; a torn last line (fscr died mid-write) is ignored, and a journal
    removed meanwhile (its run just finished) reads as empty."""
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


@dataclass
class Run:
    """The journal of one run, read back: by gc, and by runs that must not overlap it.
    `damaged` says why its journal cannot be trusted (gc then leaves it to a human)."""

    path: Path
    entries: list[dict[str, Any]]
    damaged: str | None = None

    @cached_property
    def begin(self) -> Begin:
        return records.convert(_payload(self.entries[0]), Begin)

    @property
    def id(self) -> str:
        return self.begin.id

    @property
    def op(self) -> str:
        return self.begin.op

    def owner_alive(self) -> bool:
        return self.damaged is None and Task(self.begin.pid, self.begin.starttime).alive()

    def events(self, name: str) -> list[Any]:
        """The payloads of the run's `name` events, in order, as EVENTS defines them."""
        payload = EVENTS[name].payload
        return [records.convert(_payload(e), payload) for e in self.entries
                if e.get("event") == name]


def _payload(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "event"}


_NAME = re.compile(rf"({ID_PATTERN})\.([a-z_-]{{1,32}})\.([0-9]{{1,10}})\.jsonl")


def runs(store_root: Path) -> list[Run]:
    out = []
    for path in sorted((store_root / "journal").glob("*.jsonl")):
        entries = [e for e in read(path) if isinstance(e, dict)]
        named = _NAME.fullmatch(path.name)
        guess = {"event": "begin", "op": named[2] if named else "unknown",
                 "id": named[1] if named else "unknown", "pid": 0, "starttime": 0}
        if entries and entries[0].get("event") == "begin":
            why = _damage(entries)
            if why is None:
                out.append(Run(path, entries))
            else:
                out.append(Run(path, [guess], damaged=f"journal {path.name} is damaged "
                               f"({why})"))
        elif path.exists():  # died before its first line was whole: nothing was done yet
            out.append(Run(path, [guess], damaged=None if named else
                           f"journal {path.name} is not named as fscr names journals"))
    return out


def _damage(entries: list[dict[str, Any]]) -> str | None:
    """Why a journal cannot be trusted: a version this fscr does not read, or a line that is
    not an event it writes (None if it can be)."""
    v = entries[0].get("v", 1)
    if v != VERSION:
        return f"journal format version {v!r}; this fscr reads version {VERSION}"
    for n, e in enumerate(entries):
        why = invalid(e)
        if why is not None:
            return why if n == 0 else f"line {n + 1}: {why}"
    return None


def unfinished(store_root: Path, ckpt_id: str | None = None) -> list[Run]:
    """Runs whose fscr is gone (of checkpoint `ckpt_id`, if given)."""
    return [r for r in runs(store_root)
            if not r.owner_alive() and (ckpt_id is None or r.id == ckpt_id)]
