"""Checkpoint and restore as named stages, each side effect journaled before it is made.

checkpoint (checkpoint.py): check -> lock -> isolate -> watchdog -> CRIU starts (RPC) ->
    [pre-dump] freeze -> [query-ext-files] scan, externals -> CRIU dumps -> [post-dump] ghost
    check -> relink -> snapshot -> unrelink -> CRIU answered -> commit -> (kill) -> thaw
restore (restore.py): lock -> validate -> make room -> swap volumes in -> reopen relinks
    -> CRIU restore -> finish (lineage, unlink relinks, seal rescue snapshots, cgroup)
delete (delete.py): a checkpoint's snapshots and directory, a rescue, or a copy
restore --beside (beside.py): validate -> clone snapshots -> CRIU restore in a mount
    namespace with the clones at the volumes' paths -> finish (unlink relinks, record copy)

What a run leaves when it dies anywhere is in its journal; `fscr gc` (gc.py) reads it.

The checkpoint stages are imported from their module (`from fscr.pipeline.checkpoint import
checkpoint`), not from here: a restore, whose start-up is its wall time, does without them.
"""

from typing import Any

from ..errors import require_root
from .common import Progress, quiet
from .delete import delete
from .restore import RestoreResult, finish_restore, restore


def __getattr__(name: str) -> Any:
    # restore --beside loads on use: it brings copies.py and its models, which every other
    # command (a plain restore above all, whose start-up is its wall time) does without.
    if name in ("finish_beside", "restore_beside"):
        from . import beside
        return getattr(beside, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Progress", "RestoreResult", "delete", "finish_beside", "finish_restore", "quiet",
           "require_root", "restore", "restore_beside"]
