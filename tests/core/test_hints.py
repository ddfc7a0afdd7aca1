"""Hint notifications are counted in the listener's callback and never queued."""

from __future__ import annotations

from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.intake import HINT_CHANNELS, hint_counter


def test_hints_are_consumed_and_counted() -> None:
    """build_queued and cached_build_* are handled (True) and counted; malformed ones are counted as errors."""
    stats = Stats()
    consume = hint_counter(stats)
    assert consume("build_queued", "42")
    assert consume("cached_build_finished", "7\t42")
    assert consume("cached_build_queued", "not\tnumbers")
    assert stats.events == {"build_queued": 1, "cached_build_finished": 1}
    assert stats.payload_errors == {"cached_build_queued": 1}


def test_other_channels_are_left_to_the_queue() -> None:
    """Everything that produces spans or triggers a catch-up goes through the queue (False), uncounted here."""
    stats = Stats()
    consume = hint_counter(stats)
    for channel in ("eval_added", "build_finished", "step_finished", "builds_cancelled", "nonsense"):
        assert not consume(channel, "1")
    assert not stats.events
    assert {
        "build_queued",
        "build_started",
        "step_started",
        "cached_build_finished",
        "cached_build_queued",
    } == HINT_CHANNELS
