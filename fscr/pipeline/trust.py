"""What a restore may touch, decided from this host's own records (origins.py), never from a
manifest alone: which running tasks it may kill, which cgroup the restored tree goes to, which
network namespace it joins.

A checkpoint this host made has its record: its tree (and what restores brought back) may be
killed by --replace, in the cgroups it lived in. One it did not make (received, copied from a
backup disk, made by fscr 0.1) kills nothing, and its tree goes to its own cgroup under fscr's
group if that is free (`fscr/NAME` of `fscr run --name`), else to `fscr/restored_<id>`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import origins
from ..errors import FscrError, Refused
from ..manifest import Manifest
from ..names import FSCR_GROUP
from ..process import freezer, netns
from ..process.tree import Task, ancestors

# Names fscr gives its own passing cgroups: a received tree never lands in one of those.
_PASSING = ("ckpt_", "copy_", "restored_", "run_")


def _refuse_unsafe(m: Manifest, cg: origins.CgroupOf) -> origins.CgroupOf:
    """Even a record of this host never names the root cgroup, nor one that holds fscr or
    one of its ancestors: a record under a store is a file, and a restore into such a
    cgroup (or a --replace that kills what it holds) would reach far outside the tree."""
    mine = set()
    for pid in ancestors(os.getpid()):
        try:
            mine.add(freezer.cgroup_of(pid).rel)
        except FscrError:
            continue  # gone meanwhile, or in no freezer hierarchy
    for path in {cg.path, cg.original}:
        inside = [c for c in mine if c == path or c.startswith(path.rstrip("/") + "/")]
        if path.strip("/") == "" or inside:
            what = "the root cgroup" if path.strip("/") == "" else f"cgroup {path}, which " \
                   f"holds fscr or one of its ancestors ({inside[0]})"
            raise Refused(f"checkpoint {m.id}: this host's record names {what}: refusing to "
                          "restore into it or kill what it holds")
    return cg


def killable(store_root: Path, m: Manifest) -> tuple[list[Task], set[str]]:
    """The tasks of this boot that fscr recorded for the checkpoint's workload, and the
    cgroups they may be in; none for a checkpoint this host did not make."""
    rec = origins.of(store_root, m.id)
    if rec is None:
        return [], set()
    cg = _refuse_unsafe(m, rec.cgroup)
    tasks = [Task(p, s) for p, s in origins.live_tasks(store_root, rec)]
    return tasks, {cg.path, cg.original}


def cgroup_for(store_root: Path, m: Manifest) -> origins.CgroupOf:
    """Where the restored tree goes (path) and where it is moved afterwards (original)."""
    rec = origins.of(store_root, m.id)
    if rec is not None:
        return _refuse_unsafe(m, rec.cgroup)
    kind = freezer.hierarchy()[0]
    own = m.cgroup.original.strip("/").split("/")
    if len(own) == 2 and own[0] == FSCR_GROUP and not own[1].startswith(_PASSING):
        cg = freezer.at(m.cgroup.original)
        if cg.exists() and cg.populated():
            raise Refused(f"checkpoint {m.id} was not made here, and its cgroup "
                          f"{m.cgroup.original} holds other processes (PID "
                          f"{', '.join(map(str, cg.procs()[:5]))}): stop them first")
        return origins.CgroupOf(kind=kind, path=m.cgroup.original, original=m.cgroup.original)
    path = f"/{FSCR_GROUP}/restored_{m.id}"
    return origins.CgroupOf(kind=kind, path=path, original=path)


def placement(store_root: Path, m: Manifest) -> netns.Placement:
    """The network namespace to restore into. By a process holding it only if this host
    recorded the checkpoint in this boot (else the holder named may be anyone); by path only
    if the path is a network namespace."""
    n = m.netns
    holder = Task(n.holder.pid, n.holder.starttime) if n.holder else None
    if holder is not None:
        rec = origins.of(store_root, m.id)
        if rec is None or rec.boot != origins.boot_id():
            raise Refused(f"checkpoint {m.id} joined the network namespace of a process of "
                          "another machine or boot; bind-mount a namespace for it at "
                          "/run/netns/NAME and checkpoint it from there to move it")
    if n.path is not None and not netns.is_netns(n.path):
        raise Refused(f"{n.path}, the network namespace checkpoint {m.id} names, is not one "
                      "here: create it (ip netns add) with its interfaces before restoring")
    return netns.Placement(n.treatment, n.inode, n.path, holder)


def netns_path(store_root: Path, m: Manifest) -> str | None:
    """The nsfs path of the checkpoint's network namespace to join (None: the host's, or its
    own, which CRIU recreates)."""
    return netns.resolve(placement(store_root, m))
