"""One ZDTM test in one mode: start, checkpoint, (move), restore, verify, and clean up.

Modes:
  criu        CRIU alone: `criu dump` (the tree killed) then `criu restore -d`, with the
              .desc's options, as zdtm.py runs it: the baseline.
  criu-moved  the same, with the test's files overwritten between dump and restore: CRIU
              alone does not restore files, so some fail (for information).
  fscr        `fscr checkpoint --pid PID --volume VOL --kill`, then `fscr restore ID`.
  fscr-moved  the same, with every file the test made on its volume overwritten in between:
              fscr puts the volume back, so the test must pass.

Every mode starts the test with `fscr run` (own cgroup, new session, stdio on /dev/null, no
inherited fds), in its own fresh subvolume, and judges it as zdtm.py does: SIGTERM after
restore, wait for the exit, "PASS" among the words of NAME.out.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .bed import Area, Bed, Done, Firewall, Reaper, Timeout, alive, bed, kill_cgroup
from .explain import criu_error, fscr_error, test_line
from .zdtm import SYSTEM_PATH, Build, Test

MODES = ("criu", "fscr", "fscr-moved")
ALL_MODES = ("criu", "criu-moved", "fscr", "fscr-moved")
FSCR = Path(sys.executable).parent / "fscr"
MOVED = b"overwritten by the conformance runner between checkpoint and restore\n"


@dataclass
class Outcome:
    status: str  # pass, fail, timeout, skip, left-out
    stage: str = ""  # where it failed: start, checkpoint, move, restore, verify, hook ...
    why: str = ""  # the explaining line
    seconds: float = 0.0
    log: str = ""  # this mode's log directory
    criu_line: str = ""  # when fscr failed in CRIU: CRIU's first error from fscr's store
    residue: list[str] = field(default_factory=list)  # what cleanup had to remove


class Failed(Exception):
    def __init__(self, stage: str, why: str, criu_line: str = "") -> None:
        super().__init__(f"{stage}: {why}")
        self.stage, self.why, self.criu_line = stage, why, criu_line


@dataclass
class Context:
    """What every run shares: the bed, the reaper, the build, the tools, where logs go."""

    bed: Bed
    reaper: Reaper
    build: Build
    criu: str
    logs: Path
    firewall: Firewall = field(default_factory=Firewall)


@contextmanager
def session(build: Build, criu: str, logs: Path) -> Iterator[Context]:
    """A bed (loopback btrfs under /var/tmp/fzc.*) and a reaper for a series of runs; on the
    way out (also on failure and ^C) orphans are killed and the bed removed."""
    root = Path(tempfile.mkdtemp(prefix="fzc.", dir="/var/tmp"))
    with bed(root) as b, Reaper() as reaper:
        yield Context(b, reaper, build, criu, logs)


def run(ctx: Context, test: Test, mode: str) -> Outcome:
    """Run `test` in `mode`; everything it created is gone when this returns, whatever the
    outcome (also on KeyboardInterrupt, which is re-raised after the cleanup)."""
    if test.skip:
        return Outcome("skip", why=test.skip)
    if mode.startswith("fscr") and test.left_out:
        return Outcome("left-out", why=test.left_out)
    logdir = ctx.logs / test.name / mode
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    t0 = time.monotonic()
    r = _Run(ctx, test, mode, logdir, t0 + test.timeout)
    try:
        r.go()
        outcome = Outcome("pass")
    except Failed as e:
        outcome = Outcome("fail", e.stage, e.why, criu_line=e.criu_line)
    except Timeout as e:
        outcome = Outcome("timeout", r.stage, f"timed out after {test.timeout:.0f} s in "
                                              f"{r.stage} ({e})")
    except Exception as e:  # one test's surprise must not end a long run
        outcome = Outcome("fail", r.stage, f"runner: {type(e).__name__}: {e}")
    finally:
        residue = r.cleanup()
    outcome.seconds = round(time.monotonic() - t0, 2)
    outcome.log = str(logdir)
    outcome.residue = residue
    return outcome


class _Run:
    def __init__(self, ctx: Context, test: Test, mode: str, logdir: Path,
                 deadline: float) -> None:
        self.ctx, self.test, self.mode, self.logdir = ctx, test, mode, logdir
        self.deadline = deadline
        self.stage = "setup"
        self.fw_before = ctx.firewall.snapshot()
        self.tmp_before = _tmp_entries()
        self.area: Area = ctx.bed.area(mode, test.name, ctx.build.lib)
        self.cgroup: str | None = None
        self.pid = 0
        self.ckpt: str | None = None
        self.lock: str | None = None  # fscr's network-lock table for this checkpoint
        self.cleaned = False  # the hook's --clean ran
        self.fscr_killed = False  # an fscr command outlived the deadline

    @property
    def uses_fscr(self) -> bool:
        return self.mode.startswith("fscr")

    def go(self) -> None:
        self.start()
        self.dump()
        if self.mode.endswith("-moved"):
            self.stage = "move"
            moved = overwrite(self.area.volume)
            (self.logdir / "moved.txt").write_text("".join(f"{m}\n" for m in moved))
        self.restore()
        self.verify()

    # --- start ---------------------------------------------------------------------------
    def start(self) -> None:
        self.stage = "start"
        name = f"zdtm_{secrets.token_hex(4)}"
        env = os.environ | self.test.env()
        done = self.fscr(["run", "--name", name, "--json", "--", *self.test.argv], env=env,
                         cwd=self.area.volume, log="fscr-run")
        if done.rc != 0:
            raise Failed("start", fscr_error(done))
        info = json.loads(done.out)
        self.cgroup = info["cgroup"]
        self.hook("--post-start")
        pidfile = self.pidfile
        while not pidfile.exists():
            if not alive(info["pid"]) and not pidfile.exists():
                raise Failed("start", test_line(self.area.volume, self.test.name)
                             or "the test exited without writing its pidfile")
            self.wait_a_little()
        self.pid = int(pidfile.read_text().split()[0])
        if not alive(self.pid):
            raise Failed("start", test_line(self.area.volume, self.test.name)
                         or f"the test's PID {self.pid} is gone")

    @property
    def pidfile(self) -> Path:
        return self.area.volume / f"{self.test.name}.pid"

    # --- checkpoint ----------------------------------------------------------------------
    def dump(self) -> None:
        self.stage = "checkpoint"
        self.hook("--pre-dump")
        if self.uses_fscr:
            done = self.fscr(["checkpoint", "--pid", str(self.pid), "--volume",
                              str(self.area.volume), "--kill", "--json",
                              *self.test.fscr_args], log="fscr-checkpoint")
            if done.rc != 0:
                raise Failed("checkpoint", fscr_error(done), self.store_error("dump"))
            made = json.loads(done.out)
            self.ckpt, self.lock = made["id"], made.get("network_lock")
            images = self.area.store / "checkpoints" / self.ckpt / "images"
        else:
            self.area.images.mkdir()
            done = self.criu("dump", ["--tree", str(self.pid),
                                      *self.test.criu_opts("dopts", self.pidfile),
                                      "--timeout", "10"])
            if done.rc != 0:
                raise Failed("checkpoint", criu_error(self.area.images / "dump.log", done))
            images = self.area.images
        # zdtm.py's test.gone(): the tree is dead and reaped (CRIU needs its PIDs free), and
        # the pidfile removed.
        for pid in [self.pid, *image_pids(images)]:
            if not self.ctx.reaper.wait_gone(pid, self.deadline):
                raise Timeout(f"PID {pid} of the dumped tree")
        self.pidfile.unlink(missing_ok=True)

    # --- restore -------------------------------------------------------------------------
    def restore(self) -> None:
        self.stage = "restore"
        self.hook("--pre-restore")
        if self.uses_fscr:
            done = self.fscr(["restore", str(self.ckpt), "--json", *self.test.fscr_restore_args],
                             log="fscr-restore")
            if done.rc != 0:
                raise Failed("restore", fscr_error(done), self.store_error("restore"))
            self.pid = int(json.loads(done.out)["pid"])
        else:
            done = self.criu("restore", [*self.test.criu_opts("ropts", self.pidfile),
                                         "--restore-detached"])
            if done.rc != 0:
                raise Failed("restore", criu_error(self.area.images / "restore.log", done))
            self.pid = int(self.pidfile.read_text().split()[0])
        self.hook("--post-restore")

    # --- verify --------------------------------------------------------------------------
    def verify(self) -> None:
        self.stage = "verify"
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            raise Failed("verify", f"the restored test (PID {self.pid}) is gone") from None
        if not self.ctx.reaper.wait_gone(self.pid, self.deadline):
            raise Timeout(f"PID {self.pid} after SIGTERM")
        out = self.area.volume / f"{self.test.name}.out"
        words = out.read_text(errors="replace").split() if out.exists() else []
        if "PASS" not in words:
            raise Failed("verify", test_line(self.area.volume, self.test.name)
                         or f"no {out.name}")
        self.stage = "clean"
        self.hook("--clean")
        self.cleaned = True

    # --- tools ---------------------------------------------------------------------------
    def fscr(self, args: list[str], *, log: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> Done:
        env = (env or dict(os.environ)) | {"FSCR_STORE": str(self.area.store),
                                           "PYTHONPYCACHEPREFIX": str(self.ctx.bed.pycache)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # fscr's bytecode cached in the bed
        try:
            done = self.ctx.reaper.run([str(FSCR), *args], self.deadline, env=env, cwd=cwd)
        except Timeout:
            self.fscr_killed = True
            raise
        (self.logdir / f"{log}.txt").write_text(f"$ fscr {' '.join(args)}\nexit {done.rc}\n"
                                               f"{done.out}{done.err}")
        return done

    def criu(self, action: str, opts: list[str]) -> Done:
        """CRIU as zdtm.py's criu_cli runs it (pidfile and verbosity included)."""
        argv = [self.ctx.criu, action, "--no-default-config", "--log-file", f"{action}.log",
                "--images-dir", str(self.area.images), "--verbosity=4", *opts]
        return self.ctx.reaper.run(argv, self.deadline, cwd=self.area.work)

    def hook(self, stage: str) -> None:
        """NAME.hook STAGE as zdtm.py runs it: from CRIU's test/ directory (here the area's),
        ZDTM_TEST_PID and ZDTM_IMG_DIR set, the system's python3 (it has protobuf)."""
        if not self.test.hook:
            return
        img = (self.area.store / "checkpoints" / self.ckpt if self.ckpt else self.area.work)
        env = os.environ | {"PATH": SYSTEM_PATH, "ZDTM_TEST_PID": str(self.pid),
                            "ZDTM_IMG_DIR": str(img)}
        done = self.ctx.reaper.run([self.test.hook, stage], self.deadline, env=env,
                                   cwd=self.area.hook_cwd)
        with open(self.logdir / "hook.txt", "a") as f:
            f.write(f"$ {Path(self.test.hook).name} {stage}\nexit {done.rc}\n{done.out}"
                    f"{done.err}")
        if done.rc != 0:
            lines = (done.out + done.err).strip().splitlines()
            raise Failed(f"hook {stage}", lines[-1] if lines else f"exit {done.rc}")

    def store_error(self, action: str) -> str:
        """CRIU's first error in the newest criu-ACTION.log of fscr's store ("" if none)."""
        logs = sorted(self.area.store.rglob(f"criu-{action}.log"),
                      key=lambda p: p.stat().st_mtime)
        return criu_error(logs[-1], None) if logs else ""

    def wait_a_little(self) -> None:
        if time.monotonic() > self.deadline:
            raise Timeout(self.stage)
        self.ctx.reaper.reap()
        time.sleep(0.01)

    # --- cleanup -------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Undo everything this run made; returns what had to be removed that fscr or CRIU
        should have removed themselves (their residue)."""
        reaper, residue = self.ctx.reaper, []
        if self.test.hook and not self.cleaned:
            try:
                self.deadline = time.monotonic() + 30
                self.hook("--clean")
            except (Failed, Timeout):
                pass
        if self.cgroup:
            kill_cgroup(self.cgroup, reaper)
        if self.ckpt:
            kill_cgroup(f"/fscr/ckpt_{self.ckpt}", reaper)
        reaper.kill_orphans()
        if self.fscr_killed:  # let fscr finish or undo what its killed run began
            self.deadline = time.monotonic() + 60
            try:
                self.fscr(["gc", "--json"], log="fscr-gc")
            except Timeout:
                pass
        tables, iptables = self.own_locks()
        residue += self.ctx.firewall.undo_since(self.fw_before, tables, iptables)
        for entry in sorted(_tmp_entries() - self.tmp_before):
            shutil.rmtree(entry, ignore_errors=True)
            Path(entry).unlink(missing_ok=True)
        self.keep_logs()
        self.ctx.bed.remove(self.area)
        return residue

    def own_locks(self) -> tuple[set[str], bool]:
        """The network-lock tables this run made (fscr's recorded lock, tables CRIU's logs
        name), and whether its CRIU or its test used iptables."""
        tables = {self.lock} if self.lock else set()
        iptables = any("iptables" in dep for dep in self.test.desc.get("deps", []))
        for src in (self.area.images, self.area.store):
            for log in src.rglob("*.log") if src.exists() else []:
                text = log.read_text(errors="replace")
                tables.update(re.findall(r"CRIU-[0-9a-f-]+", text))
                iptables = iptables or "Running iptables" in text
        return tables, iptables

    def keep_logs(self) -> None:
        """CRIU's logs (from the images, or fscr's store) and the test's output, into the
        log directory, before the area goes."""
        for src in (self.area.images, self.area.store):
            if src.exists():
                for log in src.rglob("*.log"):
                    shutil.copy(log, self.logdir / log.name)
        for suffix in (".out", ".out.inprogress"):
            out = self.area.volume / f"{self.test.name}{suffix}"
            if out.is_file():
                shutil.copy(out, self.logdir / out.name)


def overwrite(volume: Path) -> list[str]:
    """Replace the content of every regular file under `volume` (truncated, then a marker of
    another length): what a restore of the volume must put back. Returns one line per file."""
    done = []
    for dirpath, _, files in os.walk(volume):
        for name in files:
            path = Path(dirpath, name)
            rel = path.relative_to(volume)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue  # fifos, sockets, devices, symlinks: no content of their own
            try:
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    os.write(fd, MOVED)
                finally:
                    os.close(fd)
                done.append(str(rel))
            except OSError as e:
                done.append(f"{rel}: not overwritten ({e.strerror})")
    return done


def image_pids(images: Path) -> list[int]:
    """Every PID of a dumped tree (CRIU writes one core-PID.img per task)."""
    return [int(p.name[5:-4]) for p in images.glob("core-*.img") if p.name[5:-4].isdigit()]


def _tmp_entries() -> set[str]:
    """zdtm* entries of the temporary directory (socket-ext makes one there)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {str(p) for p in tmp.glob("zdtm*")}
