"""fscr benchmarks: the freeze window, total time and bytes written, against the alternatives.

    sudo .venv/bin/python -m bench [--full] [--runs N] [--out DIR]

Sets up its own loopback btrfs volume and workloads, runs every configuration several times
(median reported), and writes results.json, results.md and PNG plots to DIR (default
results/). Configurations, each on the same workload in the same run:

  fscr         fscr checkpoint: btrfs snapshot + relink + CRIU with external files
  criu         CRIU alone, unlinked files as ghost files (--ghost-limit raised), no fs copy
  criu+tar     CRIU, plus a tar of the volume's data taken while frozen (the way container
               checkpoints export their root filesystem)
  freeze-only  fscr --backend freeze-only (snapshot only)

The short mode (default) sweeps a little of everything (under two minutes on a 2-core
machine); --full runs the issue's sweeps (volume data 100 MB, 1 GB, 4 GB; an unlinked file
of 10 MB and 1 GB; RSS 64 MB and 1 GB; 1, 10 and 100 processes). results.md states each
of the issue's targets as a ratio from the run (bench/report.py; `python -m bench.report
DIR` renders a results.json again). Replication to an ssh destination is measured apart:
`python -m bench.replication` (bench/replication.py).
"""

from __future__ import annotations

import argparse
import compileall
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import fscr
from fscr.backends.criu import require
from fscr.names import FSCR_GROUP
from fscr.process import freezer

from .report import CONFIGS, MB, label, markdown, plots

HERE = Path(__file__).resolve().parent
FSCR = Path(sys.executable).parent / "fscr"
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Case:
    data_mb: int = 100  # regular file data on the volume
    unlinked_mb: int = 0  # one unlinked-but-open file of this size (nlink 0)
    rss_mb: int = 64  # memory the workload holds
    procs: int = 1  # processes in the tree

    def label(self) -> str:
        return label(asdict(self))


@dataclass
class Result:
    case: Case
    config: str
    freeze_s: float
    total_s: float
    written_bytes: int
    restore_s: float | None = None
    stages: dict | None = None  # fscr's own stage times
    restore_stages: dict | None = None  # fscr restore's stage times (of the median restore)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


class Bed:
    """A loopback btrfs filesystem with a volume, a store, and a workload in a cgroup."""

    def __init__(self, root: Path, size_gb: int) -> None:
        self.root, self.mnt = root, root / "mnt"
        self.vol, self.store = self.mnt / "vol", root / "store"
        self.mnt.mkdir(parents=True, exist_ok=True)
        img = root / "bench.img"
        with open(img, "wb") as f:
            f.truncate(size_gb << 30)
        self.loop = sh("losetup", "--find", "--show", str(img))
        sh("mkfs.btrfs", "-q", self.loop)
        sh("mount", self.loop, str(self.mnt))
        self.pid: int | None = None
        self.case: Case | None = None
        self.data_mb: int | None = None  # the volume's data file, written once per size
        self.cg = freezer.ensure(f"{FSCR_GROUP}/bench")
        self.ctl: Path | None = None  # set: the workload measures its own stall (bench/stall.py)

    def close(self) -> None:
        self.stop()
        self.cg.remove()
        subprocess.run(["umount", str(self.mnt)], check=False)
        subprocess.run(["losetup", "-d", self.loop], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def prepare(self, case: Case) -> None:
        """A clean slate for one run of `case`: the snapshots and images of earlier runs are
        removed; the volume's data is written once per size (a restore puts back the same
        data); the workload is started once per case and reused across runs and configs (a
        dump with --leave-running leaves it as it was, a restore brings it back with its PIDs
        and memory), unless it is gone."""
        running = case == self.case and bool(self.cg.procs())
        if not running:
            self.stop()
        subvolumes = [*self.mnt.glob(".fscr-snapshots/*/*")]
        if case.data_mb != self.data_mb:
            subvolumes.append(self.vol)
        subvolumes = [str(v) for v in subvolumes if v.exists()]
        if subvolumes:
            # --commit-after: the cleaner frees deleted subvolumes after a transaction commit,
            # which otherwise comes with btrfs's 30 s commit interval.
            subprocess.run(["btrfs", "subvolume", "delete", "--commit-after", *subvolumes],
                           capture_output=True)
        shutil.rmtree(self.mnt / ".fscr-snapshots", ignore_errors=True)
        shutil.rmtree(self.store, ignore_errors=True)
        if case.data_mb != self.data_mb:
            # Deleted subvolumes are freed in the background: wait, or the data may not fit.
            sh("btrfs", "subvolume", "sync", str(self.mnt))
            sh("btrfs", "subvolume", "create", str(self.vol))
            block = os.urandom(MB)
            with open(self.vol / "data", "wb") as f:
                for _ in range(case.data_mb):
                    f.write(block)
            self.data_mb = case.data_mb
        # Every run starts with nothing left to write back: the images and copies of the run
        # before (1 GB and more in the big cases) would otherwise be flushed during this one.
        os.sync()
        if running:
            return
        (self.vol / "ready").unlink(missing_ok=True)
        args = [sys.executable, str(HERE / "workload.py"), str(self.vol), str(case.rss_mb),
                str(case.unlinked_mb), str(case.procs)] + ([str(self.ctl)] if self.ctl else [])
        out = subprocess.run([str(FSCR), "run", "--name", "bench", "--json", "--", *args],
                             check=True, capture_output=True, text=True)
        self.pid = json.loads(out.stdout)["pid"]
        self.case = case
        deadline = time.monotonic() + 600
        while not (self.vol / "ready").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the workload did not get ready")
            time.sleep(0.05)

    def stop(self) -> None:
        for pid in self.cg.procs():
            os.kill(pid, signal.SIGKILL)
        while self.cg.procs():
            time.sleep(0.05)
        reap()
        self.case = None

    def fscr(self, *args: str) -> dict:
        out = subprocess.run([str(FSCR), *args, "--json"], capture_output=True, text=True,
                             env=os.environ | {"FSCR_STORE": str(self.store)})
        if out.returncode != 0:
            raise RuntimeError(f"fscr {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_fscr(bed: Bed, backend: str, restore: bool) -> Result:
    t0 = time.monotonic()
    m = bed.fscr("checkpoint", "--pid", str(bed.pid), "--volume", str(bed.vol), "--backend",
                 backend, *(["--kill"] if restore else []))
    total = time.monotonic() - t0
    copied = sum(r["size"] for r in m["relinks"] if r["method"] == "copy")
    res = Result(Case(), "fscr" if backend == "criu" else "freeze-only",
                 m["durations"]["freeze_window"], total, m["image_bytes"] + copied)
    if restore:
        # as for CRIU alone: the time to reap is not the restore's
        wait_pids_free(image_pids(bed.store / "checkpoints" / m["id"] / "images"))
        t0 = time.monotonic()
        restored = bed.fscr("restore", m["id"])
        res.restore_s = time.monotonic() - t0
        res.restore_stages = restored["durations"]
    res.stages = m["durations"]
    return res


def image_pids(images: Path) -> list[int]:
    """Every PID of a dumped tree (CRIU writes one core-PID.img per task)."""
    return [int(p.name.split("-")[1].split(".")[0]) for p in images.glob("core-*.img")]


def wait_pids_free(pids: list[int]) -> None:
    while any(Path(f"/proc/{p}").exists() for p in pids):
        reap()
        time.sleep(0.02)


def reap() -> None:
    """Reap the dead workloads: orphans come to this process (a child subreaper, see main),
    not to PID 1, which here reaps them about 1.7 s late and so holds the PIDs a restore
    needs."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def run_criu(bed: Bed, tar: bool, restore: bool, over_rpc: bool = False) -> Result:
    """CRIU on the same frozen cgroup, the way one would use it alone: unlinked files as
    ghost files, and (criu+tar) the volume's data copied out while frozen. The restore is
    `criu restore -d`, or (over_rpc) the least a Python command driving CRIU's RPC costs
    (rpc_floor.py)."""
    criu = require(version=True)
    images = bed.root / "criu-images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    cg = freezer.cgroup_of(bed.pid)
    t0 = time.monotonic()
    cg.freeze()
    try:
        subprocess.run([criu, "dump", "-t", str(bed.pid), "-D", str(images), "-o", "dump.log",
                        "--freeze-cgroup", str(cg.path), "--ghost-limit", "4G",
                        *([] if restore else ["--leave-running"])], check=True,
                       capture_output=True)
        if tar:
            subprocess.run(["tar", "-C", str(bed.vol), "--exclude", "./ready", "-cf",
                            str(images / "volume.tar"), "."], check=True, capture_output=True)
    finally:
        cg.thaw()
        freeze = time.monotonic() - t0
    res = Result(Case(), "criu+tar" if tar else "criu", freeze, freeze, du(images))
    if restore:
        wait_pids_free(image_pids(images))  # CRIU needs the PIDs free
        argv = ([sys.executable, str(Path(__file__).with_name("rpc_floor.py")), criu,
                 str(images)] if over_rpc else
                [criu, "restore", "-D", str(images), "-o", "restore.log", "--restore-detached"])
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True)
        if out.returncode != 0:
            log = (images / "restore.log").read_text(errors="replace").splitlines()
            raise RuntimeError("criu restore failed: " + " | ".join(
                x for x in log if "Error" in x)[-500:])
        res.restore_s = time.monotonic() - t0
    shutil.rmtree(images, ignore_errors=True)
    return res


def send_sizes(bed: Bed, data_mb: int, change_mb: int) -> dict:
    """Size and time of a full stream, and of an incremental one after a `change_mb` change."""
    bed.prepare(Case(data_mb=data_mb))
    out = {}
    first = bed.fscr("checkpoint", "--pid", str(bed.pid), "--volume", str(bed.vol))
    with open(bed.vol / "data", "r+b") as f:
        f.seek(data_mb * MB // 3)
        f.write(os.urandom(change_mb * MB))
    second = bed.fscr("checkpoint", "--pid", str(bed.pid), "--volume", str(bed.vol))
    for kind, args in (("full", [first["id"]]),
                       ("incremental", [second["id"], "--parent", first["id"]])):
        stream = bed.root / "stream"
        t0 = time.monotonic()
        with open(stream, "wb") as f:
            subprocess.run([str(FSCR), "send", *args], stdout=f, check=True,
                           stderr=subprocess.DEVNULL,
                           env=os.environ | {"FSCR_STORE": str(bed.store)})
        out[kind] = {"bytes": stream.stat().st_size, "seconds": round(time.monotonic() - t0, 3)}
        stream.unlink()
    out["data_mb"], out["change_mb"] = data_mb, change_mb
    return out


def write_bandwidth(where: Path, sync: bool) -> float:
    """MB/s of a 512 MB write (dd) to the store's filesystem, where CRIU writes its images:
    with fdatasync, the disk; without, the page cache (CRIU does not sync). The floor for a
    dump of N MB of memory is N over this."""
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={where}/dd.bin", "bs=1M", "count=512",
                    *(["conv=fdatasync"] if sync else [])], check=True, capture_output=True)
    secs = time.monotonic() - t0
    (where / "dd.bin").unlink()
    return 512 / secs


SEND_MB = 1024  # the volume for the send/receive streams


def cases(full: bool) -> list[Case]:
    """The sweeps, in the order of the report. They run grouped by volume data (each size
    written once), the size the send streams use last, so the send reuses its volume."""
    if not full:
        return [Case(), Case(data_mb=1024), Case(unlinked_mb=100), Case(procs=10)]
    out = [Case(data_mb=d) for d in (100, 1024, 4096)]
    out += [Case(unlinked_mb=u) for u in (10, 1024)]
    out += [Case(rss_mb=1024)]
    out += [Case(procs=p) for p in (10, 100)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the full sweeps")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    ap.add_argument("--out", default="results", help="results directory")
    args = ap.parse_args()
    started = time.monotonic()
    # Orphaned workloads (fscr run and CRIU's restore detach them) become this process's
    # children, so reap() frees their PIDs at once.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    # fscr as installed: its bytecode compiled (pip does that; an editable install writes it
    # on first run unless PYTHONDONTWRITEBYTECODE is set, and then every command would pay
    # ~0.1 s to compile fscr's modules again).
    compileall.compile_dir(Path(fscr.__file__).parent, quiet=1)
    print(f"fscr from {Path(fscr.__file__).parent}, CLI {FSCR}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bed = Bed(Path("/var/tmp/fscr-bench"), 24 if args.full else 8)  # a sparse image
    results: list[Result] = []
    try:
        bandwidth = {"disk_write_mb_s": round(write_bandwidth(bed.root, True), 1),
                     "cache_write_mb_s": round(write_bandwidth(bed.root, False), 1)}
        todo = sorted(cases(args.full), key=lambda c: (c.data_mb == SEND_MB, c.data_mb))
        for i, case in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {case.label()}", file=sys.stderr, flush=True)
            results += run_case(bed, case, args.runs)
        print("send: full and incremental streams", file=sys.stderr, flush=True)
        sent = send_sizes(bed, SEND_MB, 10)
        order = cases(args.full)
        results.sort(key=lambda r: order.index(r.case))
    finally:
        bed.close()
    report = {**bandwidth, "mode": "full" if args.full else "short", "runs": args.runs,
              "elapsed_s": round(time.monotonic() - started, 1),
              "results": [asdict(r) for r in results], "send": sent}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    plots(report, out)
    print((out / "results.md").read_text())


def run_case(bed: Bed, case: Case, n: int) -> list[Result]:
    """`n` runs of every configuration, interleaved (a slow moment of the machine hits them
    alike), the tree left running; then `n` runs of fscr and of CRIU alone that kill the tree
    and time its restore. Those are apart: with --kill fscr commits (and checksums the
    images) before it thaws, and a killed tree's window is no downtime anyone sees."""
    runs: dict[str, list[Result]] = {c: [] for c in CONFIGS}
    restores: dict[str, list[Result]] = {"fscr": [], "criu": []}
    for r in range(n):
        for config in CONFIGS:
            bed.prepare(case)
            res = measure(bed, config, restore=False)
            runs[config].append(res)
            print(f"    {config:<12} run {r + 1}: freeze {res.freeze_s * 1000:8.1f} ms, "
                  f"written {res.written_bytes / MB:8.1f} MB", file=sys.stderr, flush=True)
    for r in range(n):
        for config in restores:
            bed.prepare(case)
            res = measure(bed, config, restore=True)
            restores[config].append(res)
            print(f"    {config:<12} restore {r + 1}: {res.restore_s * 1000:8.1f} ms",
                  file=sys.stderr, flush=True)
    out = []
    for config, done in runs.items():
        m = median(done)
        m.case = case
        if config in restores:
            by_time = sorted(restores[config], key=lambda x: x.restore_s)
            mid = by_time[len(by_time) // 2]
            m.restore_s = statistics.median(x.restore_s for x in by_time)
            m.restore_stages = mid.restore_stages
        out.append(m)
    return out


def measure(bed: Bed, config: str, restore: bool) -> Result:
    if config == "fscr":
        return run_fscr(bed, "criu", restore)
    if config == "freeze-only":
        return run_fscr(bed, "freeze-only", False)
    return run_criu(bed, config == "criu+tar", restore)


def median(runs: list[Result]) -> Result:
    first = runs[0]
    return Result(first.case, first.config,
                  statistics.median(r.freeze_s for r in runs),
                  statistics.median(r.total_s for r in runs),
                  int(statistics.median(r.written_bytes for r in runs)),
                  None, first.stages)


if __name__ == "__main__":
    main()
