"""The jobset existence cache the stitcher task consults for eval_started."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from hydra_otel.errors import DbUnavailable
from hydra_otel.tasks.stitcher import KnownJobsets


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
