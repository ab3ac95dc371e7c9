"""The benchmark's workload: VOL RSS_MB UNLINKED_MB PROCS [CTL]. Holds RSS_MB of touched memory and
an unlinked file of UNLINKED_MB (nlink 0) on the volume, forks PROCS-1 children, then writes
VOL/ready and sleeps.

With CTL (a directory off the volume, so a restore's swap does not take it away) it measures
its own stall instead of sleeping: a 1 ms tick loop whose largest gap between two ticks is
what a checkpoint's stop costs it. On CTL/ask-<token> appearing it writes CTL/answer-<token>
with the largest gap since the last answer (reset then) and a digest of a few pages of its
memory (so that an answer after a lazy restore needs its memory served), then removes the
request.
"""

import hashlib
import json
import os
import sys
import time

vol, rss_mb, unlinked_mb, procs = sys.argv[1], *map(int, sys.argv[2:5])
ctl = sys.argv[5] if len(sys.argv) > 5 else None
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
if ctl is None:
    while True:
        time.sleep(1)


def answer(token: str, worst: float) -> None:
    pages = range(0, len(memory), max(4096, len(memory) // 16 // 4096 * 4096))
    digest = hashlib.sha256(b"".join(memory[p:p + 64] for p in pages)).hexdigest()
    tmp = os.path.join(ctl, f".answer-{token}")
    with open(tmp, "w") as f:
        json.dump({"stall_s": worst, "digest": digest}, f)
    os.rename(tmp, os.path.join(ctl, f"answer-{token}"))


last = time.monotonic()
worst = 0.0
while True:
    time.sleep(0.001)
    now = time.monotonic()
    worst = max(worst, now - last)
    last = now
    for name in os.listdir(ctl):
        if name.startswith("ask-"):
            answer(name[4:], worst)
            os.unlink(os.path.join(ctl, name))
            worst = 0.0
            last = time.monotonic()
