"""``hydra-otel ids``: looks up the trace and span IDs the daemon uses for an evaluation or a build."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import quote, urlsplit

import trio

from hydra_otel.adapters import db
from hydra_otel.adapters.queries import BuildQueries
from hydra_otel.config import Config
from hydra_otel.core import ids
from hydra_otel.core.builds import build_attempt, build_span_id, placement
from hydra_otel.dsn import has_userinfo
from hydra_otel.pipeline.factories import render_config
from hydra_otel.tools.common import (
    DB_TIMEOUT,
    JAEGER_URL_ENV,
    TEMPO_DATASOURCE_ENV,
    TEMPO_URL_ENV,
    ToolError,
    UsageError,
    describe,
)

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
        if value and has_userinfo(value):
            # Printed links get pasted into tickets and chats: they must not carry a password.
            raise UsageError(f"{flag} (or {env}) must not hold a user name or password")
        found[key] = value
    datasource = args.tempo_datasource or environ.get(TEMPO_DATASOURCE_ENV) or "tempo"
    return _LinkBases(jaeger=found["jaeger"], tempo=found["tempo"], datasource=datasource)


#: Keys printed in text mode, in this order; ``--json`` prints them all.
_TEXT_KEYS = ("trace_id", "span_id", "attempt", "jaeger_url", "tempo_url")


async def ids_command(
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
    render = render_config(cfg)
    try:
        with trio.fail_after(DB_TIMEOUT):
            async with db.open_database(cfg.db.url, size=1) as database:
                q = BuildQueries(database, budget=cfg.stitch.max_builds_per_trace)
                facts = (await q.builds([build_id])).get(build_id)
                steps = (await q.steps([build_id])).get(build_id, []) if facts is not None else []
    except db.QUERY_ERRORS as exc:
        raise ToolError(f"cannot read the database {cfg.db.redacted_url}: {describe(exc, cfg)}") from None
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
