"""The exporter task's batching, on trio's virtual clock (no sockets, no sleeps)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from hydra_otel.adapters.otlp import DELIVERED, Delivery
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.batching import CompleteSpans
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.spans import SpanRecord
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.exporter import run_exporter
from tests.factories import make_span

DELAY = 1.0
BATCH = 4

Item = Sequence[SpanRecord] | CompleteSpans | Checkpoint


class RecordingSink:
    """Acknowledges every batch, noting the virtual time it was sent at."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, list[int]]] = []
        self.changed = trio.Event()

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        self.sent.append((trio.current_time(), [r.span_id for r in batch]))
        self.changed.set()
        self.changed = trio.Event()
        return DELIVERED

    def shutdown(self) -> None:
        pass


class Harness:
    def __init__(self) -> None:
        self.sink = RecordingSink()
        self.stats = Stats()
        self.committed: list[Marks] = []
        self.send, self.receive = trio.open_memory_channel[Item](100)

    async def commit(self, marks: Marks) -> None:
        self.committed.append(marks)

    async def run(self) -> None:
        await run_exporter(
            self.receive,
            self.sink,
            self.stats,
            batch_size=BATCH,
            delay=DELAY,
            backoff=Backoff(),
            commit=self.commit,
        )

    async def until_sent(self, batches: int) -> None:
        with trio.fail_after(60):
            while len(self.sink.sent) < batches:
                await self.sink.changed.wait()


async def test_run_exporter_sends_a_full_batch_at_once(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=i) for i in range(BATCH)])
        await h.until_sent(1)
        assert h.sink.sent == [(start, [0, 1, 2, 3])]
        await h.send.aclose()


async def test_run_exporter_holds_a_partial_batch_for_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=1)])
        await trio.sleep(0.5)
        await h.send.send([make_span(span_id=2)])
        await h.until_sent(1)
        # Timed from the oldest span, not the latest one.
        assert h.sink.sent == [(start + DELAY, [1, 2])]
        await h.send.aclose()


async def test_run_exporter_sends_the_remainder_of_an_oversized_list_after_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One list of 6 spans: a full batch of 4 goes at once; the other 2 must not wait for more input.
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=i) for i in range(6)])
        await h.until_sent(2)
        assert h.sink.sent == [(start, [0, 1, 2, 3]), (start + DELAY, [4, 5])]
        await h.send.aclose()
    assert h.stats.spans_exported == 6


async def test_run_exporter_sends_a_complete_list_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """Live work's spans, batched by the LISTEN connection already, do not wait for the delay."""
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=1)])  # pending ahead of it: goes along
        await h.send.send(CompleteSpans([make_span(span_id=2)]))
        await h.until_sent(1)
        assert h.sink.sent == [(start, [1, 2])]
        await h.send.aclose()


async def test_run_exporter_fills_batches_from_complete_lists_queued_behind_each_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A burst's complete lists, queued before the exporter wakes, go as full batches plus one remainder."""
    h = Harness()
    for i in range(3):
        h.send.send_nowait(CompleteSpans([make_span(span_id=3 * i + j) for j in range(3)]))
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(h.run)
        await h.until_sent(3)
        assert h.sink.sent == [(start, [0, 1, 2, 3]), (start, [4, 5, 6, 7]), (start, [8])]
        await h.send.aclose()


async def test_run_exporter_commits_after_a_complete_list_only_once_it_was_acknowledged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A checkpoint behind a complete list is stored after that list was exported, never before."""
    h = Harness()
    marks = Marks(stop_time=7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        await h.send.send(CompleteSpans([make_span(span_id=1)]))
        await h.until_sent(1)
        assert h.committed == []
        await h.send.send(Checkpoint(marks))
        await h.send.aclose()
    assert [ids for _, ids in h.sink.sent] == [[1]]
    assert h.committed == [marks]


async def test_run_exporter_flushes_at_a_checkpoint_and_commits_it_after_the_spans(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    marks = Marks(stop_time=123)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=1)])
        await h.send.send(Checkpoint(marks))
        await h.until_sent(1)
        await h.send.aclose()
    assert h.sink.sent == [(start, [1])]
    assert h.committed == [marks]


async def test_run_exporter_flushes_what_is_left_when_its_input_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=i) for i in range(5)])
        await h.send.aclose()
    assert h.sink.sent == [(start, [0, 1, 2, 3]), (start, [4])]
    assert h.stats.spans_dropped == 0


class RefusingSink(RecordingSink):
    """Refuses the spans whose IDs are in ``poison`` (as OtlpSink reports them), takes the rest."""

    def __init__(self, poison: set[int]) -> None:
        super().__init__()
        self.poison = poison

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        await super().export(batch)
        refused = tuple((r, "INVALID_ARGUMENT: bad") for r in batch if r.span_id in self.poison)
        return Delivery(done=True, refused=refused, repaired=1)


async def test_run_exporter_counts_and_logs_a_refused_span_once_and_the_checkpoint_advances(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness()
    h.sink = RefusingSink(poison={2})
    marks = Marks(stop_time=123)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        await h.send.send([make_span(span_id=i) for i in range(1, 4)])
        await h.send.send(Checkpoint(marks))
        await h.send.aclose()
    assert h.committed == [marks]
    assert (h.stats.spans_refused, h.stats.spans_exported, h.stats.spans_repaired) == (1, 2, 1)
    assert not h.stats.exporting_failed
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "the OTLP endpoint refused a span for good; dropped it and exporting the rest"
    ]
    assert errors[0].__dict__["span_id"] == f"{2:016x}"
    assert errors[0].__dict__["reason"] == "INVALID_ARGUMENT: bad"
    repairs = [r for r in caplog.records if r.getMessage().startswith("spans with impossible values")]
    assert [r.__dict__["spans"] for r in repairs] == [1]


async def test_run_exporter_is_unhealthy_after_a_batch_refused_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    h.sink = RefusingSink(poison={1, 2})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        await h.send.send([make_span(span_id=1), make_span(span_id=2)])
        await h.send.send(Checkpoint(Marks(stop_time=1)))
        await h.until_sent(1)
        assert h.stats.exporting_failed  # the endpoint took nothing: maybe it takes nothing at all
        await h.send.send([make_span(span_id=3)])
        await h.send.aclose()
    assert h.stats.spans_refused == 2
    assert not h.stats.exporting_failed  # the next batch was taken


class FailingSink(RecordingSink):
    """Answers "retry later" to the first ``failures`` exports (forever if None), then takes every batch."""

    def __init__(self, failures: int | None) -> None:
        super().__init__()
        self.failures = failures

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        await super().export(batch)
        if self.failures is None or self.failures > 0:
            if self.failures is not None:
                self.failures -= 1
            return Delivery(done=False, reason="UNAVAILABLE")
        return DELIVERED


async def test_run_exporter_retries_with_backoff_and_stores_marks_after_the_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A refused export is retried after 1 s, then 2 s (no jitter); the checkpoint is committed only after the ack."""
    h = Harness()
    h.sink = FailingSink(failures=2)
    marks = Marks(stop_time=9)
    committed_at: list[float] = []

    async def commit(m: Marks) -> None:
        committed_at.append(trio.current_time())
        await h.commit(m)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                run_exporter,
                batch_size=BATCH,
                delay=DELAY,
                backoff=Backoff(base=1.0, factor=2.0, jitter=0.0),
                commit=commit,
            ),
            h.receive,
            h.sink,
            h.stats,
        )
        start = trio.current_time()
        await h.send.send([make_span(span_id=1)])
        await h.send.send(Checkpoint(marks))
        await h.until_sent(3)
        assert h.stats.exporting_failed is False
        await h.send.aclose()
    assert [at - start for at, _ in h.sink.sent] == [0.0, 1.0, 3.0]
    assert committed_at == [start + 3.0]
    assert h.committed == [marks]
    assert (h.stats.export_failures, h.stats.spans_exported) == (2, 1)


async def test_run_exporter_counts_what_the_shutdown_deadline_cuts_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Spans being retried, waiting in the batch and still queued are counted; no marks are stored.

    They are spans rendered from Hydra's rows: requeued (the next start's catch-up renders them
    again), not dropped.
    """
    h = Harness()
    h.sink = FailingSink(failures=None)
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.run)
            await h.send.send([make_span(span_id=i) for i in range(6)])  # a batch of 4 retried, 2 waiting
            await h.send.send(Checkpoint(Marks(stop_time=1)))
            await h.send.send([make_span(span_id=9)])  # queued behind the checkpoint
    assert h.stats.exporting_failed
    assert (h.stats.spans_requeued, h.stats.spans_dropped) == (7, 0)
    assert h.stats.spans_exported == 0
    assert h.committed == []


class SwitchableSink(RecordingSink):
    """Takes every batch while ``up``; answers "retry later" while not."""

    def __init__(self) -> None:
        super().__init__()
        self.up = True

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        await super().export(batch)
        return DELIVERED if self.up else Delivery(done=False, reason="UNAVAILABLE")


class PipelineBug(Exception):
    """What a sibling task raises: the supervisor tears the pipeline down (service.py)."""


async def test_run_exporter_cancelled_by_a_pipeline_restart_counts_only_live_only_spans_as_dropped(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart with spans in flight: those after the last stored marks come again, the live-only are lost.

    The spans rendered from Hydra's rows (IDs 2 and 5) had no marks stored past them, so the
    restarted pipeline's catch-up renders them again: requeued. The ``evaluator run`` span and the
    cached attempt's root (3, 4) have no row to be rendered from: dropped.
    """
    h = Harness()
    sink = h.sink = SwitchableSink()
    stored = Marks(eval_id=1)
    evaluator_run = make_span(span_id=3, attributes=(("hydra.span.type", "evaluator_run"),))
    cached = make_span(
        span_id=4, attributes=(("hydra.span.type", "attempt"), ("cicd.pipeline.result", "success"))
    )

    async def pipeline_that_fails() -> None:
        async with trio.open_nursery() as pipeline:
            pipeline.start_soon(h.run)
            await h.send.send([make_span(span_id=1)])
            await h.send.send(Checkpoint(stored))
            await h.until_sent(1)
            sink.up = False
            await h.send.send([make_span(span_id=2), evaluator_run, cached])
            await h.send.send(Checkpoint(Marks(eval_id=2)))
            await h.send.send([make_span(span_id=5)])
            await h.until_sent(2)  # the batch is being retried
            raise PipelineBug("a bug in another task")

    with pytest.raises(BaseExceptionGroup) as raised:
        await pipeline_that_fails()
    assert raised.value.subgroup(PipelineBug) is not None
    assert h.committed == [stored]
    assert (h.stats.spans_exported, h.stats.spans_requeued, h.stats.spans_dropped) == (1, 2, 2)
    requeued = [r for r in caplog.records if r.__dict__.get("requeued")]
    dropped = [r for r in caplog.records if r.__dict__.get("dropped")]
    assert [(r.levelno, r.__dict__["requeued"]) for r in requeued] == [(logging.WARNING, 2)]
    assert "exported again" in requeued[0].getMessage()
    assert [(r.levelno, r.__dict__["dropped"]) for r in dropped] == [(logging.ERROR, 2)]
    assert "lost" in dropped[0].getMessage()
