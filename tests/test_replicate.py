"""Backup jobs copy each checkpoint off the machine: to an ssh host (fscr receive there) and to
restic repositories (local disk, and sftp through the same sshd).

The far host: an sshd of the test's own (loopback, a high port, host and client keys made in
tmp dirs; no change to /root/.ssh or the system's sshd) started in a mount namespace of its
own, where a second btrfs filesystem is mounted over the local volume's filesystem. So what
ssh runs there sees a different filesystem at the volumes' original paths, as a second
machine would (receive puts volumes at their original paths: docs/transfer.md), and its own
store. Teardown kills only the sshd it started; the namespace and its mount die with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FSCR, alive, fscr, lines, sh, wait_for
from test_pipeline import grows, restore

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Far:
    """The far host: `ssh -F config far` reaches it; `store` is its fscr store."""

    config: Path
    store: Path
    mnt: Path
    port: int
    pid: int = 0

    def fscr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ssh", "-F", str(self.config), "far", str(FSCR), *args,
                            "--store", str(self.store)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert not check or p.returncode == 0, p.stderr
        return p

    def listed(self) -> list[str]:
        return [c["id"] for c in json.loads(self.fscr("list", "--json").stdout)["checkpoints"]]

    def ls(self, path: Path) -> list[str]:
        """A directory's names as the far host sees them (its mount namespace)."""
        p = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "ls", "-A", str(path)],
                           capture_output=True, text=True)
        return p.stdout.split() if p.returncode == 0 else []

    def write_config(self, port: int) -> None:
        d = self.config.parent
        self.config.write_text(
            f"Host far\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
            f"  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
            "  ConnectTimeout 5\n  LogLevel ERROR\n")


@pytest.fixture
def far(btrfs_volume, workloads, tmp_path: Path) -> Iterator[Far]:
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key"))
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} "
                                   + " ".join((d / "host_key.pub").read_text().split()[:2]))
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile none\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\n"  # the keys live under /tmp, which is world-writable
        "Subsystem sftp /usr/lib/openssh/sftp-server\nLogLevel ERROR\n"
        # the far host's own locks, as on another machine
        f"SetEnv FSCR_LOCK_DIR={tmp_path / 'far-locks'}\n")
    f = Far(d / "config", tmp_path / "far-store", btrfs_volume.mnt, port)
    f.write_config(port)
    img = tmp_path / "far.img"
    with open(img, "wb") as fh:
        fh.truncate(3 << 30)
    loop = sh("losetup", "--find", "--show", str(img))
    made_run_sshd = not Path("/run/sshd").exists()  # sshd's privilege separation directory
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = None
    try:
        sh("mkfs.btrfs", "-q", loop)
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount "$1" "$2" && exec {SSHD} -D -e -f "$3"', "sh", loop,
             str(btrfs_volume.mnt), str(d / "sshd_config")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        f.pid = proc.pid
        wait_for(lambda: f.fscr("list", "--json", check=False).returncode == 0
                 or proc.poll() is not None, 15, "the far sshd to answer")
        assert proc.poll() is None, proc.stderr.read().decode()
        yield f
    finally:
        workloads.kill_all()  # a workload moved there keeps its namespace and mount alive
        if proc is not None:
            proc.kill()  # the sshd this test started; its namespace and mount go with it
            proc.wait()
            proc.stderr.close()
        wait_for(lambda: subprocess.run(["losetup", "-d", loop]).returncode == 0
                 and not sh("losetup", "-j", str(img)), 10, "the far loop device to detach")
        img.unlink()
        if made_run_sshd:
            Path("/run/sshd").rmdir()


def job_file(tmp_path: Path, store: Path, vol: Path, name: str, dests: str,
             **retention: int) -> Path:
    keep = "\n".join(f"{k} = {v}" for k, v in retention.items())
    p = tmp_path / "app.toml"
    p.write_text(f'store = "{store}"\n[target]\nname = "{name}"\n[snapshot]\nkind = "btrfs"\n'
                 f'volumes = ["{vol}"]\n[retention]\n{keep}\n{dests}')
    return p


def ssh_dest(far: Far, fscr_cmd: str = str(FSCR), **retention: int) -> str:
    keep = "".join(f"{k} = {v}\n" for k, v in retention.items())
    return (f'[[destination]]\nkind = "ssh"\nhost = "far"\nstore = "{far.store}"\n'
            f"ssh_config = \"{far.config}\"\nfscr = '{fscr_cmd}'\n"
            + (f"[destination.retention]\n{keep}" if keep else ""))


def backup(job: Path, code: int = 0) -> dict:
    out = fscr("backup", str(job), "--json", check=False)
    assert out.stdout, out.stderr
    r = json.loads(out.stdout)
    assert out.returncode == code == r["exit_code"], out.stderr
    return r | {"log": out.stderr}


def local_ids(store: Path) -> list[str]:
    return [c["id"] for c in json.loads(fscr("list", "--json", store=store).stdout)
            ["checkpoints"]]


def fill(path: Path, mib: int) -> None:
    with open(path, "wb") as f:  # data that does not compress
        block = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(block)


def test_first_run_full_later_runs_incremental_far_retention_applied(btrfs_volume, workloads,
                                                                     store, tmp_path, far):
    vol = btrfs_volume.path
    fill(vol / "data", 512)
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    job = job_file(tmp_path, store, vol, name, ssh_dest(far, keep_last=2), keep_last=3)
    first = backup(job)
    [d] = first["destinations"]
    assert (d["destination"], d["status"], d["mode"]) == (f"ssh:far:{far.store}", "sent", "full")
    assert far.listed() == [first["id"]]
    doctor = json.loads(far.fscr("doctor", "--for", first["id"], "--json").stdout)
    assert doctor["ok"], doctor

    made = [first["id"]]
    for _ in range(2):
        with open(vol / "data", "r+b") as f:  # a small change
            f.seek(len(made) << 20)
            f.write(os.urandom(1 << 20))
        r = backup(job)
        [d] = r["destinations"]
        assert (d["status"], d["mode"], d["parent"]) == ("sent", "incremental", made[-1])
        assert d["bytes"] < first["destinations"][0]["bytes"] * 0.05, (d, first)
        made.append(r["id"])
    # The far side's retention (keep_last = 2) ran there; the local one keeps 3.
    assert d["removed"] == [made[0]]
    assert sorted(far.listed()) == sorted(made[1:])
    assert sorted(far.ls(far.mnt / ".fscr-snapshots")) == sorted(made[1:])
    assert local_ids(store) == made
    # What arrived is the volume as it was at the checkpoint.
    snap = far.mnt / ".fscr-snapshots" / made[-1] / "0" / "history"
    there = subprocess.run(["nsenter", "-t", str(far.pid), "-m", "cat", str(snap)],
                           capture_output=True, text=True, check=True).stdout
    assert there == (btrfs_volume.mnt / ".fscr-snapshots" / made[-1] / "0" / "history"
                     ).read_text()
    assert alive(pid)


def test_a_destination_that_is_down_makes_the_run_partial_and_the_next_catches_up(
        btrfs_volume, workloads, store, tmp_path, far):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    job = job_file(tmp_path, store, vol, name, ssh_dest(far), keep_last=1)
    first = backup(job)
    assert first["destinations"][0]["mode"] == "full"

    far.write_config(_free_port())  # nothing listens there: the host is down
    down = backup(job, code=21)
    [d] = down["destinations"]
    assert down["status"] == "partial" and d["status"] == "failed", down
    assert "far" in down["error"] and d["error"]
    assert f"destination ssh:far:{far.store}: failed: " in down["log"], down["log"]
    # keep_last = 1, yet the checkpoint the destination holds stays: the next incremental's
    # parent.
    assert local_ids(store) == [first["id"], down["id"]]
    assert f"parent for destination ssh:far:{far.store}" in down["reasons"][first["id"]]

    far.write_config(far.port)
    up = backup(job)
    [d] = up["destinations"]
    assert (d["status"], d["mode"], d["parent"]) == ("sent", "incremental", first["id"])
    assert (f"destination ssh:far:{far.store}: incremental on {first['id']}, {d['bytes']} "
            "bytes, ") in up["log"], up["log"]
    assert sorted(far.listed()) == sorted([first["id"], up["id"]])
    assert local_ids(store) == [up["id"]]
    assert alive(pid)


FLIP = ("python3 -c \"import sys; d = bytearray(sys.stdin.buffer.read()); "
        "d[len(d) // 2] ^= 64; sys.stdout.buffer.write(d)\" | ")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_transfer_is_refused_and_leaves_nothing_there(damage, btrfs_volume,
                                                                workloads, store, tmp_path, far):
    vol = btrfs_volume.path
    fill(vol / "data", 8)
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    # The far side reads the stream through a filter that cuts or flips it on the way.
    on_the_way = "head -c 3000000 | " if damage == "truncated" else FLIP
    job = job_file(tmp_path, store, vol, name, ssh_dest(far, on_the_way + str(FSCR)))
    r = backup(job, code=21)
    [d] = r["destinations"]
    # Cut: receive finds the stream short. Flipped inside a volume's data: btrfs receive
    # finds the damage (its send stream has checksums) before fscr's end record would.
    assert d["status"] == "failed", d
    assert damage in d["error"] or "btrfs receive of volume" in d["error"], d
    assert far.listed() == []
    assert far.ls(far.mnt / ".fscr-snapshots" / r["id"]) == []
    assert far.ls(far.store / "checkpoints") == []
    assert far.ls(far.store / "journal") == []
    assert local_ids(store) == [r["id"]]  # nothing lost here
    assert alive(pid)


def restic(*args: str, repo: str, pw: Path, check: bool = True,
           opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["restic", "-r", repo, "--password-file", str(pw),
                        *(a for o in opts for a in ("-o", o)), *args],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert not check or p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("where", ["local", "sftp"])
def test_restic_round_trip_restores_the_workload(where, btrfs_volume, workloads, store,
                                                tmp_path, far):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    pw = tmp_path / "restic.pass"
    pw.write_text("a test password\n")
    opts: tuple[str, ...] = ()
    repo = str(tmp_path / "restic-repo")
    if where == "sftp":
        repo = f"sftp:far:{tmp_path / 'restic-repo'}"
        opts = (f"sftp.command=ssh -F {far.config} far -s sftp",)
    restic("init", repo=repo, pw=pw, opts=opts)
    options = "".join(f', "{o}"' for o in opts)[2:]
    dest = (f'[[destination]]\nkind = "restic"\nrepository = "{repo}"\n'
            f'password_file = "{pw}"\noptions = [{options}]\n')
    job = job_file(tmp_path, store, vol, name, dest, keep_last=1)
    made = []
    for _ in range(2):
        r = backup(job)
        [d] = r["destinations"]
        assert (d["status"], d["mode"]) == ("sent", "full") and d["bytes"] > 0, d
        made.append(r["id"])
        grows(vol / "history", len(lines(vol / "history")) + 2)
    assert d["removed"] == [made[0]]  # restic forget with the job's retention
    snaps = json.loads(restic("snapshots", "--json", repo=repo, pw=pw, opts=opts).stdout)
    assert [s["tags"] for s in snaps] == [["fscr-job=app", f"fscr-id={made[1]}"]]
    assert snaps[0]["paths"] == [f"/app/{made[1]}.fscr"]

    os.kill(pid, signal.SIGKILL)  # the machine is lost
    wait_for(lambda: not alive(pid))
    at = lines(btrfs_volume.mnt / ".fscr-snapshots" / made[1] / "0" / "history")
    btrfs_volume.recreate()  # a fresh machine
    there = tmp_path / "store2"
    got = fscr("restore-from", "restic", made[1], "--repository", repo, "--password-file",
               str(pw), *(a for o in opts for a in ("-o", o)), "--json", store=there)
    assert json.loads(got.stdout)["id"] == made[1]
    r = restore(there, made[1])
    back = grows(vol / "history", len(at) + 3)
    assert back[: len(at)] == at and back == list(range(1, len(back) + 1))
    assert alive(r["pid"])


def test_restore_from_restic_of_an_unknown_checkpoint_says_so(tmp_path, store):
    pw = tmp_path / "restic.pass"
    pw.write_text("pw\n")
    repo = str(tmp_path / "repo")
    restic("init", repo=repo, pw=pw)
    out = fscr("restore-from", "restic", "20260101T000000Z_abcd", "--repository", repo,
               "--password-file", str(pw), store=store, check=False)
    assert out.returncode == 6 and out.stderr.count("\n") == 1, out.stderr


def test_one_command_moves_the_workload_to_the_far_host(btrfs_volume, workloads, store,
                                                        tmp_path, far):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    job = job_file(tmp_path, store, vol, name, ssh_dest(far))
    out = fscr("backup", str(job), "--move-to", "far", "--json")
    r = json.loads(out.stdout)
    assert r["status"] == "moved" and r["exit_code"] == 0, out.stderr
    # A first pass while it ran, then only the changes while it was stopped.
    assert [d["mode"] for d in r["destinations"]] == ["full", "incremental"]
    # It runs there (the far host's mount namespace), with the PID it had here.
    assert r["pid"] == pid
    assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{far.pid}/ns/mnt")
    at = lines(btrfs_volume.mnt / ".fscr-snapshots" / r["id"] / "0" / "history")

    def there() -> list[int]:
        out = subprocess.run(["nsenter", "-t", str(far.pid), "-m", "cat",
                              str(vol / "history")], capture_output=True, text=True).stdout
        return [int(x) for x in out.split("\n")[:-1] if x]  # a torn last line dropped
    got = wait_for(lambda: len(v := there()) > len(at) + 2 and v, 10, "the far counter")
    assert got[: len(at)] == at and got == list(range(1, len(got) + 1))
    assert lines(vol / "history") == at  # here it stopped at the checkpoint


def test_move_to_a_host_that_is_not_a_destination_is_refused(btrfs_volume, workloads, store,
                                                             tmp_path, far):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    job = job_file(tmp_path, store, vol, name, ssh_dest(far))
    out = fscr("backup", str(job), "--move-to", "elsewhere", check=False)
    assert out.returncode == 16 and "no ssh destination" in out.stderr
    assert alive(pid) and local_ids(store) == []


@pytest.mark.parametrize("entry, key", [
    ('kind = "ftp"\nhost = "far"', "destination.0"),
    ('kind = "ssh"', "destination.0.host"),
    ('kind = "ssh"\nhost = "-oProxyCommand=x"', "destination.0.host"),
    ('kind = "ssh"\nhost = "far\\n"', "destination.0.host"),  # not $, which allows a final \n
    ('kind = "restic"\nrepository = "/r"\nretention = { keep_lots = 3 }',
     "destination.0.retention.keep_lots"),
])
def test_a_wrong_destination_names_the_key(entry, key, tmp_path, store):
    job = job_file(tmp_path, store, tmp_path / "vol", "app", f"[[destination]]\n{entry}\n")
    out = fscr("backup", str(job), check=False)
    assert out.returncode == 16 and out.stderr.count("\n") == 1, out.stderr
    assert f"key {key}" in out.stderr, out.stderr


def test_a_move_whose_far_restore_fails_leaves_the_workload_running_here(
        btrfs_volume, workloads, store, tmp_path, far):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    # The far side's fscr refuses every restore (as one would with its PIDs taken).
    refusing = (f'f() {{ if [ "$1" = restore ]; then echo "fscr: error: refused here" >&2; '
                f'return 15; fi; {FSCR} "$@"; }}; f')
    job = job_file(tmp_path, store, vol, name, ssh_dest(far, refusing))
    out = fscr("backup", str(job), "--move-to", "far", "--json", check=False)
    r = json.loads(out.stdout)
    assert out.returncode == 1 and r["status"] == "failed", out.stderr
    assert "refused here" in r["error"] and "runs here again" in r["error"]
    # Restored here from the checkpoint that was sent: same PID, this host's namespace.
    assert alive(pid)
    assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    grows(vol / "history", len(lines(vol / "history")) + 2)
