"""Retention by restic's rules, on a year of checkpoints every 10 minutes; the clock and the
time zone are passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fscr.retention import Policy, apply_policy

START = datetime(2025, 1, 1, tzinfo=UTC)
YEAR = [(f"c{i}", START + timedelta(minutes=10 * i)) for i in range(365 * 24 * 6)]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def at(text: str) -> str:
    """The id of the checkpoint made at `text` (UTC)."""
    when = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return f"c{int((when - START).total_seconds()) // 600}"


@pytest.mark.parametrize("policy, tz, expected", [
    (Policy(keep_last=3), UTC,
     {at("2025-12-31 23:50"): ["last checkpoint"], at("2025-12-31 23:40"): ["last checkpoint"],
      at("2025-12-31 23:30"): ["last checkpoint"]}),
    (Policy(hourly=2), UTC,
     {at("2025-12-31 23:50"): ["hourly checkpoint"],
      at("2025-12-31 22:50"): ["hourly checkpoint"]}),
    (Policy(daily=3), UTC,
     {at("2025-12-31 23:50"): ["daily checkpoint"], at("2025-12-30 23:50"): ["daily checkpoint"],
      at("2025-12-29 23:50"): ["daily checkpoint"]}),
    # ISO weeks: Dec 29-31 2025 belong to 2026-W01; 2025-W52 ends on Sunday Dec 28.
    (Policy(weekly=2), UTC,
     {at("2025-12-31 23:50"): ["weekly checkpoint"],
      at("2025-12-28 23:50"): ["weekly checkpoint"]}),
    (Policy(monthly=2), UTC,
     {at("2025-12-31 23:50"): ["monthly checkpoint"],
      at("2025-11-30 23:50"): ["monthly checkpoint"]}),
    (Policy(yearly=5), UTC, {at("2025-12-31 23:50"): ["yearly checkpoint"]}),
    (Policy(keep_last=2, daily=2, monthly=2), UTC,
     {at("2025-12-31 23:50"): ["last checkpoint", "daily checkpoint", "monthly checkpoint"],
      at("2025-12-31 23:40"): ["last checkpoint"],
      at("2025-12-30 23:50"): ["daily checkpoint"],
      at("2025-11-30 23:50"): ["monthly checkpoint"]}),
    # In UTC+2 the newest checkpoint falls on Jan 1; Dec 31 ends at 21:50 UTC.
    (Policy(daily=2), timezone(timedelta(hours=2)),
     {at("2025-12-31 23:50"): ["daily checkpoint"], at("2025-12-31 21:50"): ["daily checkpoint"]}),
])
def test_policy_keeps_exactly_the_expected_checkpoints(policy, tz, expected):
    d = apply_policy(YEAR, policy, tz, NOW)
    assert d.reasons == expected
    assert set(d.keep) == set(expected) and len(d.remove) == len(YEAR) - len(expected)


def test_an_empty_policy_removes_nothing():
    d = apply_policy(YEAR[:100], Policy(), UTC, NOW)
    assert d.remove == [] and len(d.keep) == 100


def test_a_checkpoint_from_the_future_is_kept():
    future = [("f", NOW + timedelta(days=1))]
    d = apply_policy(YEAR[:10] + future, Policy(keep_last=1), UTC, NOW)
    assert d.reasons["f"] == ["last checkpoint", "newer than now"]


@given(st.lists(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
                max_size=60),
       st.integers(0, 5), st.integers(0, 5), st.integers(0, 5))
def test_kept_and_removed_partition_the_checkpoints(times, last, daily, monthly):
    cps = [(f"c{i}", t.replace(tzinfo=UTC)) for i, t in enumerate(times)]
    d = apply_policy(cps, Policy(keep_last=last, daily=daily, monthly=monthly), UTC, NOW)
    assert sorted(d.keep + d.remove) == sorted(c for c, _ in cps)
    future = sum(t > NOW for _, t in cps)  # kept whatever the policy says
    if not (last or daily or monthly):  # an empty policy removes nothing
        assert d.remove == []
    else:  # each rule keeps at most its count, and something is kept when there is any
        assert len(d.keep) <= last + daily + monthly + future
        assert bool(d.keep) == bool(cps)
    newest = sorted(cps, key=lambda c: (c[1], c[0]), reverse=True)[:last]
    assert {c for c, _ in newest} <= set(d.keep)
