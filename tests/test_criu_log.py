"""The error fscr quotes from a failed CRIU run: the first one that explains, with a hint.

The log excerpts are CRIU 4.2.1's own, copied from failed runs on this machine kind (each
case names how it failed); the end-to-end failure is in test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fscr.backends.criu_log import explain
from fscr.netlock import of_images, table_of

NOISE = "(00.040190) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: " \
        "Operation not permitted"

CASES = [
    (  # a task of another user, root without CAP_SYS_RESOURCE
        [NOISE, "(00.056104) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not "
                "permitted",
         "(00.056108) Error (criu/cr-dump.c:1584): Dump core (pid: 22646) failed with -1",
         "(00.056373) Error (criu/cr-dump.c:1975): Dumping FAILED."],
        "Can't get rlimit 0", "CAP_SYS_RESOURCE"),
    (  # SysV shared memory of the host's IPC namespace (ZDTM's shm, run on the host)
        [NOISE, "(00.070485) Error (criu/cr-dump.c:478): Task 21713 with SysVIPC shmem map "
                "@7f069c808000 doesn't live in IPC ns",
         "(00.070487) Error (criu/cr-dump.c:1621): Dump mappings (pid: 21713) failed with -1",
         "(00.070649) Error (criu/cr-dump.c:1975): Dumping FAILED."],
        "doesn't live in IPC ns", "IPC namespace of its own"),
    (  # a listener with a connection in its accept queue, without --skip-in-flight
        [NOISE, "(00.057001) Error (criu/sk-inet.c:185): inet: In-flight connection (l) for "
                "b9aa",
         "(00.057003) Error (criu/sk-inet.c:186): inet: In-flight connections can be ignored "
         "with the --skip-in-flight option.",
         "(00.057554) Error (criu/cr-dump.c:1975): Dumping FAILED."],
        "In-flight connection", "--skip-in-flight"),
    (  # a restore log (warning level: no timestamps; a task's lines start with its PID)
        ["Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation "
         "not permitted",
         " 14782: Error (criu/fsnotify.c:510): fsnotify: Unable to open (null): No such file "
         "or directory",
         " 14782: Error (criu/files.c:1221): Unable to open fd=4 id=0x8",
         "Error (criu/cr-restore.c:2331): Restoring FAILED."],
        "fsnotify: Unable to open", "inotify"),
    (  # only CRIU's closing line: quoted rather than nothing
        [NOISE, "(00.057554) Error (criu/cr-dump.c:1975): Dumping FAILED."],
        "Dumping FAILED", None),
]


@pytest.mark.parametrize("log,cause,hint", CASES)
def test_the_first_explaining_error_is_quoted_with_its_hint(tmp_path: Path, log: list[str],
                                                           cause: str, hint: str | None):
    f = tmp_path / "criu-dump.log"
    f.write_text("\n".join(["(00.000010) Version: 4.2.1"] + log) + "\n")
    got = explain(f)
    assert cause in got.cause and not got.cause.startswith("(")
    assert (got.hint is None) if hint is None else (hint in got.hint)


def test_no_log_falls_back_to_stderr(tmp_path: Path):
    got = explain(tmp_path / "missing.log", "criu: unrecognized option '--bogus'\n")
    assert got.cause == "criu: unrecognized option '--bogus'"


def test_the_network_lock_is_named_as_criu_names_its_table(tmp_path: Path):
    # criu/netfilter.c: snprintf(table, 32, "inet CRIU-%s", run_id) keeps 21 characters; the
    # run id is the one CRIU recorded in inventory.img (written here by pycriu, as CRIU does).
    from pycriu import images

    with open(tmp_path / "inventory.img", "wb") as f:
        images.dump({"magic": "INVENTORY", "entries": [{
            "img_version": 2, "fdinfo_per_id": True, "lsmtype": "NO_LSM",
            "dump_criu_run_id": "3f6c1d2e-5b7a-4c9d-8e0f-1a2b3c4d5e6f"}]}, f)
    assert of_images(tmp_path) == "CRIU-3f6c1d2e-5b7a-4c9d-8e"
    assert of_images(tmp_path / "missing") is None
    assert table_of("CRIU-3f6c1d2e-5b7a-4c9d-8e0f-1a2b3c4d5e6f") == "CRIU-3f6c1d2e-5b7a-4c9d-8e"
