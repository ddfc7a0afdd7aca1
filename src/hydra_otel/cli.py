"""Command line: ``hydra-otel run | demo | ids | check | backfill``. The only place that exits the process.

Exit codes: 0 after a clean stop (signal), 2 for an invalid configuration or
usage or an unusable state directory (docs/operations.md), 3 when the instance lock was lost (run under a supervisor that restarts
it: it comes back as a standby), 1 for an unexpected failure (a bug: the
traceback is logged); 130 for an interrupted ``backfill`` or ``demo`` (a backfill resumes
when run again).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra_otel
from hydra_otel import backfill, config, log, tools
from hydra_otel.errors import ConfigError, LeadershipLost, StateDirError, first_leaf

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
    tools.add_tool_commands(sub)
    backfill.add_backfill_command(sub)
    demo = sub.add_parser(
        "demo", help="play a scripted Hydra against a throwaway PostgreSQL and show the traces it makes"
    )
    demo.add_argument("--short", action="store_true", help="a smaller workload, without pauses (for CI)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("hydra-otel-demo"),
        metavar="DIR",
        help="where to save the traces as OTLP/JSON (default: ./hydra-otel-demo)",
    )
    demo.add_argument("--width", type=int, metavar="N", help="waterfall width (default: the terminal's)")
    demo.add_argument("--ascii", action="store_true", help="draw the waterfalls with ASCII characters only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hydra-otel`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    try:
        cfg = config.load(vars(args), os.environ)
    except ConfigError as exc:
        print(f"hydra-otel: {exc}", file=sys.stderr)
        return 2
    log.configure(cfg.log_level, cfg.secrets)
    if args.command == "run":
        return _run(cfg)
    if args.command in ("ids", "check"):
        return tools.run_tool(args, cfg)
    if args.command == "backfill":
        return backfill.run_backfill(args, cfg)
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
        state, other = group.split((StateDirError, ConfigError))
        if state is not None and other is None:
            logger.error(str(first_leaf(state)))
            return 2
        logger.exception("hydra-otel stopped on an unexpected error; this is a bug, please report it")
        return 1
    except Exception:
        logger.exception("hydra-otel stopped on an unexpected error; this is a bug, please report it")
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    # The demo prints its own story; the daemon's info lines would drown it.
    log.configure("warning")
    try:
        import trio

        from hydra_otel import service
        from hydra_otel.demo.run import DemoOptions, run_demo
        from hydra_otel.pipeline.factories import make_sink

        opts = DemoOptions(
            short=args.short,
            out_dir=args.out,
            width=args.width,
            ascii=args.ascii,
            speed=0.0 if args.short else 1.0,
        )
        return trio.run(run_demo, opts, lambda cfg: service.Service(cfg=cfg, sink=make_sink(cfg)))
    except KeyboardInterrupt:  # before the demo's own signal handling was installed, or a second Ctrl-C
        return 130
