"""fscr doctor reports what this machine has, and names what is missing."""

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import fscr


def test_doctor_finds_every_essential_and_reports_what_this_machine_lacks():
    out = fscr("doctor", "--json")
    report = json.loads(out.stdout)
    rows = {r["name"]: r for r in report["checks"]}
    assert report["ok"] and report["missing"] == []
    for name in ("root", "kernel checkpoint/restore", "criu", "criu rpc", "cgroup freezer",
                 "btrfs"):
        assert rows[name]["ok"], rows[name]
    assert "4.2.1" in rows["criu"]["detail"] and "Looks good" in rows["criu"]["detail"]
    # What is optional is reported as this machine has it, asked of the kernel directly.
    dm = "device-mapper" in Path("/proc/misc").read_text()
    assert rows["lvm"]["ok"] == (dm and shutil.which("lvm") is not None)
    if not rows["lvm"]["ok"]:
        assert "device-mapper" in rows["lvm"]["detail"] or "lvm2" in rows["lvm"]["detail"]
    caps = next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("CapEff:"))
    has_cap = bool(int(caps, 16) >> 24 & 1)
    assert rows["CAP_SYS_RESOURCE"]["ok"] == has_cap
    assert rows["CAP_SYS_RESOURCE"]["warning"] == (not has_cap)
    if not has_cap:
        assert "cannot dump tasks of other users" in rows["CAP_SYS_RESOURCE"]["detail"]
    run_fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", "/run"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert rows["/run on tmpfs"]["ok"] == (run_fs == "tmpfs")
    if run_fs != "tmpfs":
        assert f"/run is on {run_fs}, not tmpfs" in rows["/run on tmpfs"]["detail"]
        assert "warning" in fscr("doctor").stdout


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


def test_doctor_fails_clearly_without_pycriu(tmp_path: Path):
    # A pycriu package without its generated RPC messages shadows the installed one.
    (tmp_path / "pycriu").mkdir()
    (tmp_path / "pycriu" / "__init__.py").write_text("")
    out = fscr("doctor", "--json", check=False, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 11
    report = json.loads(out.stdout)
    assert report["missing"] == ["criu rpc"]
    row = {r["name"]: r for r in report["checks"]}["criu rpc"]
    assert "rpc_pb2" in row["detail"] and "scripts/setup" in row["detail"]


def test_doctor_says_whether_lazy_restore_works_here():
    rows = {r["name"]: r for r in json.loads(fscr("doctor", "--json").stdout)["checks"]}
    criu = rows["criu"]["detail"].split()[0]
    # asked of CRIU directly: userfaultfd and its non-cooperative events
    works = all(subprocess.run([criu, "check", "--feature", f], capture_output=True)
                .returncode == 0 for f in ("uffd", "uffd-noncoop"))
    lazy = rows["lazy restore"]
    assert lazy["ok"] == works and not lazy["essential"]
    assert ("restore --lazy" in lazy["detail"]) if works else ("userfaultfd" in lazy["detail"])
    hidden = json.loads(fscr("doctor", "--json", check=False,
                             env={"FSCR_CRIU": "/nonexistent"}).stdout)
    assert not {r["name"]: r for r in hidden["checks"]}["lazy restore"]["ok"]
