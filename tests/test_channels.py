"""receive_some/send_all: batches without losing order, bounds or the end of a channel."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from hydra_otel.tasks.channels import receive_some, send_all


async def test_receive_some_takes_what_is_queued_up_to_the_limit() -> None:
    tx, rx = trio.open_memory_channel[int](10)
    for i in range(5):
        tx.send_nowait(i)
    assert await receive_some(rx, limit=3) == [0, 1, 2]
    assert await receive_some(rx, limit=3) == [3, 4]


async def test_receive_some_waits_for_the_first_item(autojump_clock: trio.testing.MockClock) -> None:
    tx, rx = trio.open_memory_channel[int](10)

    async def later() -> None:
        await trio.sleep(5)
        tx.send_nowait(7)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await receive_some(rx) == [7]
    assert trio.current_time() == 5


async def test_the_end_comes_after_the_last_items() -> None:
    tx, rx = trio.open_memory_channel[int](10)
    tx.send_nowait(1)
    tx.send_nowait(2)
    await tx.aclose()
    assert await receive_some(rx) == [1, 2]
    with pytest.raises(trio.EndOfChannel):
        await receive_some(rx)


async def test_send_all_waits_for_room_and_keeps_order() -> None:
    tx, rx = trio.open_memory_channel[int](2)
    got: list[int] = []

    async def consume() -> None:
        async with rx:
            async for item in rx:
                got.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        async with tx:
            await send_all(tx, range(10))
    assert got == list(range(10))
