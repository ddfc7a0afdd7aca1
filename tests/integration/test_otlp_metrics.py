"""CI/CD metrics over OTLP/gRPC: MetricsSink and MeteredSpanSink against an in-process receiver.

Real SDK pipeline (MeterProvider, Views, PeriodicExportingMetricReader, the official exporter); the
reader's interval is infinite so exports happen exactly at ``force_flush`` and ``shutdown``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import trio
from opentelemetry.sdk.resources import Resource

from hydra_otel.adapters.otlp import Delivery, ExporterSettings, SpanSink
from hydra_otel.adapters.otlp_metrics import (
    MeteredSpanSink,
    MetricsSink,
    make_metric_exporter,
    make_metrics_sink,
    signal_endpoint,
)
from hydra_otel.core.builds import build_spans
from hydra_otel.core.cicd_metrics import (
    BUILD_DURATION,
    BUILD_QUEUE_WAIT,
    DURATION_BUCKETS,
    PIPELINE_RUN_ERRORS,
    STEP_DURATION,
    MetricDeriver,
)
from hydra_otel.core.spans import SpanRecord
from tests.core.test_cicd_metrics import BUILD, CFG, STEPS
from tests.metrics_logs_receiver import (
    GrpcMetricsLogsReceiver,
    histogram_points,
    point_attributes,
    sum_points,
)

RESOURCE = Resource({"service.name": "hydra-otel-test"})


@pytest.fixture
def receiver() -> Iterator[GrpcMetricsLogsReceiver]:
    """A running OTLP/gRPC metrics and logs receiver."""
    with GrpcMetricsLogsReceiver() as r:
        yield r


def grpc_settings(endpoint: str) -> ExporterSettings:
    """Exporter settings for a plaintext gRPC collector at ``endpoint``."""
    return ExporterSettings(protocol="grpc", endpoint=f"http://{endpoint}", headers={}, timeout_s=5.0)


class FakeSpanSink:
    """A span sink that answers with ``ok`` and remembers what it was given."""

    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.batches: list[Sequence[SpanRecord]] = []
        self.closed = False

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        """Take the batch."""
        await trio.lowlevel.checkpoint()
        self.batches.append(batch)
        return Delivery(done=self.ok)

    def shutdown(self) -> None:
        """Remember the shutdown."""
        self.closed = True


async def test_histograms_and_counters_arrive(receiver: GrpcMetricsLogsReceiver) -> None:
    """Observations become explicit-bucket histograms and a counter, with their attributes and resource."""
    sink = MetricsSink(make_metric_exporter(grpc_settings(receiver.endpoint)), RESOURCE, interval_s=math.inf)
    failed = build_spans(CFG, BUILD._replace(build_id=101, status=1), STEPS)
    sink.record(MetricDeriver().observe([*build_spans(CFG, BUILD, STEPS), *failed]))
    with trio.fail_after(20):
        assert await sink.force_flush()
        await receiver.wait_until(lambda: bool(receiver.metrics()))
        metrics = receiver.metrics()  # the one export so far
        await sink.shutdown()
    assert metrics[0].resource["service.name"] == "hydra-otel-test"
    builds = histogram_points(metrics, BUILD_DURATION)
    assert {str(point_attributes(p)["cicd.pipeline.task.run.result"]) for p in builds} == {
        "success",
        "failure",
    }
    ok = next(p for p in builds if point_attributes(p)["cicd.pipeline.task.run.result"] == "success")
    assert list(ok.explicit_bounds) == list(DURATION_BUCKETS)
    assert (ok.count, ok.sum) == (1, 300.0)
    assert list(ok.bucket_counts)[DURATION_BUCKETS.index(300.0)] == 1  # 300 s falls in (120, 300]
    assert point_attributes(ok) == {
        "cicd.pipeline.name": "nixpkgs:trunk",
        "hydra.system": "x86_64-linux",
        "cicd.pipeline.task.run.result": "success",
        "hydra.build.cached": False,
    }
    (queue,) = histogram_points(metrics, BUILD_QUEUE_WAIT)
    assert (queue.count, queue.sum) == (2, 160.0)
    steps = histogram_points(metrics, STEP_DURATION)
    assert sum(p.count for p in steps) == 4
    (errors,) = sum_points(metrics, PIPELINE_RUN_ERRORS)
    assert errors.as_int == 1
    assert point_attributes(errors) == {"cicd.pipeline.name": "nixpkgs:trunk", "error.type": "build_failed"}
    assert next(m for m in metrics if m.metric.name == PIPELINE_RUN_ERRORS).metric.sum.is_monotonic


async def test_metered_sink_measures_only_acknowledged_batches(receiver: GrpcMetricsLogsReceiver) -> None:
    """A failed export records nothing; once acknowledged the batch is measured, and only once."""
    metrics = MetricsSink(
        make_metric_exporter(grpc_settings(receiver.endpoint)), RESOURCE, interval_s=math.inf
    )
    inner = FakeSpanSink(ok=False)
    sink: SpanSink = MeteredSpanSink(inner, metrics)
    batch = build_spans(CFG, BUILD, STEPS)
    assert not (await sink.export(batch)).done
    assert metrics.recorded == 0
    inner.ok = True
    assert (await sink.export(batch)).done
    assert (await sink.export(batch)).done  # at-least-once: the same spans again
    assert metrics.recorded == 4
    assert isinstance(sink, MeteredSpanSink)
    assert sink.deriver.repeats == 4
    sink.shutdown()
    assert inner.closed
    with trio.fail_after(20):
        await metrics.shutdown()  # the final export happens here
        await receiver.wait_until(lambda: bool(receiver.metrics()))
    assert histogram_points(receiver.metrics(), BUILD_DURATION)[0].count == 1


async def test_disabled_sink_does_nothing() -> None:
    """With metrics off, recording and flushing are no-ops and nothing is exported."""
    sink = make_metrics_sink(grpc_settings("127.0.0.1:1"), RESOURCE, enabled=False)
    assert not sink.enabled
    sink.record(MetricDeriver().observe(build_spans(CFG, BUILD, STEPS)))
    assert sink.recorded == 0
    assert await sink.force_flush()
    await sink.shutdown()


def test_metrics_endpoint_for_each_protocol() -> None:
    """gRPC keeps the endpoint; HTTP swaps /v1/traces for /v1/metrics, or appends it to a base URL."""
    grpc = ExporterSettings(protocol="grpc", endpoint="http://collector:4317", headers={}, timeout_s=5)
    http = ExporterSettings(
        protocol="http/protobuf", endpoint="https://collector:4318/v1/traces", headers={}, timeout_s=5
    )
    assert signal_endpoint(grpc, "metrics") == "http://collector:4317"
    assert signal_endpoint(http, "metrics") == "https://collector:4318/v1/metrics"
    base = ExporterSettings(protocol="http/protobuf", endpoint="http://c:4318/otlp/", headers={}, timeout_s=5)
    assert signal_endpoint(base, "logs") == "http://c:4318/otlp/v1/logs"
