"""The evaluation stitcher: pairing, orphans, duplicates, abandonment, bounds."""

from __future__ import annotations

import pytest

from hydra_otel.core.evals import AddedEval, Attempt, AttemptKind
from hydra_otel.core.events import EvalAdded, EvalCached, EvalFailed, EvalStarted
from hydra_otel.core.stitch import EVICTED, EXPIRED, SUPERSEDED, TRANSITIONS, State, Stitcher

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
    assert s.state(3, CID) is State.ABSENT
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
    """At capacity the oldest open attempt is abandoned to make room."""
    s = make(max_open=2)
    s.feed(EvalStarted(correlation_id="a", jobset_id=1), 1, 0.0)
    s.feed(EvalStarted(correlation_id="b", jobset_id=2), 2, 0.0)
    (out,) = s.feed(EvalStarted(correlation_id="c", jobset_id=3), 3, 0.0)
    assert isinstance(out, Attempt)
    assert (out.correlation_id, out.abandon_reason) == ("a", EVICTED)
    assert s.statistics().open == 2


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
