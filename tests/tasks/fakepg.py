"""A fake PostgreSQL server for the LISTEN and leadership connections of adapters/db.py.

run_listener and hold_leadership open their connections through ``db._connect`` and then
call a handful of asyncpg ``Connection`` methods. :class:`FakeServer` hands out
:class:`FakeConnection` objects that implement exactly those methods in memory: LISTEN
callbacks, termination listeners, ``SELECT 1`` probes (which can be made to hang), and
session advisory locks released when their connection ends. Tests install it with
``monkeypatch.setattr(db, "_connect", server.connect)``; the asyncpg methods stay
asyncio coroutines, run through the trio-asyncio loop as with the real driver.
"""

from __future__ import annotations

import asyncio
import itertools
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
            return 1
        assert sql == "SELECT pg_try_advisory_lock($1)", sql
        holder = self.server.locks.setdefault(args[0], self)
        return holder is self

    def terminate(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.released(self)


@dataclass
class FakeServer:
    """Connections, LISTEN registrations and advisory locks of one fake server."""

    #: While True, connecting fails with DbUnavailable (the server is down).
    down: bool = False
    #: While True, every query hangs (a half-open link).
    hang: bool = False
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
        self.connections.append(conn)
        return conn

    @property
    def live(self) -> list[FakeConnection]:
        return [c for c in self.connections if not c.closed]

    def notify(self, channel: str, payload: str) -> None:
        """Deliver a NOTIFY to every live connection listening on ``channel``."""
        for conn in self.live:
            callback = conn.listeners.get(channel)
            if callback is not None:
                callback(conn, 1, channel, payload)

    def kill(self, conn: FakeConnection) -> None:
        """``pg_terminate_backend``: the connection ends and its termination listeners run."""
        conn.closed = True
        self.released(conn)
        for callback in conn.on_terminate:
            callback(conn)

    def released(self, conn: FakeConnection) -> None:
        for key, holder in list(self.locks.items()):
            if holder is conn:
                del self.locks[key]

    def hold_lock(self, key: object) -> None:
        """Another instance (not a connection of ours) takes the lock ``key``."""
        self.locks[key] = None
