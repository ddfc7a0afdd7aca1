"""The LISTEN connection's read pacing (adapters/db.py ``_ReadPacer``) on a fake transport, with real timing."""

from __future__ import annotations

import asyncio

from hydra_otel.adapters.db import _ReadPacer


class _Transport:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class _Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.reads: list[int] = []

    def data_received(self, data: bytes) -> None:
        self.reads.append(len(data))


def _run(reads: list[tuple[float, int]]) -> tuple[_Transport, _Inner]:
    """Feed reads of the given sizes at the given loop times; return the transport and protocol."""
    loop = asyncio.SelectorEventLoop()  # not the policy's loop: trio-asyncio replaces that
    transport, inner = _Transport(), _Inner()
    pacer = _ReadPacer(inner, transport, linger=0.05, quiet=16 * 1024)

    async def main() -> None:
        start = loop.time()
        for at, size in reads:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            pacer.data_received(b"x" * size)
        await asyncio.sleep(0.06)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return transport, inner


def test_a_trickle_pauses_after_each_read_and_resumes() -> None:
    transport, inner = _run([(0.0, 100), (0.06, 100), (0.12, 100)])
    assert inner.reads == [100, 100, 100]  # every byte is handed on
    assert transport.pauses == 3
    assert not transport.paused  # resumed after the linger


def test_a_burst_is_not_paced_after_its_first_window() -> None:
    big = 200 * 1024
    reads: list[tuple[float, int]] = [(0.0, 100), (0.06, big)] + [
        (0.06 + 0.01 * i, 8192) for i in range(1, 15)
    ]
    transport, _ = _run(reads)
    # The first read (the window before was quiet) pauses; the window with 200 KiB does not, nor
    # do the next ones, though each read is small: each window brings more than 16 KiB.
    assert transport.pauses == 1
