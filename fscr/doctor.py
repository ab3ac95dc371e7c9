"""`fscr doctor`: what fscr needs on this machine, one row each, and what it found."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from . import preflight, snapshot
from .backends import criu
from .errors import FscrError
from .fsutil import mount_of
from .names import FSCR_GROUP
from .process import freezer
from .process.tree import read_stat
from .store import Store


@dataclass(frozen=True)
class Row:
    name: str
    ok: bool
    essential: bool
    detail: str
    warning: bool = False  # not ok: fscr works, but some workloads or timings suffer


def _root() -> Row:
    ok = os.geteuid() == 0
    return Row("root", ok, True, "running as root" if ok else f"running as uid {os.geteuid()}")


def _kernel() -> Row:
    # ns_last_pid exists only with CONFIG_CHECKPOINT_RESTORE; map_files needs it as well.
    ok = Path("/proc/sys/kernel/ns_last_pid").exists() and Path("/proc/self/map_files").exists()
    return Row("kernel checkpoint/restore", ok, True,
               f"kernel {os.uname().release}" + ("" if ok else ": CONFIG_CHECKPOINT_RESTORE off"))


def _criu() -> Row:
    found = criu.find()
    if found.path is None:
        return Row("criu", False, True, f"not found: {found.why}")
    version = criu.version_of(found.path)
    ver = criu.shown(version)
    if version is None or version < criu.MIN_VERSION:
        return Row("criu", False, True, f"{found.path} {ver} ({found.why}): fscr needs CRIU "
                   ">= 4.2.1; run scripts/setup")
    check = subprocess.run([found.path, "check"], capture_output=True, text=True)
    out = (check.stdout + check.stderr).strip()
    if check.returncode != 0 or "Looks good" not in out:
        return Row("criu", False, True, f"{found.path} {ver} ({found.why}): criu check failed: "
                   + (out.splitlines() or ["no output"])[-1])
    return Row("criu", True, True, f"{found.path} {ver} ({found.why}); criu check: Looks good.")


def _criu_rpc() -> Row:
    """fscr drives CRIU over its RPC interface (criu swrk), with pycriu's messages."""
    try:
        mod = criu.rpc()
    except FscrError as e:
        return Row("criu rpc", False, True, str(e))
    return Row("criu rpc", True, True, "CRIU runs over RPC (criu swrk, notifications on); "
               f"messages from pycriu ({Path(mod.__file__ or '').parent})")


def _cgroup_v2() -> Row:
    root = freezer.v2_root()
    if root is None:
        return Row("cgroup v2 freezer", False, False, "no cgroup2 mount")
    probe = root / FSCR_GROUP / "doctor_probe"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        ok = (probe / "cgroup.freeze").exists()
    except OSError as e:
        return Row("cgroup v2 freezer", False, False, f"{root}: {e.strerror}")
    finally:
        if probe.exists():
            probe.rmdir()
    return Row("cgroup v2 freezer", ok, False,
               f"{root} (cgroup.freeze)" if ok else f"{root} has no cgroup.freeze")


def _cgroup_v1() -> Row:
    root = freezer.v1_freezer_root()
    return Row("cgroup v1 freezer", root is not None, False,
               str(root) if root else "no v1 freezer hierarchy mounted")


def _freezer_any(v2: Row, v1: Row) -> Row:
    ok = v2.ok or v1.ok
    return Row("cgroup freezer", ok, True,
               ("using v2" if v2.ok else "using v1") if ok else "neither v2 nor v1 freezer")


def _btrfs() -> Row:
    fs = Path("/proc/filesystems").read_text()
    tool = shutil.which("btrfs")
    try:
        import btrfsutil  # noqa: F401

        lib = "btrfsutil importable"
    except ImportError as e:
        lib = f"btrfsutil missing ({e})"
    ok = "btrfs" in fs and tool is not None and lib == "btrfsutil importable"
    ver = "btrfs-progs missing"
    if tool:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
        ver = out.split("\n")[0]
    return Row("btrfs", ok, True,
               f"{ver}; {lib}" + ("" if "btrfs" in fs else "; kernel has no btrfs"))


def _lvm() -> Row:
    from .snapshot.lvm import unavailable

    why = unavailable()
    if why is not None:
        return Row("lvm", False, False, f"--snapshot lvm unavailable: {why}")
    return Row("lvm", True, False, "lvm2 and device-mapper present")


def _loop() -> Row:
    ok = Path("/dev/loop-control").exists()
    return Row("loop devices", ok, False, "/dev/loop-control" if ok else "no /dev/loop-control")


CAP_SYS_RESOURCE = 24


def _cap_sys_resource() -> Row:
    caps = next((ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                 if ln.startswith("CapEff:")), "0")
    ok = bool(int(caps, 16) >> CAP_SYS_RESOURCE & 1)
    return Row("CAP_SYS_RESOURCE", ok, False, "present: CRIU can dump tasks of any user" if ok
               else f"missing (CapEff {caps}): CRIU reads each task's resource limits with "
               "prlimit, so it cannot dump tasks of other users (a server whose workers drop "
               "to www-data, a database that refuses root); tasks of root are unaffected",
               warning=not ok)


def _run_tmpfs() -> Row:
    m = mount_of(Path("/run"))
    fstype = m.fstype if m else "unknown"
    ok = fstype == "tmpfs"
    return Row("/run on tmpfs", ok, False, "CRIU caches its kernel probe in /run/criu.kdat"
               if ok else f"/run is on {fstype}, not tmpfs: CRIU will not cache its kernel "
               "feature probe there, and every dump and restore repeats it (~25 ms on a "
               "2-core machine)", warning=not ok)


def _lazy() -> Row:
    from . import lazy

    ok, why = lazy.available()
    return Row("lazy restore", ok, False, why)


def run_checks() -> list[Row]:
    v2, v1 = _cgroup_v2(), _cgroup_v1()
    return [_root(), _kernel(), _criu(), _criu_rpc(), _freezer_any(v2, v1), v2, v1, _btrfs(),
            _lvm(), _loop(), _cap_sys_resource(), _run_tmpfs(), _lazy()]


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def for_checkpoint(store: Store, ckpt_id: str) -> list[Row]:
    """Whether this machine can restore checkpoint `ckpt_id`: all essential."""
    try:
        m = store.load(ckpt_id)
        store.verify_images(m)
    except FscrError as e:
        return [Row(f"checkpoint {ckpt_id}", False, True, str(e))]
    rows = [Row(f"checkpoint {ckpt_id}", True, True, "manifest and images verified")]
    if m.backend == "criu":
        rows += [_criu(), _criu_rpc()]
        features = {"established": ["tcp_half_closed", "network_lock_nftables"]}.get(m.tcp, [])
        found = criu.find()
        for feat in features:
            ok = found.path is not None and subprocess.run(
                [found.path, "check", "--feature", feat], capture_output=True).returncode == 0
            rows.append(Row(f"kernel feature {feat}", ok, True,
                            "supported" if ok else "not supported by this kernel or CRIU"))
        busy = [] if m.pidns else [t.pid for t in m.tasks if (st := read_stat(t.pid))
                                   and st.state not in "ZX" and st.starttime != t.starttime]
        rows.append(Row("free PIDs", not busy, True,
                        "a PID namespace of its own: its PIDs are free anywhere" if m.pidns
                        else "every PID of the image is free" if not busy
                        else f"PIDs {busy} are used by other processes"))
        changed = preflight.changed(m.unchanged)
        rows.append(Row("unchanged files", not changed, True,
                        f"{len(m.unchanged)} binaries and libraries as at the checkpoint"
                        if not changed else f"changed or missing: {', '.join(changed[:5])}"))
        if m.netns.treatment == "external":
            path = m.netns.path
            ok = path is not None and os.path.exists(path)
            rows.append(Row("network namespace", ok, True, f"{path} present" if ok else
                            f"{path or 'its namespace'} missing: recreate it first"))
    for v in m.volumes:
        if v.snapshot is None:
            continue
        state = snapshot.state_of(m.snapshot, v.snapshot)
        rows.append(Row(f"volume {v.path}", state.startswith("present"), True,
                        f"snapshot {v.snapshot}: {state}"))
    return rows

