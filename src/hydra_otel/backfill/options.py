"""Options of ``hydra-otel backfill``: parsing, validation, the argparse sub-command."""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import logging
import math
import re
from dataclasses import dataclass
from typing import Final

from hydra_otel import config

log = logging.getLogger("hydra_otel.backfill")
WAITING = "backfill waiting for the database"

#: Default and bounds of ``--rate`` (spans per second; 0 means no limit).
DEFAULT_RATE: Final = 2000.0
#: Default and bounds of ``--batch`` (evaluations per page and per checkpoint).
DEFAULT_BATCH: Final = 50
MAX_BATCH: Final = 10_000
#: Builds read per query (a page of evaluations may have created many).
BUILD_PAGE: Final = 1000
#: Capacity of the work and span channels between the stages.
WORK_QUEUE: Final = 1000
SPAN_QUEUE: Final = 4096
#: Exact repeats remembered by the resolver (a build new in two evaluations is rendered once).
RECENT_SPANS: Final = 20_000
#: The progress file in the state directory, and the lock that keeps one backfill per directory.
PROGRESS_FILE: Final = "backfill.json"
LOCK_FILE: Final = "backfill.lock"
#: Seconds between progress redraws on a terminal, and between progress lines otherwise.
TTY_REFRESH: Final = 0.5
LINE_INTERVAL: Final = 10.0
#: Seconds allowed for the start-up queries (jobset names, counting the selection).
START_TIMEOUT: Final = 60.0


class BackfillError(Exception):
    """The backfill cannot run; ``status`` is the exit status (1 failure, 2 usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- options --------------------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """A point in time as Unix seconds: ``2024-05-01``, ``2024-05-01T12:30[:00][Z|+02:00]`` or ``1714521600``.

    Dates and datetimes without a zone are UTC. Hydra stores whole seconds and the bounds compare
    as ``since <= timestamp < until``, so a fraction of a second is rounded up (exact for both).

    Raises:
        argparse.ArgumentTypeError: the text is none of these forms.
    """
    text = text.strip()
    if re.fullmatch(r"\d{1,12}", text):
        return int(text)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            when = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.UTC)
        else:
            when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date, an ISO 8601 date and time, or Unix seconds: {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    utc = when.astimezone(dt.UTC)
    return calendar.timegm(utc.timetuple()) + (1 if utc.microsecond else 0)


def format_time(seconds: int) -> str:
    """Unix seconds as ``2024-05-01T12:30:00Z``."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_jobset(text: str) -> str:
    """``project:jobset``, checked for shape (the database is asked later)."""
    project, sep, jobset = text.partition(":")
    if not sep or not project or not jobset:
        raise argparse.ArgumentTypeError(f"expected PROJECT:JOBSET, got {text!r}")
    return text


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive number, got {text}")
    return value


def _batch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_BATCH}, got {value}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillOptions:
    """What to export and how fast.

    Attributes:
        since: first Unix second of the period (inclusive), compared with ``jobsetevals.timestamp``.
        until: end of the period (exclusive); None for "now", fixed when the selection is first run.
        jobsets: ``project:jobset`` names; empty for every jobset.
        dry_run: count what would be exported; export and store nothing.
        rate: at most this many spans per second on average (0: no limit).
        batch: evaluations per page, i.e. per query and per stored checkpoint.
        restart: ignore (and replace) the stored progress of this selection.
        line_interval: seconds between progress lines when the output is not a terminal.
        tty: draw one updating line; None asks the output stream.
    """

    since: int
    until: int | None = None
    jobsets: tuple[str, ...] = ()
    dry_run: bool = False
    rate: float = DEFAULT_RATE
    batch: int = DEFAULT_BATCH
    restart: bool = False
    line_interval: float = LINE_INTERVAL
    tty: bool | None = None

    def key(self) -> str:
        """The selection's key in ``backfill.json``: the arguments as given (``until`` may be "now")."""
        until = "now" if self.until is None else str(self.until)
        return f"since={self.since} until={until} jobsets={','.join(sorted(set(self.jobsets))) or '*'}"


def add_backfill_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``backfill`` sub-command with its options and every configuration flag.

    Args:
        sub: the CLI's ``add_subparsers()`` result. :func:`run_backfill` reads the options
            from ``backfill_*`` attributes, whatever ``dest`` the CLI gave ``sub``.
    """
    p = sub.add_parser(
        "backfill",
        help="export past evaluations with their builds and steps from Hydra's tables",
        description="Export the evaluations recorded in a period, with the builds they created and their "
        "steps, exactly as the daemon exports them live (same IDs, same content). Resumable: run the same "
        "command again after an interruption. See docs/backfill.md.",
    )
    p.add_argument(
        "--since", dest="backfill_since", type=parse_time, required=True, metavar="TIME",
        help="start of the period (inclusive): a date (2024-05-01, UTC midnight), an ISO 8601 date and "
        "time (UTC unless it has an offset) or Unix seconds; compared with jobsetevals.timestamp",
    )  # fmt: skip
    p.add_argument(
        "--until", dest="backfill_until", type=parse_time, metavar="TIME",
        help="end of the period (exclusive), same forms. Default: now (fixed by the first run, so a "
        "resumed run covers the same period)",
    )  # fmt: skip
    p.add_argument(
        "--jobset", dest="backfill_jobsets", type=parse_jobset, action="append", default=[],
        metavar="PROJECT:JOBSET", help="only this jobset's evaluations (repeatable). Default: every jobset",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", dest="backfill_dry_run", action="store_true",
        help="read and render everything, count evaluations, builds, steps and spans; export nothing",
    )  # fmt: skip
    p.add_argument(
        "--rate", dest="backfill_rate", type=_rate, default=DEFAULT_RATE, metavar="SPANS",
        help=f"at most this many spans per second (0: no limit). Default: {DEFAULT_RATE:g}",
    )  # fmt: skip
    p.add_argument(
        "--batch", dest="backfill_batch", type=_batch, default=DEFAULT_BATCH, metavar="N",
        help=f"evaluations per page and per stored checkpoint, 1 to {MAX_BATCH}. Default: {DEFAULT_BATCH}",
    )  # fmt: skip
    p.add_argument(
        "--restart", dest="backfill_restart", action="store_true",
        help=f"ignore the progress stored for this selection in the state directory ({PROGRESS_FILE})",
    )  # fmt: skip
    config.add_arguments(p)


def options_from_args(args: argparse.Namespace) -> BackfillOptions:
    """The options parsed by a parser that :func:`add_backfill_command` extended."""
    return BackfillOptions(
        since=args.backfill_since,
        until=args.backfill_until,
        jobsets=tuple(dict.fromkeys(args.backfill_jobsets)),
        dry_run=args.backfill_dry_run,
        rate=args.backfill_rate,
        batch=args.backfill_batch,
        restart=args.backfill_restart,
    )


# --- rate limit -----------------------------------------------------------------------------------------
