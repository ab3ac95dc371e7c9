"""Crash safety: fscr SIGKILLed at every stage, a full volume, concurrent runs, `fscr gc`.

fscr kills itself with SIGKILL right after journaling the named event (FSCR_TEST_KILL_AT, a
test facility). Crash runs checkpoint with --leave-running so the workload outlives fscr.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    FSCR,
    alive,
    ask,
    counter_with_neighbour,
    fscr,
    lines,
    said,
    wait_for,
    wait_unlinked,
)
from test_pipeline import checkpoint, grows, relinks_on, restore

from fscr import journal
from fscr.process import freezer


def counts_cleanly(path: Path, more: int = 3) -> None:
    """The counter runs on, and its history is 1..n with no gap or repeat."""
    got = grows(path, len(lines(path)) + more)
    assert got == list(range(1, len(got) + 1))


def residue(vol: Path, store: Path, ckpt_id: str) -> dict:
    snaps = vol.parent / ".fscr-snapshots" / ckpt_id
    return {
        "relinks": relinks_on(vol),
        "snapshots": sorted(os.listdir(snaps)) if snaps.exists() else [],
        "checkpoint dir": (store / "checkpoints" / ckpt_id).exists(),
        "journal": sorted(os.listdir(store / "journal")),
        "fscr cgroup": freezer.at(f"fscr/ckpt_{ckpt_id}").exists(),
    }


CLEAN = {"relinks": [], "snapshots": [], "checkpoint dir": False, "journal": [],
         "fscr cgroup": False}


def crash(store: Path, event: str, *args: str) -> subprocess.CompletedProcess[str]:
    out = fscr(*args, store=store, check=False, env={"FSCR_TEST_KILL_AT": event})
    assert out.returncode == -9, (event, out.returncode, out.stderr)
    return out


def gc(store: Path, *args: str) -> dict:
    return json.loads(fscr("gc", "--json", *args, store=store).stdout)


# From the journal's one definition of its events: those a plain checkpoint of the service
# writes (it holds an unlinked-but-open file, so it is relinked).
CHECKPOINT_EVENTS = journal.written_by("checkpoint", journal.UNLINKED)


def test_the_docs_table_of_journal_events_is_the_journals_own():
    """docs/crash-safety.md lists every event as fscr/journal.py defines it."""
    doc = (Path(__file__).parent.parent / "docs" / "crash-safety.md").read_text()
    assert journal.table() in doc


@pytest.mark.parametrize("lines_, why", [
    ('{"event": "begin", "v": 2, "op": "checkpoint", "id": "c1", "pid": 7, "starttime": 0}\n',
     "version 2"),
    ('{"event": "begin", "op": "checkpoint", "id": "c1", "pid": 7, "starttime": 0}\n'
     '{"event": "teleport", "pid": 7}\n', "unknown event 'teleport'"),
    ('{"event": "begin", "op": "restore", "id": "c1", "pid": 7, "starttime": 0}\n'
     '{"event": "kill", "pids": [7]}\n', "line 2: kill: Object contains unknown field `pids`"),
], ids=["newer version", "unknown event", "wrong payload"])
def test_gc_leaves_a_journal_it_cannot_read_to_a_human(lines_, why, store):
    """A journal of another format version (a newer fscr's), or with a line that is not an
    event with its payload, is reported and left as it is: gc undoes only what it can read."""
    fscr("list", store=store)  # makes the store
    path = store / "journal" / "c1.checkpoint.7.jsonl"
    path.write_text(lines_)
    out = fscr("gc", store=store, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "is damaged" in out.stdout and why in out.stdout, out.stdout
    assert path.read_text() == lines_


@pytest.mark.parametrize("event", CHECKPOINT_EVENTS)
def test_checkpoint_killed_at_each_stage_is_recovered_by_gc(event, btrfs_volume, workloads,
                                                            store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    good = checkpoint(store, "--pid", str(pid), "--volume", str(vol))

    crash(store, event, "checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "crash")
    noticed = fscr("list", store=store)
    assert "unfinished" in noticed.stderr and "fscr gc" in noticed.stderr
    report = gc(store)
    # The watchdog or gc thawed it: it is alive and running the moment gc returns.
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert [r["id"] for r in report["runs"]] == ["crash"]
    counts_cleanly(vol / "history")
    assert residue(vol, store, "crash") == CLEAN
    assert gc(store)["runs"] == []
    assert [c["id"] for c in json.loads(fscr("list", "--json", store=store).stdout)
            ["checkpoints"]] == [good["id"]]

    restore(store, good["id"], "--replace")
    counts_cleanly(vol / "history")
    assert relinks_on(vol) == []


@pytest.mark.parametrize("event", ["freeze", "relink", "snapshot"])
def test_criu_killed_while_it_holds_the_tree_leaves_it_running(event, btrfs_volume, workloads,
                                                                 store):
    # CRIU dies at its pre-dump (freeze) or post-dump (relink, snapshot) notification, fscr
    # alive: the run fails with CRIU's death, the tree runs on, nothing is left.
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "crash",
               store=store, check=False, env={"FSCR_TEST_KILL_CRIU_AT": event})
    assert out.returncode == 7 and "CRIU dump failed" in out.stderr, out.stderr
    gc(store)
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    counts_cleanly(vol / "history")
    assert residue(vol, store, "crash") == CLEAN


@pytest.mark.parametrize("event", ["move", "dump"])
def test_killed_checkpoint_of_a_tree_sharing_its_cgroup_puts_it_back(event, btrfs_volume,
                                                                     workloads, store):
    vol = btrfs_volume.path
    pid, neighbour, cg = counter_with_neighbour(workloads, vol)
    grows(vol / "history", 3)

    crash(store, event, "checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "crash")
    gc(store)
    assert sorted(cg.procs()) == sorted([pid, neighbour]) and not cg.frozen()
    counts_cleanly(vol / "history")
    counts_cleanly(vol / "n" / "history")
    assert residue(vol, store, "crash") == CLEAN


def test_kill_mode_dying_after_commit_keeps_checkpoint_and_workload(btrfs_volume, workloads,
                                                                    store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    crash(store, "kill", "checkpoint", "--pid", str(pid), "--volume", str(vol), "--kill",
          "--id", "done")
    gc(store)
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()  # the kill never happened
    counts_cleanly(vol / "history")
    assert residue(vol, store, "done")["relinks"] == []
    restore(store, "done", "--replace")  # the committed checkpoint is whole
    counts_cleanly(vol / "history")


RESTORE_EVENTS = journal.written_by("restore", journal.REPLACE_OPT, journal.SNAPSHOTS)


@pytest.mark.parametrize("event", RESTORE_EVENTS)
def test_restore_killed_at_each_stage_is_finished_or_undone_by_gc(event, btrfs_volume,
                                                                  workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    good = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    (vol / "after-checkpoint").write_text("newer data")

    crash(store, event, "restore", good["id"], "--replace")
    gc(store)
    snaps = vol.parent / ".fscr-snapshots"
    recorded = {p for r in json.loads(fscr("list", "--json", store=store).stdout)["rescues"]
                for p in r["paths"]}
    on_disk = {str(p) for p in snaps.glob("rescue_*/*")}
    assert on_disk == recorded  # every rescue kept is listed; no half-made copy remains
    assert relinks_on(vol) == [] and os.listdir(store / "journal") == []
    # The workload runs, never frozen: as it was (nothing had been changed yet), or restored
    # (CRIU had started, or --replace had killed the old tree and gc finished the restore).
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    counts_cleanly(vol / "history")
    if event in ("begin", "kill"):
        assert (vol / "after-checkpoint").exists() and not recorded
    else:
        assert not (vol / "after-checkpoint").exists() and len(recorded) == 1

    r = restore(store, good["id"], "--replace", "--force")
    assert not (vol / "after-checkpoint").exists()
    counts_cleanly(vol / "history")
    assert alive(r["pid"])


BESIDE_EVENTS = journal.written_by("beside")


@pytest.mark.parametrize("event", BESIDE_EVENTS)
def test_restore_beside_killed_at_each_stage_is_finished_or_undone_by_gc(
        event, btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol), pidns=True)  # it holds relinked files
    grows(vol / "history", 3)
    good = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    assert good["relinks"]

    crash(store, event, "restore", good["id"], "--beside")
    gc(store)
    made = {p.name for p in (vol.parent / ".fscr-snapshots").glob("copy_*")}
    listed = json.loads(fscr("list", "--json", store=store).stdout)["copies"]
    for c in listed:
        workloads.cgroups.append(c["cgroup"])  # stopped at teardown
    assert made == {c["name"] for c in listed}  # no clone left that is not a recorded copy
    assert os.listdir(store / "journal") == []
    # CRIU is driven over RPC: killed at "criu", fscr never sent its request and CRIU exits
    # with nothing done; at "restored" CRIU had answered, and gc records the running copy.
    if event == "restored":
        [c] = listed  # recorded, running, its relinks gone
        assert c["pids"] and relinks_on(Path(c["volumes"][0]["clone"])) == []
    else:
        assert listed == [] and not any(freezer.at("fscr").path.glob("copy_*"))
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    counts_cleanly(vol / "history")


def _fill(vol: Path, leave: int) -> None:
    """Fill the volume, then free about `leave` bytes."""
    with open(vol / "filler", "wb") as f:
        block = os.urandom(1 << 20)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(vol / "filler", "r+b") as f:
        f.truncate(max(os.fstat(f.fileno()).st_size - leave, 0))
    os.sync()


def test_full_volume_fails_the_relink_copy_cleanly(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    size = 64 << 20
    pid, _ = workloads.start("unlinked0", str(vol), str(size))
    wait_unlinked(pid, vol / "big")
    try:
        _fill(vol, 8 << 20)
        out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "full",
                   store=store, check=False, env={"FSCR_TEST_FORCE_COPY": "1"})
        assert out.returncode == 12 and "no space" in out.stderr, out.stderr
        assert len(said(out.stderr)) == 1
        assert alive(pid) and not freezer.cgroup_of(pid).frozen()
        assert residue(vol, store, "full") == CLEAN
    finally:
        (vol / "filler").unlink(missing_ok=True)
    report = ask(vol, "unlinked0")
    assert report["size"] == size and report["nlink"] == 0  # the workload's data is intact


def test_copy_path_preserves_an_unlinked_file(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("unlinked0", str(vol), str(8 << 20))
    wait_unlinked(pid, vol / "big")
    before = ask(vol, "unlinked0")
    out = fscr("checkpoint", "--json", "--pid", str(pid), "--volume", str(vol), "--kill",
               store=store, env={"FSCR_TEST_FORCE_COPY": "1"})
    m = json.loads(out.stdout)
    assert [r["method"] for r in m["relinks"]] == ["copy"]
    restore(store, m["id"])
    after = ask(vol, "unlinked0")
    assert after == before


def _open_by(pid: int) -> list[str]:
    out = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except FileNotFoundError:
            continue
    return out


def test_a_held_lock_makes_a_second_run_fail_clearly_or_wait(btrfs_volume, workloads, store):
    from fscr import locks
    from fscr.locks import volume_lock

    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    with locks.hold([volume_lock(vol)]):
        out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store,
                   check=False, env={"FSCR_LOCK_WAIT": "0.3"})
        assert out.returncode == 14
        assert f"volume {vol} is busy: PID {os.getpid()} holds it" in out.stderr
        waiting = subprocess.Popen([str(FSCR), "checkpoint", "--pid", str(pid), "--volume",
                                    str(vol), "--id", "waited"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=os.environ | {"FSCR_STORE": str(store)})
        # It waits: it has the volume's lock file open (it got that far) and holds no lock
        # (this process does), so it made no checkpoint yet.
        lock = str(locks._path(volume_lock(vol)))
        wait_for(lambda: lock in _open_by(waiting.pid), 4, "the second run to reach the lock")
        assert waiting.poll() is None and not (store / "checkpoints" / "waited").exists()
    stdout, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and stdout.strip() == "waited"
    assert alive(pid)


def test_two_concurrent_checkpoints_never_corrupt_anything(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    procs = [subprocess.Popen([str(FSCR), "checkpoint", "--pid", str(pid), "--volume", str(vol),
                               "--id", f"c{i}"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"FSCR_STORE": str(store)})
             for i in range(2)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(code == 0 or (code == 14 and "busy" in text) for code, text in results), results
    made = [f"c{i}" for i, (code, _) in enumerate(results) if code == 0]
    assert made
    assert relinks_on(vol) == [] and os.listdir(store / "journal") == []
    for ckpt in made:
        restore(store, ckpt, "--replace")
        counts_cleanly(vol / "history")


def test_gc_dry_run_changes_nothing(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    # Killed at CRIU's post-dump, about to snapshot: its relinks are on the volume.
    crash(store, "snapshot", "checkpoint", "--pid", str(pid), "--volume", str(vol), "--id",
          "crash")
    wait_for(lambda: not freezer.cgroup_of(pid).frozen(), 15, "the watchdog to thaw")
    before = residue(vol, store, "crash")
    assert before["relinks"] and before["checkpoint dir"]
    report = gc(store, "--dry-run")
    assert report["dry_run"] and report["runs"][0]["actions"]
    assert residue(vol, store, "crash") == before
    text = fscr("gc", "--dry-run", store=store).stdout
    assert "would remove 2 relink(s)" in text
    gc(store)
    assert residue(vol, store, "crash") == CLEAN


def test_watchdog_thaws_and_aborts_when_the_freeze_outlasts_max_freeze(btrfs_volume,
                                                                       workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "slow",
               "--max-freeze", "0.5", store=store, check=False,
               env={"FSCR_TEST_PAUSE_AT": "snapshot:2"})
    assert out.returncode == 17 and "--max-freeze" in out.stderr, out.stderr
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    counts_cleanly(vol / "history")
    assert residue(vol, store, "slow") == CLEAN


def test_ctrl_c_at_the_terminal_inside_criu_s_stop_undoes_the_run(btrfs_volume, workloads,
                                                                  store):
    """^C reaches the terminal's whole foreground group: fscr (and its watchdog) but not
    CRIU, which fscr lets go through the socket, so nothing dies mid-dump."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    env = dict(os.environ) | {"FSCR_STORE": str(store), "FSCR_TEST_PAUSE_AT": "snapshot:3"}
    p = subprocess.Popen([str(FSCR), "checkpoint", "--pid", str(pid), "--volume", str(vol),
                          "--id", "intr"], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,  # its own group, as a terminal's job
                         # and ^C not ignored, as in a terminal's job: a suite started in the
                         # background by a non-interactive shell inherits SIGINT ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        journal = store / "journal"
        wait_for(lambda: journal.exists() and any(
            '"event": "snapshot"' in f.read_text() for f in journal.glob("intr.*")), 15,
                 "the stop at the snapshot")  # CRIU holds the tree, ptrace-stopped
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    counts_cleanly(vol / "history")
    assert residue(vol, store, "intr") == CLEAN


def test_a_watchdog_that_cannot_start_fails_before_the_freeze(monkeypatch, tmp_path):
    from fscr.errors import FscrError
    from fscr.watchdog import Watchdog

    monkeypatch.setattr(sys, "executable", "/bin/true")  # exits at once, never says "ready"
    with pytest.raises(FscrError, match="watchdog did not start"):
        Watchdog.start(freezer.Cgroup("v2", tmp_path), tmp_path / "journal", 30.0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_full_store_fails_the_dump_cleanly(btrfs_volume, workloads, tmp_path):
    vol = btrfs_volume.path
    small = tmp_path / "small-store"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        pid, _ = workloads.start("service", str(vol))
        grows(vol / "history", 3)
        out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "nospace",
                   store=small, check=False)
        assert out.returncode == 12 and "no space" in out.stderr, out.stderr
        assert alive(pid) and not freezer.cgroup_of(pid).frozen()
        counts_cleanly(vol / "history")
        assert residue(vol, small, "nospace") == CLEAN
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_snapshot_failure_aborts_cleanly_and_spares_what_is_not_ours(btrfs_volume, workloads,
                                                                     store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    squatter = vol.parent / ".fscr-snapshots" / "snapfail" / "0"
    squatter.mkdir(parents=True)
    (squatter / "precious").write_text("not fscr's")
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "snapfail",
               store=store, check=False)
    assert out.returncode == 8 and "snapshot" in out.stderr, out.stderr
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    counts_cleanly(vol / "history")
    assert (squatter / "precious").read_text() == "not fscr's"
    assert relinks_on(vol) == [] and not (store / "checkpoints" / "snapfail").exists()
    assert os.listdir(store / "journal") == []
