"""fscr backup, prune and schedule, end to end on a loopback btrfs volume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FSCR, alive, fscr, lines
from test_pipeline import grows, restore


def job_file(tmp_path: Path, store: Path, vol: Path, name: str, **retention: int) -> Path:
    keep = "\n".join(f"{k} = {v}" for k, v in retention.items())
    p = tmp_path / "app.toml"
    p.write_text(f'store = "{store}"\n[target]\nname = "{name}"\n[snapshot]\nkind = "btrfs"\n'
                 f'volumes = ["{vol}"]\n[backend]\nkind = "criu"\n[retention]\n{keep}\n')
    return p


def test_five_runs_keep_the_last_three_each_restorable(btrfs_volume, workloads, store,
                                                       tmp_path):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    job = job_file(tmp_path, store, vol, name, keep_last=3)
    made = []
    for _ in range(5):
        out = fscr("backup", str(job), "--json")
        r = json.loads(out.stdout)
        assert r["status"] == "success" and r["exit_code"] == 0
        assert re.search(rf"fscr backup app: success id={r['id']} duration=\S+s "
                         r"freeze=\S+s kept=\d+ removed=\d+", out.stderr), out.stderr
        made.append(r["id"])
        grows(vol / "history", len(lines(vol / "history")) + 2)
    listed = [c["id"] for c in json.loads(fscr("list", "--json", store=store).stdout)
              ["checkpoints"]]
    assert listed == made[-3:]
    assert sorted(os.listdir(btrfs_volume.mnt / ".fscr-snapshots")) == sorted(made[-3:])
    assert sorted(os.listdir(store / "checkpoints")) == sorted(made[-3:])
    dry = json.loads(fscr("prune", str(job), "--dry-run", "--json").stdout)
    assert dry["remove"] == [] and dry["reasons"][made[-1]] == ["last checkpoint"]
    for ckpt in made[-3:]:
        r = restore(store, ckpt, "--replace")
        got = grows(vol / "history", len(lines(vol / "history")) + 2)
        assert got == list(range(1, len(got) + 1))
        assert r["pid"] == pid  # CRIU gives the tree its PIDs back
    assert alive(pid)


def test_overlapping_runs_of_one_job_make_one_checkpoint(btrfs_volume, workloads, store,
                                                         tmp_path):
    vol = btrfs_volume.path
    _, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    job = job_file(tmp_path, store, vol, name, keep_last=5)
    env = os.environ | {"FSCR_TEST_PAUSE_AT": "snapshot:1"}  # stretch the first run
    procs = [subprocess.Popen([str(FSCR), "backup", str(job), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        results.append((p.returncode, json.loads(out)["status"]))
    assert sorted(results) == [(0, "success"), (20, "skipped")]
    assert len(json.loads(fscr("list", "--json", store=store).stdout)["checkpoints"]) == 1


def test_a_wrong_key_names_file_key_and_what_is_expected(tmp_path, store):
    p = tmp_path / "bad.toml"
    p.write_text('[target]\nname = "x"\n[snapshot]\nvolumes = ["/srv"]\n[retention]\ndaily = "7"\n')
    out = fscr("backup", str(p), check=False)
    assert out.returncode == 16 and f"{p}: key retention.daily: " in out.stderr
    assert "Expected `int`, got `str`" in out.stderr
    p.write_text('[target]\nname = "x"\npid_file = "/run/x.pid"\n[snapshot]\nvolumes = ["/s"]\n')
    out = fscr("backup", str(p), check=False)
    assert out.returncode == 16 and "exactly one of pid_file, cgroup, name" in out.stderr
    p.write_text('[target]\nname = "x"\n')
    out = fscr("backup", str(p), check=False)
    assert out.returncode == 16 and "key snapshot: " in out.stderr


@pytest.mark.parametrize("kind", ["systemd", "cron"])
def test_schedule_install_writes_valid_units_or_a_cron_line(kind, tmp_path, store):
    job = job_file(tmp_path, store, Path("/srv/app"), "app", daily=7)
    dest = tmp_path / "units"
    dest.mkdir()
    out = fscr("schedule", "install", str(job), "--every", "1h", f"--{kind}", "--dest",
               str(dest))
    files = sorted(os.listdir(dest))
    assert all(f"wrote {dest / f}" in out.stdout for f in files)
    if kind == "systemd":
        assert files == ["fscr-backup-app.service", "fscr-backup-app.timer"]
        if shutil.which("systemd-analyze"):
            check = subprocess.run(["systemd-analyze", "verify", *[str(dest / f) for f in files]],
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
        assert "OnUnitActiveSec=1h" in (dest / files[1]).read_text()
    else:
        line = (dest / "fscr-backup-app").read_text().splitlines()[-1]
        assert re.fullmatch(
            rf"0 \* \* \* \* root \S+/fscr backup --quiet {re.escape(str(job))}", line)
    out = fscr("schedule", "remove", str(job), "--dest", str(dest))
    assert os.listdir(dest) == [] and out.stdout.count("removed") == len(files)
