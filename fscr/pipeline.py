"""Checkpoint and restore as named stages, side by side. Each side effect is journaled first.

checkpoint: resolve -> isolate -> freeze -> scan -> relink -> snapshot -> dump -> unrelink
            -> thaw -> commit
restore:    validate -> make room -> swap volumes in -> reopen relinks -> CRIU restore
            -> unlink relinks -> seal rescue snapshots
"""

from __future__ import annotations

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

from . import backends, relink, snapshot
from .backends import DumpRequest, RestoreRequest
from .errors import (
    BadManifest,
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
    TaskRecord,
    VolumeRecord,
    check_id,
)
from .process import freezer
from .process.files import holders, open_files
from .process.target import Target, isolate, put_back, resolve
from .process.tree import Task, descendants, read_stat
from .store import Store

Progress = Callable[[str], None]


def _quiet(stage: str) -> None:
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("fscr must run as root (it freezes cgroups and runs CRIU)")


def new_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "_" + secrets.token_hex(2)


@dataclass
class Timings:
    """Durations of the named stages, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, progress: Progress) -> Iterator[None]:
        progress(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 6)


@dataclass(frozen=True)
class CheckpointRequest:
    target: Target
    volumes: list[str]
    snapshot: str = "btrfs"
    backend: str = "criu"
    kill: bool = False
    id: str | None = None
    store: str | None = None


def checkpoint(req: CheckpointRequest, progress: Progress = _quiet) -> Manifest:
    """Checkpoint the target tree and its volumes at one frozen instant.

    On failure the tree is thawed (and back in its cgroup), relinks are gone from the volumes,
    and this run's snapshots and image directory are removed.
    """
    require_root()
    store = Store.open(req.store)
    ckpt_id = check_id(req.id) if req.id else new_id()
    provider = snapshot.get(req.snapshot)
    backend = backends.get(req.backend)
    if req.kill and not backend.writes_image:
        raise Refused("--kill with --backend freeze-only would lose the processes: refused")
    volumes = list(dict.fromkeys(Path(v).absolute() for v in req.volumes))
    for vol in volumes:
        provider.check(vol)
    backend.check()
    root, named = resolve(req.target)
    store.reserve(ckpt_id)
    journal = Journal.begin(store.root, ckpt_id, "checkpoint")
    t = Timings()
    snaps: list[str] = []
    try:
        for vol in volumes:
            syncfs(vol)  # so the snapshot does not flush dirty data inside the frozen window
        with t.stage("isolate", progress):
            journal.note("isolate", root=root)
            cg, moved = isolate(root, named, ckpt_id)
            journal.note("moved", cgroup=str(cg.path), moved=moved)
        try:
            m = _frozen_window(req, store, journal, t, progress, ckpt_id, root, cg, moved,
                               volumes, provider, backend, snaps)
        finally:
            if moved:
                put_back(moved, cg)
    except BaseException:
        for s in snaps:
            provider.delete(s)
        store.remove(ckpt_id)
        journal.close()
        raise
    store.commit(m)
    journal.close()
    return m


def _frozen_window(req, store, journal, t, progress, ckpt_id, root, cg, moved, volumes,
                   provider, backend, snaps) -> Manifest:  # noqa: ANN001 - internal stage
    devs = {os.stat(v).st_dev: v for v in volumes}
    journal.note("freeze", cgroup=str(cg.path), kind=cg.kind)
    t0 = time.monotonic()
    cg.freeze()
    try:
        with t.stage("scan", progress):
            tasks = descendants(root)  # again: the tree may have changed before the freeze
            files = [f for task in tasks for f in open_files(task.pid)]
            unlinked = {}
            for f in files:
                if f.deleted and f.dev in devs:
                    unlinked.setdefault(f.external_key, f)
        if unlinked and provider.name == "none":
            raise Refused(
                f"the tree holds {len(unlinked)} unlinked-but-open file(s) on the volumes "
                "and --snapshot none has nothing to keep their data: use --snapshot btrfs"
            )
        relinks = []
        try:
            with t.stage("relink", progress):
                for n, f in enumerate(unlinked.values()):
                    vol = devs[f.dev]
                    journal.note("relink", volume=str(vol), name=relink.relink_name(ckpt_id, n))
                    relinks.append(relink.relink(f, vol, ckpt_id, n))
            with t.stage("snapshot", progress):
                for n, vol in enumerate(volumes):
                    journal.note("snapshot", volume=str(vol), n=n)
                    snaps.append(provider.create(vol, ckpt_id, n))
            with t.stage("dump", progress):
                journal.note("dump", images=str(store.images(ckpt_id)))
                backend.dump(DumpRequest(
                    root_pid=root, images=store.images(ckpt_id),
                    log=store.dir(ckpt_id) / "criu-dump.log", freeze_cgroup=cg.path,
                    externals=list(unlinked), leave_running=not req.kill))
        finally:
            with t.stage("unrelink", progress):
                for vol in volumes:
                    relink.remove_relinks(vol, ckpt_id)
    finally:
        journal.note("thaw", cgroup=str(cg.path))
        cg.thaw()
        t.seconds["freeze_window"] = round(time.monotonic() - t0, 6)
    images = _image_records(store.images(ckpt_id))
    return Manifest(
        schema_version=SCHEMA_VERSION,
        id=ckpt_id,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        hostname=socket.gethostname(),
        backend=backend.name,
        snapshot=provider.name,
        mode="kill" if req.kill else "leave-running",
        root=TaskRecord(pid=root, starttime=tasks[0].starttime),
        tasks=[TaskRecord(pid=x.pid, starttime=x.starttime) for x in tasks],
        cgroup=CgroupRecord(kind=cg.kind, path=cg.rel,
                            original=moved.get(root, cg.rel) if moved else cg.rel),
        volumes=[VolumeRecord(n=n, path=str(v), snapshot=s)
                 for n, (v, s) in enumerate(zip(volumes, snaps, strict=True))],
        relinks=relinks,
        images=images,
        image_bytes=sum(i.size for i in images),
        durations=t.seconds,
    )


def _image_records(images: Path) -> list[ImageFile]:
    return [ImageFile(name=p.name, size=p.stat().st_size, sha256=sha256_file(p))
            for p in sorted(images.iterdir())]


@dataclass(frozen=True)
class RestoreResult:
    id: str
    pid: int | None
    rescues: list[str]
    durations: dict[str, float]


def restore(ckpt_id: str, store_dir: str | None = None, replace: bool = False,
            force: bool = False, volumes_only: bool = False,
            progress: Progress = _quiet) -> RestoreResult:
    """Put the volumes back as they were at the checkpoint and restore the tree.

    Every check runs before anything is killed or swapped. If CRIU fails after the swap, the
    volumes are swapped back (their rescue copies removed) and RestoreRolledBack is raised.
    """
    require_root()
    store = Store.open(store_dir)
    t = Timings()
    with t.stage("validate", progress):
        m = store.load(check_id(ckpt_id))
        store.verify_images(m)
        provider = snapshot.get(m.snapshot)
        backend = backends.get(m.backend)
        processes = backend.writes_image and not volumes_only
        if processes:
            backend.check()
        volumes = [Path(v.path) for v in m.volumes]
        for v in m.volumes:
            provider.check(Path(v.path))
            if v.snapshot is not None and not Path(v.snapshot).is_dir():
                raise BadManifest(f"checkpoint {m.id}: snapshot {v.snapshot} is missing")
        live = [x for x in m.tasks if Task(x.pid, x.starttime).alive()]
        if processes and live and not replace:
            pids = ", ".join(str(x.pid) for x in live)
            raise TreeStillRunning(f"checkpoint {m.id}: its tree still runs (PID {pids}); "
                                   "use --replace to kill it first")
        devs = {os.stat(v).st_dev for v in volumes}
        others = holders(devs, exclude={x.pid for x in live} if replace else set())
        if others and not force and provider.name != "none":
            raise Refused(f"processes outside the checkpoint hold files on its volumes "
                          f"(PID {', '.join(map(str, sorted(others)))}); stop them or use --force")
    journal = Journal.begin(store.root, m.id, "restore")
    try:
        if processes:
            with t.stage("make room", progress):
                _make_room(m, live, journal)
            freezer.ensure(m.cgroup.path)  # restored tasks land there; it must not be frozen
        pid, rescues = _swap_and_restore(m, store, provider, backend, processes, journal, t,
                                         progress)
    finally:
        journal.close()
    return RestoreResult(m.id, pid, [str(r) for r in rescues], t.seconds)


def _make_room(m: Manifest, live: list[TaskRecord], journal: Journal) -> None:
    """Kill the still-running tree (--replace) and wait until every PID of the image is free:
    CRIU restores the original PIDs."""
    journal.note("kill", pids=[x.pid for x in live])
    for x in live:
        if Task(x.pid, x.starttime).alive():
            try:
                os.kill(x.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    while busy := [x.pid for x in m.tasks if read_stat(x.pid) is not None]:
        if time.monotonic() > deadline:
            raise TreeStillRunning(f"PIDs {busy} of checkpoint {m.id} are still in use; "
                                   "CRIU needs them free to restore")
        time.sleep(0.05)


def _swap_and_restore(m, store, provider, backend, processes, journal, t, progress):  # noqa: ANN001
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    swapped: list[tuple[Path, Path]] = []
    with t.stage("swap", progress):
        for v in m.volumes:
            if v.snapshot is None:
                continue
            vol = Path(v.path)
            rescue = snapshot.snapshot_root(vol) / f"rescue_{m.id}_{stamp}" / str(v.n)
            journal.note("swap", volume=v.path, rescue=str(rescue))
            provider.swap_in(v.snapshot, vol, rescue)
            swapped.append((vol, rescue))
    pid = None
    fds: list[tuple[int, str]] = []
    try:
        if processes:
            with t.stage("restore", progress):
                for r in m.relinks:
                    fds.append((relink.reopen(r, Path(r.volume)), r.key))
                journal.note("criu restore")
                pid = backend.restore(RestoreRequest(
                    images=store.images(m.id), log=store.dir(m.id) / "criu-restore.log",
                    inherit=fds))
    except FscrError as e:
        for vol, rescue in reversed(swapped):
            provider.swap_back(vol, rescue)
        raise RestoreRolledBack(f"{e}; the volumes were put back as they were") from None
    finally:
        for fd, _ in fds:
            os.close(fd)
    with t.stage("unrelink", progress):
        for v in m.volumes:
            relink.remove_relinks(Path(v.path), m.id)
    for _, rescue in swapped:
        provider.seal(rescue)
    if swapped:
        store.add_rescue(swapped[0][1].parent.name, [str(r) for _, r in swapped])
    if processes and m.cgroup.original != m.cgroup.path:
        _return_to_original_cgroup(m)
    return pid, [r for _, r in swapped]


def _return_to_original_cgroup(m: Manifest) -> None:
    """The tree was moved into fscr's cgroup for the window: CRIU restored it there; move it
    back where it lived and drop fscr's cgroup."""
    own = freezer.at(m.cgroup.path)
    put_back({pid: m.cgroup.original for pid in own.procs()}, own)


def delete(name: str, store_dir: str | None = None) -> list[str]:
    """Delete checkpoint `name` (its snapshots, then its directory) or rescue snapshot `name`.
    Returns what was removed."""
    require_root()
    store = Store.open(store_dir)
    check_id(name, "checkpoint id")
    if store.committed(name):
        m = store.load(name)
        provider = snapshot.get(m.snapshot)
        removed = []
        for v in m.volumes:
            if v.snapshot is not None:
                provider.delete(v.snapshot)
                removed.append(v.snapshot)
        store.remove(name)
        return removed + [str(store.dir(name))]
    for r in store.rescues():
        if r.get("name") == name:
            for p in r["paths"]:
                snapshot.get("btrfs").delete(p)
            store.remove_rescue(name)
            return list(r["paths"])
    raise NoSuchCheckpoint(f"no checkpoint or rescue snapshot {name} in {store.root}")
