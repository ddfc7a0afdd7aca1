"""Both notification delivery paths, with real NOTIFYs from a real PostgreSQL.

The direct hook (asyncpg's private ``_process_notification``) is an optimisation; an asyncpg
release without it gets the public ``add_listener`` callback (docs/decisions/0002).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.adapters import db
from hydra_otel.core.backoff import Backoff
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from hydra_otel.selfmon.stats import ListenStatistics
from hydra_otel.tasks.channels import receive_some
from tests.integration.harness import Hydra, StartDaemon
from tests.integration.test_eval_traces import add_eval

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("path", list(db.DeliveryPath))
async def test_each_path_delivers_every_notification_in_order(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, nursery: trio.Nursery, path: db.DeliveryPath
) -> None:
    send, receive = trio.open_memory_channel[db.ListenItem](100)
    stats = ListenStatistics()
    consumed: list[tuple[str, str]] = []

    def consume(channel: str, payload: str) -> bool:
        if payload == "mine":
            consumed.append((channel, payload))
            return True
        return False

    await nursery.start(
        lambda task_status: db.run_listener(
            hydra_db,
            ["eval_added", "build_finished"],
            send,
            stats=stats,
            backoff=Backoff(),
            consume=consume,
            path=path,
            task_status=task_status,
        )
    )
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    try:
        async with aio_as_trio(conn.transaction()):
            for i in range(50):
                await aio_as_trio(conn.execute)(f"NOTIFY build_finished, '{i}'")
            await aio_as_trio(conn.execute)("NOTIFY eval_added, 'mine'")
            await aio_as_trio(conn.execute)("NOTIFY unrelated, 'x'")
    finally:
        await aio_as_trio(conn.close)()
    with trio.fail_after(10):
        assert await receive.receive() == db.Resync("connected")
        got = [await receive.receive() for _ in range(50)]
    assert [(n.channel, n.payload) for n in got if isinstance(n, db.RawNotification)] == [
        ("build_finished", str(i)) for i in range(50)
    ]
    assert consumed == [("eval_added", "mine")]
    assert (stats.received, stats.dropped) == (51, 0)
    nursery.cancel_scope.cancel()


def test_an_asyncpg_without_the_hook_gets_the_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert db.delivery_path() is db.DeliveryPath.DIRECT
    monkeypatch.delattr(asyncpg.Connection, "_process_notification")
    assert db.delivery_path() is db.DeliveryPath.PUBLIC


async def test_the_daemon_on_the_public_path_logs_it_and_exports(
    hydra: Hydra,
    start_daemon: StartDaemon,
    otlp_grpc: GrpcOtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(db, "delivery_path", lambda: db.DeliveryPath.PUBLIC)
    with caplog.at_level(logging.INFO, logger="hydra_otel.db"):
        await start_daemon()
    chosen = [r for r in caplog.records if r.getMessage() == "notification delivery path chosen"]
    assert [getattr(r, "path", None) for r in chosen] == ["add_listener"]
    await add_eval(hydra)
    spans = await otlp_grpc.wait_for_spans(3)
    assert "BUILD nixpkgs:trunk" in {s.span.name for s in spans}


def test_without_the_private_transport_the_sql_ascii_filter_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Connection:
        """A connection of an asyncpg release that hides ``_transport``."""

    with caplog.at_level(logging.WARNING, logger="hydra_otel.db"):
        db._filter_undecodable(Connection(), ListenStatistics())  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "this asyncpg release hides the connection's transport: a notification that is not UTF-8 in "
        "this SQL_ASCII database will break the LISTEN connection (it reconnects)"
    ]


async def _listen(
    hydra_db: str,
    nursery: trio.Nursery,
    read_linger: float,
    channel: str = "build_finished",
    health_interval: float = 5.0,
) -> trio.MemoryReceiveChannel[db.ListenItem]:
    send, receive = trio.open_memory_channel[db.ListenItem](100_000)
    await nursery.start(
        lambda task_status: db.run_listener(
            hydra_db,
            [channel],
            send,
            stats=ListenStatistics(),
            backoff=Backoff(),
            read_linger=read_linger,
            health_interval=health_interval,
            task_status=task_status,
        )
    )
    with trio.fail_after(10):
        assert await receive.receive() == db.Resync("connected")
    return receive


async def test_a_trickle_of_notifications_is_read_in_one_batch_per_linger(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, nursery: trio.Nursery
) -> None:
    """After a small read the connection waits: commits 30 ms apart are handed on together."""
    receive = await _listen(hydra_db, nursery, read_linger=1.0)
    batches: list[list[str]] = []
    done = trio.Event()

    async def consume() -> None:  # takes whatever is queued each time it wakes, as the intake does
        while sum(map(len, batches)) < 5:
            batches.append(
                [n.payload for n in await receive_some(receive) if isinstance(n, db.RawNotification)]
            )
        done.set()

    nursery.start_soon(consume)
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    try:
        for i in range(5):  # separate commits, as Hydra finishes builds
            await aio_as_trio(conn.execute)(f"NOTIFY build_finished, '{i}'")
            await trio.sleep(0.03)
        with trio.fail_after(10):
            await done.wait()
    finally:
        await aio_as_trio(conn.close)()
    # The first read is handed on at once and pauses reading; the other four wait in the
    # socket and come in one read, so the consumer wakes twice, not five times.
    assert batches == [["0"], ["1", "2", "3", "4"]]
    nursery.cancel_scope.cancel()


async def _burst(
    conn: asyncpg.Connection, receive: trio.MemoryReceiveChannel[db.ListenItem], n: int = 20_000
) -> float:
    """Commit ``n`` notifications at once; seconds until the listener handed on the last."""
    await aio_as_trio(conn.execute)(
        f"SELECT count(pg_notify('build_finished', 'burst-' || i)) FROM generate_series(1, {n}) i"
    )
    start = trio.current_time()
    with trio.fail_after(30):
        for _ in range(n):
            await receive.receive()
    return trio.current_time() - start


async def test_a_burst_is_read_without_pauses(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, nursery: trio.Nursery
) -> None:
    """Large reads do not pause: 20,000 notifications in one commit take far less than one pause each."""
    receive = await _listen(hydra_db, nursery, read_linger=1.0)
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    try:
        # 20,000 notifications are ~600 KiB: a pause after each read would take 3 s and more.
        assert await _burst(conn, receive) < 2.5
    finally:
        await aio_as_trio(conn.close)()
    nursery.cancel_scope.cancel()


async def test_a_stopped_listener_first_reads_what_waits_in_its_socket(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str
) -> None:
    """A notification committed during a pause is handed on when the listener is stopped, not dropped
    with the connection (the evaluator's live-only notifications cannot be found again)."""
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    try:
        async with trio.open_nursery() as nursery:
            # One read, then no other for a minute, and no health probe that holds reading open.
            receive = await _listen(hydra_db, nursery, 60.0, channel="eval_failed", health_interval=600.0)
            with trio.fail_after(10):
                await aio_as_trio(conn.execute)("NOTIFY eval_failed, 'first'")
                first = await receive.receive()
            assert isinstance(first, db.RawNotification)
            assert first.payload == "first"
            await aio_as_trio(conn.execute)("NOTIFY eval_failed, 'waiting'")
            nursery.cancel_scope.cancel()
    finally:
        await aio_as_trio(conn.close)()
    with trio.fail_after(1):  # it is queued already, or it was dropped
        rest = [item.payload for item in await receive_some(receive) if isinstance(item, db.RawNotification)]
    assert rest == ["waiting"]


def _pacer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hydra-otel-read-pacer" and t.is_alive()]


async def _ended(threads: list[threading.Thread]) -> bool:
    for t in threads:
        await trio.to_thread.run_sync(t.join, 5.0)
    return not any(t.is_alive() for t in threads)


async def test_a_burst_during_a_long_pause_is_read_at_once_and_the_pacer_thread_ends_with_its_connection(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str
) -> None:
    """The pause's socket checks run in a thread: a burst committed during a 30 s pause is read
    within a check, not at the pause's end; a reconnect and a stop leave no such thread behind."""
    before = _pacer_threads()
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    try:
        async with trio.open_nursery() as nursery:
            receive = await _listen(hydra_db, nursery, 30.0, health_interval=600.0)
            await aio_as_trio(conn.execute)("NOTIFY build_finished, 'first'")  # read, then a 30 s pause
            with trio.fail_after(10):
                assert (await receive.receive()).payload == "first"  # type: ignore[union-attr]
            first = [t for t in _pacer_threads() if t not in before]
            assert len(first) == 1  # the paused connection's watch
            assert await _burst(conn, receive) < 5  # not the 30 s pause

            # The listener's backend dies: the connection is lost, a new one pauses with its own watch.
            await aio_as_trio(conn.execute)(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'"
            )
            with trio.fail_after(30):
                while not isinstance(await receive.receive(), db.Resync):
                    pass
                await aio_as_trio(conn.execute)("NOTIFY build_finished, 'again'")
                while getattr(await receive.receive(), "payload", None) != "again":
                    pass
            assert await _ended(first)
            nursery.cancel_scope.cancel()
    finally:
        await aio_as_trio(conn.close)()
    assert await _ended([t for t in _pacer_threads() if t not in before])
