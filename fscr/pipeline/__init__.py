"""Checkpoint and restore as named stages, each side effect journaled before it is made.

checkpoint (checkpoint.py): check -> lock -> isolate -> watchdog -> freeze -> scan -> relink
    -> snapshot -> dump -> unrelink -> commit -> (kill) -> thaw
restore (restore.py): lock -> validate -> make room -> swap volumes in -> reopen relinks
    -> CRIU restore -> finish (lineage, unlink relinks, seal rescue snapshots, cgroup)

What a run leaves when it dies anywhere is in its journal; `fscr gc` (gc.py) reads it.
"""

from .checkpoint import CheckpointRequest, check, checkpoint
from .common import Progress, quiet, require_root, volume_lock, workload_lock
from .restore import RestoreResult, delete, finish_restore, restore

__all__ = ["CheckpointRequest", "Progress", "RestoreResult", "check", "checkpoint", "delete",
           "finish_restore", "quiet", "require_root", "restore", "volume_lock", "workload_lock"]
