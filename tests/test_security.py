"""Security: who may checkpoint what, files fscr creates, and the manifest as untrusted input.

The unprivileged cases run fscr's own code in a child process that dropped to a user the
test creates (fork, setuid): fscr's virtualenv lives under /root, which such a user cannot
reach to start a new interpreter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import alive, fscr, wait_for, wait_unlinked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipeline import checkpoint, grows, relinks_on

from fscr import pipeline
from fscr.errors import BadManifest
from fscr.process import freezer


@pytest.fixture
def user() -> Iterator[pwd.struct_passwd]:
    name = f"fscrt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True)


def run_as(u: pwd.struct_passwd, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """fscr's command line, run in a child that became user `u`; returns exit code, stderr."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        code = 1
        try:
            # Everything imported first: after setuid, /root (the interpreter's home) is shut.
            import pickle  # noqa: F401

            from fscr.cli import main
            os.setgroups([])
            os.setgid(u.pw_gid)
            os.setuid(u.pw_uid)
            os.environ.update(env)
            sys.argv = ["fscr", *args]
            err = io.StringIO()
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                try:
                    main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
            os.write(w, err.getvalue().encode())
        except BaseException as e:  # shown by the test's assertion
            os.write(w, f"run_as failed: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), err


def _has_cap_sys_resource() -> bool:
    caps = next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("CapEff:"))
    return bool(int(caps, 16) >> 24 & 1)


def test_a_task_of_another_user_is_refused_clearly_where_criu_cannot_dump_it(
        btrfs_volume, workloads, store, user):
    """Root without CAP_SYS_RESOURCE (this machine kind) cannot read another user's resource
    limits, and CRIU needs them: refused before anything is frozen, naming the task. Where
    root has the capability, the same tree is checkpointed."""
    vol = btrfs_volume.path
    pid, _ = workloads.run("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                           "--clear-groups", "sleep", "1000")
    wait_for(lambda: os.stat(f"/proc/{pid}").st_uid == user.pw_uid, what="the drop to the user")
    try:
        out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store,
                   check=False, env=None if _has_cap_sys_resource()
                   else {"FSCR_TEST_KILL_AT": "freeze"})  # refused before the freeze
        if _has_cap_sys_resource():
            assert out.returncode == 0, out.stderr
            return
        assert out.returncode == 15, out.stderr
        assert f"PID {pid} (sleep) runs as uid {user.pw_uid}" in out.stderr
        assert "CAP_SYS_RESOURCE" in out.stderr and alive(pid)
    finally:
        workloads.kill_all()  # before the user fixture removes the user


def test_an_unprivileged_user_is_refused_before_anything_happens(btrfs_volume, workloads, store,
                                                                 user):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    env = {"FSCR_STORE": str(store)}
    for args in (["checkpoint", "--pid", str(pid), "--volume", str(vol)],
                 ["check", "--pid", str(pid), "--volume", str(vol)],
                 ["restore", m["id"], "--replace"], ["delete", m["id"]], ["list"],
                 ["show", m["id"]], ["gc"], ["run", "--", "/bin/true"]):
        code, err = run_as(user, *args, env=env)
        assert (code, "must run as root" in err) == (3, True), (args, code, err)
        assert err.count("\n") == 1
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert os.listdir(store / "checkpoints") == [m["id"]]


@pytest.mark.parametrize("pid_of, text", [
    (lambda: 999999, "no such process"),
    (lambda: 1, "PID 1"),
    (lambda: 2, "kernel thread"),
    (lambda: os.getpid(), "fscr itself or one of its ancestors"),
])
def test_refused_targets(pid_of, text, btrfs_volume, store):
    out = fscr("checkpoint", "--pid", str(pid_of()), "--volume", str(btrfs_volume.path),
               store=store, check=False)
    assert out.returncode == 4 and text in out.stderr, out.stderr
    assert os.listdir(store / "checkpoints") == []


def test_what_fscr_creates_is_root_only_and_relinks_keep_mode_and_owner(btrfs_volume,
                                                                        workloads, store, user):
    vol = btrfs_volume.path
    pid, _ = workloads.start("unlinked0", str(vol), str(1 << 20))
    wait_unlinked(pid, vol / "big")
    os.chown(f"/proc/{pid}/fd/3", user.pw_uid, user.pw_gid)  # a file of another user, 0640
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    snap = Path(m["volumes"][0]["snapshot"])
    for d in (store, store / "checkpoints", store / "checkpoints" / m["id"],
              store / "checkpoints" / m["id"] / "images", snap.parent.parent,
              vol / "lost+found", vol / "lost+found" / "checkpoint"):
        s = d.stat()
        assert (s.st_uid, stat.S_IMODE(s.st_mode)) == (0, 0o700), d
    copy = (snap / "lost+found" / "checkpoint" / m["relinks"][0]["name"]).stat()
    assert (copy.st_uid, copy.st_gid, stat.S_IMODE(copy.st_mode)) == (
        user.pw_uid, user.pw_gid, 0o640)


@pytest.mark.parametrize("plant", ["symlink", "file", "foreign-owner"])
def test_a_planted_relink_directory_is_refused(plant, btrfs_volume, workloads, store, tmp_path,
                                               user):
    vol = btrfs_volume.path
    outside = tmp_path / "outside"
    outside.mkdir()
    (vol / "lost+found").mkdir(mode=0o700)
    target = vol / "lost+found" / "checkpoint"
    if plant == "symlink":
        target.symlink_to(outside)
    elif plant == "file":
        target.write_text("not a directory")
    else:
        target.mkdir()
        os.chown(target, user.pw_uid, user.pw_gid)
    pid, _ = workloads.start("relinked", str(vol))
    wait_for(lambda: (vol / "ready").exists())
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store, check=False)
    assert out.returncode == 15 and "checkpoint in the volume" in out.stderr, out.stderr
    assert os.listdir(outside) == []
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert os.listdir(store / "checkpoints") == []


def test_show_prints_the_digest_a_user_can_check(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    shown = json.loads(fscr("show", m["id"], "--json", store=store).stdout)
    raw = (store / "checkpoints" / m["id"] / "manifest.json").read_bytes()
    assert shown["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    # show also says whether each snapshot is still there
    assert [v["state"] for v in shown["volumes"]] == ["present"]
    subprocess.run(["btrfs", "subvolume", "delete", m["volumes"][0]["snapshot"]],
                   check=True, capture_output=True)
    text = fscr("show", m["id"], store=store).stdout
    assert f"snapshot {m['volumes'][0]['snapshot']} (missing)" in text
    doctor = fscr("doctor", "--for", m["id"], "--json", store=store, check=False)
    row = next(r for r in json.loads(doctor.stdout)["checks"] if r["name"] == f"volume {vol}")
    assert doctor.returncode == 11 and not row["ok"] and row["detail"].endswith(": missing")


# --- the manifest as untrusted input: mutated many times, restore must refuse every one ---

def _walk(obj, path=()):  # noqa: ANN001, ANN202
    """Every (path, value) leaf of the manifest's JSON."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))
    else:
        yield path, obj


# The fields through which a manifest names what restore touches, or checks what it restores.
SENSITIVE = ("schema_version", "id", "volumes", "relinks", "images", "cgroup", "netns",
             "tasks", "root", "lineage")
NASTY = st.one_of(
    st.sampled_from(["/", "/etc", "/etc/passwd", "../../etc", "/tmp/../etc", "x/../../y",
                     "..", "/proc/1/root", "unlink-at-restart-evil-0", "file[0:0]", "", ".",
                     "/sys/fs/cgroup/unified", "/system.slice/sshd.service", -1, 0, 2 ** 63,
                     None, True, "a" * 5000, "\x00", "0" * 64, "f" * 64]),
    st.text(max_size=40), st.integers())


@pytest.fixture
def signed_checkpoint(btrfs_volume, workloads, store):  # noqa: ANN001, ANN201
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    d = store / "checkpoints" / m["id"]
    return pid, vol, store, d, (d / "manifest.json").read_bytes()


def _state(vol: Path) -> dict:
    out = {}
    for p in sorted(vol.rglob("*")):
        if p.is_file() and p.name != "history":  # the live workload appends to history
            out[str(p)] = p.read_bytes()
        elif not p.is_file():
            out[str(p)] = p.is_dir()
    return out


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_restore_refuses_every_tampered_manifest(signed_checkpoint, data):  # noqa: ANN001
    pid, vol, store, d, raw = signed_checkpoint
    doc = json.loads(raw)
    leaves = [p for p, _ in _walk(doc) if p[0] in SENSITIVE and p[-1] not in (
        "starttime", "state", "type", "local", "remote", "detail", "what", "flags", "pos",
        "fd", "pid", "size", "mode", "nlink", "original_path", "method", "kind", "inode",
        "treatment", "holder")]
    where = data.draw(st.sampled_from(leaves))
    value = data.draw(NASTY)
    obj = doc
    for k in where[:-1]:
        obj = obj[k]
    if obj[where[-1]] == value:
        return
    obj[where[-1]] = value
    resign = data.draw(st.booleans())
    tampered = json.dumps(doc, indent=2).encode() + b"\n"
    before = _state(vol)
    try:
        (d / "manifest.json").write_bytes(tampered)
        if resign:  # someone who can write the store can also rewrite the digest
            (d / "manifest.json.sha256").write_text(
                f"{hashlib.sha256(tampered).hexdigest()}  manifest.json\n")
        with pytest.raises(BadManifest):
            pipeline.restore(d.name, str(store), replace=True, force=True)
    finally:
        (d / "manifest.json").write_bytes(raw)
        (d / "manifest.json.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  "
                                                "manifest.json\n")
    assert _state(vol) == before and alive(pid)
    assert relinks_on(vol) == [] and not list(vol.parent.glob(".fscr-snapshots/rescue_*"))
