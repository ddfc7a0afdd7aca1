"""The official OTLP span exporters, taught to send requests that are already encoded.

hydra-otel encodes its spans itself (core/otlp_wire.py: about 10 µs a span
against about 60 µs through ``ReadableSpan`` and the SDK's encoder). What it
keeps from ``opentelemetry-exporter-otlp`` is everything after encoding:
channels and sessions, TLS, headers, compression, timeouts, the retry of
transient errors and reconnection. Each subclass adds one method,
``export_encoded``, that hands the finished bytes to that machinery. Both reach
into the exporter's private API, so the package is pinned to its minor version
(pyproject.toml) and tests/integration/test_otlp_encoded.py sends through both
against real receivers; docs/decisions/0004-direct-otlp-encoding.md has the why.

``export_encoded`` says more than the SDK's ``export``: a :class:`Sent` tells
an acknowledged request from one that failed (try again later) and from one
the endpoint refused for good because of its data (gRPC ``INVALID_ARGUMENT``,
HTTP 400 and 413: the OTLP specification's "bad data", which no retry can
fix). The caller splits a refused request to find the span at fault
(adapters/otlp.py). Other non-retryable answers (authentication, a wrong path,
``UNIMPLEMENTED``) are not the data's fault and count as failures: the batch is
held until the configuration is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as _SdkGrpcExporter
from opentelemetry.exporter.otlp.proto.http._common import _is_request_too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _SdkHttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from hydra_otel.adapters.export_log import ExportWatch, watch
from hydra_otel.core.otlp_wire import Encoded

log = logging.getLogger("hydra_otel.export")

#: Answers that refuse the request's data for good: splitting the request isolates the span at fault.
REFUSING_GRPC_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
REFUSING_HTTP_STATUSES = frozenset({HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE})


@dataclass(frozen=True, slots=True)
class Sent:
    """What became of one request.

    Args:
        ok: the endpoint acknowledged it.
        refused: the endpoint refused its data for good (never retry it as it is).
        reason: why it failed or was refused, for a log line.
    """

    ok: bool
    refused: bool = False
    reason: str = ""


SENT = Sent(ok=True)


class GrpcSpanExporter(_SdkGrpcExporter):
    """The SDK's gRPC span exporter, plus :meth:`export_encoded`."""

    def _translate_data(self, data: Sequence[ReadableSpan] | Encoded) -> ExportTraceServiceRequest:
        request: ExportTraceServiceRequest
        if isinstance(data, Encoded):
            # The stub serializes a message, so the bytes are parsed once more, in C: ~2 µs a span.
            request = ExportTraceServiceRequest.FromString(data.payload)
        else:
            request = super()._translate_data(data)
        return request

    def _count_data(self, data: Sequence[ReadableSpan] | Encoded) -> int:
        return data.spans if isinstance(data, Encoded) else len(data)

    def export_encoded(self, batch: Encoded) -> Sent:
        """Send ``batch`` with the SDK's retries and deadline."""
        # The status code the exporter gave up on is only on its self-metrics' result.
        metrics = self._metrics if isinstance(self._metrics, ExportWatch) else watch(self, "traces")
        result = self._export(batch)  # type: ignore[arg-type]  # _translate_data above accepts Encoded
        if result is SpanExportResult.SUCCESS:
            return SENT
        error = None if metrics is None else metrics.error()
        if not isinstance(error, grpc.RpcError):
            return Sent(
                ok=False, reason="not sent (the exporter is shut down)" if self._shutdown else "failed"
            )
        code, details = error.code(), error.details()
        return Sent(ok=False, refused=code in REFUSING_GRPC_CODES, reason=f"{code.name}: {details}")


class HttpSpanExporter(_SdkHttpExporter):
    """The SDK's HTTP/protobuf span exporter, plus :meth:`export_encoded`."""

    def export_encoded(self, batch: Encoded) -> Sent:
        """Send ``batch`` as the SDK's ``export`` does after its encoding step."""
        if not isinstance(self._metrics, ExportWatch):
            watch(self, "traces")  # its retry lines give way to the exporter task's
        if self._shutdown:
            return Sent(ok=False, reason="not sent (the exporter is shut down)")
        with self._metrics.export_operation(batch.spans) as result:
            if _is_request_too_large(batch.payload, self._max_request_size):
                # Unreachable: requests are split at --export-max-request-bytes, at most 32 MiB,
                # under the exporter's 64 MiB. Should it happen, say so rather than drop silently.
                log.error(
                    "OTLP/HTTP request larger than the exporter's size limit; lower --export-max-request-bytes",
                    extra={"bytes": len(batch.payload), "spans": batch.spans},
                )
                return Sent(ok=False, reason="request larger than the exporter's size limit")
            sent = self._client.export(batch.payload)
            if not sent.success:
                result.error = sent.error
                status = sent.status_code
                if status is None:
                    return Sent(ok=False, reason=str(sent.error or "failed"))
                return Sent(
                    ok=False,
                    refused=status in REFUSING_HTTP_STATUSES,
                    reason=f"HTTP {status} {sent.reason or ''}",
                )
        return SENT
