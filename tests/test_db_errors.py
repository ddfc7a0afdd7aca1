"""classify(): what each error seen while talking to PostgreSQL means (docs/operations.md, PostgreSQL failures)."""

from __future__ import annotations

import socket
import ssl

import asyncpg
import pytest
import trio

from hydra_otel.adapters.db import DbErrorKind, _UndecodableFilter, classify, permission_error
from hydra_otel.errors import PermissionDenied


def pg(cls: type[asyncpg.PostgresError], message: str = "boom") -> asyncpg.PostgresError:
    return cls(message)


UNAVAILABLE = [
    # A server shutting down or restarting (pg_ctl restart -m fast), seen mid-query or at connect.
    asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncpg.exceptions.ProtocolError("unexpected message"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    pg(asyncpg.ConnectionDoesNotExistError, "connection was closed in the middle of operation"),
    pg(asyncpg.ConnectionFailureError),
    pg(asyncpg.AdminShutdownError, "terminating connection due to administrator command"),
    pg(asyncpg.CrashShutdownError),
    pg(asyncpg.CannotConnectNowError, "the database system is shutting down"),
    pg(asyncpg.QueryCanceledError, "canceling statement due to statement timeout"),
    pg(asyncpg.TooManyConnectionsError),
    pg(asyncpg.InvalidPasswordError),
    pg(asyncpg.InvalidCatalogNameError, 'database "hydra" does not exist'),
    pg(asyncpg.DeadlockDetectedError),
    pg(asyncpg.SerializationError),
    pg(asyncpg.DiskFullError),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    FileNotFoundError(2, "No such file or directory"),  # the unix socket, while the server is down
    socket.gaierror(-2, "Name or service not known"),
    ssl.SSLError("certificate verify failed"),
    TimeoutError(),
    trio.TooSlowError(),
]


@pytest.mark.parametrize("exc", UNAVAILABLE, ids=lambda e: type(e).__name__)
def test_connection_and_shutdown_errors_are_unavailable(exc: BaseException) -> None:
    assert classify(exc) is DbErrorKind.UNAVAILABLE


def test_insufficient_privilege_is_a_permission_error_not_unavailable() -> None:
    assert classify(pg(asyncpg.InsufficientPrivilegeError)) is DbErrorKind.PERMISSION


def test_invalid_connection_settings_are_config_errors() -> None:
    exc = asyncpg.ClientConfigurationError("`sslmode` parameter must be one of: disable, allow")
    assert classify(exc) is DbErrorKind.CONFIG


@pytest.mark.parametrize(
    "exc",
    [
        pg(asyncpg.PostgresSyntaxError),
        pg(asyncpg.UndefinedColumnError),
        pg(asyncpg.UndefinedTableError),
        pg(asyncpg.DataError),
    ],
    ids=lambda e: type(e).__name__,
)
def test_wrong_queries_are_query_errors(exc: BaseException) -> None:
    assert classify(exc) is DbErrorKind.QUERY


@pytest.mark.parametrize("exc", [ValueError("x"), KeyError(1), RuntimeError()], ids=repr)
def test_other_errors_are_not_database_errors(exc: BaseException) -> None:
    assert classify(exc) is DbErrorKind.OTHER


@pytest.mark.parametrize(
    ("message", "table", "grant"),
    [
        ("permission denied for table buildsteps", "buildsteps", "GRANT SELECT ON buildsteps TO hydra_otel;"),
        ("permission denied for relation builds", "builds", "GRANT SELECT ON builds TO hydra_otel;"),
        (
            "permission denied for schema public",
            "schema public",
            "GRANT USAGE ON SCHEMA public TO hydra_otel;",
        ),
    ],
)
def test_permission_error_names_the_table_and_the_grant(message: str, table: str, grant: str) -> None:
    denied = permission_error(pg(asyncpg.InsufficientPrivilegeError, message), "hydra_otel")
    assert isinstance(denied, PermissionDenied)
    assert (denied.table, denied.grant) == (table, grant)
    assert grant in str(denied)


# --- the LISTEN connection's filter of undecodable notifications -------------------------------------


class _Inner:
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


def _notification(channel: bytes, payload: bytes) -> bytes:
    return _msg(b"A", (1234).to_bytes(4, "big") + channel + b"\0" + payload + b"\0")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 10_000])
def test_filter_drops_only_undecodable_notifications_whatever_the_chunking(chunk: int) -> None:
    good = _notification(b"build_queued", b"42") + _msg(b"Z", b"I") + _notification(b"ch", "é".encode())
    bad = _notification(b"step_finished", b"1\t2\t/tmp/\xff\xfe")
    stream = good + bad + _msg(b"D", b"\x00\x01" + b"\x80" * 300) + bad + good
    inner, dropped = _Inner(), list[bytes]()
    f = _UndecodableFilter(inner, dropped.append)  # type: ignore[arg-type]
    for i in range(0, len(stream), chunk):
        f.data_received(stream[i : i + chunk])
    assert inner.data == good + _msg(b"D", b"\x00\x01" + b"\x80" * 300) + good
    assert len(dropped) == 2
    assert dropped[0].endswith(b"/tmp/\xff\xfe\0")
