"""Moving items between pipeline stages without one scheduler pass per item.

``await receive()`` and ``await send()`` are checkpoints: each one goes through
Trio's scheduler. In a burst (80,000 ``step_finished``/``build_finished`` in a
few commits) that cost more CPU than parsing the notifications did. So the stages
take whatever is already queued in one go and send without waiting while there
is room. They still checkpoint once per batch, and wait whenever the next stage is
full, so channels stay bounded and backpressure works as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import trio

T = TypeVar("T")

#: Items taken per scheduler pass at most, so no stage holds the Trio thread for long.
DRAIN_LIMIT = 512


async def receive_some(channel: trio.MemoryReceiveChannel[T], limit: int = DRAIN_LIMIT) -> list[T]:
    """Wait for one item, then take whatever else is queued, up to ``limit`` items in all.

    Raises:
        trio.EndOfChannel: the channel is closed and empty.
    """
    batch = [await channel.receive()]
    while len(batch) < limit:
        try:
            batch.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):  # the next call reports the end
            break
    return batch


async def send_all(channel: trio.MemorySendChannel[T], items: Iterable[T]) -> None:
    """Send ``items`` in order, waiting only when the channel is full."""
    for item in items:
        try:
            channel.send_nowait(item)
        except trio.WouldBlock:
            await channel.send(item)
