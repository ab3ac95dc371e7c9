"""fscr doctor reports what this machine has, and names what is missing."""

import json
import os

from conftest import fscr


def test_doctor_finds_every_essential_and_reports_lvm_unavailable():
    out = fscr("doctor", "--json")
    report = json.loads(out.stdout)
    rows = {r["name"]: r for r in report["checks"]}
    assert report["ok"] and report["missing"] == []
    for name in ("root", "kernel checkpoint/restore", "criu", "cgroup freezer", "btrfs"):
        assert rows[name]["ok"], rows[name]
    assert "4.2.1" in rows["criu"]["detail"] and "Looks good" in rows["criu"]["detail"]
    # This kernel has no device-mapper: LVM is reported unavailable, not essential.
    assert not rows["lvm"]["ok"] and "device-mapper" in rows["lvm"]["detail"]


def test_doctor_names_criu_and_fails_when_criu_is_hidden():
    path = ":".join(p for p in os.environ["PATH"].split(":")
                    if not os.path.exists(os.path.join(p, "criu")))
    out = fscr("doctor", check=False,
               env={"FSCR_CRIU_PREFIX": "/nonexistent", "PATH": path})
    assert out.returncode == 11
    assert "essential items missing: criu" in out.stdout


def test_doctor_reports_a_bad_fscr_criu_setting():
    out = fscr("doctor", "--json", check=False, env={"FSCR_CRIU": "/nonexistent"})
    assert out.returncode == 11
    report = json.loads(out.stdout)
    assert report["missing"] == ["criu"]
    assert "/nonexistent" in {r["name"]: r for r in report["checks"]}["criu"]["detail"]
