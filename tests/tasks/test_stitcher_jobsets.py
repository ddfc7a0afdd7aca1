"""The stitcher task: the jobset existence cache it consults, and how it reports rejections."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from hydra_otel.core.evals import AddedEval
from hydra_otel.core.events import EvalAdded, EvalStarted, Received
from hydra_otel.core.stitch import Stitcher, Work
from hydra_otel.errors import DbUnavailable
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.stitch_task import KnownJobsets, run_stitcher


class FakeTable:
    def __init__(self, rows: set[int]) -> None:
        self.rows = rows
        self.queries: list[list[int]] = []
        self.down = False

    async def lookup(self, ids: Sequence[int]) -> set[int]:
        self.queries.append(list(ids))
        if self.down:
            raise DbUnavailable("down")
        return {i for i in ids if i in self.rows}


async def test_known_ids_are_cached_and_unknown_ones_expire(autojump_clock: trio.testing.MockClock) -> None:
    """One query per new batch of IDs; an unknown ID is asked again only after the negative TTL."""
    table = FakeTable({1, 2})
    known = KnownJobsets(table.lookup, negative_ttl=60.0)
    assert await known.known({1, 7}) == {1}
    assert await known.known({1, 7}) == {1}
    assert table.queries == [[1, 7]]
    table.rows.add(7)  # a jobset created meanwhile
    await trio.sleep(60)
    assert await known.known({1, 2, 7}) == {1, 2, 7}
    assert table.queries == [[1, 7], [2, 7]]


async def test_negative_cache_is_bounded() -> None:
    """A flood of made-up IDs keeps at most max_negative of them."""
    table = FakeTable(set())
    known = KnownJobsets(table.lookup, max_negative=10)
    assert await known.known(set(range(100, 1_100))) == set()
    assert await known.known({105}) == set()
    assert table.queries[-1] == [105]  # forgotten: asked again
    assert await known.known({1_099}) == set()
    assert len(table.queries) == 2  # still remembered


async def test_database_down_accepts_every_start() -> None:
    """Without the database the check fails open: the stitcher's other bounds still hold."""
    table = FakeTable(set())
    table.down = True
    known = KnownJobsets(table.lookup)
    assert await known.known({5}) == {5}


async def test_run_stitcher_counts_and_logs_rejections_per_batch(caplog: pytest.LogCaptureFixture) -> None:
    """A flood for unknown jobsets is one query, one counter, and a log line per batch, not one per event."""
    table = FakeTable({1})
    stats = Stats()
    ev_tx, ev_rx = trio.open_memory_channel[Received](100_000)
    out_tx, out_rx = trio.open_memory_channel[Work](100_000)
    for i in range(1_000):
        ev_tx.send_nowait(
            Received(event=EvalStarted(correlation_id=f"f.{i}", jobset_id=100 + i % 7), at_ns=i)
        )
    ev_tx.send_nowait(Received(event=EvalStarted(correlation_id="real", jobset_id=1), at_ns=5_000))
    ev_tx.send_nowait(Received(event=EvalAdded(correlation_id="real", jobset_id=1, eval_id=9), at_ns=6_000))
    ev_tx.close()
    stitcher = Stitcher(abandon_after=100.0, max_open=10)
    with caplog.at_level(logging.WARNING, logger="hydra_otel.stitcher"):
        await run_stitcher(ev_rx, out_tx, stitcher, stats=stats, jobsets=KnownJobsets(table.lookup))
    outcomes = [w async for w in out_rx]
    assert outcomes == [
        AddedEval(eval_id=9, jobset_id=1, correlation_id="real", started_ns=5_000, ended_ns=6_000)
    ]
    assert stats.notifications_rejected == {"unknown_jobset": 1_000}
    assert sorted(i for q in table.queries for i in q) == [1, *range(100, 107)]  # each ID asked once
    lines = [r for r in caplog.records if r.getMessage() == "ignored evaluation notifications"]
    assert 1 <= len(lines) < 10
    assert sum(r.__dict__["count"] for r in lines) == 1_000


async def test_preload_learns_every_jobset_at_once() -> None:
    """After the preload, starts of existing jobsets need no lookup; a failed preload is not fatal."""
    table = FakeTable({1, 2})

    async def every() -> set[int]:
        return set(table.rows)

    known = KnownJobsets(table.lookup, every=every)
    await known.preload()
    assert await known.known({1, 2}) == {1, 2}
    assert table.queries == []

    async def down() -> set[int]:
        raise DbUnavailable("down")

    lazy = KnownJobsets(table.lookup, every=down)
    await lazy.preload()
    assert await lazy.known({1}) == {1}
    assert table.queries == [[1]]
