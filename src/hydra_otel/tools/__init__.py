"""Operator commands: ``hydra-otel ids`` (where is my trace?) and ``hydra-otel check`` (will the daemon work?).

Theory of operation. Both commands reuse the daemon's own code, so they answer
for the daemon rather than for a re-implementation: ``ids``
(:mod:`hydra_otel.tools.lookup`) derives IDs with
:mod:`hydra_otel.core.ids` and places builds with ``core.builds.placement`` over
the rows :class:`~hydra_otel.adapters.queries.BuildQueries` reads; ``check``
exports through the same sink :func:`hydra_otel.pipeline.factories.make_sink` builds and
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
import os
import sys
from collections.abc import Callable, Mapping
from typing import TextIO

import trio

from hydra_otel import config
from hydra_otel.adapters import db
from hydra_otel.config import Config
from hydra_otel.log import Redactor
from hydra_otel.tools.check import (
    CheckResult,
    run_checks,
    schema_results,
    schema_version_result,
    state_dir_writable,
)
from hydra_otel.tools.common import (
    HYDRA_COLUMNS,
    JAEGER_URL_ENV,
    TEMPO_DATASOURCE_ENV,
    TEMPO_URL_ENV,
    ToolError,
    UsageError,
)
from hydra_otel.tools.lookup import build_ids, eval_ids, ids_command, jaeger_url, tempo_url

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
    redact = Redactor(cfg.secrets)  # a driver's error text may quote the connection string
    try:
        if args.tool == "ids":
            return await ids_command(args, cfg, out, err, os.environ if environ is None else environ)
        if args.tool == "check":
            results = await run_checks(cfg, lambda r: print(redact(r.line()), file=out, flush=True))
            return 0 if all(r.ok for r in results) else 1
    except UsageError as exc:
        print(redact(f"hydra-otel {args.tool}: {exc}"), file=err)
        return 2
    except ToolError as exc:
        print(redact(f"hydra-otel {args.tool}: {exc}"), file=err)
        return 1
    raise ValueError(f"unknown tool {args.tool!r}")


__all__ = [
    "HYDRA_COLUMNS",
    "CheckResult",
    "add_tool_commands",
    "build_ids",
    "eval_ids",
    "jaeger_url",
    "run_checks",
    "run_tool",
    "run_tool_async",
    "schema_results",
    "schema_version_result",
    "state_dir_writable",
    "tempo_url",
]
