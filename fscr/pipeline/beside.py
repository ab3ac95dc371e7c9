"""restore --beside: a copy of a checkpoint's tree, running beside its original.

The original keeps its volumes and its PIDs. The copy needs neither: it runs in the PID
namespace CRIU recreates (so only checkpoints of `fscr run --pidns` trees qualify), from
writable clones of the checkpoint's snapshots bind-mounted at the volumes' paths in a mount
namespace of its own (so it opens the same paths and sees its own files), in a cgroup of
its own. Everything it runs on carries its name, copy_<id>_<time>_<hex> (copies.py).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

from .. import backends, copies, locks, snapshot
from .. import journal as journal_mod
from ..errors import CriuFailed, Refused
from ..journal import Journal
from ..manifest import Manifest
from ..names import check_id, copy_cgroup, copy_path
from ..process import freezer
from ..relink import remove_relinks
from ..store import Store
from .common import Progress, Timings, quiet, verify_in_background
from .restore import RestoreResult, _Restore


def restore_beside(ckpt_id: str, store_dir: str | None = None,
                   progress: Progress = quiet) -> RestoreResult:
    """Restore a copy of checkpoint `ckpt_id` beside its original, which is left alone.

    On failure the copy's clones and cgroup are removed; if fscr dies, gc removes them (or,
    if CRIU had restored the copy, finishes it)."""
    store = Store.open(store_dir)
    m = store.load(check_id(ckpt_id))
    if m.backend != "criu":
        raise Refused(f"checkpoint {m.id} holds no processes to copy (--backend {m.backend})")
    if not m.pidns:
        raise Refused(f"checkpoint {m.id} is of a tree in the host's PID namespace: a copy "
                      "would need its PIDs, which the original holds. Start workloads with "
                      "`fscr run --pidns` to restore them beside themselves")
    provider = snapshot.get(m.snapshot)
    if not provider.clones:
        raise Refused(f"restore --beside runs the copy from clones of btrfs snapshots; this "
                      f"checkpoint's are {m.snapshot}")
    with locks.hold([locks.restore_lock(m.id)], progress):
        if journal_mod.unfinished(store.root, m.id):
            raise Refused(f"an earlier run of checkpoint {m.id} died unfinished; run `fscr "
                          "gc` first")
        return _beside(store, m, provider, Timings(progress=progress))


def _beside(store: Store, m: Manifest, provider: snapshot.Provider, t: Timings) -> RestoreResult:
    run = _Restore(store, m, t, provider, backends.get(m.backend))
    with run.t.stage("validate"):
        verified = verify_in_background(store, m, run.t.progress)
        try:
            run.check_sources(processes=True, replace=False)
        finally:
            verified()
    name = f"copy_{m.id}_{datetime.now(UTC):%Y%m%dT%H%M%SZ}_{secrets.token_hex(2)}"
    run.journal = Journal.begin(store.root, m.id, "restore", beside=name,
                                volumes=[], snapshot=m.snapshot)
    clones: dict[str, Path] = {}
    cg = freezer.at(copy_cgroup(name))
    try:
        with run.t.stage("clone"):
            for v in m.volumes:
                dest = copy_path(Path(v.path), name, v.n)
                run.journal.note("clone", volume=v.path, path=str(dest))
                provider.clone(v.snapshot or "", dest)
                clones[v.path] = dest
        run.journal.note("cgroup", path=cg.rel)
        freezer.ensure(cg.rel)
        with run.t.stage("restore"):
            pid = run.restore_processes(clones, cgroup=(cg.kind, cg.rel))
    except BaseException as e:
        for dest in clones.values():
            provider.delete(str(dest))
        cg.remove()
        run.journal.close()
        if isinstance(e, CriuFailed):
            raise run.keep_failure(e, beside=True) from None
        raise
    with run.t.stage("finish"):
        finish_beside(store, m, name, clones)
    run.journal.close()
    return RestoreResult(m.id, pid, [], run.t.seconds, copy=name)


def finish_beside(store: Store, m: Manifest, name: str, clones: dict[str, Path]) -> None:
    """The copy runs: its relinks leave its clones (it sees those files unlinked again) and
    it is recorded, so list shows it and delete removes it. Idempotent: gc reruns it."""
    for dest in clones.values():
        remove_relinks(dest, m.id)
    copies.add(store.root, copies.Copy(
        name=name, id=m.id, kind="btrfs", cgroup=f"/{copy_cgroup(name)}",
        volumes=[copies.CopyVolume(path=v, clone=str(c)) for v, c in clones.items()]))
