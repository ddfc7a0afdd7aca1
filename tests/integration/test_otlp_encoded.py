"""OtlpSink against real OTLP receivers: requests encoded by hydra-otel, sent by the SDK's exporters.

What arrives must be exactly what the SDK's own encoder would have sent for the same spans,
over gRPC and HTTP/protobuf, compressed or not; failures must come back as a Delivery that is
not done, and data the endpoint refuses for good as refused spans, never raise.
"""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource

import hydra_otel
from hydra_otel.adapters.otlp import ExporterSettings, OtlpSink, make_exporter, to_readable
from hydra_otel.core.builds import build_spans
from hydra_otel.core.spans import SpanRecord
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver
from tests.factories import RENDER_CONFIG, make_build, make_step

RESOURCE = Resource({"service.name": "hydra-otel", "service.version": hydra_otel.__version__})


def records() -> list[SpanRecord]:
    out: list[SpanRecord] = []
    for build_id in range(1, 41):
        failed = build_id % 7 == 0
        steps = [make_step(build_id=build_id, stepnr=n, status=1 if failed and n == 2 else 0) for n in (1, 2)]
        out += build_spans(RENDER_CONFIG, make_build(build_id=build_id, status=1 if failed else 0), steps)
    return out


def settings(
    endpoint: str, protocol: str, compression: str = "none", timeout: float = 5.0
) -> ExporterSettings:
    return ExporterSettings(
        protocol=protocol,
        endpoint=endpoint,
        headers={"x-test": "1"},
        timeout_s=timeout,
        compression=compression,
    )


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_grpc(otlp_grpc: GrpcOtlpReceiver, compression: str) -> None:
    spans = records()
    sink = OtlpSink(make_exporter(settings(f"http://{otlp_grpc.endpoint}", "grpc", compression)), RESOURCE)
    try:
        assert (await sink.export(spans)).done
    finally:
        sink.shutdown()
    assert otlp_grpc.requests == [encode_spans([to_readable(r, RESOURCE) for r in spans])]


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_http(otlp_http: HttpOtlpReceiver, compression: str) -> None:
    spans = records()
    sink = OtlpSink(make_exporter(settings(otlp_http.traces_url, "http/protobuf", compression)), RESOURCE)
    try:
        assert (await sink.export(spans)).done
    finally:
        sink.shutdown()
    assert otlp_http.requests == [encode_spans([to_readable(r, RESOURCE) for r in spans])]


def endpoints(grpc_receiver: GrpcOtlpReceiver, http_receiver: HttpOtlpReceiver) -> list[tuple[str, str]]:
    return [(f"http://{grpc_receiver.endpoint}", "grpc"), (http_receiver.traces_url, "http/protobuf")]


@pytest.mark.parametrize(
    ("grpc_code", "http_status"),
    [(grpc.StatusCode.UNAUTHENTICATED, 401), (grpc.StatusCode.UNIMPLEMENTED, 404)],
)
async def test_an_answer_that_is_not_about_the_data_is_a_failure(
    otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver, grpc_code: grpc.StatusCode, http_status: int
) -> None:
    """Not retried by the SDK, but not the spans' fault either: held, never dropped."""
    otlp_grpc.set_down(grpc_code)
    otlp_http.set_down(http_status)
    for endpoint, protocol in endpoints(otlp_grpc, otlp_http):
        sink = OtlpSink(make_exporter(settings(endpoint, protocol, timeout=2.0)), RESOURCE)
        try:
            delivery = await sink.export(records()[:3])
        finally:
            sink.shutdown()
        assert not delivery.done
        assert delivery.refused == ()
        assert delivery.reason.startswith(grpc_code.name if protocol == "grpc" else f"HTTP {http_status}")
    assert otlp_grpc.requests == otlp_http.requests == []


@pytest.mark.parametrize(("grpc_code", "http_status"), [(grpc.StatusCode.INVALID_ARGUMENT, 400), (None, 413)])
async def test_a_refusal_of_every_request_drops_every_span(
    otlp_grpc: GrpcOtlpReceiver,
    otlp_http: HttpOtlpReceiver,
    grpc_code: grpc.StatusCode | None,
    http_status: int,
) -> None:
    if grpc_code is not None:
        otlp_grpc.set_down(grpc_code)
    otlp_http.set_down(http_status)
    for endpoint, protocol in endpoints(otlp_grpc, otlp_http)[(grpc_code is None) :]:
        sink = OtlpSink(make_exporter(settings(endpoint, protocol, timeout=2.0)), RESOURCE)
        try:
            delivery = await sink.export(records()[:3])
        finally:
            sink.shutdown()
        assert delivery.done
        assert len(delivery.refused) == 3
    assert otlp_grpc.requests == otlp_http.requests == []


async def test_a_poison_span_is_isolated(otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver) -> None:
    spans = records()
    poison = spans[37]
    for receiver in (otlp_grpc, otlp_http):
        receiver.refuse(lambda s: int.from_bytes(s.span_id, "big") == poison.span_id)
    for endpoint, protocol in endpoints(otlp_grpc, otlp_http):
        sink = OtlpSink(make_exporter(settings(endpoint, protocol)), RESOURCE)
        try:
            delivery = await sink.export(spans)
        finally:
            sink.shutdown()
        assert delivery.done
        assert [r for r, _ in delivery.refused] == [poison]
    expected = [r.span_id for r in spans if r is not poison]
    for receiver in (otlp_grpc, otlp_http):
        assert [int.from_bytes(s.span.span_id, "big") for s in receiver.spans()] == expected


async def test_a_large_batch_goes_as_several_requests(otlp_grpc: GrpcOtlpReceiver) -> None:
    spans = records()
    endpoint = f"http://{otlp_grpc.endpoint}"
    sink = OtlpSink(make_exporter(settings(endpoint, "grpc")), RESOURCE, max_request_bytes=8_000)
    try:
        assert (await sink.export(spans)).done
    finally:
        sink.shutdown()
    requests = otlp_grpc.requests
    assert len(requests) > 1
    assert all(r.ByteSize() <= 8_000 for r in requests)
    expected = encode_spans([to_readable(r, RESOURCE) for r in spans]).resource_spans[0].scope_spans[0].spans
    assert [s for r in requests for s in r.resource_spans[0].scope_spans[0].spans] == list(expected)
