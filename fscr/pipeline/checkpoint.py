"""Checkpoint: a task tree and its volumes at one frozen instant."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .. import backends, failures, locks, origins, preflight, records, relink, snapshot
from ..backends import DumpRequest
from ..backends.criu_log import dump_finished
from ..errors import (
    BadVolume,
    CriuFailed,
    FreezeTimeout,
    FscrError,
    Raced,
    Refused,
    require_root,
)
from ..fsutil import mount_table, syncfs
from ..journal import Journal
from ..manifest import (
    SCHEMA_VERSION,
    CgroupRecord,
    LeakRecord,
    Manifest,
    NetnsRecord,
    Relink,
    SocketRecord,
    TaskRecord,
    UnchangedRecord,
    VolumeRecord,
    describe,
    recordable,
)
from ..names import check_id, relink_name
from ..process import netns
from ..process.files import OpenFile, open_files, watched
from ..process.freezer import Cgroup
from ..process.mountns import shares_mine
from ..process.target import Target, isolate, put_back, resolve
from ..process.tree import Task, descendants, is_pidns_init, task_of
from ..progress import bytes_in, meter, watching
from ..store import Store
from ..watchdog import Watchdog
from .common import (
    Progress,
    Timings,
    new_id,
    noting_pid,
    quiet,
)

TCP_MODES = ("refuse", "established", "close")
# Test facility: the scan finds no unlinked file, as if each were unlinked just after it.
SCAN_MISSES_ENV = "FSCR_TEST_SCAN_MISSES"


@dataclass(frozen=True)
class CheckpointRequest:
    target: Target
    volumes: list[str]
    snapshot: str = "btrfs"
    backend: str = "criu"
    kill: bool = False
    tcp: str = "refuse"
    allow: frozenset[str] = frozenset()
    lvm_size: str | None = None  # a classic LVM snapshot's size (lvm.size_args)
    job: str | None = None  # the backup job that made it (fscr backup), for pruning
    id: str | None = None
    store: str | None = None
    max_freeze: float = 30.0


def _volumes(req: CheckpointRequest) -> list[Path]:
    """The volumes as real absolute paths. An empty one is refused (it would silently mean
    the current directory), and one a manifest cannot record (NUL, not UTF-8)."""
    out = []
    for v in req.volumes:
        if not v:
            raise BadVolume("a volume is the empty string: name its directory")
        try:
            recordable(v)
        except ValueError as e:
            raise BadVolume(f"volume {v!r} {e}") from None
        out.append(Path(os.path.realpath(v)))
    return out


def checkpoint(req: CheckpointRequest, progress: Progress = quiet) -> Manifest:
    """Checkpoint the target tree and its volumes at one frozen instant.

    On failure the tree is thawed and back in its cgroup, relinks are gone from the volumes,
    and this run's snapshots and checkpoint directory are removed. If fscr itself dies, the
    watchdog thaws the tree and `fscr gc` removes the rest.
    """
    store = Store.open(req.store)
    ckpt_id = check_id(req.id) if req.id is not None else new_id()  # "" is no id
    provider = snapshot.get(req.snapshot, size=req.lvm_size)
    backend = backends.get(req.backend)
    if req.kill and not backend.writes_image:
        raise Refused("--kill with --backend freeze-only would lose the processes: refused")
    if req.tcp == "established" and not req.kill:
        raise Refused("--tcp established needs --kill: a connection left running diverges "
                      "from its image (CRIU kills the tree with the connections silenced)")
    # realpath: a manifest holds clean absolute paths, and the snapshots go beside the real
    # directory, not beside a symlink to it.
    volumes = list(dict.fromkeys(_volumes(req)))
    for vol in volumes:
        provider.check(vol)
    backend.check()
    root, named = resolve(req.target)
    tree = descendants(root)
    placement = netns.classify(root, {t.pid for t in tree})

    def attempt(tasks: list[Task]) -> _Checkpoint:
        run = _Checkpoint(req, store, ckpt_id, provider, backend, volumes, root,
                          Timings(progress=progress), placement=placement)
        run.preflight(tasks)  # before freezing: refuse without ever freezing
        run.asked = frozenset(run.report.needs)  # what CRIU is told the tree needs
        return run

    run = attempt(tree)
    with locks.hold([locks.volume_lock(v) for v in volumes]
                    + [locks.workload_lock(tree[0].pid, tree[0].starttime)], progress):
        try:
            return run.execute(named)
        except Raced:
            # Undone entirely (the tree runs on): once more, as DESIGN says; a second race
            # is reported.
            progress("retry")
            return attempt(descendants(root)).execute(named)


def check(req: CheckpointRequest) -> tuple[preflight.Report, str | None]:
    """`fscr check`: the preflight alone. Returns the report and why a checkpoint with these
    options would be refused (None if it would pass). Freezes nothing."""
    require_root()  # before the options are checked: a user learns the one thing to change
    provider = snapshot.get(req.snapshot)
    volumes = _volumes(req)
    for vol in volumes:
        provider.check(vol)
    root, _ = resolve(req.target)
    tree = descendants(root)
    run = _Checkpoint(req, Store.open(req.store, write=False), "check", provider,
                      backends.get(req.backend), volumes, root, Timings(),
                      placement=netns.classify(root, set()))
    try:
        run.preflight(tree)
    except Refused as e:
        return run.report, str(e)
    return run.report, None


@dataclass
class Captured:
    """What the frozen window captured for the manifest, filled in CRIU's order: the scan
    (query-ext-files), the relinks (post-dump), the network lock (CRIU's answer)."""

    tasks: list[Task] = field(default_factory=list)  # the tree, scanned once stopped
    unlinked: dict[str, OpenFile] = field(default_factory=dict)  # to relink, by CRIU's key
    left_to_criu: set[str] = field(default_factory=set)  # watched ones CRIU copies as ghosts
    relinks: list[Relink] = field(default_factory=list)
    netlock: str | None = None  # --tcp established: CRIU's network lock, left on


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
    placement: netns.Placement
    snaps: list[str] = field(default_factory=list)
    committed: bool = False
    relinks_left: bool = False  # a relink could not be removed: the journal stays for gc
    asked: frozenset[str] = frozenset()  # the needs CRIU was started with (preflight's)
    report: preflight.Report = field(init=False)  # the last preflight's (set before a dump)
    # Set by execute (the journal) and frozen_window (the rest) before any hook runs:
    journal: Journal = field(init=False)
    cg: Cgroup = field(init=False)  # the cgroup frozen
    moved: dict[int, str] = field(default_factory=dict)  # tasks moved there: {pid: original}
    dog: Watchdog = field(init=False)
    frozen_at: float | None = None  # time.monotonic() of the freeze; None: not frozen
    captured: Captured = field(default_factory=Captured)

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
        except BaseException as e:
            if (not self.committed and self.req.tcp == "established"
                    and dump_finished(self.store.dir(self.id) / "criu-dump.log")):
                # CRIU has killed the tree: its image and the journaled draft are all that is
                # left of it, so nothing is removed, and gc commits the draft.
                why = str(e) if isinstance(e, FscrError) else type(e).__name__
                raise FscrError(f"{why}; CRIU had dumped and killed the tree: "
                                f"run `fscr gc` to commit checkpoint {self.id}, all that is "
                                "left of it") from None
            kept = None
            if not self.committed:  # after a --kill commit the checkpoint is all that's left
                for s in self.snaps:
                    self.provider.delete(s)
                if isinstance(e, CriuFailed):
                    kept = self.keep_failure(e)
                self.store.remove(self.id)
            if not self.relinks_left:
                self.journal.close()
            if kept is not None:
                raise kept from None
            raise
        self.journal.close()
        return m

    def keep_failure(self, e: CriuFailed) -> CriuFailed:
        """Keep CRIU's log and this run's record under <store>/failed/ (the checkpoint's own
        directory goes): the message then names a log that exists."""
        log = self.store.dir(self.id) / "criu-dump.log"
        request = failures.as_json(asdict(self.req) | {
            "volumes": [str(v) for v in self.volumes], "root": self.root,
            "durations": self.t.seconds,
            "preflight": self.report.as_dict()})
        kept = failures.keep(self.store.root, self.id, "checkpoint", [log], self.journal.path,
                             e, request)
        return e.kept_at(kept / log.name) if kept is not None else e

    def frozen_window(self, cg: Cgroup, moved: dict[int, str]) -> Manifest:
        """The backend runs and calls this run's DumpHooks (started, stop, externals,
        dumped): fscr freezes once CRIU has started up, and does its scan, relinks and
        snapshots while CRIU holds the tree stopped. The watchdog is armed before the freeze;
        the tree is thawed however this ends (or CRIU has killed it: --tcp established)."""
        self.cg, self.moved, self.frozen_at, self.captured = cg, moved, None, Captured()
        self.dog = Watchdog.start(cg, self.journal.path, self.req.max_freeze)
        m = None
        try:
            self.dump(cg)
            if self.req.tcp == "established":
                # CRIU killed the tree itself, its connections silenced: the image is all
                # that is left, so it is committed whatever the watchdog says.
                m = self.commit(self.window())
            elif self.req.kill:
                # Commit while the tree is still frozen, then kill it: a run that dies before
                # the commit leaves the tree running (the watchdog or gc thaws it). The
                # images' checksums are the long part: if the watchdog thawed the tree
                # meanwhile, it ran on past its image, so it is neither killed nor kept.
                window = self.window()
                m = self.manifest(window)
                self.watchdog_ok()
                m = self.commit(window, m)
                tasks = self.captured.tasks
                self.journal.note("kill", tasks=[[x.pid, x.starttime] for x in tasks])
                # Delivered once thawed, or at once: the v2 freezer lets SIGKILL through, and
                # an init that dies takes its PID namespace along.
                for x in tasks:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(x.pid, signal.SIGKILL)
        finally:
            try:
                cg.thaw()  # an undo: made first, noted after (a full store must not stop it)
                window = self.window()
            finally:
                why = self.dog.stop()
            if self.frozen_at is not None:
                with contextlib.suppress(OSError):
                    self.journal.note("thawed", cgroup=str(cg.path))
        if m is not None:
            return m
        if why is not None:
            raise FreezeTimeout(f"checkpoint aborted: {why}; the tree was thawed")
        return self.commit(window)

    def window(self) -> float:
        return time.monotonic() - self.frozen_at if self.frozen_at is not None else 0.0

    # DumpHooks: what fscr does inside CRIU's stop, in CRIU's order.

    def started(self, pid: int) -> None:
        noting_pid(self.journal)(pid)

    def stop(self) -> None:
        """CRIU's pre-dump: it has started up and probed the kernel, and seizes nothing
        yet. fscr freezes with its own freezer (CRIU's polls in 100 ms steps; a frozen
        cgroup it seizes at once)."""
        self.journal.note("freeze", cgroup=str(self.cg.path), kind=self.cg.kind)
        self.frozen_at = time.monotonic()
        self.cg.freeze()
        self.watchdog_ok()

    def externals(self) -> list[str]:
        """CRIU's query-ext-files: the tree is stopped and no file is dumped yet. Scan it
        again (it may have changed before the freeze) and name the unlinked files fscr
        relinks, which CRIU then leaves out of the image."""
        self.captured = self.scan()
        if not self.report.needs <= self.asked:
            # CRIU was started with what the tree needed before the freeze (a terminal, file
            # locks, ...); a need that appeared since would fail its dump: start over.
            raise Raced(f"the tree changed before the freeze (it now needs "
                        f"{', '.join(sorted(self.report.needs - self.asked))}); try again")
        self.watchdog_ok()
        return list(self.captured.unlinked)

    def scan(self) -> Captured:
        """The tree as CRIU holds it stopped: its tasks (the preflight run again on them) and
        the unlinked files to relink. The relinks and the network lock are added later."""
        with self.t.stage("scan"):
            tasks = descendants(self.root)
            self.preflight(tasks)
            unlinked, left_to_criu = self.unlinked_files(tasks)
        return Captured(tasks=tasks, unlinked=unlinked, left_to_criu=left_to_criu)

    def dumped(self) -> None:
        """CRIU's post-dump: the images are written and every task still stopped. A file
        CRIU copied as a ghost means the scan raced a change: fail (CRIU lets the tree go
        on). Else relink, snapshot every volume, and remove the relinks again."""
        with self.t.stage("ghost check"):
            copied = [p for p in self.backend.copied_unlinked(self.store.images(self.id),
                                                              self.volumes)
                      if p not in self.captured.left_to_criu]
        if copied:
            raise Raced(f"CRIU copied {len(copied)} unlinked file(s) into the image "
                        f"({', '.join(copied[:3])}): the tree changed while fscr scanned "
                        "it; try again")
        try:
            self.captured.relinks = self.relink(self.captured.unlinked)
            self.watchdog_ok()
            with self.t.stage("snapshot"):
                for n, vol in enumerate(self.volumes):
                    self.journal.note("snapshot", volume=str(vol), n=n)
                    self.snaps.append(self.provider.create(vol, self.id, n))
            self.watchdog_ok()
            if self.req.tcp == "established":
                # CRIU kills the tree once answered: if fscr dies after that, gc commits
                # this draft (if fscr dies before, CRIU lets the tree run on).
                self.journal.note("draft", manifest=records.plain(
                    self.manifest(0.0, images=False)))
        finally:
            with self.t.stage("unrelink"):
                failed: list[str] = []
                for vol in self.volumes:  # each volume, whatever another one does
                    try:
                        relink.remove_relinks(vol, self.id)
                    except OSError as e:
                        failed.append(f"{vol}: {e.strerror or e}")
                if failed:
                    self.relinks_left = True
                    raise FscrError(f"cannot remove the relinks from {'; '.join(failed)}: "
                                    "`fscr gc` removes them")

    def preflight(self, tasks: list[Task]) -> None:
        """Before the freeze, and again once frozen (the tree may have changed): refuse what
        lives outside the checkpoint unless its kind is allowed, and TCP connections under
        --tcp refuse. A freeze-only checkpoint restores no process: nothing to refuse."""
        self.report = preflight.run(tasks, {os.stat(v).st_dev for v in self.volumes})
        self.recorded()  # a name the manifest cannot hold is refused now, not after the dump
        if not self.backend.writes_image:
            return
        apart = [t.pid for t in tasks if not shares_mine(t.pid)]
        if apart:
            raise Refused(f"PID {apart[0]} lives in a mount namespace of its own (a copy made "
                          "by restore --beside, or a container): CRIU would have to dump that "
                          "namespace, which fscr does not support; checkpoint the original")
        others = preflight.undumpable_users(tasks)
        if others:
            raise Refused(f"CRIU cannot dump tasks of other users here: {'; '.join(others)}; "
                          "root lacks CAP_SYS_RESOURCE on this machine (fscr doctor)")
        refused = self.report.refused(set(self.req.allow))
        if refused:
            raise Refused(preflight.refusal(refused))
        connected = self.report.connections
        if connected and self.req.tcp == "refuse":
            listed = "; ".join(s.describe() for s in connected)
            raise Refused(f"the tree has {len(connected)} TCP connection(s): {listed}. Choose "
                          "--tcp established (keep them, with --kill) or --tcp close")

    def watchdog_ok(self) -> None:
        why = self.dog.fired()
        if why is not None:
            raise FreezeTimeout(f"checkpoint aborted: {why}; the tree was thawed")

    def unlinked_files(self, tasks: list[Task]) -> tuple[dict[str, OpenFile], set[str]]:
        """Unlinked-but-open files on the volumes, one per inode (CRIU's external key), to
        relink, and the paths of those left to CRIU (the ghost check expects them in the
        image). Not one an inotify or fanotify watch is on, with no link left: CRIU copies
        that one into the image (a ghost file) and puts the watch back on its copy; on
        fscr's relinked copy, CRIU would look for the watched inode by its file handle, in
        the subvolume the restore swapped out."""
        devs = {os.stat(v).st_dev for v in self.volumes}
        watches = set().union(*(watched(t.pid) for t in tasks))
        sb = {m.id: m.dev for m in mount_table()} if watches else {}
        unlinked: dict[str, OpenFile] = {}
        left_to_criu: set[str] = set()
        for task in tasks:
            for f in open_files(task.pid):
                if not f.deleted or f.dev not in devs:
                    continue
                if f.nlink == 0 and (*sb.get(f.mnt_id, (-1, -1)), f.ino) in watches:
                    left_to_criu.add(f.path)
                    continue
                unlinked.setdefault(f.external_key, f)
        if os.environ.get(SCAN_MISSES_ENV):  # test facility (docs/testing.md): a raced scan
            unlinked = {}
        if unlinked and self.provider.name == "none":
            raise Refused(
                f"the tree holds {len(unlinked)} unlinked-but-open file(s) on the volumes "
                "and --snapshot none has nothing to keep their data: use --snapshot btrfs")
        return unlinked, left_to_criu

    def relink(self, unlinked: dict[str, OpenFile]) -> list[Relink]:
        devs = {os.stat(v).st_dev: v for v in self.volumes}
        out = []
        with self.t.stage("relink"):
            for n, f in enumerate(unlinked.values()):
                vol = devs[f.dev]
                self.journal.note("relink", volume=str(vol), name=relink_name(self.id, n))
                out.append(relink.relink(f, vol, self.id, n))
        return out

    def dump(self, cg: Cgroup) -> None:
        inside = self.placement.treatment == "external"
        with self.t.stage("dump"):
            self.journal.note("dump", images=str(self.store.images(self.id)))
            # CRIU says nothing while it writes: the image directory's growth is the progress.
            shown = self.t.progress if self.backend.writes_image else quiet
            with watching(shown, "images written", self.store.images(self.id)):
                self.captured.netlock = self.backend.dump(DumpRequest(
                    root_pid=self.root, images=self.store.images(self.id),
                    log=self.store.dir(self.id) / "criu-dump.log", freeze_cgroup=cg.path,
                    leave_running=self.req.tcp != "established", tcp=self.req.tcp,
                    netns=f"/proc/{self.root}/ns/net" if inside else None,
                    options=self.asked), self)
            self.journal.note("dumped")
        if self.req.tcp != "established":
            self.watchdog_ok()

    def commit(self, window: float, m: Manifest | None = None) -> Manifest:
        self.t.seconds["freeze_window"] = round(window, 6)
        m = m if m is not None else self.manifest(window)
        self.journal.note("commit")
        origins.made_here(self.store.root, m)
        self.store.commit(m)
        self.committed = True
        return m

    def recorded(self) -> tuple[list[LeakRecord], list[UnchangedRecord]]:
        """The preflight's findings as manifest records; a path that is not UTF-8 or holds
        a NUL byte cannot be recorded (nor reopened from a manifest): refused."""
        try:
            return ([records.checked(LeakRecord(**(asdict(x) | {"what": describe(x.what),
                                                               "detail": describe(x.detail)})))
                     for x in self.report.leaks],
                    [records.checked(UnchangedRecord(**asdict(u)))
                     for u in self.report.unchanged])
        except (records.Invalid, ValueError) as e:
            raise Refused(f"the tree uses a file fscr cannot record: {_first(e)}") from None

    def manifest(self, window: float, images: bool = True) -> Manifest:
        """The run's manifest; without `images` (a --tcp established draft, journaled inside
        CRIU's stop) the images are not checksummed: gc does that if it commits the draft."""
        tasks, cg = self.captured.tasks, self.cg
        leaks, unchanged = self.recorded()
        try:
            return records.checked(self._manifest(window, tasks, cg, leaks, unchanged, images))
        except (records.Invalid, ValueError) as e:  # the run's undo removes what it made
            raise Refused(f"the checkpoint cannot be recorded: {_first(e)}") from None

    def _manifest(self, window: float, tasks: list[Task], cg: Cgroup,
                  leaks: list[LeakRecord], unchanged: list[UnchangedRecord],
                  with_images: bool) -> Manifest:
        lineage = origins.lineage_of(self.store.root, (self.root, tasks[0].starttime))
        images = []
        if with_images:
            written = bytes_in(self.store.images(self.id))
            with meter(self.t.progress if written else quiet, "checksum", written) as m:
                images = self.store.image_records(self.id, m.advance)
        p = self.placement
        return Manifest(
            schema_version=SCHEMA_VERSION,
            id=self.id,
            created=datetime.now(UTC).isoformat(timespec="microseconds"),  # orders a burst
            hostname=socket.gethostname(),
            job=self.req.job,
            backend=self.backend.name,
            snapshot=self.provider.name,
            mode="kill" if self.req.kill else "leave-running",
            root=TaskRecord(pid=self.root, starttime=tasks[0].starttime),
            lineage=TaskRecord(pid=lineage[0], starttime=lineage[1]),
            tasks=[TaskRecord(pid=x.pid, starttime=x.starttime) for x in tasks],
            cgroup=CgroupRecord(kind=cg.kind, path=cg.rel,
                                original=self.moved.get(self.root, cg.rel)),
            volumes=[VolumeRecord(n=n, path=str(v), snapshot=s)
                     for n, (v, s) in enumerate(zip(self.volumes, self.snaps, strict=True))],
            relinks=self.captured.relinks,
            tcp=self.req.tcp,
            sockets=[SocketRecord(**s.as_dict()) for s in self.report.sockets],
            allowed=sorted(self.req.allow),
            leaks=leaks,
            unchanged=unchanged,
            needs=sorted(self.report.needs),
            netns=NetnsRecord(
                treatment=p.treatment, inode=p.inode, path=p.path,
                holder=TaskRecord(pid=p.holder.pid, starttime=p.holder.starttime)
                if p.holder else None),
            pidns=is_pidns_init(self.root),
            netlock=self.captured.netlock,
            images=images,
            image_bytes=sum(i.size for i in images),
            durations=dict(self.t.seconds, freeze_window=round(window, 6)),
        )


def _first(e: Exception) -> str:
    if not isinstance(e, records.Invalid):
        return str(e)  # from a record's own check, naming its field
    where, what = records.why(e)
    return f"{where} {what}"
