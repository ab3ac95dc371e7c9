"""results.json and its markdown rendering (`python -m conformance.report DIR` renders a
results.json again)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

STATUSES = ("pass", "fail", "timeout", "skip", "left-out")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Counts per mode, and the comparisons that matter: of the tests CRIU alone passes, how
    many each fscr mode passes, and which fail (identity tests apart)."""
    tests, modes = report["tests"], report["modes"]
    counts = {m: {s: 0 for s in STATUSES} for m in modes}
    for t in tests.values():
        for m in modes:
            counts[m][t["modes"][m]["status"]] += 1
    base = [n for n, t in tests.items() if t["modes"].get("criu", {}).get("status") == "pass"]
    out: dict[str, Any] = {"counts": counts, "criu_passes": len(base)}
    for m in (x for x in modes if x.startswith("fscr")):
        runs = [n for n in base if tests[n]["modes"][m]["status"] != "left-out"]
        passed = [n for n in runs if tests[n]["modes"][m]["status"] == "pass"]
        failed = [n for n in runs if n not in passed]
        out[m] = {"run": len(runs), "passed": len(passed),
                  "bugs": [n for n in failed if not tests[n].get("identity")],
                  "identity": [n for n in failed if tests[n].get("identity")]}
    return out


def markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown: summary, fscr failures where CRIU passes, identity
    tests, CRIU's own failures, left-out and skipped tests with reasons, every result."""
    s, tests, modes = summary(report), report["tests"], report["modes"]
    out = [f"Run of {report['started']} on {report['machine']}, {report['elapsed_s']:.0f} s; "
           f"CRIU {report['criu']}, fscr {report['fscr']}.", ""]
    out += ["| mode | " + " | ".join(STATUSES) + " |", "|---" * (len(STATUSES) + 1) + "|"]
    out += [f"| {m} | " + " | ".join(str(s["counts"][m][x]) for x in STATUSES) + " |"
            for m in modes]
    out += ["", f"CRIU alone passes **{s['criu_passes']}** tests."]
    for m in (x for x in modes if x.startswith("fscr")):
        r = s[m]
        out.append(f"Of those, `{m}` runs {r['run']} (the rest are left out) and passes "
                   f"**{r['passed']}**; {len(r['bugs'])} fail (fscr bugs), "
                   f"{len(r['identity'])} are identity tests.")
    out += ["", "## fscr fails where CRIU alone passes", ""]
    out += _failures(tests, [m for m in modes if m.startswith("fscr")], s)
    out += ["", "## Identity tests (st_dev or inode across restore)", ""]
    out += [f"- `{n}`: {t['identity']}; " + ", ".join(
        f"{m} {t['modes'][m]['status']}" for m in modes) for n, t in tests.items()
        if t.get("identity")]
    if "criu" in modes:
        out += ["", "## CRIU alone fails (the baseline: not fscr's to pass)", ""]
        out += _table(tests, "criu", ("fail", "timeout"))
    out += ["", "## Left out of the fscr modes", ""]
    out += _grouped(tests, lambda t: t.get("left_out") if not t.get("skip") else None)
    out += ["", "## Skipped in every mode", ""]
    out += _grouped(tests, lambda t: t.get("skip"))
    out += ["", "## Every result", "", "| test | " + " | ".join(modes) + " |",
            "|---" * (len(modes) + 1) + "|"]
    out += [f"| {n} | " + " | ".join(t["modes"][m]["status"] for m in modes) + " |"
            for n, t in tests.items() if not t.get("skip")]
    return "\n".join(out) + "\n"


def _failures(tests: dict[str, Any], modes: list[str], s: dict[str, Any]) -> list[str]:
    rows = ["| test | mode | stage | explaining line |", "|---|---|---|---|"]
    for m in modes:
        for n in s[m]["bugs"]:
            r = tests[n]["modes"][m]
            criu = r.get("criu_line", "").split(": ", 1)[-1]  # without CRIU's PID prefix
            why = r["why"] + (f" (CRIU: {criu})" if criu and criu not in r["why"] else "")
            rows.append(f"| {n} | {m} | {r['stage']} | {_cell(why)} |")
    return rows if len(rows) > 2 else ["None."]


def _table(tests: dict[str, Any], mode: str, statuses: tuple[str, ...]) -> list[str]:
    rows = ["| test | stage | explaining line |", "|---|---|---|"]
    rows += [f"| {n} | {t['modes'][mode]['stage']} | {_cell(t['modes'][mode]['why'])} |"
             for n, t in tests.items() if t["modes"][mode]["status"] in statuses]
    return rows if len(rows) > 2 else ["None."]


def _grouped(tests: dict[str, Any], reason: Any) -> list[str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for n, t in tests.items():
        if why := reason(t):
            groups[why].append(n)
    return [f"- {why} ({len(names)}): " + ", ".join(f"`{x}`" for x in names)
            for why, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))] or ["None."]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:400]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/conformance")
    report = json.loads((out / "results.json").read_text())
    (out / "results.md").write_text(markdown(report))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
