"""``hydra-otel check``: will the daemon work here? One line per check."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from hydra_otel.adapters import command_queries, db, progress_store
from hydra_otel.adapters.otlp import Delivery
from hydra_otel.config import Config, ExportWorker
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.spans import Kind, SpanRecord
from hydra_otel.errors import StateDirError
from hydra_otel.pipeline.factories import make_sink
from hydra_otel.selfmon.stats import ListenStatistics
from hydra_otel.tools.common import (
    ADDED_IN,
    CHECK_SPAN_NAME,
    DB_TIMEOUT,
    HYDRA_COLUMNS,
    LISTEN_TIMEOUT,
    NEWEST_SCHEMA,
    OLDEST_SCHEMA,
    OPTIONAL_COLUMNS,
    describe,
)

# --- check --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """The outcome of one check, printed as one line."""

    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        """``ok   <name>[: detail]`` or ``FAIL <name>[: detail]``."""
        text = f"{'ok  ' if self.ok else 'FAIL'} {self.name}"
        return f"{text}: {self.detail}" if self.detail else text


def schema_results(present: Mapping[str, set[str]]) -> list[CheckResult]:
    """One result per table of :data:`HYDRA_COLUMNS`, naming what is missing with a Hydra version hint.

    Args:
        present: columns found, by table name; a table that is absent has no key.

    Returns:
        The results, in :data:`HYDRA_COLUMNS` order.
    """
    results = []
    for table, columns in HYDRA_COLUMNS.items():
        if table not in present:
            results.append(CheckResult(name=f"table {table}", ok=False, detail=_missing_hint(table)))
            continue
        missing = [f"{table}.{c}" for c in columns if c not in present[table]]
        required = [m for m in missing if m not in OPTIONAL_COLUMNS]
        detail = "; ".join(_missing_hint(m) for m in required or missing)
        results.append(CheckResult(name=f"table {table}", ok=not required, detail=detail))
    return results


def _missing_hint(name: str) -> str:
    since = ADDED_IN.get(name)
    if name in OPTIONAL_COLUMNS:
        return f"{name} missing: fine on Hydra schema < {since}"
    if since is not None:
        added = "" if since == OLDEST_SCHEMA else f"added in Hydra schema {since}; "
        return f"{name} missing: {added}Hydra older than schema {OLDEST_SCHEMA} is not supported"
    return (
        f"{name} missing: every Hydra schema hydra-otel supports has it; is this Hydra's database, "
        "and its schema on the search_path?"
    )


def schema_version_result(version: int | None) -> CheckResult:
    """The result for the version in ``schemaversion`` (None: the table is empty)."""
    name = "hydra schema version"
    if version is None:
        return CheckResult(name=name, ok=False, detail="schemaversion is empty")
    if version < OLDEST_SCHEMA:
        return CheckResult(
            name=name, ok=False, detail=f"{version}, older than {OLDEST_SCHEMA} (not supported)"
        )
    if version > NEWEST_SCHEMA:
        return CheckResult(
            name=name, ok=True, detail=f"{version} (newer than {NEWEST_SCHEMA}, the newest known)"
        )
    return CheckResult(name=name, ok=True, detail=str(version))


Emit = Callable[[CheckResult], None]


async def run_checks(cfg: Config, emit: Emit | None = None) -> list[CheckResult]:
    """Run every check, in order (Trio-flavoured: needs ``open_loop()``).

    Database, schema version, tables and columns, SELECT privileges, LISTEN/NOTIFY,
    OTLP export, state directory. Checks that need the database are skipped (not
    reported) when it cannot be reached; the others always run.

    Args:
        cfg: the configuration to check.
        emit: called with each result as soon as it is known (for streaming output).

    Returns:
        Every result.
    """
    results: list[CheckResult] = []

    def add(result: CheckResult) -> None:
        results.append(result)
        if emit is not None:
            emit(result)

    await _check_database(cfg, add)
    add(await _check_otlp(cfg))
    add(await _check_state_dir(cfg.state_dir))
    add(await _check_progress(cfg))
    return results


async def _step(name: str, cfg: Config, fn: Callable[[], Awaitable[str | CheckResult]]) -> CheckResult:
    """Run one check: a text is its ok detail; a database error (or its deadline passing) its FAIL."""
    failure: BaseException | None = None
    outcome: str | CheckResult = ""
    try:
        outcome = await fn()
    except* db.QUERY_ERRORS as group:
        failure = group
    if failure is not None:
        return CheckResult(name=name, ok=False, detail=describe(failure, cfg))
    return outcome if isinstance(outcome, CheckResult) else CheckResult(name=name, ok=True, detail=outcome)


async def _check_database(cfg: Config, add: Emit) -> None:
    try:
        async with db.open_database(cfg.db.url, size=2) as database:
            await _database_checks(cfg, database, add)
    except db.QUERY_ERRORS as exc:  # the pool itself (a malformed URL); queries fail inside each step
        detail = f"{cfg.db.redacted_url}: {describe(exc, cfg)}"
        add(CheckResult(name="database connection", ok=False, detail=detail))


async def _database_checks(cfg: Config, database: db.Database, add: Emit) -> None:
    present: dict[str, set[str]] = {}

    async def connect() -> str:
        with trio.fail_after(DB_TIMEOUT):
            await command_queries.ping(database)
        return cfg.db.redacted_url

    async def columns() -> str:
        with trio.fail_after(DB_TIMEOUT):
            rows = await command_queries.table_columns(database, list(HYDRA_COLUMNS))
        for table, column in rows:
            present.setdefault(table, set()).add(column)
        return ""

    async def version() -> CheckResult:
        with trio.fail_after(DB_TIMEOUT):
            found = await command_queries.schema_version(database)
        return schema_version_result(found)

    async def privileges() -> CheckResult:
        with trio.fail_after(DB_TIMEOUT):
            return await _privileges(database, present)

    async def listen() -> str:
        with trio.fail_after(LISTEN_TIMEOUT):
            return await _listen_round_trip(cfg.db.url)

    for name, step in (("database connection", connect), ("hydra tables", columns)):
        result = await _step(name, cfg, step)
        if name == "database connection" and not result.ok:
            result = CheckResult(name=name, ok=False, detail=f"{cfg.db.redacted_url}: {result.detail}")
        if result.detail or not result.ok:
            add(result)
        if not result.ok:
            return
    if "version" in present.get("schemaversion", set()):
        add(await _step("hydra schema version", cfg, version))
    for result in schema_results(present):
        add(result)
    add(await _step("SELECT privilege", cfg, privileges))
    add(await _step("LISTEN/NOTIFY", cfg, listen))


async def _privileges(database: db.Database, present: Mapping[str, set[str]]) -> CheckResult:
    pairs = [(t, c) for t, cols in HYDRA_COLUMNS.items() for c in cols if c in present.get(t, set())]
    rows = await command_queries.readable_tables(database, pairs)
    denied = sorted(table for table, readable in rows if not readable)
    if denied:
        detail = f"not readable: {', '.join(denied)} (GRANT SELECT ON them TO the daemon's role)"
        return CheckResult(name="SELECT privilege", ok=False, detail=detail)
    return CheckResult(name="SELECT privilege", ok=True, detail=f"{len(rows)} tables readable")


async def _listen_round_trip(dsn: str) -> str:
    """LISTEN on a private channel with the daemon's listener, NOTIFY it from a second connection."""
    channel = f"hydra_otel_check_{secrets.token_hex(6)}"
    token = secrets.token_hex(8)
    send, receive = trio.open_memory_channel[db.ListenItem](16)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        backoff = Backoff.interactive()
        await nursery.start(
            lambda task_status: db.run_listener(
                dsn, [channel], send, stats=ListenStatistics(), backoff=backoff, task_status=task_status
            )
        )
        async with db.open_connection(dsn) as conn:
            await command_queries.notify(conn, channel, token)
        async for item in receive:
            if isinstance(item, db.RawNotification) and (item.channel, item.payload) == (channel, token):
                break
        nursery.cancel_scope.cancel()
    return f"round trip in {(trio.current_time() - started) * 1000:.0f} ms"


async def _check_otlp(cfg: Config) -> CheckResult:
    e = cfg.export.traces
    name = "otlp export"
    where = f"{e.endpoint} ({e.protocol.value})"
    record = _check_span()
    try:
        sink = make_sink(cfg, ExportWorker.THREAD)  # one span: not worth a process
    except (OSError, ValueError) as exc:  # e.g. an unreadable certificate
        return CheckResult(name=name, ok=False, detail=f"{where}: {type(exc).__name__}: {exc}")
    delivery = Delivery(done=False, reason=f"not acknowledged within {e.timeout:g} s")
    try:
        with trio.move_on_after(e.timeout + 2):  # the exporter's own timeout bounds its retries
            delivery = await sink.export([record])
    finally:
        sink.shutdown()
    if delivery.done and not delivery.refused:
        return CheckResult(name=name, ok=True, detail=f"{where} accepted a span named {CHECK_SPAN_NAME!r}")
    refusal = f"refused the span for good: {delivery.refused[0][1]}" if delivery.refused else delivery.reason
    reason = await _unreachable(e.endpoint) or refusal or f"not acknowledged within {e.timeout:g} s"
    return CheckResult(name=name, ok=False, detail=f"{where}: {reason}")


async def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` fails, or None if it succeeds."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")  # gRPC's host:port form too
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        return f"cannot connect to {host}:{port}: timed out"
    except OSError as exc:
        cause = exc.__cause__  # trio wraps one error per address tried
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        errno = cause.errno if isinstance(cause, OSError) else exc.errno
        why = os.strerror(errno) if errno else str(exc)
        return f"cannot connect to {host}:{port}: {why}"
    await stream.aclose()
    return None


def _check_span() -> SpanRecord:
    now = time.time_ns()
    return SpanRecord(
        trace_id=int.from_bytes(secrets.token_bytes(16), "big") or 1,
        span_id=int.from_bytes(secrets.token_bytes(8), "big") or 1,
        parent_span_id=None,
        name=CHECK_SPAN_NAME,
        kind=Kind.INTERNAL,
        start_ns=now,
        end_ns=now,
        attributes=(("hydra.check", True),),
    )


async def _check_state_dir(path: Path) -> CheckResult:
    name = f"state directory {path}"
    try:
        detail = await trio.to_thread.run_sync(state_dir_writable, path)
    except OSError as exc:
        return CheckResult(name=name, ok=False, detail=f"{exc.strerror or exc}: {exc.filename or path}")
    return CheckResult(name=name, ok=True, detail=detail)


async def _check_progress(cfg: Config) -> CheckResult:
    """Would the daemon accept the progress store (format, instance, marks)? Read-only, without the lock."""
    name = "progress store"
    try:
        detail = await trio.to_thread.run_sync(progress_store.inspect, cfg.state_dir, cfg.stitch.instance)
    except StateDirError as exc:
        return CheckResult(name=name, ok=False, detail=str(exc))
    except OSError as exc:
        return CheckResult(
            name=name, ok=False, detail=f"{exc.strerror or exc}: {exc.filename or cfg.state_dir}"
        )
    return CheckResult(name=name, ok=True, detail=detail)


def state_dir_writable(path: Path) -> str:
    """Create and delete a file in ``path`` (blocking).

    A directory that does not exist yet is created for the test and removed again, so
    that running ``check`` as another user (root) leaves nothing behind owned by it.

    Returns:
        What was found, for the check's line.

    Raises:
        OSError: the directory cannot be created, or a file in it cannot be written.
    """
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".hydra-otel-check-", dir=path)
        try:
            os.write(fd, b"hydra-otel check\n")
        finally:
            os.close(fd)
            os.unlink(temp)
        progress = path / progress_store.FILENAME
        if progress.exists() and not os.access(progress, os.R_OK | os.W_OK):
            raise PermissionError(13, "progress file not readable and writable", str(progress))
    finally:
        for p in created:  # deepest first; a failed mkdir left the deeper ones absent
            with contextlib.suppress(OSError):  # best effort: never mask the error that matters
                p.rmdir()
    return "can be created and written (removed again)" if created else "writable"
