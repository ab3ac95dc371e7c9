"""`fscr gc`: finish or undo the runs whose fscr died, from their journals.

Everything gc touches is named in a journal that a run wrote before making it, and carries that
run's checkpoint id (relinks unlink-at-restart-<id>-<n>, snapshots .fscr-snapshots/<id>/<n>,
cgroup fscr/ckpt_<id>, the store's checkpoints/<id>): so gc can prove a thing is its own. A run
whose owner (PID and start time) still lives is left alone; a committed checkpoint is never
removed, nor a rescue snapshot of a restore that completed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import relink, snapshot
from .journal import read
from .pipeline import complete_swaps, record_incarnation, return_to_original_cgroup
from .process.freezer import Cgroup
from .process.target import put_back
from .process.tree import Task
from .store import Store


@dataclass
class Run:
    """One journal: an unfinished or running checkpoint or restore."""

    path: Path
    entries: list[dict[str, Any]]

    @property
    def begin(self) -> dict[str, Any]:
        return self.entries[0]

    @property
    def id(self) -> str:
        return self.begin["id"]

    @property
    def op(self) -> str:
        return self.begin["op"]

    def owner_alive(self) -> bool:
        return Task(self.begin["pid"], self.begin["starttime"]).alive()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["event"] == name]


@dataclass
class Plan:
    """What gc will do for one run: descriptions and the steps that do them."""

    run: Run
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, do: Callable[[], None]) -> None:
        self.steps.append((what, do))


def runs(store: Store) -> list[Run]:
    out = []
    for path in sorted((store.root / "journal").glob("*.jsonl")):
        entries = read(path)
        if entries and entries[0].get("event") == "begin":
            out.append(Run(path, entries))
        else:  # died before its first line was complete: nothing was done yet
            out.append(Run(path, [{"event": "begin", "op": "unknown", "id": path.stem,
                                   "pid": 0, "starttime": 0}]))
    return out


def unfinished(store: Store) -> list[Run]:
    """Runs whose fscr is gone."""
    return [r for r in runs(store) if not r.owner_alive()]


def _settle(task: Task, grace: float) -> None:
    """Wait for a helper (CRIU) to finish, then kill it: its parasite may be inside tasks."""
    deadline = time.monotonic() + grace
    while task.alive():
        if time.monotonic() > deadline:
            try:
                os.kill(task.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _criu_step(plan: Plan, grace: float) -> None:
    for e in plan.run.events("criu"):
        criu = Task(e["pid"], e["starttime"])
        if criu.alive():
            plan.add(f"wait for CRIU (PID {criu.pid}) to finish, kill it after {grace:.0f}s",
                     lambda c=criu: _settle(c, grace))


def _thaw_steps(plan: Plan) -> None:
    for e in plan.run.events("freeze"):
        cg = Cgroup(e["kind"], Path(e["cgroup"]))
        if cg.exists() and cg.frozen():
            plan.add(f"thaw cgroup {cg.path}", cg.thaw)
    moves = plan.run.events("move")
    if moves:
        own = Cgroup(moves[0]["kind"], Path(moves[0]["cgroup"]))
        moved = {e["pid"]: e["original"] for e in moves}
        if own.exists():
            plan.add(f"put {len(moved)} task(s) back in their cgroups, remove {own.path}",
                     lambda: put_back(moved, own))


def _relink_steps(plan: Plan) -> None:
    for vol in plan.run.begin.get("volumes", []):
        names = relink.list_relinks(Path(vol), plan.run.id)
        if names:
            plan.add(f"remove {len(names)} relink(s) unlink-at-restart-{plan.run.id}-* "
                     f"from {vol}", lambda v=vol: relink.remove_relinks(Path(v), plan.run.id))


def plan_checkpoint(store: Store, run: Run) -> Plan:
    plan = Plan(run)
    _criu_step(plan, grace=10)
    _thaw_steps(plan)  # first: a frozen workload is thawed at once
    _relink_steps(plan)
    if not store.committed(run.id):
        provider = snapshot.get(run.begin.get("snapshot", "btrfs"))
        for e in run.events("snapshot"):
            path = snapshot.snapshot_root(Path(e["volume"])) / run.id / str(e["n"])
            if path.exists():
                plan.add(f"delete half-made snapshot {path}",
                         lambda p=path: provider.delete(str(p)))
        if store.exists(run.id):
            plan.add(f"remove unfinished checkpoint directory {store.dir(run.id)}",
                     lambda: store.remove(run.id))
    return plan


def plan_restore(store: Store, run: Run) -> Plan:
    plan = Plan(run)
    _criu_step(plan, grace=30)
    try:
        m = store.load(run.id)
    except Exception:  # the checkpoint was deleted since: only the swaps can be undone
        m = None
    provider = snapshot.get(m.snapshot if m else "btrfs")
    swaps = run.events("swap")
    pidfile = store.dir(run.id) / "restore.pid"  # CRIU writes it once the tree runs
    restored = [e["pid"] for e in run.events("restored")]
    if not restored and pidfile.exists():
        restored = [int(pidfile.read_text().strip())]
    if restored and m is not None:
        plan.add(f"record the restored tree (PID {restored[0]})",
                 lambda: record_incarnation(store, m, restored[0]))
    if restored:
        plan.add("remove CRIU's pidfile", lambda: pidfile.unlink(missing_ok=True))
        _relink_steps(plan)
        rescues = [Path(e["rescue"]) for e in swaps if Path(e["rescue"]).exists()]
        plan.add(f"seal and record rescue snapshots {[str(r) for r in rescues]}",
                 lambda: complete_swaps(store, provider, rescues))
        if m is not None and m.cgroup.original != m.cgroup.path:
            plan.add(f"move the restored tree back to cgroup {m.cgroup.original}",
                     lambda: return_to_original_cgroup(m))
        return plan
    copies = {e["volume"]: e["copy"] for e in run.events("copy")}
    for e in reversed(swaps):
        vol, rescue = Path(e["volume"]), Path(e["rescue"])
        if not rescue.exists():
            continue
        if e["volume"] in copies and provider.identity(vol) == copies[e["volume"]]:
            plan.add(f"put {vol} back as it was before the restore",
                     lambda v=vol, r=rescue: provider.swap_back(v, r))
        else:
            plan.add(f"delete unused restore copy {rescue}",
                     lambda r=rescue: provider.delete(str(r)))
    return plan


def plan(store: Store, run: Run) -> Plan:
    p = plan_restore(store, run) if run.op == "restore" else plan_checkpoint(store, run)
    p.add(f"remove journal {run.path.name}", lambda: run.path.unlink(missing_ok=True))
    return p


def collect(store: Store, dry_run: bool = False) -> list[dict[str, Any]]:
    """Finish or undo every unfinished run; with dry_run, only say what would be done."""
    report = []
    for run in unfinished(store):
        p = plan(store, run)
        for _, do in [] if dry_run else p.steps:
            do()
        report.append({"id": run.id, "op": run.op, "pid": run.begin["pid"],
                       "actions": [what for what, _ in p.steps], "done": not dry_run})
    return report
