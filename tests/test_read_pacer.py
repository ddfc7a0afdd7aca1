"""The LISTEN connection's read pacing (adapters/read_pacer.py) on a fake transport and socket.

The pacer runs on an asyncio loop as it does under trio-asyncio; the fake transport stands in
for the kernel: while reading is paused it keeps what "arrives" (the socket buffer), reports
it to the pacer's ``waiting()`` and hands it on in one read when reading resumes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import pytest

from hydra_otel.adapters.read_pacer import QUIET_BYTES, ReadPacer, bytes_waiting

LINGER = 1.0
POLL = 0.05


class _Transport:
    """A socket that buffers while paused; ``pacer.data_received`` is its reader."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.buffered = 0
        self.pacer: ReadPacer | None = None

    def is_closing(self) -> bool:
        return False

    def arrive(self, size: int) -> None:
        self.buffered += size
        if not self.paused:
            self._read()

    def _read(self) -> None:
        size, self.buffered = self.buffered, 0
        if size and self.pacer is not None:
            self.pacer.data_received(b"x" * size)

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False
        asyncio.get_running_loop().call_soon(self._read)  # as the selector would, once readable


class _Inner(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reads: list[tuple[float, int]] = []

    def data_received(self, data: bytes) -> None:
        self.reads.append((self.loop.time(), len(data)))


async def _until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds; TimeoutError after 5 s."""
    async with asyncio.timeout(5.0):
        while not condition():  # noqa: ASYNC110 - set by the pacer's timers and its watch thread
            await asyncio.sleep(0.005)


def _run(
    arrivals: list[tuple[float, int]], *, after: float = LINGER + 0.1
) -> tuple[_Transport, _Inner, float]:
    """Let ``size`` bytes arrive at each loop time ``at``; return the transport, protocol and start."""
    loop = asyncio.SelectorEventLoop()  # not the policy's loop: trio-asyncio replaces that
    transport, inner = _Transport(), _Inner(loop)
    transport.pacer = ReadPacer(
        inner, transport, linger=LINGER, quiet=QUIET_BYTES, poll=POLL, waiting=lambda: transport.buffered
    )
    start = 0.0

    async def main() -> None:
        nonlocal start
        start = loop.time()
        for at, size in arrivals:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            transport.arrive(size)
        await asyncio.sleep(after)

    try:
        loop.run_until_complete(main())
    finally:
        transport.pacer.connection_lost(None)  # ends the pacer's watch thread
        loop.close()
    return transport, inner, start


def test_a_trickle_is_read_once_per_linger_and_nothing_is_lost() -> None:
    """Commits 100 ms apart: the first read pauses for the linger; what came meanwhile is one read."""
    transport, inner, _ = _run([(0.0, 100)] + [(0.05 + 0.1 * i, 100) for i in range(1, 12)])
    sizes = [size for _, size in inner.reads]
    assert sum(sizes) == 1200  # every byte is handed on
    assert sizes[:2] == [100, 900]  # the first at once, then the nine of the rest of the second together
    assert inner.reads[1][0] - inner.reads[0][0] >= LINGER - 0.01
    assert transport.pauses == len(sizes)


def test_a_burst_during_a_pause_is_read_within_one_poll() -> None:
    """Bytes arriving fast while paused end the pause at the next check, and pacing stops."""
    big = 4 * QUIET_BYTES
    arrivals = [(0.0, 100), (0.02, big)] + [(0.03 + 0.01 * i, 8192) for i in range(20)]
    transport, inner, start = _run(arrivals)
    assert transport.pacer is not None
    assert transport.pacer.bursts == 1
    assert inner.reads[1][0] - start < 0.02 + 2 * POLL  # not the linger
    assert transport.pauses == 1  # the burst's reads are not paced: every window brings > 16 KiB
    assert sum(size for _, size in inner.reads) == 100 + big + 20 * 8192


def test_a_quiet_pause_wakes_the_loop_once_and_the_watch_ends_with_the_connection() -> None:
    """While a trickle waits out a pause, the socket is looked at off the loop: the loop runs the
    pacer's check once per pause (its end), not once per poll; the watch thread ends with the
    connection."""
    loop = asyncio.SelectorEventLoop()
    transport, inner = _Transport(), _Inner(loop)
    pacer = ReadPacer(inner, transport, linger=0.5, poll=0.01, waiting=lambda: transport.buffered)
    transport.pacer = pacer
    checks = 0
    check = pacer._check

    def counted() -> None:
        nonlocal checks
        checks += 1
        check()

    pacer._check = counted  # type: ignore[method-assign]

    async def main() -> None:
        for _ in range(20):  # 100 bytes every 50 ms for a second: two pauses of 50 polls each
            transport.arrive(100)
            await asyncio.sleep(0.05)
        # The last pause ends at its linger, with nothing waiting.
        await _until(lambda: sum(size for _, size in inner.reads) == 2000 and not transport.paused)

    try:
        loop.run_until_complete(main())
        watch = pacer._watch._thread
        assert watch is not None
        assert watch.is_alive()
    finally:
        pacer.connection_lost(None)
        loop.close()
    assert sum(size for _, size in inner.reads) == 2000
    assert transport.pauses == len(inner.reads)
    assert checks == transport.pauses  # one per pause: its end
    watch.join(timeout=5)
    assert not watch.is_alive()


def test_a_failing_watch_is_logged_and_the_pause_still_ends(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the socket watch costs burst detection during pauses, never the bytes or the loop."""
    loop = asyncio.SelectorEventLoop()
    transport, inner = _Transport(), _Inner(loop)
    looks = 0

    def waiting() -> int:
        nonlocal looks
        looks += 1
        if looks == 1:  # the watch thread's first look; the loop's check at the pause's end is fine
            raise ValueError("broken")
        return transport.buffered

    pacer = ReadPacer(inner, transport, linger=0.3, poll=0.01, waiting=waiting)
    transport.pacer = pacer

    async def main() -> None:
        transport.arrive(100)
        await asyncio.sleep(0.05)
        transport.arrive(4 * QUIET_BYTES)  # a burst the broken watch cannot see
        await _until(lambda: len(inner.reads) == 2)

    with caplog.at_level(logging.ERROR, logger="hydra_otel.db"):
        try:
            loop.run_until_complete(main())
        finally:
            pacer.connection_lost(None)
            loop.close()
    assert [size for _, size in inner.reads] == [100, 4 * QUIET_BYTES]
    assert inner.reads[1][0] - inner.reads[0][0] >= 0.3 - 0.01  # at the pause's end, not sooner
    assert [r.getMessage() for r in caplog.records] == [
        "the read pacer's socket watch stopped; a burst that begins while reads are paused "
        "now waits for the end of the pause (--export-delay)"
    ]


def test_a_busy_trickle_ends_a_pause_early_but_keeps_pacing() -> None:
    """16 KiB gathered slowly (not a burst rate) is read before the linger ends; pacing goes on."""
    arrivals = [(0.0, 100)] + [(0.1 * i, 4096) for i in range(1, 12)]
    transport, inner, _ = _run(arrivals)
    assert transport.pacer is not None
    assert transport.pacer.bursts == 0
    assert inner.reads[1][0] - inner.reads[0][0] < LINGER - 0.2  # four 4 KiB arrivals: 16 KiB waiting
    assert inner.reads[1][1] >= QUIET_BYTES
    assert transport.pauses == len(inner.reads)  # still pausing after every read


def test_hold_open_reads_at_once_while_an_answer_is_awaited() -> None:
    """The health probe's answer is not held back by a pause (which may exceed the probe's timeout)."""
    loop = asyncio.SelectorEventLoop()
    transport, inner = _Transport(), _Inner(loop)
    pacer = ReadPacer(inner, transport, linger=30.0, poll=POLL, waiting=lambda: transport.buffered)
    transport.pacer = pacer

    async def main() -> None:
        transport.arrive(100)  # paused for 30 s
        transport.arrive(10)
        with pacer.hold_open():
            await asyncio.sleep(0.01)
            assert [size for _, size in inner.reads] == [100, 10]  # resumed at once
            transport.arrive(20)  # the probe's answer: read at once, no pause
            assert not transport.paused
        transport.arrive(30)  # after the probe: pacing again
        assert transport.paused

    try:
        loop.run_until_complete(main())
    finally:
        pacer.connection_lost(None)
        loop.close()
    assert [size for _, size in inner.reads] == [100, 10, 20, 30]


def test_bytes_waiting_reads_nothing() -> None:
    """FIONREAD counts what a socket holds without taking it; a closed socket counts nothing."""
    a, b = socket.socketpair()
    with a, b:
        assert bytes_waiting(b) == 0
        a.sendall(b"x" * 5000)
        assert bytes_waiting(b) == 5000
        assert bytes_waiting(b) == 5000
        assert len(b.recv(10_000)) == 5000
    assert bytes_waiting(b) == 0


def test_a_large_read_while_reading_is_a_burst_from_its_first_byte() -> None:
    """A burst that starts while the connection reads (not paused) is never paused."""
    transport, inner, _ = _run([(0.0, 4 * QUIET_BYTES)] + [(0.01 * i, 8192) for i in range(1, 10)], after=0.1)
    assert transport.pacer is not None
    assert transport.pacer.bursts == 1
    assert transport.pauses == 0
    assert len(inner.reads) == 10
