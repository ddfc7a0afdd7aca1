"""Backfill progress: the rate limit, counters, the resumable progress file, the progress display."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from hydra_otel.adapters.otlp import DELIVERED, Delivery, SpanSink
from hydra_otel.backfill.options import LOCK_FILE, PROGRESS_FILE, TTY_REFRESH, BackfillError
from hydra_otel.core import semconv as sc
from hydra_otel.core.spans import SpanRecord

_log = logging.getLogger("hydra_otel.backfill")


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


class PacedSink:
    """Takes ``len(batch)`` tokens before each export attempt, and counts what was acknowledged.

    Without an inner sink (a dry run) every batch is acknowledged at once and goes nowhere.
    """

    def __init__(self, inner: SpanSink | None, bucket: TokenBucket | None, tally: Tally) -> None:
        self._inner = inner
        self._bucket = bucket
        self._tally = tally

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        if self._bucket is not None:
            await self._bucket.take(len(batch))
        delivery = DELIVERED if self._inner is None else await self._inner.export(batch)
        if delivery.done:
            self._tally.add(batch)
        return delivery

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()


# --- stored progress ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionProgress:
    """How far the backfill of one selection got: its entry in ``backfill.json``."""

    since: int
    until: int
    jobsets: tuple[str, ...]
    #: Every selected evaluation with an ID at or below this was exported and acknowledged.
    last_eval_id: int = 0
    evals_done: int = 0
    complete: bool = False
    updated: str = ""


_INT64 = 2**63 - 1
#: Evaluation IDs and counts are PostgreSQL ``integer``s.
_INT32 = 2**31 - 1


def selection_progress_from_json(entry: object) -> SelectionProgress:
    """Validate one selection's stored entry (keys, types, ranges); entries of earlier versions lack some.

    Args:
        entry: the decoded JSON of the entry.

    Returns:
        The progress.

    Raises:
        ValueError: what is wrong, naming the key.
    """
    if not isinstance(entry, dict):
        raise ValueError("the entry is not a JSON object")
    known = {f.name for f in fields(SelectionProgress)}
    unknown = sorted(str(k) for k in entry if k not in known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (written by a newer hydra-otel?)")
    for key in ("since", "until", "jobsets"):
        if key not in entry:
            raise ValueError(f"key {key!r} is missing")
    jobsets = entry["jobsets"]
    if not isinstance(jobsets, list) or not all(isinstance(j, str) for j in jobsets):
        raise ValueError("'jobsets' is not a list of jobset names")
    for key, low, high in (("since", -_INT64, _INT64), ("until", -_INT64, _INT64),
                           ("last_eval_id", 0, _INT32), ("evals_done", 0, _INT32)):  # fmt: skip
        value = entry.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{key!r} is {json.dumps(value)[:30]}, not an integer from {low} to {high}")
    if not isinstance(entry.get("complete", False), bool) or not isinstance(entry.get("updated", ""), str):
        raise ValueError("'complete' is not true or false, or 'updated' is not a string")
    return SelectionProgress(**{**entry, "jobsets": tuple(jobsets)})


class BackfillProgressFile:
    """``<state dir>/backfill.json``: ``{"version": 1, "selections": {key: SelectionProgress}}`` (blocking).

    Every write replaces the whole file atomically (temporary file, fsync, rename, fsync of the
    directory), so a kill at any moment leaves the previous or the new version. What is read is
    validated: a file or entry hydra-otel cannot use stops the backfill with exit code 2 and a
    message saying so, never with a traceback.
    """

    VERSION: Final = 1

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PROGRESS_FILE
        self.failing = False  # the last checkpoint could not be written

    def _read(self) -> dict[str, Any]:
        fix = "repair or delete it (it holds only backfill progress)"
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": self.VERSION, "selections": {}}
        except (OSError, ValueError) as exc:
            raise BackfillError(f"cannot read {self.path}: {exc}; {fix}", 2) from None
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > self.VERSION:
            raise BackfillError(
                f"{self.path} has format {version}, written by a newer hydra-otel (this one reads "
                f"format {self.VERSION}): run that version, or {fix}",
                2,
            )
        if (
            not isinstance(data, dict)
            or version != self.VERSION
            or not isinstance(data.get("selections"), dict)
        ):
            raise BackfillError(f"{self.path} is not a backfill progress file; {fix}", 2)
        return data

    def load(self, key: str) -> SelectionProgress | None:
        """The stored progress of selection ``key``, if any.

        Raises:
            BackfillError: the file, or the selection's entry, is not valid (exit code 2).
        """
        entry = self._read()["selections"].get(key)
        if entry is None:
            return None
        try:
            return selection_progress_from_json(entry)
        except ValueError as exc:
            raise BackfillError(
                f"{self.path}: the progress of this selection is not valid: {exc}; run with --restart "
                "to start the selection again, or repair or delete the file",
                2,
            ) from None

    def store(self, key: str, progress: SelectionProgress) -> None:
        """:meth:`save`, for the first and last write of a run, which cannot wait for a later checkpoint.

        Raises:
            BackfillError: the write failed (exit code 2); the message says what to do.
        """
        try:
            self.save(key, progress)
        except OSError as exc:
            raise BackfillError(
                f"cannot write {self.path}: {exc.strerror or exc}; free space, or set --state-dir / "
                "HYDRA_OTEL_STATE_DIR to a writable directory, then run the same command again",
                2,
            ) from None

    def checkpoint(self, key: str, progress: SelectionProgress) -> bool:
        """:meth:`save`, except that a failed write (a full disk) is logged once per outage and returns False.

        The next checkpoint writes everything again, so nothing needs to be remembered; until then a
        run started anew resumes from the last progress written.
        """
        try:
            self.save(key, progress)
        except OSError as exc:
            if not self.failing:
                _log.warning(
                    "cannot write the backfill progress; exporting goes on and every checkpoint tries again",
                    extra={"path": str(self.path), "error": str(exc)},
                )
            self.failing = True
            return False
        if self.failing:
            _log.info("backfill progress written again", extra={"path": str(self.path)})
        self.failing = False
        return True

    def save(self, key: str, progress: SelectionProgress) -> None:
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
def exclusive(state_dir: Path) -> Iterator[None]:
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
def quiet_exporter_drop() -> Iterator[None]:
    """Hide the exporter's "shutdown deadline passed" line while a backfill runs (see the filter)."""
    logger, drop = logging.getLogger("hydra_otel.exporter"), _ExporterDropFilter()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# --- progress display -----------------------------------------------------------------------------------


def plural(count: int, noun: str) -> str:
    """``"1 build"``, ``"2 builds"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duration_text(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS``."""
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
        eta = duration_text((total - done) * elapsed / done_here)
    else:
        eta = "-:--:--"
    text = (
        f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:5.1f}%  "
        f"{done}/{total} evals  {rate:,.0f} spans/s  ETA {eta}"
    )
    return text + ("  (export failing, retrying)" if failing else "")


class Display:
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
