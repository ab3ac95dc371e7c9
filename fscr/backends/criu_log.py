"""What CRIU's log says: the error that explains a failure (with a hint where fscr knows one),
and whether a dump finished. (The network lock's name: netlock.py, from the images.)

CRIU ends every failed run with generic lines ("Dumping FAILED.", "Dump mappings (pid: N)
failed with -1"), and on some machines logs harmless errors first; the line that explains is
the first error that is neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Logged on every run where root lacks CAP_SYS_RESOURCE (CRIU cannot raise its own fd
# limit) and harmless there: never the cause.
_NOISE = re.compile(r"rlimit: Can't setup RLIMIT_NOFILE for self")
# What CRIU says after the cause, whatever it was.
_SUMMARY = re.compile(r"Dumping FAILED|Restoring FAILED|failed with -?\d+\.?$|"
                      r"Pre-dumping FAILED|Unable to restore tasks")
# "(00.051002) Error (file:line): ..." at info level and above; restore logs at warning level
# carry no timestamp, and a restored task's lines start with its PID (" 14782: Error ...").
_ERROR = re.compile(r"^(?:\([0-9.]+\) )?(?:pie: )?(?:\d+: )?(Error \(.*)$")

HINTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"Can't get rlimit \d+: Operation not permitted"),
     "a task runs as another user and root here lacks CAP_SYS_RESOURCE, so CRIU cannot read "
     "its resource limits (fscr doctor); run the workload as root or where root has it"),
    # (CRIU calls a traced task in a frozen cgroup a "zombie found while seizing")
    (re.compile(r"Unseizable non-zombie|found while seizing|Unable to interrupt task"),
     "a task could not be stopped: another process traces it (a debugger, strace), or it "
     "sleeps uninterruptibly"),
    (re.compile(r"In-flight connection"),
     "a TCP connection still in its handshake; fscr passes --skip-in-flight, so please "
     "report this"),
    (re.compile(r"doesn't live in IPC ns"),
     "SysV shared memory of the host's IPC namespace cannot be checkpointed: give the "
     "workload an IPC namespace of its own"),
    (re.compile(r"has bad (size|mode)|Can't open file .* on restore"),
     "a file the tree had open outside the volumes changed or is missing (fscr doctor --for "
     "ID lists them)"),
    (re.compile(r"Can't fork for \d+|clone3?\(\) .*File exists|set_tid"),
     "a PID of the checkpoint is taken by another process here; workloads started with "
     "`fscr run --pidns` restore into a PID namespace of their own and never collide"),
    (re.compile(r"fsnotify: Unable to open|Can't open handle"),
     "an inotify or fanotify watch could not be reopened by its file handle"),
    (re.compile(r"Can't dump ghost file|ghost-limit"),
     "CRIU would copy an unlinked file into the image; fscr relinks those, so the tree "
     "changed while it was stopped: retry"),
]


@dataclass(frozen=True)
class Explained:
    cause: str  # CRIU's own words, without the timestamp
    hint: str | None  # what fscr knows of that cause


def _read(log: Path) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []


def explain(log: Path, stderr: str = "") -> Explained:
    """The first error of CRIU's log that explains its failure; else its last error line, or
    its stderr. Never empty."""
    errors = [m.group(1) for ln in _read(log) if (m := _ERROR.match(ln.strip()))]
    causes = [e for e in errors if explains(e)]
    if causes:
        cause = causes[0]
    elif errors:
        cause = errors[-1]
    else:
        cause = (stderr.strip().splitlines() or ["CRIU gave no message"])[-1]
    hint = next((h for pattern, h in HINTS if pattern.search(cause)), None)
    return Explained(cause, hint)


def explains(error: str) -> bool:
    """Whether one of CRIU's error messages can be a cause (not noise, not a summary)."""
    return not _NOISE.search(error) and not _SUMMARY.search(error)


def mentions(log: Path, text: str) -> bool:
    return any(text in ln for ln in _read(log))


def dump_finished(log: Path) -> bool:
    """CRIU logs this last, once every image is written."""
    return mentions(log, "Dumping finished successfully")
