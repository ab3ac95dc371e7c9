"""gc's decisions by table: (journal entries, what gc observes) -> what it would do, in order.

No root, btrfs, CRIU or cgroup is touched: the planners read only the journal and a Facts
(here a table row), so a change to gc is checked in well under a second, as any user
(`pytest -m noroot`). tests/test_crash.py runs the same gc for real, on runs killed at every
journaled step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fscr import gc, snapshot
from fscr.journal import Run, invalid
from fscr.manifest import Manifest
from fscr.process.freezer import Cgroup
from fscr.process.tree import Task
from fscr.store import Store

pytestmark = pytest.mark.noroot

ID = "20261204T120000Z_ab12"
RESCUE = f"rescue_{ID}_20261204T130000Z_cd34"
COPY = f"copy_{ID}_20261204T130000Z_ef56"
VOL = "/mnt/vol"
SNAP = f"/mnt/.fscr-snapshots/{ID}/0"
CG = "/sys/fs/cgroup/app"
OWN = f"/sys/fs/cgroup/fscr/ckpt_{ID}"
STORE = Store(Path("/nonexistent/store"))
DIR = STORE.dir(ID)
CGROUP = {"kind": "v2", "path": "/app", "original": "/app"}


def manifest(**fields: Any) -> Manifest:
    """A stand-in for a manifest: planning reads only its id and network lock."""
    return SimpleNamespace(**fields)  # type: ignore[return-value]


@dataclass
class Seen:
    """What gc would observe on the machine (everything else: absent, dead, not done)."""

    frozen: set[str] = field(default_factory=set)  # cgroup paths
    cgroups: set[str] = field(default_factory=set)  # cgroup paths that exist
    relinks: dict[str, int] = field(default_factory=dict)  # volume -> how many of this id's
    committed: bool = False
    has_dir: bool = False
    manifest: bool = False
    draft: Manifest | None = None
    dump_finished: bool = False
    alive: set[int] = field(default_factory=set)  # PIDs
    found: dict[tuple[str, int], str] = field(default_factory=dict)  # (volume, n) -> snapshot
    left: set[str] = field(default_factory=set)  # snapshots (or their directories) left
    restored: int | None = None  # the restored tree's root PID
    corrupt: bool = False
    swapped: set[str] = field(default_factory=set)  # volumes the swap reached
    leftover: set[str] = field(default_factory=set)  # volumes with a swap's remains


@dataclass
class Facts:
    seen: Seen

    def provider(self, kind: str) -> snapshot.Provider:
        raise AssertionError("planning asked for a provider: only its steps may")

    def alive(self, task: Task) -> bool:
        return task.pid in self.seen.alive

    def cgroup(self, rel: str) -> Cgroup:
        return Cgroup("v2", Path("/sys/fs/cgroup") / rel.lstrip("/"))

    def cgroup_exists(self, cg: Cgroup) -> bool:
        return str(cg.path) in self.seen.cgroups | self.seen.frozen

    def frozen(self, cg: Cgroup) -> bool:
        return str(cg.path) in self.seen.frozen

    def relinks(self, volume: Path, ckpt_id: str) -> list[str]:
        return [f"unlink-at-restart-{ckpt_id}-{i}"
                for i in range(self.seen.relinks.get(str(volume), 0))]

    def committed(self, ckpt_id: str) -> bool:
        return self.seen.committed

    def has_dir(self, ckpt_id: str) -> bool:
        return self.seen.has_dir

    def manifest(self, ckpt_id: str) -> Manifest | None:
        return manifest(id=ckpt_id) if self.seen.manifest else None

    def draft(self, run: Run) -> Manifest | None:
        return self.seen.draft

    def dump_finished(self, ckpt_id: str) -> bool:
        return self.seen.dump_finished

    def snapshot_found(self, kind: str, volume: Path, ckpt_id: str, n: int) -> str | None:
        return self.seen.found.get((str(volume), n))

    def snapshot_left(self, kind: str, path: str) -> bool:
        return path in self.seen.left

    def restored_root(self, run: Run, cgroup: str) -> int | None:
        return self.seen.restored

    def pages_corrupt(self, run: Run, m: Manifest) -> bool:
        return self.seen.corrupt

    def swapped(self, kind: str, volume: Path, copy: str) -> bool:
        return str(volume) in self.seen.swapped

    def leftover(self, kind: str, volume: Path, rescue: str) -> bool:
        return str(volume) in self.seen.leftover


def run(op: str, *events: dict[str, Any], **begin: Any) -> Run:
    first = {"event": "begin", "op": op, "id": ID, "pid": 100, "starttime": 1,
             "volumes": [VOL], "snapshot": "btrfs"} | begin
    return Run(Path(f"/nonexistent/store/journal/{ID}.{op}.100.jsonl"), [first, *events])


def ev(event: str, **data: Any) -> dict[str, Any]:
    return {"event": event, **data}


FORGET = f"remove journal {ID}.%s.100.jsonl"
FREEZE = ev("freeze", kind="v2", cgroup=CG)
SWAP = ev("swap", volume=VOL, snapshot=SNAP, rescue=f"/mnt/.fscr-snapshots/{RESCUE}/0",
          name=RESCUE)
COPIED = ev("copy", volume=VOL, copy="uuid-1")
UNDO = f"put {VOL} back as it was before the restore"
RELINKS = f"remove 2 relink(s) unlink-at-restart-{ID}-* from {VOL}"
FINISH = ("finish the restore of PID 500: unlink relinks, seal and list rescue snapshots",
          "remove CRIU's pidfile")
AGAIN = (f"restore checkpoint {ID} again (its old tree was killed by --replace before fscr "
         "died)")

CASES = [
    # --- checkpoint: thaw first, then relinks, then what an uncommitted run made
    ("frozen, relinked, snapshotted, uncommitted",
     run("checkpoint", FREEZE, ev("snapshot", volume=VOL, n=0)),
     Seen(frozen={CG}, relinks={VOL: 2}, found={(VOL, 0): SNAP}, has_dir=True),
     [f"thaw cgroup {CG}", RELINKS, f"delete half-made snapshot {SNAP}",
      f"remove unfinished checkpoint directory {DIR}"]),
    ("committed: its snapshots and directory stay",
     run("checkpoint", FREEZE, ev("snapshot", volume=VOL, n=0)),
     Seen(frozen={CG}, relinks={VOL: 2}, found={(VOL, 0): SNAP}, has_dir=True, committed=True),
     [f"thaw cgroup {CG}", RELINKS]),
    ("thawed already (the watchdog did), nothing made",
     run("checkpoint", FREEZE), Seen(cgroups={CG}), []),
    ("the snapshot journaled but never made",
     run("checkpoint", ev("snapshot", volume=VOL, n=0)), Seen(has_dir=True),
     [f"remove unfinished checkpoint directory {DIR}"]),
    ("tasks moved into a cgroup of fscr's are put back",
     run("checkpoint", ev("move", kind="v2", cgroup=OWN, pid=7, original="/app")),
     Seen(cgroups={OWN}), [f"put the tasks in {OWN} back in their cgroups, remove it"]),
    ("--tcp established: CRIU finished the dump and killed the tree: commit, never remove",
     run("checkpoint", FREEZE), Seen(frozen={CG}, has_dir=True, dump_finished=True,
                                      draft=manifest(id=ID, netlock=None)),
     [f"thaw cgroup {CG}", "commit the checkpoint: CRIU finished its dump and killed the tree, "
      "so the image is all that is left of it"]),
    ("--tcp established, dump unfinished: the network lock goes with the rest",
     run("checkpoint"), Seen(has_dir=True,
                             draft=manifest(id=ID, netlock="fscr-ckpt-x")),
     ["remove network lock fscr-ckpt-x", f"remove unfinished checkpoint directory {DIR}"]),
    # --- restore: finish if the tree runs, else undo every swap, newest first
    ("swapped, CRIU failed: put back",
     run("restore", SWAP, COPIED, cgroup=CGROUP), Seen(manifest=True, swapped={VOL},
                                                       relinks={VOL: 2}),
     [UNDO, RELINKS]),
    ("copy made, swap not reached", run("restore", SWAP, COPIED, cgroup=CGROUP),
     Seen(manifest=True), [f"remove the restore's unused copy of {VOL}"]),
    ("died inside swap_in before the copy was journaled, remains left",
     run("restore", SWAP, cgroup=CGROUP), Seen(manifest=True, leftover={VOL}),
     [f"remove the restore's unused copy of {VOL}"]),
    ("died before swap_in made anything", run("restore", SWAP, cgroup=CGROUP),
     Seen(manifest=True), []),
    ("the tree runs: finish, undo nothing", run("restore", SWAP, COPIED, cgroup=CGROUP),
     Seen(manifest=True, restored=500, swapped={VOL}), list(FINISH)),
    ("the tree runs but the checkpoint was deleted since: undo",
     run("restore", SWAP, COPIED, cgroup=CGROUP), Seen(restored=500, swapped={VOL}), [UNDO]),
    ("lazy, pages not verified and corrupt: kill the tree, then undo",
     run("restore", SWAP, COPIED, ev("lazy", pid=600, starttime=2), cgroup=CGROUP, lazy=True),
     Seen(manifest=True, restored=500, corrupt=True, swapped={VOL}, alive={600}),
     ["kill the restored tree of PID 500: its page images are corrupt",
      "stop CRIU's lazy-pages daemon (PID 600)", UNDO]),
    ("--replace killed the old tree: undo, then restore again",
     run("restore", ev("kill", tasks=[[300, 3]]), SWAP, COPIED, cgroup=CGROUP),
     Seen(manifest=True, swapped={VOL}), [UNDO, "<forget>", AGAIN]),
    ("--replace's kill journaled but the old tree lives: undo only",
     run("restore", ev("kill", tasks=[[300, 3]]), SWAP, COPIED, cgroup=CGROUP),
     Seen(manifest=True, swapped={VOL}, alive={300}), [UNDO]),
    ("CRIU still runs: gc waits for it first",
     run("restore", ev("criu", pid=400, starttime=4), SWAP, COPIED, cgroup=CGROUP),
     Seen(manifest=True, swapped={VOL}, alive={400}),
     ["wait for CRIU (PID 400), kill it after 30s", UNDO]),
    # --- restore --beside: finish the copy, or remove its clones and cgroup
    ("beside, restored: finish the copy",
     run("restore", ev("clone", volume=VOL, path=f"/mnt/.fscr-snapshots/{COPY}/0"),
         beside=COPY),
     Seen(manifest=True, restored=500),
     [f"finish copy {COPY} (PID 500): unlink relinks in its clones, record it",
      "remove CRIU's pidfile"]),
    ("beside, not restored: remove what it made",
     run("restore", ev("clone", volume=VOL, path=f"/mnt/.fscr-snapshots/{COPY}/0"),
         beside=COPY),
     Seen(manifest=True, left={f"/mnt/.fscr-snapshots/{COPY}/0"},
          cgroups={f"/sys/fs/cgroup/fscr/{COPY}"}),
     [f"remove the unused clone /mnt/.fscr-snapshots/{COPY}/0",
      f"remove cgroup /fscr/{COPY}"]),
    ("beside: a clone path not named after the copy is never touched",
     run("restore", ev("clone", volume=VOL, path="/mnt/data"), beside=COPY),
     Seen(manifest=True, left={"/mnt/data"}), []),
    # --- receive: an uncommitted one is removed, a committed one kept
    ("receive cut short", run("receive", ev("subvolume", path=SNAP)),
     Seen(left={SNAP}, has_dir=True),
     [f"delete half-made snapshot {SNAP}", f"remove unfinished checkpoint directory {DIR}"]),
    ("receive committed", run("receive", ev("subvolume", path=SNAP)),
     Seen(left={SNAP}, has_dir=True, committed=True), []),
]


@pytest.mark.parametrize("journal, seen, expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_plan(journal: Run, seen: Seen, expected: list[str]) -> None:
    forget = FORGET % journal.op
    if "<forget>" not in expected:
        expected = [*expected, "<forget>"]
    assert gc.describe(STORE, journal, Facts(seen)) == [forget if w == "<forget>" else w
                                                        for w in expected]


def test_the_tables_journals_are_ones_fscr_writes() -> None:
    """Every line above is an event of fscr/journal.py with its payload, as a run writes it."""
    for name, journal, _, _ in CASES:
        assert [invalid(e) for e in journal.entries] == [None] * len(journal.entries), name


def test_beside_refuses_a_copy_name_not_fscrs() -> None:
    """A journal naming a copy fscr would not make is not planned (gc reports it)."""
    with pytest.raises(gc.FscrError, match="not one of fscr's"):
        gc.plan(STORE, run("restore", beside="/etc"), Facts(Seen()))
