"""Real servers nobody here wrote, checkpointed while clients load them: Debian's nginx (a
master and two workers sharing memory) and Debian's redis (its data in an append-only file on
the volume, fsynced on every write).

The clients are threads of the test talking to 127.0.0.1, outside the tree, so their
connections are in the tree's sockets: the servers are checkpointed with `--tcp close`, as a
service would be. Both run as root: root here lacks CAP_SYS_RESOURCE, and CRIU cannot dump a
task of another user without it (its prlimit(2) fails), so nginx workers that drop to
www-data, or redis as user redis, cannot be checkpointed on this machine kind.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Workloads, alive, wait_for
from test_pipeline import checkpoint, restore

NGINX = Path("/usr/sbin/nginx")
REDIS = Path("/usr/bin/redis-server")
INDEX = "<h1>served from the volume</h1>\n"

needs_nginx = pytest.mark.skipif(not NGINX.exists(),
                                 reason="nginx is not installed (scripts/setup installs it)")
needs_redis = pytest.mark.skipif(not REDIS.exists(),
                                 reason="redis-server is not installed (scripts/setup installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started(pid: int) -> int:
    """The start time of `pid` (field 22 of /proc/PID/stat): a restored task has a new one."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def children(pid: int) -> list[int]:
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def threads_of(pid: int) -> list[int]:
    return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())


class Load:
    """Clients in threads of the test, each called with a stop event and running until it is
    set. Leaving the `with` block stops them too, so a failing test leaves no thread behind."""

    def __init__(self, clients: list) -> None:
        self.clients = clients
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=c, args=(self.halt,), daemon=True)
                        for c in clients]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(30)


# nginx ---------------------------------------------------------------------------------------

def nginx_conf(vol: Path, port: int) -> Path:
    """A config that keeps everything nginx writes, and what it serves, on the volume. The
    limit_req and limit_conn zones, and stub_status's counters, live in anonymous memory the
    master maps shared before it forks the workers."""
    for d in ("www", "logs", "tmp"):
        (vol / d).mkdir()
    (vol / "www" / "index.html").write_text(INDEX)
    temps = "\n".join(f"    {kind}_temp_path {vol}/tmp/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = vol / "nginx.conf"
    conf.write_text(f"""\
# Workers as www-data cannot be dumped here (root lacks CAP_SYS_RESOURCE): run them as root.
user root;
daemon off;
master_process on;
worker_processes 2;
pid {vol}/nginx.pid;
lock_file {vol}/nginx.lock;
error_log {vol}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {vol}/logs/access.log;
{temps}
    limit_req_zone $binary_remote_addr zone=perip:1m rate=100000r/s;
    limit_conn_zone $binary_remote_addr zone=conns:1m;
    server {{
        listen 127.0.0.1:{port};
        root {vol}/www;
        location / {{
            limit_req zone=perip burst=100000 nodelay;
            limit_conn conns 1000;
        }}
        location = /status {{ stub_status; }}
    }}
}}
""")
    return conf


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def accepts(port: int) -> int:
    """stub_status's count of accepted connections, this request's own included: a counter
    in the memory the workers share."""
    status, body = get(port, "/status")
    assert status == 200, body
    return int(body.splitlines()[2].split()[0])


def answers(port: int) -> bool:
    try:
        return get(port, "/index.html")[0] == 200
    except OSError:
        return False


@dataclass
class WebClient:
    """GETs the index page, one short connection each, until stopped."""

    port: int
    ok: int = 0

    def __call__(self, halt: threading.Event) -> None:
        while not halt.is_set():
            try:
                self.ok += get(self.port, "/index.html")[0] == 200
            except OSError:  # the server was killed, or the restore closed the connection
                time.sleep(0.01)


def web_load(port: int) -> Load:
    return Load([WebClient(port) for _ in range(4)])


def served(load: Load) -> int:
    return sum(c.ok for c in load.clients)


def start_nginx(workloads: Workloads, vol: Path) -> tuple[int, int, list[int]]:
    """nginx started with `fscr run`, answering; returns its port, master and worker PIDs."""
    port = free_port()
    conf = nginx_conf(vol, port)
    master, _ = workloads.run(str(NGINX), "-e", str(vol / "logs" / "error.log"), "-c", str(conf))
    wait_for(lambda: answers(port), 30, "nginx to answer")
    workers = wait_for(lambda: len(children(master)) == 2 and children(master), 30,
                       "nginx's two workers")
    return port, master, workers


def shared_mappings(pid: int) -> set[str]:
    """The shared anonymous mappings of `pid`, by device and inode (the same object in every
    process that maps it)."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = line.split(maxsplit=5)
        if f[1].endswith("s") and len(f) == 6 and f[5].endswith("(deleted)"):
            out.add(f"{f[3]}:{f[4]}")
    return out


def assert_shares_memory(master: int, workers: list[int]) -> None:
    zones = shared_mappings(master)
    assert zones, "nginx's master maps no shared memory"
    for w in workers:
        assert shared_mappings(w) == zones


def assert_counts_each_connection_once(port: int, n: int = 5) -> list[int]:
    """Consecutive stub_status reads count up by one, their own connection, whichever worker
    takes it: the workers count in one memory."""
    seen = [accepts(port) for _ in range(n)]
    assert seen == list(range(seen[0], seen[0] + n))
    return seen


@needs_nginx
def test_nginx_checkpointed_under_load_comes_back_with_its_shared_counters(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    port, master, workers = start_nginx(workloads, vol)
    assert_shares_memory(master, workers)
    original = started(master)
    with web_load(port) as load:
        wait_for(lambda: served(load) > 50, 30, "the clients' requests")
        before = accepts(port)
        m = checkpoint(store, "--pid", str(master), "--volume", str(vol), "--leave-running",
                       "--tcp", "close")
        at = served(load)
        wait_for(lambda: served(load) > at + 50, 30, "the original to serve on")
    after = accepts(port)
    snapshot = Path(m["volumes"][0]["snapshot"])
    (vol / "www" / "index.html").write_text("changed after the checkpoint\n")

    r = restore(store, m["id"], "--replace")
    assert r["pid"] == master and started(master) != original  # the restored tree, same PIDs
    assert children(master) == workers and sorted(workloads.pids()) == sorted([master, *workers])
    assert_shares_memory(master, workers)
    assert get(port, "/index.html") == (200, (snapshot / "www" / "index.html").read_text())
    seen = assert_counts_each_connection_once(port)
    # The counters are the checkpoint's: past what they were before it, short of what the
    # original counted while it served on.
    assert before < seen[0] < after


@needs_nginx
def test_nginx_killed_at_checkpoint_under_load_serves_again_after_restore(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    port, master, workers = start_nginx(workloads, vol)
    with web_load(port) as load:
        wait_for(lambda: served(load) > 50, 30, "the clients' requests")
        before = accepts(port)
        m = checkpoint(store, "--pid", str(master), "--volume", str(vol), "--kill",
                       "--tcp", "close")
        wait_for(lambda: not any(map(alive, [master, *workers])), 30, "nginx to be killed")

    r = restore(store, m["id"])
    assert r["pid"] == master and children(master) == workers
    assert_shares_memory(master, workers)
    assert get(port, "/index.html") == (200, INDEX)
    seen = assert_counts_each_connection_once(port)
    assert seen[0] > before
    with web_load(port) as load:  # the restored workers take a load again, and count it
        wait_for(lambda: served(load) > 50, 30, "the restored nginx to serve the clients")
    assert accepts(port) > seen[-1] + 50


# redis ---------------------------------------------------------------------------------------

class RedisError(Exception):
    """An error reply ("-ERR ...")."""


class Resp:
    """A connection to redis speaking RESP, its wire protocol."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def pipeline(self, *commands: tuple) -> list:
        """Send all commands at once, then read their replies (errors among them as
        RedisError values)."""
        out = b""
        for cmd in commands:
            out += f"*{len(cmd)}\r\n".encode()
            for arg in map(str, cmd):
                out += f"${len(arg.encode())}\r\n{arg}\r\n".encode()
        self.sock.sendall(out)
        return [self._reply() for _ in commands]

    def call(self, *cmd: object) -> object:
        reply = self.pipeline(cmd)[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def _reply(self) -> object:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if rest == "-1" else self.file.read(int(rest) + 2)[:-2].decode()
        if kind == b"*":
            return None if rest == "-1" else [self._reply() for _ in range(int(rest))]
        raise AssertionError(f"not RESP: {line!r}")


def redis_conf(vol: Path, port: int) -> Path:
    (vol / "redis").mkdir()
    conf = vol / "redis.conf"
    conf.write_text(f"""\
bind 127.0.0.1
port {port}
daemonize no
dir {vol}/redis
appendonly yes
appendfsync always
save ""
logfile {vol}/redis.log
""")
    return conf


def ready(port: int) -> bool:
    try:
        with Resp(port) as r:
            return r.call("PING") == "PONG"
    except (OSError, RedisError):  # not listening yet, or still loading its file
        return False


def start_redis(workloads: Workloads, vol: Path) -> tuple[int, int]:
    """redis started with `fscr run`, answering; returns its port and PID."""
    port = free_port()
    pid, _ = workloads.run(str(REDIS), str(redis_conf(vol, port)))
    wait_for(lambda: ready(port), 30, "redis to answer")
    return port, pid


@dataclass
class Writer:
    """Appends n = 1, 2, ... to list:<me>, each in one MULTI/EXEC with INCR count:<me>,
    SET last:<me> n and INCR total, until stopped or disconnected. `acked` is the last n redis
    confirmed, `sent` the last it was asked to write."""

    port: int
    me: int
    acked: int = 0
    sent: int = 0
    wrong: object = None  # a reply that was not what redis answers to this transaction

    def __call__(self, halt: threading.Event) -> None:
        try:
            with Resp(self.port) as r:
                while not halt.is_set() and self.wrong is None:
                    self.sent = n = self.sent + 1
                    *_, done = r.pipeline(
                        ("MULTI",), ("RPUSH", f"list:{self.me}", n),
                        ("INCR", f"count:{self.me}"), ("SET", f"last:{self.me}", n),
                        ("INCR", "total"), ("EXEC",))
                    if not isinstance(done, list) or done[:3] != [n, n, "OK"]:
                        self.wrong = done
                    else:
                        self.acked = n
        except OSError:  # redis was killed, or the restore closed the connection
            pass


def dataset(port: int) -> dict[str, object]:
    """Every key of the redis at `port` and its value."""
    with Resp(port) as r:
        keys: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = r.call("SCAN", cursor, "COUNT", 1000)  # type: ignore[misc]
            keys += batch
            if cursor == "0":
                break
        return {k: value(r, k) for k in keys}


def value(r: Resp, key: str) -> object:
    kind = r.call("TYPE", key)
    if kind == "string":
        return r.call("GET", key)
    if kind == "list":
        return r.call("LRANGE", key, 0, -1)
    raise AssertionError(f"key {key} of type {kind}: the writers make none")


def writers_state(data: dict[str, object], writers: list[Writer]) -> dict[int, int]:
    """Each writer's n in `data`, once `data` is shown to be one whole state: every list
    1..n without a gap, its counter and last value n, and the total their sum."""
    ns = {}
    for w in writers:
        n = int(data[f"last:{w.me}"])  # type: ignore[arg-type]
        assert data[f"list:{w.me}"] == [str(k) for k in range(1, n + 1)], f"writer {w.me}"
        assert int(data[f"count:{w.me}"]) == n  # type: ignore[arg-type]
        ns[w.me] = n
    assert int(data["total"]) == sum(ns.values())  # type: ignore[arg-type]
    assert len(data) == 3 * len(writers) + 1
    return ns


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[Callable[[Path], int]]:
    """Starts a redis outside fscr on a copy of a data directory, returns its port; kills it
    at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(data_dir: Path) -> int:
        copy = tmp_path / f"fresh-{len(procs)}"
        shutil.copytree(data_dir, copy)
        port = free_port()
        procs.append(subprocess.Popen(
            [str(REDIS), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(copy),
             "--appendonly", "yes", "--save", "", "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: ready(port), 30, "the fresh redis to load its file")
        return port

    try:
        yield start
    finally:
        for p in procs:
            p.kill()
            p.wait()


Bounds = dict[int, int]  # writer -> n


def checkpoint_loaded_redis(store: Path, vol: Path, pid: int, port: int,
                            *mode: str) -> tuple[dict, list[Writer], Bounds, Bounds, list[int]]:
    """Checkpoint redis while four writers load it, then stop them. Returns the manifest, the
    writers, the bounds of each writer's n at the checkpoint (what redis had confirmed before
    it began, what the writer had sent when it returned), and redis's threads then."""
    writers = [Writer(port, me) for me in range(4)]
    with Load(writers):
        wait_for(lambda: all(w.acked > 20 for w in writers), 30, "the writers to write")
        low = {w.me: w.acked for w in writers}
        tasks = threads_of(pid)
        m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), *mode, "--tcp", "close")
        high = {w.me: w.sent for w in writers}
        if "--leave-running" in mode:  # so the restore has writes to roll back
            wait_for(lambda: all(w.acked > high[w.me] + 20 for w in writers), 30,
                     "the original to serve on")
    assert [w.wrong for w in writers] == [None] * len(writers)
    return m, writers, low, high, tasks


def assert_memory_agrees_with_its_file(port: int, vol: Path, writers: list[Writer],
                                       low: Bounds, high: Bounds,
                                       fresh_redis: Callable[[Path], int]) -> None:
    """The restored redis holds one whole state, the checkpoint's (with --leave-running, not
    the later one the original went on to), and a redis that loads only its append-only file
    as restored holds exactly the same."""
    restored = dataset(port)
    ns = writers_state(restored, writers)
    for me, n in ns.items():
        assert low[me] <= n <= high[me], f"writer {me}: {n} not in [{low[me]}, {high[me]}]"
    assert dataset(fresh_redis(vol / "redis")) == restored


def assert_serves(port: int) -> None:
    with Resp(port) as c:
        total = int(c.call("GET", "total"))  # type: ignore[arg-type]
        assert c.call("PING") == "PONG" and c.call("INCR", "total") == total + 1


@needs_redis
def test_redis_checkpointed_under_load_holds_what_its_append_only_file_says(
        btrfs_volume, workloads, store, fresh_redis):
    vol = btrfs_volume.path
    port, pid = start_redis(workloads, vol)
    original = started(pid)
    m, writers, low, high, tasks = checkpoint_loaded_redis(store, vol, pid, port,
                                                           "--leave-running")

    r = restore(store, m["id"], "--replace")
    assert r["pid"] == pid and started(pid) != original and threads_of(pid) == tasks
    assert_memory_agrees_with_its_file(port, vol, writers, low, high, fresh_redis)
    assert_serves(port)


@needs_redis
def test_redis_killed_at_checkpoint_under_load_loses_no_confirmed_write(
        btrfs_volume, workloads, store, fresh_redis):
    vol = btrfs_volume.path
    port, pid = start_redis(workloads, vol)
    m, writers, low, high, tasks = checkpoint_loaded_redis(store, vol, pid, port, "--kill")
    wait_for(lambda: not alive(pid), 30, "redis to be killed")

    r = restore(store, m["id"])
    assert r["pid"] == pid and threads_of(pid) == tasks
    assert_memory_agrees_with_its_file(port, vol, writers, low, high, fresh_redis)
    assert_serves(port)
