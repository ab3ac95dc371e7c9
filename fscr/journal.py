"""A journal per run: every side effect is noted (and fsynced) before it is made.

<store>/journal/<id>.<op>.<pid>.jsonl holds one JSON object per line: first who runs
("begin", with the fscr PID and start time), then each effect ("move", "freeze", "relink",
"snapshot", "criu", "swap", ...; docs/crash-safety.md lists them). A run that finishes
removes its journal; one whose owner is gone is unfinished, and `fscr gc` reads it to undo
or complete what the run did.

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
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .names import ID_PATTERN
from .process.tree import Task, read_stat

KILL_AT_ENV = "FSCR_TEST_KILL_AT"
PAUSE_AT_ENV = "FSCR_TEST_PAUSE_AT"
KILL_CRIU_AT_ENV = "FSCR_TEST_KILL_CRIU_AT"


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
        j.note("begin", op=op, id=ckpt_id, pid=os.getpid(),
               starttime=me.starttime if me else 0, **data)
        return j

    def note(self, event: str, **data: Any) -> None:
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
            if criu and Task(criu[-1]["pid"], criu[-1]["starttime"]).alive():
                os.kill(criu[-1]["pid"], signal.SIGKILL)
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


class Begin(BaseModel):
    """The first line of a journal: whose run it is. Read back by gc and by every command
    (notice_unfinished), so validated: a damaged one is reported, never a Python error."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    event: Literal["begin"]
    op: Annotated[str, Field(pattern=r"^[a-z_-]{1,32}$")]
    id: Annotated[str, Field(pattern=rf"^{ID_PATTERN}$")]
    pid: Annotated[int, Field(ge=0)]
    starttime: Annotated[int, Field(ge=0)]


@dataclass
class Run:
    """The journal of one run, read back: by gc, and by runs that must not overlap it.
    `damaged` says why its journal cannot be trusted (gc then leaves it to a human)."""

    path: Path
    entries: list[dict[str, Any]]
    damaged: str | None = None

    @property
    def begin(self) -> dict[str, Any]:
        return self.entries[0]

    @property
    def id(self) -> str:
        return self.begin["id"]

    @property
    def op(self) -> str:
        return self.begin["op"]

    def owner_alive(self) -> bool:
        return self.damaged is None and Task(self.begin["pid"], self.begin["starttime"]).alive()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("event") == name]


_NAME = re.compile(rf"({ID_PATTERN})\.([a-z_-]{{1,32}})\.([0-9]{{1,10}})\.jsonl")


def runs(store_root: Path) -> list[Run]:
    out = []
    for path in sorted((store_root / "journal").glob("*.jsonl")):
        entries = [e for e in read(path) if isinstance(e, dict)]
        named = _NAME.fullmatch(path.name)
        guess = {"event": "begin", "op": named[2] if named else "unknown",
                 "id": named[1] if named else "unknown", "pid": 0, "starttime": 0}
        if entries and entries[0].get("event") == "begin":
            try:
                Begin.model_validate(entries[0])
                out.append(Run(path, entries))
            except ValidationError as e:
                err = e.errors()[0]
                out.append(Run(path, [guess], damaged=f"journal {path.name} is damaged "
                               f"(begin.{'.'.join(map(str, err['loc']))}: {err['msg']})"))
        elif path.exists():  # died before its first line was whole: nothing was done yet
            out.append(Run(path, [guess], damaged=None if named else
                           f"journal {path.name} is not named as fscr names journals"))
    return out


def unfinished(store_root: Path, ckpt_id: str | None = None) -> list[Run]:
    """Runs whose fscr is gone (of checkpoint `ckpt_id`, if given)."""
    return [r for r in runs(store_root)
            if not r.owner_alive() and (ckpt_id is None or r.id == ckpt_id)]
