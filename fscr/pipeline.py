"""Checkpoint and restore as named stages, side by side. Each side effect is journaled first.

checkpoint: check -> lock -> isolate -> watchdog -> freeze -> scan -> relink -> snapshot
            -> dump -> unrelink -> commit -> (kill) -> thaw
restore:    lock -> validate -> make room -> swap volumes in -> reopen relinks -> CRIU restore
            -> finish (lineage, unlink relinks, seal rescue snapshots, cgroup)

What a run leaves when it dies anywhere is in its journal; `fscr gc` (gc.py) reads it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import backends, locks, relink, snapshot
from . import journal as journal_mod
from .backends import DumpRequest, RestoreRequest
from .errors import (
    BadManifest,
    FreezeTimeout,
    FscrError,
    NoSuchCheckpoint,
    NotRoot,
    Refused,
    RestoreRolledBack,
    TreeStillRunning,
)
from .fsutil import sha256_file, syncfs
from .journal import Journal
from .manifest import (
    SCHEMA_VERSION,
    CgroupRecord,
    ImageFile,
    Manifest,
    Relink,
    TaskRecord,
    VolumeRecord,
)
from .names import check_id, is_rescue, relink_name, rescue_path
from .process import freezer
from .process.files import OpenFile, holders, open_files
from .process.freezer import Cgroup
from .process.target import Target, isolate, put_back, resolve
from .process.tree import Task, descendants, read_stat, task_of
from .store import Store
from .watchdog import Watchdog

Progress = Callable[[str], None]


def quiet(stage: str) -> None:
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("fscr must run as root (it freezes cgroups and runs CRIU)")


def new_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "_" + secrets.token_hex(2)


def volume_lock(path: Path) -> str:
    return f"volume {os.path.realpath(path)}"


def workload_lock(root: Task) -> str:
    return f"workload PID {root.pid} (start {root.starttime})"


@dataclass
class Timings:
    """Durations of the named stages, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)
    progress: Progress = quiet

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 6)


def _noting_pid(journal: Journal) -> Callable[[int], None]:
    """A callback that journals a started CRIU's identity, so gc and the watchdog find it."""
    def started(pid: int) -> None:
        st = read_stat(pid)
        journal.note("criu", pid=pid, starttime=st.starttime if st else 0)
    return started


# ---------------------------------------------------------------------------- checkpoint

@dataclass(frozen=True)
class CheckpointRequest:
    target: Target
    volumes: list[str]
    snapshot: str = "btrfs"
    backend: str = "criu"
    kill: bool = False
    id: str | None = None
    store: str | None = None
    max_freeze: float = 30.0


def checkpoint(req: CheckpointRequest, progress: Progress = quiet) -> Manifest:
    """Checkpoint the target tree and its volumes at one frozen instant.

    On failure the tree is thawed and back in its cgroup, relinks are gone from the volumes,
    and this run's snapshots and checkpoint directory are removed. If fscr itself dies, the
    watchdog thaws the tree and `fscr gc` removes the rest.
    """
    require_root()
    store = Store.open(req.store)
    ckpt_id = check_id(req.id) if req.id else new_id()
    provider = snapshot.get(req.snapshot)
    backend = backends.get(req.backend)
    if req.kill and not backend.writes_image:
        raise Refused("--kill with --backend freeze-only would lose the processes: refused")
    # realpath: a manifest holds clean absolute paths, and the snapshots go beside the real
    # directory, not beside a symlink to it.
    volumes = list(dict.fromkeys(Path(os.path.realpath(v)) for v in req.volumes))
    for vol in volumes:
        provider.check(vol)
    backend.check()
    root, named = resolve(req.target)
    keys = [volume_lock(v) for v in volumes] + [workload_lock(task_of(root))]
    with locks.hold(keys, progress):
        run = _Checkpoint(req, store, ckpt_id, provider, backend, volumes, root,
                          Timings(progress=progress))
        return run.execute(named)


@dataclass
class _Checkpoint:
    req: CheckpointRequest
    store: Store
    id: str
    provider: snapshot.Provider
    backend: backends.Backend
    volumes: list[Path]
    root: int
    t: Timings
    snaps: list[str] = field(default_factory=list)
    committed: bool = False

    def execute(self, named: Cgroup | None) -> Manifest:
        self.journal = Journal.begin(self.store.root, self.id, "checkpoint",
                                     volumes=[str(v) for v in self.volumes],
                                     snapshot=self.provider.name)
        try:
            self.store.reserve(self.id)
        except BaseException:
            self.journal.close()
            raise
        try:
            for vol in self.volumes:
                syncfs(vol)  # so the snapshot does not flush dirty data in the frozen window
            with self.t.stage("isolate"):
                root = task_of(self.root)
                self.journal.note("isolate", root=root.pid, starttime=root.starttime)
                cg, moved = isolate(self.root, named, self.id, self.journal.note)
            try:
                m = self.frozen_window(cg, moved)
            finally:
                if moved:
                    put_back(moved, cg)
        except BaseException:
            if not self.committed:  # after a --kill commit the checkpoint is all that's left
                for s in self.snaps:
                    self.provider.delete(s)
                self.store.remove(self.id)
            self.journal.close()
            raise
        self.journal.close()
        return m

    def frozen_window(self, cg: Cgroup, moved: dict[int, str]) -> Manifest:
        dog = Watchdog.start(cg, self.journal.path, self.req.max_freeze)
        self.journal.note("freeze", cgroup=str(cg.path), kind=cg.kind)
        t0 = time.monotonic()
        m = None
        try:
            cg.freeze()
            tasks, relinks = self.capture(cg, dog)
            if self.req.kill:
                # Commit while the tree is still frozen, then kill it: a run that dies before
                # the commit leaves the tree running (the watchdog or gc thaws it).
                m = self.commit(tasks, cg, moved, relinks, time.monotonic() - t0)
                self.journal.note("kill", pids=[x.pid for x in tasks])
                for x in tasks:
                    os.kill(x.pid, signal.SIGKILL)  # delivered once thawed
        finally:
            try:
                cg.thaw()  # an undo: made first, noted after (a full store must not stop it)
                window = time.monotonic() - t0
            finally:
                why = dog.stop()
            with contextlib.suppress(OSError):
                self.journal.note("thawed", cgroup=str(cg.path))
        if m is not None:
            return m
        if why is not None:
            raise FreezeTimeout(f"checkpoint aborted: {why}; the tree was thawed")
        return self.commit(tasks, cg, moved, relinks, window)

    def capture(self, cg: Cgroup, dog: Watchdog) -> tuple[list[Task], list[Relink]]:
        """Everything done while frozen: scan, relink, snapshot, dump, unrelink."""
        with self.t.stage("scan"):
            tasks = descendants(self.root)  # again: it may have changed before the freeze
            unlinked = self.unlinked_files(tasks)
        try:
            relinks = self.relink(unlinked)
            self.check(dog)
            with self.t.stage("snapshot"):
                for n, vol in enumerate(self.volumes):
                    self.journal.note("snapshot", volume=str(vol), n=n)
                    self.snaps.append(self.provider.create(vol, self.id, n))
            self.check(dog)
            self.dump(cg, list(unlinked))
        finally:
            with self.t.stage("unrelink"):
                for vol in self.volumes:
                    relink.remove_relinks(vol, self.id)
        self.check(dog)
        return tasks, relinks

    def commit(self, tasks: list[Task], cg: Cgroup, moved: dict[int, str],
               relinks: list[Relink], window: float) -> Manifest:
        m = self.manifest(tasks, cg, moved, relinks, window)
        self.journal.note("commit")
        self.store.commit(m)
        self.committed = True
        return m

    def check(self, dog: Watchdog) -> None:
        why = dog.fired()
        if why is not None:
            raise FreezeTimeout(f"checkpoint aborted: {why}; the tree was thawed")

    def unlinked_files(self, tasks: list[Task]) -> dict[str, OpenFile]:
        """Unlinked-but-open files on the volumes, one per inode (CRIU's external key)."""
        devs = {os.stat(v).st_dev for v in self.volumes}
        unlinked: dict[str, OpenFile] = {}
        for task in tasks:
            for f in open_files(task.pid):
                if f.deleted and f.dev in devs:
                    unlinked.setdefault(f.external_key, f)
        if unlinked and self.provider.name == "none":
            raise Refused(
                f"the tree holds {len(unlinked)} unlinked-but-open file(s) on the volumes "
                "and --snapshot none has nothing to keep their data: use --snapshot btrfs")
        return unlinked

    def relink(self, unlinked: dict[str, OpenFile]) -> list[Relink]:
        devs = {os.stat(v).st_dev: v for v in self.volumes}
        out = []
        with self.t.stage("relink"):
            for n, f in enumerate(unlinked.values()):
                vol = devs[f.dev]
                self.journal.note("relink", volume=str(vol), name=relink_name(self.id, n))
                out.append(relink.relink(f, vol, self.id, n))
        return out

    def dump(self, cg: Cgroup, externals: list[str]) -> None:
        with self.t.stage("dump"):
            self.journal.note("dump", images=str(self.store.images(self.id)))
            self.backend.dump(DumpRequest(
                root_pid=self.root, images=self.store.images(self.id),
                log=self.store.dir(self.id) / "criu-dump.log", freeze_cgroup=cg.path,
                externals=externals, leave_running=True), _noting_pid(self.journal))
            self.journal.note("dumped")

    def manifest(self, tasks: list[Task], cg: Cgroup, moved: dict[int, str],
                 relinks: list[Relink], window: float) -> Manifest:
        self.t.seconds["freeze_window"] = round(window, 6)
        lineage = self.store.lineage_of((self.root, tasks[0].starttime))
        images = [ImageFile(name=p.name, size=p.stat().st_size, sha256=sha256_file(p))
                  for p in sorted(self.store.images(self.id).iterdir())]
        return Manifest(
            schema_version=SCHEMA_VERSION,
            id=self.id,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            hostname=socket.gethostname(),
            backend=self.backend.name,
            snapshot=self.provider.name,
            mode="kill" if self.req.kill else "leave-running",
            root=TaskRecord(pid=self.root, starttime=tasks[0].starttime),
            lineage=TaskRecord(pid=lineage[0], starttime=lineage[1]),
            tasks=[TaskRecord(pid=x.pid, starttime=x.starttime) for x in tasks],
            cgroup=CgroupRecord(kind=cg.kind, path=cg.rel,
                                original=moved.get(self.root, cg.rel)),
            volumes=[VolumeRecord(n=n, path=str(v), snapshot=s)
                     for n, (v, s) in enumerate(zip(self.volumes, self.snaps, strict=True))],
            relinks=relinks,
            images=images,
            image_bytes=sum(i.size for i in images),
            durations=dict(self.t.seconds),
        )


# ------------------------------------------------------------------------------- restore

@dataclass(frozen=True)
class RestoreResult:
    id: str
    pid: int | None
    rescues: list[str]
    durations: dict[str, float]


def restore(ckpt_id: str, store_dir: str | None = None, replace: bool = False,
            force: bool = False, volumes_only: bool = False,
            progress: Progress = quiet) -> RestoreResult:
    """Put the volumes back as they were at the checkpoint and restore the tree.

    Every check runs before anything is killed or swapped. If anything fails after the swap,
    the volumes are swapped back (their restored copies removed); if that fails too, or fscr
    dies, the journal lets `fscr gc` finish the job.
    """
    require_root()
    store = Store.open(store_dir)
    m = store.load(check_id(ckpt_id))
    with locks.hold([volume_lock(Path(v.path)) for v in m.volumes], progress):
        dead = journal_mod.unfinished(store.root, m.id)
        if dead:
            raise Refused(f"an earlier {dead[0].op} of checkpoint {m.id} died unfinished; "
                          "run `fscr gc` first")
        run = _Restore(store, m, Timings(progress=progress), snapshot.get(m.snapshot),
                       backends.get(m.backend))
        return run.execute(replace, force, volumes_only)


@dataclass
class _Restore:
    store: Store
    m: Manifest
    t: Timings
    provider: snapshot.Provider
    backend: backends.Backend

    def execute(self, replace: bool, force: bool, volumes_only: bool) -> RestoreResult:
        processes = self.backend.writes_image and not volumes_only
        with self.t.stage("validate"):
            live = self.validate(processes, replace, force)
            rescue = f"rescue_{self.m.id}_{datetime.now(UTC):%Y%m%dT%H%M%SZ}_{secrets.token_hex(2)}"
        self.journal = Journal.begin(self.store.root, self.m.id, "restore",
                                     volumes=[v.path for v in self.m.volumes])
        swapped: list[tuple[Path, Path]] = []
        pid = None
        try:
            if processes:
                with self.t.stage("make room"):
                    self.make_room(live)
                freezer.ensure(self.m.cgroup.path)  # restored tasks land there: thawed
            with self.t.stage("swap"):
                self.swap_in(rescue, swapped)
            if processes:
                with self.t.stage("restore"):
                    pid = self.restore_processes()
        except BaseException as e:
            for vol, r in reversed(swapped):  # if this fails, the journal stays for gc
                self.provider.swap_back(vol, r)
            self.journal.close()
            if isinstance(e, FscrError) and swapped:
                killed = " (the old tree was killed by --replace)" if live else ""
                raise RestoreRolledBack(
                    f"{e}; the volumes were put back as they were{killed}") from None
            raise
        # The tree runs: from here on nothing is undone. A failure leaves the journal, and
        # gc completes these steps.
        with self.t.stage("finish"):
            self.finish(pid, [r for _, r in swapped])
        self.journal.close()
        return RestoreResult(self.m.id, pid, [str(r) for _, r in swapped], self.t.seconds)

    def validate(self, processes: bool, replace: bool, force: bool) -> list[Task]:
        """Every check, before anything is killed or swapped. Returns the live tree."""
        m = self.m
        self.store.verify_images(m)
        if processes:
            self.backend.check()
        for v in m.volumes:
            self.provider.check(Path(v.path))
            if v.snapshot is not None and not Path(v.snapshot).is_dir():
                raise BadManifest(f"checkpoint {m.id}: snapshot {v.snapshot} is missing")
        by_volume = {v.path: v for v in m.volumes}
        for r in m.relinks:
            snap = by_volume[r.volume].snapshot
            if snap is not None and not relink.present(Path(snap), r.name):
                raise BadManifest(f"checkpoint {m.id}: relinked file {r.name} is missing "
                                  f"from snapshot {snap}")
        live = self.live_tree()
        if processes and live and not replace:
            pids = ", ".join(str(x.pid) for x in live)
            raise TreeStillRunning(f"checkpoint {m.id}: its tree still runs (PID {pids}); "
                                   "use --replace to kill it first")
        if processes:
            mine = {x.pid for x in live}
            taken = [x.pid for x in m.tasks if x.pid not in mine
                     and (st := read_stat(x.pid)) is not None and st.state not in "ZX"]
            if taken:
                raise TreeStillRunning(f"PIDs {taken} of checkpoint {m.id} belong to other "
                                       "processes; CRIU restores the original PIDs")
        devs = {os.stat(v.path).st_dev for v in m.volumes}
        spared = {x.pid for x in live} if (replace and processes) else set()
        others = holders(devs, exclude=spared)
        if others and not force and self.provider.name != "none":
            raise Refused(f"processes outside the checkpoint hold files on its volumes "
                          f"(PID {', '.join(map(str, sorted(others)))}); stop them or use --force")
        return live

    def live_tree(self) -> list[Task]:
        """The checkpoint's tree if it runs: its tasks or those a restore brought back (the
        lineage), each checked to be in the checkpoint's cgroup before --replace may kill it."""
        m = self.m
        known = [Task(x.pid, x.starttime) for x in m.tasks]
        known += [Task(p, s) for p, s in self.store.incarnations(
            (m.lineage.pid, m.lineage.starttime))]
        live = list(dict.fromkeys(t for t in known if t.alive()))
        allowed = {m.cgroup.path, m.cgroup.original}
        for t in live:
            try:
                where = freezer.cgroup_of(t.pid).rel
            except FscrError:
                continue
            if where not in allowed:
                raise Refused(f"PID {t.pid} matches checkpoint {m.id} but lives in cgroup "
                              f"{where}, not {m.cgroup.original}; refusing to touch it")
        return live

    def make_room(self, live: list[Task]) -> None:
        """Kill the still-running tree (--replace) and wait until every PID of the image is
        free: CRIU restores the original PIDs."""
        self.journal.note("kill", pids=[x.pid for x in live])
        for x in live:
            if x.alive():
                try:
                    os.kill(x.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        while busy := [x.pid for x in self.m.tasks if read_stat(x.pid) is not None]:
            if time.monotonic() > deadline:
                raise TreeStillRunning(f"PIDs {busy} of checkpoint {self.m.id} are still in "
                                       "use; CRIU needs them free to restore")
            time.sleep(0.05)

    def swap_in(self, rescue: str, swapped: list[tuple[Path, Path]]) -> None:
        for v in self.m.volumes:
            if v.snapshot is None:
                continue
            vol, dest = Path(v.path), rescue_path(Path(v.path), rescue, v.n)
            self.journal.note("swap", volume=v.path, snapshot=v.snapshot, rescue=str(dest))
            self.provider.swap_in(
                v.snapshot, vol, dest,
                lambda copy, v=v: self.journal.note("copy", volume=v.path, copy=copy))
            swapped.append((vol, dest))

    def restore_processes(self) -> int:
        fds: list[tuple[int, str]] = []
        pidfile = self.store.dir(self.m.id) / "restore.pid"
        try:
            for r in self.m.relinks:
                fds.append((relink.reopen(r, Path(r.volume)), r.key))
            pid = self.backend.restore(RestoreRequest(
                images=self.store.images(self.m.id),
                log=self.store.dir(self.m.id) / "criu-restore.log", pidfile=pidfile,
                inherit=fds), _noting_pid(self.journal))
        finally:
            for fd, _ in fds:
                os.close(fd)
        self.journal.note("restored", pid=pid)
        pidfile.unlink(missing_ok=True)
        return pid

    def finish(self, pid: int | None, rescues: list[Path]) -> None:
        finish_restore(self.store, self.m, self.provider, pid, rescues)


def finish_restore(store: Store, m: Manifest, provider: snapshot.Provider, pid: int | None,
                   rescues: list[Path]) -> None:
    """The restored tree runs: remember it (lineage), unlink the relinks (the tasks see those
    files unlinked again), seal and record the rescue snapshots, and move the tree back to
    its own cgroup if fscr moved it for the checkpoint. Idempotent: gc reruns it."""
    if pid is not None:
        try:
            tasks = descendants(pid)
        except FscrError:
            tasks = []  # the restored tree exited already
        store.record_incarnation((m.lineage.pid, m.lineage.starttime),
                                 [(t.pid, t.starttime) for t in tasks],
                                 lambda t: Task(*t).alive())
    for v in m.volumes:
        relink.remove_relinks(Path(v.path), m.id)
    rescues = [r for r in rescues if r.exists()]
    for r in rescues:
        provider.seal(r)
    if rescues:
        store.add_rescue(rescues[0].parent.name, [str(r) for r in rescues])
    if pid is not None and m.cgroup.original != m.cgroup.path:
        own = freezer.at(m.cgroup.path)
        put_back({p: m.cgroup.original for p in (own.procs() if own.exists() else [])}, own)


# -------------------------------------------------------------------------------- delete

def delete(name: str, store_dir: str | None = None) -> list[str]:
    """Delete checkpoint `name` (its snapshots, then its directory) or rescue snapshot `name`.
    Returns what was removed."""
    require_root()
    store = Store.open(store_dir)
    if is_rescue(name):
        for r in store.rescues():
            if r.get("name") == name:
                provider = snapshot.get("btrfs")
                for p in r["paths"]:
                    if Path(p).parent.name != name:
                        raise BadManifest(f"rescue record {name} names {p}, not its own")
                    provider.delete(p)
                store.remove_rescue(name)
                return list(r["paths"])
        raise NoSuchCheckpoint(f"no rescue snapshot {name} in {store.root}")
    if not store.committed(check_id(name)):
        raise NoSuchCheckpoint(f"no checkpoint {name} in {store.root}")
    m = store.load(name)
    provider = snapshot.get(m.snapshot)
    with locks.hold([volume_lock(Path(v.path)) for v in m.volumes]):
        removed = []
        for v in m.volumes:
            if v.snapshot is not None:
                provider.delete(v.snapshot)
                removed.append(v.snapshot)
        store.remove(name)
    return removed + [str(store.dir(name))]
