"""OtlpSink's splitting, resuming and isolation of refused spans, with a fake exporter (no sockets)."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from hydra_otel.adapters.otlp import DEFAULT_MAX_REQUEST_BYTES, OtlpSink
from hydra_otel.adapters.otlp_exporters import SENT, Sent
from hydra_otel.config import EXPORT_MAX_REQUEST_BYTES
from hydra_otel.core.otlp_wire import Encoded
from hydra_otel.core.spans import SpanRecord
from tests.factories import make_span

RESOURCE = Resource({"service.name": "t"})


def span(n: int) -> SpanRecord:
    return make_span(span_id=n, attributes=(("padding", "x" * 1000),))  # about 1 KB encoded


class FlakyExporter:
    """Acknowledges requests, except the ones whose call numbers are in ``fail``, and refuses any
    request holding a span whose ID is in ``poison`` (as a collector refuses a whole request)."""

    def __init__(self, fail: frozenset[int] = frozenset(), poison: frozenset[int] = frozenset()) -> None:
        self.fail = fail
        self.poison = poison
        self.calls = 0
        self.delivered: list[int] = []

    def export_encoded(self, batch: Encoded) -> Sent:
        self.calls += 1
        if self.calls in self.fail:
            return Sent(ok=False, reason="UNAVAILABLE: down")
        request = ExportTraceServiceRequest.FromString(batch.payload)
        ids = [int.from_bytes(s.span_id, "big") for s in request.resource_spans[0].scope_spans[0].spans]
        assert len(ids) == batch.spans
        if self.poison & set(ids):
            return Sent(ok=False, refused=True, reason="INVALID_ARGUMENT: bad span")
        self.delivered += ids
        return SENT

    def shutdown(self) -> None:
        pass


async def test_a_retried_batch_resumes_after_the_acknowledged_requests() -> None:
    exporter = FlakyExporter(fail=frozenset({3}))
    sink = OtlpSink(exporter, RESOURCE, max_request_bytes=5_000)  # ~4 spans a request
    batch = [span(n) for n in range(1, 21)]
    first = await sink.export(batch)
    assert not first.done
    assert first.reason == "UNAVAILABLE: down"
    delivered_before = list(exporter.delivered)
    assert 0 < len(delivered_before) < 20
    assert (await sink.export(batch)).done  # the exporter task retries the same batch object
    assert exporter.delivered == list(range(1, 21))  # each span once, in order
    assert delivered_before == exporter.delivered[: len(delivered_before)]


async def test_another_batch_after_a_failure_starts_afresh() -> None:
    exporter = FlakyExporter(fail=frozenset({2}))
    sink = OtlpSink(exporter, RESOURCE, max_request_bytes=5_000)
    assert not (await sink.export([span(n) for n in range(1, 21)])).done
    exporter.delivered.clear()
    assert (await sink.export([span(n) for n in range(100, 103)])).done
    assert exporter.delivered == [100, 101, 102]


async def test_a_refused_span_is_isolated_and_the_rest_delivered() -> None:
    exporter = FlakyExporter(poison=frozenset({13}))
    sink = OtlpSink(exporter, RESOURCE)  # one request for the whole batch
    batch = [span(n) for n in range(1, 33)]
    delivery = await sink.export(batch)
    assert delivery.done
    assert [(r.span_id, reason) for r, reason in delivery.refused] == [(13, "INVALID_ARGUMENT: bad span")]
    assert exporter.delivered == [n for n in range(1, 33) if n != 13]  # each once, in order
    assert exporter.calls <= 2 * 5 + 1  # bisection: about 2·log2(32) requests more


async def test_several_refused_spans_and_a_failure_in_between() -> None:
    exporter = FlakyExporter(fail=frozenset({4}), poison=frozenset({2, 7, 8}))
    sink = OtlpSink(exporter, RESOURCE)
    batch = [span(n) for n in range(1, 11)]
    first = await sink.export(batch)
    assert not first.done
    second = await sink.export(batch)  # resumes the bisection where it stopped
    assert second.done
    refused = sorted(r.span_id for d in (first, second) for r, _ in d.refused)
    assert refused == [2, 7, 8]
    assert exporter.delivered == [1, 3, 4, 5, 6, 9, 10]


async def test_repaired_spans_are_reported_once() -> None:
    exporter = FlakyExporter(fail=frozenset({1}))
    sink = OtlpSink(exporter, RESOURCE)
    batch = [make_span(span_id=1, start_ns=-1), make_span(span_id=2)]
    first = await sink.export(batch)
    assert first.repaired == 1
    assert first.repair_example.startswith("build hello: start time -1 before 1970")
    assert (await sink.export(batch)).repaired == 0  # the resumed batch is not encoded again


def test_the_default_limit_is_the_documented_one() -> None:
    assert int(EXPORT_MAX_REQUEST_BYTES.default) == DEFAULT_MAX_REQUEST_BYTES
