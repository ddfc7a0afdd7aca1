"""``hydra-otel demo``: the real daemon against a scripted Hydra, with the traces shown in the terminal.

Theory of operation (Trio-flavoured; :func:`run_demo` opens its own trio-asyncio loop)::

    PgCluster (worker thread)        throwaway PostgreSQL, database "hydra" with Hydra's schema 87
    └─ GrpcOtlpReceiver              in-process OTLP/gRPC receiver (unless OTEL_EXPORTER_OTLP_*ENDPOINT is set)
       └─ open_loop()             trio-asyncio, for the daemon's database adapter
          ├─ Daemon.run              the daemon, exactly as ``hydra-otel run`` runs it (the CLI passes it in)
          └─ play the workload       workload.py's steps, on a second connection, so NOTIFYs are real

Once every expected span has arrived (or a deadline passed) the daemon is stopped gracefully, then the
receiver and the cluster, whose files are deleted. Only then are the traces drawn as waterfalls and
saved as OTLP/JSON, so nothing of the demo is running or left behind but its output directory. Ctrl-C
or SIGTERM cancels the whole tree; every layer cleans up on the way out (the cluster's stop is
blocking, so it runs in a thread, shielded from the cancellation).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hydra_otel import config
from hydra_otel.adapters.db import open_connection, open_loop
from hydra_otel.demo.sandbox.pgcluster import PgCluster, SandboxError
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan
from hydra_otel.demo.waterfall import from_otlp, group_traces, otlp_json, render_waterfall
from hydra_otel.demo.workload import FULL, SHORT, Workload
from hydra_otel.errors import ConfigError
from hydra_otel.selfmon.stats import Stats

#: Hydra's web address in span links (the demo has no web UI; this is Hydra's default).
HYDRA_URL: Final = "http://localhost:3000"
#: Variables that send the demo's spans to a real collector instead of the embedded receiver.
ENDPOINT_VARIABLES: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: Seconds a step waits for its spans, on top of the workload's abandon limit.
SPAN_TIMEOUT: Final = 10.0
_READY_TIMEOUT: Final = 30.0
_TRACE_FILE: Final = re.compile(r"[0-9a-f]{32}\.json")
_JAEGER: Final = "docker run --rm -d --name jaeger -p 16686:16686 -p 4317:4317 jaegertracing/jaeger"


class Daemon(Protocol):
    """What the demo drives of the daemon: ``hydra_otel.service.Service``, which the CLI builds.

    The demo takes the daemon from the composition root rather than importing it, so that
    nothing but the CLI depends on ``service.py``.
    """

    @property
    def stats(self) -> Stats:
        """The daemon's counters."""
        ...

    @property
    def ready(self) -> trio.Event:
        """Set once LISTEN is active and the catch-up began."""
        ...

    @property
    def stopped(self) -> trio.Event:
        """Set once :meth:`run` returned."""
        ...

    async def run(self) -> None:
        """Run until stopped (inside ``open_loop()``)."""
        ...

    def stop(self) -> None:
        """Begin a graceful stop."""
        ...


#: Builds the daemon for a configuration.
DaemonFactory = Callable[[config.Config], Daemon]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """What ``hydra-otel demo`` was asked for.

    Attributes:
        short: play the small workload (for CI).
        out_dir: where the OTLP/JSON files go.
        width: waterfall width; the terminal's when None (at least 64).
        ascii: draw waterfalls with ASCII characters only.
        speed: multiplies the workload's pauses; 0 plays without any.
    """

    short: bool = False
    out_dir: Path = Path("hydra-otel-demo")
    width: int | None = None
    ascii: bool = False
    speed: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Played:
    """What a demo run produced."""

    endpoint: str
    complete: bool
    exported: int
    received: list[ReceivedSpan] | None  # None: exported to an external endpoint
    requests: list[ExportTraceServiceRequest]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(opts: DemoOptions, daemon: DaemonFactory) -> int:
    """Run the demo (Trio-flavoured; it opens its own trio-asyncio loop).

    Args:
        opts: what to play and where to put the output.
        daemon: builds the daemon for the demo's configuration (the CLI passes ``hydra-otel run``'s).

    Returns:
        The exit code: 0 when every expected span arrived, 1 when some did not or PostgreSQL is
        missing, 2 for an invalid ``OTEL_*`` variable, 130 when interrupted by SIGINT or SIGTERM.
    """
    with trio.CancelScope() as interrupted:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, interrupted)
            code = await _demo(opts, daemon)
            nursery.cancel_scope.cancel()
        return code
    _say("\ninterrupted: the daemon, the OTLP receiver and PostgreSQL are stopped, their files removed")
    return 130


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _demo(opts: DemoOptions, daemon: DaemonFactory) -> int:
    workload = SHORT if opts.short else FULL
    endpoint = external_endpoint(os.environ)
    _say("hydra-otel demo: a scripted Hydra plays its SQL and NOTIFYs against a throwaway PostgreSQL")
    _say("while the hydra-otel daemon LISTENs, turns them into traces and exports them over OTLP.\n")
    try:
        played = await _run(workload, endpoint, opts.speed, daemon)
    except SandboxError as exc:  # PostgresNotFoundError included: its message says how to install it
        print(f"hydra-otel demo needs a PostgreSQL server it can start.\n{exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"hydra-otel demo: {exc}", file=sys.stderr)
        return 2
    if played.received is None:
        return _report_external(played, workload)
    return _report(played, played.received, workload, opts)


def external_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint the environment names, if any (an empty variable counts as unset)."""
    return next((environ[v] for v in ENDPOINT_VARIABLES if environ.get(v)), None)


async def _run(workload: Workload, endpoint: str | None, speed: float, daemon: DaemonFactory) -> Played:
    async with open_cluster() as cluster:
        dsn = await trio.to_thread.run_sync(cluster.createdb, "hydra", 87)
        with contextlib.ExitStack() as stack:
            receiver = None if endpoint else stack.enter_context(GrpcOtlpReceiver())
            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hydra-otel-demo-")))
            target = None if receiver is None else f"http://{receiver.endpoint}"
            cfg = demo_config(dsn, state, workload, receiver=target, environ=os.environ)
            complete, exported = await _play(daemon(cfg), cfg, workload, receiver, speed)
            received = None if receiver is None else receiver.spans()
            requests = [] if receiver is None else receiver.requests
    _say("daemon, receiver and PostgreSQL stopped; the cluster's files are removed.\n")
    return Played(
        endpoint=cfg.export.traces.endpoint,
        complete=complete,
        exported=exported,
        received=received,
        requests=requests,
    )


@contextlib.asynccontextmanager
async def open_cluster() -> AsyncIterator[PgCluster]:
    """A throwaway PostgreSQL cluster (Trio-flavoured), stopped and deleted on exit, even when cancelled.

    Raises:
        PostgresNotFoundError: PostgreSQL is not installed (the message says how to install it).
        SandboxError: the cluster could not be created.
    """
    _say("starting a throwaway PostgreSQL ...")
    cluster = await trio.to_thread.run_sync(PgCluster)
    try:
        _say(f"PostgreSQL is up: data in {cluster.data_dir}, unix socket only")
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.stop)


def demo_config(
    dsn: str, state_dir: Path, workload: Workload, *, receiver: str | None, environ: Mapping[str, str]
) -> config.Config:
    """The daemon's configuration: the sandbox database, a temporary state directory, short delays.

    ``receiver`` is the embedded receiver's endpoint; None exports where the ``OTEL_*`` variables of
    ``environ`` say (no other variable is read). Raises ConfigError for an invalid ``OTEL_*`` variable.
    """
    flags: dict[str, str | None] = {
        "database_url": dsn,
        "hydra_url": HYDRA_URL,
        "state_dir": str(state_dir),
        # Trace IDs derive from the instance and Hydra's IDs, which every demo run repeats: a
        # per-run instance keeps two runs into the same Jaeger from sharing trace IDs.
        "instance": f"demo-{int(time.time())}-{os.getpid()}",
        "export_delay": "0.2",
        "shutdown_grace": "10",
        "eval_abandon_after": f"{workload.abandon_after:g}",
    }
    env = {k: v for k, v in environ.items() if k.startswith("OTEL_")}
    if receiver is not None:
        flags |= {"otlp_endpoint": receiver, "otlp_protocol": "grpc"}
        env = {}
    env.setdefault("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=demo")
    return config.load(flags, env)


async def _play(
    service: Daemon, cfg: config.Config, workload: Workload, receiver: GrpcOtlpReceiver | None, speed: float
) -> tuple[bool, int]:
    """Run the daemon, play the workload step by step, then stop the daemon gracefully.

    Returns:
        Whether every expected span arrived, and how many spans the daemon exported.
    """
    count: Callable[[], int] = (
        (lambda: service.stats.spans_exported) if receiver is None else (lambda: len(receiver.spans()))
    )
    async with open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        with trio.fail_after(_READY_TIMEOUT):
            await service.ready.wait()
        where = "the built-in OTLP receiver" if receiver is not None else "your collector"
        _say(
            f"hydra-otel daemon ready: LISTENing on Hydra's channels, exporting to {where} at {cfg.export.traces.endpoint}"
        )
        started = trio.current_time()
        await play_workload(cfg.db.url, workload, speed=speed, count=count)
        complete = count() >= workload.spans
        _say(f"{count()} spans exported in {trio.current_time() - started:.1f}s; stopping the daemon ...")
        service.stop()
        await service.stopped.wait()
    return complete, service.stats.spans_exported


async def play_workload(
    dsn: str, workload: Workload, *, speed: float = 0.0, count: Callable[[], int] | None = None
) -> None:
    """Play every step of ``workload`` on a connection of its own, printing one line per step.

    Hydra's actions are minutes apart, the script's milliseconds: with ``count``, each step waits
    until the spans of the steps before it arrived (or a deadline passed), as the daemon would have
    had the time to export them.

    Args:
        dsn: the database to play it in (the daemon's, which must be LISTENing already).
        workload: the steps.
        speed: multiplies each step's pause; 0 plays them with only their minimum pauses.
        count: how many spans have arrived so far; after one step's spans failed to arrive in
            time, the rest are played without waiting.
    """
    script = workload.script()
    total, expected = len(workload.steps), 0
    dated = time.strftime("%H:%M", time.localtime(script.base))
    _say(f"playing Hydra's part ({total} actions; Hydra's rows say they began at {dated}):")
    async with open_connection(dsn) as conn:
        for n, step in enumerate(workload.steps, 1):
            await trio.sleep(max(step.pause * speed, step.min_pause))
            before = 0 if count is None else count()
            for sql in step.play(script):
                await conn.execute(sql)
            expected += step.spans
            line = f"[{n:>{len(str(total))}}/{total}] {step.label}"
            if count is not None and step.spans:
                with trio.move_on_after(workload.abandon_after + SPAN_TIMEOUT) as deadline:
                    await wait_for_count(count, expected)
                new = count() - before
                line += f"  → {new} span{'' if new == 1 else 's'}"
                if deadline.cancelled_caught:  # the daemon is stuck or lost some: stop waiting for it
                    line += f" (expected {step.spans}; not waiting any more)"
                    count = None
            _say(line)


async def wait_for_count(count: Callable[[], int], expected: int) -> None:
    """Wait until ``count()`` reaches ``expected`` (Trio-flavoured; the caller owns the deadline).

    Args:
        count: polled every 50 ms.
        expected: the value to reach.
    """
    # ASYNC110: the count grows on other threads (the receiver's); a poll is simplest.
    while count() < expected:  # noqa: ASYNC110
        await trio.sleep(0.05)


def _report_external(played: Played, workload: Workload) -> int:
    _say(f"{played.exported} spans (of {workload.spans} expected) exported to {played.endpoint}.")
    _say("Look for the service hydra-otel in your tracing UI (Jaeger: http://localhost:16686).")
    return 0 if played.complete else 1


def _report(played: Played, received: list[ReceivedSpan], workload: Workload, opts: DemoOptions) -> int:
    views = [from_otlp(r.span) for r in received]
    traces = sorted(group_traces(views).values(), key=lambda t: min(s.start_ns for s in t))
    width = max(64, opts.width or shutil.get_terminal_size().columns)
    roots = {r.span.trace_id: r for r in received if not r.span.parent_span_id}
    for spans in traces:
        _say(_caption(roots.get(spans[0].trace_id.to_bytes(16, "big")), width, opts.ascii))
        _say(render_waterfall(spans, width=width, ascii=opts.ascii))
    save_traces(played.requests, [t[0].trace_id for t in traces], opts.out_dir)
    got, wanted = (len(traces), len(views)), (workload.traces, workload.spans)
    missed = f", but the workload makes {wanted[0]} and {wanted[1]} (see the progress lines)."
    _say(f"{got[0]} traces, {got[1]} spans" + (", as expected." if got == wanted else missed))
    _say(f"Saved as OTLP/JSON in {opts.out_dir}/: one <trace id>.json per trace, and all-traces.json.")
    ago = f"{workload.starts_before // 60} minutes back"
    _say(f"Times: evaluations and builds come from Hydra's rows (the script dated them {ago});")
    _say("'evaluator run' and the attempts that left no row (cached, failed, killed, abandoned) are")
    _say("timed by the daemon as their notifications arrived.\n")
    _say("To see them in Jaeger:")
    _say(f"  {_JAEGER}")
    _say("  OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 hydra-otel demo")
    _say("  then open http://localhost:16686 and pick the service hydra-otel.")
    _say("To point hydra-otel at your own Hydra, see docs/quickstart.md.")
    return 0 if played.complete and got == wanted else 1


def _caption(root: ReceivedSpan | None, width: int, ascii_only: bool) -> str:
    """One line on what the trace's root span says: pipeline, result and why."""
    if root is None:
        return "(a trace without its root span)"
    a = from_otlp(root.span).attributes
    text = f"{'>' if ascii_only else '▸'} {a.get('cicd.pipeline.name')}: {a.get('cicd.pipeline.result')}"
    if a.get("error.type"):
        text += f" ({a['error.type']}): {root.span.status.message}"
    elif a.get("hydra.eval.inputs_unchanged"):
        text += f", inputs unchanged since evaluation {a.get('hydra.eval.previous_id')}"
    elif "hydra.eval.id" in a:
        text += f", evaluation {a['hydra.eval.id']} with {a.get('hydra.eval.builds.new')} new builds"
    return text if len(text) <= width else text[: width - 1] + ("~" if ascii_only else "…")


def save_traces(
    requests: Sequence[ExportTraceServiceRequest], trace_ids: Sequence[int], out_dir: Path
) -> None:
    """Write ``<trace id>.json`` per trace and ``all-traces.json`` (OTLP/JSON) into ``out_dir``.

    Trace files of an earlier run are removed first (trace IDs differ from run to run).

    Args:
        requests: the export requests received.
        trace_ids: the traces to write one file each for.
        out_dir: the directory, created if missing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if _TRACE_FILE.fullmatch(old.name):
            old.unlink()
    for trace_id in trace_ids:
        one = only_trace(requests, trace_id.to_bytes(16, "big"))
        (out_dir / f"{trace_id:032x}.json").write_text(otlp_json([one]), encoding="utf-8")
    (out_dir / "all-traces.json").write_text(otlp_json(requests), encoding="utf-8")


def only_trace(requests: Sequence[ExportTraceServiceRequest], trace_id: bytes) -> ExportTraceServiceRequest:
    """One request holding the spans of trace ``trace_id``, under their resources and scopes."""
    out = ExportTraceServiceRequest()
    for request in requests:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                spans = [s for s in scope_spans.spans if s.trace_id == trace_id]
                if not spans:
                    continue
                rs = out.resource_spans.add(
                    resource=resource_spans.resource, schema_url=resource_spans.schema_url
                )
                ss = rs.scope_spans.add(scope=scope_spans.scope, schema_url=scope_spans.schema_url)
                ss.spans.extend(spans)
    return out
