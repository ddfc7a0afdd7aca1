"""The exporter task's batching, on trio's virtual clock (no sockets, no sleeps)."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.spans import SpanRecord
from hydra_otel.stats import Stats
from hydra_otel.tasks.exporter import run_exporter
from tests.factories import make_span

DELAY = 1.0
BATCH = 4

Item = Sequence[SpanRecord] | Checkpoint


class RecordingSink:
    """Acknowledges every batch, noting the virtual time it was sent at."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, list[int]]] = []
        self.changed = trio.Event()

    async def export(self, batch: Sequence[SpanRecord]) -> bool:
        self.sent.append((trio.current_time(), [r.span_id for r in batch]))
        self.changed.set()
        self.changed = trio.Event()
        return True

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


async def test_a_full_batch_goes_at_once(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=i) for i in range(BATCH)])
        await h.until_sent(1)
        assert h.sink.sent == [(start, [0, 1, 2, 3])]
        await h.send.aclose()


async def test_a_partial_batch_waits_for_the_delay(autojump_clock: trio.testing.MockClock) -> None:
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


async def test_the_remainder_of_an_oversized_list_goes_after_the_delay(
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


async def test_a_checkpoint_flushes_and_is_committed_after_the_spans(
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


async def test_closing_flushes_what_is_left(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        start = trio.current_time()
        await h.send.send([make_span(span_id=i) for i in range(5)])
        await h.send.aclose()
    assert h.sink.sent == [(start, [0, 1, 2, 3]), (start, [4])]
    assert h.stats.spans_dropped == 0
