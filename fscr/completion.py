"""Shell completion candidates (bash and zsh through click): checkpoint ids, rescue snapshots
and copies, workload names. Completion runs on every Tab, so it reads directories only (no
manifest validation, no journal) and never fails: a wrong guess is better than an error.

scripts/setup installs the shells' scripts (`_FSCR_COMPLETE=bash_source fscr`,
`_FSCR_COMPLETE=zsh_source fscr`); job files complete as files (click.Path).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .names import FSCR_GROUP, ID_PATTERN, is_copy, is_rescue

if TYPE_CHECKING:  # click loads its completion code only when a shell asks: so do we
    import click
    from click.shell_completion import CompletionItem

_NOT_NAMES = ("run_", "ckpt_", "copy_")  # cgroups fscr names itself, not a workload's


def _store(ctx: click.Context) -> Path:
    given = ctx.params.get("store") or os.environ.get("FSCR_STORE")
    return Path(given or "/var/lib/fscr")


def _ids(store: Path) -> list[str]:
    """Committed checkpoints, oldest first (ids start with their UTC time)."""
    try:
        return sorted(d.name for d in (store / "checkpoints").iterdir()
                      if (d / "manifest.json.sha256").exists())
    except OSError:
        return []


def _extras(store: Path) -> list[str]:
    """Rescue snapshots and copies: `fscr delete` takes them too."""
    out = []
    for sub, ok in (("rescues", is_rescue), ("copies", is_copy)):
        try:
            out += sorted(p.stem for p in (store / sub).glob("*.json") if ok(p.stem))
        except OSError:
            continue
    return out


def _matching(words: list[str], incomplete: str, help_: str) -> list[CompletionItem]:
    from click.shell_completion import CompletionItem
    return [CompletionItem(w, help=help_) for w in words if w.startswith(incomplete)]


def checkpoint_ids(ctx: click.Context, _param: click.Parameter,
                   incomplete: str) -> list[CompletionItem]:
    return _matching(_ids(_store(ctx)), incomplete, "checkpoint")


def deletable(ctx: click.Context, _param: click.Parameter,
              incomplete: str) -> list[CompletionItem]:
    store = _store(ctx)
    return (_matching(_ids(store), incomplete, "checkpoint")
            + _matching(_extras(store), incomplete, "rescue snapshot or copy"))


def workload_names(_ctx: click.Context, _param: click.Parameter,
                   incomplete: str) -> list[CompletionItem]:
    """Workloads started with `fscr run --name` that still run: their cgroups fscr/NAME."""
    from .process import freezer
    try:
        _, root = freezer.hierarchy()
        groups = list((root / FSCR_GROUP).iterdir())
    except Exception:  # noqa: BLE001 - no freezer, no permission: nothing to offer
        return []
    names = []
    for g in sorted(groups):
        if (g.is_dir() and not g.name.startswith(_NOT_NAMES)
                and re.fullmatch(ID_PATTERN, g.name) and _has_tasks(g)):
            names.append(g.name)
    return _matching(names, incomplete, "workload")


def _has_tasks(cgroup: Path) -> bool:
    try:
        return bool((cgroup / "cgroup.procs").read_text().strip())
    except OSError:
        return False
