"""Checkpoint and restart of a process tree with its btrfs volume, with real CRIU."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import (
    alive,
    ask,
    counter_with_neighbour,
    fscr,
    lines,
    said,
    take_pid,
    wait_for,
    wait_unlinked,
)

from fscr.process import freezer


def relinks_on(volume: Path) -> list[str]:
    d = volume / "lost+found" / "checkpoint"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def checkpoint(store: Path, *args: str) -> dict:
    return json.loads(fscr("checkpoint", "--json", *args, store=store).stdout)


def restore(store: Path, *args: str) -> dict:
    return json.loads(fscr("restore", "--json", *args, store=store).stdout)


def grows(path: Path, after: int, timeout: float = 10) -> list[int]:
    return wait_for(lambda: (v := lines(path)) and len(v) > after and v, timeout,
                    f"{path} to grow past {after} lines")


def test_counter_killed_and_restored_continues_where_it_was(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 5)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    wait_for(lambda: not alive(pid), 5, "the tree to be killed")
    at_checkpoint = lines(Path(m["volumes"][0]["snapshot"]) / "history")

    r = restore(store, m["id"])
    assert r["pid"] == pid
    after = grows(vol / "history", len(at_checkpoint) + 5)
    # The restored process counts on from its in-memory value, and that value matched the
    # file: no gap, no repeat, the checkpoint's lines kept as they were.
    assert after == list(range(1, len(after) + 1))
    assert after[: len(at_checkpoint)] == at_checkpoint
    assert relinks_on(vol) == []


def test_restore_rolls_file_and_memory_back_together(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("writer", str(vol))
    wait_for(lambda: (vol / "data").exists() and (vol / "data").stat().st_size > 640)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    snap_size = (Path(m["volumes"][0]["snapshot"]) / "data").stat().st_size
    # It keeps writing after the checkpoint (--leave-running is the default): 100 records
    # (2 s of writing) past the snapshot, so the restored writer, which starts again from
    # the snapshot's length, cannot have caught up by the time restore returns.
    ahead = snap_size + 100 * 64
    wait_for(lambda: (vol / "data").stat().st_size > ahead)

    restore(store, m["id"], "--replace")
    # Rolled back: the file restarts from the checkpoint's length, which is what the restored
    # process counts in memory; it checks that before every write and stops if they differ.
    assert (vol / "data").stat().st_size < ahead
    wait_for(lambda: (vol / "data").stat().st_size > ahead)
    assert not (vol / "MISMATCH").exists()
    assert alive(pid)


def test_write_through_old_fd_reaches_the_old_inode_not_the_new_file(btrfs_volume, workloads,
                                                                      store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("relinked", str(vol))
    wait_for(lambda: (vol / "ready").exists())
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert [r["method"] for r in m["relinks"]] == ["link"]
    assert relinks_on(vol) == []

    restore(store, m["id"])
    assert relinks_on(vol) == []
    (vol / "go").touch()
    wait_for(lambda: (vol / "done").exists())
    assert (vol / "b").read_text() == "old-a:via-old-fd"
    assert (vol / "a").read_text() == "new-a:"


def test_large_unlinked_file_is_kept_by_reflink_not_in_the_image(btrfs_volume, workloads,
                                                                 store):
    vol = btrfs_volume.path
    size = 200 << 20
    pid, _ = workloads.start("unlinked0", str(vol), str(size))
    wait_unlinked(pid, vol / "big")
    before = ask(vol, "unlinked0")
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert [r["method"] for r in m["relinks"]] == ["reflink"]
    assert m["image_bytes"] < size // 10

    restore(store, m["id"])
    assert relinks_on(vol) == []
    after = ask(vol, "unlinked0")
    assert after == before
    assert after["nlink"] == 0 and after["size"] == size and after["pos"] == size // 3


def test_process_tree_survives_checkpoint_and_restore(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, name = workloads.start("tree", str(vol))
    for who in ("parent", "child1", "child2"):
        grows(vol / f"tree-{who}", 3)
    m = checkpoint(store, "--name", name, "--volume", str(vol), "--kill")
    snap = Path(m["volumes"][0]["snapshot"])
    assert len(json.loads(fscr("show", m["id"], "--json", store=store).stdout)["tasks"]) == 3

    restore(store, m["id"])
    for who in ("parent", "child1", "child2"):
        n = len(lines(snap / f"tree-{who}"))
        got = grows(vol / f"tree-{who}", n + 3)
        assert got == list(range(1, len(got) + 1))


def test_socketpair_survives_checkpoint_and_restore(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("socketpair", str(vol))
    grows(vol / "sp", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    n = len(lines(Path(m["volumes"][0]["snapshot"]) / "sp"))
    restore(store, m["id"])
    got = grows(vol / "sp", n + 5)
    assert got == list(range(1, 2 * len(got), 2))  # the child answers n + 1 every time


def test_freeze_only_snapshots_all_volumes_at_one_instant_and_leaves_tree_running(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    other = btrfs_volume.mnt / "other"
    subprocess.run(["btrfs", "subvolume", "create", str(other)], check=True,
                   capture_output=True)
    pid, _ = workloads.start("pair", str(vol), str(other))
    wait_for(lambda: (other / "pair").exists())
    for _ in range(5):
        m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--volume", str(other),
                       "--backend", "freeze-only")
        a, b = (int((Path(v["snapshot"]) / "pair").read_text()) for v in m["volumes"])
        assert a - b in (0, 1), (a, b)  # written in that order: one instant shows a == b or +1
        assert m["image_bytes"] == 0
    assert alive(pid)
    last = int((vol / "pair").read_text())
    wait_for(lambda: int((vol / "pair").read_text()) > last, 5, "the tree to keep running")


def test_restore_of_a_running_tree_needs_replace_and_changes_nothing(btrfs_volume, workloads,
                                                                     store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    n = len(grows(vol / "history", len(lines(Path(m["volumes"][0]["snapshot"]) / "history"))
                  + 10))

    out = fscr("restore", m["id"], store=store, check=False)
    assert out.returncode == 10 and "--replace" in out.stderr
    assert len(said(out.stderr)) == 1 and "Traceback" not in out.stderr
    assert len(lines(vol / "history")) >= n  # the volume was not rolled back
    assert json.loads(fscr("list", "--json", store=store).stdout)["rescues"] == []
    assert alive(pid)

    r = restore(store, m["id"], "--replace")
    assert r["pid"] == pid and len(r["rescue_snapshots"]) == 1
    got = grows(vol / "history", n)
    assert got == list(range(1, len(got) + 1))


def test_snapshot_none_refuses_a_tree_holding_unlinked_files(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("relinked", str(vol))
    wait_for(lambda: (vol / "ready").exists())
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--snapshot", "none",
               store=store, check=False)
    assert out.returncode == 15 and "unlinked" in out.stderr
    assert relinks_on(vol) == []
    assert alive(pid) and not _frozen(pid)
    assert json.loads(fscr("list", "--json", store=store).stdout)["checkpoints"] == []


def _frozen(pid: int) -> bool:
    from fscr.process import freezer

    return freezer.cgroup_of(pid).frozen()


def test_criu_failure_leaves_the_workload_running_and_no_residue(btrfs_volume, workloads,
                                                                  store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("traced", str(vol))
    grows(vol / "history", 3)
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "failing",
               store=store, check=False)
    # A task traced by its parent: CRIU cannot seize it. The message quotes CRIU's error
    # that says so (not its closing "Dumping FAILED"), a hint, and a log that exists.
    assert out.returncode == 7, out.stderr
    assert len(said(out.stderr)) == 1 and "Traceback" not in out.stderr
    assert "while seizing" in out.stderr and "another process traces it" in out.stderr
    log = Path(out.stderr.rsplit("(log: ", 1)[1].rstrip(")\n"))
    assert log.parent.parent == store / "failed" and "while seizing" in log.read_text()
    assert alive(pid) and not _frozen(pid)
    n = len(lines(vol / "history"))
    grows(vol / "history", n + 3)
    assert relinks_on(vol) == []
    assert not (btrfs_volume.mnt / ".fscr-snapshots" / "failing").exists()
    assert not (store / "checkpoints" / "failing").exists()
    # Listed with what fscr recorded of the attempt (its journal among it)...
    kept = json.loads(fscr("list", "--failed", "--json", store=store).stdout)["failed"]
    assert [(f["record"]["id"], f["record"]["op"], f["logs"]) for f in kept] == [
        ("failing", "checkpoint", ["criu-dump.log"])]
    assert kept[0]["record"]["request"]["root"] == pid
    assert '"event": "criu"' in (log.parent / "journal.jsonl").read_text()
    # ...and removed by gc once older than a week, not before.
    assert fscr("gc", "--json", store=store).stdout.count("failing-checkpoint") == 0
    rec = log.parent / "attempt.json"
    aged = json.loads(rec.read_text()) | {"when": "2000-01-01T00:00:00Z"}
    rec.write_text(json.dumps(aged))
    gone = json.loads(fscr("gc", "--json", store=store).stdout)["failed_removed"]
    assert gone == [f"remove failed attempt {log.parent.name} (older than 7 days)"]
    assert not log.parent.exists()


def test_clear_errors_for_bad_input(btrfs_volume, workloads, store, tmp_path):
    vol = btrfs_volume.path
    cases = [
        (["checkpoint", "--pid", "999999", "--volume", str(vol)], 4, "no such process"),
        (["checkpoint", "--pid", "1", "--volume", str(vol)], 4, "PID 1"),
        (["checkpoint", "--pid", str(os.getpid()), "--volume", str(tmp_path)], 5,
         "not a btrfs subvolume"),
        (["checkpoint", "--pid", str(os.getpid()), "--volume", str(btrfs_volume.mnt)], 5,
         "mount point"),
        (["restore", "nosuchid"], 6, "no checkpoint nosuchid"),
        (["checkpoint", "--pid", "1", "--volume", str(vol), "--id", "bad-id"], 16, "invalid"),
    ]
    for args, code, text in cases:
        out = fscr(*args, store=store, check=False)
        assert (out.returncode, text in out.stderr) == (code, True), (args, out.stderr)
        assert len(said(out.stderr)) == 1 and "Traceback" not in out.stderr


def test_restore_refuses_a_corrupt_manifest(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    manifest = store / "checkpoints" / m["id"] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"kill"', '"Kill"'))
    before = sorted(os.listdir(vol))
    out = fscr("restore", m["id"], store=store, check=False)
    assert out.returncode == 9 and "sha256" in out.stderr
    assert sorted(os.listdir(vol)) == before and not alive(pid)
    time.sleep(0.1)


def flip_a_bit(image: Path) -> None:
    """One bit flipped: same size, another sha256."""
    with open(image, "r+b") as f:
        f.seek(image.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))


def test_a_corrupt_page_image_never_runs_and_leaves_the_volume_as_it_was(btrfs_volume,
                                                                        workloads, store):
    # The page images are verified while CRIU restores (restore start-up): the check ends
    # before the tree resumes, and a failed one makes CRIU kill the tree it restored.
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    images = store / "checkpoints" / m["id"] / "images"
    biggest = max(images.iterdir(), key=lambda p: p.stat().st_size)
    assert biggest.name.startswith("pages-")
    flip_a_bit(biggest)
    before = sorted(os.listdir(vol))
    out = fscr("restore", m["id"], store=store, check=False)
    assert out.returncode == 9 and f"image {biggest.name} is corrupt (sha256)" in out.stderr
    assert len(said(out.stderr)) == 1 and "volumes were put back" in out.stderr, out.stderr
    # not alive: a restored tree has the checkpoint's PIDs
    assert sorted(os.listdir(vol)) == before and not alive(pid)
    assert not list((vol.parent / ".fscr-snapshots").glob("rescue_*"))  # swapped back


def test_a_corrupt_image_is_refused_before_replace_kills_the_running_tree(btrfs_volume,
                                                                         workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    images = store / "checkpoints" / m["id"] / "images"
    flip_a_bit(max(images.iterdir(), key=lambda p: p.stat().st_size))
    out = fscr("restore", m["id"], "--replace", store=store, check=False)
    assert out.returncode == 9 and "is corrupt (sha256)" in out.stderr
    assert alive(pid)  # the tree --replace would have killed runs on
    assert not list((vol.parent / ".fscr-snapshots").glob("rescue_*"))  # nothing swapped


def test_tree_sharing_its_cgroup_is_frozen_alone_and_put_back(btrfs_volume, workloads, store):
    from fscr.process import freezer

    vol = btrfs_volume.path
    # A second, unrelated process in the same cgroup: it must never be frozen or dumped.
    pid, neighbour, cg = counter_with_neighbour(workloads, vol)
    assert sorted(cg.procs()) == sorted([pid, neighbour])
    grows(vol / "history", 3)

    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert len(json.loads(fscr("show", m["id"], "--json", store=store).stdout)["tasks"]) == 1
    assert cg.procs() == [neighbour] and alive(neighbour)
    assert not freezer.at(f"fscr/ckpt_{m['id']}").exists()
    n = len(lines(vol / "n" / "history"))
    grows(vol / "n" / "history", n + 3)  # the neighbour ran on

    restore(store, m["id"], "--force")  # the neighbour holds files on the volume
    assert sorted(cg.procs()) == sorted([pid, neighbour])  # back where it lived
    assert not freezer.at(f"fscr/ckpt_{m['id']}").exists()
    got = grows(vol / "history", len(lines(Path(m["volumes"][0]["snapshot"]) / "history")) + 3)
    assert got == list(range(1, len(got) + 1))


def ns_pids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(x) for x in status.split("NSpid:")[1].split("\n")[0].split()]


def test_a_tree_in_its_own_pid_namespace_restores_where_its_pids_are_taken(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("tree", str(vol), pidns=True)
    assert ns_pids(pid) == [pid, 1]  # the workload is init of its namespace
    for who in ("parent", "child1", "child2"):
        grows(vol / f"tree-{who}", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert m["pidns"] is True
    wait_for(lambda: not alive(pid), 5, "the tree to be killed")
    at = {w: len(lines(Path(m["volumes"][0]["snapshot"]) / f"tree-{w}"))
          for w in ("parent", "child1", "child2")}
    squatter = take_pid(pid)  # the root's PID now belongs to another process
    try:
        assert "PID namespace of its own" in fscr("doctor", "--for", m["id"], store=store).stdout
        r = restore(store, m["id"])
        assert r["pid"] != pid and ns_pids(r["pid"]) == [r["pid"], 1]
        for who, n in at.items():  # each process counts on from its checkpointed value
            after = grows(vol / f"tree-{who}", n + 3)
            assert after == list(range(1, len(after) + 1))
        # --replace of the restored tree: its old tasks need only die, no PID is waited for.
        again = restore(store, m["id"], "--replace")
        assert not alive(r["pid"]) and alive(again["pid"]) and alive(squatter.pid)
    finally:
        squatter.kill()
        squatter.wait()


def test_a_copy_runs_beside_its_running_original(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol), pidns=True)
    grows(vol / "history", 5)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    at = lines(Path(m["volumes"][0]["snapshot"]) / "history")

    r = restore(store, m["id"], "--beside")
    copy = r["copy"]
    workloads.cgroups.append(f"/fscr/{copy}")  # killed at teardown should the test fail
    assert r["pid"] != pid and alive(pid) and alive(r["pid"])
    # The copy counts on from the checkpoint in its own clone of the volume, seen at the
    # volume's path by it alone...
    clone = btrfs_volume.mnt / ".fscr-snapshots" / copy / "0"
    theirs = grows(clone / "history", len(at) + 5)
    assert theirs[: len(at)] == at and theirs == list(range(1, len(theirs) + 1))
    assert os.readlink(f"/proc/{r['pid']}/cwd") == str(vol)
    # ...while the original goes on in the live volume, undisturbed (no number twice).
    ours = grows(vol / "history", len(theirs) + 5)
    assert ours == list(range(1, len(ours) + 1))
    listed = json.loads(fscr("list", "--json", store=store).stdout)["copies"]
    assert [(c["name"], c["id"], c["pids"]) for c in listed] == [(copy, m["id"], [r["pid"]])]
    out = fscr("checkpoint", "--pid", str(r["pid"]), "--volume", str(vol), store=store,
               check=False)
    assert out.returncode == 15 and "mount namespace of its own" in out.stderr

    removed = json.loads(fscr("delete", copy, "--json", store=store).stdout)["removed"]
    assert f"stopped PID {r['pid']}" in removed and str(clone) in removed
    assert not alive(r["pid"]) and not clone.exists() and alive(pid)
    assert json.loads(fscr("list", "--json", store=store).stdout)["copies"] == []


def test_a_copy_beside_needs_a_tree_in_its_own_pid_namespace(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    out = fscr("restore", m["id"], "--beside", store=store, check=False)
    assert out.returncode == 15 and "fscr run --pidns" in out.stderr
    assert not list((btrfs_volume.mnt / ".fscr-snapshots").glob("copy_*"))


def test_an_unlinked_file_criu_would_copy_fails_the_checkpoint_and_leaves_nothing(
        btrfs_volume, workloads, store):
    # The scan misses the unlinked file (FSCR_TEST_SCAN_MISSES, as if it raced an unlink):
    # CRIU copies it as a ghost file, fscr sees it in the image, fails, retries once, fails.
    vol = btrfs_volume.path
    pid, _ = workloads.start("unlinked0", str(vol), "4096")
    wait_unlinked(pid, vol / "big")
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", "raced",
               store=store, check=False, env={"FSCR_TEST_SCAN_MISSES": "1"})
    assert out.returncode == 14, out.stderr
    assert "copied 1 unlinked file(s) into the image" in out.stderr
    assert f"{vol}/big" in out.stderr
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert relinks_on(vol) == [] and not (vol.parent / ".fscr-snapshots" / "raced").exists()
    assert not (store / "checkpoints" / "raced").exists()
    assert json.loads(fscr("list", "--json", store=store).stdout)["checkpoints"] == []
