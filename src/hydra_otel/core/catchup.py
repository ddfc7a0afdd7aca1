"""Catch-up: what Hydra recorded that the live notifications may have missed.

Theory of operation. Notifications are ephemeral, Hydra's tables are durable.
The catch-up task scans the tables from the last *marks* (processed-up-to
points, see :class:`Marks`) and feeds what it finds through the same path as
live events; output is deterministic and de-duplicated, so overlap with the
live stream is harmless. After each page of work it sends a
:class:`Checkpoint`; the exporter stores the checkpoint's marks only once the
OTLP endpoint acknowledged every span before it, so a crash re-exports at most
the window since the last stored marks.

Evaluation failures leave no JobsetEval row and no correlation ID in the
database. :func:`jobset_failures` recognises them from ``jobsets`` rows whose
``lastcheckedtime`` moved past the mark: a fetch error sets ``fetcherrormsg``;
an evaluator error sets ``errormsg`` with ``errortime = lastcheckedtime``
(a successful evaluation also sets ``errortime``, but to its start time, and
``errormsg`` to ''). Attempts seen live update the jobset marks, so the same
failure is not reported twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra_otel.core.evals import Attempt, AttemptKind
from hydra_otel.core.spans import seconds_ns


@dataclass(frozen=True, slots=True, kw_only=True)
class Marks:
    """Processed-up-to points in Hydra's tables.

    Attributes:
        eval_id: every JobsetEval with an ID at or below this was exported.
        stop_time: every build and step that stopped before this Unix second was exported.
        jobsets: per jobset ID, the ``lastcheckedtime`` whose outcome was exported.
    """

    eval_id: int = 0
    stop_time: int = 0
    jobsets: dict[int, int] = field(default_factory=dict)

    def merged(self, other: Marks) -> Marks:
        """Marks covering both; marks never move backwards."""
        jobsets = dict(self.jobsets)
        for k, v in other.jobsets.items():
            jobsets[k] = max(v, jobsets.get(k, 0))
        return Marks(
            eval_id=max(self.eval_id, other.eval_id),
            stop_time=max(self.stop_time, other.stop_time),
            jobsets=jobsets,
        )


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A marker in the pipeline: once every span before it is acknowledged, ``marks`` can be stored."""

    marks: Marks


@dataclass(frozen=True, slots=True, kw_only=True)
class JobsetRow:
    """The ``jobsets`` columns catch-up reads."""

    jobset_id: int
    last_checked: int | None
    error_msg: str | None
    error_time: int | None
    fetch_error_msg: str | None


def jobset_failures(
    rows: list[JobsetRow],
    known: dict[int, int],
    open_jobsets: frozenset[int] = frozenset(),
    until: int | None = None,
) -> tuple[list[Attempt], dict[int, int]]:
    """Failed attempts recorded since ``known`` (jobset ID -> lastcheckedtime already handled).

    ``known`` starts (first start) with every existing jobset at the start time, so history is
    a backfill's job; a jobset missing from it was created since and all its checks count.
    Jobsets in ``open_jobsets`` have an attempt the live stitcher is still following: it will
    report how that ended (an evaluator crash shows up there as abandoned), so they are left
    alone, and their mark does not move. So are checks after ``until`` (the database's clock minus
    the scan lag): their ``eval_failed`` may still be on its way through the live path, which has not
    opened the attempt yet when it lags behind; the next scan reports them if it did not.
    Returns the attempts and the updated ``known`` mapping.
    """
    out: list[Attempt] = []
    updated = dict(known)
    for r in rows:
        if r.last_checked is None or r.jobset_id in open_jobsets:
            continue
        if until is not None and r.last_checked > until:
            continue
        seen = known.get(r.jobset_id, 0)
        updated[r.jobset_id] = max(r.last_checked, seen)
        if r.last_checked <= seen:
            continue
        failed = bool(r.fetch_error_msg) or (bool(r.error_msg) and r.error_time == r.last_checked)
        if failed:
            out.append(
                Attempt(
                    kind=AttemptKind.FAILED,
                    jobset_id=r.jobset_id,
                    # No correlation ID survives in the database; the check time identifies the attempt.
                    correlation_id=f"lastchecked-{r.last_checked}",
                    started_ns=None,
                    ended_ns=seconds_ns(r.last_checked),
                )
            )
    return out, updated


# --- stored form ------------------------------------------------------------------------------------------

#: Marks are Hydra IDs and Unix seconds, PostgreSQL ``integer`` columns; a value outside is no mark.
MARK_MAX = 2**31 - 1
_MARK_KEYS = ("eval_id", "stop_time", "jobsets")


def marks_to_json(marks: Marks) -> dict[str, object]:
    """The JSON object :func:`marks_from_json` reads back (jobset IDs become string keys)."""
    jobsets = {str(k): v for k, v in sorted(marks.jobsets.items())}
    return {"eval_id": marks.eval_id, "stop_time": marks.stop_time, "jobsets": jobsets}


def marks_from_json(data: object) -> Marks:
    """Validate stored marks: exactly the known keys, each an integer from 0 to :data:`MARK_MAX`.

    A mark that is wrong would make catch-up scan from a wrong place (all of history, or
    nothing), so nothing is guessed: the caller refuses to start with the reason.

    Args:
        data: the decoded JSON of stored marks.

    Returns:
        The marks.

    Raises:
        ValueError: what is wrong, naming the key, in words an operator can act on.
    """
    if not isinstance(data, dict):
        raise ValueError(f"the marks are {_kind(data)}, not a JSON object")
    unknown = sorted(str(k) for k in data if k not in _MARK_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (written by a newer hydra-otel?)")
    missing = [k for k in _MARK_KEYS if k not in data]
    if missing:
        raise ValueError(f"key {missing[0]!r} is missing")
    jobsets = data["jobsets"]
    if not isinstance(jobsets, dict):
        raise ValueError(f"'jobsets' is {_kind(jobsets)}, not a JSON object")
    checked: dict[int, int] = {}
    for key, value in jobsets.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"'jobsets' has the key {str(key)[:20]!r}, not a jobset ID")
        checked[_mark(int(key), f"jobset ID {key}")] = _mark(value, f"'jobsets'[{key}]")
    return Marks(
        eval_id=_mark(data["eval_id"], "'eval_id'"),
        stop_time=_mark(data["stop_time"], "'stop_time'"),
        jobsets=checked,
    )


def _mark(value: object, what: str) -> int:
    # bool is an int subclass, but a stored `true` is no mark.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} is {_kind(value)}, not an integer")
    if not 0 <= value <= MARK_MAX:
        raise ValueError(f"{what} is {value}, outside 0..{MARK_MAX}")
    return value


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
