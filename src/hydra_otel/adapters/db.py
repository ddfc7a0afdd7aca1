"""PostgreSQL access: the only asyncio-flavoured module.

Everything public here is **Trio-flavoured**: call it from trio code running
inside ``trio_asyncio.open_loop()``. asyncpg runs underneath through
``aio_as_trio``; its exceptions are mapped to :class:`DbUnavailable` at this
boundary.

Why the listener looks the way it does (measured, see docs/decisions/0002):

* asyncpg's ``add_listener`` callback costs one trio-asyncio ``call_soon`` hop
  per notification (~18 µs); overriding the connection's private
  ``_process_notification`` delivers straight from the protocol, ~3x faster.
  asyncpg is pinned to a minor version for that reason.
* A listen-only connection never raises when it dies: a termination listener
  catches a server-side close, and a periodic ``SELECT 1`` under a deadline
  catches a hung server or half-open link.
* The callback must never raise (it would kill the whole asyncio bridge) and
  cannot block, so it uses ``send_nowait`` and counts what it drops; the
  task then asks for a catch-up with a :class:`Resync` marker.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from hydra_otel.core.backoff import Backoff
from hydra_otel.errors import DbUnavailable, LeadershipLost, first_leaf
from hydra_otel.stats import Stats

log = logging.getLogger("hydra_otel.db")

#: Exceptions that mean "the database is (for now) unreachable".
RETRYABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    trio.TooSlowError,
)


#: What ends one LISTEN session and starts a reconnect: driver errors, and our own "connection lost".
_LISTEN_LOST: tuple[type[BaseException], ...] = (*RETRYABLE, DbUnavailable)


@dataclass(frozen=True, slots=True)
class RawNotification:
    """A notification as received: channel, payload, wall-clock receive time (ns)."""

    channel: str
    payload: str
    at_ns: int


@dataclass(frozen=True, slots=True)
class Resync:
    """Marker: notifications may have been missed (start, reconnect, overflow)."""

    reason: str


ListenItem = RawNotification | Resync


@dataclass(slots=True)
class ListenStatistics:
    """Counters of the LISTEN connection (mutable, owned by the listener)."""

    received: int = 0
    dropped: int = 0
    connects: int = 0
    connection_losses: int = 0


class _DirectNotifyConnection(asyncpg.Connection):
    """asyncpg connection that hands notifications straight to a sink."""

    _notify_sink: Callable[[str, str], None] | None = None

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        sink = self._notify_sink
        if sink is not None:
            sink(channel, payload)
        else:  # pragma: no cover - only before the sink is installed
            super()._process_notification(pid, channel, payload)  # type: ignore[misc]  # private, not in the stubs


def _ignore(*_args: object) -> None:
    """Placeholder listener: add_listener issues LISTEN; delivery goes through the sink."""


#: SQLSTATE classes that mean "the server cannot answer now" rather than "this query is wrong":
#: connection exceptions, insufficient resources, operator intervention (shutdown, restart),
#: system errors, and authorization problems an operator fixes without restarting us.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "28", "53", "57", "58")
_INSUFFICIENT_PRIVILEGE = "42501"


def _is_transient(exc: asyncpg.PostgresError) -> bool:
    state = str(getattr(exc, "sqlstate", "") or "")
    return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state == _INSUFFICIENT_PRIVILEGE


class Database:
    """A small pool of query connections (Trio-flavoured), separate from LISTEN."""

    def __init__(self, pool: asyncpg.Pool, stats: Stats | None = None) -> None:
        self._pool = pool
        self._stats = stats if stats is not None else Stats()

    @property
    def queries(self) -> int:
        """Queries sent so far."""
        return self._stats.queries

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Run one read-only query and return its rows. Raises DbUnavailable."""
        self._stats.queries += 1
        try:
            rows: list[asyncpg.Record] = await aio_as_trio(self._pool.fetch)(sql, *args)
        except (asyncpg.InterfaceError, OSError, TimeoutError, asyncpg.PostgresConnectionError) as exc:
            raise DbUnavailable(f"database query failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            if not _is_transient(exc):
                raise  # a bug in a query (syntax, types): let it surface
            raise DbUnavailable(f"database query failed: {type(exc).__name__}: {exc}") from exc
        return rows

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run one query and return the first column of its first row."""
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Pool connections only run single SELECTs (no LISTEN, no session settings, no transactions
    left open), so asyncpg's reset statement after every query would be a wasted round trip."""


@asynccontextmanager
async def open_database(dsn: str, *, size: int = 4, stats: Stats | None = None) -> AsyncIterator[Database]:
    """Open the query pool (lazily: a database that is down at start-up only delays queries).

    Closing it is shielded so a cancelled shutdown cannot leak connections.
    """
    try:
        pool = await aio_as_trio(asyncpg.create_pool)(
            dsn, min_size=0, max_size=size, timeout=10, command_timeout=60, reset=_no_reset
        )
    except RETRYABLE as exc:
        raise DbUnavailable(f"cannot open the database pool: {exc}") from exc
    try:
        yield Database(pool, stats)
    finally:
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + 5
            await aio_as_trio(pool.close)()
        if cs.cancelled_caught:
            pool.terminate()


class Connection:
    """One plain connection (Trio-flavoured), for tools that play SQL scripts (demo, benchmarks)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str) -> None:
        """Run a script of one or more statements (NOTIFYs inside a transaction go out at its COMMIT)."""
        await aio_as_trio(self._conn.execute)(sql)

    async def fetchval(self, sql: str) -> Any:
        """The first column of the first row of one query."""
        return await aio_as_trio(self._conn.fetchval)(sql)


@asynccontextmanager
async def open_connection(dsn: str) -> AsyncIterator[Connection]:
    """A dedicated connection, closed (shielded) on exit. Raises DbUnavailable."""
    try:
        conn = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
    except RETRYABLE as exc:
        raise DbUnavailable(f"cannot connect to the database: {exc}") from exc
    try:
        yield Connection(conn)
    finally:
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + 5
            await aio_as_trio(conn.close)()
        if cs.cancelled_caught:
            conn.terminate()


def leader_lock_key(instance: str) -> int:
    """The advisory lock key of an instance name: a stable signed 64-bit number."""
    digest = hashlib.sha256(f"hydra-otel leader {instance}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def hold_leadership(
    dsn: str,
    key: int,
    *,
    poll_interval: float = 2.0,
    probe_interval: float = 5.0,
    probe_timeout: float = 3.0,
    task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Wait until this process holds the session advisory lock ``key``, report started(), then hold it.

    ``started()`` is given True if another instance held the lock first (this is a takeover).

    PostgreSQL releases a session lock when its connection ends, so a standby
    takes over within ``poll_interval`` of the active instance dying. When the
    lock's own connection is lost (a database restart, a network cut), this
    reconnects and takes the lock again; only if another instance got it in
    the meantime does it raise :class:`LeadershipLost` (the caller must stop
    exporting).
    """
    started = waited = False
    while True:
        conn = await _connect_retrying(dsn)
        try:
            lost = trio.Event()
            # Bound now: a late callback from the previous connection must not flag this one.
            conn.add_termination_listener(lambda _c, event=lost: event.set())
            while not await aio_as_trio(conn.fetchval)("SELECT pg_try_advisory_lock($1)", key):
                if started:
                    raise LeadershipLost(
                        "another instance took the instance lock while its connection was down"
                    )
                if not waited:
                    log.info(
                        "standby: another instance holds the lock; waiting to take over", extra={"lock": key}
                    )
                    waited = True
                await trio.sleep(poll_interval)
            log.info("active: holding the instance lock" if not started else "took the instance lock again")
            if not started:
                started = True
                task_status.started(waited)
            await _hold(conn, lost, probe_interval, probe_timeout)
            log.warning("lost the connection holding the instance lock; reconnecting")
        except RETRYABLE as exc:
            log.warning("instance lock connection failed; reconnecting", extra={"error": str(exc)})
        finally:
            conn.terminate()


async def _hold(
    conn: asyncpg.Connection, lost: trio.Event, probe_interval: float, probe_timeout: float
) -> None:
    """Return when the connection holding the lock is gone (closed, or silent past the probe)."""
    flags = _Flags()
    flags.lost = lost
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_health, conn, flags, probe_interval, probe_timeout)
        await lost.wait()
        nursery.cancel_scope.cancel()


async def _connect_retrying(dsn: str) -> asyncpg.Connection:
    backoff = Backoff(base=0.5, cap=10.0)
    while True:
        try:
            conn: asyncpg.Connection = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
            return conn
        except RETRYABLE as exc:
            delay = backoff.next_delay()
            log.warning(
                "cannot connect to the database; retrying",
                extra={"error": str(exc), "retry_in_s": round(delay, 2)},
            )
            await trio.sleep(delay)


async def run_listener(
    dsn: str,
    channels: Sequence[str],
    send: trio.MemorySendChannel[ListenItem],
    *,
    stats: ListenStatistics,
    backoff: Backoff,
    health_interval: float = 5.0,
    health_timeout: float = 3.0,
    consume: Callable[[str, str], bool] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """LISTEN on ``channels`` forever, reconnecting with ``backoff``.

    ``consume(channel, payload)``, if given, is offered each notification first, in the
    callback: it returns True for what it handled itself (it must be cheap and never
    raise), so such notifications never take a place in the bounded channel.

    Reports ``started()`` once LISTEN is first active. After every (re)connect it
    sends a :class:`Resync` so the consumer can catch up from Hydra's tables.
    """
    started = False

    def on_ready() -> None:
        nonlocal started
        backoff.reset()
        if not started:
            started = True
            task_status.started()

    while True:
        try:
            await _session(dsn, channels, send, stats, on_ready, health_interval, health_timeout, consume)
        except* _LISTEN_LOST as group:
            stats.connection_losses += 1
            delay = backoff.next_delay()
            log.warning(
                "LISTEN connection lost or refused; reconnecting",
                extra={"error": _first_message(group), "retry_in_s": round(delay, 2)},
            )
            await trio.sleep(delay)


def _first_message(group: BaseExceptionGroup[BaseException]) -> str:
    exc = first_leaf(group)
    return f"{type(exc).__name__}: {exc}"


class _Flags:
    """State shared between the notification sink and the session's tasks."""

    def __init__(self) -> None:
        self.lost = trio.Event()
        self.overflow = trio.Event()


async def _session(
    dsn: str,
    channels: Sequence[str],
    send: trio.MemorySendChannel[ListenItem],
    stats: ListenStatistics,
    on_ready: Callable[[], None],
    health_interval: float,
    health_timeout: float,
    consume: Callable[[str, str], bool] | None = None,
) -> None:
    """One connection's life: returns never, raises DbUnavailable (or a driver error) when lost."""
    conn: _DirectNotifyConnection = await aio_as_trio(asyncpg.connect)(
        dsn, timeout=10, connection_class=_DirectNotifyConnection
    )
    flags = _Flags()
    try:

        def sink(channel: str, payload: str) -> None:
            # Runs in the trio thread from asyncpg's protocol; must never raise or block.
            if consume is not None and consume(channel, payload):
                stats.received += 1
                return
            try:
                send.send_nowait(RawNotification(channel, payload, time.time_ns()))
                stats.received += 1
            except trio.WouldBlock:
                stats.dropped += 1
                flags.overflow.set()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                flags.lost.set()

        conn._notify_sink = sink
        conn.add_termination_listener(lambda _c: flags.lost.set())
        for channel in channels:
            await aio_as_trio(conn.add_listener)(channel, _ignore)
        stats.connects += 1
        log.info("LISTEN active", extra={"channels": len(channels), "backend_pid": conn.get_server_pid()})
        await send.send(Resync("connected"))
        on_ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_health, conn, flags, health_interval, health_timeout)
            nursery.start_soon(_overflow_watch, send, flags)
            await flags.lost.wait()
            nursery.cancel_scope.cancel()
        raise DbUnavailable("LISTEN connection terminated")
    finally:
        conn._notify_sink = None
        conn.terminate()  # sync abort: never await close() on a dead or hung connection


async def _health(conn: asyncpg.Connection, flags: _Flags, interval: float, probe_timeout: float) -> None:
    while True:
        await trio.sleep(interval)
        try:
            with trio.fail_after(probe_timeout):
                await aio_as_trio(conn.fetchval)("SELECT 1")
        except RETRYABLE:
            flags.lost.set()
            return


async def _overflow_watch(send: trio.MemorySendChannel[ListenItem], flags: _Flags) -> None:
    # The sink cannot block, so it only flags an overflow; this task asks for one catch-up per episode.
    while True:
        await flags.overflow.wait()
        log.warning("notification queue full: dropped notifications will be rebuilt by a catch-up")
        await send.send(Resync("overflow"))  # blocks until there is room again
        flags.overflow = trio.Event()


open_loop = trio_asyncio.open_loop
