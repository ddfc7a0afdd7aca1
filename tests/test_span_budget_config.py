"""--max-spans-per-trace: its default, and the check that it leaves every build a step."""

from __future__ import annotations

import pytest

from hydra_otel.config import load
from hydra_otel.errors import ConfigError


def test_default_span_budget() -> None:
    """By default a trace holds 6000 spans, enough for 1000 builds with a step each."""
    assert load({}, {}).stitch.max_spans_per_trace == 6000


def test_span_budget_must_leave_each_build_a_step() -> None:
    """A budget below 3 spans per build of a full trace, plus 4, is refused with the minimum."""
    with pytest.raises(ConfigError) as info:
        load({"max_spans_per_trace": "3003"}, {})
    assert info.value.problems == [
        "--max-spans-per-trace: must be at least 3004 (3 spans for each of the 1000 builds a trace may hold, "
        "plus 4), got 3003"
    ]
    assert (
        load({"max_spans_per_trace": "34", "max_builds_per_trace": "10"}, {}).stitch.max_spans_per_trace == 34
    )
