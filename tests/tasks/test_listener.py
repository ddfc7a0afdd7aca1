"""run_listener and hold_leadership against a fake server (tests/tasks/fakepg.py), on trio's virtual clock.

What needs a real server (the delivery hook, encodings, real connection losses) is tested
in tests/integration/ (test_listen_paths.py, test_db_failures.py, test_ha.py); here the
schedule and the bookkeeping around the connection are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from hydra_otel.adapters import db
from hydra_otel.adapters.db import (
    DeliveryPath,
    ListenItem,
    RawNotification,
    Resync,
    hold_leadership,
    run_listener,
)
from hydra_otel.core.backoff import Backoff
from hydra_otel.errors import LeadershipLost
from hydra_otel.selfmon.stats import ListenStatistics
from tests.tasks.fakepg import FakeServer

CHANNELS = ("eval_started", "build_finished", "build_queued")
BACKOFF = Backoff(base=1.0, factor=2.0, cap=8.0, jitter=0.0)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(db, "_connect", fake.connect)
    return fake


class Listening:
    def __init__(self, server: FakeServer, capacity: int = 100, read_linger: float = 0.0) -> None:
        self.server = server
        self.read_linger = read_linger
        self.stats = ListenStatistics()
        self.send, self.receive = trio.open_memory_channel[ListenItem](capacity)
        self.consumed: list[tuple[str, str]] = []

    def consume(self, channel: str, payload: str) -> bool:
        if channel == "build_queued":
            self.consumed.append((channel, payload))
            return True
        return False

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(
            functools.partial(
                run_listener,
                "postgresql:///hydra",
                CHANNELS,
                self.send,
                stats=self.stats,
                backoff=Backoff(base=1.0, factor=2.0, cap=8.0, jitter=0.0),
                health_interval=5.0,
                health_timeout=3.0,
                consume=self.consume,
                path=DeliveryPath.PUBLIC,
                read_linger=self.read_linger,
            )
        )

    def drain(self) -> list[ListenItem]:
        out: list[ListenItem] = []
        while True:
            try:
                out.append(self.receive.receive_nowait())
            except trio.WouldBlock:
                return out


def payloads(items: list[ListenItem]) -> list[object]:
    return [i.payload if isinstance(i, RawNotification) else i for i in items]


async def test_run_listener_reports_started_with_listen_active_then_delivers(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """started() comes once every channel is listened to; a Resync leads, then notifications in order."""
    lis = Listening(server)
    async with trio.open_nursery() as nursery:
        await lis.start(nursery)
        (conn,) = server.live
        assert set(conn.listeners) == set(CHANNELS)
        server.notify("eval_started", "a\t1")
        server.notify("build_queued", "7")  # a hint: handled by consume, never queued
        server.notify("build_finished", "7")
        server.notify("not_listened", "x")
        assert payloads(lis.drain()) == [Resync("connected"), "a\t1", "7"]
        assert lis.consumed == [("build_queued", "7")]
        assert (lis.stats.received, lis.stats.connects) == (3, 1)
        nursery.cancel_scope.cancel()
    assert server.live == []  # the connection is closed on the way out


async def test_run_listener_reconnects_after_a_lost_connection_and_asks_for_a_catch_up(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A terminated backend is noticed at once; the listener reconnects after the backoff and sends a new Resync."""
    lis = Listening(server)
    async with trio.open_nursery() as nursery:
        await lis.start(nursery)
        lis.drain()
        t0 = trio.current_time()
        server.kill(server.live[0])
        with trio.fail_after(60):
            assert await lis.receive.receive() == Resync("connected")
        assert trio.current_time() - t0 == 1.0  # the first backoff step
        assert (lis.stats.connection_losses, lis.stats.connects, server.connects) == (1, 2, 2)
        server.notify("eval_started", "b\t2")
        assert payloads(lis.drain()) == ["b\t2"]
        nursery.cancel_scope.cancel()


async def test_run_listener_backs_off_while_the_server_is_down(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Refused connects are retried after 1, 2, 4, 8, 8 s (the cap); a successful one resets the backoff."""
    lis = Listening(server)
    async with trio.open_nursery() as nursery:
        await lis.start(nursery)
        lis.drain()
        server.down = True
        t0 = trio.current_time()
        server.kill(server.live[0])
        await trio.sleep(22.5)
        assert server.connects == 1 + 4  # the first, then refused at 1, 3, 7 and 15 s
        server.down = False
        with trio.fail_after(60):
            assert await lis.receive.receive() == Resync("connected")
        assert trio.current_time() - t0 == 23  # 15 + the capped 8 s
        server.kill(server.live[0])
        t1 = trio.current_time()
        with trio.fail_after(60):
            assert await lis.receive.receive() == Resync("connected")
        assert trio.current_time() - t1 == 1.0  # reset by the connect that succeeded
        nursery.cancel_scope.cancel()


async def test_run_listener_probes_a_silent_connection_and_replaces_it(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A hung link raises nothing: the SELECT 1 probe times out after interval + timeout, and the listener reconnects."""
    lis = Listening(server)
    async with trio.open_nursery() as nursery:
        await lis.start(nursery)
        lis.drain()
        t0 = trio.current_time()
        server.hang = True
        await trio.sleep(5 + 3 - 0.1)
        assert lis.stats.connection_losses == 0
        await trio.sleep(0.2)
        assert lis.stats.connection_losses == 1
        server.hang = False
        with trio.fail_after(60):
            assert await lis.receive.receive() == Resync("connected")
        assert trio.current_time() - t0 == 5 + 3 + 1
        nursery.cancel_scope.cancel()


async def test_run_listener_drops_on_overflow_and_asks_for_one_catch_up(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A full channel drops (counted) instead of blocking the driver, and one Resync follows once there is room."""
    lis = Listening(server, capacity=3)
    async with trio.open_nursery() as nursery:
        await lis.start(nursery)
        assert lis.drain() == [Resync("connected")]
        for i in range(6):
            server.notify("build_finished", str(i))
        assert lis.stats.dropped == 3
        await trio.testing.wait_all_tasks_blocked()  # the Resync waits for room
        assert payloads(lis.drain()) == ["0", "1", "2", Resync("overflow")]
        await trio.testing.wait_all_tasks_blocked()
        assert lis.drain() == []  # one per episode
        server.notify("build_finished", "7")
        assert payloads(lis.drain()) == ["7"]
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def paced(server: FakeServer, read_linger: float) -> AsyncIterator[tuple[Listening, trio.Nursery]]:
    """A listener on ``server`` with its reads paced by ``read_linger``, started, its Resync taken."""
    server.paced = True
    lis = Listening(server, read_linger=read_linger)
    async with trio.open_nursery() as nursery:
        await lis.start(nursery)
        lis.drain()
        yield lis, nursery


async def test_run_listener_paced_hands_a_trickle_on_once_per_linger(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """With a read linger (the export delay), what arrives during the pause comes in one read, nothing lost."""
    async with paced(server, 1.0) as (lis, nursery):
        t0 = trio.current_time()
        server.notify("build_finished", "1")  # read at once; reading pauses for 1 s
        await trio.testing.wait_all_tasks_blocked()
        assert payloads(lis.drain()) == ["1"]
        for i in range(2, 6):
            await trio.sleep(0.1)
            server.notify("build_finished", str(i))
        await trio.sleep(0.5)
        assert lis.drain() == []  # waiting in the socket
        got = await lis.receive.receive()
        assert trio.current_time() - t0 == pytest.approx(1.0, abs=0.06)
        assert payloads([got, *lis.drain()]) == ["2", "3", "4", "5"]
        nursery.cancel_scope.cancel()
    assert server.live == []


async def test_run_listener_paced_for_longer_than_the_probe_timeout_keeps_a_healthy_link(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A pause (30 s here) must not hold back the SELECT 1 probe's answer past its 3 s timeout."""
    async with paced(server, 30.0) as (lis, nursery):
        server.notify("build_finished", "1")  # reading pauses for 30 s
        await trio.sleep(0.5)
        server.notify("build_finished", "2")
        await trio.sleep(20)  # four probes
        assert lis.stats.connection_losses == 0
        # The probe reads what waited in the socket along with its answer: "2" came at the first one.
        assert payloads(lis.drain()) == ["1", "2"]
        nursery.cancel_scope.cancel()


async def test_run_listener_paced_still_notices_a_hung_link_and_reconnects(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Pacing changes nothing for the probe: a hung link is replaced after interval + timeout."""
    async with paced(server, 1.0) as (lis, nursery):
        server.notify("build_finished", "1")
        t0 = trio.current_time()
        server.hang = True
        await trio.sleep(5 + 3 + 0.1)
        assert lis.stats.connection_losses == 1
        server.hang = False
        with trio.fail_after(60):
            while not isinstance(await lis.receive.receive(), Resync):
                pass
        assert trio.current_time() - t0 == pytest.approx(5 + 3 + 1)
        server.notify("build_finished", "2")
        await trio.testing.wait_all_tasks_blocked()
        assert payloads(lis.drain()) == ["2"]
        nursery.cancel_scope.cancel()
    assert server.live == []


KEY = 42


async def test_hold_leadership_starts_at_once_when_the_lock_is_free(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """The first instance takes the lock and reports started(False): not a takeover."""
    async with trio.open_nursery() as nursery:
        takeover = await nursery.start(functools.partial(hold_leadership, "dsn", KEY))
        assert takeover is False
        assert server.locks[KEY] is server.live[0]
        nursery.cancel_scope.cancel()
    assert KEY not in server.locks  # the session lock ends with its connection


async def test_hold_leadership_waits_as_standby_and_takes_over_within_the_poll_interval(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """While another instance holds the lock this one polls; it takes over at the first poll after the release."""
    server.hold_lock(KEY)
    started: list[tuple[float, bool]] = []

    async def standby() -> None:
        async with trio.open_nursery() as inner:
            takeover = await inner.start(functools.partial(hold_leadership, "dsn", KEY, poll_interval=2.0))
            started.append((trio.current_time(), takeover))

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(standby)
        await trio.sleep(9)
        assert started == []
        del server.locks[KEY]  # the active instance died: PostgreSQL released its lock
        await trio.sleep(2)
        assert started == [(t0 + 10, True)]  # polls at 0, 2, ..., 10
        nursery.cancel_scope.cancel()


async def test_hold_leadership_takes_the_lock_again_after_a_lost_connection(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A lost lock connection is replaced and the lock taken again, if nobody took it meanwhile."""
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(hold_leadership, "dsn", KEY))
        first = server.live[0]
        server.kill(first)
        await trio.testing.wait_all_tasks_blocked()
        (second,) = server.live
        assert second is not first
        assert server.locks[KEY] is second
        nursery.cancel_scope.cancel()


async def test_hold_leadership_raises_when_another_instance_took_the_lock_meanwhile(
    aio_loop: asyncio.AbstractEventLoop, server: FakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Two active instances must never export at once: a lock lost to another instance is LeadershipLost."""
    with pytest.RaisesGroup(LeadershipLost, flatten_subgroups=True), trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(hold_leadership, "dsn", KEY))
            conn = server.live[0]
            server.down = True  # the server restarts; the other instance reconnects first
            server.kill(conn)
            server.hold_lock(KEY)
            server.down = False
            await trio.sleep(60)
