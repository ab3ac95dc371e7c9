"""Every input a user, a job file, a stream or a store can hold gets one error line and its
exit code (docs/exit-codes.md), never a traceback, and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import FSCR, alive, fscr, said, sh, wait_for
from test_pipeline import checkpoint, grows, relinks_on

from fscr.names import FSCR_GROUP
from fscr.process import freezer


def one_line(out: subprocess.CompletedProcess, code: int, text: str) -> None:
    """Exit `code`, and stderr (its progress lines aside) is one line saying `text`."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = said(out.stderr)
    assert (out.returncode, len(lines), text in "".join(lines)) == (code, 1, True), (
        out.returncode, out.stderr)


def fscr_groups() -> set[str]:
    parent = freezer.at(FSCR_GROUP).path
    return {p.name for p in parent.iterdir() if p.is_dir()} if parent.exists() else set()


def job(tmp_path: Path, body: str | bytes, name: str = "app.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    return p


GOOD_JOB = '[target]\nname = "app"\n[snapshot]\nvolumes = ["/srv/app"]\n'


# --- arguments, job files and the store: no checkpoint needed ----------------------------

@pytest.mark.parametrize("args, code, text", [
    (["checkpoint", "--pid", "1", "--volume", "/x", "--max-freeze", "1e10"], 2, "--max-freeze"),
    (["checkpoint", "--pid", "1", "--volume", "/x", "--max-freeze", "inf"], 2, "--max-freeze"),
    (["checkpoint", "--pid", "1", "--volume", "/x", "--max-freeze", "nan"], 2, "not a number"),
    (["checkpoint", "--pid", "1", "--volume", ""], 5, "volume is the empty string"),
    (["check", "--pid", "1", "--volume", ""], 5, "volume is the empty string"),
    (["checkpoint", "--pid", "1", "--volume", os.fsdecode(b"/tmp/\xff")], 5, "is not UTF-8"),
    (["restore"], 2, "Missing argument"),
    (["checkpoint", "--pid", "1", "--volume", "/x", "--id", ""], 16, "invalid checkpoint id"),
    (["checkpoint", "--pid", "1", "--volume", "/tmp/a\nb"], 5, "/tmp/a\\nb is not"),
])
def test_bad_arguments_get_one_line(args, code, text, store):
    one_line(fscr(*args, store=store, check=False), code, text)
    assert not (store / "checkpoints").exists() or os.listdir(store / "checkpoints") == []


def test_a_cgroup_path_leading_out_of_the_hierarchy_is_no_cgroup(btrfs_volume, workloads, store,
                                                                 tmp_path):
    """"..", relative or after the hierarchy's own path, never reaches a directory outside it
    (fscr would write cgroup.freeze there), even one holding a cgroup.procs file."""
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    root = freezer.at("/").path
    up = "../" * len(root.parts[1:])
    for path in (f"{up}{str(tmp_path).lstrip('/')}", f"{root}/{up}{str(tmp_path).lstrip('/')}"):
        one_line(fscr("checkpoint", "--cgroup", path, "--volume", str(btrfs_volume.path),
                      store=store, check=False), 4, "no such cgroup")
    assert sorted(os.listdir(tmp_path)) == sorted(["cgroup.procs", "mnt", "btrfs.img", "store"])
    pid, _ = workloads.run("sleep", "1000")  # a real one, relative, absolute, with "..": found
    rel = freezer.cgroup_of(pid).rel
    for path in (rel, f"{root}{rel}", f"{rel}/../{rel.rsplit('/', 1)[1]}"):
        out = fscr("check", "--cgroup", path, "--volume", str(btrfs_volume.path), store=store,
                   check=False)
        assert out.returncode == 0 and "would checkpoint" in out.stdout, (path, out.stderr)


@pytest.mark.parametrize("where", ["file", "missing-parent", "under-a-file", "symlink",
                                   "foreign-owner"])
def test_a_store_fscr_cannot_use_is_one_line_on_every_command(where, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    store = {"file": afile, "missing-parent": Path("/proc/nonexistent/store"),
             "under-a-file": afile / "store", "symlink": tmp_path / "link",
             "foreign-owner": tmp_path / "theirs"}[where]
    if where == "symlink":
        (tmp_path / "real").mkdir()
        store.symlink_to(tmp_path / "real")
    if where == "foreign-owner":
        store.mkdir(mode=0o755)
        os.chown(store, 65534, 65534)
    for args in (["list"], ["gc"], ["show", "x"], ["restore", "x"], ["delete", "x"]):
        one_line(fscr(*args, store=store, check=False), 16, "store: ")
    if where == "foreign-owner":  # refused, not chmod-ed and taken over
        s = store.stat()
        assert (s.st_uid, stat.S_IMODE(s.st_mode)) == (65534, 0o755)
        assert os.listdir(store) == []
    if where == "symlink":
        assert os.listdir(tmp_path / "real") == []


def test_a_read_only_store_is_read_and_refused_for_writing(tmp_path):
    """A store on a read-only filesystem (a backup disk): list reads it; commands that write
    say so in one line."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    try:
        store = mnt / "store"
        fscr("list", store=store)
        sh("mount", "-o", "remount,ro", str(mnt))
        assert fscr("list", "--json", store=store).returncode == 0
        one_line(fscr("show", "x", store=store, check=False), 6, "no checkpoint x")
        for args in (["gc"], ["delete", "x"], ["restore", "x"],
                     ["checkpoint", "--pid", "1", "--volume", str(tmp_path)]):
            one_line(fscr(*args, store=store, check=False), 16, "is read-only here")
        one_line(subprocess.run([str(FSCR), "receive"], input="", capture_output=True,
                                text=True, env=os.environ | {"FSCR_STORE": str(store)}),
                 16, "is read-only here")
    finally:
        sh("umount", str(mnt))


@pytest.mark.parametrize("body, text", [
    (b"\xff\xfe[target]\n", "not UTF-8"),
    ('store = "/tmp/\\u0000x"\n' + GOOD_JOB, "key store: holds a NUL byte"),
    ('[target]\nname = "app"\n[snapshot]\nvolumes = ["/srv/\\u0000"]\n', "key snapshot.volumes.0"),
    ('[target]\nname = "app"\n[snapshot]\nvolumes = [""]\n', "key snapshot.volumes.0"),
    ('[target]\npid_file = "/run/\\u0000"\n[snapshot]\nvolumes = ["/x"]\n', "target.pid_file"),
    ('[target]\nname = "app\\n"\n[snapshot]\nvolumes = ["/x"]\n', "key target.name"),  # not $
    ('[target]\nname = "app"\n', "key snapshot: required"),
])
def test_a_bad_job_file_is_one_line(body, text, tmp_path):
    p = job(tmp_path, body)
    for args in (["backup", str(p)], ["prune", str(p)],
                 ["schedule", "install", str(p), "--every", "1h", "--dest", str(tmp_path)]):
        one_line(fscr(*args, check=False), 16, text)
    assert sorted(os.listdir(tmp_path)) == ["app.toml"]


@pytest.mark.parametrize("every, kind, text", [
    ("²m", "cron", "use a number"),
    ("0m", "systemd", "use a number"),
    ("1.5h", "systemd", "use a number"),
    ("9999999d", "systemd", "use a number"),
    ("61m", "cron", "cron cannot run that evenly"),
    ("25h", "cron", "cron cannot run that evenly"),
    ("7m", "cron", "cron cannot run that evenly"),
    ("2d", "cron", "cron cannot run that evenly"),
])
def test_schedule_refuses_an_interval_it_would_write_wrong(every, kind, text, tmp_path, store):
    p = job(tmp_path, GOOD_JOB)
    dest = tmp_path / "units"
    dest.mkdir()
    one_line(fscr("schedule", "install", str(p), "--every", every, f"--{kind}", "--dest",
                  str(dest), check=False), 16, text)
    assert os.listdir(dest) == []


@pytest.mark.parametrize("every, systemd, cron", [
    ("61m", "OnUnitActiveSec=61min", None),
    ("120m", "OnUnitActiveSec=2h", "0 */2 * * *"),
    ("25h", "OnUnitActiveSec=25h", None),
    ("48h", "OnUnitActiveSec=2d", None),
    ("20m", "OnUnitActiveSec=20min", "*/20 * * * *"),
    ("24h", "OnUnitActiveSec=1d", "0 0 * * *"),
])
def test_schedule_writes_exactly_the_interval_asked(every, systemd, cron, tmp_path):
    p = job(tmp_path, GOOD_JOB)
    for kind, want in (("systemd", systemd), ("cron", cron)):
        dest = tmp_path / kind
        dest.mkdir()
        out = fscr("schedule", "install", str(p), "--every", every, f"--{kind}", "--dest",
                   str(dest), check=False)
        if want is None:
            one_line(out, 16, "cron cannot run that evenly")
            continue
        assert out.returncode == 0, out.stderr
        text = "".join(f.read_text() for f in sorted(dest.iterdir()))
        assert want in text, text


def test_schedule_into_a_missing_directory_is_one_line(tmp_path):
    p = job(tmp_path, GOOD_JOB)
    one_line(fscr("schedule", "install", str(p), "--every", "1h", "--dest",
                  str(tmp_path / "missing"), check=False), 16, "is not a directory")
    assert not (tmp_path / "missing").exists()


def _cron_command(line: str) -> str:
    """The command of a cron.d line as cron runs it: after the five times and the user, with
    "\\%" made "%" (an unescaped "%" ends the command: crontab(5))."""
    cmd = line.split(None, 6)[6]
    out, escaped = [], False
    for ch in cmd:
        if escaped:
            out.append(ch if ch == "%" else "\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            break
        else:
            out.append(ch)
    return "".join(out)


@pytest.mark.parametrize("name", ["my jobs/app.toml", "a%qb/app.toml",
                                  "it's $HOME \"x\"/app.toml", "back\\slash/app.toml"])
def test_a_job_path_reaches_cron_and_systemd_as_one_word(name, tmp_path):
    """The cron line is run by /bin/sh as cron would run it, with a stand-in for fscr that
    prints its arguments: the job path arrives whole. The unit passes systemd-analyze verify
    (which rejects an unknown %-specifier) and its ExecStart splits into the same words."""
    p = job(tmp_path, GOOD_JOB, name)
    dest = tmp_path / "cron"
    dest.mkdir()
    fscr("schedule", "install", str(p), "--every", "1h", "--cron", "--dest", str(dest))
    line = (dest / "fscr-backup-app").read_text().splitlines()[-1]
    cmd = _cron_command(line)
    argv0 = shlex.split(cmd)[0]
    cmd = cmd.replace(shlex.quote(argv0), "printf '%s\\n'", 1)
    got = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, check=True)
    assert got.stdout.splitlines() == ["backup", "--quiet", str(p)]

    dest = tmp_path / "systemd"
    dest.mkdir()
    fscr("schedule", "install", str(p), "--every", "1h", "--systemd", "--dest", str(dest))
    unit = (dest / "fscr-backup-app.service").read_text()
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    words = [w.replace("%%", "%").replace("$$", "$")
             for w in shlex.split(exec_start.removeprefix("ExecStart="))]
    assert words[1:] == ["backup", "--quiet", str(p)]
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(dest / "fscr-backup-app.service"),
                                str(dest / "fscr-backup-app.timer")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_a_newline_in_a_job_path_is_refused_for_units_and_cron(tmp_path):
    p = job(tmp_path, GOOD_JOB, "evil\n* * * * * root rm -rf x\n/app.toml")
    for kind in ("cron", "systemd"):
        dest = tmp_path / kind
        dest.mkdir()
        one_line(fscr("schedule", "install", str(p), "--every", "1h", f"--{kind}", "--dest",
                      str(dest), check=False), 16, "newline in a path")
        assert os.listdir(dest) == []


def test_run_in_a_file_that_is_no_namespace_leaves_no_cgroup():
    before = fscr_groups()
    one_line(fscr("run", "--netns", "/etc/passwd", "--", "sleep", "100", check=False), 16,
             "is not a network namespace")
    one_line(fscr("run", "--netns", "/etc/passwd", "--pidns", "--", "sleep", "100",
                  check=False), 16, "is not a network namespace")
    # only run_* groups are `fscr run`'s (other suites on the machine may come and go)
    assert {g for g in fscr_groups() - before if g.startswith("run_")} == set()


# --- records under the store --------------------------------------------------------------

def test_damaged_records_under_the_store_are_warnings_or_one_line(store):
    fscr("list", store=store)  # creates the store
    (store / "rescues" / "rescue_x_20260101T000000Z_abcd.json").write_text(
        '{"name": "rescue_x_20260101T000000Z_abcd", "paths": ["/a\\u0000"], "kind": "btrfs"}')
    (store / "rescues" / "junk.json").write_bytes(b"\xff[[[")
    # Whole, but of a format version this fscr does not know (a newer fscr's).
    (store / "rescues" / "rescue_y_20260101T000000Z_abcd.json").write_text(
        '{"version": 2, "name": "rescue_y_20260101T000000Z_abcd", "paths": ["/a"], '
        '"kind": "btrfs"}')
    (store / "lineages").mkdir(exist_ok=True)
    (store / "lineages" / "1_x.json").write_text("[]")
    (store / "lineages" / "12_34.json").write_text('{"version": 1, "boot": 5, "tasks": "x"}')
    out = fscr("list", "--json", store=store)
    assert json.loads(out.stdout)["rescues"] == []
    assert out.stderr.count("warning: rescue record") == 3 and "Traceback" not in out.stderr
    one_line(fscr("delete", "rescue_x_20260101T000000Z_abcd", store=store, check=False), 6,
             "no rescue snapshot")
    # A journal whose begin line lacks its PID, and one with a PID that is a string.
    (store / "journal" / "c1.checkpoint.7.jsonl").write_text(
        '{"event": "begin", "op": "checkpoint", "id": "c1", "starttime": 0}\n')
    (store / "journal" / "c2.restore.8.jsonl").write_text(
        '{"event": "begin", "op": "restore", "id": "c2", "pid": "8", "starttime": 0}\n'
        '{"event": "swap"}\n')
    out = fscr("gc", store=store, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.count("is damaged") == 2, out.stdout
    assert sorted(os.listdir(store / "journal")) == ["c1.checkpoint.7.jsonl",
                                                     "c2.restore.8.jsonl"]
    out = fscr("list", store=store)
    assert "2 unfinished run(s)" in out.stderr and "Traceback" not in out.stderr


# --- what a checkpoint records ------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_refused_before_the_freeze(btrfs_volume, workloads,
                                                                   store, tmp_path):
    """The tree runs a binary whose name is not UTF-8: a manifest cannot record it (nor a
    restore check it), so the checkpoint is refused before anything is frozen or made."""
    vol = btrfs_volume.path
    exe = os.fsdecode(bytes(tmp_path) + b"/sl\xffeep")
    shutil.copy("/bin/sleep", exe)
    pid, _ = workloads.run(exe, "1000")
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store,
               check=False, env={"FSCR_TEST_KILL_AT": "freeze"})  # it never gets there
    one_line(out, 15, "cannot record")
    assert alive(pid) and not freezer.cgroup_of(pid).frozen()
    assert os.listdir(store / "checkpoints") == [] and os.listdir(store / "journal") == []
    assert relinks_on(vol) == [] and not (vol.parent / ".fscr-snapshots").exists()


def test_a_leak_longer_than_a_manifest_field_is_recorded_cut(btrfs_volume, workloads, store,
                                                            tmp_path):
    deep = tmp_path
    while len(str(deep)) < 4090:  # "fd 3 DEEP/f" is longer than 4096, DEEP/f shorter
        deep = deep / ("d" * min(200, 4089 - len(str(deep))))
    deep.mkdir(parents=True)
    (deep / "f").write_text("outside")
    vol = btrfs_volume.path
    pid, _ = workloads.run("/bin/sh", "-c", f"exec 3<>'{deep / 'f'}'; exec sleep 1000")
    wait_for(lambda: any(os.readlink(f"/proc/{pid}/fd/{n}").endswith("/f")
                         for n in os.listdir(f"/proc/{pid}/fd")))
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--allow",
                   "external-files")
    leak = next(x for x in m["leaks"] if x["kind"] == "external-files")
    assert len(leak["what"]) == 4096 and leak["what"].startswith(f"fd 3 {tmp_path}")


@pytest.mark.parametrize("plant", ["symlink", "foreign-owner"])
def test_a_planted_snapshot_directory_is_refused_not_chmoded(plant, btrfs_volume, workloads,
                                                             store, tmp_path):
    vol = btrfs_volume.path
    snaps = vol.parent / ".fscr-snapshots"
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    if plant == "symlink":
        snaps.symlink_to(outside)
    else:
        snaps.mkdir(mode=0o755)
        os.chown(snaps, 65534, 65534)
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    out = fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store, check=False)
    one_line(out, 15, "refusing to use it")
    mine = snaps if plant == "foreign-owner" else outside
    s = mine.stat()
    assert (s.st_uid, stat.S_IMODE(s.st_mode)) == ((65534 if plant == "foreign-owner" else 0),
                                                   0o755)
    assert os.listdir(mine) == [] and os.listdir(store / "checkpoints") == []
    assert alive(pid) and not freezer.cgroup_of(pid).frozen() and relinks_on(vol) == []


def _resign(d: Path, doc: dict) -> None:
    raw = json.dumps(doc, indent=2).encode() + b"\n"
    (d / "manifest.json").write_bytes(raw)
    (d / "manifest.json.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


@pytest.fixture
def made(btrfs_volume, workloads, store):  # noqa: ANN001, ANN201
    """A checkpoint of a running counter: (pid, volume, checkpoint dict, its directory)."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    return pid, vol, m, store / "checkpoints" / m["id"]


@pytest.mark.parametrize("field, value, text", [
    (("unchanged", 0, "path"), "/usr/bin/\x00x", "holds a NUL byte"),
    (("unchanged", 0, "path"), "/usr/bin/\udc80x", "JSON is malformed"),
    (("volumes", 0, "path"), "/srv/\ud800", "JSON is malformed"),
    (("created",), "2026-12-04T10:00:00", "has no time zone"),
    (("created",), "yesterday", "not an ISO 8601 time"),
    (("images", 0, "name"), ["core-1.img"], "Expected `str`"),
    (("hostname",), "h" * 300, "length <= 255"),
])
def test_a_resigned_manifest_with_a_bad_value_is_one_line(field, value, text, made, store):
    pid, vol, m, d = made
    doc = json.loads((d / "manifest.json").read_bytes())
    obj = doc
    for k in field[:-1]:
        obj = obj[k]
    obj[field[-1]] = value
    _resign(d, doc)
    for args in (["restore", m["id"], "--replace"], ["show", m["id"]], ["send", m["id"]]):
        out = fscr(*args, store=store, check=False)
        one_line(out, 9, text)
    out = fscr("list", "--json", store=store)  # a bad checkpoint is not listed, not a crash
    assert json.loads(out.stdout)["checkpoints"] == [] and "Traceback" not in out.stderr
    assert alive(pid) and relinks_on(vol) == []


def test_prune_skips_a_received_checkpoint_with_a_naive_date(made, store, tmp_path):
    pid, vol, m, d = made
    doc = json.loads((d / "manifest.json").read_bytes())
    doc["created"], doc["job"] = "2026-12-04T10:00:00", "app"
    _resign(d, doc)
    p = job(tmp_path, f'store = "{store}"\n' + GOOD_JOB + "[retention]\nkeep_last = 1\n")
    out = fscr("prune", str(p), "--json")
    assert json.loads(out.stdout)["remove"] == [] and "Traceback" not in out.stderr
    assert (d / "manifest.json").exists()


# --- streams -------------------------------------------------------------------------------

def parse_stream(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(header line, payload) of every record of a stream, the end record left out."""
    assert raw.startswith(b"FSCR-STREAM 1\n")
    pos, out = len(b"FSCR-STREAM 1\n"), []
    while True:
        nl = raw.index(b"\n", pos)
        line, pos = raw[pos:nl + 1], nl + 1
        if json.loads(line)["type"] == "end":
            return out
        payload = bytearray()
        while n := int.from_bytes(raw[pos:pos + 8], "big"):
            payload += raw[pos + 8:pos + 8 + n]
            pos += 8 + n
        pos += 8
        out.append((line, bytes(payload)))


def build_stream(records: list[tuple[bytes, bytes]], sign: bool = True) -> bytes:
    out = bytearray(b"FSCR-STREAM 1\n")
    for line, payload in records:
        out += line
        for i in range(0, len(payload), 1 << 20):
            chunk = payload[i:i + (1 << 20)]
            out += len(chunk).to_bytes(8, "big") + chunk
        out += (0).to_bytes(8, "big")
    digest = hashlib.sha256(out).hexdigest() if sign else "0" * 64
    return bytes(out) + json.dumps({"type": "end", "sha256": digest}).encode() + b"\n"


def header(**h: object) -> bytes:
    return json.dumps(h, sort_keys=True).encode() + b"\n"


@pytest.fixture
def sent(made, store, tmp_path):  # noqa: ANN001, ANN201
    """The records of a sent checkpoint, whose snapshot is gone here (deleted after the
    send), so a receive writes one again: (records, volume, checkpoint id)."""
    pid, vol, m, d = made
    raw = subprocess.run([str(FSCR), "send", m["id"]], capture_output=True, check=True,
                         env=os.environ | {"FSCR_STORE": str(store)}).stdout
    fscr("delete", m["id"], store=store)
    return parse_stream(raw), vol, m["id"]


def receive_bytes(store: Path, data: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FSCR), "receive"], input=data.decode("latin-1"),
                          capture_output=True, text=True, encoding="latin-1",
                          env=os.environ | {"FSCR_STORE": str(store)})


def nothing_received(store: Path, vol: Path, ckpt: str) -> None:
    assert os.listdir(store / "checkpoints") == [] and os.listdir(store / "journal") == []
    assert not (vol.parent / ".fscr-snapshots" / ckpt).exists()


def _with(records: list[tuple[bytes, bytes]], kind: str, new: bytes | None = None,
          payload: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """The records with the first of type `kind` given a new header line or payload."""
    out, done = [], False
    for line, data in records:
        if not done and json.loads(line)["type"] == kind:
            line, data, done = new or line, data if payload is None else payload, True
        out.append((line, data))
    return out


@pytest.mark.parametrize("case, code, text", [
    ("image name a list", 18, "a record header is invalid at image.name"),
    ("parent a number", 18, "a record header is invalid at volume.parent"),
    ("deeply nested", 18, "a record header is invalid"),
    # keys come sorted, "name" before "type": the value is skipped, deeply, to find the type
    ("deeply nested before its type", 18, "a record header is invalid at (top): JSON nested"),
    ("image name ends in a newline", 18, "a record header is invalid at image.name"),
    ("unknown record", 18, "a record header is invalid"),
    ("btrfs receive dies", 18, "btrfs receive of volume"),
    ("bad end digest", 18, "sha256 does not match"),
])
def test_a_bad_stream_is_one_line_and_leaves_nothing(case, code, text, sent, tmp_path):
    records, vol, ckpt = sent
    change = {
        "image name a list": lambda r: _with(r, "image", header(type="image", name=["x"])),
        "parent a number": lambda r: _with(r, "volume", header(type="volume", n=0, parent=5)),
        "deeply nested": lambda r: _with(r, "image", b'{"type": "image", "name": '
                                         + b"[" * 1500 + b"]" * 1500 + b"}\n"),
        "deeply nested before its type": lambda r: _with(
            r, "image", b'{"name": ' + b"[" * 2000 + b"]" * 2000 + b', "type": "image"}\n'),
        "image name ends in a newline": lambda r: _with(r, "image",
                                                        header(type="image", name="core.img\n")),
        "unknown record": lambda r: _with(r, "image", header(type="evil", name="x")),
        # btrfs receive reads the stream's magic, finds zeros, and exits: the rest of the
        # payload meets a closed pipe.
        "btrfs receive dies": lambda r: _with(r, "volume", payload=bytes(8 << 20)),
        "bad end digest": lambda r: r,
    }[case]
    data = build_stream(change(records), sign=case != "bad end digest")
    there = tmp_path / "there"
    one_line(receive_bytes(there, data), code, text)
    nothing_received(there, vol, ckpt)


def test_receiving_an_existing_checkpoint_is_exit_16_like_checkpoint(made, store):
    pid, vol, m, d = made
    raw = subprocess.run([str(FSCR), "send", m["id"]], capture_output=True, check=True,
                         env=os.environ | {"FSCR_STORE": str(store)}).stdout
    one_line(receive_bytes(store, raw), 16, f"checkpoint id {m['id']} already exists")
    one_line(fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), "--id", m["id"],
                  store=store, check=False), 16, f"checkpoint id {m['id']} already exists")


def test_a_full_disk_while_receiving_images_is_no_space(sent, tmp_path):
    records, vol, ckpt = sent
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(small))
    try:
        one_line(receive_bytes(small / "store", build_stream(records)), 12, "no space")
        nothing_received(small / "store", vol, ckpt)
    finally:
        sh("umount", str(small))


def test_receive_beside_a_volume_whose_parent_is_not_btrfs_is_refused(sent, tmp_path):
    # The btrfs provider asks libbtrfsutil: a tmpfs stacked on the volume's parent hides the
    # btrfs filesystem there, as a destination machine that has not mounted it would.
    records, vol, ckpt = sent
    sh("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(vol.parent))
    try:
        one_line(receive_bytes(tmp_path / "there", build_stream(records)), 18,
                 f"{vol.parent} is not on a btrfs filesystem (tmpfs)")
        assert os.listdir(vol.parent) == []
    finally:
        sh("umount", str(vol.parent))
    nothing_received(tmp_path / "there", vol, ckpt)


def test_an_lvm_checkpoint_does_not_travel_in_a_stream(made, store, tmp_path):
    # No device-mapper on this kernel: a btrfs checkpoint's manifest re-signed as an LVM one
    # (send and receive refuse on the manifest, before any snapshot is touched).
    pid, vol, m, d = made
    raw = subprocess.run([str(FSCR), "send", m["id"]], capture_output=True, check=True,
                         env=os.environ | {"FSCR_STORE": str(store)}).stdout
    doc = json.loads((d / "manifest.json").read_bytes())
    doc["snapshot"] = "lvm"
    doc["volumes"][0]["snapshot"] = f"/dev/vg0/fscr_{m['id']}_0"
    _resign(d, doc)
    one_line(fscr("send", m["id"], store=store, check=False), 15,
             "holds LVM snapshots: send carries btrfs snapshots only")
    records = parse_stream(raw)
    records[0] = (records[0][0], (d / "manifest.json").read_bytes())
    there = tmp_path / "there"
    one_line(receive_bytes(there, build_stream(records)), 18,
             "names LVM snapshots, which streams never carry")
    assert os.listdir(there / "checkpoints") == [] and os.listdir(there / "journal") == []


def test_send_into_a_pipe_closed_early_exits_quietly(made, store):
    pid, vol, m, d = made
    out = subprocess.run(["/bin/bash", "-c", f"set -o pipefail; {FSCR} send {m['id']} | "
                          "head -c 100 >/dev/null"],
                         capture_output=True, text=True,
                         env=os.environ | {"FSCR_STORE": str(store)})
    assert (out.returncode, said(out.stderr)) == (141, []), out.stderr


# --- the exit codes, as docs/exit-codes.md lists them --------------------------------------

def test_exit_codes_doc_lists_every_error_class_with_its_code():
    from fscr import errors
    doc = (Path(__file__).parent.parent / "docs" / "exit-codes.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows.setdefault(cells[1], int(cells[0]))
    classes = {name: cls.exit_code for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.FscrError)}
    assert {k: rows.get(k) for k in classes} == classes
    from fscr import backup, cli
    listed = {int(c) for c in re.findall(r"^\| ([0-9]+) \|", doc, re.M)}
    assert {2, backup.SKIPPED_EXIT, backup.PARTIAL_EXIT, 130, cli.BROKEN_PIPE_EXIT} <= listed


@pytest.mark.parametrize("damage", ["digest not UTF-8", "manifest a directory"])
def test_a_damaged_checkpoint_directory_is_one_line(damage, made, store):
    pid, vol, m, d = made
    if damage == "digest not UTF-8":
        (d / "manifest.json.sha256").write_bytes(b"\xff\xfe  manifest.json\n")
    else:
        (d / "manifest.json").unlink()
        (d / "manifest.json").mkdir()
    for args in (["show", m["id"]], ["restore", m["id"]], ["delete", m["id"]]):
        one_line(fscr(*args, store=store, check=False), 9, "missing or unreadable")
    assert alive(pid)


@pytest.mark.parametrize("wait", ["abc", "nan", "inf", "-1"])
def test_a_bad_lock_wait_is_one_line(wait, made, store):
    pid, vol, m, d = made
    one_line(fscr("restore", m["id"], "--replace", store=store, check=False,
                  env={"FSCR_LOCK_WAIT": wait}), 16, "FSCR_LOCK_WAIT")
    assert alive(pid)


def test_damaged_lineage_and_origin_records_name_nothing(btrfs_volume, workloads, store):
    """Lineage files with names fscr never gives, or contents that fail validation, and a
    damaged origin record: checkpoint and restore --replace go on as if they were absent."""
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    fscr("list", store=store)
    lineages = store / "lineages"
    lineages.mkdir(exist_ok=True)
    (lineages / "1_x.json").write_text("[]")
    (lineages / "²_3.json").write_text("[]")
    (lineages / f"{pid}_{os.stat(f'/proc/{pid}').st_ctime_ns}.json").write_bytes(b"\xff{")
    (lineages / "12_34.json").write_text('{"version": 1, "boot": 5, "tasks": "x"}')
    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    origin = store / "origins" / f"{m['id']}.json"
    kept = origin.read_bytes()
    origin.write_text('{"version": 1, "id": "' + m["id"] + '", "tasks": [[1, "x"]]}')
    out = fscr("restore", m["id"], "--replace", store=store, check=False)
    # Without its record the checkpoint counts as received: --replace kills nothing, and its
    # cgroup, which holds the running tree, is not joined.
    one_line(out, 15, "was not made here")
    assert alive(pid)
    origin.write_bytes(kept)
    r = json.loads(fscr("restore", m["id"], "--replace", "--json", store=store).stdout)
    assert r["pid"] == pid and alive(pid)


# Debian 12's own CRIU (3.17), unpacked by scripts/setup: what a server has before fscr's build.
DEBIAN_CRIU = Path(os.environ.get("FSCR_CACHE", "/var/cache/fscr")) / "criu-debian/usr/sbin/criu"


@pytest.mark.skipif(not DEBIAN_CRIU.exists(),
                    reason=f"{DEBIAN_CRIU} missing: scripts/setup could not fetch Debian's CRIU")
def test_a_criu_older_than_4_2_1_is_one_line_and_changes_nothing(btrfs_volume, workloads, store):
    """The version is asked of the CRIU a run starts (over RPC, not by an exec of `criu
    --version`): too old, the checkpoint stops before the freeze and the restore swaps the
    volume back; a restore --replace asks before it kills the running tree."""
    old = {"FSCR_CRIU": str(DEBIAN_CRIU)}
    vol = btrfs_volume.path
    pid, _ = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    too_old = f"{DEBIAN_CRIU} is CRIU 3.17.1: fscr needs >= 4.2.1"
    one_line(fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store,
                  check=False, env=old), 11, too_old)
    one_line(fscr("checkpoint", "--pid", str(pid), "--volume", str(vol), store=store,
                  check=False, env={"FSCR_CRIU": "/bin/true"}), 11,
             "/bin/true gave no answer to CRIU's VERSION request")
    n = len(grows(vol / "history", 3))
    grows(vol / "history", n)  # not left frozen
    assert os.listdir(store / "checkpoints") == [] and not relinks_on(vol)
    doctor = json.loads(fscr("doctor", "--json", check=False, env=old).stdout)
    assert "fscr needs CRIU >= 4.2.1" in {r["name"]: r for r in doctor["checks"]}["criu"]["detail"]

    running = checkpoint(store, "--pid", str(pid), "--volume", str(vol))
    one_line(fscr("restore", running["id"], "--replace", store=store, check=False, env=old), 11,
             too_old)
    n = len(grows(vol / "history", n))  # not killed

    m = checkpoint(store, "--pid", str(pid), "--volume", str(vol), "--kill")
    wait_for(lambda: not alive(pid), 5, "the tree to be killed")
    (vol / "after-the-kill").write_text("kept")
    # Found once the volumes are swapped in (CRIU is started after they are): put back, 13.
    one_line(fscr("restore", m["id"], store=store, check=False, env=old), 13, too_old)
    assert (vol / "after-the-kill").read_text() == "kept" and not alive(pid)
    r = json.loads(fscr("restore", m["id"], "--json", store=store).stdout)
    assert r["pid"] == pid
    grows(vol / "history", n)
