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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as _SdkGrpcExporter
from opentelemetry.exporter.otlp.proto.http._common import _is_request_too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _SdkHttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from hydra_otel.core.otlp_wire import Encoded

log = logging.getLogger("hydra_otel.export")


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

    def export_encoded(self, batch: Encoded) -> bool:
        """Send ``batch`` with the SDK's retries and deadline; True when the endpoint took it."""
        result = self._export(batch)  # type: ignore[arg-type]  # _translate_data above accepts Encoded
        return result is SpanExportResult.SUCCESS


class HttpSpanExporter(_SdkHttpExporter):
    """The SDK's HTTP/protobuf span exporter, plus :meth:`export_encoded`."""

    def export_encoded(self, batch: Encoded) -> bool:
        """Send ``batch`` as the SDK's ``export`` does after its encoding step; True when taken."""
        if self._shutdown:
            return False
        with self._metrics.export_operation(batch.spans) as result:
            if _is_request_too_large(batch.payload, self._max_request_size):
                # Unreachable: requests are split at --export-max-request-bytes, at most 32 MiB,
                # under the exporter's 64 MiB. Should it happen, say so rather than drop silently.
                log.error(
                    "OTLP/HTTP request larger than the exporter's size limit; lower --export-max-request-bytes",
                    extra={"bytes": len(batch.payload), "spans": batch.spans},
                )
                return False
            sent = self._client.export(batch.payload)
            if not sent.success:
                result.error = sent.error
                return False
        return True
