"""The evaluation stitcher: pairs ``eval_started`` with its closing event.

Theory of operation. Hydra tags every ``eval_*`` notification of one evaluator
run with an opaque correlation ID. The stitcher keeps one small record per
*open* attempt, keyed by ``(jobset ID, correlation ID)``, and turns the
notification stream into :data:`~hydra_otel.core.evals.Outcome` values, which
the resolver completes from the database. It does no I/O and reads no clock:
callers pass the wall-clock receive time (``at_ns``, span data) and a
monotonic ``now`` (seconds, for deadlines).

States of one attempt key, and the transition table :data:`TRANSITIONS`::

    ABSENT --eval_started--> OPEN --eval_added/cached/failed--> CLOSED (outcome)
    ABSENT --eval_added/cached/failed--> CLOSED (outcome without start: "orphan")
    CLOSED --eval_added/cached/failed--> CLOSED (another orphan outcome; exact repeats are filtered later)
    CLOSED --eval_started--> CLOSED (late start: ignored and counted, never opened)
    OPEN   --eval_started--> OPEN (duplicate, ignored)
    OPEN   --deadline passed / eval_started of a newer run of the jobset--> ABSENT (abandoned)
    ABSENT --eval_started while another attempt of the jobset is open in the same run--> CONTESTED
    CONTESTED --eval_added/cached/failed--> CLOSED (outcome with its start; the jobset's other
                                                    open attempt of that run is dropped, counted)
    CONTESTED --deadline passed--> ABSENT (dropped, already counted)
    CLOSED --closed_ttl passed, or forgotten to stay within max_closed--> ABSENT

NOTIFY is not ordered across connections, so ``eval_added`` can overtake its
``eval_started``; the CLOSED state keeps that start (or a forged one) from
opening an attempt that could only end as a false "abandoned".

Any database role can NOTIFY, so ``eval_started`` payloads are not trusted.
Rules that keep the stitcher bounded and honest:

* The caller says whether the jobset exists in Hydra's ``jobsets`` table; a
  start for one that does not is rejected. Only real jobsets take state.
* Hydra runs one evaluation per jobset at a time, and hydra-evaluator writes
  ``jobsets.starttime`` (committed) before it spawns the process that sends
  ``eval_started``, and clears it after the process exits. So a new start
  proves the jobset's open attempt dead only when the row shows a *new run*:
  a ``starttime`` that is set and differs from the one read when the open
  attempt started. Then the dead one is reported abandoned while the jobset's
  supersession budget lasts (a token bucket: a burst of ``SUPERSEDE_BURST``,
  one more every ``SUPERSEDE_REFILL`` seconds); beyond it, it is dropped and
  counted, so a flood of starts cannot become a flood of error spans.
* A start the row does not show as a new run (same ``starttime``, or none:
  no evaluation running) cannot tell a forged start from the real one, so it
  takes nothing from the open attempt: it is *contested* (counted), kept
  aside with its start time, never reported abandoned. Whichever of the two
  gets a closing event the rows vouch for is the real one: a contested start
  that closes pairs with its close, and the jobset's open attempt of the
  same run is dropped (counted). At most one attempt per jobset is open.
  When the rows cannot be read, a new start supersedes as before.
* At most ``max_open`` attempts are open; a start beyond that is rejected
  (counted), never an eviction that would report a live evaluation abandoned.
* Every attempt has the same lifetime, so insertion order is deadline order
  and expiry looks only at the front of the table; the same holds for the
  CLOSED memory.

``eval_cached`` and ``eval_failed`` are not trusted either: each would otherwise become an
attempt span. Hydra sends them in the transaction that updates the jobset's row
(``lastcheckedtime``; ``fetcherrormsg`` for a fetch error; ``errormsg`` with
``errortime = lastcheckedtime`` for any other failure; ``eval_cached`` clears
``fetcherrormsg`` and names the jobset's latest JobsetEval). The caller reads those rows
(:class:`ClosingCheck`) and the stitcher acts on the notification only if:

* the jobset exists; for ``eval_cached``, the named JobsetEval exists and is the jobset's;
* the jobset row shows that outcome (a failure as above, or no fetch error for a cached one)
  for a check (``lastcheckedtime``) newer than the last one an attempt of the jobset was
  reported for: one evaluation per jobset runs at a time and each ends with one row update,
  so a check is reported once, however many notifications name it. Rows are read when the
  stitcher gets to a notification, not when it was sent, so a forged one sent just before
  Hydra's commit can see the new row first; a close that pairs with its open attempt may
  therefore report a check once more after an orphan close did;
* or the row does not show that outcome but changed since the stitcher last read it for a
  closing event (the first read of a jobset counts as a change): a later check that
  committed before this notification was handled may have overwritten the outcome it
  names. That is believed once per change, without claiming the check read.

So each change of a jobset's row lets at most three closing events through, however many
notifications name the jobset.

``eval_added`` is resolved against its JobsetEval row later, but paired with an open attempt
it adds one thing only the notifications know: an "evaluator run" span. So a JobsetEval of
another jobset is rejected, and per jobset an evaluator run is reported only for a JobsetEval
newer than the last one reported (Hydra writes each JobsetEval once, with increasing IDs);
otherwise the attempt closes without its start, which renders nothing new.

When the rows cannot be read (database unreachable), closing events and pairings are trusted
within a global budget (``UNVERIFIED_BURST``, one more every ``UNVERIFIED_REFILL`` seconds).

Everything not opened or not reported is counted by reason
(:attr:`StitchStatistics.rejected`) and handed to the caller once through
:meth:`Stitcher.take_rejections`, for a log line.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
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

# Why an eval_started was not opened, or an attempt was not reported (the counter's label).
#: The jobset is not in Hydra's ``jobsets`` table.
UNKNOWN_JOBSET = "unknown_jobset"
#: The attempt already closed (a start that lost the race with its closing event, or a forged one).
ALREADY_CLOSED = "already_closed"
#: ``max_open`` attempts are open.
TOO_MANY_OPEN = "too_many_open"
#: A superseded attempt beyond the jobset's supersession budget: dropped, not reported abandoned.
SUPERSEDED_UNREPORTED = "superseded_unreported"
#: A start the jobset's row does not show as a new run while an attempt of the jobset is open:
#: kept aside, paired only with a closing event the rows vouch for.
CONTESTED_START = "contested_start"
#: An open attempt dropped because a contested start of the same run got the closing event.
LOST_CONTEST = "lost_contest"

#: ``eval_cached`` / ``eval_failed`` for a jobset that is not in Hydra's ``jobsets`` table (same label).
#: ``eval_cached`` naming a JobsetEval that does not exist.
UNKNOWN_PREVIOUS_EVAL = "unknown_previous_eval"
#: ``eval_cached`` naming a JobsetEval of another jobset.
PREVIOUS_EVAL_OF_OTHER_JOBSET = "previous_eval_of_other_jobset"
#: The jobset row does not show the outcome the notification claims (or no check at all).
ROW_DISAGREES = "row_disagrees"
#: The jobset row's check was already reported by an earlier closing event.
CHECK_ALREADY_REPORTED = "check_already_reported"
#: ``eval_added`` naming a JobsetEval of another jobset.
EVAL_OF_OTHER_JOBSET = "eval_of_other_jobset"
#: ``eval_added`` paired with an open attempt, for a JobsetEval whose evaluator run was already
#: reported (or, rows unreadable, beyond the budget): the attempt is closed without a run span.
RUN_ALREADY_REPORTED = "run_already_reported"
#: The rows could not be read and the budget for unverified closing events is spent.
UNVERIFIED_OVER_BUDGET = "unverified_over_budget"

#: Seconds a jobset whose attempt outcome was handed on still counts as followed live (the
#: resolver records the check it rendered well within this).
IN_FLIGHT_GRACE = 30.0

#: Closing events accepted unverified (rows unreadable) in a burst, all jobsets together ...
UNVERIFIED_BURST = 10
#: ... and the seconds after which one more may be.
UNVERIFIED_REFILL = 60.0

#: Superseded attempts of one jobset reported abandoned in a burst ...
SUPERSEDE_BURST = 3
#: ... and the seconds after which one more may be (hydra-evaluator re-checks a jobset every
#: few minutes at most; a faster stream of starts for one jobset is not Hydra's).
SUPERSEDE_REFILL = 60.0


class State(enum.Enum):
    """Where one attempt key stands."""

    ABSENT = "absent"
    OPEN = "open"
    CONTESTED = "contested"
    CLOSED = "closed"


@dataclass(slots=True)
class _Open:
    jobset_id: int
    correlation_id: str
    started_ns: int
    deadline: float
    #: ``jobsets.starttime`` read with the start: the evaluator run it belongs to (None: unknown).
    run: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobsetCheck:
    """The ``jobsets`` columns Hydra writes with ``eval_cached`` / ``eval_failed``."""

    last_checked: int | None
    #: ``errormsg`` is neither NULL nor empty.
    has_error: bool
    error_time: int | None
    #: ``fetcherrormsg`` is neither NULL nor empty.
    has_fetch_error: bool
    #: ``starttime``: set by hydra-evaluator while an evaluation of the jobset runs, else None.
    start_time: int | None = None

    def shows_failure(self) -> bool:
        """The last check failed: a fetch error, or an error recorded at the check's time."""
        if self.last_checked is None:
            return False
        return self.has_fetch_error or (self.has_error and self.error_time == self.last_checked)

    def shows_cached(self) -> bool:
        """The last check may have found its inputs unchanged (it left no fetch error)."""
        return self.last_checked is not None and not self.has_fetch_error


class Unchecked(enum.Enum):
    """A closing event fed without a :class:`ClosingCheck`, and why."""

    #: The caller does not check rows (unit tests, tools): the event is trusted.
    TRUSTED = "trusted"
    #: The rows could not be read (database unreachable): trusted within a global budget.
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosingCheck:
    """What Hydra's rows said about an evaluation event's jobset when it arrived."""

    #: The jobset's row, None if there is none.
    jobset: JobsetCheck | None
    #: The jobset ID of the JobsetEval the event names (``eval_cached``: the previous one;
    #: ``eval_added``: the new one), None if it does not exist.
    eval_jobset: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StitchStatistics:
    """A snapshot of the stitcher's counters."""

    open: int
    opened: int
    closed: int
    orphans: int
    duplicates: int
    abandoned: dict[str, int] = field(default_factory=dict)
    #: Starts not opened and attempts not reported, by reason (the constants above).
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Events the stitcher did not act on (or attempts it did not report) for one reason.

    ``count`` of them since the last :meth:`Stitcher.take_rejections`; the IDs are the first one's.
    """

    reason: str
    count: int
    jobset_id: int
    correlation_id: str


Handler = Callable[["Stitcher", EvalEvent, int, float], list[Outcome]]


class Stitcher:
    """Pairs evaluation notifications; see the module docstring."""

    def __init__(
        self,
        *,
        abandon_after: float,
        max_open: int,
        closed_ttl: float | None = None,
        max_closed: int | None = None,
    ) -> None:
        """Args:
        abandon_after: seconds an attempt stays open without a closing event.
        max_open: bound on open attempts.
        closed_ttl: seconds a closed attempt is remembered (default ``abandon_after``).
        max_closed: bound on remembered closed attempts (default ``max_open``).
        """
        if abandon_after <= 0 or max_open < 1:
            raise ValueError("abandon_after must be > 0 and max_open >= 1")
        self._abandon_after = abandon_after
        self._max_open = max_open
        self._closed_ttl = abandon_after if closed_ttl is None else closed_ttl
        self._max_closed = max_open if max_closed is None else max(1, max_closed)
        self._open: dict[AttemptKey, _Open] = {}
        self._by_jobset: dict[int, AttemptKey] = {}
        # Starts kept aside while another attempt of their jobset's run is open (deadline order).
        self._contested: OrderedDict[AttemptKey, _Open] = OrderedDict()
        self._closed: OrderedDict[AttemptKey, float] = OrderedDict()
        self._tokens: dict[int, tuple[float, float]] = {}  # jobset -> (supersession tokens, as of)
        # Global budget for closing events whose rows could not be read: (tokens, as of).
        self._unverified: tuple[float, float] | None = None
        # jobset -> (lastcheckedtime of the last check reported, whether by a close that paired with
        # its start); only jobsets with a row get here.
        self._reported_checks: dict[int, tuple[int, bool]] = {}
        # jobset -> the stitcher's clock when an attempt outcome of it was handed on (oldest first).
        self._in_flight: dict[int, float] = {}
        self._now = float("-inf")  # the latest monotonic time fed
        # jobset -> the newest lastcheckedtime read for a closing event (real jobsets only).
        self._seen_checks: dict[int, int] = {}
        # jobset -> the highest JobsetEval ID an evaluator run was reported for (real jobsets only).
        self._runs_reported: dict[int, int] = {}
        self._opened = self._closed_count = self._orphans = self._duplicates = 0
        self._abandoned: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._pending: dict[str, Rejection] = {}  # by reason: bounded by the number of reasons
        # The current feed()'s verdict on the event's jobset, read by _on_start: every handler in
        # TRANSITIONS has the same signature, and only that one needs it.
        self._jobset_known = True
        self._check: ClosingCheck | Unchecked = Unchecked.TRUSTED  # likewise, the current check

    def state(self, jobset_id: int, correlation_id: str) -> State:
        """The state of one attempt key."""
        key = (jobset_id, correlation_id)
        if key in self._open:
            return State.OPEN
        if key in self._contested:
            return State.CONTESTED
        return State.CLOSED if key in self._closed else State.ABSENT

    def feed(
        self,
        event: EvalEvent,
        at_ns: int,
        now: float,
        *,
        jobset_known: bool = True,
        check: ClosingCheck | Unchecked = Unchecked.TRUSTED,
    ) -> list[Outcome]:
        """Apply one evaluation event received at ``at_ns`` (wall clock) / ``now`` (monotonic).

        ``jobset_known`` says whether the event's jobset is in Hydra's ``jobsets`` table; it
        matters only for a start. ``check`` is what the rows said about the event (for a start,
        the jobset's row with its ``starttime``), or why there is none; see the module docstring.
        """
        self._forget_closed(now)
        self._forget_contested(now)
        self._now = max(self._now, now)
        self._jobset_known = jobset_known
        self._check = check
        if isinstance(event, EvalCached | EvalFailed):
            reason = self._closing_verdict(event, check, now)
            if reason is not None:
                return self._reject(reason, event.jobset_id, event.correlation_id)
        elif isinstance(event, EvalAdded):
            reason = self._added_verdict(event, check, now)
            if reason == RUN_ALREADY_REPORTED:  # closes the attempt, without its live start
                self._take((event.jobset_id, event.correlation_id))
                self._reject(reason, event.jobset_id, event.correlation_id)
                return self._handed_on(self._on_orphan_close(event, at_ns, now))
            if reason is not None:
                return self._reject(reason, event.jobset_id, event.correlation_id)
        handler = TRANSITIONS[(self.state(event.jobset_id, event.correlation_id), type(event))]
        return self._handed_on(handler(self, event, at_ns, now))

    def open_jobsets(self) -> frozenset[int]:
        """Jobsets the live path is still following: an attempt is open, or an attempt's outcome
        was handed on less than ``IN_FLIGHT_GRACE`` seconds (of the stitcher's clock) ago.

        The catch-up skips these jobsets' checks. Without the grace period, a scan between the
        stitcher closing an attempt and the resolver recording its check would report the same
        failure again, as a second trace."""
        while self._in_flight:
            jobset, at = next(iter(self._in_flight.items()))
            if at + IN_FLIGHT_GRACE > self._now and len(self._in_flight) <= self._max_open:
                break
            del self._in_flight[jobset]
        return frozenset(self._by_jobset) | frozenset(self._in_flight)

    def expire(self, now: float, now_ns: int) -> list[Outcome]:
        """Abandon every open attempt whose deadline is at or before ``now``."""
        self._now = max(self._now, now)
        self._forget_contested(now)
        out: list[Outcome] = []
        while self._open:
            key, rec = next(iter(self._open.items()))
            if rec.deadline > now:
                break
            out.append(self._abandon(self._pop(key), now_ns, EXPIRED))
        return self._handed_on(out)

    def next_deadline(self) -> float | None:
        """The monotonic time of the earliest deadline, or None when nothing is open."""
        if not self._open:
            return None
        return next(iter(self._open.values())).deadline

    def take_rejections(self) -> list[Rejection]:
        """Rejections since the last call, one entry per reason (all are also in :meth:`statistics`)."""
        out = list(self._pending.values())
        self._pending.clear()
        return out

    def statistics(self) -> StitchStatistics:
        """Counters since construction."""
        return StitchStatistics(
            open=len(self._open),
            opened=self._opened,
            closed=self._closed_count,
            orphans=self._orphans,
            duplicates=self._duplicates,
            abandoned=dict(self._abandoned),
            rejected=dict(self._rejected),
        )

    # Transition handlers. Each is called only from its row of TRANSITIONS.

    def _on_start(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        if not self._jobset_known:
            return self._reject(UNKNOWN_JOBSET, event.jobset_id, event.correlation_id)
        out: list[Outcome] = []
        row = self._check.jobset if isinstance(self._check, ClosingCheck) else None
        run = _run_of(row, at_ns)
        previous = self._by_jobset.get(event.jobset_id)
        if previous is not None and row is not None:
            same_run = run is not None and run == self._open[previous].run
            if row.start_time is None or same_run:
                return self._contest(event, at_ns, now, run)
        if previous is not None:
            dead = self._pop(previous)
            if self._take_token(event.jobset_id, now):
                out.append(self._abandon(dead, at_ns, SUPERSEDED))
            else:
                self._reject(SUPERSEDED_UNREPORTED, dead.jobset_id, dead.correlation_id)
        elif len(self._open) >= self._max_open:
            return self._reject(TOO_MANY_OPEN, event.jobset_id, event.correlation_id)
        key = (event.jobset_id, event.correlation_id)
        self._open[key] = _Open(event.jobset_id, event.correlation_id, at_ns, now + self._abandon_after, run)
        self._by_jobset[event.jobset_id] = key
        self._opened += 1
        return out

    def _contest(self, event: EvalEvent, at_ns: int, now: float, run: int | None) -> list[Outcome]:
        """Keep a start aside that the row does not show as a new run (see the module docstring)."""
        key = (event.jobset_id, event.correlation_id)
        self._contested[key] = _Open(
            event.jobset_id, event.correlation_id, at_ns, now + self._abandon_after, run
        )
        while len(self._contested) > self._max_open:
            self._contested.popitem(last=False)
        return self._reject(CONTESTED_START, event.jobset_id, event.correlation_id)

    def _on_contested_close(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        """The rows vouched for this close, so its start was real. The jobset's open attempt of the
        same recorded run was not; one of an unknown or other run has ended unannounced."""
        key = (event.jobset_id, event.correlation_id)
        rec = self._contested.pop(key)
        out: list[Outcome] = []
        rival = self._by_jobset.get(event.jobset_id)
        if rival is not None:
            other = self._pop(rival)
            if rec.run is not None and other.run == rec.run:
                self._reject(LOST_CONTEST, other.jobset_id, other.correlation_id)
            elif self._take_token(event.jobset_id, now):
                out.append(self._abandon(other, at_ns, SUPERSEDED))
            else:
                self._reject(SUPERSEDED_UNREPORTED, other.jobset_id, other.correlation_id)
        self._remember_closed(key, now)
        self._closed_count += 1
        return [*out, _outcome(event, rec.started_ns, at_ns)]

    def _on_duplicate_start(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        self._duplicates += 1
        return []

    def _on_late_start(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        return self._reject(ALREADY_CLOSED, event.jobset_id, event.correlation_id)

    def _on_close(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        key = (event.jobset_id, event.correlation_id)
        rec = self._pop(key)
        self._remember_closed(key, now)
        self._closed_count += 1
        return [_outcome(event, rec.started_ns, at_ns)]

    def _on_orphan_close(self, event: EvalEvent, at_ns: int, now: float) -> list[Outcome]:
        self._remember_closed((event.jobset_id, event.correlation_id), now)
        self._orphans += 1
        return [_outcome(event, None, at_ns)]

    def _closing_verdict(
        self, event: EvalCached | EvalFailed, check: ClosingCheck | Unchecked, now: float
    ) -> str | None:
        """Why the closing event is not acted on, or None; records the check it reports."""
        if check is Unchecked.TRUSTED:
            return None
        if check is Unchecked.UNREADABLE:
            return None if self._take_unverified(now) else UNVERIFIED_OVER_BUDGET
        row = check.jobset
        if row is None:
            return UNKNOWN_JOBSET
        if isinstance(event, EvalCached):
            if check.eval_jobset is None:
                return UNKNOWN_PREVIOUS_EVAL
            if check.eval_jobset != event.jobset_id:
                return PREVIOUS_EVAL_OF_OTHER_JOBSET
            consistent = row.shows_cached()
        else:
            consistent = row.shows_failure()
        if row.last_checked is None:
            return ROW_DISAGREES
        seen = self._seen_checks.get(event.jobset_id)
        self._seen_checks[event.jobset_id] = max(row.last_checked, seen or row.last_checked)
        if not consistent:
            # The row may have moved on: a later check of the jobset committed before this
            # notification was handled overwrote the outcome it names. Believe that once per
            # change of the row seen here; the check read is not this event's to claim.
            return None if seen is None or row.last_checked > seen else ROW_DISAGREES
        paired = self.state(event.jobset_id, event.correlation_id) in (State.OPEN, State.CONTESTED)
        reported, by_paired = self._reported_checks.get(event.jobset_id, (-(2**63), False))
        if row.last_checked < reported or (row.last_checked == reported and (by_paired or not paired)):
            return CHECK_ALREADY_REPORTED
        self._reported_checks[event.jobset_id] = (row.last_checked, paired)
        return None

    def _added_verdict(self, event: EvalAdded, check: ClosingCheck | Unchecked, now: float) -> str | None:
        """Why an ``eval_added`` is not acted on (or not paired with its start), or None."""
        if isinstance(check, ClosingCheck) and check.eval_jobset not in (None, event.jobset_id):
            return EVAL_OF_OTHER_JOBSET
        state = self.state(event.jobset_id, event.correlation_id)
        if state not in (State.OPEN, State.CONTESTED) or check is Unchecked.TRUSTED:
            return None
        # Pairs with an open attempt: an "evaluator run" span. Hydra's evaluator writes each
        # JobsetEval once, and a jobset's evaluations get increasing IDs: one run per evaluation.
        if event.eval_id <= self._runs_reported.get(event.jobset_id, 0):
            return RUN_ALREADY_REPORTED
        if check is Unchecked.UNREADABLE:
            return None if self._take_unverified(now) else RUN_ALREADY_REPORTED
        if check.eval_jobset is not None:  # a made-up ID must not hold back the jobset's real ones
            self._runs_reported[event.jobset_id] = event.eval_id
        return None

    def _take_unverified(self, now: float) -> bool:
        tokens, since = self._unverified or (float(UNVERIFIED_BURST), now)
        tokens = min(float(UNVERIFIED_BURST), tokens + max(0.0, now - since) / UNVERIFIED_REFILL)
        ok = tokens >= 1.0
        self._unverified = (tokens - 1.0 if ok else tokens, now)
        return ok

    # Bookkeeping.

    def _handed_on(self, out: list[Outcome]) -> list[Outcome]:
        """Remember the jobsets of attempt outcomes for :meth:`open_jobsets`; returns ``out``."""
        for o in out:
            if isinstance(o, Attempt):
                self._in_flight.pop(o.jobset_id, None)
                self._in_flight[o.jobset_id] = self._now
        return out

    def _take(self, key: AttemptKey) -> _Open:
        """Remove an open or contested attempt."""
        rec = self._contested.pop(key, None)
        return self._pop(key) if rec is None else rec

    def _pop(self, key: AttemptKey) -> _Open:
        rec = self._open.pop(key)
        if self._by_jobset.get(rec.jobset_id) == key:
            del self._by_jobset[rec.jobset_id]
        return rec

    def _abandon(self, rec: _Open, at_ns: int, reason: str) -> Attempt:
        self._abandoned[reason] = self._abandoned.get(reason, 0) + 1
        return Attempt(
            kind=AttemptKind.ABANDONED,
            jobset_id=rec.jobset_id,
            correlation_id=rec.correlation_id,
            started_ns=rec.started_ns,
            ended_ns=max(at_ns, rec.started_ns),
            abandon_reason=reason,
        )

    def _reject(self, reason: str, jobset_id: int, correlation_id: str) -> list[Outcome]:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        first = self._pending.get(reason)
        if first is None:
            self._pending[reason] = Rejection(reason, 1, jobset_id, correlation_id)
        else:
            self._pending[reason] = Rejection(reason, first.count + 1, first.jobset_id, first.correlation_id)
        return []

    def _remember_closed(self, key: AttemptKey, now: float) -> None:
        self._closed.pop(key, None)
        self._closed[key] = now + self._closed_ttl
        while len(self._closed) > self._max_closed:
            self._closed.popitem(last=False)

    def _forget_contested(self, now: float) -> None:
        """Drop contested starts past their deadline: never reported (counted when contested)."""
        while self._contested:
            key, rec = next(iter(self._contested.items()))
            if rec.deadline > now:
                break
            del self._contested[key]

    def _forget_closed(self, now: float) -> None:
        while self._closed:
            key, until = next(iter(self._closed.items()))
            if until > now:
                break
            del self._closed[key]

    def _take_token(self, jobset_id: int, now: float) -> bool:
        """Spend one of the jobset's supersession tokens, if it has one (see the module docstring)."""
        tokens, since = self._tokens.get(jobset_id, (float(SUPERSEDE_BURST), now))
        tokens = min(float(SUPERSEDE_BURST), tokens + max(0.0, now - since) / SUPERSEDE_REFILL)
        ok = tokens >= 1.0
        self._tokens[jobset_id] = (tokens - 1.0 if ok else tokens, now)
        if len(self._tokens) > self._max_open:  # forget jobsets whose bucket has refilled
            full = [
                j
                for j, (t, at) in self._tokens.items()
                if t + (now - at) / SUPERSEDE_REFILL >= SUPERSEDE_BURST
            ]
            for j in full:
                del self._tokens[j]
        return ok


def _run_of(row: JobsetCheck | None, at_ns: int) -> int | None:
    """The evaluator run a start received at ``at_ns`` belongs to, by its jobset's row.

    hydra-evaluator writes ``starttime`` (whole seconds) before the run can send ``eval_started``,
    so a run recorded after the start was received is a later one: read late (a backlog), the row
    says nothing about this start's run (None)."""
    if row is None or row.start_time is None or row.start_time * 1_000_000_000 > at_ns:
        return None
    return row.start_time


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
    (State.CONTESTED, EvalStarted): Stitcher._on_duplicate_start,
    (State.CONTESTED, EvalAdded): Stitcher._on_contested_close,
    (State.CONTESTED, EvalCached): Stitcher._on_contested_close,
    (State.CONTESTED, EvalFailed): Stitcher._on_contested_close,
    (State.CLOSED, EvalStarted): Stitcher._on_late_start,
    (State.OPEN, EvalAdded): Stitcher._on_close,
    (State.OPEN, EvalCached): Stitcher._on_close,
    (State.OPEN, EvalFailed): Stitcher._on_close,
    (State.ABSENT, EvalAdded): Stitcher._on_orphan_close,
    (State.ABSENT, EvalCached): Stitcher._on_orphan_close,
    (State.ABSENT, EvalFailed): Stitcher._on_orphan_close,
    (State.CLOSED, EvalAdded): Stitcher._on_orphan_close,
    (State.CLOSED, EvalCached): Stitcher._on_orphan_close,
    (State.CLOSED, EvalFailed): Stitcher._on_orphan_close,
}
