"""Issue 19's benchmark: the stall a checkpoint costs the workload, as the workload measures
it, and the restore's wall time.

    sudo .venv/bin/python -m bench.stall [--full] [--runs N] [--out DIR]

The workload (bench/workload.py with a control directory) runs a 1 ms tick loop and reports
the largest gap between two ticks since its last report. Each checkpoint is bracketed by two
reports: the second is the stall the checkpoint caused. Configurations, interleaved:

  criu           `criu dump --leave-running --freeze-cgroup CG` (CRIU freezes by itself),
                 unlinked files as ghost files
  criu+snapshot  the same, plus a CRIU action script that takes a read-only btrfs snapshot
                 of the volume on `post-dump` (tasks still stopped, images written)
  fscr           `fscr checkpoint --pid P --volume V`; its own `freeze_window` beside

Cases: a tiny process (1 MB), 64 MB and 1 GB of RSS, a 1 GB unlinked file (1 MB of RSS).
Then restores, each timed as a whole command once the dumped PIDs are free: `fscr restore`
against `criu restore -d` and against the floor of any Python command that restores through
CRIU's RPC (bench/rpc_floor.py: the interpreter, pycriu's messages, one request, nothing of
fscr), for the tiny and the 64 MB process; and `fscr restore --lazy` of
a 1 GB process: the time from the command's start until the restored process answers a
request (its answer reads pages all over its memory), against a plain `fscr restore`.
Writes results.json and results.md (bench/report.py: every issue-19 target as a ratio).
"""

from __future__ import annotations

import argparse
import compileall
import ctypes
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fscr
from fscr.backends.criu import require
from fscr.process import freezer

from .__main__ import (
    FSCR,
    PR_SET_CHILD_SUBREAPER,
    Bed,
    Case,
    image_pids,
    run_criu,
    run_fscr,
    wait_pids_free,
)
from .report import stall_markdown

CONFIGS = ("criu", "criu+snapshot", "fscr")
CASES = {"tiny": Case(data_mb=10, rss_mb=1), "64 MB RSS": Case(data_mb=10, rss_mb=64),
         "1 GB RSS": Case(data_mb=10, rss_mb=1024),
         "1 GB unlinked": Case(data_mb=10, rss_mb=1, unlinked_mb=1024)}
RESTORE_CASES = ("tiny", "64 MB RSS")
POST_DUMP = """#!/bin/sh
# CRIU's action script: on post-dump (images written, every task still stopped) snapshot
# the volume, as fscr does at that point.
[ "$CRIU_SCRIPT_ACTION" = post-dump ] || exit 0
exec btrfs subvolume snapshot -r "$BENCH_VOL" "$BENCH_SNAP" >/dev/null
"""


def ask(bed: Bed, timeout: float = 120) -> dict:
    """The workload's report: its largest tick gap since the last one, and a digest of a
    sample of its memory."""
    assert bed.ctl is not None
    token = secrets.token_hex(4)
    (bed.ctl / f"ask-{token}").touch()
    answer = bed.ctl / f"answer-{token}"
    deadline = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the workload did not answer")
        time.sleep(0.001)
    data = json.loads(answer.read_text())
    answer.unlink()
    return data


def criu_dump(bed: Bed, snapshot: bool) -> None:
    """CRIU alone, as one would run it: it freezes the cgroup itself, dumps, thaws."""
    images = bed.root / "criu-images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    argv = [require(version=True), "dump", "-t", str(bed.pid), "-D", str(images), "-o", "dump.log",
            "--leave-running", "--freeze-cgroup", str(freezer.cgroup_of(bed.pid).path),
            "--ghost-limit", "2G"]
    env = dict(os.environ)
    if snapshot:
        script = bed.root / "post-dump.sh"
        script.write_text(POST_DUMP)
        script.chmod(0o700)
        # Under .fscr-snapshots/*/: Bed.prepare deletes it before the next run.
        dest = bed.mnt / ".fscr-snapshots" / "bench_criu" / secrets.token_hex(2)
        dest.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--action-script", str(script)]
        env |= {"BENCH_VOL": str(bed.vol), "BENCH_SNAP": str(dest)}
    out = subprocess.run(argv, capture_output=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"criu dump failed: {(images / 'dump.log').read_text()[-500:]}")
    shutil.rmtree(images, ignore_errors=True)


def stall_once(bed: Bed, config: str) -> dict:
    ask(bed)  # resets the workload's largest gap
    window = None
    if config == "fscr":
        m = bed.fscr("checkpoint", "--pid", str(bed.pid), "--volume", str(bed.vol))
        window = m["durations"]["freeze_window"]
    else:
        criu_dump(bed, snapshot=config == "criu+snapshot")
    return {"stall_s": ask(bed)["stall_s"], "freeze_window_s": window}


def lazy_once(bed: Bed, lazy: bool) -> dict:
    """Checkpoint the 1 GB process with --kill, then time its restore until it answers."""
    before = ask(bed)["digest"]
    m = bed.fscr("checkpoint", "--pid", str(bed.pid), "--volume", str(bed.vol), "--kill")
    wait_pids_free(image_pids(bed.store / "checkpoints" / m["id"] / "images"))
    assert bed.ctl is not None
    for old in bed.ctl.iterdir():
        old.unlink()
    t0 = time.monotonic()
    proc = subprocess.Popen([str(FSCR), "restore", m["id"], "--json",
                             *(["--lazy"] if lazy else [])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"FSCR_STORE": str(bed.store)})
    (bed.ctl / "ask-first").touch()
    answer = bed.ctl / "answer-first"
    deadline = t0 + 600
    while not answer.exists():
        if proc.poll() not in (None, 0) or time.monotonic() > deadline:
            break  # failed: reported below
        time.sleep(0.001)
    first = time.monotonic() - t0
    out, err = proc.communicate()
    total = time.monotonic() - t0
    if proc.returncode != 0 or not answer.exists():
        raise RuntimeError(f"fscr restore failed or the process never answered: {err.strip()}")
    got = json.loads(answer.read_text())["digest"]
    if got != before:
        raise RuntimeError("the restored process's memory differs from the checkpoint's")
    return {"first_answer_s": first, "command_s": total,
            "durations": json.loads(out)["durations"]}


PARTS = ("stall", "restore", "lazy")


def run(runs: int, full: bool, parts: tuple[str, ...] = PARTS) -> dict:
    bed = Bed(Path("/var/tmp/fscr-bench-stall"), 8)
    bed.ctl = bed.root / "ctl"
    bed.ctl.mkdir()
    stalls: list[dict] = []
    restores: list[dict] = []
    lazy: dict[str, list[dict]] = {"lazy": [], "plain": []}
    try:
        for name, case in CASES.items() if "stall" in parts else ():
            print(f"stall: {name}", file=sys.stderr, flush=True)
            got: dict[str, list[dict]] = {c: [] for c in CONFIGS}
            for _ in range(runs):
                for config in CONFIGS:
                    bed.prepare(case)
                    got[config].append(stall_once(bed, config))
            stalls += [{"case": name, "config": c, "runs": r} for c, r in got.items()]
        for name in RESTORE_CASES if "restore" in parts else ():
            print(f"restore: {name}", file=sys.stderr, flush=True)
            times: dict[str, list[float]] = {"fscr": [], "criu": [], "python rpc floor": []}
            for _ in range(runs):
                bed.prepare(CASES[name])
                times["fscr"].append(run_fscr(bed, "criu", True).restore_s or 0.0)
                bed.prepare(CASES[name])
                times["criu"].append(run_criu(bed, False, True).restore_s or 0.0)
                bed.prepare(CASES[name])
                times["python rpc floor"].append(
                    run_criu(bed, False, True, over_rpc=True).restore_s or 0.0)
            restores += [{"case": name, "config": c, "seconds": s} for c, s in times.items()]
        if "lazy" in parts:
            print("restore --lazy: 1 GB RSS", file=sys.stderr, flush=True)
        for _ in range(runs if full else max(2, runs - 1)) if "lazy" in parts else ():
            for kind in ("lazy", "plain"):
                bed.prepare(CASES["1 GB RSS"])
                lazy[kind].append(lazy_once(bed, kind == "lazy"))
    finally:
        bed.close()
    return {"mode": "full" if full else "short", "runs": runs, "stall": stalls,
            "restore": restores, "lazy": lazy}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="more runs (6 unless --runs)")
    ap.add_argument("--runs", type=int, default=None, help="runs per configuration")
    ap.add_argument("--out", default="results-stall", help="results directory")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run only this part (repeatable; default: all)")
    args = ap.parse_args()
    runs = args.runs or (6 if args.full else 3)
    started = time.monotonic()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    compileall.compile_dir(Path(fscr.__file__).parent, quiet=1)  # as installed (see bench)
    report = run(runs, args.full, tuple(args.only or PARTS))
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(stall_markdown(report))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
