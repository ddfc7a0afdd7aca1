"""Catchup and run_catchup over an in-memory database, on trio's virtual clock.

run_catchup reads and merges the stored marks in a worker thread. The autojump clock jumps
whenever every task waits, a thread included, so each test starts the task before anything
else sets a deadline; after that no thread is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import trio
import trio.testing

from hydra_otel.adapters import queries as q
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.evals import AddedEval, Attempt, AttemptKind
from hydra_otel.core.events import BuildFinished, StepFinished
from hydra_otel.core.stitch import Work
from hydra_otel.tasks.catchup_task import Catchup, CatchupSettings, CatchupState, run_catchup
from tests.tasks.fakedb import FakeDb

T = 1_700_000_000
LAG = 2
INTERVAL = 30.0


@dataclass
class FakeStore:
    """The marks store, in memory."""

    stored: Marks | None = None
    merged: list[Marks] = field(default_factory=list)

    def load(self) -> Marks | None:
        return self.stored

    def merge(self, marks: Marks) -> Marks:
        self.stored = marks if self.stored is None else self.stored.merged(marks)
        self.merged.append(marks)
        return self.stored


def drain(rx: trio.MemoryReceiveChannel[Work | Checkpoint]) -> list[Work | Checkpoint]:
    out: list[Work | Checkpoint] = []
    while True:
        try:
            out.append(rx.receive_nowait())
        except trio.WouldBlock:
            return out


def added(eval_id: int, jobset_id: int = 1) -> AddedEval:
    return AddedEval(eval_id=eval_id, jobset_id=jobset_id, correlation_id="", started_ns=None, ended_ns=0)


def build(build_id: int, stop_time: int) -> BuildFinished:
    return BuildFinished(build_id=build_id, dependents=(), stop_time=stop_time)


async def test_catchup_scan_sends_each_page_then_a_checkpoint_of_it() -> None:
    """Evaluations and builds go page by page, each page followed by marks that cover it and no more."""
    db = FakeDb(now=T)
    for i in range(1, 4):
        db.add_eval(10 + i, jobset_id=1, timestamp=T - 50)
    db.add_build(5, T - 40)
    db.add_build(6, T - 30)
    db.add_build(7, T - 30)
    db.add_build(8, T - 1)  # inside the lag window: not yet
    db.add_build(9, T - 20, finished=False)
    db.add_step(9, 1, T - 20)
    db.add_step(9, 2, None)  # still running
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    catchup = Catchup(db, work_tx, CatchupSettings(page=2, lag=LAG, overlap=100, eval_overlap=0))
    progress = CatchupState(marks=Marks(eval_id=10, stop_time=T - 60), live_jobsets={})
    await catchup.scan(progress)
    assert drain(work_rx) == [
        added(11),
        added(12),
        Checkpoint(Marks(eval_id=12, stop_time=T - 60)),
        added(13),
        Checkpoint(Marks(eval_id=13, stop_time=T - 60)),
        build(5, T - 40),
        build(6, T - 30),
        Checkpoint(Marks(eval_id=13, stop_time=T - 30)),
        build(7, T - 30),
        Checkpoint(Marks(eval_id=13, stop_time=T - 30)),
        StepFinished(build_id=9, step_nr=1, log_path=None),
        Checkpoint(Marks(eval_id=13, stop_time=T - LAG)),
    ]
    assert progress.marks == Marks(eval_id=13, stop_time=T - LAG)
    assert progress.scans == 1


async def test_catchup_scan_does_not_send_again_what_it_sent() -> None:
    """The overlap re-reads rows; what this process already sent is not sent twice, the marks still come."""
    db = FakeDb(now=T)
    db.add_eval(1, jobset_id=1, timestamp=T - 50)
    db.add_build(5, T - 40)
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    catchup = Catchup(db, work_tx, CatchupSettings(lag=LAG, overlap=100))
    progress = CatchupState(marks=Marks(stop_time=T - 60), live_jobsets={})
    await catchup.scan(progress)
    assert [w for w in drain(work_rx) if not isinstance(w, Checkpoint)] == [added(1), build(5, T - 40)]
    db.now += 10
    db.add_build(6, T - 5)
    await catchup.scan(progress)
    assert drain(work_rx) == [
        Checkpoint(Marks(eval_id=1, stop_time=T - LAG)),
        build(6, T - 5),
        Checkpoint(Marks(eval_id=1, stop_time=T - LAG)),  # marks never move back
        Checkpoint(Marks(eval_id=1, stop_time=T + 10 - LAG)),
    ]


async def test_catchup_reports_failed_checks_of_jobsets_the_stitcher_is_not_following() -> None:
    """A failure recorded since the jobset mark becomes an attempt, unless the live path follows the jobset."""
    db = FakeDb(now=T)
    db.add_jobset(1, T - 10, errormsg="boom", errortime=T - 10)
    db.add_jobset(2, T - 10, fetcherrormsg="no git")
    db.add_jobset(3, T - 10)  # succeeded
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    catchup = Catchup(db, work_tx, CatchupSettings(lag=LAG), open_jobsets=lambda: frozenset({2}))
    progress = CatchupState(
        marks=Marks(stop_time=T, jobsets={1: T - 20, 2: T - 20, 3: T - 20}), live_jobsets={}
    )
    await catchup.scan(progress)
    attempts = [w for w in drain(work_rx) if isinstance(w, Attempt)]
    assert [(a.kind, a.jobset_id) for a in attempts] == [(AttemptKind.FAILED, 1)]
    assert progress.marks.jobsets == {1: T - 10, 2: T - 20, 3: T - 10}


async def test_catchup_start_marks_begin_at_the_present_on_a_first_start() -> None:
    """Without stored marks, history is left to backfill: the marks start at the database clock minus look_back."""
    db = FakeDb(now=T)
    db.add_eval(1, jobset_id=1, timestamp=T - 100)
    db.add_eval(2, jobset_id=1, timestamp=T - 5)
    db.add_jobset(1, T - 3)
    work_tx, _ = trio.open_memory_channel[Work | Checkpoint](1)
    catchup = Catchup(db, work_tx, CatchupSettings(lag=LAG, look_back=10))
    assert await catchup.start_marks(None) == Marks(eval_id=1, stop_time=T - 10 - LAG, jobsets={1: T - 10})
    stored = Marks(eval_id=7)
    assert await catchup.start_marks(stored) is stored


class Scans:
    """run_catchup against a database whose clock follows the virtual one; notes when each scan ran."""

    def __init__(self, db: FakeDb, store: FakeStore, *, eval_overlap: int = 10) -> None:
        self.db = db
        self.store = store
        self.work_tx, self.work_rx = trio.open_memory_channel[Work | Checkpoint](10_000)
        self.triggers, self._triggers_rx = trio.open_memory_channel[str](10)
        self.settings = CatchupSettings(interval=INTERVAL, lag=LAG, overlap=100, eval_overlap=eval_overlap)
        self.catchup = Catchup(db, self.work_tx, self.settings)

    def times(self, t0: float) -> list[float]:
        """Virtual times (from ``t0``) of the scans: each reads the database clock first."""
        return [at - t0 for sql, at in self.db.timed if sql == q.CATCHUP_START_SQL]

    async def start(self, nursery: trio.Nursery) -> CatchupState:
        progress: CatchupState = await nursery.start(
            functools.partial(
                run_catchup, self.catchup, self.store, self._triggers_rx, self.settings, live_jobsets={}
            )
        )
        return progress


async def test_run_catchup_scans_at_start_once_more_after_the_lag_then_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Start-up scan, a follow-up lag + 1 s later, then one per interval; a trigger scans at once, and again after the lag."""
    db = FakeDb(now=T)
    s = Scans(db, FakeStore(stored=Marks(stop_time=T - 10)))
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        db.follow(t0)
        await s.start(nursery)
        await trio.sleep(38)
        assert s.times(t0) == [0, 3, 33]  # start, follow-up (lag + 1), interval
        s.triggers.send_nowait("builds_cancelled")
        await trio.sleep(3.5)
        assert s.times(t0) == [0, 3, 33, 38, 41]  # the trigger's scan and its follow-up
        await trio.sleep(30)
        assert s.times(t0)[5:] == [71]  # the interval counts from the last scan
        nursery.cancel_scope.cancel()


async def test_run_catchup_coalesces_pending_triggers_into_one_scan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Triggers queued while a scan runs start one scan between them, not one each."""
    db = FakeDb(now=T)
    s = Scans(db, FakeStore(stored=Marks(stop_time=T - 10)))
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        db.follow(t0)
        await s.start(nursery)
        await trio.sleep(10)  # past the follow-up
        for reason in ("connected", "overflow", "builds_restarted"):
            s.triggers.send_nowait(reason)
        await trio.sleep(1)
        assert s.times(t0) == [0, LAG + 1, 10]
        nursery.cancel_scope.cancel()


async def test_run_catchup_follow_up_finds_what_stopped_in_the_lag_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A build that stopped just before start-up is invisible to the first scan and sent by the follow-up."""
    db = FakeDb(now=T)
    db.add_build(5, T - 1)  # its build_finished was lost while the daemon was down
    store = FakeStore(stored=Marks(stop_time=T - 10))
    s = Scans(db, store)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        db.follow(t0)
        progress = await s.start(nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert build(5, T - 1) not in drain(s.work_rx)
        assert progress.marks.stop_time == T - LAG
        await trio.sleep(LAG + 1 + 0.5)
        assert s.times(t0) == [0, LAG + 1]
        assert build(5, T - 1) in drain(s.work_rx)
        assert progress.marks.stop_time == T + LAG + 1 - LAG
        nursery.cancel_scope.cancel()


async def test_run_catchup_stores_the_first_marks_at_once_and_scans_from_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """On a first start the marks are stored before any scan: a restart resumes from here, not from "now"."""
    db = FakeDb(now=T)
    db.add_eval(3, jobset_id=1, timestamp=T - 100)
    store = FakeStore()
    s = Scans(db, store, eval_overlap=0)
    async with trio.open_nursery() as nursery:
        progress = await s.start(nursery)
        assert store.merged == [Marks(eval_id=3, stop_time=T - LAG, jobsets={})]
        await trio.testing.wait_all_tasks_blocked()
        assert [w for w in drain(s.work_rx) if not isinstance(w, Checkpoint)] == []  # eval 3 is history
        assert progress.scans == 1
        nursery.cancel_scope.cancel()


async def test_run_catchup_waits_for_the_database_and_then_scans(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the database is down nothing is sent and nothing is lost; the scan runs once it answers."""
    db = FakeDb(now=T, down=True)
    db.add_eval(4, jobset_id=1, timestamp=T - 5)
    s = Scans(db, FakeStore(stored=Marks(eval_id=3, stop_time=T - 10)))
    async with trio.open_nursery() as nursery:
        progress = await s.start(nursery)
        await trio.sleep(20)
        assert drain(s.work_rx) == []
        assert progress.scans == 0
        refused = len(db.log)
        assert refused > 2  # retried, with backoff
        db.down = False
        await trio.sleep(31)
        assert added(4) in drain(s.work_rx)
        assert progress.scans >= 1
        nursery.cancel_scope.cancel()
