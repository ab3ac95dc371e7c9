"""Replication of a backup job to an ssh destination: bytes and seconds of the first (full)
and of the next (incremental) run, against the floor of what must cross the wire.

    sudo .venv/bin/python -m bench.replication [--data-mb 1024] [--change-mb 10] [--out DIR]

A 1 GB volume of random data and the benchmark's workload (64 MB RSS), a job with one ssh
destination: an sshd of its own on a loopback port, in a mount namespace where a second
btrfs filesystem stands at the volume's place (as a second machine; tests/test_replicate.py
does the same). Run 1 sends everything; then DATA changes by CHANGE MB and run 2 sends an
incremental. Target (issue 21): run 2's bytes at most 1.1x the btrfs incremental stream of
the volume alone (`btrfs send -p`) plus the process images. Writes replication.json to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fscr.names import FSCR_GROUP
from fscr.process import freezer

HERE = Path(__file__).resolve().parent
FSCR = Path(sys.executable).parent / "fscr"
MB = 1 << 20


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def loop_btrfs(img: Path, size_gb: int) -> str:
    with open(img, "wb") as f:
        f.truncate(size_gb << 30)
    loop = sh("losetup", "--find", "--show", str(img))
    sh("mkfs.btrfs", "-q", loop)
    return loop


def start_far(root: Path, mnt: Path, loop: str) -> tuple[subprocess.Popen[bytes], Path]:
    """sshd on a free loopback port, in a mount namespace with `loop` mounted at `mnt`;
    returns it and the ssh config naming it "far"."""
    d = root / "ssh"
    d.mkdir(mode=0o700)
    for key in ("host_key", "client_key"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key))
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} "
                                   + " ".join((d / "host_key.pub").read_text().split()[:2]))
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile none\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nUsePAM no\nStrictModes no\nLogLevel ERROR\n"
        f"SetEnv FSCR_LOCK_DIR={root / 'far-locks'}\n")
    (d / "config").write_text(
        f"Host far\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
        f"  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             'mount "$1" "$2" && exec /usr/sbin/sshd -D -e -f "$3"', "sh",
                             loop, str(mnt), str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    for _ in range(100):
        if subprocess.run(["ssh", "-F", str(d / "config"), "far", "true"],
                          capture_output=True).returncode == 0:
            return proc, d / "config"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the far sshd did not answer")


def stream_bytes(argv: list[str]) -> int:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    n = sum(len(chunk) for chunk in iter(lambda: proc.stdout.read(MB), b""))
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(argv)} failed")
    return n


def backup(job: Path) -> dict:
    out = subprocess.run([str(FSCR), "backup", str(job), "--json"], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fscr backup: {out.stderr.strip()}")
    return json.loads(out.stdout)


def measure(root: Path, data_mb: int, change_mb: int) -> dict:
    mnt, store = root / "mnt", root / "store"
    vol = mnt / "vol"
    mnt.mkdir(parents=True)
    near = loop_btrfs(root / "near.img", 4)
    far_loop = loop_btrfs(root / "far.img", 4)
    sh("mount", near, str(mnt))
    far = cg = None
    try:
        sh("btrfs", "subvolume", "create", str(vol))
        block = os.urandom(MB)
        with open(vol / "data", "wb") as f:
            for _ in range(data_mb):
                f.write(block)
        far, config = start_far(root, mnt, far_loop)
        subprocess.run([str(FSCR), "run", "--name", "benchrepl", "--", sys.executable,
                        str(HERE / "workload.py"), str(vol), "64", "0", "1"], check=True,
                       capture_output=True)
        cg = freezer.at(f"{FSCR_GROUP}/benchrepl")
        while not (vol / "ready").exists():
            time.sleep(0.05)
        job = root / "job.toml"
        job.write_text(f'name = "bench"\nstore = "{store}"\n[target]\nname = "benchrepl"\n'
                       f'[snapshot]\nvolumes = ["{vol}"]\n[[destination]]\nkind = "ssh"\n'
                       f'host = "far"\nstore = "{root / "far-store"}"\n'
                       f'ssh_config = "{config}"\nfscr = "{FSCR}"\n')
        first = backup(job)
        with open(vol / "data", "r+b") as f:
            f.seek(data_mb * MB // 3)
            f.write(os.urandom(change_mb * MB))
        second = backup(job)
        snaps = mnt / ".fscr-snapshots"
        btrfs = stream_bytes(["btrfs", "send", "-q", "-p", str(snaps / first["id"] / "0"),
                              str(snaps / second["id"] / "0")])
        shown = subprocess.run([str(FSCR), "show", second["id"], "--json"], check=True,
                               capture_output=True, text=True,
                               env=os.environ | {"FSCR_STORE": str(store)}).stdout
        images = json.loads(shown)["image_bytes"]
        full, inc = first["destinations"][0], second["destinations"][0]
        assert (full["mode"], inc["mode"]) == ("full", "incremental"), (full, inc)
        floor = btrfs + images
        return {"data_mb": data_mb, "change_mb": change_mb,
                "full": {"bytes": full["bytes"], "seconds": full["seconds"]},
                "incremental": {"bytes": inc["bytes"], "seconds": inc["seconds"]},
                "btrfs_incremental_bytes": btrfs, "image_bytes": images,
                "ratio": round(inc["bytes"] / floor, 4)}
    finally:
        if cg is not None:
            for pid in cg.procs():
                os.kill(pid, signal.SIGKILL)
            while cg.populated():
                time.sleep(0.05)
            cg.remove()
        if far is not None:
            far.kill()
            far.wait()
        subprocess.run(["umount", str(mnt)], check=False)
        for loop in (near, far_loop):
            subprocess.run(["losetup", "-d", loop], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.replication",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--data-mb", type=int, default=1024)
    ap.add_argument("--change-mb", type=int, default=10)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    root = Path("/var/tmp/fscr-bench-replication")
    shutil.rmtree(root, ignore_errors=True)
    try:
        r = measure(root, args.data_mb, args.change_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replication.json").write_text(json.dumps(r, indent=2))
    verdict = "met" if r["ratio"] <= 1.1 else "missed"
    print(f"replication, {r['data_mb']} MB volume, {r['change_mb']} MB changed: full "
          f"{r['full']['bytes']} bytes in {r['full']['seconds']} s, incremental "
          f"{r['incremental']['bytes']} bytes in {r['incremental']['seconds']} s; btrfs "
          f"incremental of the volume {r['btrfs_incremental_bytes']} + images "
          f"{r['image_bytes']}: ratio {r['ratio']:.3f} (target <= 1.1: {verdict})")


if __name__ == "__main__":
    main()
