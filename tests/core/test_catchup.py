"""Catch-up's pure core: evaluation failures recognised from ``jobsets`` rows, and marks that only advance."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hydra_otel.core.catchup import JobsetRow, Marks, jobset_failures
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
