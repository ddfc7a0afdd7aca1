"""When the catch-up scans: a scan after a gap is followed by one once the lag window has passed."""

from __future__ import annotations

import pytest

from hydra_otel.tasks.catchup_task import FOLLOW_UP, next_follow_up

LAG = 2


@pytest.mark.parametrize(
    "reasons", [["start"], ["connected"], ["overflow"], ["builds_cancelled", "interval"]]
)
def test_a_scan_after_a_gap_schedules_a_follow_up(reasons: list[str]) -> None:
    """Start-up, reconnect, overflow and Hydra's triggers: one more scan lag + 1 s after the clock was read."""
    assert next_follow_up(None, reasons, 100.0, LAG) == 103.0


@pytest.mark.parametrize("reasons", [["interval"], [FOLLOW_UP], ["interval", FOLLOW_UP]])
def test_routine_scans_schedule_nothing(reasons: list[str]) -> None:
    """A periodic scan (the live stream was up) or the follow-up itself needs no follow-up."""
    assert next_follow_up(None, reasons, 100.0, LAG) is None


def test_a_pending_follow_up_survives_an_earlier_interval_scan() -> None:
    """An interval shorter than the lag window does not cancel the follow-up it cannot replace."""
    assert next_follow_up(103.0, ["interval"], 101.0, LAG) == 103.0


def test_a_scan_at_or_after_the_follow_up_time_is_the_follow_up() -> None:
    """A scan that read the clock once the window had passed covers it: nothing stays pending."""
    assert next_follow_up(103.0, ["interval"], 103.0, LAG) is None


def test_a_new_gap_moves_the_follow_up_later() -> None:
    """A second trigger before the follow-up: the follow-up is due after the later scan."""
    assert next_follow_up(103.0, ["connected"], 102.0, LAG) == 105.0
