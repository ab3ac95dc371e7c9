"""CRIU's network lock (--tcp established), in one place: how it is named, found and dropped.

CRIU dumps TCP connections in repair mode and, so their peers see nothing but silence until
the restore, blocks the tree's traffic with an nftables table of its own (`--network-lock
nftables`). The table is named "CRIU-" + the dump's run id, cut by CRIU's 32-byte buffer
("inet CRIU-%s", criu/netfilter.c) to the first 21 characters of the 36-character id. The
lock belongs to the checkpoint: `gc` keeps it; restore (CRIU unlocks) or `fscr delete` of
the checkpoint removes it, as does gc for a run that died before CRIU killed the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import FscrError
from .process.netns import run_in


def table_of(run_id: str) -> str:
    """CRIU's nftables lock table for run id `run_id` (or for a table name recorded whole by
    fscr 0.1, before it knew of the truncation)."""
    return f"CRIU-{run_id.removeprefix('CRIU-')[:21]}"


def of_images(images: Path) -> str | None:
    """The lock table of the dump whose images are in `images` (its run id is in
    inventory.img), None if CRIU wrote no inventory."""
    from .backends.criu_images import run_id

    rid = run_id(images)
    return table_of(rid) if rid else None


def drop(netns: str | None, table: str) -> bool:
    """Remove lock `table` (inet family) from network namespace `netns` (None: fscr's own);
    True if it was there."""
    listed = run_in(netns, ["nft", "list", "table", "inet", table])
    if listed.returncode != 0:
        return False
    out = run_in(netns, ["nft", "delete", "table", "inet", table])
    if out.returncode != 0:
        raise FscrError(f"cannot remove network lock {table}: {out.stderr.strip()}")
    return True


def release(table: str | None, netns: Callable[[], str | None]) -> list[str]:
    """Drop a checkpoint's lock `table`, if it recorded one, in the namespace `netns()`
    resolves to; gone with the namespace, or after a restore, it is already away. Returns
    what it removed."""
    if table is None:
        return []
    try:
        path = netns()
    except FscrError:
        return []  # the namespace, and its lock with it, is gone
    name = table_of(table)
    return [f"network lock {name}"] if drop(path, name) else []
