"""Failed attempts, kept for the user: when CRIU fails, its log and fscr's record of the run
stay under <store>/failed/<id>-<op>-<time>/ (root-only) for KEEP_DAYS, so the message can
name a log that exists. `fscr list --failed` lists them; `fscr gc` removes the expired.

<store>/failed/<name>/attempt.json   what was asked, what happened, CRIU's explaining error
<store>/failed/<name>/criu-*.log     CRIU's log of the run
<store>/failed/<name>/journal.jsonl  the run's journal: every step it took, in order
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from . import records
from .errors import CriuFailed
from .fsutil import write_atomic
from .names import ID_PATTERN
from .records import Id, Meta, Record

KEEP_DAYS = 7
NAME_PATTERN = rf"{ID_PATTERN}-(checkpoint|restore)-[0-9]{{8}}T[0-9]{{6}}Z(_[0-9]+)?"


Text = Annotated[str, Meta(max_length=8192)]


class Attempt(Record, kw_only=True):
    """attempt.json: read back by list and gc, so validated like every record fscr reads."""

    version: Literal[1] = 1
    id: Id
    op: Literal["checkpoint", "restore"]
    when: Annotated[datetime, Meta(tz=True)]
    error: Text  # the line fscr printed
    cause: Text  # CRIU's explaining error
    hint: Text | None
    request: dict[str, Any]  # what the user asked for, as fscr understood it


def _dir(store_root: Path) -> Path:
    d = store_root / "failed"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def keep(store_root: Path, ckpt_id: str, op: str, logs: list[Path], journal: Path | None,
         error: CriuFailed, request: dict[str, Any]) -> Path | None:
    """Move the run's logs (and a copy of its journal) under <store>/failed/, with the record
    of the attempt. Returns the directory, or None if even that failed (a full store): the
    failure is then reported as it was."""
    now = datetime.now(UTC)
    base = f"{ckpt_id}-{op}-{now:%Y%m%dT%H%M%SZ}"
    try:
        parent = _dir(store_root)
        for n in range(100):
            d = parent / (base if n == 0 else f"{base}_{n}")
            try:
                d.mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
        else:
            return None
        for log in logs:
            if log.is_file():
                os.replace(log, d / log.name)
        if journal is not None and journal.is_file():
            shutil.copyfile(journal, d / "journal.jsonl", follow_symlinks=False)
        rec = records.checked(Attempt(id=ckpt_id, op=op, when=now, error=str(error)[:8192],
                                      cause=error.cause[:8192],
                                      hint=error.hint[:8192] if error.hint else None,
                                      request=request))
        write_atomic(d / "attempt.json", records.encode(rec, indent=2) + b"\n")
        return d
    except (OSError, records.Invalid):
        return None


def listed(store_root: Path) -> list[dict[str, Any]]:
    """Every kept failure, oldest first: name, path, and its record (None if unreadable)."""
    parent = store_root / "failed"
    if not parent.is_dir():
        return []
    out = []
    for d in sorted(parent.iterdir()):
        if d.is_symlink() or not d.is_dir():
            continue
        rec = _read(d)
        out.append({"name": d.name, "path": str(d), "record": rec,
                    "logs": sorted(p.name for p in d.glob("criu-*.log"))})
    return sorted(out, key=lambda f: f["record"]["when"] if f["record"] else "")


def _read(d: Path) -> dict[str, Any] | None:
    try:
        rec = records.decode((d / "attempt.json").read_bytes(), Attempt)
    except (OSError, records.Invalid):
        return None
    return records.plain(rec)


def expired(store_root: Path, now: datetime) -> list[Path]:
    """Kept failures older than KEEP_DAYS (by their record, else by the directory's mtime);
    only directories whose name fscr gives are ever candidates."""
    out = []
    for f in listed(store_root):
        d = Path(f["path"])
        if not re.fullmatch(NAME_PATTERN, d.name):
            continue
        when = (datetime.fromisoformat(f["record"]["when"]) if f["record"]
                else datetime.fromtimestamp(d.stat().st_mtime, UTC))
        if now - when > timedelta(days=KEEP_DAYS):
            out.append(d)
    return out


def remove(d: Path) -> None:
    shutil.rmtree(d)


def as_json(request: dict[str, Any]) -> dict[str, Any]:
    """`request` with every value JSON can hold (paths and sets made plain)."""
    return json.loads(json.dumps(request, default=lambda v: sorted(v) if isinstance(
        v, set | frozenset) else str(v)))
