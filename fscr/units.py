"""Numbers as a person reads them: sizes, rates, durations, ages. Exact numbers stay in
--json; these are for text only."""

from __future__ import annotations

from datetime import UTC, datetime


def size(n: int | float | None) -> str:
    """Binary units, as btrfs, restic and borg print them: 6.8 MiB."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def rate(n: float, seconds: float) -> str:
    return f"{size(n / seconds)}/s" if seconds > 0 else "-"


def duration(seconds: float) -> str:
    """42.0 ms, 12.3 s, 4:05, 1:02:03: precise when short, a clock when long."""
    if seconds < 60:
        return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"
    s = int(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02}:{rest % 60:02}" if h else f"{rest // 60}:{rest % 60:02}"


def ago(when: str | datetime, now: datetime | None = None) -> str:
    """How long ago an ISO time was, in the largest whole unit: "3 h ago", "2 d ago"."""
    t = datetime.fromisoformat(when) if isinstance(when, str) else when
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    secs = int(((now or datetime.now(UTC)) - t).total_seconds())
    if secs < 0:
        return "in the future"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= length:
            return f"{secs // length} {unit} ago"
    return f"{secs} s ago"
