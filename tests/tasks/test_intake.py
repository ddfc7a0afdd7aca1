"""run_intake and hint_counter: what is forwarded, what triggers a catch-up, what is only counted."""

from __future__ import annotations

import logging

import pytest
import trio

from hydra_otel.adapters.db import ListenItem, RawNotification, Resync
from hydra_otel.core import events as ev
from hydra_otel.core.events import Received
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.intake import HINT_CHANNELS, hint_counter, run_intake


async def intake(
    items: list[ListenItem], stats: Stats, triggers: int = 10
) -> tuple[list[Received], list[str]]:
    """Run run_intake over ``items``; return what it forwarded and the triggers it sent."""
    raw_tx, raw_rx = trio.open_memory_channel[ListenItem](len(items) + 1)
    ev_tx, ev_rx = trio.open_memory_channel[Received](len(items) + 1)
    trig_tx, trig_rx = trio.open_memory_channel[str](triggers)
    for item in items:
        raw_tx.send_nowait(item)
    raw_tx.close()
    with trio.fail_after(5):
        await run_intake(raw_rx, ev_tx, stats, trig_tx)
    out = [r async for r in ev_rx]  # ends: run_intake closed its output
    fired = []
    while True:
        try:
            fired.append(trig_rx.receive_nowait())
        except trio.WouldBlock:
            return out, fired


async def test_run_intake_forwards_span_events_with_their_receive_time() -> None:
    """Evaluation, finished-step and finished-build notifications go to the stitcher, in order, typed."""
    stats = Stats()
    items: list[ListenItem] = [
        RawNotification(ev.EVAL_STARTED, "c1\t7", 1),
        RawNotification(ev.STEP_FINISHED, "42\t3\t", 2),
        RawNotification(ev.EVAL_ADDED, "c1\t7\t99", 3),
        RawNotification(ev.BUILD_FINISHED, "42\t50", 4),
        RawNotification(ev.EVAL_CACHED, "c2\t7\t98", 5),
        RawNotification(ev.EVAL_FAILED, "c3\t8", 6),
    ]
    out, fired = await intake(items, stats)
    assert out == [
        Received(event=ev.EvalStarted(correlation_id="c1", jobset_id=7), at_ns=1),
        Received(event=ev.StepFinished(build_id=42, step_nr=3, log_path=None), at_ns=2),
        Received(event=ev.EvalAdded(correlation_id="c1", jobset_id=7, eval_id=99), at_ns=3),
        Received(event=ev.BuildFinished(build_id=42, dependents=(50,)), at_ns=4),
        Received(event=ev.EvalCached(correlation_id="c2", jobset_id=7, previous_eval_id=98), at_ns=5),
        Received(event=ev.EvalFailed(correlation_id="c3", jobset_id=8), at_ns=6),
    ]
    assert fired == []
    assert stats.events == {
        ev.EVAL_STARTED: 1,
        ev.STEP_FINISHED: 1,
        ev.EVAL_ADDED: 1,
        ev.BUILD_FINISHED: 1,
        ev.EVAL_CACHED: 1,
        ev.EVAL_FAILED: 1,
    }


async def test_run_intake_turns_resyncs_and_trigger_channels_into_catch_up_triggers() -> None:
    """A Resync and Hydra's payload-less channels start a catch-up (counted by reason); nothing is forwarded."""
    stats = Stats()
    items: list[ListenItem] = [
        Resync("connected"),
        RawNotification("builds_cancelled", "", 1),
        RawNotification("builds_added", "?", 2),
        Resync("overflow"),
    ]
    out, fired = await intake(items, stats)
    assert out == []
    assert fired == ["connected", "builds_cancelled", "builds_added", "overflow"]
    assert stats.resyncs == {"connected": 1, "overflow": 1}
    assert stats.events == {"builds_cancelled": 1, "builds_added": 1}


async def test_run_intake_coalesces_triggers_when_a_scan_is_already_pending() -> None:
    """A full trigger channel means a scan is pending: further triggers are dropped, never waited for."""
    stats = Stats()
    items: list[ListenItem] = [RawNotification("builds_restarted", "", i) for i in range(5)]
    items.append(RawNotification(ev.EVAL_FAILED, "c\t1", 9))
    out, fired = await intake(items, stats, triggers=1)
    assert fired == ["builds_restarted"]
    assert stats.events["builds_restarted"] == 5
    assert [r.at_ns for r in out] == [9]  # the intake kept going


async def test_run_intake_counts_and_drops_malformed_payloads(caplog: pytest.LogCaptureFixture) -> None:
    """A bad payload is counted by channel and logged; the notifications around it still pass."""
    stats = Stats()
    items: list[ListenItem] = [
        RawNotification(ev.BUILD_FINISHED, "not-a-number", 1),
        RawNotification("no_such_channel", "x", 2),
        RawNotification(ev.BUILD_FINISHED, "7", 3),
    ]
    with caplog.at_level(logging.WARNING, logger="hydra_otel.intake"):
        out, _ = await intake(items, stats)
    assert out == [Received(event=ev.BuildFinished(build_id=7, dependents=()), at_ns=3)]
    assert stats.payload_errors == {ev.BUILD_FINISHED: 1, "no_such_channel": 1}
    assert stats.events == {ev.BUILD_FINISHED: 1}
    assert sum(r.getMessage() == "dropped a malformed notification" for r in caplog.records) == 2


async def test_run_intake_closes_its_output_when_the_input_ends() -> None:
    """The end of the listener's channel is passed on, so the stitcher drains and stops."""
    out, fired = await intake([], Stats())
    assert (out, fired) == ([], [])


def test_hint_counter_counts_hints_in_the_callback_and_leaves_the_rest_to_the_queue() -> None:
    """Hint channels are parsed and counted (a malformed one too) and reported handled; others are not."""
    stats = Stats()
    consume = hint_counter(stats)
    assert consume(ev.BUILD_QUEUED, "5")
    assert consume(ev.STEP_STARTED, "5\t1")
    assert consume(ev.BUILD_STARTED, "oops")  # handled (dropped and counted), not queued
    assert not consume(ev.BUILD_FINISHED, "5")
    assert not consume("builds_cancelled", "")
    assert stats.events == {ev.BUILD_QUEUED: 1, ev.STEP_STARTED: 1}
    assert stats.payload_errors == {ev.BUILD_STARTED: 1}
    assert {ev.BUILD_QUEUED, ev.BUILD_STARTED, ev.STEP_STARTED} <= HINT_CHANNELS
    assert ev.BUILD_FINISHED not in HINT_CHANNELS
