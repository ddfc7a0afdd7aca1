"""Intake task: raw notifications in, typed events out.

Parses each notification (the pure parser in core/parse.py), counts it by
channel, logs and counts malformed payloads (rate-limited), and forwards
the events that produce spans (evaluations, finished steps, finished builds)
to the stitcher. The hint channels (``build_queued``, ``build_started``,
``step_started``, ``cached_build_*``) never reach this task: :func:`hint_counter`
parses and counts them in the listener's callback, with the same
:func:`parse_counted`, so they take no place in the queue.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import trio

from hydra_otel.adapters.db import ListenItem, RawNotification
from hydra_otel.core.events import (
    BUILD_QUEUED,
    BUILD_STARTED,
    CACHED_BUILD_FINISHED,
    CACHED_BUILD_QUEUED,
    STEP_STARTED,
    BuildFinished,
    EvalAdded,
    EvalCached,
    EvalFailed,
    EvalStarted,
    HydraEvent,
    Received,
    StepFinished,
    TableChanged,
)
from hydra_otel.core.parse import parse
from hydra_otel.errors import PayloadError
from hydra_otel.log import RateLimitedLog
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.channels import receive_some, send_all

log = logging.getLogger("hydra_otel.intake")

# Events that produce spans; trigger channels start a catch-up instead (hints never get here).
_FORWARDED = (EvalStarted, EvalAdded, EvalCached, EvalFailed, StepFinished, BuildFinished)


async def run_intake(
    raw: trio.MemoryReceiveChannel[ListenItem],
    events: trio.MemorySendChannel[Received],
    stats: Stats,
    triggers: trio.MemorySendChannel[str],
) -> None:
    """Consume ``raw`` until it closes; closes ``events`` when done.

    Resync markers and Hydra's payload-less trigger channels become catch-up triggers.
    """
    warn = RateLimitedLog(log)
    async with raw, events:
        while True:
            try:
                items = await receive_some(raw)
            except trio.EndOfChannel:
                break
            out: list[Received] = []
            for item in items:
                if not isinstance(item, RawNotification):
                    stats.resyncs[item.reason] += 1
                    _trigger(triggers, item.reason)
                    continue
                event = parse_counted(item.channel, item.payload, stats, warn)
                if event is None:
                    continue
                if isinstance(event, TableChanged):
                    _trigger(triggers, event.channel)
                elif isinstance(event, _FORWARDED):
                    out.append(Received(event=event, at_ns=item.at_ns))
            await send_all(events, out)


def parse_counted(channel: str, payload: str, stats: Stats, warn: RateLimitedLog) -> HydraEvent | None:
    """Parse one notification and count it by channel; a malformed one is counted, logged and None."""
    try:
        event = parse(channel, payload)
    except PayloadError as exc:
        stats.payload_errors[channel] += 1
        warn.warning(
            channel,
            "dropped a malformed notification",
            channel=channel,
            reason=exc.reason,
            payload=exc.quoted,
        )
        return None
    stats.events[channel] += 1
    return event


def _trigger(triggers: trio.MemorySendChannel[str], reason: str) -> None:
    # A full trigger channel means a scan is already pending: it will see this change too.
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
        triggers.send_nowait(reason)


#: Hint channels: counted (and checked), never queued. They are nearly all of an evaluation's
#: burst (one per build, ~230,000 for nixpkgs) and carry nothing spans need.
HINT_CHANNELS = frozenset(
    {BUILD_QUEUED, BUILD_STARTED, STEP_STARTED, CACHED_BUILD_FINISHED, CACHED_BUILD_QUEUED}
)


def hint_counter(stats: Stats) -> Callable[[str, str], bool]:
    """A ``consume`` function for the listener: parses and counts hint notifications in its callback.

    Returns True for a hint channel (handled), False for everything else (to be queued). Never raises.
    """
    warn = RateLimitedLog(log)

    def consume(channel: str, payload: str) -> bool:
        if channel not in HINT_CHANNELS:
            return False
        parse_counted(channel, payload, stats, warn)
        return True

    return consume
