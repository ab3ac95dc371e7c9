"""Preflight: what the tree shares with the outside is found before anything is frozen, and
refused unless the user accepts its kind."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import alive, ask, fscr, wait_for
from test_pipeline import checkpoint, grows, restore

from fscr.process import freezer


@pytest.fixture
def outsider() -> Iterator:
    """Starts helper processes outside the tree (python snippets), killed by PID after."""
    procs = []

    def start(code: str) -> tuple[int, str]:
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p.pid, p.stdout.readline().strip()

    yield start
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()


@pytest.fixture
def tmpfs(tmp_path: Path, workloads) -> Iterator[Path]:  # noqa: ANN001
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        workloads.kill_all()  # they hold files on it
        subprocess.run(["umount", str(d)], check=True)


def refused_before_freezing(store: Path, pid: int, vol: Path, *extra: str) -> str:
    # FSCR_TEST_KILL_AT=freeze: had fscr reached the freeze it would have died by SIGKILL;
    # exit 15 proves the refusal came first.
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), *extra, store=store,
               check=False, env={"FSCR_TEST_KILL_AT": "freeze"})
    assert out.returncode == 15, (out.returncode, out.stderr)
    assert out.stderr.count("\n") == 1
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    return out.stderr


def test_a_file_open_on_a_tmpfs_outside_the_volume(btrfs_volume, workloads, store, tmpfs):
    vol = btrfs_volume.path
    pid, _ = workloads.start("hold", str(vol), "file", str(tmpfs / "state"))
    grows(vol / "history", 3)
    err = refused_before_freezing(store, pid, vol)
    assert f"external-files: fd 3 {tmpfs}/state (PID {pid}" in err
    assert "--allow external-files" in err
    report = json.loads(fscr("check", "--pid", str(pid), "--volume", str(vol), "--json",
                             store=store, check=False).stdout)
    assert [(x["kind"], x["pid"]) for x in report["leaks"]] == [("external-files", pid)]
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--allow", "external-files")
    assert m["allowed"] == ["external-files"]
    assert [x["what"] for x in m["leaks"]] == [f"fd 3 {tmpfs}/state"]
    assert "allowed leak         external-files" in fscr("show", m["id"], store=store).stdout


def test_an_unlinked_file_outside_the_volumes_goes_with_the_tree(btrfs_volume, workloads,
                                                                  store, tmpfs):
    """No name reaches it: CRIU copies it into the image (a ghost file), so it is the tree's
    own, written or not."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("hold", str(vol), "tmpfile", str(tmpfs))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert m["leaks"] == []
    wait_for(lambda: not alive(pid))
    r = restore(store, m["id"])
    fd = next(n for n in os.listdir(f"/proc/{r['pid']}/fd")
              if os.readlink(f"/proc/{r['pid']}/fd/{n}").startswith(f"{tmpfs}/#"))
    assert open(f"/proc/{r['pid']}/fd/{fd}", "rb").read() == b"only the tree has this"


def test_a_pipe_to_an_outside_process(btrfs_volume, workloads, store, outsider):
    vol = btrfs_volume.path
    other, fd = outsider("import os, time; r, w = os.pipe(); print(w, flush=True); "
                         "time.sleep(1000)")
    pid, _ = workloads.start("hold", str(vol), "wronly", f"/proc/{other}/fd/{fd}")
    grows(vol / "history", 3)
    err = refused_before_freezing(store, pid, vol)
    assert "pipes: fd 3 pipe:[" in err and f"other end held by PID {other}" in err
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--allow", "pipes", "--kill")
    assert [x["kind"] for x in m["leaks"]] == ["pipes"]
    r = restore(store, m["id"])  # restored disconnected: the tree runs on
    n = len((vol / "history").read_text().split())
    wait_for(lambda: len((vol / "history").read_text().split()) > n + 3)
    assert alive(r["pid"])


def test_a_unix_socket_to_an_outside_server(btrfs_volume, workloads, store, outsider, tmp_path):
    vol = btrfs_volume.path
    for kind in ("stream", "dgram"):
        path = tmp_path / f"{kind}.sock"
        listen = "s.listen(); c, _ = s.accept(); " if kind == "stream" else ""
        outsider(f"import socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_"
                 f"{kind.upper()}); s.bind('{path}'); print('up', flush=True); {listen}"
                 "time.sleep(1000)")
        pid, _ = workloads.start("hold", str(vol), f"unix-{kind}", str(path))
        grows(vol / "history", 3)
        err = refused_before_freezing(store, pid, vol)
        assert f"unix-sockets: fd 3 unix {kind}" in err and "peer held by PID" in err
        if kind == "stream":  # cannot be restored: still refused when allowed
            err = refused_before_freezing(store, pid, vol, "--allow", "unix-sockets")
            assert "cannot be restored" in err
        else:
            m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--allow",
                           "unix-sockets")
            assert [x["kind"] for x in m["leaks"]] == ["unix-sockets"]
        workloads.kill_all()
        (vol / "history").unlink()


def test_sysv_shared_memory_attached_outside_is_always_refused(btrfs_volume, workloads, store,
                                                               outsider):
    vol = btrfs_volume.path
    key = hex(0x5F5C0000 + random.randint(0, 0xFFFF))
    outsider("import ctypes, time; libc = ctypes.CDLL(None); libc.shmat.restype = "
             f"ctypes.c_void_p; i = libc.shmget({key}, 4096, 0o1600); libc.shmat(i, None, 0); "
             "print(i, flush=True); time.sleep(1000)")
    try:
        pid, _ = workloads.start("hold", str(vol), "shm", key)
        grows(vol / "history", 3)
        err = refused_before_freezing(store, pid, vol, "--allow", "shm")
        assert "shm: SysV shared memory" in err and "can never be allowed" in err
    finally:  # marked for removal: it goes once the last process detaches
        subprocess.run(["ipcrm", "-M", key], check=True)


def test_memory_shared_only_inside_the_tree_is_checkpointed_without_allow(btrfs_volume,
                                                                          workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("shared", str(vol))
    wait_for(lambda: ask(vol, "shared")["memfd"] > 3, what="the child to count")
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert m["leaks"] == [] and m["allowed"] == []
    wait_for(lambda: not alive(pid))
    restore(store, m["id"])
    before = ask(vol, "shared")
    # The parent still sees the child's writes: both objects are still shared after restore.
    after = wait_for(lambda: (r := ask(vol, "shared"))["anon"] > before["anon"] + 3
                     and r["memfd"] > before["memfd"] + 3 and r, what="the counts to rise")
    assert abs(after["anon"] - after["memfd"]) <= 1


def test_a_memfd_shared_with_an_outside_process(btrfs_volume, workloads, store, outsider):
    vol = btrfs_volume.path
    other, fd = outsider("import os, time; m = os.memfd_create('outside'); "
                         "os.ftruncate(m, 4096); print(m, flush=True); time.sleep(1000)")
    pid, _ = workloads.start("hold", str(vol), "memfd", f"/proc/{other}/fd/{fd}")
    grows(vol / "history", 3)
    err = refused_before_freezing(store, pid, vol)
    assert "shared-memory: fd 3 /memfd:outside (deleted)" in err
    assert f"also mapped or held by PID {other}" in err
    assert "--allow shared-memory" in err
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--allow", "shared-memory")
    # By fd (Python's mmap keeps a second one) and by mapping: every one recorded.
    assert {x["what"].split()[0] for x in m["leaks"]} == {"fd", "mapping"}
    assert all(x["kind"] == "shared-memory" and "/memfd:outside" in x["what"]
               for x in m["leaks"])


def test_a_self_contained_workload_passes_with_an_empty_report(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    out = fscr("check", "--pid", str(pid), "--volume", str(vol), store=store)
    assert out.stdout.startswith("no resource outside the checkpoint's reach")
    assert "would checkpoint" in out.stdout
    report = json.loads(fscr("check", "--pid", str(pid), "--volume", str(vol), "--json",
                             store=store).stdout)
    assert report["leaks"] == [] and report["ok"]
    assert any(u["path"] == os.path.realpath(sys.executable) for u in report["unchanged"])


def test_a_changed_binary_outside_the_volumes_stops_the_restore(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    bindir = Path(f"/usr/local/libexec/fscr-test-{secrets.token_hex(3)}")
    bindir.mkdir(parents=True)
    try:
        exe = bindir / "sleep"
        shutil.copy2("/bin/sleep", exe)
        pid, _ = workloads.run(str(exe), "1000")
        wait_for(lambda: os.readlink(f"/proc/{pid}/exe") == str(exe))
        m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
        wait_for(lambda: not alive(pid))
        with open(exe, "ab") as f:
            f.write(b"\0")  # an upgrade, say
        out = fscr("restore", m["id"], store=store, check=False)
        assert out.returncode == 15 and f"{exe} changed since checkpoint" in out.stderr
        assert not alive(pid)
    finally:
        shutil.rmtree(bindir)
