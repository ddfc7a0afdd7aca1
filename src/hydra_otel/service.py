"""Composition root of the live daemon (``hydra-otel run``): the one module only the CLI imports.

It adds the live head (listener, intake, stitcher, catch-up, leadership) to the
resolver → exporter tail and the sinks that ``backfill`` builds from too
(hydra_otel.pipeline), and runs them under one trio nursery tree::

    open_loop()                                  trio-asyncio (adapters/db.py)
    ├─ _watch_signals                            SIGINT/SIGTERM/SIGHUP: drain; a second one: cancel
    ├─ serve_metrics                             /metrics and /healthz (--metrics-address)
    └─ Service.run
       ├─ ProgressStore                          checked first: an unusable state dir is fatal
       └─ nursery "lead"
          ├─ hold_leadership                     advisory lock: standbys wait here
          └─ _supervise                          restarts everything below on an unexpected error
             └─ open_database()                  query pool (separate from LISTEN)
                └─ nursery "pipeline"            deadline = shutdown grace once sources stop
                   ├─ run_exporter   spans    -> OTLP, marks -> state dir   (pipeline.tail)
                   ├─ run_resolver   work     -> spans  (reads Hydra's tables; pipeline.tail)
                   ├─ run_stitcher   events   -> work   (pure core.stitch.Stitcher)
                   ├─ run_intake     raw      -> events (pure core.parse)
                   └─ nursery "sources"          the only thing a signal cancels
                      ├─ run_listener      LISTEN -> raw   (one dedicated connection)
                      ├─ run_catchup       tables -> work  (started once LISTEN is active)
                      └─ run_live_metrics  busy machines, running evaluations (--metrics-export)

Sinks start before sources, and the listener reports ``started()`` only once
LISTEN is active. On SIGINT/SIGTERM/SIGHUP the sources stop; closing their send
channels ends each stage in turn, so whatever is in flight is resolved and
exported. A second signal cancels everything at once.

A supervisor wraps the pipeline: if any task fails on an unexpected error (a
bug), the whole pipeline is torn down and started again after a backoff (1 s
doubling to 30 s), with one error line carrying the traceback and
``task_restarts`` counted. Its in-flight work needs no saving: the new
pipeline's catch-up starts from the stored progress marks, which only ever
cover what the endpoint acknowledged. Only an invalid configuration or state
directory and the loss of the instance lock end the process.
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
from dataclasses import dataclass, field

import trio

import hydra_otel
from hydra_otel.adapters import queries
from hydra_otel.adapters.db import (
    ListenItem,
    hold_leadership,
    leader_lock_key,
    open_database,
    open_loop,
    run_listener,
)
from hydra_otel.adapters.otlp import SpanSink
from hydra_otel.adapters.otlp_metrics import MeteredSpanSink, MetricsSink
from hydra_otel.adapters.progress_store import ProgressStore
from hydra_otel.adapters.steplogs import StepLogs
from hydra_otel.config import Config
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.dedup import RecentKeys
from hydra_otel.core.events import DATA_CHANNELS, TRIGGER_CHANNELS, Received
from hydra_otel.core.stitch import Stitcher, Work
from hydra_otel.errors import ConfigError, LeadershipLost, StateDirError
from hydra_otel.pipeline.factories import close_sinks, make_metrics, make_sink, make_step_logs, render_config
from hydra_otel.pipeline.tail import start_tail, store_marks
from hydra_otel.selfmon.server import MetricsSnapshot, gauge, serve_metrics, snapshot_from
from hydra_otel.selfmon.stats import ListenStatistics, Stats
from hydra_otel.tasks.catchup_task import Catchup, CatchupSettings, CatchupState, run_catchup
from hydra_otel.tasks.intake import hint_counter, run_intake
from hydra_otel.tasks.live_metrics import run_live_metrics
from hydra_otel.tasks.resolver import Resolver
from hydra_otel.tasks.stitch_task import KnownJobsets, run_stitcher

log = logging.getLogger("hydra_otel.service")

#: Channels the daemon LISTENs on.
CHANNELS: tuple[str, ...] = DATA_CHANNELS + TRIGGER_CHANNELS


@dataclass(slots=True)
class Service:
    """Handles a running daemon exposes to tests and the CLI."""

    cfg: Config
    sink: SpanSink
    stats: Stats = field(default_factory=Stats)
    listen: ListenStatistics = field(default_factory=ListenStatistics)
    ready: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    catchup_state: CatchupState | None = None
    committed: Marks | None = None
    takeover: bool = False
    metrics: MetricsSink | None = None
    step_logs: StepLogs | None = None
    #: Set while the supervisor waits to start the pipeline again after a failure.
    restarting: bool = False
    _lead: trio.CancelScope | None = None
    _sources: trio.CancelScope | None = None
    _pipeline: trio.CancelScope | None = None

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does); calling it again cancels at once."""
        if self._sources is None or self._pipeline is None:
            if self._lead is not None:  # still standing by (or starting): nothing to drain
                self._lead.cancel()
            return
        if self.stopping:
            self._pipeline.cancel()
            return
        self.stopping = True
        self._pipeline.deadline = trio.current_time() + self.cfg.shutdown_grace
        self._sources.cancel()

    async def run(self) -> None:
        """Run until stopped. Must run inside ``trio_asyncio.open_loop()``.

        Raises:
            LeadershipLost: the connection holding the instance lock died; another instance may be
                active now, so this one stops exporting (the CLI exits non-zero for a restart).
        """
        cfg = self.cfg
        log.info(
            "starting",
            extra={
                "version": hydra_otel.__version__,
                "database": cfg.db.redacted_url,
                "database_from": cfg.db.source,
                "instance": cfg.stitch.instance,
            },
        )
        try:
            store = await _open_store(cfg, self.stats)
            try:
                async with trio.open_nursery() as lead:
                    self._lead = lead.cancel_scope
                    # One active exporter per instance name: standbys wait here for the advisory lock.
                    key = leader_lock_key(cfg.stitch.instance)
                    self.takeover = await lead.start(hold_leadership, cfg.db.url, key)
                    await self._supervise(store)
                    lead.cancel_scope.cancel()
            finally:
                await trio.to_thread.run_sync(store.close)
                await close_sinks(self.sink, self.metrics, self.step_logs)
        finally:
            log.info("stopped", extra=self.stats.snapshot())
            self.stopped.set()

    async def _supervise(self, store: ProgressStore) -> None:
        """Run the pipeline; start it again whenever a task fails on an unexpected error."""
        backoff = Backoff.restart()
        while True:
            began = trio.current_time()
            try:
                await self._run(store)
                return
            except Exception as exc:
                if self.stopping or _fatal(exc):
                    raise
                failure = exc
            finally:
                self._sources = self._pipeline = None  # stop() during the wait: nothing to drain
            if trio.current_time() - began > _HEALTHY_RUN:
                backoff.reset()  # a failure after a long healthy run is not a crash loop
            delay = backoff.next_delay()
            self.stats.task_restarts += 1
            self.restarting = True
            log.error(
                "a pipeline task failed on an unexpected error; restarting the pipeline "
                "(in-flight work is rebuilt from the progress marks)",
                exc_info=failure,
                extra={"retry_in_s": round(delay, 2), "restarts": self.stats.task_restarts},
            )
            del failure
            await trio.sleep(delay)

    async def _run(self, store: ProgressStore) -> None:
        cfg = self.cfg
        raw_tx, raw_rx = trio.open_memory_channel[ListenItem](cfg.queue_size)
        ev_tx, ev_rx = trio.open_memory_channel[Received](cfg.queue_size)
        work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](cfg.queue_size)
        trig_tx, trig_rx = trio.open_memory_channel[str](16)
        stitcher = Stitcher(abandon_after=cfg.stitch.abandon_after, max_open=cfg.stitch.max_open_evals)
        async with open_database(cfg.db.url, stats=self.stats) as db, trio.open_nursery() as pipeline:
            self._pipeline = pipeline.cancel_scope
            handled = RecentKeys()  # what the live path rendered; the catch-up skips it
            resolver = Resolver.create(
                db, render_config(cfg), self.stats, step_logs=self.step_logs, handled=handled
            )
            start_tail(
                pipeline,
                work_rx,
                resolver,
                self.sink,
                self.stats,
                export=cfg.export,
                queue_size=cfg.queue_size,
                commit=store_marks(functools.partial(self._save_marks, store), self.stats),
                live=True,
            )
            known = KnownJobsets(
                functools.partial(queries.existing_jobsets, db),
                every=functools.partial(queries.all_jobsets, db),
                closing=functools.partial(queries.closing_rows, db),
            )
            await pipeline.start(
                functools.partial(run_stitcher, stats=self.stats, jobsets=known),
                ev_rx,
                work_tx.clone(),
                stitcher,
            )
            pipeline.start_soon(run_intake, raw_rx, ev_tx, self.stats, trig_tx)
            # work_tx (the catch-up's) closes once the sources stop; the stitcher closes its clone.
            async with work_tx, trio.open_nursery() as sources:
                self._sources = sources.cancel_scope
                await sources.start(self._listen, raw_tx)
                # Catch-up starts once LISTEN is active, so the table scan and the live stream overlap.
                catchup = Catchup(db, work_tx, self.catchup_settings(), stitcher.open_jobsets, handled)
                self.catchup_state = await sources.start(
                    run_catchup, catchup, store, trig_rx, self.catchup_settings(), resolver.live_jobsets
                )
                if self.metrics is not None and self.metrics.enabled:
                    interval = cfg.telemetry.metrics_interval
                    await sources.start(run_live_metrics, db, self.metrics, interval)
                self.ready.set()
                self.restarting = False
                log.info("ready")

    def healthy(self) -> bool:
        """Ready: LISTEN active, catch-up running, the last export (if any) succeeded, every table
        readable, not restarting after a failure, not stopping."""
        return (
            self.ready.is_set()
            and not self.stopping
            and not self.restarting
            and not self.stats.exporting_failed
            and not self.stats.denied_tables
        )

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Every counter for ``/metrics``."""
        extra = self.step_logs.stats.metrics() if self.step_logs is not None else []
        extra.append(gauge("hydra_otel_ready", "1 while healthy.", int(self.healthy())))
        return snapshot_from(self.stats, self.listen, extra)

    def catchup_settings(self) -> CatchupSettings:
        """Catch-up timing from the configuration."""
        return CatchupSettings(
            interval=self.cfg.catchup_interval,
            overlap=self.cfg.catchup_overlap,
            look_back=self.cfg.takeover_window if self.takeover else 0,
        )

    async def _listen(
        self, raw_tx: trio.MemorySendChannel[ListenItem], task_status: trio.TaskStatus[None]
    ) -> None:
        async with raw_tx:
            await run_listener(
                self.cfg.db.url,
                CHANNELS,
                raw_tx,
                stats=self.listen,
                backoff=Backoff.transient(10.0),
                consume=hint_counter(self.stats),
                # One latency budget: the export delay is also how long the connection collects
                # a trickle of notifications before reading it (docs/performance.md).
                read_linger=self.cfg.export.delay,
                task_status=task_status,
            )

    def _save_marks(self, store: ProgressStore, marks: Marks) -> bool:
        """Merge and store ``marks`` (in a worker thread); a failed write is counted by the store."""
        merged = store.merge(marks)
        if store.pending:  # retried with the next checkpoint
            return False
        self.committed = merged
        return True


#: A pipeline that ran this long before failing starts its restart backoff from the bottom again.
_HEALTHY_RUN = 60.0

#: Errors no restart can fix: they end the process (cli.py maps them to exit codes).
_FATAL = (ConfigError, StateDirError, LeadershipLost)


def _fatal(exc: BaseException) -> bool:
    """Whether ``exc`` (or any error inside it, if it is a group) must end the process."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(_FATAL) is not None
    return isinstance(exc, _FATAL)


async def _open_store(cfg: Config, stats: Stats) -> ProgressStore:
    """The progress store, checked before anything else starts (an unusable one is fatal).

    Raises:
        StateDirError: the message says what is wrong and what to do (the CLI exits with code 2).
    """
    open_store = functools.partial(ProgressStore, cfg.state_dir, instance=cfg.stitch.instance, stats=stats)
    return await trio.to_thread.run_sync(open_store)


#: Each starts a graceful stop; a second one stops at once. SIGHUP too: there is no configuration
#: file to re-read and logs go to stderr (nothing to reopen), and its default action would kill the
#: process without draining (a closed terminal, or a stray `systemctl kill -s HUP`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _watch_signals(service: Service) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info(
                "signal received; draining" if not service.stopping else "second signal; exiting now",
                extra={"signal": signal.Signals(signum).name},
            )
            service.stop()


#: Thresholds of CPython's cyclic garbage collector for the daemon (CPython's are 700, 10, 10). A
#: build burst allocates millions of small containers (span attributes, rows) that live until
#: their spans are exported; at 700 allocations per young collection the collector walks them
#: again and again, about a quarter of the resolver's CPU (docs/performance.md). Little of what
#: the daemon allocates is cyclic, so collecting less often holds little garbage longer.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Collect less often (:data:`GC_THRESHOLDS`); what exists at startup (modules, tables) is
    frozen, so full collections no longer walk it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def main(cfg: Config) -> None:
    """The ``hydra-otel run`` program: the service plus signal handling."""
    tune_gc()
    metrics = make_metrics(cfg)
    stats = Stats()
    service = Service(
        cfg=cfg,
        sink=MeteredSpanSink(make_sink(cfg, stats=stats), metrics),
        metrics=metrics,
        step_logs=make_step_logs(cfg),
        stats=stats,
    )
    async with open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, service)
        if cfg.metrics_address is not None:
            # Outside the pipeline, so serving scrapes never holds up a drain.
            host, port = cfg.metrics_address
            serve = functools.partial(serve_metrics, host, port, service.metrics_snapshot, service.healthy)
            await nursery.start(serve)
        await service.run()
        nursery.cancel_scope.cancel()
