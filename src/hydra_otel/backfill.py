"""``hydra-otel backfill``: export past evaluations, with their builds and steps, from Hydra's tables.

Theory of operation. The backfill is the daemon's own pipeline without the
live half: a producer selects the JobsetEvals whose ``timestamp`` lies in
``[since, until)`` (optionally of some jobsets), in ID order, a bounded page
(``--batch`` evaluations) at a time, and turns each page into the work items
the catch-up sends: one :class:`~hydra_otel.core.evals.AddedEval` per
evaluation (``started_ns=None``: no ``evaluator run`` span, which only the live
notifications know) and one :class:`~hydra_otel.core.events.BuildFinished` per
finished build the evaluation created (``jobsetevalmembers.isnew = 1``), then a
:class:`~hydra_otel.core.catchup.Checkpoint`. The daemon's
:class:`~hydra_otel.tasks.resolver.Resolver` renders them and
:func:`~hydra_otel.tasks.exporter.run_exporter` exports them, so the spans are
the live path's spans, byte for byte, with the same IDs (docs/backfill.md says
which live spans a backfill cannot rebuild).

Progress is the backfill's own: ``<state dir>/backfill.json`` holds, per
selection (since, until, jobsets), the last evaluation ID whose page the OTLP
endpoint acknowledged. The exporter's ``commit`` writes it only after that
acknowledgement, so a run that is interrupted (Ctrl-C, ``kill``, a crash)
resumes after the last acknowledged page when started again with the same
arguments; whatever it re-exports is identical. The daemon's
``progress.sqlite3`` is never touched.

Load is bounded three ways: pages of ``--batch`` evaluations and
:data:`BUILD_PAGE` builds per query, bounded channels between the stages
(backpressure reaches the producer, so the database is read no faster than
the endpoint takes spans), and a :class:`TokenBucket` of ``--rate`` spans per
second in front of the sink.

The async functions are **Trio-flavoured** and need ``trio_asyncio.open_loop()``
(``adapters.db.open_loop``) around them. :func:`run_backfill` is the
synchronous entry point for ``cli.py``.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import datetime as dt
import fcntl
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from hydra_otel import config
from hydra_otel.adapters import db
from hydra_otel.adapters.otlp import SpanSink
from hydra_otel.config import Config
from hydra_otel.core import semconv as sc
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.evals import AddedEval
from hydra_otel.core.events import BuildFinished
from hydra_otel.core.spans import SpanRecord
from hydra_otel.core.stitch import Work
from hydra_otel.errors import DbUnavailable
from hydra_otel.service import make_sink, render_config
from hydra_otel.stats import Stats
from hydra_otel.tasks.exporter import run_exporter
from hydra_otel.tasks.resolver import Resolver, run_resolver
from hydra_otel.tasks.retry import until_db_answers

log = logging.getLogger("hydra_otel.backfill")
WAITING = "backfill waiting for the database"

_DB_ERRORS: Final[tuple[type[BaseException], ...]] = (DbUnavailable, *db.RETRYABLE)

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

# --- SQL (plain SELECTs; columns as declared in tools.HYDRA_COLUMNS) ----------------------------------

JOBSET_IDS_SQL = """
SELECT j.id, j.project, j.name FROM jobsets j
JOIN unnest($1::text[], $2::text[]) AS w(project, name) ON w.project = j.project AND w.name = j.name
"""

# The selection, in ID order, after the key ``$3``; ``$4`` NULL means every jobset.
SELECT_EVALS_SQL = """
SELECT e.id, e.jobset_id FROM jobsetevals e
WHERE e.timestamp >= $1 AND e.timestamp < $2 AND e.id > $3
  AND ($4::int[] IS NULL OR e.jobset_id = ANY($4::int[]))
ORDER BY e.id LIMIT $5
"""

COUNT_EVALS_SQL = """
SELECT count(*) AS total, count(*) FILTER (WHERE e.id > $3) AS remaining FROM jobsetevals e
WHERE e.timestamp >= $1 AND e.timestamp < $2 AND ($4::int[] IS NULL OR e.jobset_id = ANY($4::int[]))
"""

# Finished builds the given evaluations created, in ID order, after the key ``$2``.
CREATED_BUILDS_SQL = """
SELECT DISTINCT m.build FROM jobsetevalmembers m JOIN builds b ON b.id = m.build
WHERE m.eval = ANY($1::int[]) AND m.isnew = 1 AND b.finished = 1 AND m.build > $2
ORDER BY m.build LIMIT $3
"""


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


class TokenBucket:
    """At most ``rate`` tokens per second on average, in bursts of at most ``burst``.

    The bucket starts full and refills continuously, by ``trio.current_time()`` (so a
    ``MockClock`` drives it in tests). :meth:`take` waits until the bucket holds ``n``
    tokens, or is full when ``n`` is larger than ``burst``; then it takes all ``n``, which
    may leave a debt that the next caller waits off. So over any run that starts at
    time ``t0``, the tokens taken by the end of the last take at time ``t`` are at most
    ``burst + rate * (t - t0)`` plus that last take.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self._tokens = self.burst
        self._stamp: float | None = None
        self._lock = trio.Lock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while a debt is being waited off)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, n: int) -> None:
        """Wait until ``n`` tokens (or a full bucket) are available, then take ``n``."""
        async with self._lock:
            self._refill()
            need = min(float(n), self.burst)
            if self._tokens < need:
                await trio.sleep((need - self._tokens) / self.rate)
                self._refill()
            self._tokens -= n


# --- counting -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Spans counted by what they stand for: evaluations (roots), builds and steps, and all spans."""

    evaluations: int = 0
    builds: int = 0
    steps: int = 0
    spans: int = 0

    def add(self, records: Sequence[SpanRecord]) -> None:
        """Count ``records``."""
        for r in records:
            keys = {k for k, _ in r.attributes}
            if sc.HYDRA_STEP_NR in keys:
                self.steps += 1
            elif sc.CICD_PIPELINE_TASK_NAME in keys:
                self.builds += 1
            elif sc.CICD_PIPELINE_RUN_ID in keys:
                self.evaluations += 1
        self.spans += len(records)


class _MeteredSink:
    """Takes ``len(batch)`` tokens before each export attempt, and counts what was acknowledged.

    Without an inner sink (a dry run) every batch is acknowledged at once and goes nowhere.
    """

    def __init__(self, inner: SpanSink | None, bucket: TokenBucket | None, tally: Tally) -> None:
        self._inner = inner
        self._bucket = bucket
        self._tally = tally

    async def export(self, batch: Sequence[SpanRecord]) -> bool:
        if self._bucket is not None:
            await self._bucket.take(len(batch))
        if self._inner is not None and not await self._inner.export(batch):
            return False
        self._tally.add(batch)
        return True

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()


# --- stored progress ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedProgress:
    """One selection's entry in ``backfill.json``."""

    since: int
    until: int
    jobsets: tuple[str, ...]
    #: Every selected evaluation with an ID at or below this was exported and acknowledged.
    last_eval_id: int = 0
    evals_done: int = 0
    complete: bool = False
    updated: str = ""


class ProgressFile:
    """``<state dir>/backfill.json``: ``{"version": 1, "selections": {key: SavedProgress}}`` (blocking).

    Every write replaces the whole file atomically (temporary file, fsync, rename, fsync of the
    directory), so a kill at any moment leaves the previous or the new version.
    """

    VERSION: Final = 1

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PROGRESS_FILE

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": self.VERSION, "selections": {}}
        except (OSError, ValueError) as exc:
            raise BackfillError(
                f"cannot read {self.path}: {exc}; repair or delete it (it holds only backfill progress)", 2
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("selections"), dict):
            raise BackfillError(f"{self.path} is not a backfill progress file; repair or delete it", 2)
        return data

    def load(self, key: str) -> SavedProgress | None:
        """The stored progress of selection ``key``, if any."""
        entry = self._read()["selections"].get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return SavedProgress(**{**entry, "jobsets": tuple(entry.get("jobsets", ()))})
        except TypeError:
            return None  # an entry from another version: start the selection again

    def save(self, key: str, progress: SavedProgress) -> None:
        """Store ``progress`` for selection ``key`` (keeping the other selections)."""
        data = self._read()
        data["selections"][key] = {**asdict(progress), "jobsets": list(progress.jobsets)}
        data["version"] = self.VERSION
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        fd, temp = tempfile.mkstemp(prefix=".backfill-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """Hold ``backfill.lock``: one backfill at a time writes a state directory's progress."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BackfillError(
            f"cannot use the state directory {state_dir}: {exc.strerror or exc}; "
            "set --state-dir / HYDRA_OTEL_STATE_DIR to a writable directory",
            2,
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackfillError(f"another backfill is running with the state directory {state_dir}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


class _ExporterDropFilter(logging.Filter):
    """Drops the exporter's "shutdown deadline passed" error: written for the daemon's shutdown, it is
    wrong for an interrupted backfill, whose unacknowledged page is simply exported again on resume."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("shutdown deadline passed")


@contextlib.contextmanager
def _quiet_exporter_drop() -> Iterator[None]:
    logger, drop = logging.getLogger("hydra_otel.exporter"), _ExporterDropFilter()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# --- progress display -----------------------------------------------------------------------------------


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_text(
    *,
    done: int,
    total: int,
    done_here: int,
    spans: int,
    elapsed: float,
    width: int = 24,
    failing: bool = False,
) -> str:
    """One progress line: bar, percentage, evaluations done/total, spans/s, ETA.

    Args:
        done: evaluations of the selection done (including earlier runs).
        total: evaluations in the selection.
        done_here: evaluations done by this run, for the ETA.
        spans: spans exported by this run.
        elapsed: seconds since this run started.
        width: characters of the bar.
        failing: the last export attempt failed (it is being retried).
    """
    fraction = 1.0 if total == 0 else min(1.0, done / total)
    filled = int(fraction * width)
    rate = spans / elapsed if elapsed > 0 else 0.0
    if done >= total:
        eta = "0:00:00"
    elif done_here > 0 and elapsed > 0:
        eta = _duration((total - done) * elapsed / done_here)
    else:
        eta = "-:--:--"
    text = (
        f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:5.1f}%  "
        f"{done}/{total} evals  {rate:,.0f} spans/s  ETA {eta}"
    )
    return text + ("  (export failing, retrying)" if failing else "")


class _Display:
    """Draws the progress: one updating line on a terminal, else a line every ``interval`` seconds."""

    def __init__(self, out: TextIO, *, tty: bool, interval: float) -> None:
        self._out = out
        self._tty = tty
        self._interval = interval
        self._last_line = -math.inf
        self._drawn = False

    @property
    def tty(self) -> bool:
        return self._tty

    @property
    def refresh(self) -> float:
        return TTY_REFRESH if self._tty else max(TTY_REFRESH, self._interval)

    def draw(self, text: str, *, now: float, force: bool = False) -> None:
        if self._tty:  # a line that wraps could not be redrawn in place: cut it to the terminal's width
            width = shutil.get_terminal_size().columns - 1
            self._out.write(f"\r{text[:width]}\x1b[K")
            self._drawn = True
        elif force or now - self._last_line >= self._interval:
            self._out.write(f"backfill: {text}\n")
            self._last_line = now
        else:
            return
        self._out.flush()

    def message(self, text: str) -> None:
        self.close()
        self._out.write(f"{text}\n")
        self._out.flush()

    def close(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


# --- the backfill ---------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class BackfillResult:
    """What a backfill did (updated while it runs; read it after a cancellation too).

    Attributes:
        since, until, jobsets: the selection (``until`` resolved).
        dry_run: nothing was exported or stored.
        complete: every selected evaluation is done (now or by an earlier run).
        already_complete: an earlier run had completed the selection; nothing was done.
        resumed_after: the stored progress this run started after (0: from the start).
        evals_total: evaluations in the selection.
        evals_done: evaluations done and acknowledged, including earlier runs.
        last_eval_id: the last evaluation acknowledged (0: none).
        exported: what this run exported (a dry run: would export), by kind.
        skipped: builds restarted again before they were read, and rows that disappeared.
        seconds: how long this run took.
    """

    since: int
    until: int
    jobsets: tuple[str, ...]
    dry_run: bool
    complete: bool = False
    already_complete: bool = False
    resumed_after: int = 0
    evals_total: int = 0
    evals_done: int = 0
    last_eval_id: int = 0
    exported: Tally = field(default_factory=Tally)
    skipped: int = 0
    seconds: float = 0.0

    def summary(self, rate: float = 0.0) -> str:
        """The final line(s) for the operator."""
        period = f"{format_time(self.since)} to {format_time(self.until)}"
        where = f"{period}, jobsets {', '.join(self.jobsets)}" if self.jobsets else period
        t = self.exported
        counts = (
            f"{_n(t.evaluations, 'evaluation')}, {_n(t.builds, 'build')}, {_n(t.steps, 'step')} "
            f"({_n(t.spans, 'span')})"
        )
        if self.already_complete:
            return f"backfill of {where} was already complete; --restart exports it again"
        if self.dry_run:
            text = f"dry run, {where}: would export {counts}"
            if self.resumed_after:
                text += f", resuming after evaluation {self.resumed_after}"
            if rate > 0:
                text += f"; at --rate {rate:g} about {_duration(t.spans / rate)}"
            return text
        state = "complete" if self.complete else "interrupted"
        text = f"backfill {state}, {where}: exported {counts} in {_duration(self.seconds)}"
        text += f"; {self.evals_done}/{self.evals_total} evaluations done"
        if self.skipped:
            text += f"; {self.skipped} builds or rows skipped (restarted or gone)"
        if not self.complete:
            text += "; run the same command again to resume"
        return text


class Backfill:
    """One backfill run; :meth:`run` is Trio-flavoured (needs ``open_loop()``)."""

    def __init__(
        self, cfg: Config, opts: BackfillOptions, *, out: TextIO, sink: SpanSink | None = None
    ) -> None:
        """Prepare a run.

        Args:
            cfg: the daemon's configuration (database, OTLP, rendering, state directory).
            opts: the selection and limits.
            out: where progress goes (the CLI passes standard error).
            sink: the OTLP sink (default: :func:`hydra_otel.service.make_sink`); unused by a dry run.
        """
        self.cfg = cfg
        self.opts = opts
        self.stats = Stats()
        self.result = BackfillResult(
            since=opts.since, until=opts.until or 0, jobsets=tuple(opts.jobsets), dry_run=opts.dry_run
        )
        self._sink = sink
        tty = opts.tty if opts.tty is not None else _isatty(out)
        self._display = _Display(out, tty=tty, interval=opts.line_interval)
        self._done_at: dict[int, int] = {}
        self._started = 0.0
        self._done_before = 0
        self._counted = False

    async def run(self) -> BackfillResult:
        """Export (or count) the selection; returns when it is complete.

        Raises:
            BackfillError: unusable state directory or progress file, another backfill running,
                unknown jobset, invalid period, database unreachable at the start.
        """
        store = ProgressFile(self.cfg.state_dir)
        with _quiet_exporter_drop():
            if self.opts.dry_run:
                return await self._run(store)
            with _exclusive(self.cfg.state_dir):
                return await self._run(store)

    async def _run(self, store: ProgressFile) -> BackfillResult:
        opts, result = self.opts, self.result
        key = opts.key()
        saved = None if opts.restart else await trio.to_thread.run_sync(store.load, key)
        until = saved.until if saved is not None else (opts.until or int(time.time()))
        result.until = until
        if opts.since >= until:
            raise BackfillError(
                f"empty period: --since {format_time(opts.since)} is not before --until {format_time(until)}",
                2,
            )
        if saved is not None and saved.complete:
            result.complete = result.already_complete = True
            result.last_eval_id = result.resumed_after = saved.last_eval_id
            result.evals_done = result.evals_total = saved.evals_done
            return result
        after = saved.last_eval_id if saved is not None else 0
        result.resumed_after = result.last_eval_id = after
        self._started = trio.current_time()
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:  # the pool connects lazily: this fails only on a malformed URL
                    database = await stack.enter_async_context(
                        db.open_database(self.cfg.db.url, size=2, stats=self.stats)
                    )
                except _DB_ERRORS as exc:
                    raise self._db_error(exc) from None
                jobset_ids = await self._start(database, until, after)
                self._counted = True
                if result.resumed_after and not opts.dry_run:
                    self._display.message(
                        f"backfill: resuming after evaluation {after} "
                        f"({result.evals_done} of {result.evals_total} evaluations done)"
                    )
                saving = SavedProgress(since=opts.since, until=until, jobsets=tuple(opts.jobsets))
                if saved is None and not opts.dry_run:
                    # Recorded at once: a run interrupted before its first page then resumes with the
                    # same "now", and an interrupted --restart does not leave an old "complete" behind.
                    start = replace(saving, updated=_now_iso())
                    await trio.to_thread.run_sync(store.save, key, start)
                try:
                    await self._pipeline(database, store, key, saving, jobset_ids, after)
                except* BackfillError as group:  # the progress file became unusable mid-run
                    raise _first(group) from None
            result.complete = True
            if not opts.dry_run:
                done = SavedProgress(
                    since=opts.since,
                    until=until,
                    jobsets=tuple(opts.jobsets),
                    last_eval_id=result.last_eval_id,
                    evals_done=result.evals_done,
                    complete=True,
                    updated=_now_iso(),
                )
                await trio.to_thread.run_sync(store.save, key, done)
        finally:
            result.seconds = trio.current_time() - self._started
            result.skipped = self.stats.not_finished + sum(self.stats.missing_rows.values())
            if self._display.tty and self._counted:  # off a terminal the summary follows at once
                self._draw()
            self._display.close()
        return result

    async def _start(self, database: db.Database, until: int, after: int) -> list[int] | None:
        """Resolve the jobset names and count the selection (fails fast: nothing is running yet)."""
        try:
            with trio.fail_after(START_TIMEOUT):
                jobset_ids = await self._jobset_ids(database)
                rows = await database.fetch(COUNT_EVALS_SQL, self.opts.since, until, after, jobset_ids)
        except _DB_ERRORS as exc:  # RETRYABLE includes trio.TooSlowError
            raise self._db_error(exc) from None
        self.result.evals_total = rows[0]["total"]
        self.result.evals_done = self._done_before = rows[0]["total"] - rows[0]["remaining"]
        return jobset_ids

    def _db_error(self, exc: BaseException) -> BackfillError:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc).split("\n", 1)[0]
        reason = reason.replace(self.cfg.db.url, self.cfg.db.redacted_url)
        return BackfillError(f"cannot read the database {self.cfg.db.redacted_url}: {reason}")

    async def _jobset_ids(self, database: db.Database) -> list[int] | None:
        if not self.opts.jobsets:
            return None
        pairs = [name.split(":", 1) for name in self.opts.jobsets]
        rows = await database.fetch(JOBSET_IDS_SQL, [p for p, _ in pairs], [j for _, j in pairs])
        found = {f"{r['project']}:{r['name']}": r["id"] for r in rows}
        unknown = [name for name in self.opts.jobsets if name not in found]
        if unknown:
            raise BackfillError(f"no such jobset in the database: {', '.join(unknown)}")
        return sorted(found.values())

    async def _pipeline(
        self,
        database: db.Database,
        store: ProgressFile,
        key: str,
        saving: SavedProgress,
        jobset_ids: list[int] | None,
        after: int,
    ) -> None:
        cfg, opts = self.cfg, self.opts
        work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](WORK_QUEUE)
        span_tx, span_rx = trio.open_memory_channel[SpanRecord | Checkpoint](SPAN_QUEUE)
        bucket = TokenBucket(opts.rate) if opts.rate > 0 and not opts.dry_run else None
        inner = None if opts.dry_run else (self._sink or make_sink(cfg))
        sink = _MeteredSink(inner, bucket, self.result.exported)
        resolver = Resolver.create(database, render_config(cfg), self.stats, recent=RECENT_SPANS)

        async def commit(marks: Marks) -> None:
            self.result.last_eval_id = marks.eval_id
            self.result.evals_done = self._done_at.pop(marks.eval_id, self.result.evals_done)
            if not opts.dry_run:
                progress = SavedProgress(
                    since=saving.since,
                    until=saving.until,
                    jobsets=saving.jobsets,
                    last_eval_id=marks.eval_id,
                    evals_done=self.result.evals_done,
                    updated=_now_iso(),
                )
                await trio.to_thread.run_sync(store.save, key, progress)
            self.stats.checkpoints += 1
            self._draw()

        async def export() -> None:
            try:
                await run_exporter(
                    span_rx,
                    sink,
                    self.stats,
                    batch_size=cfg.export.batch_size,
                    delay=cfg.export.delay,
                    backoff=Backoff(base=0.5, factor=2.0, cap=cfg.export.max_backoff, jitter=0.2),
                    commit=commit,
                )
            finally:
                sink.shutdown()

        async with trio.open_nursery() as outer:
            outer.start_soon(self._redraw)
            async with trio.open_nursery() as pipeline:
                pipeline.start_soon(export)
                pipeline.start_soon(
                    functools.partial(run_resolver, backoff=Backoff(base=0.5, cap=10.0)),
                    work_rx,
                    span_tx,
                    resolver,
                )
                async with work_tx:
                    await self._produce(database, work_tx, jobset_ids, after)
            outer.cancel_scope.cancel()

    async def _produce(
        self,
        database: db.Database,
        work: trio.MemorySendChannel[Work | Checkpoint],
        jobset_ids: list[int] | None,
        after: int,
    ) -> None:
        """Send each page of evaluations, the builds they created, and a checkpoint."""
        opts, done = self.opts, self._done_before
        until = self.result.until
        while True:
            page = await until_db_answers(
                functools.partial(
                    database.fetch, SELECT_EVALS_SQL, opts.since, until, after, jobset_ids, opts.batch
                ),
                waiting=WAITING,
            )
            if not page:
                return
            eval_ids = [r["id"] for r in page]
            for r in page:
                await work.send(
                    AddedEval(
                        eval_id=r["id"],
                        jobset_id=r["jobset_id"],
                        correlation_id="",
                        started_ns=None,
                        ended_ns=0,
                    )
                )
            build_after = 0
            while True:
                builds = await until_db_answers(
                    functools.partial(database.fetch, CREATED_BUILDS_SQL, eval_ids, build_after, BUILD_PAGE),
                    waiting=WAITING,
                )
                for r in builds:
                    await work.send(BuildFinished(build_id=r["build"], dependents=()))
                if len(builds) < BUILD_PAGE:
                    break
                build_after = builds[-1]["build"]
            after = eval_ids[-1]
            done += len(eval_ids)
            self._done_at[after] = done
            await work.send(Checkpoint(Marks(eval_id=after)))

    async def _redraw(self) -> None:
        while True:
            await trio.sleep(self._display.refresh)
            self._draw()

    def _draw(self, *, force: bool = False) -> None:
        if self.opts.dry_run and not self._display.tty:
            return  # a dry run is quick: its summary says it all
        r = self.result
        text = progress_text(
            done=r.evals_done,
            total=r.evals_total,
            done_here=r.evals_done - self._done_before,
            spans=r.exported.spans,
            elapsed=trio.current_time() - self._started,
            failing=self.stats.exporting_failed,
        )
        self._display.draw(text, now=trio.current_time(), force=force)


async def backfill(
    cfg: Config, opts: BackfillOptions, *, out: TextIO, sink: SpanSink | None = None
) -> BackfillResult:
    """Run a backfill to completion (Trio-flavoured: needs ``open_loop()``); see :class:`Backfill`."""
    return await Backfill(cfg, opts, out=out, sink=sink).run()


def _first(group: BaseExceptionGroup[BackfillError]) -> BackfillError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, BackfillError)
    return exc


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _now_iso() -> str:
    return format_time(int(time.time()))


# --- command line ---------------------------------------------------------------------------------------


def run_backfill(
    args: argparse.Namespace, cfg: Config, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the ``backfill`` command (synchronous: starts its own trio loop).

    SIGINT and SIGTERM (when called from the main thread) stop it at once; the progress stored
    so far is kept, and running the same command again resumes.

    Args:
        args: parsed by a parser that :func:`add_backfill_command` extended.
        cfg: the loaded configuration.
        out: where the summary goes (default: standard output).
        err: where progress and errors go (default: standard error).

    Returns:
        The exit status: 0 complete (or a dry run), 1 failure, 2 invalid usage or state directory,
        130 interrupted (resumable).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    opts = options_from_args(args)
    runner = Backfill(cfg, opts, out=err)

    error: BackfillError | None = None

    async def main() -> bool:
        nonlocal error
        interrupted = False
        async with db.open_loop(), trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                nonlocal interrupted
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for _ in signals:
                        interrupted = True
                        scope.cancel()
                        return

            if threading.current_thread() is threading.main_thread():
                await nursery.start(watch)
            with scope:
                try:
                    await runner.run()
                except BackfillError as exc:
                    error = exc
            nursery.cancel_scope.cancel()
        return interrupted

    try:
        interrupted = trio.run(main)
    except KeyboardInterrupt:
        interrupted = True
    if error is not None:
        print(f"hydra-otel backfill: {error}", file=err)
        return error.status
    if interrupted or not runner.result.complete:
        print(runner.result.summary(opts.rate), file=err)
        return 130
    print(runner.result.summary(opts.rate), file=out)
    return 0
