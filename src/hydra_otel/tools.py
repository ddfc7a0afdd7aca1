"""Operator commands: ``hydra-otel ids`` (where is my trace?) and ``hydra-otel check`` (will the daemon work?).

Theory of operation. Both commands reuse the daemon's own code, so they answer
for the daemon rather than for a re-implementation: ``ids`` derives IDs with
:mod:`hydra_otel.core.ids` and places builds with ``core.builds.placement`` over
the rows :class:`~hydra_otel.adapters.queries.BuildQueries` reads; ``check``
exports through the same sink :func:`hydra_otel.service.make_sink` builds and
LISTENs through :func:`hydra_otel.adapters.db.run_listener`.

The async functions here are **Trio-flavoured** and need
``trio_asyncio.open_loop()`` (``adapters.db.open_loop``) around them, like
everything that reaches the database. :func:`run_tool` is the synchronous entry
point for ``cli.py``: it runs a fresh trio loop with that bridge.

The Hydra tables and columns the daemon reads are declared once, in
:data:`HYDRA_COLUMNS`, from the SQL of ``adapters/queries.py``; a test compares
the two. Missing ones are named with the Hydra schema version that added them
(:data:`ADDED_IN`, from Hydra's ``sql/migrations/upgrade-N.sql``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO
from urllib.parse import quote, unquote, urlsplit

import trio

from hydra_otel import config
from hydra_otel.adapters import db, state
from hydra_otel.adapters.queries import BuildQueries
from hydra_otel.config import Config
from hydra_otel.core import ids
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.builds import build_attempt, build_span_id, placement
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.spans import Kind, SpanRecord
from hydra_otel.errors import DbUnavailable, HydraOtelError
from hydra_otel.service import make_sink

#: Every Hydra table and column the daemon reads (adapters/queries.py), plus what ``check`` reads itself.
HYDRA_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "schemaversion": ("version",),  # read by check only, for the version hint
    "projects": ("name",),  # not queried (jobsets.project names it); its absence means "not Hydra's database"
    "jobsets": (
        "id", "name", "project", "errormsg", "errortime", "fetcherrormsg", "starttime", "lastcheckedtime",
    ),
    "jobsetevals": (
        "id", "jobset_id", "evaluationerror_id", "timestamp", "checkouttime", "evaltime", "hasnewbuilds",
        "nrbuilds", "hash", "flake", "nixexprinput", "nixexprpath",
    ),
    "evaluationerrors": ("id", "errormsg", "errortime"),
    "jobsetevalmembers": ("eval", "build", "isnew"),
    "builds": (
        "id", "finished", "timestamp", "jobset_id", "job", "nixname", "drvpath", "system", "priority",
        "globalpriority", "starttime", "stoptime", "iscachedbuild", "buildstatus", "size", "closuresize",
        "releasename",
    ),
    "buildsteps": (
        "build", "stepnr", "type", "drvpath", "status", "errormsg", "starttime", "stoptime", "machine",
        "system", "propagatedfrom", "overhead", "timesbuilt", "isnondeterministic", "resolveddrvpath",
    ),
}  # fmt: skip

#: Hydra schema version that added a table or column; anything not listed predates them all.
ADDED_IN: Final[Mapping[str, int]] = {
    "builds.globalpriority": 40,
    "buildsteps.overhead": 45,
    "buildsteps.timesbuilt": 52,
    "buildsteps.isnondeterministic": 52,
    "jobsets.starttime": 53,
    "jobsetevals.flake": 58,
    "jobsets.id": 59,
    "builds.jobset_id": 61,
    "jobsetevals.nixexprinput": 71,
    "jobsetevals.nixexprpath": 71,
    "jobsetevals.jobset_id": 72,
    "evaluationerrors": 73,
    "jobsetevals.evaluationerror_id": 73,
    "buildsteps.resolveddrvpath": 87,
}

#: Columns the daemon reads only when present (adapters/queries.py checks for them).
OPTIONAL_COLUMNS: Final = frozenset({"buildsteps.resolveddrvpath"})

#: The oldest Hydra schema with everything required, and the newest one hydra-otel was written against.
OLDEST_SCHEMA: Final = 73
NEWEST_SCHEMA: Final = 87

JAEGER_URL_ENV: Final = "HYDRA_OTEL_JAEGER_URL"
TEMPO_URL_ENV: Final = "HYDRA_OTEL_TEMPO_URL"
TEMPO_DATASOURCE_ENV: Final = "HYDRA_OTEL_TEMPO_DATASOURCE"

#: Seconds allowed for each database step of ``check``, and for ``ids --build``'s queries.
DB_TIMEOUT: Final = 20.0
#: Seconds allowed for the LISTEN/NOTIFY round trip, connection included.
LISTEN_TIMEOUT: Final = 10.0
#: The name of the span ``check`` exports.
CHECK_SPAN_NAME: Final = "hydra-otel check"

_DB_ERRORS: Final[tuple[type[BaseException], ...]] = (DbUnavailable, *db.RETRYABLE)


class UsageError(Exception):
    """A command-line combination argparse cannot reject by itself (exit status 2)."""


class ToolError(Exception):
    """The command cannot answer (unreachable database, unknown build); exit status 1."""


# --- argparse wiring ----------------------------------------------------------------------------------


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def add_tool_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ids`` and ``check`` sub-commands, each with every configuration flag.

    Args:
        sub: the CLI's ``add_subparsers()`` result. :func:`run_tool` finds the chosen
            command in ``args.tool``, whatever ``dest`` the CLI gave ``sub``.
    """
    p = sub.add_parser(
        "ids",
        help="print the trace and span IDs hydra-otel uses for an evaluation or a build",
        description="Print the trace ID and span ID of an evaluation (no database needed) or of a build "
        "(reads its placement and attempts from the database), with links into Jaeger or Grafana/Tempo.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--eval", dest="ids_eval", type=_at_least(1), metavar="N", help="JobsetEval ID")
    which.add_argument("--build", dest="ids_build", type=_at_least(1), metavar="N", help="build ID")
    p.add_argument(
        "--attempt", dest="ids_attempt", type=_at_least(0), metavar="K",
        help="attempt of the build, from 0 (default: the latest, derived from its steps)",
    )  # fmt: skip
    p.add_argument("--json", dest="ids_json", action="store_true", help="print one JSON object")
    p.add_argument("--jaeger-url", dest="jaeger_url", help=f"Jaeger UI base URL. Env: {JAEGER_URL_ENV}.")
    p.add_argument(
        "--tempo-url", dest="tempo_url",
        help=f"Grafana base URL, for an Explore link to the trace in Tempo. Env: {TEMPO_URL_ENV}.",
    )  # fmt: skip
    p.add_argument(
        "--tempo-datasource", dest="tempo_datasource",
        help=f"UID (or name) of Grafana's Tempo data source. Env: {TEMPO_DATASOURCE_ENV}. Default: tempo.",
    )  # fmt: skip
    config.add_arguments(p)
    p.set_defaults(tool="ids")
    c = sub.add_parser(
        "check",
        help="check the database, its schema and privileges, LISTEN, the OTLP endpoint and the state directory",
        description="Check everything the daemon needs; one line per check, exit status 1 if any fails.",
    )
    config.add_arguments(c)
    c.set_defaults(tool="check")


def run_tool(
    args: argparse.Namespace,
    cfg: Config,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the ``ids`` or ``check`` command chosen in ``args`` (synchronous: starts its own trio loop).

    Args:
        args: parsed by a parser that :func:`add_tool_commands` extended.
        cfg: the loaded configuration.
        out: where results go (default: standard output).
        err: where errors go (default: standard error).
        environ: for the ``HYDRA_OTEL_*_URL`` defaults (default: ``os.environ``).

    Returns:
        The exit status: 0 success, 1 failure (unreachable database, unknown build, a failed
        check), 2 invalid usage.
    """

    async def main() -> int:
        async with db.open_loop():
            return await run_tool_async(args, cfg, out=out, err=err, environ=environ)

    try:
        return trio.run(main)
    except KeyboardInterrupt:
        return 130


async def run_tool_async(
    args: argparse.Namespace,
    cfg: Config,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """:func:`run_tool` for callers already in trio (Trio-flavoured: needs ``open_loop()``)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        if args.tool == "ids":
            return await _ids_command(args, cfg, out, err, os.environ if environ is None else environ)
        if args.tool == "check":
            results = await run_checks(cfg, lambda r: print(r.line(), file=out, flush=True))
            return 0 if all(r.ok for r in results) else 1
    except UsageError as exc:
        print(f"hydra-otel {args.tool}: {exc}", file=err)
        return 2
    except ToolError as exc:
        print(f"hydra-otel {args.tool}: {exc}", file=err)
        return 1
    raise ValueError(f"unknown tool {args.tool!r}")


# --- ids ----------------------------------------------------------------------------------------------


def eval_ids(instance: str, eval_id: int) -> dict[str, object]:
    """Trace ID and root span ID of JobsetEval ``eval_id`` (pure; no database needed)."""
    key = ids.eval_trace(instance, eval_id)
    return {
        "instance": instance,
        "eval_id": eval_id,
        "trace_id": ids.format_trace_id(ids.trace_id(key)),
        "span_id": ids.format_span_id(ids.root_span_id(key)),
    }


def jaeger_url(base: str, trace_hex: str) -> str:
    """Jaeger UI's page of a trace: ``<base>/trace/<trace ID>``."""
    return f"{base.rstrip('/')}/trace/{trace_hex}"


def tempo_url(grafana: str, datasource: str, trace_hex: str) -> str:
    """Grafana Explore (URL schema version 1, Grafana 10+) showing a trace from a Tempo data source.

    The pane runs a TraceQL query that is the bare trace ID, over the last 30 days
    (Tempo's trace-by-ID lookup ignores the range unless the data source is told to use it).
    """
    pane = {
        "datasource": datasource,
        "queries": [
            {
                "refId": "A",
                "datasource": {"type": "tempo", "uid": datasource},
                "queryType": "traceql",
                "query": trace_hex,
            }
        ],
        "range": {"from": "now-30d", "to": "now"},
    }
    panes = quote(json.dumps({"hot": pane}, separators=(",", ":")), safe="")
    return f"{grafana.rstrip('/')}/explore?schemaVersion=1&panes={panes}"


@dataclass(frozen=True, slots=True, kw_only=True)
class _LinkBases:
    jaeger: str | None
    tempo: str | None
    datasource: str

    def links(self, trace_hex: str) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.jaeger:
            out["jaeger_url"] = jaeger_url(self.jaeger, trace_hex)
        if self.tempo:
            out["tempo_url"] = tempo_url(self.tempo, self.datasource, trace_hex)
        return out


def _link_bases(args: argparse.Namespace, environ: Mapping[str, str]) -> _LinkBases:
    """The UI base URLs from the flags, else the environment; each must be an http(s) URL."""
    found: dict[str, str | None] = {}
    for key, flag, env in (
        ("jaeger", "--jaeger-url", JAEGER_URL_ENV),
        ("tempo", "--tempo-url", TEMPO_URL_ENV),
    ):
        value = getattr(args, f"{key}_url") or environ.get(env) or None
        parts = urlsplit(value or "")
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise UsageError(f"{flag} (or {env}) must be an http(s) URL")
        found[key] = value
    datasource = args.tempo_datasource or environ.get(TEMPO_DATASOURCE_ENV) or "tempo"
    return _LinkBases(jaeger=found["jaeger"], tempo=found["tempo"], datasource=datasource)


#: Keys printed in text mode, in this order; ``--json`` prints them all.
_TEXT_KEYS = ("trace_id", "span_id", "attempt", "jaeger_url", "tempo_url")


async def _ids_command(
    args: argparse.Namespace, cfg: Config, out: TextIO, err: TextIO, environ: Mapping[str, str]
) -> int:
    if args.ids_attempt is not None and args.ids_build is None:
        raise UsageError("--attempt needs --build")
    bases = _link_bases(args, environ)  # before the database, so a typo fails fast
    if args.ids_eval is not None:
        result = eval_ids(cfg.stitch.instance, args.ids_eval)
    else:
        result = await build_ids(cfg, args.ids_build, args.ids_attempt)
        if not result["finished"]:
            print(
                f"note: build {args.ids_build} is not finished; a running attempt's span is exported when it finishes",
                file=err,
            )
    result.update(bases.links(str(result["trace_id"])))
    if args.ids_json:
        print(json.dumps(result), file=out)
    else:
        for key in _TEXT_KEYS:
            if key in result:
                print(f"{key} {result[key]}", file=out)
    return 0


async def build_ids(cfg: Config, build_id: int, attempt: int | None = None) -> dict[str, object]:
    """Trace ID and span ID of a build attempt, as the daemon places it (Trio-flavoured).

    Args:
        cfg: the configuration (database, instance, trace budget).
        build_id: the build.
        attempt: the attempt from 0; None for the latest, derived from the build's steps the way
            the daemon derives it (``core.builds.build_attempt``).

    Returns:
        ``instance``, ``build_id``, ``eval_id`` (the creating evaluation, or None), ``own_trace``
        (beyond the evaluation's trace budget), ``finished``, ``attempt``, ``trace_id``, ``span_id``.

    Raises:
        ToolError: the database cannot be reached, or has no such build.
    """
    render = _render_config(cfg)
    try:
        with trio.fail_after(DB_TIMEOUT):
            async with db.open_database(cfg.db.url, size=1) as database:
                q = BuildQueries(database, budget=cfg.stitch.max_builds_per_trace)
                facts = (await q.builds([build_id])).get(build_id)
                steps = (await q.steps([build_id])).get(build_id, []) if facts is not None else []
    except _DB_ERRORS as exc:
        raise ToolError(f"cannot read the database {cfg.db.redacted_url}: {_describe(exc, cfg)}") from None
    if facts is None:
        raise ToolError(f"build {build_id} is not in the database {cfg.db.redacted_url}")
    if attempt is None:
        attempt = build_attempt(facts, steps)
    trace, span = build_span_id(render, facts, attempt)
    return {
        "instance": render.instance,
        "build_id": build_id,
        "eval_id": facts.eval_id,
        "own_trace": placement(render, facts).own_trace,
        "finished": facts.finished,
        "attempt": attempt,
        "trace_id": ids.format_trace_id(trace),
        "span_id": ids.format_span_id(span),
    }


def _render_config(cfg: Config) -> RenderConfig:
    s = cfg.stitch
    return RenderConfig(
        instance=s.instance,
        hydra_url=s.hydra_url,
        error_text_limit=s.error_text_limit,
        max_builds_per_trace=s.max_builds_per_trace,
        max_links=s.max_links,
    )


def _describe(exc: BaseException, cfg: Config) -> str:
    """A one-line reason for ``exc`` that never shows the database password."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    first = str(exc).strip().split("\n", 1)[0]
    if isinstance(exc, HydraOtelError) and first:
        text = first  # our own messages say what happened; the class adds nothing
    else:
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    text = text.replace(cfg.db.url, cfg.db.redacted_url)
    for secret in _secrets_of(cfg.db.url):
        text = text.replace(secret, "***")
    return text


def _secrets_of(url: str) -> list[str]:
    found = [m.group(1) for m in re.finditer(r"(?i)password\s*=\s*'?([^'\s&;]+)", url)]
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found += [password, unquote(password)]
    return [s for s in found if len(s) >= 3]  # replacing a one-letter "password" would garble the text


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


# pg_catalog rather than information_schema: the latter hides columns the role has no privilege
# on, which would report a missing GRANT as a missing column. pg_table_is_visible resolves names
# through the search_path exactly as the daemon's unqualified queries do.
COLUMNS_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND pg_catalog.pg_table_is_visible(c.oid)
"""

# Table-level SELECT, or (for column-level grants) SELECT on every column the daemon reads.
PRIVILEGES_SQL = """
SELECT p.t AS table_name,
       has_table_privilege(p.t, 'SELECT') OR bool_and(has_column_privilege(p.t, p.c, 'SELECT')) AS readable
FROM unnest($1::text[], $2::text[]) AS p(t, c)
GROUP BY p.t
"""

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
    return results


async def _step(name: str, cfg: Config, fn: Callable[[], Awaitable[str | CheckResult]]) -> CheckResult:
    """Run one check: a text is its ok detail; a database error (or its deadline passing) its FAIL."""
    failure: BaseException | None = None
    outcome: str | CheckResult = ""
    try:
        outcome = await fn()
    except* _DB_ERRORS as group:
        failure = group
    if failure is not None:
        return CheckResult(name=name, ok=False, detail=_describe(failure, cfg))
    return outcome if isinstance(outcome, CheckResult) else CheckResult(name=name, ok=True, detail=outcome)


async def _check_database(cfg: Config, add: Emit) -> None:
    try:
        async with db.open_database(cfg.db.url, size=2) as database:
            await _database_checks(cfg, database, add)
    except _DB_ERRORS as exc:  # the pool itself (a malformed URL); queries fail inside each step
        detail = f"{cfg.db.redacted_url}: {_describe(exc, cfg)}"
        add(CheckResult(name="database connection", ok=False, detail=detail))


async def _database_checks(cfg: Config, database: db.Database, add: Emit) -> None:
    present: dict[str, set[str]] = {}

    async def connect() -> str:
        with trio.fail_after(DB_TIMEOUT):
            await database.fetchval("SELECT 1")
        return cfg.db.redacted_url

    async def columns() -> str:
        with trio.fail_after(DB_TIMEOUT):
            rows = await database.fetch(COLUMNS_SQL, list(HYDRA_COLUMNS))
        for row in rows:
            present.setdefault(row["table_name"], set()).add(row["column_name"])
        return ""

    async def version() -> CheckResult:
        with trio.fail_after(DB_TIMEOUT):
            found = await database.fetchval("SELECT max(version) FROM schemaversion")
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
    rows = await database.fetch(PRIVILEGES_SQL, [t for t, _ in pairs], [c for _, c in pairs])
    denied = sorted(r["table_name"] for r in rows if not r["readable"])
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
        backoff = Backoff(base=0.2, cap=1.0)
        await nursery.start(
            lambda task_status: db.run_listener(
                dsn, [channel], send, stats=db.ListenStatistics(), backoff=backoff, task_status=task_status
            )
        )
        async with db.open_connection(dsn) as conn:
            await conn.execute(f"NOTIFY {channel}, '{token}'")
        async for item in receive:
            if isinstance(item, db.RawNotification) and (item.channel, item.payload) == (channel, token):
                break
        nursery.cancel_scope.cancel()
    return f"round trip in {(trio.current_time() - started) * 1000:.0f} ms"


class _Capture(logging.Handler):
    """Keeps the OTLP exporter's warnings and errors: its result alone does not say why."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def _check_otlp(cfg: Config) -> CheckResult:
    e = cfg.export
    name = "otlp export"
    where = f"{e.endpoint} ({e.protocol.value})"
    record = _check_span()
    capture = _Capture()
    exporter_log = logging.getLogger("opentelemetry.exporter.otlp")
    exporter_log.addHandler(capture)
    try:
        sink = make_sink(cfg)
    except (OSError, ValueError) as exc:  # e.g. an unreadable certificate
        exporter_log.removeHandler(capture)
        return CheckResult(name=name, ok=False, detail=f"{where}: {type(exc).__name__}: {exc}")
    acknowledged = False
    try:
        with trio.move_on_after(e.timeout + 2):  # the exporter's own timeout bounds its retries
            acknowledged = await sink.export([record])
    finally:
        exporter_log.removeHandler(capture)
        sink.shutdown()
    if acknowledged:
        return CheckResult(name=name, ok=True, detail=f"{where} accepted a span named {CHECK_SPAN_NAME!r}")
    # The exporter reports only failure; its log says why, except when a timeout cut its retries short.
    reason = (
        await _unreachable(e.endpoint)
        or (capture.messages or [f"not acknowledged within {e.timeout:g} s"])[-1]
    )
    return CheckResult(name=name, ok=False, detail=f"{where}: {reason}")


async def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` fails, or None if it succeeds."""
    parts = urlsplit(endpoint)
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
        progress = path / state.FILENAME
        if progress.exists() and not os.access(progress, os.R_OK | os.W_OK):
            raise PermissionError(13, "progress file not readable and writable", str(progress))
    finally:
        for p in created:  # deepest first; a failed mkdir left the deeper ones absent
            with contextlib.suppress(OSError):  # best effort: never mask the error that matters
                p.rmdir()
    return "can be created and written (removed again)" if created else "writable"
