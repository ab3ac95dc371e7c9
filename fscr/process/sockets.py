"""The sockets a task tree holds: TCP and UDP from /proc/PID/net, AF_UNIX with their peers
from the kernel's sock_diag netlink interface, matched to fds through the socket inode.

The scan runs before the freeze (to refuse early) and is recorded in the manifest, so
`fscr show` can list a checkpoint's sockets without decoding CRIU's images.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import asdict, dataclass

from .netns import inode, join
from .tree import Task

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING"}
UNIX_TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}


@dataclass(frozen=True)
class Socket:
    pid: int
    fd: int
    inode: int
    family: str  # "tcp", "tcp6", "udp", "udp6", "unix"
    type: str  # "stream", "dgram", "seqpacket"
    state: str
    local: str
    remote: str  # address, or for unix the peer's inode ("" when none)

    @property
    def connected_tcp(self) -> bool:
        """A TCP connection with a peer (anything but a listener or a closed socket)."""
        return self.family.startswith("tcp") and self.state not in ("LISTEN", "CLOSE")

    def describe(self) -> str:
        if self.family == "unix":
            return (f"unix {self.type} {self.local or '(unnamed)'} "
                    f"(PID {self.pid} fd {self.fd})")
        return (f"{self.family} {self.local} -> {self.remote} {self.state} "
                f"(PID {self.pid} fd {self.fd})")

    def as_dict(self) -> dict:
        return asdict(self)


def _socket_fds(pid: int) -> dict[int, int]:
    """{socket inode: fd} of `pid`."""
    out = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for n in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(n)
    return out


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    # /proc prints IPv6 as four host-endian 32-bit words.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def _inet(pid: int, family: str, wanted: set[int]) -> dict[int, tuple[str, str, str]]:
    """{inode: (local, remote, state)} from /proc/PID/net/<family> (the task's netns), for
    the sockets `wanted` only: a busy server's namespace lists thousands of TIME_WAIT
    entries, and this runs inside the frozen window."""
    out = {}
    try:
        lines = open(f"/proc/{pid}/net/{family}", errors="surrogateescape").read().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return out
    for line in lines:
        f = line.split()
        if int(f[9]) not in wanted:
            continue
        state = TCP_STATES.get(int(f[3], 16), f[3]) if family.startswith("tcp") else "UDP"
        out[int(f[9])] = (_addr(f[1]), _addr(f[2]), state)
    return out


def _unix_diag(netns: str) -> dict[int, tuple[str, int, str, int]]:
    """{inode: (type, state, path, peer inode)} of every AF_UNIX socket in network namespace
    `netns` (a /proc/PID/ns/net path), from NETLINK_SOCK_DIAG. The netlink socket is made in
    a thread that joined that namespace: a thread's setns leaves fscr's own untouched."""
    result: dict[int, tuple[str, int, str, int]] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with join(netns):
                result.update(_dump_unix())
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result


def _dump_unix() -> dict[int, tuple[str, int, str, int]]:
    NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20  # noqa: N806 - kernel constants
    NLM_F_REQUEST, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR = 1, 0x300, 3, 2  # noqa: N806
    UDIAG_SHOW_NAME, UDIAG_SHOW_PEER = 1, 4  # noqa: N806
    UNIX_DIAG_NAME, UNIX_DIAG_PEER = 0, 2  # noqa: N806
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                      UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY,
                      NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req
    out: dict[int, tuple[str, int, str, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
        s.sendto(msg, (0, 0))
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off < len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", data, off + 16)[0], "sock_diag")
                body = data[off + 16:off + length]
                _family, stype, state, _pad, ino = struct.unpack_from("=BBBBI", body)
                path, peer = "", 0
                a = 16  # sizeof(struct unix_diag_msg)
                while a + 4 <= len(body):
                    alen, atype = struct.unpack_from("=HH", body, a)
                    value = body[a + 4:a + alen]
                    if atype == UNIX_DIAG_NAME:
                        # an abstract name is any bytes, NULs too: shown as ss(8) does, with
                        # "@" for each NUL (a record holds no NUL)
                        path = (value.replace(b"\0", b"@").decode(errors="replace")
                                if value[:1] == b"\0"
                                else value.split(b"\0")[0].decode(errors="replace"))
                    elif atype == UNIX_DIAG_PEER:
                        peer = struct.unpack("=I", value[:4])[0]
                    a += (alen + 3) & ~3
                out[ino] = (UNIX_TYPES.get(stype, str(stype)), state, path, peer)
                off += (length + 3) & ~3


def scan(tasks: list[Task]) -> list[Socket]:
    """Every socket the tasks hold by fd, with family, state and addresses (unix: path and
    the peer's inode)."""
    out: list[Socket] = []
    held = [(t, fds) for t in tasks if (fds := _socket_fds(t.pid))]
    wanted: dict[int, set[int]] = {}  # the tree's socket inodes, per network namespace
    for t, fds in held:
        wanted.setdefault(inode(t.pid), set()).update(fds)
    per_netns: dict[int, tuple[dict, dict]] = {}
    for t, fds in held:
        ns = inode(t.pid)
        if ns not in per_netns:
            inet = {fam: _inet(t.pid, fam, wanted[ns]) for fam in ("tcp", "tcp6", "udp", "udp6")}
            per_netns[ns] = (inet, _unix_diag(f"/proc/{t.pid}/ns/net"))
        inet, unix = per_netns[ns]
        for ino, fd in sorted(fds.items(), key=lambda x: x[1]):
            for fam, table in inet.items():
                if ino in table:
                    local, remote, state = table[ino]
                    kind = "stream" if fam.startswith("tcp") else "dgram"
                    out.append(Socket(t.pid, fd, ino, fam, kind, state, local, remote))
                    break
            else:
                if ino in unix:
                    stype, state, path, peer = unix[ino]
                    out.append(Socket(t.pid, fd, ino, "unix", stype, str(state), path,
                                      str(peer) if peer else ""))
    return out
