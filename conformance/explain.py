"""The explaining line of a failure: fscr's one-line error, CRIU's first error in its log, or
the test's own output."""

from __future__ import annotations

from pathlib import Path

from .bed import Done

# CRIU logs this as an error on every run here (no CAP_SYS_RESOURCE) and carries on.
BENIGN = ("Can't setup RLIMIT_NOFILE for self",)


def fscr_error(done: Done) -> str:
    """fscr's one-line error (`fscr: error: ...`), else its last line of stderr."""
    lines = [x for x in done.err.splitlines() if x.strip()]
    for line in lines:
        if line.startswith("fscr: error:"):
            return line
    return lines[-1] if lines else f"exit {done.rc}"


def criu_error(log: Path, done: Done | None) -> str:
    """CRIU's first explaining Error line of `log` (skipping BENIGN ones), else its stderr
    ("" without `done`)."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            if "Error" in line and not any(b in line for b in BENIGN):
                return line.strip()
    except FileNotFoundError:
        pass
    if done is None:
        return ""
    lines = [x for x in done.err.splitlines() if x.strip()]
    return lines[-1] if lines else f"criu exited {done.rc}"


def test_line(volume: Path, name: str) -> str:
    """The test's own explanation: its first FAIL line, else its first ERR line, else its last
    line (from NAME.out, else NAME.out.inprogress); "" when it wrote nothing."""
    for suffix in (".out", ".out.inprogress"):
        path = volume / f"{name}{suffix}"
        if path.is_file():
            lines = [x.strip() for x in path.read_text(errors="replace").splitlines()
                     if x.strip()]
            for mark in ("FAIL:", "ERR:"):
                hit = next((x for x in lines if mark in x), None)
                if hit:
                    return hit
            if lines:
                return lines[-1]
    return ""
