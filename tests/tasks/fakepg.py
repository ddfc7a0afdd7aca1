"""A fake PostgreSQL server for the LISTEN and leadership connections of adapters/db.py.

run_listener and hold_leadership open their connections through ``db._connect`` and then
call a handful of asyncpg ``Connection`` methods. :class:`FakeServer` hands out
:class:`FakeConnection` objects that implement exactly those methods in memory: LISTEN
callbacks, termination listeners, ``SELECT 1`` probes (which can be made to hang), and
session advisory locks released when their connection ends. With ``paced=True`` each
connection also has a transport (:class:`FakeTransport`, over a real socket pair so that
``FIONREAD`` works) through which notifications and the probe's answer are read, so the
listener's read pacing runs as on a real connection. Tests install it with
``monkeypatch.setattr(db, "_connect", server.connect)``; the asyncpg methods stay
asyncio coroutines, run through the trio-asyncio loop as with the real driver.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from hydra_otel.errors import DbUnavailable

Listener = Callable[[object, int, str, str], None]


@dataclass
class FakeConnection:
    server: FakeServer
    pid: int
    listeners: dict[str, Listener] = field(default_factory=dict)
    on_terminate: list[Callable[[object], None]] = field(default_factory=list)
    closed: bool = False
    _transport: FakeTransport | None = None

    def get_settings(self) -> Any:
        return SimpleNamespace(server_encoding="UTF8", session_authorization="hydra_otel")

    def get_server_pid(self) -> int:
        return self.pid

    def add_termination_listener(self, callback: Callable[[object], None]) -> None:
        self.on_terminate.append(callback)

    async def add_listener(self, channel: str, callback: Listener) -> None:
        self.listeners[channel] = callback

    async def fetchval(self, sql: str, *args: object) -> Any:
        if self.closed:
            raise OSError("connection is closed")
        if self.server.hang:
            await asyncio.get_running_loop().create_future()  # a half-open link: no answer, ever
        if sql == "SELECT 1":
            if self._transport is not None:  # the answer is read like everything else
                await self._transport.answer()
            return 1
        assert sql == "SELECT pg_try_advisory_lock($1)", sql
        holder = self.server.locks.setdefault(args[0], self)
        return holder is self

    def terminate(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.released(self)
            if self._transport is not None:
                self._transport.close()


class _Protocol(asyncio.Protocol):
    """asyncpg's protocol, reduced to notifications: ``channel NUL payload NUL`` records."""

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.answers: list[asyncio.Future[None]] = []

    def data_received(self, data: bytes) -> None:
        *records, _ = data.split(b"\0\0")
        for record in records:
            if record == b"ANSWER":
                while self.answers:
                    self.answers.pop(0).set_result(None)
                continue
            channel, payload = record.decode().split("\0")
            callback = self.conn.listeners.get(channel)
            if callback is not None:
                callback(self.conn, 1, channel, payload)


class FakeTransport:
    """The connection's transport: what the server sends waits in a real socket while reading is paused."""

    def __init__(self, conn: FakeConnection) -> None:
        self._server_end, self._client_end = socket.socketpair()
        self._fake = _Protocol(conn)  # what answers queries, whatever is put in front of it
        self._protocol: asyncio.Protocol = self._fake
        self.paused = False
        self.reads = 0

    def get_protocol(self) -> asyncio.Protocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol

    def get_extra_info(self, name: str) -> object:
        return self._client_end if name == "socket" else None

    def is_closing(self) -> bool:
        return self._client_end.fileno() < 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused and not self.is_closing():
            self.paused = False
            asyncio.get_running_loop().call_soon(self._read)  # as the selector would, once readable

    def send(self, data: bytes) -> None:
        """The server sends ``data``; it is read at once unless reading is paused."""
        self._server_end.sendall(data)
        if not self.paused:
            self._read()

    async def answer(self) -> None:
        """Send a query's answer and wait until it was read."""
        done = asyncio.get_running_loop().create_future()
        self._fake.answers.append(done)
        self.send(b"ANSWER\0\0")
        await done

    def _read(self) -> None:
        if self.paused or self.is_closing():
            return
        self._client_end.setblocking(False)
        try:
            data = self._client_end.recv(1 << 20)
        except BlockingIOError:
            return
        self.reads += 1
        self._protocol.data_received(data)

    def close(self) -> None:
        self._server_end.close()
        self._client_end.close()


@dataclass
class FakeServer:
    """Connections, LISTEN registrations and advisory locks of one fake server."""

    #: While True, connecting fails with DbUnavailable (the server is down).
    down: bool = False
    #: While True, every query hangs (a half-open link).
    hang: bool = False
    #: Connections get a :class:`FakeTransport` (notifications then go through the read pacing).
    paced: bool = False
    connections: list[FakeConnection] = field(default_factory=list)
    locks: dict[object, FakeConnection | None] = field(default_factory=dict)
    connects: int = 0
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(100))

    async def connect(self, dsn: str, **kwargs: Any) -> FakeConnection:
        """Stands in for ``db._connect`` (Trio-flavoured)."""
        self.connects += 1
        if self.down:
            raise DbUnavailable("cannot connect to the database: ConnectionRefusedError")
        conn = FakeConnection(self, next(self._pids))
        if self.paced:
            conn._transport = FakeTransport(conn)
        self.connections.append(conn)
        return conn

    @property
    def live(self) -> list[FakeConnection]:
        return [c for c in self.connections if not c.closed]

    def notify(self, channel: str, payload: str) -> None:
        """Deliver a NOTIFY to every live connection listening on ``channel``."""
        for conn in self.live:
            if conn._transport is not None:
                conn._transport.send(f"{channel}\0{payload}\0\0".encode())
                continue
            callback = conn.listeners.get(channel)
            if callback is not None:
                callback(conn, 1, channel, payload)

    def kill(self, conn: FakeConnection) -> None:
        """``pg_terminate_backend``: the connection ends and its termination listeners run."""
        conn.closed = True
        self.released(conn)
        if conn._transport is not None:
            conn._transport.close()
        for callback in conn.on_terminate:
            callback(conn)

    def released(self, conn: FakeConnection) -> None:
        for key, holder in list(self.locks.items()):
            if holder is conn:
                del self.locks[key]

    def hold_lock(self, key: object) -> None:
        """Another instance (not a connection of ours) takes the lock ``key``."""
        self.locks[key] = None
