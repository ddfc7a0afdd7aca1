"""Catch-up task: rebuilds from Hydra's tables what notifications may have missed.

Runs a scan at start-up, whenever a trigger arrives (LISTEN (re)connected,
listener overflow, one of Hydra's payload-less trigger channels such as
``builds_cancelled`` or ``builds_restarted``) and every ``interval`` seconds.
A scan that is not a periodic one (start-up, trigger) is followed by one more
once the lag window has passed (``lag`` + 1 s after it read the database's
clock): rows that stopped in the last seconds before a gap closed are then
found at once, not an interval later.
A scan sends work for everything recorded since the marks (see
core/catchup.py), page by page, each page followed by a Checkpoint the
exporter stores once the endpoint acknowledged the page's spans.

The first start (no stored marks) begins at the present: loading history is
``hydra-otel backfill``'s job. Rows are scanned up to ``lag`` seconds before
the database's clock, and builds and steps again from ``overlap`` seconds
before the mark, so rows committed a little after the time they record are not
missed; what the process already sent is remembered and not sent again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from hydra_otel.adapters import queries
from hydra_otel.core.catchup import Checkpoint, Marks, jobset_failures
from hydra_otel.core.dedup import RecentKeys
from hydra_otel.core.evals import AddedEval
from hydra_otel.core.events import BuildFinished, StepFinished
from hydra_otel.core.stitch import Work
from hydra_otel.errors import PermissionDenied
from hydra_otel.tasks.retry import until_db_answers

log = logging.getLogger("hydra_otel.catchup")


class MarksStore(Protocol):
    """Where the marks are kept (:class:`~hydra_otel.adapters.progress_store.ProgressStore`); blocking calls."""

    def load(self) -> Marks | None:
        """The stored marks, or None on a first start."""
        ...

    def merge(self, marks: Marks) -> Marks:
        """Merge ``marks`` into the stored ones, store and return them."""
        ...


#: The reason of a scan that closes the lag window after a start-up or triggered scan.
FOLLOW_UP = "follow-up"


@dataclass(frozen=True, slots=True, kw_only=True)
class CatchupSettings:
    """Timing and paging of catch-up scans."""

    interval: float = 30.0
    overlap: int = 120
    lag: int = 2
    page: int = 1000
    #: Evaluations are re-scanned from this many IDs before the mark: IDs are taken at INSERT, and a
    #: long evaluation transaction can commit a lower ID after a higher one was seen.
    eval_overlap: int = 10
    #: Without stored marks, start this many seconds in the past (0: now). A standby taking over with
    #: no marks of its own uses the takeover window, to cover what the dead instance had not exported.
    look_back: int = 0


@dataclass(slots=True)
class CatchupState:
    """What the running catch-up has reached (not what is stored: a checkpoint is stored once acknowledged).

    ``live_jobsets`` is shared with the resolver, which records the jobset checks it handled live.
    """

    marks: Marks
    live_jobsets: dict[int, int]
    scans: int = 0
    #: trio.current_time() just after the last scan read the database's clock.
    clock_read_at: float = 0.0


class Catchup:
    """One scanner; :meth:`scan` sends work and checkpoints into ``work``."""

    def __init__(
        self,
        db: queries.Fetcher,
        work: trio.MemorySendChannel[Work | Checkpoint],
        settings: CatchupSettings,
        open_jobsets: Callable[[], frozenset[int]] = frozenset,
        seen: RecentKeys | None = None,
    ):
        self._db = db
        self._work = work
        self._s = settings
        self._seen = seen if seen is not None else RecentKeys()  # shared with the resolver
        self._open_jobsets = open_jobsets  # the live stitcher's open attempts (see jobset_failures)

    async def start_marks(self, stored: Marks | None) -> Marks:
        """The stored marks, or on a first start the present minus ``look_back`` seconds."""
        if stored is not None:
            return stored
        look_back = self._s.look_back
        eval_id, now = await queries.catchup_start(self._db, now_minus=look_back)
        # Jobset checks later than the look-back point are reported by the first scan.
        jobsets = {row.jobset_id: now - look_back for row in await queries.catchup_jobsets(self._db)}
        log.info("no stored progress: catching up from", extra={"eval_id": eval_id, "seconds_ago": look_back})
        return Marks(eval_id=eval_id, stop_time=now - look_back - self._s.lag, jobsets=jobsets)

    async def scan(self, state: CatchupState) -> None:
        """Send everything recorded since ``state.marks``, updating them page by page."""
        _, now = await queries.catchup_start(self._db)
        state.clock_read_at = trio.current_time()
        until = now - self._s.lag
        await self._evals(state)
        await self._builds(state, until)
        # A missing grant on buildsteps is logged (with the GRANT) by the database adapter. The
        # steps of running builds are only early copies: each build renders all its steps when
        # it finishes, and the resolver holds those builds (and the progress marks) until then.
        with contextlib.suppress(PermissionDenied):
            await self._steps(state, until)
        await self._jobsets(state, until)
        state.marks = state.marks.merged(Marks(stop_time=until))
        await self._work.send(Checkpoint(state.marks))
        state.scans += 1

    async def _evals(self, state: CatchupState) -> None:
        after = max(0, state.marks.eval_id - self._s.eval_overlap)
        while page := await queries.catchup_evals(self._db, after, self._s.page):
            after = page[-1][0]
            for eval_id, jobset_id in page:
                if self._seen.add(("eval", eval_id)):
                    await self._work.send(AddedEval.from_table(eval_id, jobset_id))
            state.marks = state.marks.merged(Marks(eval_id=page[-1][0]))
            await self._work.send(Checkpoint(state.marks))

    async def _builds(self, state: CatchupState, until: int) -> None:
        since, after = state.marks.stop_time - self._s.overlap, (0, 0)
        while page := await queries.catchup_builds(self._db, since, until, after, self._s.page):
            for build_id, stoptime in page:
                # Recorded at once: the resolver renders work carrying its stop time whatever the
                # memory says, and a live copy of the build it meets later is not rendered again.
                if self._seen.add(("build", build_id, stoptime)):
                    await self._work.send(BuildFinished(build_id=build_id, dependents=(), stop_time=stoptime))
            after = (page[-1][1], page[-1][0])
            # Every build that stopped before the last one's second is done (same-second ones may follow).
            state.marks = state.marks.merged(Marks(stop_time=page[-1][1]))
            await self._work.send(Checkpoint(state.marks))

    async def _steps(self, state: CatchupState, until: int) -> None:
        since = state.marks.stop_time - self._s.overlap
        for build_id, stepnr in await queries.catchup_steps(self._db, since, until, self._s.page * 10):
            if self._seen.add(("step", build_id, stepnr)):
                await self._work.send(StepFinished(build_id=build_id, step_nr=stepnr, log_path=None))

    async def _jobsets(self, state: CatchupState, until: int) -> None:
        known = state.marks.merged(Marks(jobsets=state.live_jobsets)).jobsets
        failures, updated = jobset_failures(
            await queries.catchup_jobsets(self._db), known, self._open_jobsets(), until
        )
        for attempt in failures:
            await self._work.send(attempt)
        state.marks = state.marks.merged(Marks(jobsets=updated))


async def run_catchup(
    catchup: Catchup,
    store: MarksStore,
    triggers: trio.MemoryReceiveChannel[str],
    settings: CatchupSettings,
    live_jobsets: dict[int, int],
    *,
    task_status: trio.TaskStatus[CatchupState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Scan at start, on each trigger and every ``interval`` seconds; retries while the database is down."""
    stored = await trio.to_thread.run_sync(store.load)
    marks = await until_db_answers(
        lambda: catchup.start_marks(stored), waiting="catch-up waiting for the database"
    )
    if stored is None:
        # The first marks cover nothing yet, so they are stored at once: a restart before the
        # first export (a collector that is down, say) must resume from here, not from "now".
        marks = await trio.to_thread.run_sync(store.merge, marks)
    state = CatchupState(marks=marks, live_jobsets=live_jobsets)
    task_status.started(state)
    reasons, follow_up_at = ["start"], None
    while True:
        await until_db_answers(lambda: catchup.scan(state), waiting="catch-up waiting for the database")
        follow_up_at = next_follow_up(follow_up_at, reasons, state.clock_read_at, settings.lag)
        reasons = await _next_trigger(triggers, trio.current_time() + settings.interval, follow_up_at)
        log.debug("catch-up scan", extra={"reasons": reasons})


#: Scans after which nothing new can hide in the lag window: periodic ones (the live stream was
#: up) and the follow-ups themselves.
_ROUTINE = frozenset({"interval", FOLLOW_UP})


def next_follow_up(pending: float | None, reasons: list[str], read_at: float, lag: int) -> float | None:
    """When the next follow-up scan is due after a scan for ``reasons`` that read the clock at ``read_at``.

    A scan covers rows stopped up to ``lag`` seconds before the database's clock, so a row that
    stopped just before a gap closed (its notification lost) is only visible ``lag`` seconds later:
    a scan after a gap is followed by one ``lag + 1`` seconds after it (whole seconds on both
    clocks). A pending follow-up is done once a scan read the clock at or after its time.
    """
    if pending is not None and read_at >= pending:
        pending = None
    if set(reasons) <= _ROUTINE:
        return pending
    return read_at + lag + 1.0


async def _next_trigger(
    triggers: trio.MemoryReceiveChannel[str], interval_at: float, follow_up_at: float | None
) -> list[str]:
    """Wait for a trigger, the follow-up or the interval; coalesce whatever else is pending."""
    if follow_up_at is not None and follow_up_at < interval_at:
        deadline, reasons = follow_up_at, [FOLLOW_UP]
    else:
        deadline, reasons = interval_at, ["interval"]
    with trio.move_on_at(deadline):
        reasons = [await triggers.receive()]
    while True:
        try:
            reasons.append(triggers.receive_nowait())
        except trio.WouldBlock:
            return reasons
