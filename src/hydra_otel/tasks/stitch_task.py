"""Stitcher task: drives the pure :class:`~hydra_otel.core.stitch.Stitcher`.

Feeds it each evaluation event with the monotonic ``trio.current_time()``,
passes finished-step and finished-build events through unchanged and in
order, wakes at the earliest abandon deadline to expire attempts that never closed,
and forwards the outcomes. When its input closes, attempts still open are
left open: they are live evaluations, not abandoned ones.

``eval_started`` payloads come from any role that can connect, so before a
start is fed the task asks :class:`KnownJobsets` whether its jobset is a row
of Hydra's ``jobsets`` table, and reads that row's ``starttime`` (the run
hydra-evaluator recorded) with the batch's closing checks. ``eval_cached`` and ``eval_failed`` are not
trusted either, nor ``eval_added``'s pairing with a start: for each batch the
task reads, in one query per table, the jobset rows and JobsetEvals they name
(:class:`~hydra_otel.core.stitch.ClosingCheck`), and the stitcher acts only on
what the rows vouch for. What the stitcher rejects is counted in
``Stats.notifications_rejected`` and logged, rate-limited per reason.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import trio

from hydra_otel.core.events import (
    BuildFinished,
    EvalAdded,
    EvalCached,
    EvalFailed,
    EvalStarted,
    Received,
    StepFinished,
)
from hydra_otel.core.stitch import ClosingCheck, JobsetCheck, Stitcher, Unchecked, Work
from hydra_otel.errors import DbUnavailable, PermissionDenied
from hydra_otel.log import RateLimitedLog
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.channels import receive_some, send_all

log = logging.getLogger("hydra_otel.stitcher")

#: Looks up which of the given jobset IDs exist (one query for the whole list).
JobsetLookup = Callable[[Sequence[int]], Awaitable[set[int]]]
#: Reads, for (jobset IDs, JobsetEval IDs), the jobset rows and each JobsetEval's jobset ID.
ClosingLookup = Callable[
    [Sequence[int], Sequence[int]], Awaitable[tuple[dict[int, JobsetCheck], dict[int, int]]]
]
#: The evaluation notifications checked against the tables.
Closing = EvalAdded | EvalCached | EvalFailed
Checked = EvalStarted | Closing
#: Per evaluation event, what the rows said (or why nothing was read).
Checker = Callable[[Checked], ClosingCheck | Unchecked]


class KnownJobsets:
    """Which jobset IDs are rows of Hydra's ``jobsets`` table, cached (Trio-flavoured).

    A jobset once found is remembered for good (Hydra's jobsets are few and deleting one
    only leaves a harmless entry). An ID not found is remembered for ``negative_ttl``
    seconds, at most ``max_negative`` of them, so a flood of made-up IDs costs at most one
    query per batch of notifications. While the database is unreachable every ID counts
    as known: the other bounds of the stitcher still hold, and a live evaluation is not
    lost for want of a lookup.
    """

    def __init__(
        self,
        lookup: JobsetLookup,
        *,
        every: Callable[[], Awaitable[set[int]]] | None = None,
        closing: ClosingLookup | None = None,
        negative_ttl: float = 60.0,
        max_negative: int = 10_000,
    ) -> None:
        """Args:
        lookup: which of the given IDs exist (one query).
        every: every jobset ID, for :meth:`preload` (None: nothing to preload).
        closing: the rows that vouch for ``eval_cached`` / ``eval_failed`` (None: trust them).
        negative_ttl: seconds an ID not found is remembered as unknown.
        max_negative: bound on IDs remembered as unknown.
        """
        self._lookup = lookup
        self._every = every
        self._closing = closing
        self._known: set[int] = set()
        self._unknown: OrderedDict[int, float] = OrderedDict()
        self._ttl = negative_ttl
        self._max_negative = max_negative
        self._warn = RateLimitedLog(log)

    async def preload(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - one bounded start-up step
        """Learn every existing jobset at once, so the first start of each is not held up by a
        lookup (during which the catch-up would not see its evaluation as open). Gives up quietly
        after ``timeout`` seconds or when the database is unreachable: lookups then happen lazily."""
        if self._every is None:
            return
        with trio.move_on_after(timeout):
            try:
                self._known |= await self._every()
            except (DbUnavailable, PermissionDenied) as exc:  # a missing grant is logged by the db
                self._warn.warning(
                    "db", "cannot read the jobsets yet; looking them up as they come", error=str(exc)
                )

    async def known(self, jobset_ids: set[int]) -> set[int]:
        """The subset of ``jobset_ids`` that exist; at most one query."""
        now = trio.current_time()
        while self._unknown and next(iter(self._unknown.values())) <= now:
            self._unknown.popitem(last=False)
        ask = sorted(j for j in jobset_ids if j not in self._known and j not in self._unknown)
        if ask:
            try:
                found = await self._lookup(ask)
            except (DbUnavailable, PermissionDenied) as exc:  # a missing grant is logged by the db
                self._warn.warning(
                    "db", "cannot check jobsets of eval_started; accepting them", error=str(exc)
                )
                return set(jobset_ids)
            self._known |= found
            for j in ask:
                if j not in found:
                    self._unknown[j] = now + self._ttl
            while len(self._unknown) > self._max_negative:
                self._unknown.popitem(last=False)
        return {j for j in jobset_ids if j in self._known}

    async def closing_checks(self, events: Sequence[Checked]) -> Checker:
        """Read, fresh (the rows change with every check and run), what vouches for ``events``; one
        query per table. A start is checked against its jobset's row (``starttime``: which evaluator
        run it claims). While the database is unreachable every event is :attr:`Unchecked.UNREADABLE`."""
        if self._closing is None or not events:
            return _trusted
        jobset_ids = sorted({e.jobset_id for e in events if not isinstance(e, EvalAdded)})
        eval_ids = sorted({_named_eval(e) for e in events if isinstance(e, EvalAdded | EvalCached)})
        try:
            rows, evals = await self._closing(jobset_ids, eval_ids)
        except (DbUnavailable, PermissionDenied) as exc:  # a missing grant is logged by the db
            self._warn.warning(
                "db", "cannot check evaluation notifications against the tables", error=str(exc)
            )
            return lambda _: Unchecked.UNREADABLE

        def check(event: Checked) -> ClosingCheck:
            named = evals.get(_named_eval(event)) if isinstance(event, EvalAdded | EvalCached) else None
            return ClosingCheck(jobset=rows.get(event.jobset_id), eval_jobset=named)

        return check


def _named_eval(event: EvalAdded | EvalCached) -> int:
    return event.eval_id if isinstance(event, EvalAdded) else event.previous_eval_id


async def run_stitcher(
    events: trio.MemoryReceiveChannel[Received],
    outcomes: trio.MemorySendChannel[Work],
    stitcher: Stitcher,
    *,
    stats: Stats | None = None,
    jobsets: KnownJobsets | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume ``events`` until it closes; closes ``outcomes`` when done.

    Reports started once the jobsets are preloaded (or that gave up), before any event is read.

    Args:
        events: parsed notifications from the intake.
        outcomes: stitched work for the resolver.
        stitcher: the pure state machine.
        stats: where rejections are counted (``notifications_rejected``), if anywhere.
        jobsets: the checks of ``eval_*`` notifications against Hydra's tables; None trusts
            every event.
    """
    warn = RateLimitedLog(log)
    async with events, outcomes:
        if jobsets is not None:
            await jobsets.preload()
        task_status.started()
        while True:
            deadline = stitcher.next_deadline()
            batch: list[Received] | None = None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                try:
                    batch = await receive_some(events)
                except trio.EndOfChannel:
                    break
            if batch is None:
                await send_all(outcomes, stitcher.expire(trio.current_time(), time.time_ns()))
                continue
            out = await _feed_batch(stitcher, batch, jobsets)
            _report_rejections(stitcher, stats, warn)
            await send_all(outcomes, out)
        st = stitcher.statistics()
        if st.open:
            log.info("evaluations still running at shutdown are not exported", extra={"open": st.open})


async def _feed_batch(stitcher: Stitcher, batch: list[Received], jobsets: KnownJobsets | None) -> list[Work]:
    """Feed one batch, with one lookup per kind of check for the whole batch."""
    starts = {r.event.jobset_id for r in batch if isinstance(r.event, EvalStarted)}
    known = starts
    check: Checker = _trusted
    if jobsets is not None:
        known = await jobsets.known(starts) if starts else starts
        # A start of a jobset that does not exist is rejected before its row would matter: its ID
        # is left out of the row query, so a flood of made-up IDs stays one cached lookup.
        checked = [
            e
            for r in batch
            if isinstance(e := r.event, EvalAdded | EvalCached | EvalFailed)
            or (isinstance(e, EvalStarted) and e.jobset_id in known)
        ]
        check = await jobsets.closing_checks(checked)
    out: list[Work] = []
    for received in batch:
        event = received.event
        if isinstance(event, StepFinished | BuildFinished):
            out.append(event)  # build events pass through, in order with the evaluations
            continue
        assert isinstance(event, EvalStarted | EvalAdded | EvalCached | EvalFailed)  # intake's contract
        out += stitcher.feed(
            event,
            received.at_ns,
            trio.current_time(),
            jobset_known=event.jobset_id in known,
            check=check(event),
        )
    return out


def _trusted(_: Checked) -> Unchecked:
    return Unchecked.TRUSTED


def _report_rejections(stitcher: Stitcher, stats: Stats | None, warn: RateLimitedLog) -> None:
    for r in stitcher.take_rejections():
        if stats is not None:
            stats.notifications_rejected[r.reason] += r.count
        warn.warning(
            r.reason,
            "ignored evaluation notifications",
            reason=r.reason,
            count=r.count,
            first_jobset_id=r.jobset_id,
            first_correlation_id=r.correlation_id[:64],
        )
