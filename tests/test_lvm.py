"""The LVM snapshot provider.

What runs for real on every machine: a volume group on a loop device (pvcreate and vgcreate need
no device-mapper) read through lvm2's JSON reports, the udev wait against a real loop device
event, and the clear refusal where device-mapper is missing. What needs device-mapper (any
logical volume at all: lvcreate refuses without it) is in the tests at the end, which skip
with that reason and run where it exists. Between the two, the exact lvm2 command lines fscr
builds are checked here, and checked again by lvm2's own --test mode where LVs can exist.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _umount as umount
from conftest import alive, fscr, lines, sh, wait_for

from fscr import relink
from fscr.errors import BadInput, BadManifest, BadVolume, SnapshotFailed
from fscr.fsutil import Mount
from fscr.manifest import Manifest
from fscr.names import is_lvm_snapshot
from fscr.snapshot import get
from fscr.snapshot.devices import DeviceWatch, attribute
from fscr.snapshot.lvm import (
    LogicalVolume,
    Lvm,
    Remount,
    merge_commands,
    mount_command,
    remove_command,
    size_args,
    size_bytes,
    snapshot_command,
    unavailable,
)

DOCS = Path(__file__).parent.parent / "docs" / "lvm.md"
LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
NO_DM = unavailable()


def lvm(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          env=LVM_ENV).stdout.strip()


def lv_row(name: str, attr: str, segtype: str = "linear", origin: str = "", pool: str = "",
           size: int = 1 << 30, vg: str = "data") -> LogicalVolume:
    """A row as `lvs --reportformat json` reports it (lvm2 gives every value as a string);
    this kernel cannot create the LV it would describe."""
    return LogicalVolume.model_validate({
        "lv_name": name, "vg_name": vg, "lv_uuid": "x", "lv_attr": attr, "lv_size": str(size),
        "origin": origin, "pool_lv": pool, "segtype": segtype, "snap_percent": "",
        "lv_kernel_major": "254", "lv_kernel_minor": "3"})


CLASSIC = lv_row("srv", "-wi-ao----")
THIN = lv_row("srv", "Vwi-aotz--", segtype="thin", pool="pool")
MOUNT = Remount.of(Mount("ext4", "/srv/app", "rw,errors=remount-ro", "/dev/mapper/data-srv",
                         "rw,noatime", (254, 3)))


# ----------------------------------------------------------------- a real volume group

@pytest.fixture
def vg(tmp_path: Path) -> Iterator[str]:
    """A volume group of its own on a loop device; removed with everything in it."""
    img = tmp_path / "pv.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    loop = sh("losetup", "--find", "--show", str(img))
    name = f"fscrtest{secrets.token_hex(3)}"
    try:
        lvm("pvcreate", "-q", loop)
        lvm("vgcreate", "-q", name, loop)
        yield name
    finally:
        subprocess.run(["vgremove", "-qff", name], capture_output=True, env=LVM_ENV)
        subprocess.run(["pvremove", "-qff", loop], capture_output=True, env=LVM_ENV)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_real_volume_group_is_read_through_lvm2s_json_report(vg):
    lv = Lvm()
    group = lv.vgs(vg)
    assert [g.vg_name for g in group] == [vg]
    # 256 MiB on the PV, less lvm2's metadata area: whole 4 MiB extents, all free
    assert group[0].vg_extent_size == 4 << 20
    assert 240 << 20 <= group[0].vg_free < 256 << 20
    assert group[0].vg_free % group[0].vg_extent_size == 0
    assert lv.lvs(vg) == []
    # A snapshot name in a group that has no such LV (and in one that does not exist).
    assert not lv.exists(f"/dev/{vg}/fscr_c1_0")
    assert not lv.exists("/dev/nosuchvg/fscr_c1_0")
    lv.delete(f"/dev/{vg}/fscr_c1_0")  # a missing snapshot is not an error


def test_a_volume_that_is_not_a_logical_volume_is_refused(btrfs_volume, tmp_path):
    with pytest.raises(BadVolume, match="which is not an LVM logical volume"):
        Lvm().origin(btrfs_volume.mnt)
    with pytest.raises(BadVolume, match="is not a mount point"):
        Lvm().origin(tmp_path)


def test_lvm_reports_are_validated():
    with pytest.raises(SnapshotFailed, match="cannot read lvm2's lv report"):
        Lvm(runner=lambda argv: '{"report": [{"lv": [{"lv_name": "x"}]}]}').lvs()
    with pytest.raises(SnapshotFailed, match="cannot read lvm2's lv report"):
        Lvm(runner=lambda argv: "not json").lvs()


def test_only_lvs_fscr_named_can_be_touched():
    for path in ("/dev/data/home", "/dev/../etc/fscr_x", "/etc/passwd", "/dev/data/sub/fscr_x",
                 "/dev/../fscr_x", "/dev/./fscr_x"):
        with pytest.raises(BadManifest, match="is not an LV fscr made"):
            Lvm().exists(path)
    assert is_lvm_snapshot("/dev/data/fscr_c1_0", "c1", 0)
    assert not is_lvm_snapshot("/dev/data/fscr_c1_1", "c1", 0)
    assert not is_lvm_snapshot("/dev/data/fscr_c2_0", "c1", 0)
    assert not is_lvm_snapshot("/dev/-x/fscr_c1_0", "c1", 0)


def test_delete_removes_only_what_a_rescue_record_names_as_the_providers_own():
    """`fscr delete rescue_...` asks the record's provider about each path: an edited record
    naming another LV (or another rescue's) is refused, not deleted."""
    name = "rescue_c1_20261204T130000Z_ab12"
    lvm, btrfs = get("lvm"), get("btrfs")
    assert lvm.owns_rescue(name, f"/dev/data/fscr_{name}_0")
    assert lvm.owns_rescue(name, f"/dev/other/fscr_{name}_12")
    for path in (f"/dev/data/fscr_{name}_", f"/dev/data/fscr_{name}_0x", "/dev/data/home",
                 f"/dev/data/fscr_{name[:-1]}f_0", f"/dev/data/fscr_{name}_0_1"):
        assert not lvm.owns_rescue(name, path), path
    assert btrfs.owns_rescue(name, f"/mnt/.fscr-snapshots/{name}/0")
    assert not btrfs.owns_rescue(name, "/mnt/vol")
    assert not get("none").owns_rescue(name, "/mnt/vol")


def test_a_manifest_names_only_its_own_lvm_snapshots(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    wait_for(lambda: len(lines(vol / "history")) > 2)
    m = json.loads(fscr("checkpoint", "--json", "--backend", "freeze-only", "--pid", str(pid),
                        "--volume", str(vol), store=store).stdout)
    doc = json.loads((store / "checkpoints" / m["id"] / "manifest.json").read_text())
    doc["snapshot"] = "lvm"

    def with_snapshot(path: str | None) -> bytes:
        doc["volumes"][0]["snapshot"] = path
        return json.dumps(doc).encode()

    own = f"/dev/data-1/fscr_{m['id']}_0"
    assert Manifest.from_bytes(with_snapshot(own), "m").volumes[0].snapshot == own
    for bad in ("/dev/data/home", "/etc/passwd", f"/dev/data/fscr_{m['id']}_1",
                f"/dev/data/../fscr_{m['id']}_0", f"/dev/../fscr_{m['id']}_0",
                "/dev/data/fscr_other_0", None,
                str(vol.parent / ".fscr-snapshots" / m["id"] / "0")):
        with pytest.raises(BadManifest, match="expected /dev/<vg>/fscr_"):
            Manifest.from_bytes(with_snapshot(bad), "m")


def test_relinks_stay_on_a_read_only_view(btrfs_volume):
    """A classic LVM snapshot is restored as a read-only mount: the restore's last step, which
    unlinks the relinks, leaves them there (as in the snapshot) instead of failing."""
    vol = btrfs_volume.path
    d = vol / "lost+found" / "checkpoint"
    d.mkdir(parents=True, mode=0o700)
    (d / "unlink-at-restart-c1-0").write_text("kept")
    sh("mount", "-o", "remount,ro", str(btrfs_volume.mnt))
    try:
        assert relink.remove_relinks(vol, "c1") == []
        assert (d / "unlink-at-restart-c1-0").read_text() == "kept"
    finally:
        sh("mount", "-o", "remount,rw", str(btrfs_volume.mnt))
    assert relink.remove_relinks(vol, "c1") == ["unlink-at-restart-c1-0"]


# ----------------------------------------------------------------- the commands fscr runs

def test_classic_snapshot_command_takes_a_size_or_a_share_of_the_origin():
    assert snapshot_command(CLASSIC, "fscr_c1_0", None) == [
        "lvcreate", "--snapshot", "--name", "fscr_c1_0", "--permission", "r",
        "--extents", "20%ORIGIN", "data/srv"]
    assert snapshot_command(CLASSIC, "fscr_c1_0", "2G")[-3:] == ["--size", "2G", "data/srv"]
    assert size_bytes("20%ORIGIN", CLASSIC) == (1 << 30) // 5
    assert size_bytes("512M", CLASSIC) == 512 << 20
    assert size_bytes("100", CLASSIC) == 100 << 20  # lvm2's default unit is MiB
    for bad in ("2X", "0%ORIGIN", "101%ORIGIN", "-1G", "1G;rm", ""):
        with pytest.raises(BadInput, match="invalid --lvm-size"):
            size_args(bad)


def test_thin_snapshot_command_has_no_size_and_a_restore_copy_is_active_and_writable():
    assert snapshot_command(THIN, "fscr_c1_0", "2G") == [
        "lvcreate", "--snapshot", "--name", "fscr_c1_0", "--permission", "r", "data/srv"]
    snap = lv_row("fscr_c1_0", "Vri---tz-k", segtype="thin", origin="srv", pool="pool")
    assert snapshot_command(snap, "fscr_restored_x_0", None, writable=True, active=True) == [
        "lvcreate", "--snapshot", "--name", "fscr_restored_x_0", "--permission", "rw",
        "--setactivationskip", "n", "--activate", "y", "data/fscr_c1_0"]


def test_mount_and_merge_commands():
    assert mount_command("/dev/dm-4", Path("/srv/app"), "xfs", ["ro"]) == [
        "mount", "-t", "xfs", "-o", "ro,nouuid", "/dev/dm-4", "/srv/app"]
    assert mount_command("/dev/dm-4", Path("/srv/app"), "ext4", []) == [
        "mount", "-t", "ext4", "/dev/dm-4", "/srv/app"]
    assert merge_commands(CLASSIC, "fscr_c1_0", MOUNT) == [
        ["umount", "/srv/app"],
        ["lvconvert", "--merge", "--interval", "1", "data/fscr_c1_0"],
        ["mount", "-t", "ext4", "-o", "noatime", "/dev/data/srv", "/srv/app"],
    ]


def test_classic_snapshot_states_are_read_from_lv_attr():
    snap = lv_row("fscr_c1_0", "swi-a-s---", origin="srv")
    assert snap.classic_snapshot and not snap.invalid and not snap.merging
    assert lv_row("fscr_c1_0", "swi-I-s---", origin="srv").invalid  # filled up: dropped
    merging = lv_row("[fscr_c1_0]", "Swi-a-s---", origin="srv")  # lvs -a: hidden while merging
    assert merging.merging and merging.lv_name == "fscr_c1_0"
    assert lv_row("srv", "Owi-ao----").open and not CLASSIC.merging
    assert not THIN.classic_snapshot and THIN.thin


def test_docs_list_the_commands_fscr_builds():
    """docs/lvm.md shows the commands in order for an example; they must be what the code
    builds, so an admin checking them checks the real thing."""
    text = DOCS.read_text()
    snap = lv_row("fscr_c1_0", "Vri---tz-k", segtype="thin", origin="srv", pool="pool")
    shown = [
        snapshot_command(CLASSIC, "fscr_c1_0", None),
        snapshot_command(THIN, "fscr_c1_0", None),
        snapshot_command(snap, "fscr_restored_c1_20261125T120000Z_ab12_0", None, writable=True,
                         active=True),
        mount_command("/dev/dm-5", Path("/srv/app"), "ext4", []),
        *merge_commands(CLASSIC, "fscr_c1_0", MOUNT),
    ]
    for argv in shown:
        assert " ".join(argv) in text, f"docs/lvm.md lacks: {' '.join(argv)}"


def test_lvm_options_belong_to_lvm():
    with pytest.raises(BadInput, match="--lvm-size applies to LVM snapshots"):
        get("btrfs", size="2G")
    with pytest.raises(BadInput, match="--rollback applies to LVM snapshots"):
        get("btrfs", rollback=True)


# ----------------------------------------------------------------- the udev wait

def _backed_by(img: Path):  # noqa: ANN202
    return lambda dev: attribute(dev, "loop/backing_file") == str(img)


def test_device_watch_sees_a_loop_device_attach_through_its_uevent(tmp_path):
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    attached: list[str] = []
    with DeviceWatch() as watch:
        # Attached only once the wait is listening: found through the kernel's event.
        timer = threading.Timer(0.3, lambda: attached.append(
            sh("losetup", "--find", "--show", str(img))))
        timer.start()
        try:
            node = watch.wait(_backed_by(img), "the test's loop device", timeout=30)
        finally:
            timer.join()
            for loop in attached:
                subprocess.run(["losetup", "-d", loop], check=True)
    assert attached and node == attached[0]


def test_device_watch_finds_a_device_that_appeared_before_it_waited(tmp_path):
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    with DeviceWatch() as watch:
        loop = sh("losetup", "--find", "--show", str(img))
        try:
            assert watch.wait(_backed_by(img), "the test's loop device", timeout=30) == loop
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)


def test_device_watch_gives_up_with_a_clear_error(tmp_path):
    with DeviceWatch() as watch, pytest.raises(SnapshotFailed,
                                                match=r"nothing did not appear within 0.3 s"):
        watch.wait(lambda dev: False, "nothing", timeout=0.3)


# ----------------------------------------------------------------- this machine

@pytest.mark.skipif(NO_DM is None, reason="device-mapper is present: LVM works here")
def test_without_device_mapper_lvm_is_refused_before_anything_is_frozen(btrfs_volume,
                                                                         workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    wait_for(lambda: len(lines(vol / "history")) > 3)
    p = fscr("checkpoint", "--snapshot", "lvm", "--pid", str(pid), "--volume", str(vol),
             store=store, check=False)
    assert p.returncode == 11
    assert p.stderr.strip().splitlines() == [f"fscr: error: --snapshot lvm: {NO_DM}"]
    assert "device-mapper" in p.stderr
    # Nothing was frozen or made: the workload counts on, the store holds no checkpoint.
    before = len(lines(vol / "history"))
    wait_for(lambda: len(lines(vol / "history")) > before + 3)
    assert alive(pid)
    assert not list((store / "checkpoints").glob("*")) if (store / "checkpoints").exists() \
        else True
    doctor = json.loads(fscr("doctor", "--json", check=False).stdout)
    row = next(r for r in doctor["checks"] if r["name"] == "lvm")
    assert row["ok"] is False and NO_DM in row["detail"]


def test_a_backup_job_may_use_lvm(tmp_path):
    from fscr.backup import load

    job = tmp_path / "j.toml"
    job.write_text('[target]\nname = "x"\n[snapshot]\nkind = "lvm"\nvolumes = ["/srv"]\n'
                   'lvm_size = "10%ORIGIN"\n')
    assert load(str(job)).snapshot.lvm_size == "10%ORIGIN"
    job.write_text('[target]\nname = "x"\n[snapshot]\nvolumes = ["/srv"]\nlvm_size = "1G"\n')
    with pytest.raises(BadInput, match="lvm_size applies to kind"):
        load(str(job))


# ----------------------------------------------------------------- where device-mapper exists

needs_dm = pytest.mark.skipif(NO_DM is not None, reason=f"needs device-mapper: {NO_DM}")


@dataclass
class LvmVolumes:
    vg: str
    classic: Path  # ext4 on a linear LV
    thin: Path  # ext4 on a thin LV


@pytest.fixture
def lvm_volumes(vg: str, tmp_path: Path, workloads) -> Iterator[LvmVolumes]:  # noqa: ANN001
    made = LvmVolumes(vg, tmp_path / "classic", tmp_path / "thin")
    try:
        lvm("lvcreate", "-q", "--yes", "-L", "64M", "-n", "srv", vg)
        lvm("lvcreate", "-q", "--yes", "-L", "96M", "-T", f"{vg}/pool")
        lvm("lvcreate", "-q", "--yes", "-V", "128M", "-T", f"{vg}/pool", "-n", "tsrv")
        for lv, mnt in ((f"/dev/{vg}/srv", made.classic), (f"/dev/{vg}/tsrv", made.thin)):
            sh("mkfs.ext4", "-q", lv)
            mnt.mkdir()
            sh("mount", lv, str(mnt))
        yield made
    finally:
        workloads.kill_all()
        for mnt in (made.classic, made.thin):  # restores stack mounts: take them all off
            while subprocess.run(["mountpoint", "-q", str(mnt)]).returncode == 0:
                umount(mnt)
        subprocess.run(["vgchange", "-an", vg], capture_output=True, env=LVM_ENV)


def lv_names(vg: str) -> list[str]:
    return sorted(lv.lv_name for lv in Lvm().lvs(vg))


def in_test_mode(argv: list[str]) -> str:
    return lvm(argv[0], "--test", *argv[1:])


@needs_dm
def test_lvm2_accepts_the_commands_in_its_test_mode(lvm_volumes):
    vg = lvm_volumes.vg
    lv = {x.lv_name: x for x in Lvm().lvs(vg)}
    for argv in (snapshot_command(lv["srv"], "fscr_t_0", None),
                 snapshot_command(lv["srv"], "fscr_t_0", "8M"),
                 snapshot_command(lv["tsrv"], "fscr_t_0", None)):
        in_test_mode(argv)
    # Restore and merge need a snapshot that exists: made for real, then tested.
    lvm(*snapshot_command(lv["srv"], "fscr_t_0", "8M"))
    snap = next(x for x in Lvm().lvs(vg) if x.lv_name == "fscr_t_0")
    mount = Remount(point=str(lvm_volumes.classic), fstype="ext4", options=[])
    _umount, convert, _mount = merge_commands(lv["srv"], "fscr_t_0", mount)
    for argv in (convert, remove_command(snap.full)):
        in_test_mode(argv)
    lvm(*remove_command(snap.full))


@needs_dm
def test_a_classic_snapshot_that_filled_up_is_reported_not_used(lvm_volumes, workloads,
                                                                store):
    vol = lvm_volumes.classic
    pid, _ = workloads.start("counter", str(vol))
    wait_for(lambda: len(lines(vol / "history")) > 3)
    m = json.loads(fscr("checkpoint", "--json", "--snapshot", "lvm", "--lvm-size", "4M",
                        "--pid", str(pid), "--volume", str(vol), store=store).stdout)
    with open(vol / "fill", "wb") as f:  # more changes than the 4 MiB snapshot can hold
        f.write(os.urandom(16 << 20))
        os.fsync(f.fileno())
    shown = json.loads(fscr("show", "--json", m["id"], store=store).stdout)
    assert shown["volumes"][0]["state"].startswith("invalid")
    p = fscr("restore", m["id"], "--replace", "--volumes-only", store=store, check=False)
    assert p.returncode == 9 and "is invalid: it filled up" in p.stderr
    assert alive(pid)


@needs_dm
def test_thin_volume_checkpointed_and_restored_by_mounting_a_copy(lvm_volumes, workloads,
                                                                  store):
    vol, vg = lvm_volumes.thin, lvm_volumes.vg
    pid, _ = workloads.start("counter", str(vol))
    wait_for(lambda: len(lines(vol / "history")) > 5)
    m = json.loads(fscr("checkpoint", "--json", "--snapshot", "lvm", "--pid", str(pid),
                        "--volume", str(vol), "--kill", store=store).stdout)
    snap = m["volumes"][0]["snapshot"]
    assert snap == f"/dev/{vg}/fscr_{m['id']}_0" and f"fscr_{m['id']}_0" in lv_names(vg)
    wait_for(lambda: not alive(pid), 5, "the tree to be killed")
    at_kill = lines(vol / "history")
    refused = fscr("restore", m["id"], "--rollback", store=store, check=False)
    assert refused.returncode == 15 and "is thin" in refused.stderr

    fscr("restore", m["id"], store=store)
    after = wait_for(lambda: (v := lines(vol / "history")) and len(v) > len(at_kill) + 5 and v,
                     15, "the restored counter")
    assert after == list(range(1, len(after) + 1))
    assert [n for n in lv_names(vg) if n.startswith("fscr_restored_")]
    # The checkpoint's snapshot is untouched, and deleting the checkpoint removes it.
    workloads.kill_all()
    umount(vol)
    fscr("delete", m["id"], store=store)
    assert f"fscr_{m['id']}_0" not in lv_names(vg)


@needs_dm
def test_classic_volume_rolled_back_by_merge(lvm_volumes, workloads, store):
    vol, vg = lvm_volumes.classic, lvm_volumes.vg
    pid, _ = workloads.start("writer", str(vol))
    wait_for(lambda: (vol / "data").exists() and (vol / "data").stat().st_size > 640)
    m = json.loads(fscr("checkpoint", "--json", "--snapshot", "lvm", "--lvm-size", "16M",
                        "--pid", str(pid), "--volume", str(vol), store=store).stdout)
    size = (vol / "data").stat().st_size
    wait_for(lambda: (vol / "data").stat().st_size > size + 6400)
    refused = fscr("restore", m["id"], "--replace", store=store, check=False)
    assert refused.returncode == 15 and "--rollback" in refused.stderr

    r = json.loads(fscr("restore", "--json", m["id"], "--replace", "--rollback",
                        store=store).stdout)
    assert (vol / "data").stat().st_size < size + 6400
    wait_for(lambda: (vol / "data").stat().st_size > size + 6400)
    assert not (vol / "MISMATCH").exists()
    # The merge used up the classic snapshot; what the volume held is in the rescue LV.
    assert f"fscr_{m['id']}_0" not in lv_names(vg)
    assert [re.sub(r"_0$", "", Path(p).name) for p in r["rescue_snapshots"]] == [
        f"fscr_{n}" for n in [x["name"] for x in json.loads(
            fscr("list", "--json", store=store).stdout)["rescues"]]]


@needs_dm
def test_gc_removes_the_snapshot_of_a_checkpoint_that_died(lvm_volumes, workloads, store):
    vol, vg = lvm_volumes.thin, lvm_volumes.vg
    pid, _ = workloads.start("counter", str(vol))
    wait_for(lambda: len(lines(vol / "history")) > 3)
    p = fscr("checkpoint", "--snapshot", "lvm", "--pid", str(pid), "--volume", str(vol),
             "--id", "dying", store=store, check=False,
             env={"FSCR_TEST_KILL_AT": "dump"})
    assert p.returncode != 0 and "fscr_dying_0" in lv_names(vg)
    fscr("gc", store=store)
    assert "fscr_dying_0" not in lv_names(vg)
    assert alive(pid)
