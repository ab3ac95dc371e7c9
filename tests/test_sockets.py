"""Sockets and the network: established TCP across network namespaces, --tcp close, a TCP
server with its connections inside the tree, AF_UNIX pairs with queued data.

Real kernel networking: network namespaces and a veth pair made by the test (the `net`
fixture); only addresses inside them, or loopback, are used. fscr runs in the host's network
namespace, as a user runs it.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WORKLOAD, alive, ask, fscr, wait_for
from test_pipeline import checkpoint, restore

from fscr.process import freezer


def port() -> int:
    return random.randint(20000, 40000)


@pytest.fixture
def server(net, tmp_path) -> Iterator[tuple[Path, int]]:  # noqa: ANN001
    """A TCP server in namespace a (not checkpointed): the bytes of its k-th connection are
    appended to <out>/conn-k."""
    out = tmp_path / "server"
    out.mkdir()
    p = port()
    proc = subprocess.Popen(["ip", "netns", "exec", net.a, sys.executable, str(WORKLOAD),
                             "tcpserver", str(out), str(p)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: f":{p:04X} " in net.exec(net.a, "cat", "/proc/net/tcp").stdout,
                 10, "the server to listen")
        yield out, p
    finally:
        proc.kill()
        proc.wait()


def received(out: Path, k: int = 1) -> list[int]:
    f = out / f"conn-{k}"
    return [int(x) for x in f.read_text().split("\n")[:-1]] if f.exists() else []


def block(net, on: bool) -> None:  # noqa: ANN001
    """Drop the client's packets to the server (in namespace b), so it holds unacked data."""
    if on:
        net.exec(net.b, "nft", "add table inet fscrtest; add chain inet fscrtest out "
                 "{ type filter hook output priority 0; }; "
                 f"add rule inet fscrtest out ip daddr {net.a_ip} drop")
    else:
        net.exec(net.b, "nft", "delete", "table", "inet", "fscrtest")


def test_established_connection_survives_across_namespaces(net, server, btrfs_volume,
                                                           workloads, store):
    out, p = server
    vol = btrfs_volume.path
    pid, _ = workloads.start("tcpclient", str(vol), net.a_ip, str(p), str(port()),
                             netns=net.path(net.b))
    wait_for(lambda: len(received(out)) > 5, 10, "the server to receive")
    block(net, True)
    time.sleep(0.5)  # the client sends on; those bytes wait unacknowledged in its queue
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--tcp", "established",
                   "--kill")
    assert m["tcp"] == "established" and m["network_lock"].startswith("CRIU-")
    # The lock fscr recorded is the table CRIU made (its name holds 21 characters of the id).
    assert f"table inet {m['network_lock']}\n" in net.exec(net.b, "nft", "list", "tables").stdout
    assert m["netns"]["treatment"] == "external" and m["netns"]["path"] == net.path(net.b)
    wait_for(lambda: not alive(pid), 5, "CRIU to kill the client")
    before = len(received(out))

    r = restore(store, m["id"])
    block(net, False)
    got = wait_for(lambda: (v := received(out)) and len(v) > before + 20 and v, 20,
                   "the restored client's bytes to arrive")
    # Every byte exactly once and in order, on the one original connection: the peer never
    # noticed.
    assert got == list(range(1, len(got) + 1))
    assert not (out / "conn-2").exists() and not (vol / "closed").exists()
    assert alive(r["pid"])
    # The network lock was the checkpoint's; restore removed it.
    assert "CRIU-" not in net.exec(net.b, "nft", "list", "tables").stdout


def test_deleting_an_established_checkpoint_unblocks_its_connections(net, server,
                                                                      btrfs_volume, workloads,
                                                                      store):
    out, p = server
    vol = btrfs_volume.path
    pid, _ = workloads.start("tcpclient", str(vol), net.a_ip, str(p), str(port()),
                             netns=net.path(net.b))
    wait_for(lambda: len(received(out)) > 5, 10, "the server to receive")
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--tcp", "established",
                   "--kill")
    tables = net.exec(net.b, "nft", "list", "tables").stdout
    assert f"table inet {m['network_lock']}\n" in tables
    removed = json.loads(fscr("delete", m["id"], "--json", store=store).stdout)["removed"]
    assert f"network lock {m['network_lock']}" in removed
    assert "CRIU-" not in net.exec(net.b, "nft", "list", "tables").stdout


def test_tcp_close_restores_the_connection_closed_and_listeners_working(
        net, server, btrfs_volume, workloads, store):
    out, p = server
    vol = btrfs_volume.path
    lport = port()
    pid, _ = workloads.start("tcpclient", str(vol), net.a_ip, str(p), str(lport),
                             netns=net.path(net.b))
    wait_for(lambda: len(received(out)) > 5, 10, "the server to receive")
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--tcp", "close", "--kill")
    assert m["network_lock"] is None
    restore(store, m["id"])
    # The application sees its old connection closed and connects anew.
    wait_for(lambda: (vol / "closed").exists(), 10, "the client to see its connection closed")
    wait_for(lambda: len(received(out, 2)) > 3, 10, "a new connection to carry data")
    # Its listening socket, restored, accepts a new connection.
    reply = net.exec(net.a, sys.executable, "-c",
                     "import socket; s = socket.create_connection(("
                     f"'{net.b_ip}', {lport}), timeout=5); print(s.recv(64).decode())")
    assert reply.stdout.strip() == "accepted"


def test_server_with_listener_and_two_connections_in_the_tree(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    p = port()
    pid, _ = workloads.start("tcptree", str(vol), str(p))
    for i in (1, 2):
        wait_for(lambda i=i: (vol / f"conn-{i}").exists()
                 and len((vol / f"conn-{i}").read_text().split()) > 3, 10)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--tcp", "established",
                   "--kill")
    states = sorted(s["state"] for s in m["sockets"] if s["family"] == "tcp")
    assert states.count("ESTABLISHED") == 4 and "LISTEN" in states
    snap = Path(m["volumes"][0]["snapshot"])
    restore(store, m["id"])
    for i in (1, 2):
        n = len((snap / f"conn-{i}").read_text().split())
        got = wait_for(lambda i=i, n=n: len(v := (vol / f"conn-{i}").read_text().split()) > n + 5
                       and v, 10, f"client {i} to go on")
        assert [int(x) for x in got] == list(range(1, len(got) + 1))
    with socket.create_connection(("127.0.0.1", p), timeout=5) as c:
        c.sendall(b"new\n")
        assert c.recv(16) == b"hello\n"


def test_unix_socketpairs_keep_their_queued_data(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("unixq", str(vol))
    time.sleep(0.3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    assert sorted(s["type"] for s in m["sockets"]) == sorted(
        ["stream", "stream", "dgram", "dgram", "seqpacket", "seqpacket"])
    restore(store, m["id"])
    got = ask(vol, "unixq", 10)
    assert got["dgram"] == ["dgram-one", "dgram-two"]
    assert got["seqpacket"] == ["seqpacket-one", "seqpacket-two"]
    assert "".join(got["stream"]) == "stream-onestream-two"


def test_default_refuses_tcp_connections_without_freezing(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    p = port()
    pid, _ = workloads.start("tcptree", str(vol), str(p))
    wait_for(lambda: (vol / "conn-2").exists())
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store, check=False)
    assert out.returncode == 15 and out.stderr.count("\n") == 1
    assert out.stderr.count("ESTABLISHED") == 4 and f"127.0.0.1:{p}" in out.stderr
    assert "--tcp established" in out.stderr
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--tcp", "established",
               store=store, check=False)
    assert out.returncode == 15 and "--kill" in out.stderr


def test_show_lists_sockets_and_the_namespace_treatment(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("socketpair", str(vol))
    time.sleep(0.3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    text = fscr("show", m["id"], store=store).stdout
    assert "network namespace    host" in text
    assert text.count("socket               unix stream (unnamed) peer") == 2


def test_a_namespace_the_tree_created_is_dumped_and_recreated(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.run("unshare", "--net", "--", "sh", "-c",
                           f"ip link set lo up && exec {sys.executable} {WORKLOAD} tcptree "
                           f"{vol} {port()}")
    wait_for(lambda: (vol / "conn-2").exists())
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--tcp", "established",
                   "--kill")
    assert m["netns"]["treatment"] == "own"
    r = restore(store, m["id"])
    host = Path("/proc/self/ns/net").stat().st_ino
    assert Path(f"/proc/{r['pid']}/ns/net").stat().st_ino != host
    n = len((vol / "conn-1").read_text().split())
    wait_for(lambda: len((vol / "conn-1").read_text().split()) > n + 5, 10, "it to go on")


def test_a_listener_under_a_stream_of_short_connections_checkpoints_every_time(
        btrfs_volume, workloads, store):
    """Connections whose handshake the kernel completes while the tree is stopped wait in
    the listener's queue: CRIU refuses those ("In-flight connection") unless told to skip
    them. Their clients are served once the tree runs on."""
    vol, p = btrfs_volume.path, port()
    pid, _ = workloads.start("echo", str(vol), str(p))
    wait_for(lambda: f":{p:04X} 00000000:0000 0A" in open("/proc/net/tcp").read(), 10,
             "the server to listen")
    stop, answered, failed = threading.Event(), [0], []

    def clients() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", p), timeout=10) as c:
                    c.sendall(b"ping\n")
                    if c.recv(64) == b"echo ping\n":
                        answered[0] += 1
            except OSError as e:
                failed.append(e)

    t = threading.Thread(target=clients)
    t.start()
    try:
        ids = []
        for _ in range(20):
            before = answered[0]
            wait_for(lambda b=before: answered[0] > b + 20, 10, "clients to be served")
            ids.append(checkpoint(store, "--pid", str(pid), "--volume", str(vol),
                                  "--tcp", "close")["id"])
    finally:
        stop.set()
        t.join()
    assert len(set(ids)) == 20 and alive(pid)
    assert failed == []  # every client was answered: none lost to a checkpoint
