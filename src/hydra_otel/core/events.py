"""Typed events, one per Hydra notification channel.

Theory of operation: the listener hands ``(channel, payload)`` pairs to
:func:`hydra_otel.core.parse.parse`, which returns one of the frozen event
classes below or raises :class:`~hydra_otel.errors.PayloadError`. Events carry
only what the payload says; everything else is read from Hydra's tables later.
Receive times are not part of an event: they are data from the I/O edge and
travel beside it (see :class:`Received`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Channels whose payload carries data (sent by hydra-eval-jobset and the queue runner).
EVAL_STARTED = "eval_started"
EVAL_ADDED = "eval_added"
EVAL_CACHED = "eval_cached"
EVAL_FAILED = "eval_failed"
BUILD_QUEUED = "build_queued"
BUILD_STARTED = "build_started"
STEP_STARTED = "step_started"
STEP_FINISHED = "step_finished"
BUILD_FINISHED = "build_finished"
CACHED_BUILD_FINISHED = "cached_build_finished"
CACHED_BUILD_QUEUED = "cached_build_queued"

DATA_CHANNELS: tuple[str, ...] = (
    EVAL_STARTED,
    EVAL_ADDED,
    EVAL_CACHED,
    EVAL_FAILED,
    BUILD_QUEUED,
    BUILD_STARTED,
    STEP_STARTED,
    STEP_FINISHED,
    BUILD_FINISHED,
    CACHED_BUILD_FINISHED,
    CACHED_BUILD_QUEUED,
)

# Payload-less channels fired by Hydra's database triggers: "something changed, look at the tables".
TRIGGER_CHANNELS: tuple[str, ...] = (
    "builds_added",
    "builds_restarted",
    "builds_cancelled",
    "builds_deleted",
    "builds_bumped",
    "jobsets_added",
    "jobsets_deleted",
    "jobset_shares_changed",
    "jobset_scheduling_changed",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalStarted:
    """``eval_started``: an evaluator process began checking a jobset."""

    correlation_id: str
    jobset_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalAdded:
    """``eval_added``: the evaluation committed JobsetEval row ``eval_id``."""

    correlation_id: str
    jobset_id: int
    eval_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalCached:
    """``eval_cached``: inputs unchanged since ``previous_eval_id``; no new row."""

    correlation_id: str
    jobset_id: int
    previous_eval_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalFailed:
    """``eval_failed``: fetching or evaluating failed; the reason is in ``jobsets``."""

    correlation_id: str
    jobset_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildQueued:
    """``build_queued``: a new build row was inserted (a hint; not stored by Hydra)."""

    build_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildStarted:
    """``build_started``: a step for this build was dispatched (a hint)."""

    build_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StepStarted:
    """``step_started``: step ``step_nr`` of ``build_id`` is now busy."""

    build_id: int
    step_nr: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFinished:
    """``step_finished``: the final step row is written; ``log_path`` may be unknown."""

    build_id: int
    step_nr: int
    log_path: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildFinished:
    """``build_finished`` (one chunk): ``build_id`` finished, and so did ``dependents``.

    Hydra splits a long dependents list into several notifications that each
    repeat ``build_id``; every chunk parses to one event. ``dependents`` never
    contains ``build_id`` itself and keeps the payload's order.
    """

    build_id: int
    dependents: tuple[int, ...]
    #: The stop time the catch-up read in the ``builds`` row (None from a notification, whose
    #: payload is untrusted). The catch-up recorded ("build", ID, stop time) as handled when it
    #: sent this work, so the resolver renders it whatever that shared memory says.
    stop_time: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedBuildFinished:
    """``cached_build_finished``: eval ``eval_id`` contains the finished older build ``build_id``."""

    eval_id: int
    build_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedBuildQueued:
    """``cached_build_queued``: eval ``eval_id`` contains the still-queued older build ``build_id``."""

    eval_id: int
    build_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TableChanged:
    """A payload-less trigger channel fired (``builds_cancelled``, ``builds_restarted``, ...)."""

    channel: str


HydraEvent = (
    EvalStarted
    | EvalAdded
    | EvalCached
    | EvalFailed
    | BuildQueued
    | BuildStarted
    | StepStarted
    | StepFinished
    | BuildFinished
    | CachedBuildFinished
    | CachedBuildQueued
    | TableChanged
)

EvalEvent = EvalStarted | EvalAdded | EvalCached | EvalFailed


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """An event with the wall-clock time (ns since the epoch) the listener received it."""

    event: HydraEvent
    at_ns: int
