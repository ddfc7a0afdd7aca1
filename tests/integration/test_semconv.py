"""End to end: CI/CD results, error metrics and revisions as the conventions define them.

Real PostgreSQL, scripted Hydra, the real daemon; the error counters come from the daemon's own
metrics pipeline (MeteredSpanSink -> MetricsSink -> OTLP) into an in-process receiver, so the
traces and the metrics of one workload are compared.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
import trio

from hydra_otel.adapters.otlp import Delivery
from hydra_otel.adapters.otlp_metrics import MeteredSpanSink, MetricsSink, make_metric_exporter
from hydra_otel.core.cicd_metrics import PIPELINE_RUN_ACTIVE, PIPELINE_RUN_ERRORS, SYSTEM_ERRORS, WORKER_COUNT
from hydra_otel.core.spans import SpanRecord
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan, attributes_dict
from hydra_otel.pipeline.factories import export_settings, make_sink, otel_resource
from hydra_otel.service import Service
from tests.integration.harness import Hydra, StartDaemon, daemon_config, stop
from tests.metrics_logs_receiver import GrpcMetricsLogsReceiver, ReceivedMetric, point_attributes, sum_points

T0 = 1_700_000_000
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
REV = "4a1f2e3d" * 5
BUILD_SPAN_TYPES = {"build", "evaluation", "attempt"}


@pytest.fixture
def metrics_receiver() -> Iterator[GrpcMetricsLogsReceiver]:
    """A running OTLP/gRPC metrics receiver."""
    with GrpcMetricsLogsReceiver() as r:
        yield r


class Watched:
    """A span sink that says how many spans its inner sink has taken (the export call returned)."""

    def __init__(self, inner: MeteredSpanSink) -> None:
        self._inner = inner
        self._changed = trio.Event()
        self.exported = 0

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        delivery = await self._inner.export(batch)
        self.exported += len(batch)
        self._changed.set()
        self._changed = trio.Event()
        return delivery

    async def wait_for(self, spans: int) -> None:
        while self.exported < spans:
            await self._changed.wait()

    def shutdown(self) -> None:
        self._inner.shutdown()


class Metered(NamedTuple):
    """The metrics pipeline of a started daemon."""

    metrics: MetricsSink
    sink: Watched


StartMetered = Callable[[], Awaitable[Metered]]


@pytest.fixture
async def start_metered(
    aio_loop: asyncio.AbstractEventLoop,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    metrics_receiver: GrpcMetricsLogsReceiver,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> AsyncIterator[StartMetered]:
    """Start the daemon with its metrics pipeline wired as ``run`` wires it, exporting only on flush."""
    services: list[Service] = []

    async def start() -> Metered:
        cfg = daemon_config(hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path)
        exporter = make_metric_exporter(export_settings(cfg), f"http://{metrics_receiver.endpoint}")
        metrics = MetricsSink(exporter, otel_resource(cfg), interval_s=math.inf)
        sink = Watched(MeteredSpanSink(make_sink(cfg), metrics))
        service = Service(cfg=cfg, sink=sink, metrics=metrics)
        nursery.start_soon(service.run)
        with trio.fail_after(15):
            await service.ready.wait()
        services.append(service)
        return Metered(metrics, sink)

    yield start
    for service in services:
        await stop(service)


async def flushed(metrics: MetricsSink, receiver: GrpcMetricsLogsReceiver) -> list[ReceivedMetric]:
    with trio.fail_after(20):
        assert await metrics.force_flush()
        await receiver.wait_until(lambda: bool(receiver.metrics()))
    return receiver.metrics()


def by_job(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {
        str(attributes_dict(s.span.attributes)["hydra.build.job"]): s
        for s in spans
        if s.span.name.startswith("build ")
    }


async def test_results_status_and_error_metric_agree(
    hydra: Hydra,
    start_metered: StartMetered,
    otlp_grpc: GrpcOtlpReceiver,
    metrics_receiver: GrpcMetricsLogsReceiver,
) -> None:
    """Cancelled and obsolete (skipped) builds: UNSET, cancellation/skip, no error.type; the error
    counters count exactly the ERROR spans (failed build as a pipeline error, aborted as a system one)."""
    metered = await start_metered()
    jobs = ["ok", "cancelled", "obsolete", "failed", "aborted"]
    _, ids, sql = hydra.sim.eval_added(
        1, "1.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=12,
        new_builds=[NewBuild(job=j, nixname=j) for j in jobs],
    )  # fmt: skip
    await hydra.run(*sql)
    statuses = dict(zip(jobs, (0, 4, 5, 1, 3), strict=True))
    for job, build_id in zip(jobs, ids, strict=True):
        await hydra.run(hydra.sim.build_finished(build_id, start=T0 + 20, stop=T0 + 30, status=statuses[job]))
    spans = await otlp_grpc.wait_for_spans(3 + len(jobs))
    builds = by_job(spans)
    expected = {
        "ok": (STATUS_OK, "success", None),
        "cancelled": (STATUS_UNSET, "cancellation", None),
        "obsolete": (STATUS_UNSET, "skip", None),
        "failed": (STATUS_ERROR, "failure", "build_failed"),
        "aborted": (STATUS_ERROR, "error", "aborted"),
    }
    for job, (code, result, error_type) in expected.items():
        attrs = attributes_dict(builds[job].span.attributes)
        assert (builds[job].span.status.code, attrs["cicd.pipeline.task.run.result"]) == (code, result), job
        assert attrs.get("error.type") == error_type, job
    # The receiver holds the spans before the export call returns and the sink counts them.
    with trio.fail_after(10):
        await metered.sink.wait_for(len(spans))
    got = await flushed(metered.metrics, metrics_receiver)
    pipeline = {point_attributes(p)["error.type"]: p.as_int for p in sum_points(got, PIPELINE_RUN_ERRORS)}
    system = {point_attributes(p)["error.type"]: p.as_int for p in sum_points(got, SYSTEM_ERRORS)}
    assert (pipeline, system) == ({"build_failed": 1}, {"aborted": 1})
    # What a span-metrics connector would count: ERROR spans of runs and builds.
    errors = [
        s
        for s in spans
        if s.span.status.code == STATUS_ERROR
        and attributes_dict(s.span.attributes)["hydra.span.type"] in BUILD_SPAN_TYPES
    ]
    assert len(errors) == sum(pipeline.values()) + sum(system.values())


async def test_evaluation_carries_its_revision_and_inputs(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """The nixexpr input gives vcs.* (credentials and .git removed); every input is an event."""
    await start_daemon()
    inputs = [
        ("src", "git", "https://ci:s3cret@git.example.org/nixpkgs.git", REV),
        ("nixpkgs", "git", "git@github.com:NixOS/nixpkgs", "b" * 40),
        ("system", "string", None, None),
    ]
    _, _, sql = hydra.sim.eval_added(
        1, "1.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=8, inputs=inputs
    )
    await hydra.run(*sql)
    spans = await otlp_grpc.wait_for_spans(3)
    (root,) = [s for s in spans if s.span.name == "BUILD nixpkgs:trunk"]
    attrs = attributes_dict(root.span.attributes)
    assert attrs["vcs.ref.head.revision"] == REV
    assert attrs["vcs.repository.url.full"] == "https://git.example.org/nixpkgs"
    assert (attrs["hydra.eval.main_input"], attrs["cicd.pipeline.action.name"]) == ("src", "BUILD")
    events = [attributes_dict(e.attributes) for e in root.span.events if e.name == "hydra.eval.input"]
    assert events == [
        {"hydra.eval.input.name": "nixpkgs", "hydra.eval.input.type": "git",
         "hydra.eval.input.uri": "git@github.com:NixOS/nixpkgs", "hydra.eval.input.revision": "b" * 40},
        {"hydra.eval.input.name": "src", "hydra.eval.input.type": "git",
         "hydra.eval.input.uri": "https://git.example.org/nixpkgs.git", "hydra.eval.input.revision": REV},
        {"hydra.eval.input.name": "system", "hydra.eval.input.type": "string"},
    ]  # fmt: skip
    assert "s3cret" not in str(root.span)


async def test_flake_evaluation_revision(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A flake jobset: revision and repository come from the locked flake reference."""
    await start_daemon()
    flake = f"github:NixOS/nixpkgs/{REV}"
    _, _, sql = hydra.sim.eval_added(
        1, "1.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=8, flake=flake
    )
    await hydra.run(*sql)
    spans = await otlp_grpc.wait_for_spans(3)
    (root,) = [s for s in spans if s.span.name == "BUILD nixpkgs:trunk"]
    attrs = attributes_dict(root.span.attributes)
    assert (attrs["vcs.ref.head.revision"], attrs["vcs.repository.url.full"]) == (
        REV,
        "https://github.com/NixOS/nixpkgs",
    )
    assert attrs["hydra.eval.main_input"] == "flake"


async def test_unreadable_inputs_still_export_the_evaluation(
    hydra: Hydra, hydra_db: str, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """A role without the jobsetevalinputs GRANT: the evaluation is exported, without revision."""
    role = re.sub(r"[^a-z0-9_]", "_", f"no_inputs_{tmp_path.name.lower()[-20:]}")
    await hydra.run(
        f"CREATE ROLE {role} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; "
        f"REVOKE SELECT ON jobsetevalinputs FROM {role};"
    )
    await start_daemon(database_url=hydra_db.replace("postgres@", f"{role}@"))
    _, _, sql = hydra.sim.eval_added(
        1, "1.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=8,
        inputs=[("src", "git", "https://example.org/r", REV)],
    )  # fmt: skip
    await hydra.run(*sql)
    spans = await otlp_grpc.wait_for_spans(3)
    (root,) = [s for s in spans if s.span.name == "BUILD nixpkgs:trunk"]
    attrs = attributes_dict(root.span.attributes)
    assert "vcs.ref.head.revision" not in attrs
    assert not [e for e in root.span.events if e.name == "hydra.eval.input"]


async def test_live_runs_and_busy_workers(
    hydra: Hydra, start_metered: StartMetered, metrics_receiver: GrpcMetricsLogsReceiver
) -> None:
    """cicd.pipeline.run.active from jobsets.starttime, cicd.worker.count from busy steps' machines."""
    _, (b1, b2, b3), sql = hydra.sim.eval_added(
        2, "2.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=8,
        new_builds=[NewBuild(job=j, nixname=j) for j in ("a", "b", "c")],
    )  # fmt: skip
    await hydra.run(*sql)
    await hydra.run(*hydra.sim.evaluator_starts(1, "1.1", T0 + 20))  # sets jobsets.starttime
    await hydra.run(
        hydra.sim.step_started(b1, 1, now=T0 + 30, machine="ssh://builder-1"),
        hydra.sim.step_started(b2, 1, now=T0 + 30, machine="ssh://builder-1"),
        hydra.sim.step_started(b3, 1, now=T0 + 30, machine="ssh://builder-2"),
    )
    got = await flushed((await start_metered()).metrics, metrics_receiver)
    active = {
        str(point_attributes(p)["cicd.pipeline.name"]): p.as_int for p in sum_points(got, PIPELINE_RUN_ACTIVE)
    }
    assert active == {"nixpkgs:trunk": 1}
    (workers,) = sum_points(got, WORKER_COUNT)
    assert (point_attributes(workers), workers.as_int) == ({"cicd.worker.state": "busy"}, 2)
