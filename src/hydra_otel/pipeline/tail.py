"""The resolver → exporter tail that ``run`` and ``backfill`` share.

::

    work + checkpoints ─> run_resolver ─> spans + checkpoints ─> run_exporter ─> OTLP
                                                                   └─ commit(marks) once acknowledged

The caller owns the work channel (its producer closes it to drain the tail) and the
nursery: both stages are started into it, so the caller's cancel scope and shutdown
deadline cover them, and when the work channel closes each stage ends in turn.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio

from hydra_otel.adapters.otlp import SpanSink
from hydra_otel.config import ExportConfig
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.stitch import Work
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.exporter import ExportItem, run_exporter
from hydra_otel.tasks.resolver import RESOLVE_BATCH, Resolver, run_resolver

#: What the exporter calls with a checkpoint's marks once everything before it was acknowledged.
Commit = Callable[[Marks], Awaitable[None]]


def span_lists(queue_size: int) -> int:
    """How many span lists the resolver → exporter channel holds for a ``queue_size`` of work items.

    Spans travel as one list per resolved batch (up to ``RESOLVE_BATCH`` work items): bound the lists.
    """
    return max(2, queue_size // RESOLVE_BATCH)


def start_tail(
    nursery: trio.Nursery,
    work: trio.MemoryReceiveChannel[Work | Checkpoint],
    resolver: Resolver,
    sink: SpanSink,
    stats: Stats,
    *,
    export: ExportConfig,
    queue_size: int,
    commit: Commit,
    live: bool = False,
) -> None:
    """Start the exporter, then the resolver (sinks before sources), into ``nursery``.

    Args:
        work: what to resolve; closing it drains the tail (the exporter flushes its last batch).
        resolver: renders the work's spans from Hydra's tables.
        sink: where the spans go; the caller shuts it down (:func:`~hydra_otel.pipeline.factories.close_sinks`).
        stats: counters of both stages.
        export: batching and retry settings.
        queue_size: the work channel's size; the span channel is sized from it (:func:`span_lists`).
        commit: stores a checkpoint's marks (:func:`store_marks` builds one).
        live: the work includes live work, batched by the LISTEN connection for up to the
            export delay: its spans are exported as soon as they are resolved
            (:func:`~hydra_otel.tasks.resolver.run_resolver`).
    """
    span_tx, span_rx = trio.open_memory_channel[ExportItem](span_lists(queue_size))
    nursery.start_soon(
        functools.partial(
            run_exporter,
            span_rx,
            sink,
            stats,
            batch_size=export.batch_size,
            delay=export.delay,
            backoff=Backoff.transient(export.max_backoff),
            commit=commit,
        )
    )
    nursery.start_soon(
        functools.partial(run_resolver, backoff=Backoff.transient(10.0), live=live),
        work,
        span_tx,
        resolver,
    )


def store_marks(save: Callable[[Marks], bool], stats: Stats) -> Commit:
    """The exporter's ``commit``: ``save`` a checkpoint's marks in a worker thread, count it when stored.

    Args:
        save: writes the marks (blocking file I/O) and says whether they are on disk. A failed
            write is the store's to log and count; the next checkpoint writes everything again.
        stats: ``checkpoints`` counts the stored ones.
    """

    async def commit(marks: Marks) -> None:
        if await trio.to_thread.run_sync(save, marks):
            stats.checkpoints += 1

    return commit
