"""PostgreSQL access: the only asyncio-flavoured module.

Everything public here is **Trio-flavoured**: call it from trio code running
inside ``trio_asyncio.open_loop()``. asyncpg runs underneath through
``aio_as_trio``; its exceptions are mapped to :class:`DbUnavailable` at this
boundary.

Why the listener looks the way it does (measured, see docs/decisions/0002):

* asyncpg's ``add_listener`` callback costs one trio-asyncio ``call_soon`` hop
  per notification (~18 µs); overriding the connection's private
  ``_process_notification`` delivers straight from the protocol, ~3x faster.
  That is an optimisation, chosen at start-up (:func:`delivery_path`): an
  asyncpg release without the hook gets the public ``add_listener`` callback,
  and the start-up line says which path is active.
* A listen-only connection never raises when it dies: a termination listener
  catches a server-side close, and a periodic ``SELECT 1`` under a deadline
  catches a hung server or half-open link.
* The callback must never raise (it would kill the whole asyncio bridge) and
  cannot block, so it uses ``send_nowait`` and counts what it drops; the
  task then asks for a catch-up with a :class:`Resync` marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from hydra_otel.adapters.read_pacer import ProtocolInFront, ReadPacer, pace_reads
from hydra_otel.core.backoff import Backoff
from hydra_otel.errors import (
    DbSettingsError,
    DbUnavailable,
    LeadershipLost,
    PermissionDenied,
    first_leaf,
    quote_payload,
)
from hydra_otel.log import RateLimitedLog
from hydra_otel.selfmon.stats import ListenStatistics, Stats

log = logging.getLogger("hydra_otel.db")

#: Exceptions that mean "the database is (for now) unreachable" (for tools that retry on their own;
#: the daemon's paths use :func:`classify`, which also tells configuration and permission errors apart).
RETRYABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    trio.TooSlowError,
)


#: Every error a query of a one-shot command (backfill, check, ids) can end with that is no bug: the
#: database is unreachable or too slow, a table unreadable, a setting wrong. They report it and exit.
QUERY_ERRORS: tuple[type[BaseException], ...] = (DbUnavailable, PermissionDenied, DbSettingsError, *RETRYABLE)

#: What ends one LISTEN session and starts a reconnect: driver errors, and our own "connection lost".
#: (Invalid settings never get here: the connect maps them to ConfigError first.)
_LISTEN_LOST: tuple[type[BaseException], ...] = (*RETRYABLE, DbUnavailable)


class DbErrorKind(enum.Enum):
    """What an error seen while talking to PostgreSQL means for the caller."""

    #: The server is down, restarting, shutting down or unreachable, or the connection broke
    #: mid-operation: replace the connection, retry with backoff. Nothing is dropped.
    UNAVAILABLE = "unavailable"
    #: hydra-otel's role lacks a grant (42501): hold what needs the table, tell the operator.
    PERMISSION = "permission"
    #: The connection settings are invalid (``sslmode=bogus``): retrying cannot help; exit 2.
    CONFIG = "config"
    #: The query itself is wrong (a bug, or a schema hydra-otel does not know): not retried here.
    QUERY = "query"
    #: Not a database error at all.
    OTHER = "other"


#: SQLSTATE classes that mean "the server cannot answer now" rather than "this query is wrong":
#: connection exceptions, invalid authorization (fixed in pg_hba.conf or the role, without
#: restarting us), transaction rollback (serialization, deadlock), insufficient resources,
#: operator intervention (admin shutdown 57P01, crash shutdown 57P02, cannot connect now 57P03,
#: cancelled by a timeout), system errors.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "40", "53", "57", "58"})
#: Single SQLSTATEs that are transient too: the database does not exist (yet, or while it is
#: being restored); a lock not available.
_TRANSIENT_SQLSTATES = frozenset({"3D000", "55P03"})
_INSUFFICIENT_PRIVILEGE = "42501"


def classify(exc: BaseException) -> DbErrorKind:
    """Say what ``exc``, raised by asyncpg or the OS while connecting or querying, means.

    Everything a connection can raise while it closes or the server shuts down is
    UNAVAILABLE: asyncpg's InternalClientError (a protocol left mid-operation by a
    FATAL, e.g. "cannot switch to state 12; another operation (2) is in progress"),
    InterfaceError ("connection is closed", "another operation is in progress"),
    ConnectionDoesNotExistError, the 08/57 SQLSTATEs (AdminShutdown, CannotConnectNow),
    OSError (refused, reset, socket file gone, TLS), and timeouts.
    """
    if isinstance(exc, asyncpg.ClientConfigurationError):  # before InterfaceError, its base
        return DbErrorKind.CONFIG
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state == _INSUFFICIENT_PRIVILEGE:
            return DbErrorKind.PERMISSION
        if state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES:
            return DbErrorKind.UNAVAILABLE
        if isinstance(exc, asyncpg.PostgresConnectionError):
            return DbErrorKind.UNAVAILABLE
        return DbErrorKind.QUERY
    if isinstance(
        exc,
        asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError | trio.TooSlowError,
    ):
        return DbErrorKind.UNAVAILABLE
    return DbErrorKind.OTHER


def config_error(exc: BaseException) -> DbSettingsError:
    """The error for a CONFIG-kind driver error: says where the bad setting may come from."""
    return DbSettingsError(
        f"the database connection settings are invalid: {exc} "
        "(check the database URL's parameters and PG* environment variables such as PGSSLMODE)"
    )


_DENIED = re.compile(r"permission denied for (\w+) (\S+)")


def permission_error(exc: asyncpg.PostgresError, role: str) -> PermissionDenied:
    """The PermissionDenied for a 42501 error: which object, and the GRANT that fixes it."""
    found = _DENIED.search(str(exc))
    kind, name = found.groups() if found else ("table", "?")
    if kind == "schema":
        return PermissionDenied(f"schema {name}", f"GRANT USAGE ON SCHEMA {name} TO {role};", str(exc))
    if kind in ("table", "relation", "view"):
        return PermissionDenied(name, f"GRANT SELECT ON {name} TO {role};", str(exc))
    return PermissionDenied(
        f"{kind} {name}", f"GRANT the needed privilege on {kind} {name} TO {role};", str(exc)
    )


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


#: Bad-input warnings of the LISTEN connection (undecodable payloads), rate-limited.
_warn = RateLimitedLog(log)


class DeliveryPath(enum.Enum):
    """How notifications get from asyncpg to the listener's sink."""

    #: The connection's private ``_process_notification``, overridden: straight from the protocol.
    DIRECT = "direct"
    #: The public ``add_listener`` callback: one trio-asyncio ``call_soon`` hop per notification.
    PUBLIC = "add_listener"


def delivery_path() -> DeliveryPath:
    """The fastest delivery path the installed asyncpg supports (docs/decisions/0002)."""
    hook = getattr(asyncpg.Connection, "_process_notification", None)
    return DeliveryPath.DIRECT if callable(hook) else DeliveryPath.PUBLIC


class _DirectNotifyConnection(asyncpg.Connection):
    """asyncpg connection that hands notifications straight to a sink."""

    _notify_sink: Callable[[str, str], None] | None = None

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        sink = self._notify_sink
        if sink is not None:
            sink(channel, payload)
        else:  # pragma: no cover - only before the sink is installed
            super()._process_notification(pid, channel, payload)  # type: ignore[misc]  # private, not in the stubs


class _UndecodableFilter(ProtocolInFront):
    """Sits between the LISTEN connection's transport and asyncpg's protocol; drops undecodable notifications.

    asyncpg decodes a notification's channel and payload as strict UTF-8 inside its
    protocol. On a database whose server encoding is SQL_ASCII, any role can ``NOTIFY``
    a payload that is not UTF-8, and the session (client encoding SQL_ASCII, see
    ``_session``) passes its bytes through; asyncpg's UnicodeDecodeError would then
    leave the protocol stuck mid-operation (every later query fails, and the LISTEN
    connection with it). This filter walks the message framing
    (type byte, 4-byte length) and removes each NotificationResponse that is not UTF-8
    before asyncpg sees it, reporting it to ``on_undecodable``; everything else passes
    through unchanged, so the connection and the rest of the delivery survive.
    """

    def __init__(self, inner: asyncio.Protocol, on_undecodable: Callable[[bytes], None]) -> None:
        super().__init__(inner)
        self._on_undecodable = on_undecodable
        self._pending = b""  # an incomplete message header, or an incomplete notification
        self._through = 0  # bytes of the current (other) message still to pass on unexamined

    def data_received(self, data: bytes) -> None:
        if self._pending:
            data, self._pending = self._pending + data, b""
        end = len(data)
        pos = kept = 0
        pieces: list[bytes] | None = None  # set once something is dropped
        while pos < end:
            if self._through:
                step = min(self._through, end - pos)
                pos += step
                self._through -= step
                continue
            if end - pos < 5:
                break
            size = 1 + _LENGTH.unpack_from(data, pos + 1)[0]
            if data[pos] != _NOTIFICATION:
                self._through = size
                continue
            if end - pos < size:
                break
            body = data[pos + 5 : pos + size]
            if not _utf8(body):
                pieces = [] if pieces is None else pieces
                pieces.append(data[kept:pos])
                kept = pos + size
                self._on_undecodable(body)
            pos += size
        if pos < end:
            self._pending = data[pos:]
        if pieces is not None:
            pieces.append(data[kept:pos])
            data = b"".join(pieces)
        elif pos < end:
            data = data[:pos]
        if data:
            self._inner.data_received(data)


_NOTIFICATION = ord("A")
_LENGTH = struct.Struct("!I")


def _utf8(body: bytes) -> bool:
    if body.isascii():
        return True
    try:
        body[4:].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _filter_undecodable(conn: asyncpg.Connection, stats: ListenStatistics) -> None:
    """Put an :class:`_UndecodableFilter` in front of ``conn``'s protocol (a private attribute: skipped, with a warning, where absent)."""

    def on_undecodable(body: bytes) -> None:
        try:  # called from the event loop's read path: must never raise
            stats.undecodable += 1
            channel, _, rest = body[4:].partition(b"\0")
            payload = rest.rstrip(b"\0")
            _warn.warning(
                "undecodable",
                "dropped a notification that is not valid UTF-8 (the database's encoding is SQL_ASCII?)",
                channel=channel.decode("utf-8", "backslashreplace"),
                payload=quote_payload(payload),
            )
        except Exception:  # noqa: BLE001 - a log failure must not kill the connection
            pass

    transport = getattr(conn, "_transport", None)  # private: absent from some asyncpg release?
    if transport is None:
        log.warning(
            "this asyncpg release hides the connection's transport: a notification that is not "
            "UTF-8 in this SQL_ASCII database will break the LISTEN connection (it reconnects)"
        )
        return
    transport.set_protocol(_UndecodableFilter(transport.get_protocol(), on_undecodable))


def _pace_reads(conn: asyncpg.Connection, linger: float) -> ReadPacer | None:
    """Put a :class:`~hydra_otel.adapters.read_pacer.ReadPacer` in front of ``conn``'s protocol
    (None where the private transport attribute is absent: notifications are then read as they come)."""
    transport = getattr(conn, "_transport", None)
    return None if transport is None else pace_reads(transport, linger)


def _ignore(*_args: object) -> None:
    """Placeholder listener of the direct path: add_listener issues LISTEN; the hook delivers."""


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
        """Run one read-only query and return its rows.

        Raises:
            DbUnavailable: the server is down, restarting or unreachable (retry later).
            PermissionDenied: hydra-otel's role may not read a table (hold what needs it).
            ConfigError: the connection settings are invalid.
            asyncpg.PostgresError: the query itself is wrong (a bug).
        """
        return (await self.fetch_each([(sql, args)]))[0]

    async def fetch_each(
        self, statements: Sequence[tuple[str, Sequence[object]]]
    ) -> list[list[asyncpg.Record]]:
        """Run read-only queries one after the other on one connection; the rows of each, in order.

        Each crossing into asyncio and each pool checkout costs more CPU than a small query's
        own work (docs/performance.md), so queries that are always asked together share
        them. Raises as :meth:`fetch` does, for the first statement that fails.
        """
        self._stats.queries += len(statements)
        try:
            results: list[list[asyncpg.Record]] = await aio_as_trio(_fetch_on_pool)(self._pool, statements)
        except Exception as exc:
            kind = classify(exc)
            if kind is DbErrorKind.UNAVAILABLE:
                raise DbUnavailable(f"database query failed: {type(exc).__name__}: {exc}") from exc
            if kind is DbErrorKind.CONFIG:
                raise config_error(exc) from exc
            if kind is DbErrorKind.PERMISSION and isinstance(exc, asyncpg.PostgresError):
                raise self._permission_denied(exc) from exc
            raise  # a bug in a query (syntax, types): let it surface
        if self._stats.denied_tables:
            for sql, _ in statements:
                self._granted(sql)
        return results

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run one query and return the first column of its first row."""
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    def _permission_denied(self, exc: asyncpg.PostgresError) -> PermissionDenied:
        denied = permission_error(exc, getattr(exc, "hydra_otel_role", None) or "<hydra-otel's role>")
        self._stats.permission_denied[denied.table] += 1
        if denied.table not in self._stats.denied_tables:
            log.error(str(denied), extra={"table": denied.table, "grant": denied.grant})
        self._stats.denied_tables[denied.table] = denied.grant
        return denied

    def _granted(self, sql: str) -> None:
        """A query succeeded: every denied table it reads (FROM or JOIN, not a mere mention) is readable again."""
        for table in list(self._stats.denied_tables):
            name = table.removeprefix("schema ")  # any success shows the schema is usable
            if name != table or re.search(rf"(?i)\b(?:FROM|JOIN)\s+{re.escape(name)}\b", sql):
                del self._stats.denied_tables[table]
                log.info("permission granted: reading the table again", extra={"table": table})


async def _fetch_on_pool(
    pool: asyncpg.Pool, statements: Sequence[tuple[str, Sequence[object]]]
) -> list[list[asyncpg.Record]]:
    """Pool.fetch of each statement in turn on one connection, except that a connection that
    failed mid-operation never goes back to the pool.

    A FATAL from a shutting-down server can leave asyncpg's protocol waiting for a
    ReadyForQuery that never comes while the socket is not closed yet; such a
    connection, handed back, fails the next query with InternalClientError ("cannot
    switch to state 12; another operation (2) is in progress"). Only an ordinary query
    error (the server answered and is ready again) leaves the connection usable.
    """
    con = await pool.acquire()
    try:
        return [await con.fetch(sql, *args) for sql, args in statements]
    except BaseException as exc:
        kind = classify(exc) if isinstance(exc, Exception) else DbErrorKind.OTHER
        if kind is DbErrorKind.PERMISSION:
            exc.hydra_otel_role = _role_of(con)  # type: ignore[attr-defined]  # read by Database
        elif kind is not DbErrorKind.QUERY:
            con.terminate()  # a cancelled or broken operation: replace the connection
        raise
    finally:
        await pool.release(con)


def _role_of(con: Any) -> str | None:
    """The session's role (quoted if need be), as the server reported it at connect (no query needed)."""
    try:
        role = str(con.get_settings().session_authorization)
    except AttributeError:
        return None
    return role if re.fullmatch(r"[a-z_][a-z0-9_$]*", role) else '"' + role.replace('"', '""') + '"'


async def _connect(dsn: str, **kwargs: Any) -> Any:
    """asyncpg.connect, with its errors classified: ConfigError, DbUnavailable, or a bug.

    At connect time every refusal by the server (authentication, no such database, no
    CONNECT privilege, too many connections) is something an operator fixes while
    hydra-otel waits, so it is "unavailable"; invalid settings are not.
    """
    try:
        return await aio_as_trio(asyncpg.connect)(dsn, timeout=10, **kwargs)
    except Exception as exc:
        kind = classify(exc)
        if kind is DbErrorKind.CONFIG:
            raise config_error(exc) from exc
        if kind is DbErrorKind.OTHER:
            raise
        raise DbUnavailable(f"cannot connect to the database: {type(exc).__name__}: {exc}") from exc


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
    conn = await _connect(dsn)
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


T = TypeVar("T")


async def while_unavailable(
    step: Callable[[], Awaitable[T]], backoff: Backoff, waiting: Callable[[DbUnavailable, float], None]
) -> T:
    """Run ``step`` until it raises no :class:`DbUnavailable` (Trio-flavoured): the one retry loop.

    Work that only reads the database can always be done later, so it waits instead of failing.
    Before each wait ``waiting(error, delay)`` is called (to log it); a success resets ``backoff``.
    Any other error propagates.
    """
    while True:
        try:
            result = await step()
        except DbUnavailable as exc:
            delay = backoff.next_delay()
            waiting(exc, delay)
            await trio.sleep(delay)
            continue
        backoff.reset()
        return result


async def _connect_retrying(dsn: str) -> asyncpg.Connection:
    def waiting(exc: DbUnavailable, delay: float) -> None:
        log.warning(
            "cannot connect to the database; retrying",
            extra={"error": str(exc), "retry_in_s": round(delay, 2)},
        )

    conn: asyncpg.Connection = await while_unavailable(
        functools.partial(_connect, dsn), Backoff.transient(10.0), waiting
    )
    return conn


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
    path: DeliveryPath | None = None,
    read_linger: float = 0.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """LISTEN on ``channels`` forever, reconnecting with ``backoff``.

    After a small read the connection reads again only ``read_linger`` seconds later, or as
    soon as a burst waits in the socket (:class:`~hydra_otel.adapters.read_pacer.ReadPacer`),
    so a steady trickle of notifications is handed on in batches; 0 (the default) hands on each
    read at once. The daemon passes its export delay: one latency budget (docs/performance.md).

    ``path`` picks the delivery path (tests force :attr:`DeliveryPath.PUBLIC`); by default the
    fastest one the installed asyncpg supports, logged once.

    ``consume(channel, payload)``, if given, is offered each notification first, in the
    callback: it returns True for what it handled itself (it must be cheap and never
    raise), so such notifications never take a place in the bounded channel.

    Reports ``started()`` once LISTEN is first active. After every (re)connect it
    sends a :class:`Resync` so the consumer can catch up from Hydra's tables.
    """
    started = False
    if path is None:
        path = delivery_path()
        log.info(
            "notification delivery path chosen",
            extra={"path": path.value, "asyncpg": getattr(asyncpg, "__version__", "?")},
        )

    def on_ready() -> None:
        nonlocal started
        backoff.reset()
        if not started:
            started = True
            task_status.started()

    while True:
        try:
            await _session(
                dsn,
                channels,
                send,
                stats,
                on_ready,
                health_interval,
                health_timeout,
                consume,
                path,
                read_linger,
            )
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
    path: DeliveryPath = DeliveryPath.DIRECT,
    read_linger: float = 0.0,
) -> None:
    """One connection's life: returns never, raises DbUnavailable (or a driver error) when lost."""
    direct = path is DeliveryPath.DIRECT
    conn = await _connect(dsn, **({"connection_class": _DirectNotifyConnection} if direct else {}))
    flags = _Flags()
    listening = False
    pacer: ReadPacer | None = None
    try:
        if getattr(conn.get_settings(), "server_encoding", "") == "SQL_ASCII":
            # Any role can NOTIFY bytes that are not UTF-8 into a SQL_ASCII database. With a UTF8
            # client encoding the server checks what it sends and ends this session with a FATAL
            # at the first such notification, losing the rest of the delivery; with SQL_ASCII on
            # both sides it passes bytes through, and the filter drops the undecodable ones.
            # (Any other server encoding validates payloads on NOTIFY or converts them to UTF-8,
            # so the filter's ~1 µs per notification is spent only here.)
            _filter_undecodable(conn, stats)
            await aio_as_trio(conn.execute)("SET client_encoding TO 'SQL_ASCII'")

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

        def public(_conn: object, _pid: int, channel: str, payload: str) -> None:
            sink(channel, payload)

        if direct:
            conn._notify_sink = sink
        conn.add_termination_listener(lambda _c: flags.lost.set())
        for channel in channels:
            await aio_as_trio(conn.add_listener)(channel, _ignore if direct else public)
        pacer = _pace_reads(conn, read_linger)  # after LISTEN: set-up round trips are not held back
        listening = True  # from here on, notifications may wait in the socket
        stats.connects += 1
        log.info("LISTEN active", extra={"channels": len(channels), "backend_pid": conn.get_server_pid()})
        await send.send(Resync("connected"))
        on_ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_health, conn, flags, health_interval, health_timeout, pacer)
            nursery.start_soon(_overflow_watch, send, flags)
            await flags.lost.wait()
            nursery.cancel_scope.cancel()
        raise DbUnavailable("LISTEN connection terminated")
    finally:
        if listening and not flags.lost.is_set():
            await _drain(conn, pacer, health_timeout)
        if direct:
            conn._notify_sink = None
        conn.terminate()  # sync abort: never await close() on a dead or hung connection


async def _drain(conn: asyncpg.Connection, pacer: ReadPacer | None, within: float) -> None:
    """Read what waits for this connection before it closes: the listener is being stopped.

    A paused connection leaves notifications in the socket (up to the export delay's worth) and
    the server may hold more; dropped at a graceful stop, the live-only ones (evaluator runs,
    cached evaluations) would be lost for good. One round trip with reading open hands on every
    notification the server sent before its answer. Shielded from the stop that got us here,
    bounded by ``within`` seconds.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + within) as scope:
        try:
            with pacer.hold_open() if pacer else contextlib.nullcontext():
                await aio_as_trio(conn.fetchval)("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - best effort: must not hide why the listener stops
            log.warning(
                "LISTEN connection failed while reading its last notifications before stopping; "
                "the catch-up finds the builds and steps among them at the next start",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
    if scope.cancelled_caught:
        log.warning(
            "LISTEN connection did not answer in time while reading its last notifications before "
            "stopping; the catch-up finds the builds and steps among them at the next start",
            extra={"timeout_s": within},
        )


async def _health(
    conn: asyncpg.Connection,
    flags: _Flags,
    interval: float,
    probe_timeout: float,
    pacer: ReadPacer | None = None,
) -> None:
    while True:
        await trio.sleep(interval)
        try:
            # A paused connection would read the answer only after its pause (up to the export
            # delay, which may exceed the timeout): read without pauses while it is awaited.
            with trio.fail_after(probe_timeout), pacer.hold_open() if pacer else contextlib.nullcontext():
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
