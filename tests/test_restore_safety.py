"""Restore treats the manifest as untrusted and checks everything before it touches anything;
relinking covers mappings and a deleted executable too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from conftest import alive, ask, fscr, wait_for
from test_pipeline import checkpoint, grows, relinks_on, restore

from fscr.process import freezer


def tamper(store: Path, ckpt_id: str, edit) -> None:  # noqa: ANN001
    """Rewrite the manifest and its digest, as someone with write access to the store could:
    the digest gives integrity, not authenticity, so validation must catch the rest."""
    d = store / "checkpoints" / ckpt_id
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    raw = (json.dumps(m, indent=2) + "\n").encode()
    (d / "manifest.json").write_bytes(raw)
    (d / "manifest.json.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


def test_a_manifest_naming_a_foreign_snapshot_is_refused_by_restore_and_delete(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    victim = btrfs_volume.mnt / "victim"
    os.system(f"btrfs subvolume create {victim} >/dev/null")
    (victim / "data").write_text("keep me")
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    tamper(store, m["id"], lambda x: x["volumes"][0].update(snapshot=str(victim)))
    for cmd in (["restore", m["id"]], ["delete", m["id"]]):
        out = fscr(*cmd, store=store, check=False)
        assert out.returncode == 9 and "expected" in out.stderr, out.stderr
    assert (victim / "data").read_text() == "keep me"
    assert not alive(pid)


def test_a_manifest_naming_a_foreign_cgroup_is_refused(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    tamper(store, m["id"], lambda x: x["cgroup"].update(path="/system.slice/sshd.service"))
    out = fscr("restore", m["id"], store=store, check=False)
    assert out.returncode == 9 and "cgroup" in out.stderr


def stat_of(pid: int) -> dict:
    st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"pid": pid, "starttime": int(st[19])}


def test_a_manifest_naming_an_outside_process_never_gets_it_killed(btrfs_volume, workloads,
                                                                   store, tmp_path):
    """A manifest names, it does not authorise: its tasks and cgroup pointed at a process
    outside the checkpoint (its PID and start time, readable by anyone) and the root cgroup;
    --replace kills only what this host recorded of the checkpoint."""
    vol = btrfs_volume.path
    canary, _ = workloads.run("sleep", "1000")
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))

    def point_at_canary(x: dict) -> None:
        x["root"] = x["lineage"] = stat_of(canary)
        x["tasks"] = [stat_of(canary)]
        x["cgroup"] = {"kind": x["cgroup"]["kind"], "path": "/", "original": "/"}

    tamper(store, m["id"], point_at_canary)
    out = fscr("restore", m["id"], "--replace", store=store, check=False)
    assert out.returncode == 10 and f"PIDs [{canary}]" in out.stderr, out.stderr
    assert alive(canary) and alive(pid)
    # Without this host's record of the checkpoint (a copied store), nothing is killed.
    (store / "origins" / f"{m['id']}.json").unlink()
    out = fscr("restore", m["id"], "--replace", store=store, check=False)
    assert out.returncode == 10 and alive(canary) and alive(pid)


def test_a_checkpoint_not_made_here_restores_into_a_cgroup_of_fscr(btrfs_volume, workloads,
                                                                    store):
    """One this host has no record of lands in fscr's own group, whatever cgroup its manifest
    names: here one that would hold fscr itself."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    wait_for(lambda: not alive(pid))
    mine = freezer.cgroup_of(os.getpid()).rel
    tamper(store, m["id"], lambda x: x["cgroup"].update(path=mine, original=mine))
    (store / "origins" / f"{m['id']}.json").unlink()
    r = restore(store, m["id"])
    here = freezer.cgroup_of(r["pid"])
    workloads.cgroups.append(here.rel)
    assert here.rel == f"/fscr/restored_{m['id']}"
    # Now this host has restored it, and a --replace of it kills what it restored (the
    # same PID comes back: CRIU restores it, to a process with a new start time).
    before = stat_of(r["pid"])
    again = restore(store, m["id"], "--replace")
    assert again["pid"] == r["pid"] and stat_of(again["pid"]) != before


def test_a_missing_relink_is_found_before_the_running_tree_is_killed(btrfs_volume, workloads,
                                                                     store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("relinked", str(vol))
    wait_for(lambda: (vol / "ready").exists())
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    snap = Path(m["volumes"][0]["snapshot"])
    os.system(f"btrfs property set -ts {snap} ro false")
    (snap / "lost+found" / "checkpoint" / m["relinks"][0]["name"]).unlink()
    out = fscr("restore", m["id"], "--replace", store=store, check=False)
    assert out.returncode == 9 and "missing" in out.stderr
    assert alive(pid)  # --replace killed nothing: the check came first


def test_restoring_twice_in_one_second_keeps_two_rescues(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--id", "x" * 64)
    restore(store, m["id"], "--replace")
    restore(store, m["id"], "--replace")
    rescues = json.loads(fscr("list", "--json", store=store).stdout)["rescues"]
    assert len(rescues) == 2
    assert [r["states"] for r in rescues] == [["present"], ["present"]]
    for r in rescues:
        fscr("delete", r["name"], store=store)
    assert json.loads(fscr("list", "--json", store=store).stdout)["rescues"] == []


def test_volumes_only_restore_under_a_running_tree_needs_force(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    out = fscr("restore", m["id"], "--volumes-only", "--replace", store=store, check=False)
    assert out.returncode == 15 and str(pid) in out.stderr
    assert alive(pid)


def test_an_unlinked_file_held_only_by_a_mapping_is_preserved(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    size = 64 << 20
    pid, _ = workloads.start("mapped", str(vol), str(size))
    before = ask(vol, "mapped")
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert [(r["kind"], r["method"]) for r in m["relinks"]] == [("map", "reflink")]
    assert m["image_bytes"] < size // 4  # the file's pages are not in the image
    restore(store, m["id"])
    assert relinks_on(vol) == []
    after = ask(vol, "mapped")
    assert after == before


def test_a_deleted_executable_on_the_volume_is_preserved(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    exe = vol / "mysleep"
    shutil.copy2("/bin/sleep", exe)
    pid, _ = workloads.run(str(exe), "1000")
    wait_for(lambda: os.readlink(f"/proc/{pid}/exe") == str(exe))
    exe.unlink()
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert [(r["kind"], r["method"]) for r in m["relinks"]] == [("exe", "reflink")]
    r = restore(store, m["id"])
    assert alive(r["pid"])
    # The same program, unlinked again; the kernel names it after the relink it was reopened
    # from (docs/design.md).
    with open(f"/proc/{r['pid']}/exe", "rb") as f, open("/bin/sleep", "rb") as g:
        assert f.read() == g.read()
    assert os.stat(f"/proc/{r['pid']}/exe").st_nlink == 0
    assert os.readlink(f"/proc/{r['pid']}/exe").endswith(" (deleted)")
    assert relinks_on(vol) == [] and not freezer.cgroup_of(r["pid"]).frozen()


def test_run_with_an_unopenable_log_fails_cleanly(workloads):
    out = fscr("run", "--name", "badlog", "--log", "/nonexistent/dir/log", "--", "/bin/true",
               check=False)
    assert out.returncode == 16 and "cannot open log" in out.stderr
    assert not freezer.at("/fscr/badlog").exists()


def test_a_record_naming_the_root_cgroup_or_fscrs_own_is_refused(btrfs_volume, workloads,
                                                                  store):
    """This host's record under the store is a file too: one rewritten to name the root
    cgroup, or a cgroup holding fscr's ancestors (this test's), makes restore refuse before
    --replace kills anything; put back, the restore into the recorded cgroup works."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    home = freezer.cgroup_of(pid).rel
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    origin = store / "origins" / f"{m['id']}.json"
    kept = origin.read_bytes()
    rec = json.loads(kept)
    for cg in ("/", freezer.cgroup_of(os.getpid()).rel):
        rec["cgroup"] |= {"path": cg, "original": cg}
        origin.write_text(json.dumps(rec))
        out = fscr("restore", m["id"], "--replace", store=store, check=False)
        assert out.returncode == 15 and "refusing to restore into it" in out.stderr, out.stderr
        assert alive(pid) and freezer.cgroup_of(pid).rel == home
    origin.write_bytes(kept)
    r = restore(store, m["id"], "--replace")
    assert r["pid"] == pid and freezer.cgroup_of(pid).rel == home

