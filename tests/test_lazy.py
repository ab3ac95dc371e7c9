"""`fscr restore --lazy`: the tree runs while CRIU's lazy-pages daemon (userfaultfd) serves
its memory; the page images are verified meanwhile, and a corrupt one is caught."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import alive, ask, fscr, said, wait_for
from test_pipeline import checkpoint, flip_a_bit, grows, lines, restore

from fscr import journal, lazy
from fscr.process import freezer

pytestmark = pytest.mark.skipif(not lazy.available()[0],
                                reason="no userfaultfd here: " + lazy.available()[1])


def daemons_of(store: Path) -> list[int]:
    """PIDs of lazy-pages daemons serving images of this store (read from /proc only)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lazy-pages" in cmd and any(str(store).encode() in a for a in cmd):
            out.append(int(d))
    return out


def test_lazy_restore_brings_back_every_page_of_memory(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("memory", str(vol), "48")
    grows(vol / "history", 3)
    before = ask(vol, "memory")["sha256"]
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    wait_for(lambda: not alive(pid), 10, "the tree to be killed")
    at_checkpoint = lines(Path(m["volumes"][0]["snapshot"]) / "history")
    r = restore(store, m["id"], "--lazy")
    assert "verify pages" in r["durations"]
    assert ask(vol, "memory")["sha256"] == before
    # memory and file agree: the count goes on from where the checkpoint left it
    after = grows(vol / "history", len(at_checkpoint) + 2)
    assert after[: len(at_checkpoint)] == at_checkpoint
    assert after == list(range(1, len(after) + 1))
    assert daemons_of(store) == []  # it handed over every page and left
    assert not (store / "checkpoints" / m["id"] / lazy.SOCKET).exists()


def killed_with_a_corrupt_page_image(vol: Path, workloads, store: Path):  # noqa: ANN001, ANN201
    """A memory workload checkpointed with --kill, a file written on its volume after, and
    a bit of its page image flipped (same size: only the checksum can tell)."""
    pid, _ = workloads.start("memory", str(vol), "16")
    grows(vol / "history", 3)
    cg = freezer.cgroup_of(pid)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    wait_for(lambda: not alive(pid), 10, "the tree to be killed")
    (vol / "written-after").write_text("the volume as it was before the restore")
    flip_a_bit(next((store / "checkpoints" / m["id"] / "images").glob("pages-*.img")))
    return cg, m


def test_a_corrupt_page_image_kills_the_lazily_restored_tree_and_puts_the_volumes_back(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    cg, m = killed_with_a_corrupt_page_image(vol, workloads, store)
    out = fscr("restore", m["id"], "--lazy", store=store, check=False)
    assert out.returncode == 22, out.stderr
    [line] = said(out.stderr)  # one line, beside the progress lines
    assert "pages-" in line and "killed" in line and "put back" in line
    assert cg.procs() == []  # the tree that ran on corrupt memory is gone
    assert (vol / "written-after").exists()
    assert daemons_of(store) == []
    assert not list((store / "journal").iterdir())
    gc = json.loads(fscr("gc", "--json", store=store).stdout)
    assert gc["runs"] == []


def test_lazy_takes_no_volumes_only(store):
    out = fscr("restore", "x", "--lazy", "--volumes-only", store=store, check=False)
    assert out.returncode == 2 and "--lazy" in out.stderr


def gc_clean(store: Path) -> None:
    assert json.loads(fscr("gc", "--json", store=store).stdout)["runs"] != []
    assert not list((store / "journal").iterdir())
    wait_for(lambda: daemons_of(store) == [], 30, "the lazy-pages daemon to be gone")


# From the journal's definitions: what only a lazy restore writes (lazy, verified), and the
# restored between them.
LAZY_EVENTS = [e for e in journal.written_by("restore", journal.LAZY_OPT)
               if journal.EVENTS[e].runs["restore"] == journal.LAZY_OPT or e == "restored"]


@pytest.mark.parametrize("event", LAZY_EVENTS)
def test_a_lazy_restore_killed_at_each_stage_is_finished_or_undone_by_gc(
        event, btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("memory", str(vol), "16")
    grows(vol / "history", 3)
    cg = freezer.cgroup_of(pid)
    before = ask(vol, "memory")["sha256"]
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    wait_for(lambda: not alive(pid), 10, "the tree to be killed")
    (vol / "written-after").write_text("newer")
    out = fscr("restore", m["id"], "--lazy", store=store, check=False,
               env={"FSCR_TEST_KILL_AT": event})
    assert out.returncode == -9, out.stderr
    gc_clean(store)
    if event == "lazy":  # the daemon ran, CRIU had not: undone, the daemon stopped
        assert (vol / "written-after").exists() and cg.procs() == []
    else:  # the tree ran: finished, on the checkpoint's memory
        assert not (vol / "written-after").exists()
        assert ask(vol, "memory")["sha256"] == before


def test_gc_kills_a_lazily_restored_tree_whose_pages_were_never_verified_and_are_corrupt(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    cg, m = killed_with_a_corrupt_page_image(vol, workloads, store)
    out = fscr("restore", m["id"], "--lazy", store=store, check=False,
               env={"FSCR_TEST_KILL_AT": "restored"})
    assert out.returncode == -9, out.stderr
    gc_clean(store)
    assert (vol / "written-after").exists()
    wait_for(lambda: cg.procs() == [], 10, "the corrupt tree to be gone")
