"""The one retry loop for an unreachable database, and the named backoff ladders."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from hydra_otel.adapters.db import while_unavailable
from hydra_otel.core.backoff import Backoff
from hydra_otel.errors import DbUnavailable, PermissionDenied
from hydra_otel.tasks.retry import until_db_answers


def steady(base: float, cap: float) -> Backoff:
    """A ladder without jitter, so the virtual times are exact."""
    return Backoff(base=base, factor=2.0, cap=cap, jitter=0.0)


class Flaky:
    """Fails with the given errors, in order, then answers 42."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[float] = []

    async def __call__(self) -> int:
        self.calls.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return 42


async def test_waits_out_an_outage_on_the_ladder_and_resets(autojump_clock: trio.testing.MockClock) -> None:
    step, waits = Flaky(DbUnavailable("down"), DbUnavailable("down"), DbUnavailable("down")), []
    backoff = steady(0.5, 1.5)
    result = await while_unavailable(step, backoff, lambda exc, delay: waits.append((str(exc), delay)))
    assert result == 42
    assert step.calls == pytest.approx([0.0, 0.5, 1.5, 3.0])  # 0.5, 1.0, then the cap
    assert waits == [("down", 0.5), ("down", 1.0), ("down", 1.5)]
    assert backoff.attempt == 0  # a success starts the next outage from the bottom


async def test_other_errors_propagate_at_once(autojump_clock: trio.testing.MockClock) -> None:
    step = Flaky(PermissionDenied("builds", "GRANT SELECT ON builds TO hydra_otel", "permission denied"))
    with pytest.raises(PermissionDenied):
        await while_unavailable(step, steady(0.5, 10), lambda exc, delay: None)
    assert step.calls == [0.0]


async def test_until_db_answers_waits_out_a_missing_grant_too(autojump_clock: trio.testing.MockClock) -> None:
    step = Flaky(
        DbUnavailable("down"),
        PermissionDenied("builds", "GRANT SELECT ON builds TO hydra_otel", "permission denied"),
        DbUnavailable("down"),
    )
    assert await until_db_answers(step, waiting="waiting") == 42
    assert len(step.calls) == 4


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        (Backoff.transient(), (0.5, 2.0, 10.0, 0.2)),
        (Backoff.transient(30.0), (0.5, 2.0, 30.0, 0.2)),
        (Backoff.restart(), (1.0, 2.0, 30.0, 0.2)),
        (Backoff.interactive(), (0.2, 2.0, 1.0, 0.2)),
    ],
)
def test_the_presets_are_the_ladders_the_daemon_always_used(
    preset: Backoff, expected: tuple[float, ...]
) -> None:
    assert (preset.base, preset.factor, preset.cap, preset.jitter) == expected


def test_a_preset_is_a_fresh_ladder_each_time() -> None:
    first = Backoff.restart()
    first.rng = random.Random(1)
    first.next_delay()
    assert Backoff.restart().attempt == 0
