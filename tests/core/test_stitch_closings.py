"""The stitcher acts on eval_cached / eval_failed, and pairs eval_added with its start, only as Hydra's rows allow."""

from __future__ import annotations

import pytest

from hydra_otel.core.evals import AddedEval, Attempt, AttemptKind
from hydra_otel.core.events import EvalAdded, EvalCached, EvalFailed, EvalStarted
from hydra_otel.core.stitch import (
    CHECK_ALREADY_REPORTED,
    EVAL_OF_OTHER_JOBSET,
    IN_FLIGHT_GRACE,
    PREVIOUS_EVAL_OF_OTHER_JOBSET,
    ROW_DISAGREES,
    RUN_ALREADY_REPORTED,
    UNKNOWN_JOBSET,
    UNKNOWN_PREVIOUS_EVAL,
    UNVERIFIED_BURST,
    UNVERIFIED_OVER_BUDGET,
    UNVERIFIED_REFILL,
    ClosingCheck,
    JobsetCheck,
    State,
    Stitcher,
    Unchecked,
)

CID = "4112.262815283.16494"
T = 1_700_000_000

FETCH_FAILED = JobsetCheck(last_checked=T, has_error=False, error_time=None, has_fetch_error=True)
CHECK_FAILED = JobsetCheck(last_checked=T, has_error=True, error_time=T, has_fetch_error=False)
CACHED = JobsetCheck(last_checked=T, has_error=False, error_time=T - 50, has_fetch_error=False)


def make() -> Stitcher:
    return Stitcher(abandon_after=100.0, max_open=10)


def failed(cid: str = CID, jobset: int = 1) -> EvalFailed:
    return EvalFailed(correlation_id=cid, jobset_id=jobset)


def cached(cid: str = CID, jobset: int = 1, previous: int = 7) -> EvalCached:
    return EvalCached(correlation_id=cid, jobset_id=jobset, previous_eval_id=previous)


@pytest.mark.parametrize("row", [FETCH_FAILED, CHECK_FAILED], ids=["fetch", "check"])
def test_failure_the_row_shows_is_reported(row: JobsetCheck) -> None:
    """eval_failed closes its attempt when the jobset row records that failure."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=1), 1_000, 0.0)
    (out,) = s.feed(failed(), 2_000, 1.0, check=ClosingCheck(jobset=row))
    assert isinstance(out, Attempt)
    assert (out.kind, out.started_ns) == (AttemptKind.FAILED, 1_000)
    assert s.statistics().rejected == {}


@pytest.mark.parametrize(
    ("event", "check", "reason"),
    [
        (failed(), ClosingCheck(jobset=None), UNKNOWN_JOBSET),
        (cached(), ClosingCheck(jobset=None, eval_jobset=1), UNKNOWN_JOBSET),
        (cached(), ClosingCheck(jobset=CACHED, eval_jobset=None), UNKNOWN_PREVIOUS_EVAL),
        (cached(), ClosingCheck(jobset=CACHED, eval_jobset=2), PREVIOUS_EVAL_OF_OTHER_JOBSET),
        (failed(), ClosingCheck(jobset=CACHED), ROW_DISAGREES),
        # A successful evaluation with job errors: errormsg set at the evaluation's start, not the check.
        (
            failed(),
            ClosingCheck(
                jobset=JobsetCheck(last_checked=T, has_error=True, error_time=T - 60, has_fetch_error=False)
            ),
            ROW_DISAGREES,
        ),
        (
            failed(),
            ClosingCheck(
                jobset=JobsetCheck(last_checked=None, has_error=True, error_time=T, has_fetch_error=True)
            ),
            ROW_DISAGREES,
        ),
        (cached(), ClosingCheck(jobset=FETCH_FAILED, eval_jobset=1), ROW_DISAGREES),
        (
            cached(),
            ClosingCheck(
                jobset=JobsetCheck(
                    last_checked=None, has_error=False, error_time=None, has_fetch_error=False
                ),
                eval_jobset=1,
            ),
            ROW_DISAGREES,
        ),
    ],
)
def test_closing_the_rows_do_not_vouch_for_is_rejected(
    event: EvalCached | EvalFailed, check: ClosingCheck, reason: str
) -> None:
    """A closing event the rows contradict gives nothing, is counted, and leaves an open attempt open."""
    s = make()
    if reason == ROW_DISAGREES and check.jobset is not None and check.jobset.last_checked is not None:
        # The first read of a row is believed once: a later check may have overwritten it.
        primer = failed("primer") if isinstance(event, EvalFailed) else cached("primer")
        assert len(s.feed(primer, 1_500, 0.5, check=check)) == 1
    s.feed(EvalStarted(correlation_id=CID, jobset_id=1), 1_000, 0.0)
    assert s.feed(event, 2_000, 1.0, check=check) == []
    assert s.statistics().rejected == {reason: 1}
    assert s.state(1, CID) is State.OPEN
    (rejection,) = s.take_rejections()
    assert (rejection.reason, rejection.jobset_id) == (reason, 1)


def test_one_check_is_reported_once() -> None:
    """However many closing events name one check (same lastcheckedtime), one attempt is reported."""
    s = make()
    check = ClosingCheck(jobset=CHECK_FAILED, eval_jobset=1)
    out = [o for i in range(1_000) for o in s.feed(failed(f"forged.{i}"), 2_000, 1.0, check=check)]
    out += [o for i in range(1_000) for o in s.feed(cached(f"more.{i}"), 2_000, 1.0, check=check)]
    assert len(out) == 1
    assert s.statistics().rejected == {CHECK_ALREADY_REPORTED: 1_999}


def test_each_newer_check_is_reported() -> None:
    """Successive checks of a jobset (a newer lastcheckedtime each) each report their attempt."""
    s = make()
    for i in range(5):
        row = JobsetCheck(last_checked=T + i, has_error=False, error_time=None, has_fetch_error=False)
        (out,) = s.feed(cached(f"c.{i}"), 2_000, float(i), check=ClosingCheck(jobset=row, eval_jobset=1))
        assert isinstance(out, Attempt)
    # An older check (rows read before a newer one was reported) is not reported again.
    assert s.feed(failed("old"), 2_000, 9.0, check=ClosingCheck(jobset=FETCH_FAILED)) == []
    assert s.statistics().rejected == {CHECK_ALREADY_REPORTED: 1}


def test_checks_are_per_jobset() -> None:
    """One jobset's reported check does not hide another jobset's check at the same second."""
    s = make()
    assert len(s.feed(failed(jobset=1), 2_000, 1.0, check=ClosingCheck(jobset=FETCH_FAILED))) == 1
    assert len(s.feed(failed(jobset=2), 2_000, 1.0, check=ClosingCheck(jobset=FETCH_FAILED))) == 1


def test_unreadable_rows_spend_a_global_budget() -> None:
    """While rows cannot be read, closing events are trusted only within a global, refilling budget."""
    s = make()
    out = [
        o
        for i in range(1_000)
        for o in s.feed(failed(f"f.{i}", jobset=i % 7 + 1), 2_000, 0.0, check=Unchecked.UNREADABLE)
    ]
    assert len(out) == UNVERIFIED_BURST
    assert s.statistics().rejected == {UNVERIFIED_OVER_BUDGET: 1_000 - UNVERIFIED_BURST}
    assert len(s.feed(failed("later"), 3_000, UNVERIFIED_REFILL, check=Unchecked.UNREADABLE)) == 1


def test_trusted_closings_are_not_checked() -> None:
    """A caller that checks nothing (the default) gets every closing event acted on, as before."""
    s = make()
    assert len([o for i in range(100) for o in s.feed(failed(f"f.{i}"), 2_000, 0.0)]) == 100
    assert s.statistics().rejected == {}


def test_paired_close_reports_a_check_an_orphan_claimed() -> None:
    """A forged orphan that read the row first cannot hide the real, paired close of that check."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=1), 1_000, 0.0)
    check = ClosingCheck(jobset=FETCH_FAILED)
    assert len(s.feed(failed("forged"), 1_500, 0.5, check=check)) == 1
    (real,) = s.feed(failed(CID), 2_000, 1.0, check=check)
    assert isinstance(real, Attempt)
    assert real.started_ns == 1_000
    # Neither another orphan nor another paired close reports that check again.
    s.feed(EvalStarted(correlation_id="again", jobset_id=1), 2_500, 1.5)
    assert s.feed(failed("again"), 3_000, 2.0, check=check) == []
    assert s.feed(failed("more"), 3_000, 2.0, check=check) == []
    assert s.statistics().rejected == {CHECK_ALREADY_REPORTED: 2}


def pair(s: Stitcher, cid: str, eval_id: int, check: ClosingCheck | Unchecked, at: float = 1.0) -> AddedEval:
    s.feed(EvalStarted(correlation_id=cid, jobset_id=1), 1_000, at)
    (out,) = s.feed(EvalAdded(correlation_id=cid, jobset_id=1, eval_id=eval_id), 2_000, at, check=check)
    assert isinstance(out, AddedEval)
    return out


def test_an_evaluation_gets_one_evaluator_run() -> None:
    """Forged start/eval_added pairs naming an evaluation already paired close without a run span."""
    s = make()
    check = ClosingCheck(jobset=None, eval_jobset=1)
    assert pair(s, "real", 5, check).started_ns == 1_000
    for i in range(100):
        again = pair(s, f"forged.{i}", 5 - i % 3, check)
        assert again.started_ns is None  # renders the evaluation's rows again, nothing new
        assert s.state(1, f"forged.{i}") is State.CLOSED
    assert s.statistics().rejected == {RUN_ALREADY_REPORTED: 100}
    assert s.statistics().open == 0
    assert pair(s, "next", 6, check).started_ns == 1_000  # the jobset's next evaluation


def test_added_of_another_jobset_is_rejected() -> None:
    """eval_added naming another jobset's evaluation is ignored; the attempt stays open."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=1), 1_000, 0.0)
    event = EvalAdded(correlation_id=CID, jobset_id=1, eval_id=5)
    assert s.feed(event, 2_000, 1.0, check=ClosingCheck(jobset=None, eval_jobset=2)) == []
    assert s.statistics().rejected == {EVAL_OF_OTHER_JOBSET: 1}
    assert s.state(1, CID) is State.OPEN


def test_made_up_evaluation_does_not_hold_back_real_runs() -> None:
    """A pair naming an evaluation with no row records nothing: the jobset's real next run still pairs."""
    s = make()
    pair(s, "forged", 2**31 - 1, ClosingCheck(jobset=None, eval_jobset=None))
    assert pair(s, "real", 7, ClosingCheck(jobset=None, eval_jobset=1)).started_ns == 1_000


def test_unreadable_pairings_spend_the_budget() -> None:
    """With the rows unreadable, pairings beyond the global budget close without a run span."""
    s = make()
    started = [pair(s, f"p.{i}", 5, Unchecked.UNREADABLE, at=0.0).started_ns for i in range(50)]
    assert sum(x is not None for x in started) == UNVERIFIED_BURST


def test_jobset_of_a_handed_on_attempt_counts_as_followed_for_a_while() -> None:
    """Just after a failed attempt is handed on, the catch-up must not report that check again."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=1), 1_000, 0.0)
    s.feed(EvalStarted(correlation_id="other", jobset_id=2), 1_000, 0.0)
    assert s.open_jobsets() == {1, 2}
    s.feed(failed(), 2_000, 1.0, check=ClosingCheck(jobset=FETCH_FAILED))
    assert s.open_jobsets() == {1, 2}  # 1: handed on, the resolver may not have recorded it yet
    s.expire(1.0 + IN_FLIGHT_GRACE, 3_000)
    assert s.open_jobsets() == {2}
    # Expired attempts are handed on too.
    (abandoned,) = s.expire(1_000.0, 4_000)
    assert isinstance(abandoned, Attempt)
    assert s.open_jobsets() == {2}
    s.expire(1_000.0 + IN_FLIGHT_GRACE, 5_000)
    assert s.open_jobsets() == frozenset()


def test_a_row_that_moved_on_is_believed_once_per_change() -> None:
    """A failure whose row a later successful check overwrote before it was read still reports,
    once per change of the row, and does not take the check it read from its own notification."""
    s = make()
    success = JobsetCheck(last_checked=T + 100, has_error=False, error_time=T + 90, has_fetch_error=False)
    assert len(s.feed(failed("real"), 2_000, 1.0, check=ClosingCheck(jobset=success))) == 1
    assert s.feed(failed("forged"), 2_000, 1.0, check=ClosingCheck(jobset=success)) == []
    assert s.statistics().rejected == {ROW_DISAGREES: 1}
    # The check read belongs to the successful evaluation's own cached notification, say.
    assert len(s.feed(cached("next"), 2_500, 1.5, check=ClosingCheck(jobset=success, eval_jobset=1))) == 1
    moved = JobsetCheck(last_checked=T + 200, has_error=False, error_time=T + 190, has_fetch_error=False)
    assert len(s.feed(failed("again"), 3_000, 2.0, check=ClosingCheck(jobset=moved))) == 1
    assert s.feed(failed("again.2"), 3_000, 2.0, check=ClosingCheck(jobset=moved)) == []
