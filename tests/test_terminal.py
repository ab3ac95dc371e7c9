"""For people at a terminal (issue #22): progress on stderr and never on stdout, readable
listings with exact numbers kept in --json, shell completion, the man page.

What a program cannot judge (does the live line look right?) was checked by hand in tmux;
these tests hold what a program can: which lines go where, which fields exist, which
candidates complete."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import FSCR, PROGRESS_LINE, fscr, sh
from test_pipeline import grows
from test_transfer import receive, send

from fscr import errors

ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z_[0-9a-f]{4}$")


def named_checkpoint(btrfs_volume, workloads, store, *extra: str):  # noqa: ANN001, ANN201
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    out = fscr("checkpoint", "--name", name, "--volume", str(vol), *extra, store=store)
    return pid, name, out


# ------------------------------------------------------------------------- progress

def test_progress_goes_to_stderr_as_timestamped_lines_and_stdout_stays_data(
        btrfs_volume, workloads, store, tmp_path):
    _, _, out = named_checkpoint(btrfs_volume, workloads, store)
    assert ID.match(out.stdout.strip()) and out.stdout.count("\n") == 1  # the id, nothing else
    ckpt = out.stdout.strip()
    said = out.stderr.splitlines()
    assert said and all(PROGRESS_LINE.match(line) for line in said), out.stderr
    for stage in ("isolate", "scan", "snapshot", "dump"):
        assert any(re.search(rf"fscr: {stage} done in [0-9.]+ (ms|s)$", x) for x in said), said
    # the bytes CRIU wrote, with a rate, and the checksum over them
    assert any(re.search(r"fscr: images written: [0-9.]+ (B|KiB|MiB) in .* \(.*/s\)$", x)
               for x in said), said
    assert any(re.search(r"fscr: checksum: [0-9.]+ (B|KiB|MiB) in ", x) for x in said), said

    r = fscr("restore", ckpt, "--replace", store=store)
    assert r.stdout.strip().isdigit()
    for stage in ("validate", "make room", "swap", "restore"):
        assert any(re.search(rf"fscr: {stage} done in ", x) for x in r.stderr.splitlines()), \
            r.stderr

    stream = tmp_path / "stream"
    with open(stream, "wb") as f:
        p = subprocess.run([str(FSCR), "send", ckpt], stdout=f, stderr=subprocess.PIPE,
                           text=False, env=os.environ | {"FSCR_STORE": str(store)})
    err = p.stderr.decode()
    assert p.returncode == 0 and re.search(r"fscr: sent: [0-9.]+ (KiB|MiB) in ", err), err
    assert stream.read_bytes().startswith(b"FSCR-STREAM 1\n")  # nothing but the stream

    workloads.kill_all()  # "another machine": the volume goes
    btrfs_volume.recreate()
    got = receive(tmp_path / "store2", stream)  # --json: no progress
    assert got.stderr == "" and json.loads(got.stdout)["id"] == ckpt
    fscr("delete", ckpt, store=tmp_path / "store2")
    with open(stream, "rb") as f:  # a file: its size is known
        p = subprocess.run([str(FSCR), "receive"], stdin=f, capture_output=True, text=True,
                           env=os.environ | {"FSCR_STORE": str(tmp_path / "store3")})
    assert p.returncode == 0 and p.stdout.strip() == ckpt, p.stderr
    assert re.search(r"fscr: received: [0-9.]+ (KiB|MiB) in ", p.stderr), p.stderr


def test_quiet_and_json_keep_stderr_free_of_progress(btrfs_volume, workloads, store, tmp_path):
    _, name, out = named_checkpoint(btrfs_volume, workloads, store, "--quiet")
    assert out.stderr == "" and ID.match(out.stdout.strip())
    vol = str(btrfs_volume.path)
    out = fscr("checkpoint", "--name", name, "--volume", vol, "--json", store=store)
    assert out.stderr == ""
    m = json.loads(out.stdout)  # keys other features add may come and go: only ours
    assert {"id", "image_bytes", "volumes", "durations"} <= m.keys()
    out = fscr("checkpoint", "--name", name, "--volume", vol, store=store,
               env={"FSCR_QUIET": "1"})
    assert out.stderr == "" and ID.match(out.stdout.strip())
    r = fscr("restore", m["id"], "--replace", "--json", store=store)
    assert r.stderr == "" and json.loads(r.stdout)["id"] == m["id"]
    r = fscr("restore", m["id"], "--replace", "-q", store=store)
    assert r.stderr == "" and r.stdout.strip().isdigit()
    with open(tmp_path / "s", "wb") as f:
        p = subprocess.run([str(FSCR), "send", "-q", m["id"]], stdout=f, stderr=subprocess.PIPE,
                           text=True, env=os.environ | {"FSCR_STORE": str(store)})
    assert p.returncode == 0 and p.stderr.startswith(f"fscr: sent {m['id']}, ")
    assert p.stderr.count("\n") == 1  # the summary only


def test_a_terminal_gets_the_live_display_on_stderr_and_only_the_id_on_stdout(
        btrfs_volume, workloads, store):
    vol = btrfs_volume.path
    pid, name = workloads.start("counter", str(vol))
    grows(vol / "history", 3)
    master, slave = pty.openpty()
    p = subprocess.Popen([str(FSCR), "checkpoint", "--name", name, "--volume", str(vol)],
                         stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                         env=os.environ | {"FSCR_STORE": str(store), "TERM": "xterm",
                                           "COLUMNS": "100"})
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the last holder of the terminal's other side is gone
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    stdout = p.stdout.read().decode()
    assert p.wait() == 0
    assert ID.match(stdout.strip()) and stdout.count("\n") == 1
    text = drawn.decode(errors="replace")
    assert "✓" in text and "dump" in text and "checksum" in text, text
    assert not PROGRESS_LINE.search(text)  # drawn, not logged


# ------------------------------------------------------------------------- listings

def test_list_and_show_give_kind_age_sizes_and_workload(btrfs_volume, workloads, store,
                                                        tmp_path):
    _, name, out = named_checkpoint(btrfs_volume, workloads, store, "-q")
    ckpt = out.stdout.strip()
    listed = json.loads(fscr("list", "--json", store=store).stdout)
    row = next(r for r in listed["checkpoints"] if r["id"] == ckpt)
    assert (row["type"], row["workload"]) == ("checkpoint", name)
    assert isinstance(row["image_bytes"], int) and row["image_bytes"] > 0
    assert row["exclusive_bytes"] is None  # quotas are off: btrfs cannot say
    text = fscr("list", store=store).stdout
    line = next(x for x in text.splitlines() if x.startswith(ckpt))
    assert re.search(rf"{ckpt}\s+checkpoint\s+\d+ (s|min) ago\s+[0-9.]+ (KiB|MiB)\s+n/a\s+"
                     rf"{name}\s+{btrfs_volume.path}$", line), text

    sh("btrfs", "quota", "enable", str(btrfs_volume.mnt))
    sh("btrfs", "quota", "rescan", "-w", str(btrfs_volume.mnt))
    listed = json.loads(fscr("list", "--json", store=store).stdout)
    row = next(r for r in listed["checkpoints"] if r["id"] == ckpt)
    assert isinstance(row["exclusive_bytes"], int)
    shown = json.loads(fscr("show", ckpt, "--json", store=store).stdout)
    assert (shown["type"], shown["workload"]) == ("checkpoint", name)
    assert isinstance(shown["volumes"][0]["exclusive_bytes"], int)
    text = fscr("show", ckpt, store=store).stdout
    assert re.search(rf"image_bytes +{shown['image_bytes']} \([0-9.]+ (KiB|MiB)\)", text), text
    assert re.search(r"created +\S+ \(\d+ (s|min) ago\)", text), text

    fscr("restore", ckpt, "--replace", "-q", store=store)
    rescue = json.loads(fscr("list", "--json", store=store).stdout)["rescues"][0]
    assert rescue["type"] == "rescue" and rescue["kind"] == "btrfs"  # kind: its provider
    assert rescue["created"] and isinstance(rescue["exclusive_bytes"], int)
    assert re.search(rf"{rescue['name']}\s+rescue\s+\d+ (s|min) ago",
                     fscr("list", store=store).stdout)

    stream = tmp_path / "stream"
    send(store, ckpt, stream)
    workloads.kill_all()
    btrfs_volume.recreate()
    receive(tmp_path / "there", stream)
    there = json.loads(fscr("list", "--json", store=tmp_path / "there").stdout)
    assert [(r["id"], r["type"]) for r in there["checkpoints"]] == [(ckpt, "received")]


# ------------------------------------------------------------------ completion, man page

def complete(words: str, shell: str = "bash", **env: str) -> list[str]:
    """What Tab offers after `words` (a trailing space: a new word), as bash or zsh gets it."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    out = subprocess.run([str(FSCR)], capture_output=True, text=True, check=True,
                         env=os.environ | env | {"_FSCR_COMPLETE": f"{shell}_complete",
                                                 "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    if shell == "zsh":  # type, value, help: three lines per candidate
        return out.stdout.splitlines()[1::3]
    return [line.split(",", 1)[1] for line in out.stdout.splitlines() if line]


def test_tab_completes_checkpoint_ids_workload_names_and_job_files(btrfs_volume, workloads,
                                                                   store, tmp_path):
    _, name, out = named_checkpoint(btrfs_volume, workloads, store, "-q")
    ckpt = out.stdout.strip()
    env = {"FSCR_STORE": str(store)}
    assert complete("fscr show ", **env) == [ckpt]
    assert complete(f"fscr restore {ckpt[:6]}", **env) == [ckpt]
    assert complete("fscr show x", **env) == []
    assert complete(f"fscr send --store {store} ") == [ckpt]  # --store on the line counts
    assert complete("fscr show ", "zsh", **env) == [ckpt]
    fscr("restore", ckpt, "--replace", "-q", store=store)
    rescue = json.loads(fscr("list", "--json", store=store).stdout)["rescues"][0]["name"]
    assert complete("fscr delete ", **env) == [ckpt, rescue]
    assert name in complete("fscr checkpoint --name ")
    assert name in complete(f"fscr check --name {name[:3]}")
    (tmp_path / "app.toml").write_text("")
    out = subprocess.run([str(FSCR)], capture_output=True, text=True, env=os.environ | {
        "_FSCR_COMPLETE": "bash_complete", "COMP_WORDS": f"fscr backup {tmp_path}/",
        "COMP_CWORD": "2"})
    assert out.stdout.splitlines() == [f"file,{tmp_path}/"]  # the shell lists the files


def test_man_page_lists_every_command_option_and_exit_code(tmp_path):
    from fscr.cli import cli
    from fscr.manpage import commands

    page = subprocess.run([sys.executable, "-m", "fscr.manpage"], capture_output=True,
                          text=True, check=True).stdout
    (tmp_path / "fscr.1").write_text(page)
    shown = subprocess.run(["man", "-l", str(tmp_path / "fscr.1")], capture_output=True,
                           text=True, check=True, env=os.environ | {"MANWIDTH": "200"}).stdout
    names = [n for n, _ in commands(cli)]
    assert {"checkpoint", "restore", "list", "send", "receive", "schedule install"} <= set(names)
    for n, cmd in commands(cli):
        assert re.search(rf"^ +fscr {n}$", shown, re.M), n
        for p in cmd.params:
            if isinstance(p, click.Argument):
                assert p.make_metavar(click.Context(cmd)) in shown, (n, p.name)
                continue
            for opt in p.opts + p.secondary_opts:
                assert opt in shown, (n, opt)
    codes = {cls.exit_code for cls in _subclasses(errors.FscrError)} | {0, 2, 20, 21}
    section = shown.split("EXIT STATUS", 1)[1].split("ENVIRONMENT", 1)[0]
    listed = {int(c) for c in re.findall(r"^ {7}(\d+) ", section, re.M)}
    assert codes <= listed, codes - listed


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


def test_setup_installed_man_fscr_and_the_completion_scripts():
    if not Path("/etc/bash_completion.d/fscr").exists():
        pytest.skip("scripts/setup has not run on this machine")
    out = subprocess.run(["man", "-P", "cat", "fscr"], capture_output=True, text=True,
                         env=os.environ | {"MANWIDTH": "120"})
    assert out.returncode == 0 and "fscr checkpoint" in out.stdout, out.stderr
    assert "_FSCR_COMPLETE=bash_complete" in Path("/etc/bash_completion.d/fscr").read_text()
    zsh = Path("/usr/local/share/zsh/site-functions/_fscr").read_text()
    assert zsh.startswith("#compdef fscr")

