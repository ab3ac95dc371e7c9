"""What to checkpoint: a --pid, --cgroup or --name resolved to a root task and the cgroup it
is frozen in, and the isolation of a tree that shares its cgroup with others."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BadTarget
from ..names import FSCR_GROUP, check_id, ckpt_cgroup
from . import freezer
from .freezer import Cgroup
from .tree import descendants, read_stat, refuse_unsafe_root


@dataclass(frozen=True)
class Target:
    pid: int | None = None
    cgroup: str | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.pid is not None:
            return f"PID {self.pid}"
        return f"cgroup {self.cgroup}" if self.cgroup else f"name {self.name}"


def name_cgroup(name: str) -> str:
    """The cgroup `fscr run --name NAME` starts its workload in."""
    return f"{FSCR_GROUP}/{check_id(name, 'name')}"


def _all_procs(cg: Cgroup) -> set[int]:
    out: set[int] = set()
    for procs in cg.path.rglob("cgroup.procs"):
        out.update(int(p) for p in procs.read_text().split())
    return out


def _root_of(pids: set[int], where: str) -> int:
    roots = [p for p in pids if (st := read_stat(p)) is not None and st.ppid not in pids]
    if not roots:
        raise BadTarget(f"{where} holds no process")
    if len(roots) > 1:
        raise BadTarget(f"{where} holds {len(roots)} separate trees (roots {sorted(roots)}); "
                        "checkpoint one tree at a time")
    return roots[0]


def resolve(target: Target) -> tuple[int, Cgroup | None]:
    """The root PID of the target tree, and its cgroup when the user named one."""
    if target.pid is not None:
        refuse_unsafe_root(target.pid)
        return target.pid, None
    if target.name is not None:
        cg = freezer.at(name_cgroup(target.name))
        if not cg.exists():
            raise BadTarget(f"no workload named {target.name} (no cgroup {cg.path})")
    else:
        cg = freezer.from_user_path(target.cgroup or "")
    root = _root_of(_all_procs(cg), f"cgroup {cg.path}")
    refuse_unsafe_root(root)
    return root, cg


def isolate(root: int, named: Cgroup | None, ckpt_id: str,
            note: Callable[..., None]) -> tuple[Cgroup, dict[int, str]]:
    """The cgroup to freeze, and {pid: original cgroup} for tasks fscr moved to get it.

    A tree alone in its cgroup (or a cgroup the user named) is frozen where it is. Otherwise the
    tree moves into fscr/ckpt_<id> for the window: forks land in their parent's cgroup, so
    moving until the tree is stable leaves no task behind. Each move is noted (journaled)
    before it is made.
    """
    if named is not None:
        return named, {}
    cg = freezer.cgroup_of(root)
    kind, hroot = freezer.hierarchy()
    tree = {t.pid for t in descendants(root)}
    if cg.path != hroot and _all_procs(cg) == tree:
        return cg, {}
    own = freezer.ensure(f"{FSCR_GROUP}/{ckpt_cgroup(ckpt_id)}")
    moved: dict[int, str] = {}
    try:
        for _ in range(20):
            pending = [t for t in descendants(root) if t.pid not in moved]
            if not pending:
                return own, moved
            for t in pending:
                try:
                    orig = freezer.cgroup_of(t.pid).rel
                except BadTarget:
                    continue  # exited since the scan
                note("move", pid=t.pid, cgroup=str(own.path), kind=own.kind, original=orig)
                moved[t.pid] = orig
                try:
                    own.add(t.pid)
                except ProcessLookupError:
                    moved.pop(t.pid)
        raise BadTarget(f"tree of PID {root} keeps forking; cannot isolate it for freezing")
    except BaseException:
        put_back(moved, own)
        raise


def put_back(moved: dict[int, str], own: Cgroup) -> None:
    """Return the tasks in `own` to the cgroups they were moved from (a child forked in the
    window follows its parent) and remove `own` once empty. Only tasks still in `own` are
    moved: a recorded PID that has since been reused elsewhere is left alone."""
    if not own.exists():
        return
    for pid in own.procs():
        rel = moved.get(pid)
        if rel is None:
            parent = read_stat(pid)
            rel = moved.get(parent.ppid) if parent else None
        if rel is None:
            continue
        try:
            freezer.at(rel).add(pid)
        except OSError:
            continue  # gone meanwhile, or its cgroup was removed
    own.remove()
