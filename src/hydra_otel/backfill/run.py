"""Running a backfill: the producer of work, the daemon's resolver and exporter, the entry points."""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TextIO

import trio

from hydra_otel.adapters import command_queries, db
from hydra_otel.adapters.otlp import SpanSink
from hydra_otel.backfill.options import (
    BUILD_PAGE,
    RECENT_SPANS,
    SPAN_QUEUE,
    START_TIMEOUT,
    WAITING,
    WORK_QUEUE,
    BackfillError,
    BackfillOptions,
    format_time,
    options_from_args,
)
from hydra_otel.backfill.progress import (
    BackfillProgressFile,
    Display,
    PacedSink,
    SelectionProgress,
    Tally,
    TokenBucket,
    duration_text,
    exclusive,
    plural,
    progress_text,
    quiet_exporter_drop,
)
from hydra_otel.config import Config
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.evals import AddedEval
from hydra_otel.core.events import BuildFinished
from hydra_otel.core.stitch import Work
from hydra_otel.errors import first_leaf
from hydra_otel.log import Redactor
from hydra_otel.pipeline.factories import close_sinks, make_sink, render_config
from hydra_otel.pipeline.tail import start_tail, store_marks
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.resolver import Resolver
from hydra_otel.tasks.retry import until_db_answers


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
            f"{plural(t.evaluations, 'evaluation')}, {plural(t.builds, 'build')}, {plural(t.steps, 'step')} "
            f"({plural(t.spans, 'span')})"
        )
        if self.already_complete:
            return f"backfill of {where} was already complete; --restart exports it again"
        if self.dry_run:
            text = f"dry run, {where}: would export {counts}"
            if self.resumed_after:
                text += f", resuming after evaluation {self.resumed_after}"
            if rate > 0:
                text += f"; at --rate {rate:g} about {duration_text(t.spans / rate)}"
            return text
        state = "complete" if self.complete else "interrupted"
        text = f"backfill {state}, {where}: exported {counts} in {duration_text(self.seconds)}"
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
            sink: the OTLP sink (default: :func:`hydra_otel.pipeline.factories.make_sink`); unused by a dry run.
        """
        self.cfg = cfg
        self.opts = opts
        self.stats = Stats()
        self.result = BackfillResult(
            since=opts.since, until=opts.until or 0, jobsets=tuple(opts.jobsets), dry_run=opts.dry_run
        )
        self._sink = sink
        tty = opts.tty if opts.tty is not None else _isatty(out)
        self._display = Display(out, tty=tty, interval=opts.line_interval)
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
        store = BackfillProgressFile(self.cfg.state_dir)
        with quiet_exporter_drop():
            if self.opts.dry_run:
                return await self._run(store)
            with exclusive(self.cfg.state_dir):
                return await self._run(store)

    async def _run(self, store: BackfillProgressFile) -> BackfillResult:
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
                except db.QUERY_ERRORS as exc:
                    raise self._db_error(exc) from None
                jobset_ids = await self._start(database, until, after)
                self._counted = True
                if result.resumed_after and not opts.dry_run:
                    self._display.message(
                        f"backfill: resuming after evaluation {after} "
                        f"({result.evals_done} of {result.evals_total} evaluations done)"
                    )
                saving = SelectionProgress(since=opts.since, until=until, jobsets=tuple(opts.jobsets))
                if saved is None and not opts.dry_run:
                    # Recorded at once: a run interrupted before its first page then resumes with the
                    # same "now", and an interrupted --restart does not leave an old "complete" behind.
                    start = replace(saving, updated=_now_iso())
                    await trio.to_thread.run_sync(store.store, key, start)
                try:
                    await self._pipeline(database, store, key, saving, jobset_ids, after)
                except* BackfillError as group:  # the progress file became unusable mid-run
                    raise _first(group) from None
            result.complete = True
            if not opts.dry_run:
                done = SelectionProgress(
                    since=opts.since,
                    until=until,
                    jobsets=tuple(opts.jobsets),
                    last_eval_id=result.last_eval_id,
                    evals_done=result.evals_done,
                    complete=True,
                    updated=_now_iso(),
                )
                await trio.to_thread.run_sync(store.store, key, done)
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
                total, remaining = await command_queries.count_evals(
                    database, self.opts.since, until, after, jobset_ids
                )
        except db.QUERY_ERRORS as exc:  # RETRYABLE includes trio.TooSlowError
            raise self._db_error(exc) from None
        self.result.evals_total = total
        self.result.evals_done = self._done_before = total - remaining
        return jobset_ids

    def _db_error(self, exc: BaseException) -> BackfillError:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc).split("\n", 1)[0]
        reason = reason.replace(self.cfg.db.url, self.cfg.db.redacted_url)
        return BackfillError(f"cannot read the database {self.cfg.db.redacted_url}: {reason}")

    async def _jobset_ids(self, database: db.Database) -> list[int] | None:
        if not self.opts.jobsets:
            return None
        pairs = [name.split(":", 1) for name in self.opts.jobsets]
        found = await command_queries.jobset_ids(database, [(p, j) for p, j in pairs])
        unknown = [name for name in self.opts.jobsets if name not in found]
        if unknown:
            raise BackfillError(f"no such jobset in the database: {', '.join(unknown)}")
        return sorted(found.values())

    async def _pipeline(
        self,
        database: db.Database,
        store: BackfillProgressFile,
        key: str,
        saving: SelectionProgress,
        jobset_ids: list[int] | None,
        after: int,
    ) -> None:
        cfg, opts = self.cfg, self.opts
        work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](WORK_QUEUE)
        bucket = TokenBucket(opts.rate) if opts.rate > 0 and not opts.dry_run else None
        inner = None if opts.dry_run else (self._sink or make_sink(cfg))
        sink = PacedSink(inner, bucket, self.result.exported)
        resolver = Resolver.create(database, render_config(cfg), self.stats, recent=RECENT_SPANS)

        def save(marks: Marks) -> bool:  # in a worker thread
            if opts.dry_run:
                return True
            progress = SelectionProgress(
                since=saving.since,
                until=saving.until,
                jobsets=saving.jobsets,
                last_eval_id=marks.eval_id,
                evals_done=self.result.evals_done,
                updated=_now_iso(),
            )
            if store.checkpoint(key, progress):
                return True
            self.stats.marks_store_failures += 1  # logged once; the next checkpoint writes again
            return False

        store_checkpoint = store_marks(save, self.stats)

        async def commit(marks: Marks) -> None:
            self.result.last_eval_id = marks.eval_id
            self.result.evals_done = self._done_at.pop(marks.eval_id, self.result.evals_done)
            await store_checkpoint(marks)
            self._draw()

        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._redraw)
                async with trio.open_nursery() as pipeline:
                    start_tail(
                        pipeline,
                        work_rx,
                        resolver,
                        sink,
                        self.stats,
                        export=cfg.export,
                        queue_size=SPAN_QUEUE,
                        commit=commit,
                    )
                    async with work_tx:
                        await self._produce(database, work_tx, jobset_ids, after)
                outer.cancel_scope.cancel()
        finally:
            await close_sinks(sink)

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
                    command_queries.eval_page, database, opts.since, until, after, jobset_ids, opts.batch
                ),
                waiting=WAITING,
            )
            if not page:
                return
            eval_ids = [eval_id for eval_id, _ in page]
            for eval_id, jobset_id in page:
                await work.send(AddedEval.from_table(eval_id, jobset_id))
            build_after = 0
            while True:
                builds = await until_db_answers(
                    functools.partial(
                        command_queries.created_builds, database, eval_ids, build_after, BUILD_PAGE
                    ),
                    waiting=WAITING,
                )
                for build_id in builds:
                    await work.send(BuildFinished(build_id=build_id, dependents=()))
                if len(builds) < BUILD_PAGE:
                    break
                build_after = builds[-1]
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
    exc = first_leaf(group)
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
        print(Redactor(cfg.secrets)(f"hydra-otel backfill: {error}"), file=err)  # a driver may quote the URL
        return error.status
    if interrupted or not runner.result.complete:
        print(runner.result.summary(opts.rate), file=err)
        return 130
    print(runner.result.summary(opts.rate), file=out)
    return 0
