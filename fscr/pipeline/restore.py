"""Restore: the volumes put back as they were at the checkpoint, then the tree.

Its last stage, finish_restore, is idempotent and is rerun by `fscr gc` for a restore whose
fscr died after CRIU restored the tree (as beside.py's finish_beside is for a copy)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .. import backends, failures, lazy, locks, origins, preflight, records, relink, snapshot
from .. import journal as journal_mod
from ..backends import RestoreRequest
from ..errors import (
    BadManifest,
    CriuFailed,
    FscrError,
    PagesCorrupt,
    Refused,
    RestoreRolledBack,
    TreeStillRunning,
)
from ..journal import Journal
from ..manifest import Manifest
from ..names import check_id
from ..process import freezer
from ..process.files import holders
from ..process.target import put_back
from ..process.tree import Task, descendants, read_stat
from ..store import Store
from . import trust
from .common import (
    Progress,
    Timings,
    noting_pid,
    quiet,
    verify_in_background,
)


@dataclass(frozen=True)
class RestoreResult:
    id: str
    pid: int | None
    rescues: list[str]
    durations: dict[str, float]
    copy: str | None = None  # restore --beside: the copy's name


def restore(ckpt_id: str, store_dir: str | None = None, replace: bool = False,
            force: bool = False, volumes_only: bool = False, rollback: bool = False,
            progress: Progress = quiet, lazy: bool = False) -> RestoreResult:
    """Put the volumes back as they were at the checkpoint and restore the tree. With
    `rollback` (LVM only), the volumes' logical volumes are merged back, not mounted over.
    With `lazy`, the tree's memory is served on demand by CRIU's lazy-pages daemon
    (fscr/lazy.py); its page images are verified while the tree runs, and a corrupt one
    kills the tree and puts the volumes back (PagesCorrupt). It returns once every page is in.

    Every check runs before anything is killed or swapped. If anything fails after the swap,
    the volumes are swapped back (their restored copies removed); if that fails too, or fscr
    dies, the journal lets `fscr gc` finish the job.
    """
    store = Store.open(store_dir)
    m = store.load(check_id(ckpt_id))
    keys = [locks.volume_lock(Path(v.path)) for v in m.volumes] + [locks.restore_lock(m.id)]
    with locks.hold(keys, progress):
        dead = journal_mod.unfinished(store.root, m.id)
        if dead:
            raise Refused(f"an earlier {dead[0].op} of checkpoint {m.id} died unfinished; "
                          "run `fscr gc` first")
        if lazy and (volumes_only or not backends.get(m.backend).writes_image):
            raise Refused(f"checkpoint {m.id}: --lazy restores processes; there are none to "
                          "restore here")
        run = _Restore(store, m, Timings(progress=progress),
                       snapshot.get(m.snapshot, rollback=rollback), backends.get(m.backend),
                       rollback, lazy)
        return run.execute(replace, force, volumes_only)


class _CorruptPages(BadManifest):
    """A page image failed its checksum while CRIU restored the tree (none of it ran)."""


@dataclass
class _Restore:
    store: Store
    m: Manifest
    t: Timings
    provider: snapshot.Provider
    backend: backends.Backend
    rollback: bool = False  # journaled, so gc can restore again the way the user asked
    lazy: bool = False
    daemon: Task | None = None  # the lazy-pages daemon, once started
    pages: Callable[[], None] | None = None  # waits for the page images' checksums

    def execute(self, replace: bool, force: bool, volumes_only: bool) -> RestoreResult:
        processes = self.backend.writes_image and not volumes_only
        with self.t.stage("validate"):
            live = self.validate(processes, replace, force)
            rescue = f"rescue_{self.m.id}_{datetime.now(UTC):%Y%m%dT%H%M%SZ}_{secrets.token_hex(2)}"
        self.journal = Journal.begin(self.store.root, self.m.id, "restore",
                                     volumes=[v.path for v in self.m.volumes],
                                     snapshot=self.m.snapshot, volumes_only=volumes_only,
                                     rollback=self.rollback, cgroup=records.plain(self.cgroup),
                                     lazy=self.lazy)
        swapped: list[VolumeSwap] = []
        pid = None
        try:
            if processes:
                with self.t.stage("make room"):
                    self.make_room(live)
                freezer.ensure(self.cgroup.path)  # restored tasks land there: thawed
            with self.t.stage("swap"):
                self.swap_in(rescue, swapped)
            if processes:
                with self.t.stage("restore"):
                    pid = self.restore_processes(cgroup=(self.cgroup.kind, self.cgroup.path))
                if self.lazy:
                    self.settle_lazy(pid)
        except BaseException as e:
            if pid is not None and self.lazy:
                # Its pages were not verified (or ^C came first): it must not run on, and
                # never on volumes swapped back under it.
                lazy.kill_tree(pid)
            if self.daemon is not None:  # its tree is dead or was never restored
                lazy.stop(self.daemon)
            for sw in reversed(swapped):  # if this fails, the journal stays for gc
                self.provider.undo(sw.volume, sw.rescue, sw.copy)
            if isinstance(e, CriuFailed):
                e = self.keep_failure(e, replace=replace, volumes_only=volumes_only)
            # Page images still being checksummed: nothing waits for them any more (CRIU
            # failed first, and its error is the one); the thread ends on its own.
            self.pages = None
            self.journal.close()
            if isinstance(e, _CorruptPages):
                raise BadManifest(f"{e}: nothing was restored and the volumes were put back "
                                  "as they were") from None
            if isinstance(e, PagesCorrupt):
                killed = "; the old tree was killed by --replace" if live else ""
                raise PagesCorrupt(f"{e}: the lazily restored tree was killed and the volumes "
                                   f"were put back as they were{killed}") from None
            if isinstance(e, FscrError) and swapped:
                killed = " (the old tree was killed by --replace)" if live else ""
                raise RestoreRolledBack(
                    f"{e}; the volumes were put back as they were{killed}") from None
            if isinstance(e, CriuFailed):
                raise e from None
            raise
        # The tree runs: from here on nothing is undone. A failure leaves the journal, and
        # gc completes these steps.
        with self.t.stage("finish"):
            kept = finish_restore(self.store, self.m, self.provider, pid, rescue,
                                  [sw.rescue for sw in swapped], self.cgroup)
        self.journal.close()
        return RestoreResult(self.m.id, pid, kept, self.t.seconds)

    def keep_failure(self, e: CriuFailed, **asked: object) -> CriuFailed:
        """Keep CRIU's log of this restore and its record under <store>/failed/: the next
        restore of this checkpoint would overwrite a log left in its directory."""
        log = self.store.dir(self.m.id) / "criu-restore.log"
        request = failures.as_json(asked | {"rollback": self.rollback,
                                            "durations": dict(self.t.seconds)})
        kept = failures.keep(self.store.root, self.m.id, "restore", [log], self.journal.path,
                             e, request)
        return e.kept_at(kept / log.name) if kept is not None else e

    def validate(self, processes: bool, replace: bool, force: bool) -> list[Task]:
        """Every check, before anything is killed or swapped. Returns the live tree.

        The images' checksums (~0.6 ms per MB here, SHA-256 itself) are computed on another
        core while the other checks read /proc and the volumes; a corrupt image is reported
        first, as if it had been checked first. The page images (the memory, the bulk of a
        big process's image) are raw data CRIU parses nothing of: a lazy restore verifies
        them while the tree runs, a plain one while CRIU restores it, before any of it runs
        (pages_verified), unless a live tree is to be killed first."""
        # Page images verified while CRIU restores, unless the swap cannot be undone without
        # losing the checkpoint: an LVM --rollback merges its snapshot away.
        later = processes and not self.lazy and not self.rollback
        verified = verify_in_background(self.store, self.m, self.t.progress,
                                        (lambda n: not lazy.is_page_image(n))
                                        if self.lazy or later else None)
        if later:
            self.pages = verify_in_background(self.store, self.m, self.t.progress,
                                              lazy.is_page_image, "checksum of the memory")
        try:
            live = self.validate_tree(processes, replace, force)
        except BaseException:
            self.pages_verified()  # a corrupt image is reported first
            raise
        finally:
            verified()
        if live:  # --replace kills it next: never for a checkpoint with a corrupt image
            self.pages_verified()
        return live

    def pages_verified(self) -> None:
        """Wait for the page images' checksums, if they are still being computed; raises
        _CorruptPages for a corrupt one (at CRIU's post-restore: CRIU then kills the tree)."""
        wait, self.pages = self.pages, None
        if wait is not None:
            try:
                wait()
            except BadManifest as e:
                raise _CorruptPages(str(e)) from None

    def validate_tree(self, processes: bool, replace: bool, force: bool) -> list[Task]:
        self.check_sources(processes, replace)
        return self.check_room(processes, replace, force)

    def check_sources(self, processes: bool, replace: bool) -> None:
        """What the restore reads is there and as recorded: CRIU, the snapshots and their
        relinks, the network namespace, the binaries and libraries the tree had open."""
        m = self.m
        if processes:
            # CRIU tells its version once started, after the swap; asked now where what comes
            # before cannot be undone: --replace kills, --rollback merges, --lazy starts CRIU's
            # lazy-pages daemon first.
            self.backend.check(version=replace or self.rollback or self.lazy)
        for v in m.volumes:
            try:
                self.provider.check_restore(Path(v.path), v.snapshot, processes)
            except BadManifest as e:
                raise BadManifest(f"checkpoint {m.id}: {e}") from None
        by_volume = {v.path: v for v in m.volumes}
        for r in m.relinks:
            # An LVM snapshot is a block device: its relinks are checked as they are reopened.
            snap = by_volume[r.volume].snapshot
            if snap is not None and Path(snap).is_dir() and not relink.present(Path(snap), r.name):
                raise BadManifest(f"checkpoint {m.id}: relinked file {r.name} is missing "
                                  f"from snapshot {snap}")
        self.netns = trust.netns_path(self.store.root, m) if processes else None
        differ = preflight.changed(m.unchanged) if processes else []
        if differ:
            raise Refused(f"{differ[0]} changed since checkpoint {m.id} (the tree had it open "
                          "or mapped read-only): refusing to restore onto it")

    def check_room(self, processes: bool, replace: bool, force: bool) -> list[Task]:
        """Nothing is in the way: the tree does not run (or may be killed), its PIDs are free,
        no outside process holds the volumes. Returns the live tree."""
        m = self.m
        self.cgroup = trust.cgroup_for(self.store.root, m)
        live = self.live_tree()
        if processes and live and not replace:
            pids = ", ".join(str(x.pid) for x in live)
            raise TreeStillRunning(f"checkpoint {m.id}: its tree still runs (PID {pids}); "
                                   "use --replace to kill it first")
        if processes and not m.pidns:  # in a PID namespace of its own, no PID is taken
            mine = {x.pid for x in live}
            taken = [x.pid for x in m.tasks if x.pid not in mine
                     and (st := read_stat(x.pid)) is not None and st.state not in "ZX"]
            if taken:
                raise TreeStillRunning(f"PIDs {taken} of checkpoint {m.id} belong to other "
                                       "processes; CRIU restores the original PIDs")
        devs = {os.stat(v.path).st_dev for v in m.volumes if os.path.exists(v.path)}
        spared = {x.pid for x in live} if (replace and processes) else set()
        others = holders(devs, exclude=spared)
        if others and not force and self.provider.name != "none":
            raise Refused(f"processes outside the checkpoint hold files on its volumes "
                          f"(PID {', '.join(map(str, sorted(others)))}); stop them or use --force")
        return live

    def live_tree(self) -> list[Task]:
        """The checkpoint's tree if it runs: the tasks this host recorded for it (those it
        dumped, those restores brought back), each checked to be in its recorded cgroup
        before --replace may kill it. None for a checkpoint this host did not make."""
        m = self.m
        known, allowed = trust.killable(self.store.root, m)
        live = list(dict.fromkeys(t for t in known if t.alive()))
        for t in live:
            try:
                where = freezer.cgroup_of(t.pid).rel
            except FscrError:
                continue
            if where not in allowed:
                raise Refused(f"PID {t.pid} matches checkpoint {m.id} but lives in cgroup "
                              f"{where}, not {' or '.join(sorted(allowed))}; refusing to "
                              "touch it")
        return live

    def make_room(self, live: list[Task]) -> None:
        """Kill the still-running tree (--replace) and wait until every PID of the image is
        free: CRIU restores the original PIDs. A tree in a PID namespace of its own needs
        only its old tasks dead (a zombie left for the host's init to reap holds nothing)."""
        self.journal.note("kill", tasks=[[x.pid, x.starttime] for x in live])
        for x in live:
            x.kill()
        deadline = time.monotonic() + 30
        while busy := ([x.pid for x in live if x.alive()] if self.m.pidns else
                       [x.pid for x in self.m.tasks if read_stat(x.pid) is not None]):
            if time.monotonic() > deadline:
                raise TreeStillRunning(f"PIDs {busy} of checkpoint {self.m.id} are still in "
                                       "use; CRIU needs them free to restore")
            time.sleep(0.05)

    def swap_in(self, rescue: str, swapped: list[VolumeSwap]) -> None:
        for v in self.m.volumes:
            if v.snapshot is None:
                continue
            vol = Path(v.path)
            sw = VolumeSwap(vol, self.provider.rescue(vol, rescue, v.n))
            self.journal.note("swap", volume=v.path, snapshot=v.snapshot, rescue=sw.rescue,
                              name=rescue)

            def made(copy: str, sw: VolumeSwap = sw) -> None:
                self.journal.note("copy", volume=str(sw.volume), copy=copy)
                sw.copy = copy  # from here a failure must be undone
                swapped.append(sw)

            self.provider.swap_in(v.snapshot, vol, sw.rescue, made)

    def restore_processes(self, clones: dict[str, Path] | None = None,
                          cgroup: tuple[str, str] | None = None) -> int:
        """CRIU restores the tree, each relinked file handed over reopened. A copy beside its
        original (`clones`: volume -> its clone) reopens them in the clones, runs with each
        clone bind-mounted at its volume's path in a mount namespace of its own, and lands in
        `cgroup` (kind, path)."""
        fds: list[tuple[int, str]] = []
        pidfile = self.store.dir(self.m.id) / "restore.pid"
        where = clones or {}
        try:
            for r in self.m.relinks:
                fds.append((relink.reopen(r, where.get(r.volume, Path(r.volume))), r.key))
            if self.lazy:
                self.daemon = lazy.start(self.store.images(self.m.id), self.store.dir(self.m.id),
                                         self.store.dir(self.m.id) / "criu-lazy-pages.log",
                                         lambda t: self.journal.note("lazy", pid=t.pid,
                                                                     starttime=t.starttime))
            pid = self.backend.restore(RestoreRequest(
                images=self.store.images(self.m.id),
                log=self.store.dir(self.m.id) / "criu-restore.log", pidfile=pidfile,
                inherit=fds, tcp=self.m.tcp, netns=self.netns, options=frozenset(self.m.needs),
                binds=tuple((str(c), v) for v, c in where.items()), cgroup=cgroup,
                lazy=self.lazy, before_resume=self.pages_verified), noting_pid(self.journal))
        finally:
            for fd, _ in fds:
                os.close(fd)
        self.journal.note("restored", pid=pid)
        pidfile.unlink(missing_ok=True)
        return pid

    def settle_lazy(self, pid: int) -> None:
        """The tree runs on lazily served memory: verify the page images (on failure, kill
        the tree and raise PagesCorrupt), then wait for the daemon to hand over the rest."""
        with self.t.stage("verify pages"):
            try:
                verify_in_background(self.store, self.m, self.t.progress, lazy.is_page_image,
                                     "checksum of the memory")()
            except BadManifest as e:
                lazy.kill_tree(pid)
                raise PagesCorrupt(str(e)) from None
            self.journal.note("verified")
        # From here the tree runs on verified memory: nothing undoes the restore.
        with self.t.stage("pages in"):
            # Not killed if it is slow: that would zero the pages it has not copied. Past the
            # wait, or on ^C, it finishes alone.
            try:
                if self.daemon is not None:
                    lazy.wait(self.daemon, timeout=600)
            except KeyboardInterrupt:
                pass
            self.daemon = None
        (self.store.dir(self.m.id) / lazy.SOCKET).unlink(missing_ok=True)


@dataclass
class VolumeSwap:
    """One volume's swap during this restore: undone if the restore fails."""

    volume: Path
    rescue: str
    copy: snapshot.Copy | None = None  # what swap_in made, once it has (journaled "copy")


def finish_restore(store: Store, m: Manifest, provider: snapshot.Provider, pid: int | None,
                   name: str, rescues: list[str], cgroup: origins.CgroupOf) -> list[str]:
    """The restored tree runs: remember it (this host's records: a checkpoint it did not make
    gets one now, its lineage starting here), unlink the relinks (the tasks see those files
    unlinked again), seal and record the rescue snapshots, and move the tree back to its own
    cgroup if fscr moved it for the checkpoint. Idempotent: gc reruns it."""
    if pid is not None:
        try:
            tasks = descendants(pid)
        except FscrError:
            tasks = []  # the restored tree exited already
        rec = origins.of(store.root, m.id)
        if rec is None and tasks:
            origins.record(store.root, m.id, (tasks[0].pid, tasks[0].starttime), cgroup, [])
            rec = origins.of(store.root, m.id)
        if rec is not None:
            origins.record_incarnation(store.root, rec.lineage,
                                       [(t.pid, t.starttime) for t in tasks],
                                       lambda t: Task(*t).alive())
    for v in m.volumes:
        relink.remove_relinks(Path(v.path), m.id)
    rescues = [r for r in rescues if provider.exists(r)]
    for r in rescues:
        provider.seal(r)
    if rescues:
        store.add_rescue(name, rescues, provider.name)
    if pid is not None and cgroup.original != cgroup.path:
        own = freezer.at(cgroup.path)
        put_back({p: cgroup.original for p in (own.procs() if own.exists() else [])}, own)
    return rescues
