"""Run CRIU's ZDTM static tests under CRIU alone and under fscr, and report where they differ.

    sudo .venv/bin/python -m conformance [--tests a,b,c | --slice] [--modes criu,fscr,...]
                                         [--out DIR] [--timeout SECONDS] [--list]

Needs the ZDTM build scripts/setup makes (scripts/conformance runs setup first). Each chosen
test runs in each mode (conformance/runner.py) on a loopback btrfs filesystem of the run's own,
one fresh subvolume per test and mode, sequentially; everything made is removed at the end,
also on failure or ^C. Writes DIR/results.json (after every test) and DIR/results.md; CRIU's
and fscr's logs stay in DIR/logs/TEST/MODE/. One progress line per test and mode on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fscr.backends.criu import require

from . import zdtm
from .report import markdown, summary
from .runner import ALL_MODES, MODES, Context, run, session
from .slice import SLICE

REPO = Path(__file__).resolve().parent.parent


def fscr_version() -> str:
    """The commit fscr runs from, and whether fscr/ has uncommitted changes."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "fscr"],
                           capture_output=True, text=True).stdout.strip()
    return f"{head}{' + uncommitted changes to fscr/' if dirty else ''}"


def test_record(t: zdtm.Test) -> dict[str, Any]:
    return {"desc": t.desc, "args": list(t.argv[1:]), "skip": t.skip, "left_out": t.left_out,
            "fscr_args": list(t.fscr_args), "fscr_restore_args": list(t.fscr_restore_args),
            "mapped": list(t.mapped), "identity": t.identity,
            "hook": bool(t.hook), "modes": {}}


def run_all(ctx: Context, tests: list[zdtm.Test], modes: list[str], report: dict[str, Any],
            out: Path) -> None:
    """Every test in every mode, results.json rewritten after each test."""
    started = time.monotonic()
    for i, t in enumerate(tests, 1):
        rec = report["tests"][t.name] = test_record(t)
        if t.skip:  # one line, not one per mode
            rec["modes"] = {m: asdict(run(ctx, t, m)) for m in modes}
            print(f"[{i}/{len(tests)}] {t.name}: skip ({t.skip})"[:400], file=sys.stderr)
            continue
        for mode in modes:
            o = run(ctx, t, mode)
            rec["modes"][mode] = asdict(o)
            why = f"  [{o.stage}] {o.why}" if o.status != "pass" else ""
            print(f"[{i}/{len(tests)}] {t.name} {mode}: {o.status} ({o.seconds:.1f} s){why}"
                  [:400], file=sys.stderr, flush=True)
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "results.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m conformance",
                                 description=__doc__.split("\n")[0])
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--tests", help="comma-separated test names (default: all)")
    pick.add_argument("--slice", action="store_true", help="the slice tests/ runs")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of {', '.join(ALL_MODES)} (default: %(default)s)")
    ap.add_argument("--out", default="results/conformance", help="results directory")
    ap.add_argument("--timeout", type=float, default=zdtm.DEFAULT_TIMEOUT,
                    help="seconds per test and mode (default: %(default)s)")
    ap.add_argument("--list", action="store_true", help="print the plan, run nothing")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in ALL_MODES]:
        ap.error(f"unknown mode {bad[0]}: choose from {', '.join(ALL_MODES)}")
    if os.geteuid() != 0:
        sys.exit("conformance: run as root (it mounts, makes cgroups, runs CRIU)")
    build = zdtm.Build.default()
    if reason := build.missing():
        sys.exit(f"conformance: {reason}")
    names = args.tests.split(",") if args.tests else list(SLICE) if args.slice else None
    criu = str(require(version=True))
    tests = zdtm.plan(build, criu, names, args.timeout)
    if args.list:
        for t in tests:
            how = " ".join(t.fscr_args) + (f" (restore {' '.join(t.fscr_restore_args)})"
                                           if t.fscr_restore_args else "")
            print(f"{t.name:32} {t.skip or t.left_out or how.strip() or '-'}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "elapsed_s": 0.0,
        "machine": f"{socket.gethostname()} ({os.uname().release}, {os.cpu_count()} CPUs)",
        "criu": f"{criu} ({zdtm.CRIU_VERSION})", "fscr": fscr_version(), "modes": modes,
        "timeout_s": args.timeout, "tests": {}}
    with session(build, criu, out / "logs") as ctx:
        try:
            run_all(ctx, tests, modes, report, out)
        finally:
            (out / "results.json").write_text(json.dumps(report, indent=1))
            (out / "results.md").write_text(markdown(report))
    s = summary(report)
    print(f"CRIU alone passes {s['criu_passes']}; " + "; ".join(
        f"{m}: {s[m]['passed']} of {s[m]['run']} run, {len(s[m]['bugs'])} fscr failures"
        for m in modes if m.startswith("fscr") and m in s) + f". Report: {out}/results.md",
        file=sys.stderr)


if __name__ == "__main__":
    main()
