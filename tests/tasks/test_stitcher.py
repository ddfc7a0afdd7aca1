"""run_stitcher on trio's virtual clock: abandonment, supersession, closing, and the end of the input."""

from __future__ import annotations

import trio
import trio.testing

from hydra_otel.core.evals import AddedEval, Attempt, AttemptKind
from hydra_otel.core.events import BuildFinished, EvalAdded, EvalFailed, EvalStarted, Received, StepFinished
from hydra_otel.core.stitch import EXPIRED, SUPERSEDED, Stitcher, Work
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.stitch_task import run_stitcher

ABANDON = 600.0


class Pipe:
    """run_stitcher between two channels, with the virtual time of every outcome."""

    def __init__(self) -> None:
        self.events, self._events_rx = trio.open_memory_channel[Received](100)
        self._out_tx, self.outcomes = trio.open_memory_channel[Work](100)
        self.stitcher = Stitcher(abandon_after=ABANDON, max_open=10)
        self.stats = Stats()

    async def run(self) -> None:
        await run_stitcher(self._events_rx, self._out_tx, self.stitcher, stats=self.stats)

    async def send(self, event: EvalStarted | EvalAdded | EvalFailed | StepFinished | BuildFinished) -> None:
        await self.events.send(Received(event=event, at_ns=int(trio.current_time() * 1e9)))

    async def next(self) -> tuple[float, Work]:
        with trio.fail_after(10 * ABANDON):
            outcome = await self.outcomes.receive()
        return trio.current_time(), outcome


def start(cid: str, jobset: int = 1) -> EvalStarted:
    return EvalStarted(correlation_id=cid, jobset_id=jobset)


async def test_run_stitcher_abandons_an_attempt_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An evaluation that never closes is reported abandoned abandon_after seconds after its start, not before."""
    p = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        t0 = trio.current_time()
        await p.send(start("a"))
        await trio.sleep(ABANDON - 1)
        await trio.testing.wait_all_tasks_blocked()
        assert p.outcomes.statistics().current_buffer_used == 0  # still open one second before
        at, outcome = await p.next()
        assert at == t0 + ABANDON
        assert isinstance(outcome, Attempt)
        assert (outcome.kind, outcome.correlation_id, outcome.abandon_reason) == (
            AttemptKind.ABANDONED,
            "a",
            EXPIRED,
        )
        assert outcome.started_ns == int(t0 * 1e9)
        await p.events.aclose()
    assert p.stitcher.statistics().abandoned == {EXPIRED: 1}


async def test_run_stitcher_wakes_for_the_earliest_deadline_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two open attempts are abandoned at their own deadlines, each on time, in start order."""
    p = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        t0 = trio.current_time()
        await p.send(start("a", jobset=1))
        await trio.sleep(100)
        await p.send(start("b", jobset=2))
        first, second = await p.next(), await p.next()
        assert [(at - t0, w.correlation_id) for at, w in (first, second) if isinstance(w, Attempt)] == [
            (ABANDON, "a"),
            (ABANDON + 100, "b"),
        ]
        await p.events.aclose()


async def test_run_stitcher_reports_a_superseded_attempt_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A new start of the same jobset abandons the open attempt immediately; the new one keeps its own deadline."""
    p = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        t0 = trio.current_time()
        await p.send(start("old"))
        await trio.sleep(10)
        await p.send(start("new"))
        at, outcome = await p.next()
        assert at == t0 + 10
        assert isinstance(outcome, Attempt)
        assert (outcome.correlation_id, outcome.abandon_reason) == ("old", SUPERSEDED)
        at, outcome = await p.next()
        assert at == t0 + 10 + ABANDON
        assert isinstance(outcome, Attempt)
        assert (outcome.correlation_id, outcome.abandon_reason) == ("new", EXPIRED)
        await p.events.aclose()


async def test_run_stitcher_closes_an_attempt_and_never_abandons_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failure notification closes the attempt with its start time; its deadline then passes silently."""
    p = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        t0 = trio.current_time()
        await p.send(start("a"))
        await trio.sleep(30)
        await p.send(EvalFailed(correlation_id="a", jobset_id=1))
        at, outcome = await p.next()
        assert at == t0 + 30
        assert outcome == Attempt(
            kind=AttemptKind.FAILED,
            jobset_id=1,
            correlation_id="a",
            started_ns=int(t0 * 1e9),
            ended_ns=int((t0 + 30) * 1e9),
        )
        await trio.sleep(2 * ABANDON)
        await trio.testing.wait_all_tasks_blocked()
        assert p.outcomes.statistics().current_buffer_used == 0
        await p.events.aclose()
    assert p.stitcher.statistics().abandoned == {}


async def test_run_stitcher_pairs_eval_added_and_passes_build_events_through_in_order() -> None:
    """Build events are forwarded as they are, in order with the evaluation outcomes."""
    p = Pipe()
    step = StepFinished(build_id=5, step_nr=1, log_path=None)
    build = BuildFinished(build_id=5, dependents=())
    for event in (start("a"), step, EvalAdded(correlation_id="a", jobset_id=1, eval_id=9), build):
        p.events.send_nowait(Received(event=event, at_ns=1_000))
    p.events.close()
    await p.run()
    assert [w async for w in p.outcomes] == [
        step,
        AddedEval(eval_id=9, jobset_id=1, correlation_id="a", started_ns=1_000, ended_ns=1_000),
        build,
    ]


async def test_run_stitcher_leaves_open_attempts_open_when_its_input_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At shutdown an attempt still open is a live evaluation: nothing is reported, and the output closes."""
    p = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        await p.send(start("a"))
        await trio.sleep(ABANDON / 2)
        await p.events.aclose()
    assert [w async for w in p.outcomes] == []  # ends: the output channel was closed
    assert p.stitcher.statistics().open == 1
