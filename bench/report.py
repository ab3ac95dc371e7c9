"""The bench's report: the table, each of issue 6's targets as a ratio from the same run, and
the plots; and issue 19's (bench/stall.py). Works on the JSON report alone, so a results.json
can be rendered again."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MB = 1 << 20
CONFIGS = ("fscr", "criu", "criu+tar", "freeze-only")


def label(case: dict) -> str:
    return (f"data {case['data_mb']} MB, unlinked {case['unlinked_mb']} MB, "
            f"rss {case['rss_mb']} MB, {case['procs']} proc")


def markdown(report: dict) -> str:
    lines = [f"Write bandwidth to the store's filesystem (dd, 512 MB): "
             f"{report['disk_write_mb_s']} MB/s with fdatasync, {report['cache_write_mb_s']} "
             f"MB/s into the page cache. {report['mode'].capitalize()} mode; median of "
             f"{report['runs']} runs per configuration (restores: {report['runs']} more runs "
             f"with --kill). The whole run took {report['elapsed_s']:.0f} s.", "",
             "| case | config | freeze window (ms) | total (ms) | written (MB) | restore (ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        restore = f"{r['restore_s'] * 1000:.0f}" if r["restore_s"] is not None else ""
        lines.append(f"| {label(r['case'])} | {r['config']} | {r['freeze_s'] * 1000:.1f} | "
                     f"{r['total_s'] * 1000:.0f} | {r['written_bytes'] / MB:.1f} | {restore} |")
    lines += ["", "fscr's own stage times (ms): checkpoint (first run), restore (the median "
              "one):", "", "| case | checkpoint | restore |", "| --- | --- | --- |"]
    for r in report["results"]:
        if r["config"] == "fscr":
            lines.append(f"| {label(r['case'])} | {_stages(r['stages'])} | "
                         f"{_stages(r['restore_stages'])} |")
    s = report["send"]
    lines += ["", f"fscr send, {s['data_mb']} MB volume, then a {s['change_mb']} MB change:", "",
              "| stream | bytes | seconds |", "| --- | ---: | ---: |"]
    for kind in ("full", "incremental"):
        lines.append(f"| {kind} | {s[kind]['bytes']} | {s[kind]['seconds']} |")
    ratio = s["incremental"]["bytes"] / s["full"]["bytes"]
    lines.append(f"\nThe incremental stream is {ratio:.1%} of the full one.")
    lines += ["", "Targets (issue 6), from this run:", ""] + [f"- {t}" for t in targets(report)]
    return "\n".join(lines) + "\n"


def _stages(stages: dict | None) -> str:
    return ", ".join(f"{k} {v * 1000:.0f}" for k, v in (stages or {}).items())


def targets(report: dict) -> list[str]:
    """Each target of issue 6 as a ratio of this run's medians, with met/missed."""
    rows = report["results"]

    def get(config: str, **want: int) -> dict | None:
        base = {"data_mb": 100, "unlinked_mb": 0, "rss_mb": 64, "procs": 1} | want
        return next((r for r in rows if r["config"] == config and r["case"] == base), None)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = []
    for r in rows:
        c = r["case"]
        crit = get("criu", **c)
        if r["config"] != "fscr" or c["unlinked_mb"] or crit is None:
            continue
        ratio, extra = r["freeze_s"] / crit["freeze_s"], (r["freeze_s"] - crit["freeze_s"]) * 1000
        out.append(f"freeze window vs CRIU alone, {label(c)}: {ratio:.2f}x ({extra:+.0f} ms); "
                   f"at most 1.10x: {verdict(ratio <= 1.10)}, +50 ms at most: "
                   f"{verdict(extra <= 50)}")
    sizes = sorted(r["case"]["data_mb"] for r in rows if r["config"] == "fscr"
                   and get("fscr", data_mb=r["case"]["data_mb"]) is r)
    if len(sizes) > 1:
        lo, hi = get("fscr", data_mb=sizes[0]), get("fscr", data_mb=sizes[-1])
        ratio = hi["freeze_s"] / lo["freeze_s"]
        shown = ", ".join(f"{get('fscr', data_mb=d)['freeze_s'] * 1000:.0f} ms at {d} MB"
                          for d in sizes)
        out.append(f"fscr's freeze window against volume data: {shown}; {sizes[-1]} MB vs "
                   f"{sizes[0]} MB: {ratio:.2f}x (no growth: at most 1.10x or +50 ms): "
                   f"{verdict(ratio <= 1.10 or hi['freeze_s'] - lo['freeze_s'] <= 0.05)}")
    unlinked = max((r["case"]["unlinked_mb"] for r in rows), default=0)
    f, c = get("fscr", unlinked_mb=unlinked), get("criu", unlinked_mb=unlinked)
    if unlinked and f and c:
        share, faster = f["written_bytes"] / c["written_bytes"], c["freeze_s"] / f["freeze_s"]
        out.append(f"unlinked file of {unlinked} MB: fscr writes {share:.1%} of CRIU's bytes "
                   f"(under 1%: {verdict(share < 0.01)}); its window is {faster:.1f}x shorter "
                   f"(at least 10x: {verdict(faster >= 10)})"
                   + ("" if unlinked >= 1024 else "; the targets are stated for 1 GB"))
    f, t = get("fscr", data_mb=1024), get("criu+tar", data_mb=1024)
    if f and t:
        faster = t["freeze_s"] / f["freeze_s"]
        out.append(f"1 GB of volume data: fscr's window is {faster:.1f}x shorter than "
                   f"CRIU + tar (at least 20x: {verdict(faster >= 20)})")
    for r in rows:
        crit = get("criu", **r["case"])
        if r["config"] == "fscr" and r["restore_s"] and crit and crit["restore_s"]:
            ratio = r["restore_s"] / crit["restore_s"]
            out.append(f"restore vs CRIU alone, {label(r['case'])}: {ratio:.2f}x "
                       f"({r['restore_s'] * 1000:.0f} vs {crit['restore_s'] * 1000:.0f} ms; "
                       f"at most 1.2x: {verdict(ratio <= 1.2)})")
    return out


# ------------------------------------------------------------------ issue 19 (bench/stall.py)

def _ms(x: float | None) -> str:
    return "" if x is None else f"{x * 1000:.1f}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _from_criu(run: dict) -> float:
    """The first answer counted from the start of fscr's `restore` stage (CRIU's run): the
    command's wall time less that stage and the ones after it is when the stage began."""
    after = sum(v for k, v in run["durations"].items()
                if k in ("restore", "verify pages", "pages in", "finish"))
    return run["first_answer_s"] - (run["command_s"] - after)


def stall_markdown(report: dict) -> str:
    """The stall each checkpoint cost the workload (as it measured it) beside fscr's own
    freeze_window, the restores' wall times, and issue 19's targets."""
    lines = [f"{report['mode'].capitalize()} mode, {report['runs']} interleaved runs per "
             f"configuration, medians (min-max); the whole run took "
             f"{report.get('elapsed_s', 0):.0f} s.", "",
             "| case | config | stall the process saw (ms) | fscr's freeze_window (ms) |",
             "| --- | --- | ---: | ---: |"]
    for r in report["stall"]:
        st = [x["stall_s"] for x in r["runs"]]
        win = [x["freeze_window_s"] for x in r["runs"] if x["freeze_window_s"] is not None]
        lines.append(f"| {r['case']} | {r['config']} | {_ms(_med(st))} ({_ms(min(st))}-"
                     f"{_ms(max(st))}) | {_ms(_med(win)) if win else ''} |")
    lines += ["", "| restore, whole command | config | wall (ms) |", "| --- | --- | ---: |"]
    for r in report["restore"]:
        s = r["seconds"]
        lines.append(f"| {r['case']} | {r['config']} | {_ms(_med(s))} ({_ms(min(s))}-"
                     f"{_ms(max(s))}) |")
    lines += ["", "| 1 GB RSS restore | first answer (ms) | from CRIU's start (ms) | "
              "whole command (ms) |", "| --- | ---: | ---: | ---: |"]
    for kind, runs in report["lazy"].items():
        if runs:
            name = "fscr restore --lazy" if kind == "lazy" else "fscr restore"
            lines.append(f"| {name} | {_ms(_med([x['first_answer_s'] for x in runs]))} | "
                         f"{_ms(_med([_from_criu(x) for x in runs]))} | "
                         f"{_ms(_med([x['command_s'] for x in runs]))} |")
    lines += ["", "From CRIU's start: the first answer less the time the command took before "
              "its `restore` stage (its wall time less that stage and those after it)."]
    lines += ["", "Targets (issue 19), from this run:", ""]
    lines += [f"- {t}" for t in stall_targets(report)]
    return "\n".join(lines) + "\n"


def stall_targets(report: dict) -> list[str]:
    """Each target of issue 19 as a ratio of this run's medians, with met/missed."""
    def stall(case: str, config: str) -> float | None:
        r = next((x for x in report["stall"] if x["case"] == case and x["config"] == config),
                 None)
        return _med([x["stall_s"] for x in r["runs"]]) if r else None

    def restore(case: str, config: str) -> float | None:
        r = next((x for x in report["restore"] if x["case"] == case and x["config"] == config),
                 None)
        return _med(r["seconds"]) if r else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = []
    f, c = stall("tiny", "fscr"), stall("tiny", "criu")
    if f is not None and c is not None:
        out.append(f"tiny process: stall under fscr {f * 1000:.1f} ms vs CRIU alone "
                   f"{c * 1000:.1f} ms ({(f - c) * 1000:+.1f} ms; at most +10 ms: "
                   f"{verdict(f - c <= 0.010)})")
    for case in ("64 MB RSS", "1 GB RSS"):
        f, c = stall(case, "fscr"), stall(case, "criu")
        if f is not None and c is not None:
            out.append(f"{case}: stall under fscr {f / c:.2f}x CRIU alone's ({f * 1000:.0f} vs "
                       f"{c * 1000:.0f} ms; at most 1.05x: {verdict(f / c <= 1.05)})")
    f, c = stall("1 GB unlinked", "fscr"), stall("1 GB unlinked", "criu")
    if f is not None and c is not None:
        out.append(f"1 GB unlinked file: stall under fscr {f / c:.3f}x CRIU alone's "
                   f"({f * 1000:.0f} vs {c * 1000:.0f} ms; at most 0.05x: "
                   f"{verdict(f / c <= 0.05)})")
    f, c = restore("tiny", "fscr"), restore("tiny", "criu")
    if f is not None and c is not None:
        out.append(f"restore, tiny process: fscr {f * 1000:.0f} ms vs criu restore -d "
                   f"{c * 1000:.0f} ms ({(f - c) * 1000:+.0f} ms; at most +100 ms: "
                   f"{verdict(f - c <= 0.100)})")
    f, c = restore("64 MB RSS", "fscr"), restore("64 MB RSS", "criu")
    if f is not None and c is not None:
        out.append(f"restore, 64 MB process: fscr {f / c:.2f}x criu restore -d "
                   f"({f * 1000:.0f} vs {c * 1000:.0f} ms; at most 1.3x: {verdict(f / c <= 1.3)})")
    for case in ("tiny", "64 MB RSS"):
        p, c = restore(case, "python rpc floor"), restore(case, "criu")
        if p is not None and c is not None:
            out.append(f"floor, {case}: a Python command restoring over CRIU's RPC and doing "
                       f"nothing else takes {p / c:.2f}x criu restore -d ({(p - c) * 1000:+.0f} "
                       "ms)")
    runs = report["lazy"].get("lazy") or []
    if runs:
        first = _med([x["first_answer_s"] for x in runs])
        criu = _med([_from_criu(x) for x in runs])
        out.append(f"restore --lazy, 1 GB process: first answer {first * 1000:.0f} ms after the "
                   f"command's start (within 100 ms: {verdict(first <= 0.100)}); "
                   f"{criu * 1000:.0f} ms after CRIU's start (within 100 ms: "
                   f"{verdict(criu <= 0.100)})")
    return out


def plots(report: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots (pip install matplotlib)", file=sys.stderr)
        return
    rows = report["results"]
    labels = list(dict.fromkeys(label(r["case"]) for r in rows))
    for metric, title, scale in (("freeze_s", "freeze window (ms)", 1000),
                                 ("written_bytes", "bytes written (MB)", 1 / MB)):
        fig, ax = plt.subplots(figsize=(10, 4 + len(labels) * 0.3))
        width = 0.2
        for i, c in enumerate(CONFIGS):
            vals = [next((r[metric] * scale for r in rows if r["config"] == c
                          and label(r["case"]) == lab), 0) for lab in labels]
            ax.barh([y + i * width for y in range(len(labels))], vals, width, label=c)
        ax.set_yticks([y + 1.5 * width for y in range(len(labels))], labels)
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png")
        plt.close(fig)


if __name__ == "__main__":
    # python -m bench.report DIR: render DIR/results.json again
    where = Path(sys.argv[1])
    rep = json.loads((where / "results.json").read_text())
    if "stall" in rep:  # bench/stall.py's (issue 19)
        (where / "results.md").write_text(stall_markdown(rep))
    else:
        (where / "results.md").write_text(markdown(rep))
        plots(rep, where)
