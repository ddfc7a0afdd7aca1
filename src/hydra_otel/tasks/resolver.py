"""Resolver task: completes stitched work from Hydra's tables and renders spans.

Work is taken in batches (whatever is queued, up to ``batch_size``), so one
query per table serves the whole batch, however many builds it names. A row
that does not exist (an ID from a bad notification, a deleted build) is
logged, counted and skipped. While the database is unreachable the batch is
held and retried with backoff: upstream channels fill and apply backpressure;
nothing is dropped here. Exact repeats of recently exported spans (a step
exported live and again with its build, a re-delivered ``build_finished``)
are skipped by :class:`~hydra_otel.core.dedup.RecentSpans`.

A finished build is rendered once per (build ID, stop time), whichever of the
live path and the catch-up brings it first: the key is looked up in the memory
shared with the catch-up once the row is read, before anything is rendered. The
catch-up records the key when it sends a build (from the row it read, so it is
rendered whatever the memory says); the resolver records it only for builds whose
row it read finished and rendered, never from a notification's payload alone.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import trio

from hydra_otel.adapters import queries
from hydra_otel.adapters.db import while_unavailable
from hydra_otel.adapters.steplogs import StepLogs
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.batching import CompleteSpans
from hydra_otel.core.budget import steps_omitted
from hydra_otel.core.builds import (
    BuildFacts,
    Cause,
    StepFacts,
    attempt_at,
    build_attempt,
    build_span_id,
    build_spans,
    propagated_from,
    step_attempt,
    step_in_budget,
    step_needs_build,
    step_span,
)
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.dedup import RecentKeys, RecentSpans
from hydra_otel.core.evals import (
    AddedEval,
    Attempt,
    RenderConfig,
    attempt_span,
    eval_spans,
    evaluator_run_span,
)
from hydra_otel.core.events import BuildFinished, StepFinished
from hydra_otel.core.spans import SpanRecord
from hydra_otel.core.stitch import Work
from hydra_otel.errors import DbUnavailable, PermissionDenied
from hydra_otel.log import RateLimitedLog
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.channels import receive_some
from hydra_otel.tasks.exporter import ExportItem

log = logging.getLogger("hydra_otel.resolver")

#: Work items resolved together (one query per table serves them all).
RESOLVE_BATCH = 512


@dataclass(slots=True)
class Resolver:
    """Turns a batch of work into spans; holds the query helpers and the duplicate filter."""

    db: queries.Fetcher
    cfg: RenderConfig
    stats: Stats
    builds: queries.BuildQueries
    recent: RecentSpans
    warn: RateLimitedLog
    #: jobset ID -> lastcheckedtime of attempts handled here (catch-up then skips them).
    live_jobsets: dict[int, int]
    #: The same, not yet sent downstream as a checkpoint (so a restart does not report them again).
    unsent_jobsets: dict[int, int]
    #: Attaches failed steps' log tails (None: off).
    step_logs: StepLogs | None = None
    #: ("build", ID, stop time) of builds rendered here or sent by the catch-up (shared with it):
    #: either side skips a build the other has.
    handled: RecentKeys = field(default_factory=RecentKeys)
    #: Keys of the builds rendered by the batch being resolved; recorded in ``handled`` once all
    #: its queries answered (a batch retried after an outage must render them again).
    claimed: set[tuple[str, int, int]] = field(default_factory=set)

    @classmethod
    def create(
        cls,
        db: queries.Fetcher,
        cfg: RenderConfig,
        stats: Stats,
        *,
        recent: int = 200_000,
        step_logs: StepLogs | None = None,
        handled: RecentKeys | None = None,
    ) -> Resolver:
        """A resolver with the budget from ``cfg``."""
        return cls(
            db=db,
            cfg=cfg,
            stats=stats,
            builds=queries.BuildQueries(db, budget=cfg.max_builds_per_trace),
            recent=RecentSpans(recent),
            warn=RateLimitedLog(log),
            live_jobsets={},
            unsent_jobsets={},
            step_logs=step_logs,
            handled=handled if handled is not None else RecentKeys(),
        )

    async def resolve(self, batch: list[Work]) -> list[SpanRecord]:
        """Spans for ``batch``, without exact repeats of recently exported ones."""
        self.claimed.clear()
        records = await self._evals([w for w in batch if isinstance(w, AddedEval)])
        records += await self._attempts([w for w in batch if isinstance(w, Attempt)])
        finished, rendered = await self._finished([w for w in batch if isinstance(w, BuildFinished)])
        # A step whose build was rendered in this batch came with it: do not render it twice. Only
        # builds really rendered count: a build_finished can name a build that is still running.
        records += await self._steps(
            [w for w in batch if isinstance(w, StepFinished) and w.build_id not in rendered]
        )
        records += finished
        fresh = [r for r in records if self.recent.fresh(r)]
        self.stats.spans_deduplicated += len(records) - len(fresh)
        self.stats.spans_over_budget += sum(steps_omitted(r) for r in fresh)
        if self.step_logs is not None:  # after the duplicate filter, so each tail is read once
            paths = {
                (w.build_id, w.step_nr): w.log_path
                for w in batch
                if isinstance(w, StepFinished) and w.log_path
            }
            fresh = await self.step_logs.process(fresh, paths)
        for key in self.claimed:
            self.handled.add(key)
        return fresh

    def _missing(self, table: str, what: str, **ids: int) -> None:
        self.stats.missing_rows[table] += 1
        self.warn.warning(table, f"{what} that is not in the database; skipped", **ids)

    async def _evals(self, added: list[AddedEval]) -> list[SpanRecord]:
        facts = await queries.eval_facts(
            self.db,
            [a.eval_id for a in added],
            budget=self.cfg.max_builds_per_trace,
            max_links=self.cfg.max_links,
        )
        out: list[SpanRecord] = []
        for a in added:
            f = facts.get(a.eval_id)
            if f is None:
                self._missing("jobsetevals", "eval_added names a JobsetEval", eval_id=a.eval_id)
                continue
            out += eval_spans(f, self.cfg)
            if a.started_ns is not None:
                out.append(
                    evaluator_run_span(
                        self.cfg,
                        eval_id=a.eval_id,
                        jobset_id=a.jobset_id,
                        correlation_id=a.correlation_id,
                        started_ns=a.started_ns,
                        ended_ns=a.ended_ns,
                    )
                )
        return out

    async def _attempts(self, attempts: list[Attempt]) -> list[SpanRecord]:
        jobsets = await queries.jobset_facts(self.db, [t.jobset_id for t in attempts])
        out: list[SpanRecord] = []
        for t in attempts:
            j = jobsets.get(t.jobset_id)
            if j is None:
                self._missing("jobsets", "an evaluation notification names a jobset", jobset_id=t.jobset_id)
                continue
            out.append(attempt_span(t, j, self.cfg))
            if j.last_checked is not None:
                checked = max(j.last_checked, self.live_jobsets.get(t.jobset_id, 0))
                self.live_jobsets[t.jobset_id] = self.unsent_jobsets[t.jobset_id] = checked
        return out

    async def _steps(self, finished: list[StepFinished]) -> list[SpanRecord]:
        if not finished:
            return []
        builds, steps = await self.builds.builds_and_steps(
            [e.build_id for e in finished], subset=[(e.build_id, e.step_nr) for e in finished]
        )
        out: list[SpanRecord] = []
        with_build: list[BuildFinished] = []
        for e in finished:
            b = builds.get(e.build_id)
            rows = steps.get(e.build_id, [])
            step = next((s for s in rows if s.stepnr == e.step_nr), None)
            if b is None or step is None:
                self._missing("buildsteps", "step_finished names a step", build_id=e.build_id, step=e.step_nr)
                continue
            if step.status is None:  # not finished after all (restarted?): it comes with its build
                continue
            attempt = step_attempt(b, rows, step.stepnr)
            if step_needs_build(b, rows, attempt):
                with_build.append(BuildFinished(build_id=b.build_id, dependents=()))
                continue
            if not step_in_budget(self.cfg, b, rows, step):
                continue  # beyond the build's share of its trace; counted when the build finishes
            out.append(step_span(self.cfg, b, step, attempt))
        with_builds, _ = await self._finished(with_build)
        return out + with_builds

    async def _finished(self, events: list[BuildFinished]) -> tuple[list[SpanRecord], set[int]]:
        """The spans of the finished builds ``events`` name, and the IDs of the builds rendered
        (here, or earlier or later from the same row: see :meth:`_handled`)."""
        wanted = [i for e in events for i in (e.build_id, *e.dependents)]
        if not wanted:
            return [], set()
        scanned = {e.build_id: e.stop_time for e in events if e.stop_time is not None}
        builds, steps = await self.builds.builds_and_steps(wanted)
        causes = await self._causes(builds, steps)
        out: list[SpanRecord] = []
        rendered: set[int] = set()
        for build_id in dict.fromkeys(wanted):
            b = builds.get(build_id)
            if b is None:
                self._missing("builds", "build_finished names a build", build_id=build_id)
                continue
            if b.stoptime is None:
                self.stats.not_finished += 1  # never finished (a bad notification): nothing to render
                continue
            rendered.add(build_id)
            if self._handled(build_id, b.stoptime, scanned.get(build_id)):
                continue
            rows = steps.get(build_id, [])
            out += self._new_attempts(b, rows, build_spans(self.cfg, b, rows, causes.get(build_id)))
        return out, rendered

    def _handled(self, build_id: int, stoptime: int, scanned: int | None) -> bool:
        """Was this finish of the build rendered already, or is it on its way? Claims it if not.

        The catch-up's own work (``scanned``: the stop time it read, which the row still has) is
        rendered although the catch-up recorded its key when sending it. Other work (a notification,
        a step whose build must come with it) finds that key and is skipped: the catch-up's copy,
        queued before or after it, renders the build. The key comes from the row just read and is
        recorded only for a build rendered here, so no payload can make either side skip a build.
        """
        key = ("build", build_id, stoptime)
        if scanned != stoptime and (key in self.handled or key in self.claimed):
            self.stats.builds_deduplicated += 1
            return True
        self.claimed.add(key)
        return False

    def _new_attempts(
        self, b: BuildFacts, rows: list[StepFacts], spans: list[SpanRecord]
    ) -> list[SpanRecord]:
        """``spans`` without earlier attempts' build spans this process exported from the row.

        An earlier attempt rebuilt from its steps can lack what the row had when it was the latest
        (sizes, status 6); the span exported then is the better one, so it is not overwritten.
        """
        rebuilt = {build_span_id(self.cfg, b, a) for a in range(build_attempt(b, rows))}
        if not rebuilt:
            return spans  # a first attempt (nearly every build): nothing was rebuilt
        return [
            s
            for s in spans
            if (s.trace_id, s.span_id) not in rebuilt or not self.recent.known(s.trace_id, s.span_id)
        ]

    async def _causes(
        self, builds: dict[int, BuildFacts], steps: dict[int, list[StepFacts]]
    ) -> dict[int, Cause]:
        """For builds whose failure was propagated from another build, that build's span as a link target."""
        by_build = {
            i: c for i, b in builds.items() if (c := propagated_from(b, steps.get(i, []))) is not None
        }
        unknown = sorted(set(by_build.values()) - set(builds))
        extra = await self.builds.builds(unknown)
        extra_steps = await self.builds.steps(list(extra))
        every, every_steps = {**builds, **extra}, {**steps, **extra_steps}
        out: dict[int, Cause] = {}
        for build_id, cause_id in by_build.items():
            cause = every.get(cause_id)
            stop = builds[build_id].stoptime
            if cause is not None and stop is not None:
                # The cause's attempt that failed then, not its latest: stable across its restarts.
                attempt = attempt_at(cause, every_steps.get(cause_id, []), stop)
                out[build_id] = Cause(cause_id, *build_span_id(self.cfg, cause, attempt))
        return out


#: Work items held for want of a grant at most; beyond it the resolver stops taking new work
#: (backpressure) until the grant is given, so memory stays bounded.
HELD_LIMIT = 100_000


@dataclass(slots=True)
class Held:
    """Work that needs a table hydra-otel may not read (SQLSTATE 42501), kept until a GRANT.

    Checkpoints that arrive while anything is held are merged here instead of being
    passed on: progress marks must not move past work that was not exported. The held
    work is retried with backoff (1 s doubling to 30 s); once it resolves, the merged
    marks follow its spans.
    """

    work: list[Work] = field(default_factory=list)
    #: Kinds of work (AddedEval, Attempt, StepFinished, BuildFinished) whose tables are denied.
    kinds: set[type] = field(default_factory=set)
    marks: Marks | None = None
    retry_at: float = math.inf
    backoff: Backoff = field(default_factory=Backoff.restart)

    def due(self) -> bool:
        return bool(self.work) and trio.current_time() >= self.retry_at

    def hold(self, work: list[Work]) -> None:
        if not self.work:
            log.warning(
                "holding work that needs a table hydra-otel cannot read; exporting the rest",
                extra={"kinds": sorted(k.__name__ for k in {type(w) for w in work})},
            )
        self.work += work
        self.kinds |= {type(w) for w in work}
        self.retry_at = trio.current_time() + self.backoff.next_delay()

    def take(self) -> list[Work]:
        work, self.work, self.kinds = self.work, [], set()
        return work


async def run_resolver(
    work: trio.MemoryReceiveChannel[Work | Checkpoint],
    spans: trio.MemorySendChannel[ExportItem],
    resolver: Resolver,
    *,
    backoff: Backoff,
    batch_size: int = RESOLVE_BATCH,
    held_limit: int = HELD_LIMIT,
    live: bool = False,
) -> None:
    """Consume ``work`` until it closes; closes ``spans`` when done. Checkpoints keep their place.

    A batch is what is queued when the resolver gets to it; it waits for no more. Live work
    arrives batched already (the LISTEN connection paces its reads while notifications trickle,
    for up to the export delay: ``adapters/read_pacer.py``), and the catch-up sends whole pages.

    With ``live`` (the daemon; not the backfill, which has no live work), spans resolved from
    what was queued, with nothing queued behind it and no checkpoint after it, are sent as a
    :class:`~hydra_otel.core.batching.CompleteSpans`: nothing more will join them, so the
    exporter sends them without waiting for the export delay again. Spans followed by a
    checkpoint (a catch-up page) are not: the checkpoint sends them.
    """
    held = Held()

    async def checkpoint(marks: Marks) -> None:
        if held.work:  # not past work that is still held
            held.marks = marks if held.marks is None else held.marks.merged(marks)
            return
        if held.marks is not None:
            marks, held.marks = held.marks.merged(marks), None
        await spans.send(Checkpoint(marks))

    async with work, spans:
        closed = False
        while not closed:
            batch: list[Work | Checkpoint] = []
            if len(held.work) < held_limit:
                with trio.move_on_at(held.retry_at if held.work else math.inf):
                    try:
                        batch = await receive_some(work, batch_size)
                    except trio.EndOfChannel:
                        closed = True
            else:
                await trio.sleep_until(held.retry_at)  # full: take nothing new until the grant
            segment: list[Work] = []
            for item in [*batch, None]:
                if isinstance(item, Checkpoint) or item is None:
                    if segment or held.due() or (closed and held.work):
                        records = await _resolve_with_retry(resolver, segment, backoff, held)
                        if records:
                            complete = live and item is None and not work.statistics().current_buffer_used
                            await spans.send(CompleteSpans(records) if complete else records)
                    segment = []
                    if resolver.unsent_jobsets:
                        # Live evaluation outcomes become a (partial) checkpoint behind their spans.
                        await checkpoint(Marks(jobsets=dict(resolver.unsent_jobsets)))
                        resolver.unsent_jobsets.clear()
                    if item is not None:
                        await checkpoint(item.marks)
                    elif held.marks is not None and not held.work:
                        await checkpoint(Marks())  # the held work went out: its withheld marks follow
                else:
                    segment.append(item)
        if held.work:
            log.warning(
                "stopping with work held for want of a grant: not exported now, and its progress "
                "marks were not stored, so the next start exports it once the grant is given",
                extra={"held": len(held.work)},
            )


async def _resolve_with_retry(
    resolver: Resolver, batch: list[Work], backoff: Backoff, held: Held
) -> list[SpanRecord]:
    """Spans for ``batch`` (and the held work, when its retry is due); denied kinds are held."""
    if held.due():
        batch = held.take() + batch
    elif held.kinds:  # their tables are still denied: do not ask again before the retry time
        batch, waiting = [w for w in batch if type(w) not in held.kinds], batch
        held.work += [w for w in waiting if type(w) in held.kinds]
    try:
        records = await _resolve_until_db_answers(resolver, batch, backoff)
    except PermissionDenied:
        records = []
        # Some kind of work needs a table we may not read: resolve each kind alone, hold the denied.
        kinds: dict[type, list[Work]] = {}
        for w in batch:
            kinds.setdefault(type(w), []).append(w)
        for group in kinds.values():
            try:
                records += await _resolve_until_db_answers(resolver, group, backoff)
            except PermissionDenied:
                held.hold(group)
    if not held.work and held.kinds == set() and held.backoff.attempt:
        held.backoff.reset()
        log.info("held work resolved: the missing grant was given")
    return records


async def _resolve_until_db_answers(
    resolver: Resolver, batch: list[Work], backoff: Backoff
) -> list[SpanRecord]:
    def waiting(exc: DbUnavailable, delay: float) -> None:
        resolver.warn.warning("db", "database unavailable; holding work", error=str(exc), retry_in_s=delay)

    return await while_unavailable(functools.partial(resolver.resolve, batch), backoff, waiting)
