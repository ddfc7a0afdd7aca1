"""Stitcher task: drives the pure :class:`~hydra_otel.core.stitch.Stitcher`.

Feeds it each evaluation event with the monotonic ``trio.current_time()``,
passes finished-step and finished-build events through unchanged and in
order, wakes at the earliest abandon deadline to expire attempts that never closed,
and forwards the outcomes. When its input closes, attempts still open are
left open: they are live evaluations, not abandoned ones.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from hydra_otel.core.events import (
    BuildFinished,
    EvalAdded,
    EvalCached,
    EvalFailed,
    EvalStarted,
    Received,
    StepFinished,
)
from hydra_otel.core.stitch import Stitcher, Work
from hydra_otel.tasks.channels import receive_some, send_all

log = logging.getLogger("hydra_otel.stitcher")


async def run_stitcher(
    events: trio.MemoryReceiveChannel[Received],
    outcomes: trio.MemorySendChannel[Work],
    stitcher: Stitcher,
) -> None:
    """Consume ``events`` until it closes; closes ``outcomes`` when done."""
    async with events, outcomes:
        while True:
            deadline = stitcher.next_deadline()
            batch: list[Received] | None = None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                try:
                    batch = await receive_some(events)
                except trio.EndOfChannel:
                    break
            if batch is None:
                await send_all(outcomes, stitcher.expire(trio.current_time(), time.time_ns()))
                continue
            out: list[Work] = []
            for received in batch:
                event = received.event
                if isinstance(event, StepFinished | BuildFinished):
                    out.append(event)  # build events pass through, in order with the evaluations
                else:
                    assert isinstance(
                        event, EvalStarted | EvalAdded | EvalCached | EvalFailed
                    )  # intake's contract
                    out += stitcher.feed(event, received.at_ns, trio.current_time())
            await send_all(outcomes, out)
        stats = stitcher.statistics()
        if stats.open:
            log.info("evaluations still running at shutdown are not exported", extra={"open": stats.open})
