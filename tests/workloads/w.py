"""Small workloads for the tests, one per subcommand. Each runs in DIR (on the test volume)
and reports through files there, so a restore rolls the reports back with everything else.

counter DIR           appends 1, 2, 3, ... to DIR/history, one line per tick; a restored run
                      must continue without a gap or a repeat (memory and file agree)
writer DIR            appends 64-byte records to DIR/data; before each write, checks that the
                      file length equals its in-memory record count (else writes DIR/MISMATCH)
tree DIR              a parent and two children, each counting into DIR/tree-<who>
unlinked0 DIR SIZE    a SIZE-byte file, unlinked while open (nlink 0), fd kept at an offset;
                      reports size, offset, nlink, sha256 to DIR/unlinked0.json on request
relinked DIR          opens "a", links it to "b", unlinks "a", creates a new "a"; when DIR/go
                      appears, writes "via-old-fd" through the old fd and creates DIR/done
socketpair DIR        a parent and child ping-pong a counter over a socketpair into DIR/sp
service DIR           a counter (DIR/history) that also holds an unlinked file with nlink 0
                      and one whose inode is still linked elsewhere (nlink 1)
mapped DIR SIZE       maps a SIZE-byte file shared, closes and unlinks it, and fills the
                      mapping with a pattern: only the mapping holds the file (nlink 0);
                      reports its sha256 to DIR/mapped.json on request
pair DIR OTHER         writes n to DIR/pair, then to OTHER/pair (two volumes), n = 1, 2, ...:
                      a consistent view has DIR's value equal to OTHER's or one ahead
traced DIR            a counter (DIR/history) whose child is ptraced by it: CRIU cannot
                      seize an already-traced task, so a dump fails for real
tcp DIR PORT          a server and a client on 127.0.0.1:PORT exchanging a counter
tcpserver OUT PORT    (not checkpointed) accepts connections on PORT and appends the bytes
                      of connection k to OUT/conn-k
tcpclient DIR HOST PORT LPORT
                      sends 1, 2, 3, ... one line per tick to HOST:PORT; when the connection
                      turns out closed (recv returns 0 or an error) it notes why in DIR/closed
                      and connects again; it also listens on LPORT and notes each accepted
                      connection in DIR/accepted
tcptree DIR PORT      a server listening on 127.0.0.1:PORT and two clients of it in one tree,
                      each client's counter echoed back, counted in DIR/conn-<i>; a new
                      connection gets "hello" back
hold DIR WHAT ARG     holds something outside the tree, then counts into DIR/history:
                      file PATH (open read-write), wronly PATH (open write-only: a fifo or
                      a pipe through /proc/PID/fd/N), unix-stream PATH or unix-dgram PATH
                      (connected to a server there), shm KEY (SysV segment attached),
                      memfd PATH (a memfd reached through /proc/PID/fd/N, mapped shared),
                      tmpfile DIR (an O_TMPFILE file in DIR, written, held read-write)
shared DIR            a parent and a child sharing anonymous memory and a memfd: the child
                      counts in both, the parent reports what it sees to DIR/shared.json on
                      request (the counts go on rising only while the memory is shared)
echo DIR PORT         a server on 127.0.0.1:PORT that answers each connection's line with
                      "echo <line>" and closes it (short connections, one command each)
memory DIR MB         holds MB of random anonymous memory and counts into DIR/history;
                      reports the memory's sha256 to DIR/memory.json on request
unixq DIR             stream, dgram and seqpacket socketpairs with data queued, unread; on
                      DIR/report-unixq.json appearing, reads it all and reports it
"""

import hashlib
import json
import os
import socket
import sys
import time

TICK = 0.02


def atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def counter(d):
    n = 0
    fd = os.open(os.path.join(d, "history"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        n += 1
        os.write(fd, f"{n}\n".encode())
        time.sleep(TICK)


def writer(d):
    rec = b"r" * 63 + b"\n"
    count = 0
    fd = os.open(os.path.join(d, "data"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        if os.fstat(fd).st_size != count * len(rec):
            atomic(os.path.join(d, "MISMATCH"), f"{os.fstat(fd).st_size} != {count}*64\n")
            sys.exit(3)
        os.write(fd, rec)
        count += 1
        time.sleep(TICK)


def tree(d):
    for who in ("child1", "child2"):
        if os.fork() == 0:
            counter_into(os.path.join(d, f"tree-{who}"))
    counter_into(os.path.join(d, "tree-parent"))


def counter_into(path):
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        n += 1
        os.write(fd, f"{n}\n".encode())
        time.sleep(TICK)


def unlinked0(d, size):
    size = int(size)
    path = os.path.join(d, "big")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    block = hashlib.sha256(b"fscr").digest() * (1 << 15)  # 1 MiB of a known pattern
    left = size
    while left > 0:
        left -= os.write(fd, block[: min(left, len(block))])
    os.unlink(path)
    os.lseek(fd, size // 3, os.SEEK_SET)
    report_loop(d, fd, "unlinked0.json")


def report_loop(d, fd, name):
    """On DIR/report-<name> appearing, write size, offset, nlink, mtime and sha256 of fd's
    data."""
    trigger = os.path.join(d, f"report-{name}")
    while True:
        if os.path.exists(trigger):
            os.unlink(trigger)
            st = os.fstat(fd)
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            h = hashlib.sha256()
            off = 0
            while chunk := os.pread(fd, 1 << 20, off):
                h.update(chunk)
                off += len(chunk)
            atomic(os.path.join(d, name), json.dumps(
                {"size": st.st_size, "pos": pos, "nlink": st.st_nlink,
                 "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}))
        time.sleep(TICK)


def relinked(d):
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    fd = os.open(a, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"old-a:")
    os.link(a, b)
    os.unlink(a)
    with open(a, "w") as f:
        f.write("new-a:")
    atomic(os.path.join(d, "ready"), "1")
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(TICK)
    os.write(fd, b"via-old-fd")
    atomic(os.path.join(d, "done"), "1")
    while True:
        time.sleep(1)


def socketpair(d):
    s1, s2 = socket.socketpair()
    if os.fork() == 0:
        s1.close()
        while True:
            n = int(s2.recv(32))
            s2.send(str(n + 1).encode())
    s2.close()
    fd = os.open(os.path.join(d, "sp"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    n = 0
    while True:
        s1.send(str(n).encode())
        n = int(s1.recv(32))
        os.write(fd, f"{n}\n".encode())
        n += 1
        time.sleep(TICK)


def service(d):
    gone = os.open(os.path.join(d, "scratch"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(gone, b"scratch data" * 1000)
    os.unlink(os.path.join(d, "scratch"))
    kept = os.open(os.path.join(d, "keep"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(kept, b"kept")
    os.link(os.path.join(d, "keep"), os.path.join(d, "keep2"))
    os.unlink(os.path.join(d, "keep"))
    counter(d)


def mapped(d, size):
    import ctypes
    import mmap

    # libc's mmap, not Python's: the mmap module keeps a dup of the fd, and this file must be
    # held by the mapping alone.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    size = int(size)
    path = os.path.join(d, "mapped-file")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    os.unlink(path)
    pattern = hashlib.sha256(b"mapped").digest() * (1 << 15)
    for off in range(0, size, len(pattern)):
        chunk = pattern[: size - off]
        ctypes.memmove(addr + off, chunk, len(chunk))
    trigger = os.path.join(d, "report-mapped.json")
    while True:
        if os.path.exists(trigger):
            os.unlink(trigger)
            atomic(os.path.join(d, "mapped.json"),
                   json.dumps({"sha256": hashlib.sha256(ctypes.string_at(addr, size)).hexdigest()}))
        time.sleep(TICK)


def pair(d, other):
    n = 0
    while True:
        n += 1
        for where in (d, other):
            fd = os.open(os.path.join(where, "pair"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(fd, f"{n:012d}".encode(), 0)
            os.close(fd)
        time.sleep(TICK / 4)


def traced(d):
    import ctypes

    child = os.fork()
    if child == 0:
        ctypes.CDLL(None).ptrace(0, 0, None, None)  # PTRACE_TRACEME: the parent traces us
        while True:
            time.sleep(1)
    counter(d)


def tcp(d, port):
    port = int(port)
    srv = socket.create_server(("127.0.0.1", port))
    if os.fork() == 0:
        srv.close()
        c = socket.create_connection(("127.0.0.1", port))
        n = 0
        while True:
            c.send(f"{n}\n".encode())
            n = int(c.recv(32)) + 1
            time.sleep(TICK)
    conn, _ = srv.accept()
    fd = os.open(os.path.join(d, "tcp"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        n = int(conn.recv(32))
        os.write(fd, f"{n}\n".encode())
        conn.send(str(n).encode())


def tcpserver(out, port):
    import threading

    srv = socket.create_server(("0.0.0.0", int(port)), reuse_port=True)
    k = 0

    def take(conn, k):
        with open(os.path.join(out, f"conn-{k}"), "ab", buffering=0) as f:
            while data := conn.recv(65536):
                f.write(data)

    while True:
        conn, _ = srv.accept()
        k += 1
        threading.Thread(target=take, args=(conn, k), daemon=True).start()


def tcpclient(d, host, port, lport):
    listener = socket.create_server(("0.0.0.0", int(lport)))
    listener.setblocking(False)
    n = 0
    conn = socket.create_connection((host, int(port)))
    while True:
        try:
            conn.setblocking(False)
            try:
                if conn.recv(64) == b"":
                    raise ConnectionError("recv returned 0")
            except BlockingIOError:
                pass
            conn.setblocking(True)
            n += 1
            conn.sendall(f"{n}\n".encode())
        except OSError as e:
            with open(os.path.join(d, "closed"), "a") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            conn.close()
            conn = socket.create_connection((host, int(port)))
        try:
            peer, _ = listener.accept()
            peer.sendall(b"accepted\n")
            peer.close()
            with open(os.path.join(d, "accepted"), "a") as f:
                f.write("1\n")
        except BlockingIOError:
            pass
        time.sleep(TICK)


def tcptree(d, port):
    import selectors

    srv = socket.create_server(("127.0.0.1", int(port)))
    for i in (1, 2):
        if os.fork() == 0:
            srv.close()
            c = socket.create_connection(("127.0.0.1", int(port)))
            c.sendall(f"client{i}\n".encode())
            assert c.recv(3) == b"ok\n"  # the server took the greeting alone
            n = 0
            fd = os.open(os.path.join(d, f"conn-{i}"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            while True:
                n += 1
                c.sendall(f"{n}\n".encode())
                got = int(c.recv(32))
                os.write(fd, f"{got}\n".encode())
                time.sleep(TICK)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                conn, _ = srv.accept()
                hello = conn.recv(32)
                if not hello.startswith(b"client"):
                    conn.sendall(b"hello\n")
                    conn.close()
                    continue
                conn.sendall(b"ok\n")
                sel.register(conn, selectors.EVENT_READ)
            else:
                data = key.fileobj.recv(32)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                key.fileobj.sendall(data.strip())


def hold(d, what, arg):
    keep = []
    if what == "file":
        keep.append(os.open(arg, os.O_RDWR | os.O_CREAT, 0o600))
    elif what == "wronly":
        keep.append(os.open(arg, os.O_WRONLY))
    elif what.startswith("unix-"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if what == "unix-stream"
                          else socket.SOCK_DGRAM)
        s.connect(arg)
        keep.append(s)
    elif what == "shm":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        shmid = libc.shmget(int(arg, 0), 4096, 0o600)
        assert shmid >= 0, ctypes.get_errno()
        keep.append(libc.shmat(shmid, None, 0))
    elif what == "tmpfile":
        fd = os.open(arg, os.O_TMPFILE | os.O_RDWR, 0o600)  # unlinked from birth
        os.write(fd, b"only the tree has this")
        keep.append(fd)
    elif what == "memfd":
        import mmap

        fd = os.open(arg, os.O_RDWR)
        keep.append(mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED))
    counter(d)


def shared(d):
    import mmap

    anon = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    mfd = os.memfd_create("fscr-test")
    os.ftruncate(mfd, 4096)
    mem = mmap.mmap(mfd, 4096, flags=mmap.MAP_SHARED)
    if os.fork() == 0:
        n = 0
        while True:
            n += 1
            anon[:8] = mem[:8] = n.to_bytes(8, "little")
            time.sleep(TICK)
    trigger = os.path.join(d, "report-shared.json")
    while True:
        if os.path.exists(trigger):
            os.unlink(trigger)
            seen = {"anon": int.from_bytes(anon[:8], "little"),
                    "memfd": int.from_bytes(mem[:8], "little")}
            atomic(os.path.join(d, "shared.json"), json.dumps(seen))
        time.sleep(TICK)


def echo(d, port):
    srv = socket.create_server(("127.0.0.1", int(port)), backlog=128)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5)
            try:
                conn.sendall(b"echo " + conn.recv(64))
            except OSError:
                pass  # a client that gave up


def unixq(d):
    pairs = {}
    for kind, stype in (("stream", socket.SOCK_STREAM), ("dgram", socket.SOCK_DGRAM),
                        ("seqpacket", socket.SOCK_SEQPACKET)):
        a, b = socket.socketpair(socket.AF_UNIX, stype)
        a.send(f"{kind}-one".encode())
        a.send(f"{kind}-two".encode())
        pairs[kind] = (a, b)
    trigger = os.path.join(d, "report-unixq.json")
    while True:
        if os.path.exists(trigger):
            os.unlink(trigger)
            got = {}
            for kind, (_a, b) in pairs.items():
                b.setblocking(False)
                msgs = []
                try:
                    while True:
                        msgs.append(b.recv(100).decode())
                except BlockingIOError:
                    pass
                got[kind] = msgs
            atomic(os.path.join(d, "unixq.json"), json.dumps(got))
        time.sleep(TICK)


def memory(d, mb):
    held = bytearray(os.urandom(1 << 20) * int(mb))  # touched: resident, no zero pages
    held[::4096] = os.urandom(len(held[::4096]))  # each page differs from its neighbours
    history = open(os.path.join(d, "history"), "a")
    trigger = os.path.join(d, "report-memory.json")
    n = 0
    while True:
        n += 1
        history.write(f"{n}\n")
        history.flush()
        if os.path.exists(trigger):
            os.unlink(trigger)
            atomic(os.path.join(d, "memory.json"),
                   json.dumps({"sha256": hashlib.sha256(held).hexdigest()}))
        time.sleep(TICK)


if __name__ == "__main__":
    cmd, d, *rest = sys.argv[1:]
    os.chdir(d)
    globals()[cmd](d, *rest)
