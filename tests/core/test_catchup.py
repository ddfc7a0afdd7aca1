"""Catch-up's pure core: evaluation failures recognised from ``jobsets`` rows, and marks that only advance."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra_otel.core.catchup import (
    MARK_MAX,
    JobsetRow,
    Marks,
    jobset_failures,
    marks_from_json,
    marks_to_json,
)
from hydra_otel.core.evals import Attempt, AttemptKind

S = 1_000_000_000
T = 1_700_000_000


def row(
    jobset_id: int = 1,
    last_checked: int | None = T,
    *,
    error_msg: str | None = None,
    error_time: int | None = None,
    fetch_error_msg: str | None = None,
) -> JobsetRow:
    return JobsetRow(
        jobset_id=jobset_id,
        last_checked=last_checked,
        error_msg=error_msg,
        error_time=error_time,
        fetch_error_msg=fetch_error_msg,
    )


def failed(jobset_id: int, last_checked: int) -> Attempt:
    return Attempt(
        kind=AttemptKind.FAILED,
        jobset_id=jobset_id,
        correlation_id=f"lastchecked-{last_checked}",
        started_ns=None,
        ended_ns=last_checked * S,
    )


def test_jobset_created_since_the_first_start_is_reported() -> None:
    """A jobset not in the marks was created after the first start (which records all): its failed check counts."""
    attempts, known = jobset_failures([row(1, T, fetch_error_msg="no network"), row(2, T + 5)], {})
    assert attempts == [failed(1, T)]
    assert known == {1: T, 2: T + 5}


def test_never_checked_jobset_is_skipped() -> None:
    """A jobset with no lastcheckedtime yields nothing and is not recorded (it keeps known values)."""
    assert jobset_failures([row(1, None)], {}) == ([], {})
    assert jobset_failures([row(1, None)], {1: T}) == ([], {1: T})


def test_fetch_error_is_reported() -> None:
    """A check after the mark with fetcherrormsg set is a failed attempt ending at the check time."""
    attempts, known = jobset_failures([row(1, T + 10, fetch_error_msg="cannot fetch 'src'")], {1: T})
    assert attempts == [failed(1, T + 10)]
    assert known == {1: T + 10}


def test_check_younger_than_the_lag_is_left_to_the_live_path() -> None:
    """A failure recorded after ``until`` may still be on its way as eval_failed: not reported, mark
    unmoved, so the next scan reports it if the live path did not."""
    rows = [row(1, T + 10, fetch_error_msg="cannot fetch 'src'")]
    assert jobset_failures(rows, {1: T}, until=T + 9) == ([], {1: T})
    assert jobset_failures(rows, {1: T}, until=T + 10) == ([failed(1, T + 10)], {1: T + 10})


def test_evaluation_error_is_reported() -> None:
    """An evaluator error sets errormsg with errortime equal to lastcheckedtime: a failed attempt."""
    rows = [row(1, T + 10, error_msg="evaluation crashed", error_time=T + 10)]
    attempts, known = jobset_failures(rows, {1: T})
    assert attempts == [failed(1, T + 10)]
    assert known == {1: T + 10}


def test_success_is_not_reported() -> None:
    """A successful evaluation (errormsg '' or job errors, errortime = its start) is not a failure."""
    rows = [
        row(1, T + 10, error_msg="", error_time=T + 2),
        row(2, T + 10, error_msg="error: attribute 'x' missing", error_time=T + 2),
        row(3, T + 10),
    ]
    attempts, known = jobset_failures(rows, {1: T, 2: T, 3: T})
    assert attempts == []
    assert known == {1: T + 10, 2: T + 10, 3: T + 10}


def test_already_known_check_is_not_repeated() -> None:
    """A failure at or before the recorded check time is not reported (again)."""
    rows = [row(1, T + 10, fetch_error_msg="down")]
    first, known = jobset_failures(rows, {1: T})
    assert first == [failed(1, T + 10)]
    assert jobset_failures(rows, known) == ([], known)
    assert jobset_failures(rows, {1: T + 20}) == ([], {1: T + 20}), "a known later check is kept"


def test_jobsets_are_independent() -> None:
    """Each jobset is judged against its own mark; other marks pass through unchanged."""
    rows = [row(1, T + 10, fetch_error_msg="down"), row(2, T + 10, fetch_error_msg="down")]
    attempts, known = jobset_failures(rows, {1: T, 2: T + 10, 3: T})
    assert attempts == [failed(1, T + 10)]
    assert known == {1: T + 10, 2: T + 10, 3: T}


marks = st.builds(
    Marks,
    eval_id=st.integers(0, 10**6),
    stop_time=st.integers(0, 2 * T),
    jobsets=st.dictionaries(st.integers(1, 20), st.integers(0, 2 * T), max_size=8),
)


@given(marks, marks)
def test_merged_never_moves_backwards(a: Marks, b: Marks) -> None:
    """Merging keeps every mark at least where either side had it, and is commutative."""
    m = a.merged(b)
    for side in (a, b):
        assert m.eval_id >= side.eval_id
        assert m.stop_time >= side.stop_time
        assert all(m.jobsets[k] >= v for k, v in side.jobsets.items())
    assert set(m.jobsets) == set(a.jobsets) | set(b.jobsets)
    assert (m.eval_id, m.stop_time) == (max(a.eval_id, b.eval_id), max(a.stop_time, b.stop_time))
    assert m == b.merged(a)


def test_merged_with_older_marks_changes_nothing() -> None:
    """An older checkpoint merged into newer marks leaves them as they were; the inputs are not mutated."""
    new = Marks(eval_id=50, stop_time=T + 100, jobsets={1: T + 90, 2: T})
    old = Marks(eval_id=40, stop_time=T, jobsets={1: T})
    assert new.merged(old) == new
    assert old == Marks(eval_id=40, stop_time=T, jobsets={1: T})


# --- stored marks -----------------------------------------------------------------------------------------

GOOD = {"eval_id": 42, "stop_time": 1_700_000_000, "jobsets": {"1": 1_700_000_000, "20": 5}}


def test_marks_round_trip_through_json() -> None:
    """What marks_to_json writes, marks_from_json reads back equal (jobset IDs as integers again)."""
    marks = Marks(eval_id=42, stop_time=T, jobsets={20: 5, 1: T})
    assert marks_from_json(json.loads(json.dumps(marks_to_json(marks)))) == marks
    assert marks_from_json(GOOD) == Marks(eval_id=42, stop_time=T, jobsets={1: T, 20: 5})


INVALID_MARKS: list[tuple[object, str]] = [
    ([], "the marks are an array, not a JSON object"),
    (None, "the marks are null, not a JSON object"),
    ({**GOOD, "build_id": 3}, "unknown key 'build_id' (written by a newer hydra-otel?)"),
    ({"eval_id": 1, "stop_time": 2}, "key 'jobsets' is missing"),
    ({**GOOD, "eval_id": "42"}, "'eval_id' is a string, not an integer"),
    ({**GOOD, "eval_id": 4.2}, "'eval_id' is a number, not an integer"),
    ({**GOOD, "stop_time": True}, "'stop_time' is a boolean, not an integer"),
    ({**GOOD, "stop_time": None}, "'stop_time' is null, not an integer"),
    ({**GOOD, "eval_id": -1}, f"'eval_id' is -1, outside 0..{MARK_MAX}"),
    ({**GOOD, "stop_time": 10**20}, f"'stop_time' is {10**20}, outside 0..{MARK_MAX}"),
    ({**GOOD, "jobsets": [1, 2]}, "'jobsets' is an array, not a JSON object"),
    ({**GOOD, "jobsets": {"x": 1}}, "'jobsets' has the key 'x', not a jobset ID"),
    ({**GOOD, "jobsets": {"-1": 1}}, "'jobsets' has the key '-1', not a jobset ID"),
    ({**GOOD, "jobsets": {"1": "now"}}, "'jobsets'[1] is a string, not an integer"),
    ({**GOOD, "jobsets": {"99999999999": 1}}, f"jobset ID 99999999999 is 99999999999, outside 0..{MARK_MAX}"),
]


@pytest.mark.parametrize(("data", "reason"), INVALID_MARKS)
def test_invalid_marks_refused(data: object, reason: str) -> None:
    """Marks with an unknown or missing key, a wrong type or an out-of-range value are refused, saying which."""
    with pytest.raises(ValueError, match=re.escape(reason)):
        marks_from_json(data)
