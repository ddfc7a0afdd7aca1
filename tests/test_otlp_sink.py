"""OtlpSink's splitting and resuming, with a fake exporter (no sockets)."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from hydra_otel.adapters.otlp import DEFAULT_MAX_REQUEST_BYTES, OtlpSink
from hydra_otel.config import EXPORT_MAX_REQUEST_BYTES
from hydra_otel.core.otlp_wire import Encoded
from hydra_otel.core.spans import SpanRecord
from tests.factories import make_span


def span(n: int) -> SpanRecord:
    return make_span(span_id=n, attributes=(("padding", "x" * 1000),))  # about 1 KB encoded


class FlakyExporter:
    """Acknowledges requests, except the ones whose call numbers are in ``fail``."""

    def __init__(self, fail: set[int]) -> None:
        self.fail = fail
        self.calls = 0
        self.delivered: list[int] = []

    def export_encoded(self, batch: Encoded) -> bool:
        self.calls += 1
        if self.calls in self.fail:
            return False
        request = ExportTraceServiceRequest.FromString(batch.payload)
        ids = [int.from_bytes(s.span_id, "big") for s in request.resource_spans[0].scope_spans[0].spans]
        assert len(ids) == batch.spans
        self.delivered += ids
        return True

    def shutdown(self) -> None:
        pass


async def test_a_retried_batch_resumes_after_the_acknowledged_requests() -> None:
    exporter = FlakyExporter(fail={3})
    sink = OtlpSink(exporter, Resource({"service.name": "t"}), max_request_bytes=5_000)  # ~4 spans a request
    batch = [span(n) for n in range(1, 21)]
    assert not await sink.export(batch)
    delivered_before = list(exporter.delivered)
    assert 0 < len(delivered_before) < 20
    assert await sink.export(batch)  # the exporter task retries the same batch object
    assert exporter.delivered == list(range(1, 21))  # each span once, in order
    assert delivered_before == exporter.delivered[: len(delivered_before)]


async def test_another_batch_after_a_failure_starts_afresh() -> None:
    exporter = FlakyExporter(fail={2})
    sink = OtlpSink(exporter, Resource({"service.name": "t"}), max_request_bytes=5_000)
    assert not await sink.export([span(n) for n in range(1, 21)])
    exporter.delivered.clear()
    assert await sink.export([span(n) for n in range(100, 103)])
    assert exporter.delivered == [100, 101, 102]


def test_the_default_limit_is_the_documented_one() -> None:
    assert int(EXPORT_MAX_REQUEST_BYTES.default) == DEFAULT_MAX_REQUEST_BYTES
