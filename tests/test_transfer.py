"""send and receive: a checkpoint moved to "another machine" (a fresh btrfs filesystem at
the same place, a fresh store) and restored there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import FSCR, alive, fscr, lines, take_pid, wait_for
from test_pipeline import checkpoint, grows, restore

from fscr.process import freezer


def send(store: Path, ckpt: str, dest: Path, *args: str) -> int:
    with open(dest, "wb") as out:
        p = subprocess.run([str(FSCR), "send", ckpt, *args], stdout=out, stderr=subprocess.PIPE,
                           text=False, env=os.environ | {"FSCR_STORE": str(store)})
    assert p.returncode == 0, p.stderr.decode()
    return dest.stat().st_size


def receive(store: Path, stream: Path, check: bool = True) -> subprocess.CompletedProcess:
    with open(stream, "rb") as f:
        p = subprocess.run([str(FSCR), "receive", "--json"], stdin=f, capture_output=True,
                           text=True, env=os.environ | {"FSCR_STORE": str(store)})
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_a_checkpoint_restores_on_another_machine(btrfs_volume, workloads, store, tmp_path):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 5)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    at = lines(Path(m["volumes"][0]["snapshot"]) / "history")
    digest = json.loads(fscr("show", m["id"], "--json", store=store).stdout)["manifest_sha256"]
    stream = tmp_path / "stream"
    send(store, m["id"], stream)
    wait_for(lambda: not alive(pid))

    btrfs_volume.recreate()  # the source filesystem is gone; an empty one takes its place
    assert not vol.exists()
    there = tmp_path / "store2"
    assert json.loads(receive(there, stream).stdout)["id"] == m["id"]
    shown = json.loads(fscr("show", m["id"], "--json", store=there).stdout)
    assert shown["manifest_sha256"] == digest
    doctor = json.loads(fscr("doctor", "--for", m["id"], "--json", store=there).stdout)
    assert doctor["ok"], doctor

    r = restore(there, m["id"])
    got = grows(vol / "history", len(at) + 5)
    assert got == list(range(1, len(got) + 1)) and got[: len(at)] == at
    assert alive(r["pid"])


def test_a_received_checkpoint_kills_nothing_on_its_first_restore(btrfs_volume, workloads,
                                                                   store, tmp_path):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 5)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    stream = tmp_path / "stream"
    send(store, m["id"], stream)
    wait_for(lambda: not alive(pid))
    btrfs_volume.recreate()
    there = tmp_path / "store2"
    receive(there, stream)

    squatter = take_pid(pid)  # a process of "this machine" that has the root's PID
    try:
        out = fscr("restore", m["id"], "--replace", store=there, check=False)
        assert out.returncode == 10 and alive(squatter.pid)  # nothing here is its tree
    finally:
        squatter.kill()
        squatter.wait()
    r = restore(there, m["id"])
    # Its own cgroup under fscr's group was free here: it lands there, as at home.
    assert freezer.cgroup_of(r["pid"]).rel == f"/fscr/{name}"
    # Restored here, it is this host's now: --replace kills what that restore brought back.
    again = restore(there, m["id"], "--replace")
    assert again["pid"] == pid and alive(pid)
    grows(vol / "history", len(lines(vol / "history")) + 3)


def test_an_incremental_stream_carries_only_the_changes(btrfs_volume, workloads, store,
                                                        tmp_path):
    btrfs_volume.recreate(size=3 << 30)
    vol = btrfs_volume.path
    subprocess.run(["btrfs", "subvolume", "create", str(vol)], check=True, capture_output=True)
    with open(vol / "data", "wb") as f:  # 1 GiB of data that does not compress
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    first = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    with open(vol / "data", "r+b") as f:  # a 10 MiB change
        f.seek(100 << 20)
        f.write(os.urandom(10 << 20))
    second = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    full = send(store, first["id"], tmp_path / "full")
    inc = send(store, second["id"], tmp_path / "inc", "--parent", first["id"])
    assert inc < full * 0.05, (inc, full)
    wait_for(lambda: not alive(pid))
    at = lines(Path(second["volumes"][0]["snapshot"]) / "history")

    btrfs_volume.recreate()
    there = tmp_path / "store2"
    out = receive(there, tmp_path / "inc", check=False)
    assert out.returncode == 19 and "receive it first" in out.stderr
    receive(there, tmp_path / "full")
    receive(there, tmp_path / "inc")
    restore(there, second["id"])
    got = grows(vol / "history", len(at) + 3)
    assert got == list(range(1, len(got) + 1))


def _nothing_left(there: Path, mnt: Path, ckpt: str) -> None:
    assert json.loads(fscr("list", "--json", store=there).stdout)["checkpoints"] == []
    assert not (mnt / ".fscr-snapshots" / ckpt).exists()
    assert not (there / "checkpoints" / ckpt).exists()
    assert os.listdir(there / "journal") == []


@pytest.mark.parametrize("damage", ["cut 10", "cut 1/3", "cut 2/3", "cut -10", "flip 1/2",
                                    "flip -100", "flip 200"])
def test_a_damaged_stream_is_refused_and_leaves_nothing(damage, btrfs_volume, workloads, store,
                                                        tmp_path):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    stream = tmp_path / "stream"
    size = send(store, m["id"], stream)
    data = bytearray(stream.read_bytes())
    how, where = damage.split()
    at = {"1/3": size // 3, "2/3": 2 * size // 3, "1/2": size // 2}.get(where) or int(where)
    at = at % size
    if how == "cut":
        del data[at:]
    else:
        data[at] ^= 0x40
    stream.write_bytes(bytes(data))
    btrfs_volume.recreate()
    there = tmp_path / "store2"
    out = receive(there, stream, check=False)
    assert out.returncode == 18 and out.stderr.count("\n") == 1, out.stderr
    assert "truncated" in out.stderr or "corrupt" in out.stderr
    _nothing_left(there, btrfs_volume.mnt, m["id"])
