"""The evaluation stitcher: pairs ``eval_started`` with its closing event.

Theory of operation. Hydra tags every ``eval_*`` notification of one evaluator
run with an opaque correlation ID. The stitcher keeps one small record per
*open* attempt, keyed by ``(jobset ID, correlation ID)``, and turns the
notification stream into :data:`~hydra_otel.core.evals.Outcome` values, which
the resolver completes from the database. It does no I/O and reads no clock:
callers pass the wall-clock receive time (``at_ns``, span data) and a
monotonic ``now`` (seconds, for deadlines).

States of one attempt key, and the transition table :data:`TRANSITIONS`::

    ABSENT --eval_started--> OPEN --eval_added/cached/failed--> (gone, outcome)
    ABSENT --eval_added/cached/failed--> (gone, outcome without start: "orphan")
    OPEN   --eval_started--> OPEN (duplicate, ignored)
    OPEN   --deadline passed / newer eval_started of the jobset / capacity--> (gone, abandoned)

Rules that keep it bounded and honest:

* Hydra runs one evaluation per jobset at a time, so a new ``eval_started``
  for a jobset proves the previous open attempt of that jobset is dead.
* At most ``max_open`` attempts are open; the oldest is abandoned to make room.
* Every attempt has the same lifetime, so insertion order is deadline order
  and expiry looks only at the front of the table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from hydra_otel.core.evals import AddedEval, Attempt, AttemptKind
from hydra_otel.core.events import (
    BuildFinished,
    EvalAdded,
    EvalCached,
    EvalEvent,
    EvalFailed,
    EvalStarted,
    StepFinished,
)

#: What the stitcher emits for the resolver.
Outcome = AddedEval | Attempt

#: What flows from the stitcher task to the resolver: outcomes, and build events passed through.
Work = Outcome | StepFinished | BuildFinished

AttemptKey = tuple[int, str]

SUPERSEDED = "superseded by a newer evaluation of the jobset"
EXPIRED = "no closing notification before the abandon limit"
EVICTED = "too many open evaluations"


class State(enum.Enum):
    """Where one attempt key stands."""

    ABSENT = "absent"
    OPEN = "open"


@dataclass(slots=True)
class _Open:
    jobset_id: int
    correlation_id: str
    started_ns: int
    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StitchStatistics:
    """A snapshot of the stitcher's counters."""

    open: int
    opened: int
    closed: int
    orphans: int
    duplicates: int
    abandoned: dict[str, int] = field(default_factory=dict)


Handler = Callable[["Stitcher", EvalEvent, int, float], list[Outcome]]


class Stitcher:
    """Pairs evaluation notifications; see the module docstring."""

    def __init__(self, *, abandon_after: float, max_open: int) -> None:
        if abandon_after <= 0 or max_open < 1:
            raise ValueError("abandon_after must be > 0 and max_open >= 1")
        self._abandon_after = abandon_after
        self._max_open = max_open
        self._open: dict[AttemptKey, _Open] = {}
        self._by_jobset: dict[int, AttemptKey] = {}
        self._opened = self._closed = self._orphans = self._duplicates = 0
        self._abandoned: dict[str, int] = {}

    def state(self, jobset_id: int, correlation_id: str) -> State:
        """The state of one attempt key."""
        return State.OPEN if (jobset_id, correlation_id) in self._open else State.ABSENT

    def feed(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        """Apply one evaluation event received at ``at_ns`` (wall clock) / ``now`` (monotonic)."""
        handler = TRANSITIONS[(self.state(event.jobset_id, event.correlation_id), type(event))]
        return handler(self, event, at_ns, now)

    def open_jobsets(self) -> frozenset[int]:
        """Jobsets with an attempt that is still open."""
        return frozenset(self._by_jobset)

    def expire(self, now: float, now_ns: int) -> list[Outcome]:
        """Abandon every open attempt whose deadline is at or before ``now``."""
        out: list[Outcome] = []
        while self._open:
            key, rec = next(iter(self._open.items()))
            if rec.deadline > now:
                break
            out.append(self._abandon(key, now_ns, EXPIRED))
        return out

    def next_deadline(self) -> float | None:
        """The monotonic time of the earliest deadline, or None when nothing is open."""
        if not self._open:
            return None
        return next(iter(self._open.values())).deadline

    def statistics(self) -> StitchStatistics:
        """Counters since construction."""
        return StitchStatistics(
            open=len(self._open),
            opened=self._opened,
            closed=self._closed,
            orphans=self._orphans,
            duplicates=self._duplicates,
            abandoned=dict(self._abandoned),
        )

    # Transition handlers. Each is called only from its row of TRANSITIONS.

    def _on_start(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        out: list[Outcome] = []
        previous = self._by_jobset.get(event.jobset_id)
        if previous is not None:
            out.append(self._abandon(previous, at_ns, SUPERSEDED))
        if len(self._open) >= self._max_open:
            out.append(self._abandon(next(iter(self._open)), at_ns, EVICTED))
        key = (event.jobset_id, event.correlation_id)
        self._open[key] = _Open(event.jobset_id, event.correlation_id, at_ns, now + self._abandon_after)
        self._by_jobset[event.jobset_id] = key
        self._opened += 1
        return out

    def _on_duplicate_start(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        self._duplicates += 1
        return []

    def _on_close(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        rec = self._pop((event.jobset_id, event.correlation_id))
        self._closed += 1
        return [_outcome(event, rec.started_ns, at_ns)]

    def _on_orphan_close(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        self._orphans += 1
        return [_outcome(event, None, at_ns)]

    def _pop(self, key: AttemptKey) -> _Open:
        rec = self._open.pop(key)
        if self._by_jobset.get(rec.jobset_id) == key:
            del self._by_jobset[rec.jobset_id]
        return rec

    def _abandon(self, key: AttemptKey, at_ns: int, reason: str) -> Attempt:
        rec = self._pop(key)
        self._abandoned[reason] = self._abandoned.get(reason, 0) + 1
        return Attempt(
            kind=AttemptKind.ABANDONED,
            jobset_id=rec.jobset_id,
            correlation_id=rec.correlation_id,
            started_ns=rec.started_ns,
            ended_ns=max(at_ns, rec.started_ns),
            abandon_reason=reason,
        )


def _outcome(event: EvalEvent, started_ns: int | None, at_ns: int) -> Outcome:
    if isinstance(event, EvalAdded):
        return AddedEval(
            eval_id=event.eval_id,
            jobset_id=event.jobset_id,
            correlation_id=event.correlation_id,
            started_ns=started_ns,
            ended_ns=at_ns,
        )
    kind = AttemptKind.CACHED if isinstance(event, EvalCached) else AttemptKind.FAILED
    return Attempt(
        kind=kind,
        jobset_id=event.jobset_id,
        correlation_id=event.correlation_id,
        started_ns=started_ns,
        ended_ns=at_ns if started_ns is None else max(at_ns, started_ns),
        previous_eval_id=event.previous_eval_id if isinstance(event, EvalCached) else None,
    )


TRANSITIONS: dict[tuple[State, type[EvalEvent]], Handler] = {
    (State.ABSENT, EvalStarted): Stitcher._on_start,
    (State.OPEN, EvalStarted): Stitcher._on_duplicate_start,
    (State.OPEN, EvalAdded): Stitcher._on_close,
    (State.OPEN, EvalCached): Stitcher._on_close,
    (State.OPEN, EvalFailed): Stitcher._on_close,
    (State.ABSENT, EvalAdded): Stitcher._on_orphan_close,
    (State.ABSENT, EvalCached): Stitcher._on_orphan_close,
    (State.ABSENT, EvalFailed): Stitcher._on_orphan_close,
}
