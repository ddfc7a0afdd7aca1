"""Exporter task: batches spans and exports them with retries.

A batch is sent when it holds ``batch_size`` spans or its oldest span has
waited ``delay`` seconds, or at once when live work's spans (a
:class:`~hydra_otel.core.batching.CompleteSpans`) arrived and nothing more is
queued: the LISTEN connection batched them for the same delay already. A failed export is retried with capped, jittered
backoff while the batch is held; the bounded span channel then fills and
backpressure reaches the listener, so memory stays bounded during an outage.
When the input closes (shutdown) the last batch is flushed. Whatever is cut
off unacknowledged (the shutdown deadline passed, or the supervisor restarts the
pipeline after an unexpected error) had no progress marks stored past it, so
the catch-up of the restarted pipeline or of the next start renders it again
from Hydra's tables: it is counted in ``spans_requeued``. Only the live-only
spans among it (``evaluator run``, cached and abandoned attempts; see
:func:`~hydra_otel.core.evals.rebuilt_by_catchup`) are lost, and counted in
``spans_dropped``.

A span the endpoint refuses for good (the sink isolates it: adapters/otlp.py)
is dropped with one error line and counted in ``spans_refused``; the rest of
its batch is exported and the checkpoint after it advances, so one poison span
cannot hold up every later evaluation. Spans sent with repaired values
(core/sanitize.py) are counted in ``spans_repaired``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence

import trio

from hydra_otel.adapters.otlp import Delivery, SpanSink
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.batching import Batcher, CompleteSpans
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.evals import rebuilt_by_catchup
from hydra_otel.core.spans import SpanRecord
from hydra_otel.log import RateLimitedLog
from hydra_otel.selfmon.stats import Stats

log = logging.getLogger("hydra_otel.exporter")

#: What the resolver sends the exporter: span lists (complete ones from live work) and checkpoints.
ExportItem = Sequence[SpanRecord] | CompleteSpans | Checkpoint


async def run_exporter(
    spans: trio.MemoryReceiveChannel[ExportItem],
    sink: SpanSink,
    stats: Stats,
    *,
    batch_size: int,
    delay: float,
    backoff: Backoff,
    commit: Callable[[Marks], Awaitable[None]],
) -> None:
    """Consume ``spans`` (lists of spans, and checkpoints) until it closes, exporting in batches.

    The resolver hands over each batch's spans as one list: one channel hop per batch, not per span.
    When to send what is :class:`~hydra_otel.core.batching.Batcher`'s call; this task receives,
    sends (retrying until the endpoint answers) and stores.

    A :class:`~hydra_otel.core.batching.CompleteSpans` goes at once when nothing more is queued.
    A :class:`Checkpoint` flushes the batch, and once the endpoint acknowledged
    it, ``commit`` stores the checkpoint's marks.
    """
    batcher = Batcher(size=batch_size, delay=delay)
    warn = RateLimitedLog(log)  # repaired spans come from bad rows: 10 lines a minute at most
    async with spans:
        try:
            closed = False
            while True:
                # Nothing new is taken while there is something to send: a held batch fills the
                # bounded channel, and backpressure reaches the listener.
                while (batch := batcher.next_batch()) is not None:
                    await _export_until_done(sink, batch, stats, backoff, warn)
                    batcher.sent()
                for marks in batcher.take_commits():
                    await commit(marks)
                if closed:
                    break
                closed = await _receive(spans, batcher)
        finally:
            _count_unsent(stats, batcher.unacknowledged() + _drain(spans))


async def _receive(spans: trio.MemoryReceiveChannel[ExportItem], batcher: Batcher) -> bool:
    """Take one item into ``batcher`` or, at its deadline, expire it; return whether ``spans`` ended."""
    deadline = batcher.next_deadline()
    with trio.move_on_at(math.inf if deadline is None else deadline):
        try:
            item = await spans.receive()
        except trio.EndOfChannel:
            batcher.close()
            return True
        if isinstance(item, Checkpoint):
            batcher.checkpoint(item.marks)
        elif isinstance(item, CompleteSpans):
            batcher.add(item.spans, trio.current_time(), complete=True)
        else:
            batcher.add(item, trio.current_time())
        if not spans.statistics().current_buffer_used:
            batcher.idle()  # a complete list goes now; a burst's next list would have been queued
        return False
    batcher.expire(trio.current_time())  # the deadline passed (cancelled before or during receive)
    return False


def _drain(spans: trio.MemoryReceiveChannel[ExportItem]) -> list[SpanRecord]:
    """Take whatever is still queued (the pipeline is stopping); return its spans."""
    out: list[SpanRecord] = []
    while True:
        try:
            item = spans.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return out
        if isinstance(item, CompleteSpans):
            out += item.spans
        elif not isinstance(item, Checkpoint):
            out += item


def _count_unsent(stats: Stats, unsent: list[SpanRecord]) -> None:
    """Count and log the spans given up on unacknowledged: found again by the catch-up, or lost."""
    requeued = sum(1 for record in unsent if rebuilt_by_catchup(record))
    dropped = len(unsent) - requeued
    if requeued:
        stats.spans_requeued += requeued
        log.warning(
            "the pipeline stopped before the endpoint took every span; those rendered from Hydra's "
            "tables are exported again by the catch-up (their progress marks were not stored)",
            extra={"requeued": requeued},
        )
    if dropped:
        stats.spans_dropped += dropped
        log.error(
            "the pipeline stopped before the endpoint took every span; live-only spans (evaluator run, "
            "cached and abandoned attempts) cannot be rendered again and are lost",
            extra={"dropped": dropped},
        )


async def _export_until_done(
    sink: SpanSink, batch: list[SpanRecord], stats: Stats, backoff: Backoff, warn: RateLimitedLog
) -> None:
    failing = False
    refused = 0
    while not (delivery := await sink.export(batch)).done:
        refused += _count(stats, delivery, warn)
        stats.export_failures += 1
        stats.exporting_failed = True
        delay = backoff.next_delay()
        if not failing:
            log.warning(
                "OTLP export failed; retrying with backoff",
                extra={"spans": len(batch), "retry_in_s": delay, "reason": delivery.reason},
            )
            failing = True
        await trio.sleep(delay)
    refused += _count(stats, delivery, warn)
    if failing:
        log.info("OTLP export recovered", extra={"spans": len(batch)})
    backoff.reset()
    # Healthy once the endpoint takes spans again: a batch refused whole says it may take none.
    stats.exporting_failed = refused == len(batch) > 0
    stats.spans_exported += len(batch) - refused


def _count(stats: Stats, delivery: Delivery, warn: RateLimitedLog) -> int:
    """Count what one export call repaired and refused (one error line per refused span)."""
    if delivery.repaired:
        stats.spans_repaired += delivery.repaired
        warn.warning(
            "repaired",
            "spans with impossible values (bad rows) sent with them clamped or omitted; "
            "their hydra.data_issue attribute says what was changed",
            spans=delivery.repaired,
            example=delivery.repair_example,
        )
    stats.spans_refused += len(delivery.refused)
    for record, reason in delivery.refused:
        log.error(
            "the OTLP endpoint refused a span for good; dropped it and exporting the rest",
            extra={
                "span": record.name[:100],
                "trace_id": f"{record.trace_id:032x}"
                if 0 <= record.trace_id < 1 << 128
                else str(record.trace_id),
                "span_id": f"{record.span_id:016x}" if 0 <= record.span_id < 1 << 64 else str(record.span_id),
                "reason": reason,
            },
        )
    return len(delivery.refused)


def _hex(value: object, digits: int) -> str:
    """An ID as trace UIs show it; the record is the one refused, so its ID may be anything."""
    if isinstance(value, int) and 0 <= value < 1 << (4 * digits):
        return f"{value:0{digits}x}"
    return "invalid"
