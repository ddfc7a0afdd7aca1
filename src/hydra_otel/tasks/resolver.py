"""Resolver task: completes stitched outcomes from Hydra's tables and renders spans.

Outcomes are taken in batches (whatever is queued, up to ``batch_size``), so
one query per table serves the whole batch. A row that does not exist (an ID
from a bad notification, or a deleted jobset) is logged, counted and skipped.
While the database is unreachable the batch is held and retried with backoff:
upstream channels fill and apply backpressure; nothing is dropped here.
"""

from __future__ import annotations

import logging

import trio

from hydra_otel.adapters import queries
from hydra_otel.adapters.db import Database
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.evals import (
    AddedEval,
    Attempt,
    Outcome,
    RenderConfig,
    attempt_span,
    eval_spans,
    evaluator_run_span,
)
from hydra_otel.core.spans import SpanRecord
from hydra_otel.errors import DbUnavailable
from hydra_otel.log import RateLimitedLog
from hydra_otel.stats import Stats

log = logging.getLogger("hydra_otel.resolver")


async def run_resolver(
    outcomes: trio.MemoryReceiveChannel[Outcome],
    spans: trio.MemorySendChannel[SpanRecord],
    db: Database,
    cfg: RenderConfig,
    stats: Stats,
    *,
    backoff: Backoff,
    batch_size: int = 256,
) -> None:
    """Consume ``outcomes`` until it closes; closes ``spans`` when done."""
    warn = RateLimitedLog(log)
    async with outcomes, spans:
        async for first in outcomes:
            batch = [first]
            while len(batch) < batch_size:
                try:
                    batch.append(outcomes.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for record in await _resolve_with_retry(db, batch, cfg, stats, warn, backoff):
                await spans.send(record)


async def _resolve_with_retry(
    db: Database,
    batch: list[Outcome],
    cfg: RenderConfig,
    stats: Stats,
    warn: RateLimitedLog,
    backoff: Backoff,
) -> list[SpanRecord]:
    while True:
        try:
            records = await resolve(db, batch, cfg, stats, warn)
        except DbUnavailable as exc:
            delay = backoff.next_delay()
            warn.warning("db", "database unavailable; holding evaluations", error=str(exc), retry_in_s=delay)
            await trio.sleep(delay)
            continue
        backoff.reset()
        return records


async def resolve(
    db: Database, batch: list[Outcome], cfg: RenderConfig, stats: Stats, warn: RateLimitedLog
) -> list[SpanRecord]:
    """Spans for ``batch``: two queries at most, whatever the batch size."""
    added = [o for o in batch if isinstance(o, AddedEval)]
    attempts = [o for o in batch if isinstance(o, Attempt)]
    evals = await queries.eval_facts(db, [o.eval_id for o in added])
    jobsets = await queries.jobset_facts(db, [o.jobset_id for o in attempts])
    stats.queries += bool(added) + bool(attempts)
    out: list[SpanRecord] = []
    for a in added:
        facts = evals.get(a.eval_id)
        if facts is None:
            stats.missing_rows["jobsetevals"] += 1
            warn.warning(
                "jobsetevals", "eval_added names a JobsetEval that does not exist", eval_id=a.eval_id
            )
            continue
        out.extend(eval_spans(facts, cfg))
        if a.started_ns is not None:
            out.append(
                evaluator_run_span(
                    cfg,
                    eval_id=a.eval_id,
                    jobset_id=a.jobset_id,
                    correlation_id=a.correlation_id,
                    started_ns=a.started_ns,
                    ended_ns=a.ended_ns,
                )
            )
    for t in attempts:
        jobset = jobsets.get(t.jobset_id)
        if jobset is None:
            stats.missing_rows["jobsets"] += 1
            warn.warning(
                "jobsets", "evaluation notification names a jobset that does not exist", jobset_id=t.jobset_id
            )
            continue
        out.append(attempt_span(t, jobset, cfg))
    return out
