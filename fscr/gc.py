"""`fscr gc`: finish or undo the runs whose fscr died, from their journals.

Everything gc touches is named in a journal that a run wrote before making it, and carries that
run's checkpoint id (relinks unlink-at-restart-<id>-<n>, snapshots .fscr-snapshots/<id>/<n>,
cgroup fscr/ckpt_<id>, the store's checkpoints/<id>): so gc can prove a thing is its own. A run
whose owner (PID and start time) still lives is left alone, and gc takes the same locks as a
run, so it never races one; a committed checkpoint is never removed, nor a rescue snapshot of
a restore that completed.

What gc observes (Facts: which cgroups are frozen, which relinks and snapshots are left, which
CRIU and killed tasks live, what is committed) is kept apart from what it decides (the plan_*
functions): those read only the journal and the facts, so tests/test_gc_plan.py checks them by
table without root. Whether a run's owner lives is observed before, by journal.unfinished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import failures, lazy, locks, netlock, origins, pipeline, records, relink, snapshot
from .backends import criu_log
from .errors import Busy, FscrError
from .journal import Run, unfinished
from .locks import restore_lock, volume_lock, workload_lock
from .manifest import Manifest
from .names import copy_cgroup, is_copy
from .pipeline import finish_restore, trust
from .process import freezer
from .process.freezer import Cgroup
from .process.target import put_back
from .process.tree import Task, settle
from .store import Store

CHECKPOINT_GRACE = 10.0  # seconds a dead run's CRIU may take before gc kills it
RESTORE_GRACE = 30.0


@dataclass
class Plan:
    """What gc will do for one run: descriptions and the steps that do them."""

    run: Run
    steps: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    then: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)  # after unlocking

    def add(self, what: str, do: Callable[[], Any]) -> None:
        self.steps.append((what, do))


class Facts(Protocol):
    """What gc observes of this machine, asked by the planners; `Machine` asks the machine."""

    def provider(self, kind: str) -> snapshot.Provider: ...
    def alive(self, task: Task) -> bool: ...
    def cgroup(self, rel: str) -> Cgroup: ...  # by its path as /proc/PID/cgroup shows it
    def cgroup_exists(self, cg: Cgroup) -> bool: ...
    def frozen(self, cg: Cgroup) -> bool: ...  # exists and is frozen
    def relinks(self, volume: Path, ckpt_id: str) -> list[str]: ...
    def committed(self, ckpt_id: str) -> bool: ...
    def has_dir(self, ckpt_id: str) -> bool: ...  # the store's checkpoints/<id>
    def manifest(self, ckpt_id: str) -> Manifest | None: ...  # None: unreadable or gone
    def draft(self, run: Run) -> Manifest | None: ...
    def dump_finished(self, ckpt_id: str) -> bool: ...  # CRIU's dump log says so
    def snapshot_found(self, kind: str, volume: Path, ckpt_id: str, n: int) -> str | None: ...
    def snapshot_left(self, kind: str, path: str) -> bool: ...  # it, or its directory
    def restored_root(self, run: Run, cgroup: str) -> int | None: ...
    def pages_corrupt(self, run: Run, m: Manifest) -> bool: ...
    def swapped(self, kind: str, volume: Path, copy: snapshot.Copy) -> bool: ...
    def leftover(self, kind: str, volume: Path, rescue: str) -> bool: ...


@dataclass
class Machine:
    """The facts as this machine shows them now."""

    store: Store
    providers: dict[str, snapshot.Provider] = field(default_factory=dict)

    def provider(self, kind: str) -> snapshot.Provider:
        # loaded when first needed: btrfs needs libbtrfsutil, LVM its tools
        if kind not in self.providers:
            self.providers[kind] = snapshot.get(kind)
        return self.providers[kind]

    def alive(self, task: Task) -> bool:
        return task.alive()

    def cgroup(self, rel: str) -> Cgroup:
        return freezer.at(rel)

    def cgroup_exists(self, cg: Cgroup) -> bool:
        return cg.exists()

    def frozen(self, cg: Cgroup) -> bool:
        return cg.exists() and cg.frozen()

    def relinks(self, volume: Path, ckpt_id: str) -> list[str]:
        return relink.list_relinks(volume, ckpt_id)

    def committed(self, ckpt_id: str) -> bool:
        return self.store.committed(ckpt_id)

    def has_dir(self, ckpt_id: str) -> bool:
        return self.store.exists(ckpt_id)

    def manifest(self, ckpt_id: str) -> Manifest | None:
        try:
            return self.store.load(ckpt_id)
        except FscrError:
            return None  # deleted since, or unreadable

    def draft(self, run: Run) -> Manifest | None:
        return _draft(self.store, run)

    def dump_finished(self, ckpt_id: str) -> bool:
        return criu_log.dump_finished(self.store.dir(ckpt_id) / "criu-dump.log")

    def snapshot_found(self, kind: str, volume: Path, ckpt_id: str, n: int) -> str | None:
        return self.provider(kind).find(volume, ckpt_id, n)

    def snapshot_left(self, kind: str, path: str) -> bool:
        return self.provider(kind).exists(path) or Path(path).parent.exists()

    def restored_root(self, run: Run, cgroup: str) -> int | None:
        return _restored_root(self.store, run, cgroup)

    def pages_corrupt(self, run: Run, m: Manifest) -> bool:
        return _pages_corrupt(self.store, run, m)

    def swapped(self, kind: str, volume: Path, copy: snapshot.Copy) -> bool:
        return self.provider(kind).swapped(volume, copy)

    def leftover(self, kind: str, volume: Path, rescue: str) -> bool:
        return self.provider(kind).leftover(volume, rescue)


def _criu(run: Run, facts: Facts) -> list[Task]:
    """CRIU, which gc lets finish (and kills after a grace time). Not the lazy-pages daemon
    of a lazy restore: while its tree runs it is never killed (the pages it has not copied
    yet would read as zeroes) and it exits on its own once every page is in; it is stopped
    only when no tree runs on it (plan_restore)."""
    return [t for e in run.events("criu") if facts.alive(t := Task(e.pid, e.starttime))]


def _lazy_daemons(run: Run, facts: Facts) -> list[Task]:
    return [t for e in run.events("lazy") if facts.alive(t := Task(e.pid, e.starttime))]


def _thaw_steps(plan: Plan, facts: Facts) -> None:
    for e in plan.run.events("freeze"):
        cg = Cgroup(e.kind, Path(e.cgroup))
        if facts.frozen(cg):
            plan.add(f"thaw cgroup {cg.path}", cg.thaw)
    moves = plan.run.events("move")
    if moves:
        own = Cgroup(moves[0].kind, Path(moves[0].cgroup))
        moved = {e.pid: e.original for e in moves}
        if facts.cgroup_exists(own):
            plan.add(f"put the tasks in {own.path} back in their cgroups, remove it",
                     lambda: put_back(moved, own))


def _relink_steps(plan: Plan, facts: Facts) -> None:
    for vol in plan.run.begin.volumes:
        names = facts.relinks(Path(vol), plan.run.id)
        if names:
            plan.add(f"remove {len(names)} relink(s) unlink-at-restart-{plan.run.id}-* "
                     f"from {vol}", lambda v=vol: relink.remove_relinks(Path(v), plan.run.id))


def _draft(store: Store, run: Run) -> Manifest | None:
    """The manifest a --tcp established run journaled at CRIU's post-dump (CRIU kills the
    tree once answered), with the network lock of the dump's run id."""
    drafts = run.events("draft")
    if not drafts or not store.images(run.id).exists():
        return None
    m = Manifest.from_bytes(json.dumps(drafts[-1].manifest).encode(), f"draft {run.id}")
    return records.replace(m, netlock=netlock.of_images(store.images(run.id)))


def _commit_draft(store: Store, m: Manifest) -> None:
    images = store.image_records(m.id)
    m = records.replace(m, images=images, image_bytes=sum(i.size for i in images))
    origins.made_here(store.root, m)
    store.commit(m)


def plan_checkpoint(store: Store, run: Run, facts: Facts) -> Plan:
    plan = Plan(run)
    _thaw_steps(plan, facts)  # first: a frozen workload is thawed at once
    _relink_steps(plan, facts)
    draft = None if facts.committed(run.id) else facts.draft(run)
    if draft is not None and facts.dump_finished(run.id):
        plan.add("commit the checkpoint: CRIU finished its dump and killed the tree, so the "
                 "image is all that is left of it", lambda: _commit_draft(store, draft))
        return plan
    if draft is not None and draft.netlock is not None:
        plan.add(f"remove network lock {draft.netlock}",
                 lambda: netlock.release(draft.netlock, lambda: trust.netns_path(store.root,
                                                                                 draft)))
    if not facts.committed(run.id):
        kind = _kind(run)
        made = [facts.snapshot_found(kind, Path(e.volume), run.id, e.n)
                for e in run.events("snapshot")]
        _unfinished_steps(plan, store, facts, [s for s in made if s is not None])
    return plan


def _kind(run: Run) -> str:
    return run.begin.snapshot


def _unfinished_steps(plan: Plan, store: Store, facts: Facts, snapshots: list[str]) -> None:
    """Remove an uncommitted checkpoint: the snapshots its run made, then its directory."""
    kind = _kind(plan.run)
    for s in snapshots:  # steps ask for the provider when they run: planning needs none
        plan.add(f"delete half-made snapshot {s}", lambda s=s: facts.provider(kind).delete(s))
    if facts.has_dir(plan.run.id):
        plan.add(f"remove unfinished checkpoint directory {store.dir(plan.run.id)}",
                 lambda: store.remove(plan.run.id))


def _restored_root(store: Store, run: Run, cgroup: str) -> int | None:
    """The PID of the tree CRIU restored, if it did: journaled, or in CRIU's pidfile (written
    once the tree runs) and then only if that PID is in the checkpoint's cgroup."""
    for e in run.events("restored"):
        return e.pid
    pidfile = store.dir(run.id) / "restore.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        return pid if freezer.cgroup_of(pid).rel == cgroup else None
    except FscrError:
        return None


def plan_beside(store: Store, run: Run, facts: Facts) -> Plan:
    """A restore --beside: finish the copy if CRIU restored it, else remove what it made
    (clones and cgroup, each named after the copy)."""
    plan = Plan(run)
    name = run.begin.beside
    if not is_copy(name):
        raise FscrError(f"journal {run.path.name} names copy {name!r}, not one of fscr's")
    clones = {e.volume: Path(e.path) for e in run.events("clone")
              if Path(e.path).parent.name == name}
    cgroup = f"/{copy_cgroup(name)}"
    m = facts.manifest(run.id)
    root = facts.restored_root(run, cgroup) if m is not None else None
    if root is not None and m is not None:
        plan.add(f"finish copy {name} (PID {root}): unlink relinks in its clones, record it",
                 lambda: pipeline.finish_beside(store, m, name, clones))
        plan.add("remove CRIU's pidfile",
                 lambda: (store.dir(run.id) / "restore.pid").unlink(missing_ok=True))
        return plan
    for c in clones.values():
        if facts.snapshot_left(_kind(run), str(c)):
            plan.add(f"remove the unused clone {c}",
                     lambda c=c: facts.provider(_kind(run)).delete(str(c)))
    cg = facts.cgroup(cgroup)
    if facts.cgroup_exists(cg):
        plan.add(f"remove cgroup {cgroup}", cg.remove)
    return plan


def _restored_cgroup(run: Run, m: Manifest | None) -> origins.CgroupOf | None:
    """The cgroup the dead restore put the tree in, as it journaled it (fscr 0.1 journaled
    none: the manifest's, then)."""
    try:
        return records.convert(run.begin.cgroup, origins.CgroupOf)
    except records.Invalid:
        if m is None:
            return None
        return origins.CgroupOf(kind=m.cgroup.kind, path=m.cgroup.path,
                                original=m.cgroup.original)


def plan_restore(store: Store, run: Run, facts: Facts) -> Plan:
    if run.begin.beside:
        return plan_beside(store, run, facts)
    plan = Plan(run)
    m = facts.manifest(run.id)  # None: deleted since, only the swaps can be undone
    kind = _kind(run)
    swaps = run.events("swap")
    cgroup = _restored_cgroup(run, m)
    root = facts.restored_root(run, cgroup.path) if m and cgroup else None
    if root is not None and m is not None and facts.pages_corrupt(run, m):
        # A lazy restore died before it had verified the pages its tree runs on: a corrupt
        # image means the tree's memory is not the checkpoint's. Kill it; undo as below.
        plan.add(f"kill the restored tree of PID {root}: its page images are corrupt",
                 lambda r=root: lazy.kill_tree(r))
        root = None
    if root is None:  # no tree runs on them: the daemon serves nobody
        for d in _lazy_daemons(run, facts):
            plan.add(f"stop CRIU's lazy-pages daemon (PID {d.pid})", lambda d=d: lazy.stop(d))
    if root is not None and m is not None and cgroup is not None:
        rescues = [e.rescue for e in swaps]
        name = swaps[0].name if swaps else ""
        plan.add(f"finish the restore of PID {root}: unlink relinks, seal and list rescue "
                 "snapshots", lambda: finish_restore(store, m, facts.provider(kind), root, name,
                                                     rescues, cgroup))
        plan.add("remove CRIU's pidfile",
                 lambda: (store.dir(run.id) / "restore.pid").unlink(missing_ok=True))
        return plan
    killed = [Task(p, s) for e in run.events("kill") for p, s in e.tasks]
    if killed and m is not None and not any(facts.alive(t) for t in killed):
        # --replace had killed the old tree: undoing the swaps alone would leave the workload
        # down, so gc finishes what the user asked for, from a clean state.
        plan.then.append((f"restore checkpoint {run.id} again (its old tree was killed by "
                          "--replace before fscr died)",
                          lambda: pipeline.restore(
                              run.id, str(store.root), replace=True, force=True,
                              volumes_only=run.begin.volumes_only,
                              rollback=run.begin.rollback)))
    copies = {e.volume: e.made for e in run.events("copy")}
    for e in reversed(swaps):
        vol, rescue, copy = Path(e.volume), e.rescue, copies.get(e.volume)
        if copy is not None and facts.swapped(kind, vol, copy):
            what = f"put {vol} back as it was before the restore"
        elif copy is not None or facts.leftover(kind, vol, rescue):
            what = f"remove the restore's unused copy of {vol}"
        else:
            continue
        plan.add(what, lambda v=vol, r=rescue, c=copy: facts.provider(kind).undo(v, r, c))
    _relink_steps(plan, facts)
    return plan


def _pages_corrupt(store: Store, run: Run, m: Manifest) -> bool:
    if not run.begin.lazy or run.events("verified"):
        return False
    try:
        store.verify_images(m, which=lazy.is_page_image)
    except FscrError:
        return True
    return False


def plan_receive(store: Store, run: Run, facts: Facts) -> Plan:
    plan = Plan(run)
    if not facts.committed(run.id):
        made = [e.path for e in run.events("subvolume")]
        _unfinished_steps(plan, store, facts,
                          [p for p in made if facts.snapshot_left(_kind(run), p)])
    return plan


def plan(store: Store, run: Run, facts: Facts) -> Plan:
    planner = {"restore": plan_restore, "receive": plan_receive}.get(run.op, plan_checkpoint)
    return planner(store, run, facts)


def describe(store: Store, run: Run, facts: Facts) -> list[str]:
    """What gc would do for `run`, in order (`fscr gc --dry-run`)."""
    p = plan(store, run, facts)
    return ([f"wait for CRIU (PID {c.pid}), kill it after {_grace(run):.0f}s"
             for c in _criu(run, facts)] + [w for w, _ in p.steps]
            + [_forget(run)] + [w for w, _ in p.then])


def _grace(run: Run) -> float:
    """How long gc lets a dead run's CRIU finish before it kills it."""
    return RESTORE_GRACE if run.op == "restore" else CHECKPOINT_GRACE


def _forget(run: Run) -> str:
    return f"remove journal {run.path.name}"


def _lock_keys(run: Run) -> list[str]:
    keys = [volume_lock(Path(v)) for v in run.begin.volumes]
    if run.op == "restore":
        keys.append(restore_lock(run.id))
    for e in run.events("isolate"):
        keys.append(workload_lock(e.root, e.starttime))
    return keys


def collect(store: Store, dry_run: bool = False) -> list[dict[str, Any]]:
    """Finish or undo every unfinished run; with dry_run, only say what would be done.

    A dead run's CRIU may still be working: gc lets it finish (or kills it after a grace
    time) before it decides anything. A step that fails is reported, and the run's journal
    stays for the next gc; other runs go on.
    """
    report = []
    for run in unfinished(store.root):
        facts = Machine(store)  # fresh for each run: another run's steps changed the machine
        entry: dict[str, Any] = {"id": run.id, "op": run.op, "pid": run.begin.pid,
                                 "done": not dry_run, "actions": [], "errors": []}
        report.append(entry)
        if run.damaged is not None:  # gc undoes only what a journal it can read names
            entry["done"] = False
            entry["errors"].append(f"{run.damaged}: check what it names and remove it")
            continue
        if dry_run:
            try:
                entry["actions"] = describe(store, run, facts)
            except FscrError as e:  # one run's trouble does not stop gc for the others
                entry["errors"].append(f"cannot plan: {e}")
                continue
            except (KeyError, TypeError, ValueError) as e:  # an event lacks a key
                entry["errors"].append(f"journal {run.path.name} is damaged ({e!r})")
            continue
        p = None
        try:
            with locks.hold(_lock_keys(run), wait=0):
                for c in _criu(run, facts):
                    entry["actions"].append(f"waited for CRIU (PID {c.pid})")
                    settle(c, _grace(run))
                try:
                    p = plan(store, run, facts)
                except FscrError as e:  # the journal stays for the next gc
                    entry["errors"].append(f"cannot plan: {e}")
                    continue

                for what, do in p.steps:
                    try:
                        do()
                        entry["actions"].append(what)
                    except (OSError, FscrError) as e:
                        entry["errors"].append(f"{what}: {e}")
                if not entry["errors"]:  # else the journal stays: the next gc tries again
                    run.path.unlink(missing_ok=True)
                    entry["actions"].append(_forget(run))
        except Busy as e:
            entry["done"] = False
            entry["errors"].append(f"skipped, another run holds its lock: {e}")
        except (KeyError, TypeError, ValueError) as e:  # an event lacks a key, or a bad value
            entry["errors"].append(f"journal {run.path.name} is damaged ({e!r}): check what "
                                   "it names and remove it")
        if p is not None and not entry["errors"]:
            for what, do in p.then:  # these take the locks themselves
                try:
                    do()
                    entry["actions"].append(what)
                except (OSError, FscrError) as e:
                    entry["errors"].append(f"{what}: {e}")
    return report


def expire_failures(store: Store, dry_run: bool = False,
                    now: datetime | None = None) -> list[str]:
    """Remove the failed attempts kept longer than failures.KEEP_DAYS; says what it removed
    (or, with dry_run, would remove)."""
    out = []
    for d in failures.expired(store.root, now or datetime.now(UTC)):
        if not dry_run:
            failures.remove(d)
        out.append(f"remove failed attempt {d.name} (older than {failures.KEEP_DAYS} days)")
    return out
