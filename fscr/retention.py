"""Retention: which checkpoints a policy keeps, and why. Pure: no I/O, the clock passed in.

The rules are restic's (internal/restic/snapshot_policy.go), which admins know from restic,
snapper and btrbk: `keep_last` keeps the N newest; each of hourly, daily, weekly, monthly and
yearly keeps the newest checkpoint of each of the N most recent buckets (hour, day, ISO week,
month, year) that hold one, counting from the newest. A checkpoint is kept if any rule keeps
it, and carries every reason that did. Buckets are taken in the time zone passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Annotated

from .records import Meta, Record

RULES: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


Count = Annotated[int, Meta(ge=0, le=100000)]


class Policy(Record):
    """Counts per rule; 0 turns a rule off. Also the [retention] table of a backup job, so it
    validates what a job file gives it (fscr prune --job: click checks the same range)."""

    keep_last: Count = 0
    hourly: Count = 0
    daily: Count = 0
    weekly: Count = 0
    monthly: Count = 0
    yearly: Count = 0

    def empty(self) -> bool:
        return not any((self.keep_last, self.hourly, self.daily, self.weekly, self.monthly,
                        self.yearly))


@dataclass
class Decision:
    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)


def apply_policy(checkpoints: list[tuple[str, datetime]], policy: Policy, tz: tzinfo,
                 now: datetime | None = None) -> Decision:
    """Split `checkpoints` (id, creation time) into kept (with reasons) and removed. An empty
    policy keeps everything (nothing is removed by accident). Checkpoints from the future of
    `now` (a clock set back) are kept, with that reason."""
    ordered = sorted(checkpoints, key=lambda c: (c[1], c[0]), reverse=True)
    reasons: dict[str, list[str]] = {cid: [] for cid, _ in ordered}
    if policy.empty():
        for cid, _ in ordered:
            reasons[cid].append("no retention policy")
    for i, (cid, when) in enumerate(ordered):
        if i < policy.keep_last:
            reasons[cid].append("last checkpoint")
        if now is not None and when > now:
            reasons[cid].append("newer than now")
    for rule, bucket_of in RULES.items():
        left, last = getattr(policy, rule), None
        for cid, when in ordered:
            if left <= 0:
                break
            bucket = bucket_of(when.astimezone(tz))
            if bucket != last:
                reasons[cid].append(f"{rule} checkpoint")
                last, left = bucket, left - 1
    d = Decision()
    for cid, _ in ordered:
        if reasons[cid]:
            d.keep.append(cid)
            d.reasons[cid] = reasons[cid]
        else:
            d.remove.append(cid)
    return d
