"""A start supersedes the jobset's open attempt only when the jobset's row shows a new evaluator run.

hydra-evaluator writes ``jobsets.starttime`` before it spawns the process that sends
``eval_started`` and clears it when the process exits; any role can send ``eval_started``.
"""

from __future__ import annotations

from hydra_otel.core.evals import Attempt, AttemptKind
from hydra_otel.core.events import EvalFailed, EvalStarted
from hydra_otel.core.stitch import (
    CONTESTED_START,
    LOST_CONTEST,
    SUPERSEDED,
    ClosingCheck,
    JobsetCheck,
    State,
    Stitcher,
    Unchecked,
)

T = 1_700_000_000
S = 1_000_000_000


def ns(seconds_after_t: float) -> int:
    """A receive time, ``seconds_after_t`` after the run recorded at T."""
    return int((T + seconds_after_t) * S)


REAL = "4112.262815283.16494"
FORGED = "4113.1.666"


def make(max_open: int = 10) -> Stitcher:
    return Stitcher(abandon_after=100.0, max_open=max_open)


def row(start_time: int | None, *, failed_at: int | None = None) -> ClosingCheck:
    """The jobset's row: running since ``start_time`` (None: not running); failed at ``failed_at``."""
    return ClosingCheck(
        jobset=JobsetCheck(
            last_checked=failed_at,
            has_error=failed_at is not None,
            error_time=failed_at,
            has_fetch_error=False,
            start_time=start_time,
        )
    )


def start(s: Stitcher, cid: str, at: int, now: float, check: ClosingCheck | Unchecked) -> list[object]:
    return list(s.feed(EvalStarted(correlation_id=cid, jobset_id=1), at, now, check=check))


def test_forged_start_in_the_same_run_leaves_the_real_attempt_open() -> None:
    """The defect: a forged start while the real evaluation runs reported it abandoned, then failed."""
    s = make()
    assert start(s, REAL, ns(1), 0.0, row(T)) == []
    assert start(s, FORGED, ns(2), 1.0, row(T)) == []
    assert s.state(1, REAL) is State.OPEN
    assert s.state(1, FORGED) is State.CONTESTED
    (out,) = s.feed(
        EvalFailed(correlation_id=REAL, jobset_id=1), ns(3), 2.0, check=row(None, failed_at=T + 5)
    )
    assert isinstance(out, Attempt)
    assert (out.kind, out.correlation_id, out.started_ns) == (AttemptKind.FAILED, REAL, ns(1))
    st = s.statistics()
    assert st.abandoned == {}
    assert st.rejected == {CONTESTED_START: 1}
    # The contested start is dropped at its deadline, never reported.
    assert s.expire(500.0, ns(9)) == []
    assert s.state(1, FORGED) is State.ABSENT


def test_start_while_no_run_is_recorded_is_contested() -> None:
    """With ``starttime`` NULL no evaluation runs: a second start cannot prove the first dead."""
    s = make()
    start(s, "fz.1", ns(1), 0.0, row(None))
    for i in range(2, 50):
        assert start(s, f"fz.{i}", ns(1) + i, float(i), row(None)) == []
    st = s.statistics()
    assert st.abandoned == {}
    assert st.rejected == {CONTESTED_START: 48}
    assert st.open == 1


def test_a_new_run_supersedes_the_open_attempt() -> None:
    """A ``starttime`` other than the open attempt's is a new run: the old one died unannounced."""
    s = make()
    start(s, "run.1", ns(1), 0.0, row(T))
    (dead,) = start(s, "run.2", ns(601), 1.0, row(T + 600))
    assert isinstance(dead, Attempt)
    assert (dead.kind, dead.correlation_id, dead.abandon_reason) == (
        AttemptKind.ABANDONED,
        "run.1",
        SUPERSEDED,
    )
    assert s.state(1, "run.2") is State.OPEN


def test_a_run_seen_after_an_unrecorded_one_supersedes() -> None:
    """An attempt opened while no run was recorded (a forged start) gives way to a recorded run."""
    s = make()
    start(s, "fz.1", ns(1), 0.0, row(None))
    (dead,) = start(s, REAL, ns(2), 1.0, row(T))
    assert isinstance(dead, Attempt)
    assert dead.correlation_id == "fz.1"
    assert s.state(1, REAL) is State.OPEN


def test_the_contested_start_that_closes_was_the_real_one() -> None:
    """A forged start got in first; the real start, contested, wins when its close is vouched for."""
    s = make()
    start(s, FORGED, ns(1), 0.0, row(T))
    start(s, REAL, ns(1.5), 0.5, row(T))
    (out,) = s.feed(
        EvalFailed(correlation_id=REAL, jobset_id=1), ns(3), 2.0, check=row(None, failed_at=T + 5)
    )
    assert isinstance(out, Attempt)
    assert (out.correlation_id, out.started_ns, out.kind) == (REAL, ns(1.5), AttemptKind.FAILED)
    assert s.state(1, FORGED) is State.ABSENT  # dropped, not reported abandoned
    assert s.statistics().rejected == {CONTESTED_START: 1, LOST_CONTEST: 1}
    assert s.expire(500.0, ns(9)) == []
    assert s.statistics().abandoned == {}


def test_rows_unreadable_a_start_supersedes_as_before() -> None:
    s = make()
    start(s, "run.1", ns(1), 0.0, row(T))
    (dead,) = start(s, "run.2", ns(2), 1.0, Unchecked.UNREADABLE)
    assert isinstance(dead, Attempt)
    assert dead.abandon_reason == SUPERSEDED


def test_contested_starts_are_bounded() -> None:
    s = make(max_open=4)
    start(s, REAL, ns(1), 0.0, row(T))
    for i in range(1_000):
        start(s, f"fz.{i}", ns(1), 1.0, row(T))
    contested = [i for i in range(1_000) if s.state(1, f"fz.{i}") is State.CONTESTED]
    assert contested == [996, 997, 998, 999]
    assert s.state(1, REAL) is State.OPEN


def test_a_start_read_late_is_not_taken_for_a_later_run() -> None:
    """Backlog: a crashed run's start is read after the next run was recorded. It is not that run's
    (recorded after the start arrived), so the next run's start supersedes it, crash and all."""
    s = make()
    start(s, "run.1", ns(1), 0.0, row(T + 60))  # the row already shows the next run
    (dead,) = start(s, "run.2", ns(61), 0.1, row(T + 60))
    assert isinstance(dead, Attempt)
    assert (dead.correlation_id, dead.abandon_reason) == ("run.1", SUPERSEDED)
    assert s.state(1, "run.2") is State.OPEN


def test_a_vouched_close_of_a_start_without_run_ends_an_attempt_of_another_run() -> None:
    """A start read after its run was over (``starttime`` cleared) is contested; its vouched close
    proves the open attempt's run over too, which is reported as superseded, not dropped."""
    s = make()
    start(s, "run.1", ns(1), 0.0, row(T))
    assert start(s, "run.2", ns(90), 1.0, row(None)) == []
    out = s.feed(
        EvalFailed(correlation_id="run.2", jobset_id=1), ns(95), 2.0, check=row(None, failed_at=T + 92)
    )
    assert [(o.correlation_id, o.kind) for o in out if isinstance(o, Attempt)] == [
        ("run.1", AttemptKind.ABANDONED),
        ("run.2", AttemptKind.FAILED),
    ]
    assert s.statistics().rejected == {CONTESTED_START: 1}
