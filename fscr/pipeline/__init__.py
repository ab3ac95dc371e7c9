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
"""

from importlib import import_module
from typing import Any

from ..errors import require_root
from .common import Progress, quiet
from .delete import delete
from .restore import RestoreResult, finish_restore, restore

# Loaded on first use: a restore's start-up is its wall time, and it does without the
# checkpoint's modules (watchdog, scanners, relinking) and restore --beside's (copies.py).
_LATER = {"CheckpointRequest": "checkpoint", "check": "checkpoint", "checkpoint": "checkpoint",
          "finish_beside": "beside", "restore_beside": "beside"}


def __getattr__(name: str) -> Any:
    home = _LATER.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(f".{home}", __name__)
    # Importing .checkpoint binds the submodule to this package's `checkpoint`: the
    # function must take its place, as an eager `from .checkpoint import checkpoint` did.
    for n, h in _LATER.items():
        if h == home:
            globals()[n] = getattr(module, n)
    return globals()[name]


__all__ = ["CheckpointRequest", "Progress", "RestoreResult", "check", "checkpoint", "delete",
           "finish_beside", "finish_restore", "quiet", "require_root", "restore",
           "restore_beside"]
