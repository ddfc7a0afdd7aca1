"""The resolver holds work whose table hydra-otel may not read, and the checkpoints behind it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.evals import AddedEval
from hydra_otel.core.events import BuildFinished
from hydra_otel.errors import PermissionDenied
from hydra_otel.log import RateLimitedLog
from hydra_otel.tasks.resolver import Resolver, run_resolver


@dataclass
class FakeResolver:
    """Renders one "span" (a string) per work item; BuildFinished needs a table until ``granted``."""

    granted: bool = False
    unsent_jobsets: dict[int, int] = field(default_factory=dict)
    warn: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(logging.getLogger("test")))
    calls: int = 0

    async def resolve(self, batch: list[Any]) -> list[str]:
        self.calls += 1
        if not self.granted and any(isinstance(w, BuildFinished) for w in batch):
            raise PermissionDenied("buildsteps", "GRANT SELECT ON buildsteps TO r;", "permission denied")
        return [f"eval {w.eval_id}" if isinstance(w, AddedEval) else f"build {w.build_id}" for w in batch]


def added(eval_id: int) -> AddedEval:
    return AddedEval(eval_id=eval_id, jobset_id=1, correlation_id="", started_ns=None, ended_ns=0)


async def test_run_resolver_sends_held_work_and_its_checkpoints_after_the_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeResolver()
    work_tx, work_rx = trio.open_memory_channel[Any](100)
    out_tx, out_rx = trio.open_memory_channel[Any](100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_resolver(work_rx, out_tx, cast(Resolver, fake), backoff=Backoff()))
        for item in (added(1), BuildFinished(build_id=10, dependents=()), Checkpoint(Marks(eval_id=1))):
            work_tx.send_nowait(item)
        assert await out_rx.receive() == ["eval 1"]  # exported although the build is held
        work_tx.send_nowait(added(2))
        work_tx.send_nowait(BuildFinished(build_id=11, dependents=()))  # joins the held work unasked
        work_tx.send_nowait(Checkpoint(Marks(eval_id=2)))
        assert await out_rx.receive() == ["eval 2"]
        calls = fake.calls
        await trio.sleep(0.5)  # before the first retry (1 s ±20 %): nothing asked, nothing sent
        assert fake.calls == calls
        with pytest.raises(trio.WouldBlock):  # in particular, no checkpoint past the held work
            out_rx.receive_nowait()
        await trio.sleep(1)  # a retry: still denied
        fake.granted = True
        with trio.fail_after(5):
            assert await out_rx.receive() == ["build 10", "build 11"]
            checkpoint = await out_rx.receive()
        assert checkpoint == Checkpoint(Marks(eval_id=2))  # the withheld marks, merged, follow
        await work_tx.aclose()
    assert [item async for item in out_rx] == []
