"""The benchmark's workload: VOL RSS_MB UNLINKED_MB PROCS. Holds RSS_MB of touched memory and
an unlinked file of UNLINKED_MB (nlink 0) on the volume, forks PROCS-1 children, then writes
VOL/ready and sleeps."""

import os
import sys
import time

vol, rss_mb, unlinked_mb, procs = sys.argv[1], *map(int, sys.argv[2:5])
memory = bytearray(os.urandom(1 << 20) * rss_mb)  # touched: resident, not zero pages
if unlinked_mb:
    fd = os.open(os.path.join(vol, "unlinked"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    block = os.urandom(1 << 20)
    for _ in range(unlinked_mb):
        os.write(fd, block)
    os.unlink(os.path.join(vol, "unlinked"))
for _ in range(procs - 1):
    if os.fork() == 0:
        while True:
            time.sleep(1)
open(os.path.join(vol, "ready"), "w").close()
while True:
    time.sleep(1)
