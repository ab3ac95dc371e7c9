"""Security: who may checkpoint what, files fscr creates, and the manifest as untrusted input.

The unprivileged cases run fscr's own code in a child process that dropped to a user the
test creates (fork, setuid): fscr's virtualenv lives under /root, which such a user cannot
reach to start a new interpreter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FSCR, alive, fscr, wait_for, wait_unlinked
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_pipeline import checkpoint, grows, relinks_on

from fscr import pipeline, transfer
from fscr.errors import BadManifest, FscrError
from fscr.process import freezer
from fscr.process.tree import read_stat


@pytest.fixture
def user() -> Iterator[pwd.struct_passwd]:
    name = f"fscrt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True)


def run_as(u: pwd.struct_passwd, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """fscr's command line, run in a child that became user `u`; returns exit code, stderr."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        code = 1
        try:
            # Everything imported first: after setuid, /root (the interpreter's home) is shut.
            import pickle  # noqa: F401

            from fscr.cli import main
            os.setgroups([])
            os.setgid(u.pw_gid)
            os.setuid(u.pw_uid)
            os.environ.update(env)
            sys.argv = ["fscr", *args]
            err = io.StringIO()
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                try:
                    main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
            os.write(w, err.getvalue().encode())
        except BaseException as e:  # shown by the test's assertion
            os.write(w, f"run_as failed: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), err


def _has_cap_sys_resource() -> bool:
    caps = next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("CapEff:"))
    return bool(int(caps, 16) >> 24 & 1)


def test_a_task_of_another_user_is_refused_clearly_where_criu_cannot_dump_it(
        btrfs_volume, workloads, store, user):
    """Root without CAP_SYS_RESOURCE (this machine kind) cannot read another user's resource
    limits, and CRIU needs them: refused before anything is frozen, naming the task. Where
    root has the capability, the same tree is checkpointed."""
    vol = btrfs_volume.path
    pid, _ = workloads.run("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                           "--clear-groups", "sleep", "1000")
    wait_for(lambda: os.stat(f"/proc/{pid}").st_uid == user.pw_uid, what="the drop to the user")
    try:
        out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store,
                   check=False, env=None if _has_cap_sys_resource()
                   else {"FSCR_TEST_KILL_AT": "freeze"})  # refused before the freeze
        if _has_cap_sys_resource():
            assert out.returncode == 0, out.stderr
            return
        assert out.returncode == 15, out.stderr
        assert f"PID {pid} (sleep) runs as uid {user.pw_uid}" in out.stderr
        assert "CAP_SYS_RESOURCE" in out.stderr and alive(pid)
    finally:
        workloads.kill_all()  # before the user fixture removes the user


def test_an_unprivileged_user_is_refused_before_anything_happens(btrfs_volume, workloads, store,
                                                                 user):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    env = {"FSCR_STORE": str(store)}
    for args in (["checkpoint", "--pid", str(pid), "--volume", str(vol)],
                 ["check", "--pid", str(pid), "--volume", str(vol)],
                 ["restore", m["id"], "--replace"], ["delete", m["id"]], ["list"],
                 ["show", m["id"]], ["gc"], ["run", "--", "/bin/true"]):
        code, err = run_as(user, *args, env=env)
        assert (code, "must run as root" in err) == (3, True), (args, code, err)
        assert err.count("\n") == 1
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert os.listdir(store / "checkpoints") == [m["id"]]


@pytest.mark.parametrize("pid_of, text", [
    (lambda: 999999, "no such process"),
    (lambda: 1, "PID 1"),
    (lambda: 2, "kernel thread"),
    (lambda: os.getpid(), "fscr itself or one of its ancestors"),
])
def test_refused_targets(pid_of, text, btrfs_volume, store):
    out = fscr("checkpoint", "--pid", str(pid_of()), "--volume", str(btrfs_volume.path),
               store=store, check=False)
    assert out.returncode == 4 and text in out.stderr, out.stderr
    assert os.listdir(store / "checkpoints") == []


def test_what_fscr_creates_is_root_only_and_relinks_keep_mode_and_owner(btrfs_volume,
                                                                        workloads, store, user):
    vol = btrfs_volume.path
    pid, _ = workloads.start("unlinked0", str(vol), str(1 << 20))
    wait_unlinked(pid, vol / "big")
    os.chown(f"/proc/{pid}/fd/3", user.pw_uid, user.pw_gid)  # a file of another user, 0640
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    snap = Path(m["volumes"][0]["snapshot"])
    for d in (store, store / "checkpoints", store / "checkpoints" / m["id"],
              store / "checkpoints" / m["id"] / "images", snap.parent.parent,
              vol / "lost+found", vol / "lost+found" / "checkpoint"):
        s = d.stat()
        assert (s.st_uid, stat.S_IMODE(s.st_mode)) == (0, 0o700), d
    copy = (snap / "lost+found" / "checkpoint" / m["relinks"][0]["name"]).stat()
    assert (copy.st_uid, copy.st_gid, stat.S_IMODE(copy.st_mode)) == (
        user.pw_uid, user.pw_gid, 0o640)


@pytest.mark.parametrize("plant", ["symlink", "file", "foreign-owner"])
def test_a_planted_relink_directory_is_refused(plant, btrfs_volume, workloads, store, tmp_path,
                                               user):
    vol = btrfs_volume.path
    outside = tmp_path / "outside"
    outside.mkdir()
    (vol / "lost+found").mkdir(mode=0o700)
    target = vol / "lost+found" / "checkpoint"
    if plant == "symlink":
        target.symlink_to(outside)
    elif plant == "file":
        target.write_text("not a directory")
    else:
        target.mkdir()
        os.chown(target, user.pw_uid, user.pw_gid)
    pid, _ = workloads.start("relinked", str(vol))
    wait_for(lambda: (vol / "ready").exists())
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store, check=False)
    assert out.returncode == 15 and "checkpoint in the volume" in out.stderr, out.stderr
    assert os.listdir(outside) == []
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert os.listdir(store / "checkpoints") == []


def test_show_prints_the_digest_a_user_can_check(btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    shown = json.loads(fscr("show", m["id"], "--json", store=store).stdout)
    raw = (store / "checkpoints" / m["id"] / "manifest.json").read_bytes()
    assert shown["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    # show also says whether each snapshot is still there
    assert [v["state"] for v in shown["volumes"]] == ["present"]
    subprocess.run(["btrfs", "subvolume", "delete", m["volumes"][0]["snapshot"]],
                   check=True, capture_output=True)
    text = fscr("show", m["id"], store=store).stdout
    assert f"snapshot {m['volumes'][0]['snapshot']} (missing)" in text
    doctor = fscr("doctor", "--for", m["id"], "--json", store=store, check=False)
    row = next(r for r in json.loads(doctor.stdout)["checks"] if r["name"] == f"volume {vol}")
    assert doctor.returncode == 11 and not row["ok"] and row["detail"].endswith(": missing")


# --- the manifest and the stream as untrusted input: a fuzzer that reaches the validator ---
#
# Each example changes one to four fields of a real checkpoint's manifest (any field, nested
# ones too: tasks, root, lineage, cgroup, netns, volumes, relinks, images, leaks, unchanged),
# or drops, empties or doubles them, and in most examples rewrites the digest as anyone who
# can write the store can. Values come from a list of nasty ones, from a canary (a process in
# a cgroup of its own and a directory, both outside the checkpoint) and from small changes
# to the value that was there. Restore (in-process: 1000 examples fit the suite's time) must
# end in an FscrError or succeed, never a Python error, and the canary must stay untouched.
# FSCR_FUZZ_EXAMPLES sets the count (`scripts/test --long` runs many more).

FUZZ_EXAMPLES = int(os.environ.get("FSCR_FUZZ_EXAMPLES", "1000"))
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])


def _walk(obj, path=()):  # noqa: ANN001, ANN202
    """Every (path, value) of the JSON, inner nodes included (so lists and records can be
    replaced, emptied or doubled whole)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


NASTY = st.one_of(
    st.sampled_from(["/", "/etc", "/etc/passwd", "../../etc", "/tmp/../etc", "x/../../y",
                     "..", "/proc/1/root", "unlink-at-restart-evil-0", "file[0:0]", "", ".",
                     "/sys/fs/cgroup/unified", "/system.slice/sshd.service", "/fscr",
                     "/fscr/ckpt_x", "/fscr/restored_x", "/init.scope", -1, 0, 1, 2 ** 63,
                     2 ** 64, None, True, 1.5, float("inf"), "a" * 5000, "\x00", "/a\x00b",
                     "\udc80", "\ud800", "0" * 64, "f" * 64, [], {}, [[[]]],
                     "2026-12-04T10:00:00", "v1", "host", "external", "own", "kill",
                     "freeze-only", "none", "lvm", "CRIU-0123456789abcdef01234"]),
    st.text(max_size=40), st.integers(), st.binary(max_size=20).map(os.fsdecode))


@dataclass
class Canary:
    """Outside the checkpoint: a process in a cgroup of its own, and a directory."""

    pid: int
    starttime: int
    cgroup: str
    dir: Path

    def values(self) -> list:
        return [self.pid, self.starttime, self.cgroup, str(self.dir), str(self.dir / "f"),
                {"pid": self.pid, "starttime": self.starttime},
                [{"pid": self.pid, "starttime": self.starttime}],
                {"kind": "v2", "path": self.cgroup, "original": self.cgroup}]

    def state(self) -> tuple:
        cg = freezer.at(self.cgroup)
        files = {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
                 for p in sorted(self.dir.rglob("*"))}
        return (alive(self.pid), read_stat(self.pid), cg.exists() and cg.frozen(),
                freezer.cgroup_of(self.pid).rel, files, self.dir.stat().st_mode)


@pytest.fixture
def canary(workloads, tmp_path) -> Canary:  # noqa: ANN001
    d = tmp_path / "canary"
    d.mkdir()
    (d / "f").write_text("untouched")
    pid, _ = workloads.run("sleep", "100000")
    return Canary(pid, read_stat(pid).starttime, freezer.cgroup_of(pid).rel, d)


def _mutate(doc, data, canary: Canary):  # noqa: ANN001, ANN202
    """Change one to four places of `doc` (in place); returns the paths changed."""
    changed = []
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        nodes = [p for p, _ in _walk(doc) if p]
        if not nodes:  # everything dropped already
            break
        where = data.draw(st.sampled_from(nodes), label="where")
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        old = parent[where[-1]]
        how = data.draw(st.sampled_from(["nasty", "canary", "nudge", "drop", "empty",
                                         "double"]), label="how")
        if how == "drop":
            del parent[where[-1]]
        elif how == "empty":
            parent[where[-1]] = type(old)() if isinstance(old, (list, dict, str)) else None
        elif how == "double":
            parent[where[-1]] = [old, old] if not isinstance(old, list) else old + old
        elif how == "canary":
            parent[where[-1]] = data.draw(st.sampled_from(canary.values()), label="canary")
        elif how == "nudge" and isinstance(old, bool):
            parent[where[-1]] = not old
        elif how == "nudge" and isinstance(old, int):
            parent[where[-1]] = old + data.draw(st.sampled_from([-1, 1, 2 ** 32]))
        elif how == "nudge" and isinstance(old, str):
            parent[where[-1]] = old + data.draw(st.sampled_from(["x", "/..", "\n", "-0"]))
        else:
            parent[where[-1]] = data.draw(NASTY, label="value")
        changed.append((how, where))
    return changed


@pytest.fixture
def signed_checkpoint(btrfs_volume, workloads, store):  # noqa: ANN001, ANN201
    vol = btrfs_volume.path
    pid, _ = workloads.start("service", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    d = store / "checkpoints" / m["id"]
    return pid, vol, store, d, (d / "manifest.json").read_bytes()


def _state(vol: Path) -> dict:
    out = {}
    for p in sorted(vol.rglob("*")):
        if p.is_file() and p.name != "history":  # the live workload appends to history
            out[str(p)] = p.read_bytes()
        elif not p.is_file():
            out[str(p)] = p.is_dir()
    return out


# Cgroups a tampered manifest or stream could name (other than the canary's): a restore that
# created, froze, thawed or removed one shows here. Not every cgroup of the machine: other
# runs on this machine come and go meanwhile.
NAMED_CGROUPS = ["/", "/fscr", "/fscr/ckpt_x", "/fscr/restored_x", "/system.slice",
                 "/system.slice/sshd.service", "/init.scope", "/etc", "/tmp"]


def _cgroups(*ids: str) -> dict[str, tuple[bool, bool]]:
    out = {}
    for rel in NAMED_CGROUPS + [f"/fscr/{p}{i}" for i in ids for p in ("ckpt_", "restored_")]:
        cg = freezer.at(rel)
        out[rel] = (cg.exists(), cg.exists() and rel != "/" and cg.frozen())
    return out


def _sign(d: Path, raw: bytes) -> None:
    (d / "manifest.json").write_bytes(raw)
    (d / "manifest.json.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


@fuzz_settings
@given(data=st.data())
def test_restore_of_any_tampered_manifest_is_one_error_and_touches_nothing_outside(
        signed_checkpoint, canary, data):  # noqa: ANN001
    pid, vol, store, d, raw = signed_checkpoint
    doc = json.loads(raw)
    _mutate(doc, data, canary)
    try:
        tampered = json.dumps(doc, indent=2).encode() + b"\n"
    except (ValueError, UnicodeEncodeError):  # e.g. a lone surrogate: write it as escaped
        tampered = json.dumps(doc, indent=2, ensure_ascii=True).encode() + b"\n"
    if tampered == raw:
        return
    resign = data.draw(st.integers(0, 9), label="resign") != 0  # most examples: re-signed
    before = _state(vol), canary.state(), _cgroups(d.name)
    try:
        (d / "manifest.json").write_bytes(tampered)
        if resign:  # someone who can write the store can also rewrite the digest
            _sign(d, tampered)
        try:
            r = pipeline.restore(d.name, str(store))
        except FscrError as e:
            r = None
            event(f"{type(e).__name__}: {str(e)[:60]}")  # --hypothesis-show-statistics
            assert resign or isinstance(e, BadManifest), e  # unsigned: the digest catches it
    finally:
        _sign(d, raw)
    if r is not None:  # e.g. made freeze-only: its volumes restored, nothing else touched
        assert r.pid is None and resign, r
        for name in r.rescues:
            pipeline.delete(name, str(store))
        before = _state(vol), *before[1:]
    assert (_state(vol), canary.state(), _cgroups(d.name)) == before and alive(pid)
    assert relinks_on(vol) == [] and not list(vol.parent.glob(".fscr-snapshots/rescue_*"))
    assert os.listdir(store / "journal") == []


def test_replace_never_kills_what_a_tampered_manifest_names(signed_checkpoint, canary):
    """The issue's attack, with --replace, through the command line: tasks, root and
    lineage name the canary, its cgroup is the canary's (path == original), re-signed. Nothing
    of the canary is touched; the restore goes on with the tree this host recorded."""
    pid, vol, store, d, raw = signed_checkpoint
    doc = json.loads(raw)
    me = {"pid": canary.pid, "starttime": canary.starttime}
    doc["tasks"], doc["root"], doc["lineage"] = [me], me, me
    for cg in (canary.cgroup, "/"):
        doc["cgroup"] |= {"path": cg, "original": cg}
        _sign(d, json.dumps(doc, indent=2).encode() + b"\n")
        before = canary.state()
        out = fscr("restore", d.name, "--replace", store=store, check=False)
        assert "Traceback" not in out.stderr and canary.state() == before, out.stderr
    _sign(d, raw)


# Streams: the records of a real send, mutated (headers, the manifest inside, payload bytes,
# records dropped, doubled or reordered, the stream cut), the end digest recomputed in most
# examples. receive must end in an FscrError (or succeed), and leave nothing: no checkpoint,
# no journal, no snapshot, the canary untouched.

def _records(raw: bytes) -> list[list]:
    from test_bad_input import parse_stream
    return [[json.loads(line), payload] for line, payload in parse_stream(raw)]


@pytest.fixture
def stream(btrfs_volume, workloads, store):  # noqa: ANN001, ANN201
    """A sent checkpoint whose source is deleted (so a receive writes its snapshot again)."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    raw = subprocess.run([str(FSCR), "send", m["id"]], capture_output=True, check=True,
                         env=os.environ | {"FSCR_STORE": str(store)}).stdout
    fscr("delete", m["id"], store=store)
    return Stream(vol, store, _records(raw))


@dataclass
class Stream:
    vol: Path
    store: Path
    records: list = field(repr=False)  # megabytes of images: not in a failure's report

    def __iter__(self):  # noqa: ANN204
        return iter((self.vol, self.store, self.records))


@fuzz_settings
@given(data=st.data())
def test_receive_of_any_tampered_stream_is_one_error_and_leaves_nothing(stream, canary, data,
                                                                       tmp_path):
    from test_bad_input import build_stream, header
    vol, store, records = stream
    recs = [[dict(h), p] for h, p in records]
    how = data.draw(st.sampled_from(["header", "manifest", "payload", "drop", "double",
                                     "swap", "cut"]), label="how")
    i = data.draw(st.integers(0, len(recs) - 1), label="record")
    if how == "header":
        _mutate(recs[i][0], data, canary)
    elif how == "manifest":
        doc = json.loads(recs[0][1])
        _mutate(doc, data, canary)
        recs[0][1] = json.dumps(doc, indent=2, ensure_ascii=True).encode() + b"\n"
    elif how == "payload" and recs[i][1]:
        at = data.draw(st.integers(0, len(recs[i][1]) - 1), label="byte")
        b = bytearray(recs[i][1])
        b[at] ^= data.draw(st.integers(1, 255), label="xor")
        recs[i][1] = bytes(b)
    elif how == "drop":
        del recs[i]
    elif how == "double":
        recs.insert(i, recs[i])
    elif how == "swap":
        j = data.draw(st.integers(0, len(recs) - 1), label="other")
        recs[i], recs[j] = recs[j], recs[i]
    try:
        lines = [(header(**h) if isinstance(h, dict) else
                  json.dumps(h, ensure_ascii=True).encode() + b"\n", p) for h, p in recs]
    except TypeError:  # a key that is not a string: send it as the raw JSON it would be
        lines = [(json.dumps(h, ensure_ascii=True).encode() + b"\n", p) for h, p in recs]
    blob = build_stream(lines, sign=data.draw(st.integers(0, 9), label="resign") != 0)
    if how == "cut":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="cut")]
    there = tmp_path / "there"
    snaps = vol.parent / ".fscr-snapshots"
    ckpt = json.loads(records[0][1])["id"]
    before = canary.state(), _cgroups(ckpt), sorted(os.listdir(snaps)) if snaps.exists() else []
    try:
        got = transfer.receive(io.BytesIO(blob), store_dir=str(there))
    except FscrError as e:
        event(f"{type(e).__name__}: {str(e)[:60]}")
    else:  # a stream changed where nothing checks it (a duration): received whole
        pipeline.delete(got.id, str(there))
    after = canary.state(), _cgroups(ckpt), sorted(os.listdir(snaps)) if snaps.exists() else []
    assert after == before
    assert os.listdir(there / "checkpoints") == [] and os.listdir(there / "journal") == []
