"""OtlpSink against real OTLP receivers: requests encoded by hydra-otel, sent by the SDK's exporters.

What arrives must be exactly what the SDK's own encoder would have sent for the same spans,
over gRPC and HTTP/protobuf, compressed or not; failures must come back as False, not raise.
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
from hydra_otel.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver
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
        assert await sink.export(spans)
    finally:
        sink.shutdown()
    assert otlp_grpc.requests == [encode_spans([to_readable(r, RESOURCE) for r in spans])]


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_http(otlp_http: HttpOtlpReceiver, compression: str) -> None:
    spans = records()
    sink = OtlpSink(make_exporter(settings(otlp_http.traces_url, "http/protobuf", compression)), RESOURCE)
    try:
        assert await sink.export(spans)
    finally:
        sink.shutdown()
    assert otlp_http.requests == [encode_spans([to_readable(r, RESOURCE) for r in spans])]


async def test_a_refusing_endpoint_is_a_false_result(
    otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver
) -> None:
    otlp_grpc.set_down(grpc.StatusCode.INVALID_ARGUMENT)  # not retried by the SDK: fails at once
    otlp_http.set_down(400)
    for endpoint, protocol in (
        (f"http://{otlp_grpc.endpoint}", "grpc"),
        (otlp_http.traces_url, "http/protobuf"),
    ):
        sink = OtlpSink(make_exporter(settings(endpoint, protocol, timeout=2.0)), RESOURCE)
        try:
            assert not await sink.export(records()[:3])
        finally:
            sink.shutdown()
    assert otlp_grpc.attempts >= 1
    assert otlp_http.attempts >= 1
    assert otlp_grpc.requests == otlp_http.requests == []


async def test_a_large_batch_goes_as_several_requests(otlp_grpc: GrpcOtlpReceiver) -> None:
    spans = records()
    endpoint = f"http://{otlp_grpc.endpoint}"
    sink = OtlpSink(make_exporter(settings(endpoint, "grpc")), RESOURCE, max_request_bytes=8_000)
    try:
        assert await sink.export(spans)
    finally:
        sink.shutdown()
    requests = otlp_grpc.requests
    assert len(requests) > 1
    assert all(r.ByteSize() <= 8_000 for r in requests)
    expected = encode_spans([to_readable(r, RESOURCE) for r in spans]).resource_spans[0].scope_spans[0].spans
    assert [s for r in requests for s in r.resource_spans[0].scope_spans[0].spans] == list(expected)
