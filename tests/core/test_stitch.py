"""The evaluation stitcher: pairing, orphans, duplicates, abandonment, bounds."""

from __future__ import annotations

import pytest

from hydra_otel.core.evals import AddedEval, Attempt, AttemptKind
from hydra_otel.core.events import EvalAdded, EvalCached, EvalFailed, EvalStarted
from hydra_otel.core.stitch import (
    ALREADY_CLOSED,
    EXPIRED,
    IN_FLIGHT_GRACE,
    SUPERSEDE_BURST,
    SUPERSEDE_REFILL,
    SUPERSEDED,
    SUPERSEDED_UNREPORTED,
    TOO_MANY_OPEN,
    TRANSITIONS,
    UNKNOWN_JOBSET,
    Rejection,
    State,
    Stitcher,
)

CID = "4112.262815283.16494"


def make(abandon_after: float = 100.0, max_open: int = 10) -> Stitcher:
    return Stitcher(abandon_after=abandon_after, max_open=max_open)


def test_added_pairs_with_started() -> None:
    """eval_started then eval_added gives one AddedEval with both live moments."""
    s = make()
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 1_000, 0.0) == []
    assert s.state(3, CID) is State.OPEN
    out = s.feed(EvalAdded(correlation_id=CID, jobset_id=3, eval_id=42), 5_000, 4.0)
    assert out == [AddedEval(eval_id=42, jobset_id=3, correlation_id=CID, started_ns=1_000, ended_ns=5_000)]
    assert s.state(3, CID) is State.CLOSED
    assert s.statistics().closed == 1


@pytest.mark.parametrize(
    ("event", "kind", "previous"),
    [
        (EvalCached(correlation_id=CID, jobset_id=3, previous_eval_id=41), AttemptKind.CACHED, 41),
        (EvalFailed(correlation_id=CID, jobset_id=3), AttemptKind.FAILED, None),
    ],
)
def test_cached_and_failed_close_an_attempt(
    event: EvalCached | EvalFailed, kind: AttemptKind, previous: int | None
) -> None:
    """eval_cached and eval_failed close the attempt with its start time."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 1_000, 0.0)
    (out,) = s.feed(event, 9_000, 8.0)
    assert out == Attempt(
        kind=kind,
        jobset_id=3,
        correlation_id=CID,
        started_ns=1_000,
        ended_ns=9_000,
        previous_eval_id=previous,
    )


def test_orphan_close_has_no_start() -> None:
    """A closing event without eval_started (daemon started mid-evaluation) still yields an outcome."""
    s = make()
    (out,) = s.feed(EvalFailed(correlation_id=CID, jobset_id=3), 9_000, 0.0)
    assert isinstance(out, Attempt)
    assert out.started_ns is None
    assert s.statistics().orphans == 1


def test_duplicate_start_is_ignored() -> None:
    """A repeated eval_started keeps the first start time."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 1_000, 0.0)
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 2_000, 1.0) == []
    (out,) = s.feed(EvalAdded(correlation_id=CID, jobset_id=3, eval_id=1), 3_000, 2.0)
    assert isinstance(out, AddedEval)
    assert out.started_ns == 1_000
    assert s.statistics().duplicates == 1


def test_expiry_abandons_at_deadline_only() -> None:
    """An attempt that never closes is abandoned when its deadline passes, not before."""
    s = make(abandon_after=100.0)
    s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 1_000, 10.0)
    assert s.next_deadline() == 110.0
    assert s.expire(109.9, 2_000) == []
    (out,) = s.expire(110.0, 3_000)
    assert out == Attempt(
        kind=AttemptKind.ABANDONED,
        jobset_id=3,
        correlation_id=CID,
        started_ns=1_000,
        ended_ns=3_000,
        abandon_reason=EXPIRED,
    )
    assert s.next_deadline() is None
    assert s.statistics().abandoned == {EXPIRED: 1}


def test_closing_after_abandonment_is_an_orphan() -> None:
    """A late closing event after abandonment is treated like any closing event without a start."""
    s = make(abandon_after=1.0)
    s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 1_000, 0.0)
    s.expire(5.0, 2_000)
    (out,) = s.feed(EvalAdded(correlation_id=CID, jobset_id=3, eval_id=9), 3_000, 6.0)
    assert isinstance(out, AddedEval)
    assert out.started_ns is None


def test_new_start_of_same_jobset_supersedes() -> None:
    """Hydra runs one evaluation per jobset, so a new eval_started proves the old one died."""
    s = make()
    s.feed(EvalStarted(correlation_id="1.1", jobset_id=3), 1_000, 0.0)
    s.feed(EvalStarted(correlation_id="9.9", jobset_id=4), 1_500, 0.5)
    (out,) = s.feed(EvalStarted(correlation_id="2.2", jobset_id=3), 2_000, 1.0)
    assert isinstance(out, Attempt)
    assert (out.kind, out.correlation_id, out.ended_ns, out.abandon_reason) == (
        AttemptKind.ABANDONED,
        "1.1",
        2_000,
        SUPERSEDED,
    )
    assert s.state(3, "2.2") is State.OPEN
    assert s.state(4, "9.9") is State.OPEN


def test_open_attempts_are_bounded() -> None:
    """At capacity a start is rejected and counted: no live evaluation is reported abandoned."""
    s = make(max_open=2)
    s.feed(EvalStarted(correlation_id="a", jobset_id=1), 1, 0.0)
    s.feed(EvalStarted(correlation_id="b", jobset_id=2), 2, 0.0)
    assert s.feed(EvalStarted(correlation_id="c", jobset_id=3), 3, 0.0) == []
    assert s.state(3, "c") is State.ABSENT
    assert (s.state(1, "a"), s.state(2, "b")) == (State.OPEN, State.OPEN)
    st = s.statistics()
    assert (st.open, st.abandoned, st.rejected) == (2, {}, {TOO_MANY_OPEN: 1})
    assert s.take_rejections() == [Rejection(TOO_MANY_OPEN, 1, 3, "c")]
    assert s.take_rejections() == []


def test_supersession_at_capacity_still_opens() -> None:
    """A start that supersedes its jobset's attempt frees that slot, so capacity does not reject it."""
    s = make(max_open=1)
    s.feed(EvalStarted(correlation_id="a", jobset_id=1), 1, 0.0)
    (out,) = s.feed(EvalStarted(correlation_id="b", jobset_id=1), 2, 1.0)
    assert isinstance(out, Attempt)
    assert out.abandon_reason == SUPERSEDED
    assert s.state(1, "b") is State.OPEN


def test_expiry_visits_only_due_attempts_in_order() -> None:
    """Deadlines expire oldest first and stop at the first one not yet due."""
    s = make(abandon_after=10.0)
    for i in range(5):
        s.feed(EvalStarted(correlation_id=str(i), jobset_id=i), i, float(i))
    out = s.expire(12.0, 99)
    assert [o.correlation_id for o in out] == ["0", "1", "2"]


def test_end_never_precedes_start() -> None:
    """A closing event whose receive time is before the start (clock step) is clamped."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 5_000, 0.0)
    (out,) = s.feed(EvalFailed(correlation_id=CID, jobset_id=3), 4_000, 1.0)
    assert isinstance(out, Attempt)
    assert out.ended_ns == 5_000


def test_transition_table_is_total() -> None:
    """Every (state, evaluation event) pair has a handler."""
    assert {(st, ev) for st in State for ev in (EvalStarted, EvalAdded, EvalCached, EvalFailed)} == set(
        TRANSITIONS
    )


def test_invalid_limits_are_rejected() -> None:
    """A non-positive lifetime or capacity is a programming error."""
    with pytest.raises(ValueError, match="abandon_after"):
        Stitcher(abandon_after=0, max_open=1)


def test_added_before_started_gives_no_abandoned_attempt() -> None:
    """eval_added overtaking its eval_started: the late start is ignored, counted, never abandoned."""
    s = make(abandon_after=100.0)
    (out,) = s.feed(EvalAdded(correlation_id=CID, jobset_id=3, eval_id=42), 5_000, 1.0)
    assert isinstance(out, AddedEval)
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 5_001, 1.1) == []
    assert s.state(3, CID) is State.CLOSED
    assert s.next_deadline() is None
    assert s.expire(1_000.0, 9_000) == []
    st = s.statistics()
    assert (st.open, st.abandoned, st.rejected) == (0, {}, {ALREADY_CLOSED: 1})


def test_late_start_after_a_paired_close_is_ignored() -> None:
    """A second (forged or replayed) eval_started after the evaluation closed does not reopen it."""
    s = make()
    s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 1_000, 0.0)
    s.feed(EvalFailed(correlation_id=CID, jobset_id=3), 2_000, 1.0)
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 3_000, 2.0) == []
    assert s.state(3, CID) is State.CLOSED
    assert s.expire(1.0 + IN_FLIGHT_GRACE, 4_000) == []  # past the failure's hand-over grace
    assert s.open_jobsets() == frozenset()
    assert s.statistics().rejected == {ALREADY_CLOSED: 1}


def test_closed_memory_expires() -> None:
    """A closed attempt is remembered for closed_ttl seconds, then a start with its key opens again."""
    s = Stitcher(abandon_after=100.0, max_open=10, closed_ttl=5.0)
    s.feed(EvalCached(correlation_id=CID, jobset_id=3, previous_eval_id=1), 1_000, 10.0)
    assert s.state(3, CID) is State.CLOSED
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 2_000, 14.9) == []
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=3), 3_000, 15.0) == []
    assert s.state(3, CID) is State.OPEN


def test_closed_memory_is_bounded() -> None:
    """At most max_closed closed attempts are remembered; the oldest is forgotten first."""
    s = Stitcher(abandon_after=100.0, max_open=10, max_closed=2)
    for cid in ("a", "b", "c"):
        s.feed(EvalFailed(correlation_id=cid, jobset_id=3), 1, 0.0)
    assert [s.state(3, c) for c in ("a", "b", "c")] == [State.ABSENT, State.CLOSED, State.CLOSED]


def test_start_for_unknown_jobset_is_rejected() -> None:
    """A start whose jobset is not in Hydra's table takes no state and is counted."""
    s = make()
    assert s.feed(EvalStarted(correlation_id=CID, jobset_id=999), 1, 0.0, jobset_known=False) == []
    assert s.state(999, CID) is State.ABSENT
    assert s.statistics().rejected == {UNKNOWN_JOBSET: 1}
    assert s.take_rejections() == [Rejection(UNKNOWN_JOBSET, 1, 999, CID)]


def test_flood_of_starts_is_bounded() -> None:
    """10,000 forged starts for one real jobset and 10,000 for unknown ones: one open attempt,
    at most SUPERSEDE_BURST abandoned reports, everything else counted."""
    s = make(max_open=100)
    out = []
    for i in range(10_000):
        out += s.feed(EvalStarted(correlation_id=f"f.{i}", jobset_id=1), i, i * 0.001)
        out += s.feed(
            EvalStarted(correlation_id=f"u.{i}", jobset_id=10_000 + i), i, i * 0.001, jobset_known=False
        )
    assert len(out) == SUPERSEDE_BURST
    st = s.statistics()
    assert st.open == 1
    assert st.rejected == {UNKNOWN_JOBSET: 10_000, SUPERSEDED_UNREPORTED: 10_000 - 1 - SUPERSEDE_BURST}
    assert {(r.reason, r.count) for r in s.take_rejections()} == set(st.rejected.items())


def test_supersession_budget_refills() -> None:
    """After the burst, one more superseded attempt is reported per SUPERSEDE_REFILL seconds."""
    s = make(abandon_after=10_000.0)
    now = 0.0
    reported = []
    for i in range(SUPERSEDE_BURST + 3):
        reported += s.feed(EvalStarted(correlation_id=str(i), jobset_id=1), i, now)
    assert len(reported) == SUPERSEDE_BURST
    now += SUPERSEDE_REFILL
    (one,) = s.feed(EvalStarted(correlation_id="later", jobset_id=1), 99, now)
    assert isinstance(one, Attempt)
    assert one.abandon_reason == SUPERSEDED
    assert s.feed(EvalStarted(correlation_id="again", jobset_id=1), 100, now) == []


def test_good_evaluations_pair_during_a_flood() -> None:
    """A real evaluation of another jobset still pairs while one jobset is flooded."""
    s = make(max_open=3)
    for i in range(1_000):
        s.feed(EvalStarted(correlation_id=f"f.{i}", jobset_id=1), i, 0.0)
    s.feed(EvalStarted(correlation_id=CID, jobset_id=2), 5_000, 1.0)
    (out,) = s.feed(EvalAdded(correlation_id=CID, jobset_id=2, eval_id=7), 6_000, 2.0)
    assert out == AddedEval(eval_id=7, jobset_id=2, correlation_id=CID, started_ns=5_000, ended_ns=6_000)
