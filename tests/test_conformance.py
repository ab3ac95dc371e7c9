"""A representative slice of CRIU's ZDTM static tests (conformance/slice.py), each run by fscr
plain and with every file it made overwritten between checkpoint and restore.

Each test in the slice passes under CRIU alone here (docs/conformance.md has the full run), so
a failure is a bug in fscr; the message carries the explaining line (fscr's error, CRIU's
first error or the test's own output) and where the logs are. The runner's own cleanup
(conformance/bed.py) removes what each run made: processes by PID, cgroups, the loopback
btrfs filesystem, checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance import zdtm
from conformance.runner import Context, run, session
from conformance.slice import SLICE

BUILD = zdtm.Build.default()


@pytest.fixture(scope="module")
def criu() -> str:
    from fscr.backends.criu import require
    return str(require(version=True))


@pytest.fixture(scope="module")
def slice_plan(criu: str) -> dict[str, zdtm.Test]:
    if reason := BUILD.missing():
        pytest.skip(reason)
    return {t.name: t for t in zdtm.plan(BUILD, criu, list(SLICE))}


@pytest.fixture(scope="module")
def zdtm_bed(tmp_path_factory: pytest.TempPathFactory, slice_plan: dict[str, zdtm.Test],
        criu: str) -> Iterator[Context]:
    """One loopback btrfs filesystem for the slice (a fresh subvolume per test and mode)."""
    logs: Path = tmp_path_factory.mktemp("conformance")
    with session(BUILD, criu, logs) as ctx:
        yield ctx


@pytest.mark.parametrize("mode", ["fscr", "fscr-moved"])
@pytest.mark.parametrize("name", SLICE)
def test_zdtm_test_passes_across_fscr_checkpoint_and_restore(
        zdtm_bed: Context, slice_plan: dict[str, zdtm.Test], name: str, mode: str) -> None:
    test = slice_plan[name]
    if test.skip:
        pytest.skip(f"{name}: {test.skip}")
    outcome = run(zdtm_bed, test, mode)
    assert outcome.status == "pass", (
        f"{name} ({mode}) {outcome.status} at {outcome.stage}: {outcome.why} "
        f"[logs: {outcome.log}]")
