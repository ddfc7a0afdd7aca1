"""Resolver and run_resolver over an in-memory database: spans, missing rows, and where checkpoints go.

Progress marks must never move past work that was not exported: a checkpoint leaves the
resolver only behind the spans of the work before it, and the exporter stores it only
once those spans were acknowledged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import trio
import trio.testing

from hydra_otel.adapters.otlp import DELIVERED, Delivery
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.batching import CompleteSpans
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.evals import Attempt, AttemptKind
from hydra_otel.core.spans import SpanRecord
from hydra_otel.core.stitch import Work
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.exporter import ExportItem, run_exporter
from hydra_otel.tasks.resolver import Resolver, run_resolver
from tests.factories import RENDER_CONFIG
from tests.tasks.fakedb import FakeDb

T = 1_700_000_000

Out = ExportItem


def failed(jobset_id: int, cid: str = "c") -> Attempt:
    return Attempt(
        kind=AttemptKind.FAILED, jobset_id=jobset_id, correlation_id=cid, started_ns=None, ended_ns=T * 10**9
    )


def database() -> FakeDb:
    db = FakeDb(now=T)
    db.add_jobset(1, T - 10, errormsg="boom", errortime=T - 10)
    db.add_jobset(2, T - 20, errormsg="bang", errortime=T - 20)
    return db


def kinds(items: list[Out]) -> list[object]:
    """Each output item as the span names of a list, or the checkpoint's marks."""
    return [
        i.marks
        if isinstance(i, Checkpoint)
        else [r.name for r in (i.spans if isinstance(i, CompleteSpans) else i)]
        for i in items
    ]


async def test_resolver_renders_attempts_and_records_their_jobset_checks() -> None:
    """An attempt becomes one span; its jobset's check is remembered as handled and as not yet sent."""
    stats = Stats()
    resolver = Resolver.create(database(), RENDER_CONFIG, stats)
    spans = await resolver.resolve([failed(1), failed(2, "d")])
    assert [(s.attrs()["hydra.jobset.id"], s.parent_span_id) for s in spans] == [(1, None), (2, None)]
    assert resolver.live_jobsets == resolver.unsent_jobsets == {1: T - 10, 2: T - 20}


async def test_resolver_skips_and_counts_work_whose_row_is_missing() -> None:
    """A jobset that is not in the database (a forged or deleted ID) is counted and skipped, not fatal."""
    stats = Stats()
    resolver = Resolver.create(database(), RENDER_CONFIG, stats)
    assert len(await resolver.resolve([failed(1), failed(99)])) == 1
    assert stats.missing_rows == {"jobsets": 1}
    assert 99 not in resolver.live_jobsets


async def test_resolver_drops_exact_repeats_of_exported_spans() -> None:
    """The same outcome resolved again (a re-delivered notification) yields no span the second time."""
    stats = Stats()
    db = database()
    resolver = Resolver.create(db, RENDER_CONFIG, stats)
    assert len(await resolver.resolve([failed(1)])) == 1
    assert await resolver.resolve([failed(1)]) == []
    assert stats.spans_deduplicated == 1


async def resolve_all(db: FakeDb, work: list[Work | Checkpoint], *, live: bool = False) -> list[Out]:
    """Run run_resolver over ``work`` to its end; return everything it sent, in order."""
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    out_tx, out_rx = trio.open_memory_channel[Out](100)
    for item in work:
        work_tx.send_nowait(item)
    work_tx.close()
    resolver = Resolver.create(db, RENDER_CONFIG, Stats())
    with trio.fail_after(5):
        await run_resolver(work_rx, out_tx, resolver, backoff=Backoff(), live=live)
    return [item async for item in out_rx]


async def test_run_resolver_keeps_checkpoints_behind_the_spans_of_the_work_before_them() -> None:
    """Each checkpoint follows the spans of what came before it, preceded by the live jobset checks resolved."""
    m1, m2 = Marks(stop_time=T - 5), Marks(stop_time=T)
    out = await resolve_all(database(), [failed(1), Checkpoint(m1), failed(2), Checkpoint(m2)])
    name1, name2 = [[s.name for s in i] for i in out if isinstance(i, list)]
    assert kinds(out) == [
        name1,
        Marks(jobsets={1: T - 10}),  # the live outcome's check, right behind its span
        m1,
        name2,
        Marks(jobsets={2: T - 20}),
        m2,
    ]


async def test_run_resolver_sends_the_live_checks_of_the_last_batch_when_input_ends() -> None:
    """Without a checkpoint after it, a live outcome's check still follows its span (so a restart skips it)."""
    out = await resolve_all(database(), [failed(1)])
    assert [type(i) for i in out] == [list, Checkpoint]
    assert out[1] == Checkpoint(Marks(jobsets={1: T - 10}))


async def test_run_resolver_marks_live_spans_with_nothing_queued_behind_them_complete() -> None:
    """Live: the last segment's spans (nothing queued, no checkpoint after) go as CompleteSpans."""
    out = await resolve_all(database(), [failed(1), failed(2, "d")], live=True)
    assert [type(i) for i in out] == [CompleteSpans, Checkpoint]
    complete = out[0]
    assert isinstance(complete, CompleteSpans)
    assert len(complete.spans) == 2


async def test_run_resolver_leaves_spans_before_a_checkpoint_and_backfill_spans_incomplete() -> None:
    """A catch-up page ends with its checkpoint, which sends it; without ``live`` nothing is complete."""
    paged = await resolve_all(database(), [failed(1), Checkpoint(Marks(stop_time=T))], live=True)
    assert [type(i) for i in paged] == [list, Checkpoint, Checkpoint]
    backfill = await resolve_all(database(), [failed(1)], live=False)
    assert [type(i) for i in backfill] == [list, Checkpoint]


async def test_run_resolver_does_not_mark_a_list_complete_while_more_work_is_queued() -> None:
    """Work queued behind a batch (a burst) keeps its lists incomplete, so the exporter fills batches."""
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    out_tx, out_rx = trio.open_memory_channel[Out](100)
    for jobset in (1, 2):
        work_tx.send_nowait(failed(jobset, f"c{jobset}"))
    work_tx.close()
    resolver = Resolver.create(database(), RENDER_CONFIG, Stats())
    with trio.fail_after(5):
        await run_resolver(work_rx, out_tx, resolver, backoff=Backoff(), batch_size=1, live=True)
    out = [type(i) for i in [item async for item in out_rx]]
    assert out == [list, Checkpoint, CompleteSpans, Checkpoint]


async def test_run_resolver_holds_work_and_its_checkpoint_while_the_database_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Nothing is dropped or passed over while the database is down: spans, then the checkpoint, once it answers."""
    db = database()
    db.down = True
    resolver = Resolver.create(db, RENDER_CONFIG, Stats())
    marks = Marks(stop_time=T)
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    out_tx, out_rx = trio.open_memory_channel[Out](100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(run_resolver, backoff=Backoff(base=1.0, cap=4.0)),
            work_rx,
            out_tx,
            resolver,
        )
        work_tx.send_nowait(failed(1))
        work_tx.send_nowait(Checkpoint(marks))
        await trio.sleep(60)
        with_db_down = len(db.log)
        assert out_rx.statistics().current_buffer_used == 0
        assert with_db_down > 10  # retried all along, at most every 4 s (+20 %)
        db.down = False
        with trio.fail_after(10):
            spans = await out_rx.receive()
            assert isinstance(spans, list)
            assert len(spans) == 1
            assert await out_rx.receive() == Checkpoint(Marks(jobsets={1: T - 10}))
            assert await out_rx.receive() == Checkpoint(marks)
        await work_tx.aclose()


class FlakySink:
    """Refuses the first ``failures`` exports (the endpoint is down), then takes everything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.acked_at: list[float] = []

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        if self.failures:
            self.failures -= 1
            return Delivery(done=False, reason="UNAVAILABLE")
        self.acked_at.append(trio.current_time())
        return DELIVERED

    def shutdown(self) -> None:
        pass


async def test_run_resolver_and_run_exporter_store_marks_only_after_the_endpoint_took_the_spans(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Through both tasks: a checkpoint's marks are committed after its spans were acknowledged, never before."""
    db = database()
    sink = FlakySink(failures=3)
    stats = Stats()
    committed: list[tuple[float, Marks]] = []

    async def commit(marks: Marks) -> None:
        committed.append((trio.current_time(), marks))

    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    span_tx, span_rx = trio.open_memory_channel[Out](100)
    resolver = Resolver.create(db, RENDER_CONFIG, stats)
    marks = Marks(stop_time=T)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(run_resolver, backoff=Backoff()), work_rx, span_tx, resolver)
        nursery.start_soon(
            functools.partial(
                run_exporter, batch_size=10, delay=1.0, backoff=Backoff(base=1.0, cap=1.0), commit=commit
            ),
            span_rx,
            sink,
            stats,
        )
        async with work_tx:
            await work_tx.send(failed(1))
            await work_tx.send(Checkpoint(marks))
    assert len(sink.acked_at) == 1
    assert [m for _, m in committed] == [Marks(jobsets={1: T - 10}), marks]
    assert all(at >= sink.acked_at[0] for at, _ in committed)
    assert sink.acked_at[0] >= 3 * 0.8  # three failed tries, about a second apart, came first
    assert (stats.export_failures, stats.spans_exported, stats.spans_dropped) == (3, 1, 0)
