"""The representative slice tests/test_conformance.py runs (and `--slice` selects).

Every test here passes under CRIU alone on this machine kind (docs/conformance.md has the full
run), and runs in about 1.5 s per fscr mode, so the slice fits in about three minutes.
"""

SLICE: tuple[str, ...] = (
    # regular files, hard links, cwd, unlinked-but-open files (nlink 0; a 2 GB sparse one)
    "write_read00", "file_append", "file_shared", "link10", "cwd00",
    "unlink_fstat00", "unlink_fstat01", "unlink_largefile",
    # unlinked files with holes (CRIU's ghost files; fscr relinks them)
    "ghost_holes00", "ghost_holes01", "ghost_multi_hole00",
    # mappings: all kinds, private with advice, an unlinked mapped file, shared anonymous memory
    "maps00", "maps02", "unlink_mmap00", "maps01",
    # memfd: fd, mapping, seals
    "memfd00", "memfd02", "memfd03",
    # SysV IPC in an IPC namespace of the test's own (started through unshare --ipc)
    "shm", "sem", "msgque",
    # pipes and fifos (an unlinked fifo with data among them)
    "pipe00", "pipe02", "fifo", "fifo-ghost", "fifo_ro",
    # unix sockets: stream, half-closed, queued data, unconnected, bound by relative path
    "sockets00", "sockets02", "socket_queues", "sk-unix-unconn", "sk-unix-rel",
    # inet sockets: listening, UDP, TCP inside the tree, TCP in a network namespace of the
    # test's own (nftables conntrack), TCP to an external peer (--tcp established, --force)
    "socket_listen", "socket_udp", "socket-tcp-local", "socket-tcp-nft-nfconntrack",
    "socket-tcp",
    # threads, process trees, a controlling terminal and its session, zombies and their pgid
    "pthread00", "pthread01", "zombie00", "wait00", "child_subreaper", "tty00", "zombie01",
    # signals, timers
    "sigpending", "sigaltstack", "signalfd00", "posix_timers", "timerfd",
    # eventfd, epoll, inotify
    "eventfs00", "epoll", "inotify04",
    # a device node fscr refuses by default (--allow devices, from the runner's policy table)
    "vt",
)
