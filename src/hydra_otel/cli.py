"""Command line: ``hydra-otel run``. The only place that exits the process.

Exit codes: 0 after a clean stop (signal), 2 for an invalid configuration or
usage, 3 when the instance lock was lost (run under a supervisor that restarts
it: it comes back as a standby), 1 for an unexpected failure (a bug: the
traceback is logged).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import hydra_otel
from hydra_otel import config, log
from hydra_otel.errors import ConfigError, LeadershipLost

logger = logging.getLogger("hydra_otel")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per mode."""
    parser = argparse.ArgumentParser(
        prog="hydra-otel",
        description="Turns Hydra CI evaluations, builds and steps into OpenTelemetry traces.",
    )
    parser.add_argument("--version", action="version", version=f"hydra-otel {hydra_otel.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="LISTEN to Hydra's notifications and export traces over OTLP")
    config.add_arguments(run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hydra-otel`` console script."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(vars(args), os.environ)
    except ConfigError as exc:
        print(f"hydra-otel: {exc}", file=sys.stderr)
        return 2
    log.configure(cfg.log_level)
    if args.command == "run":
        return _run(cfg)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _run(cfg: config.Config) -> int:
    import trio

    from hydra_otel import service

    try:
        trio.run(service.main, cfg)
    except KeyboardInterrupt:  # a signal arrived before the handler was installed
        return 0
    except BaseExceptionGroup as group:
        lost, other = group.split(LeadershipLost)
        if lost is not None and other is None:
            logger.error("lost the instance lock; exiting so the service manager restarts this as a standby")
            return 3
        logger.exception("hydra-otel stopped on an unexpected error; this is a bug, please report it")
        return 1
    except Exception:
        logger.exception("hydra-otel stopped on an unexpected error; this is a bug, please report it")
        return 1
    return 0
