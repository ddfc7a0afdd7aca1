"""The official OTLP span exporters, taught to send requests that are already encoded.

hydra-otel encodes its spans itself (core/otlp_wire.py: about 10 µs a span
against about 60 µs through ``ReadableSpan`` and the SDK's encoder). What it
keeps from ``opentelemetry-exporter-otlp`` is everything after encoding:
channels and sessions, TLS, headers, compression, timeouts, the retry of
transient errors and reconnection. Each subclass adds one method,
``export_encoded``, that hands the finished bytes to that machinery. Both reach
into the exporter's private attributes (two generations of the HTTP exporter: see
:func:`http_generation`), so :func:`check_sdk` verifies at start-up
that the installed release has them (with a message naming the supported range
rather than an AttributeError at the first export), the declared range
(pyproject.toml) is the one CI runs the suite on at both ends, and
tests/integration/test_otlp_encoded.py sends through both against real
receivers; docs/decisions/0004-direct-otlp-encoding.md has the why. No private
*name* is imported: a release that drops one cannot break the import.

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
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as _SdkGrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _SdkHttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from hydra_otel.adapters.export_log import ExportWatch, watch
from hydra_otel.core.otlp_wire import Encoded
from hydra_otel.errors import ConfigError

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


class SdkMismatch(ConfigError):
    """The installed opentelemetry exporters lack what ``export_encoded`` relies on (exit 2, say which)."""


def http_generation(exporter: object) -> str | None:
    """Which HTTP exporter internals ``export_encoded`` drives: "client", "session", or None.

    "client": releases from 1.45 send through ``_client.export`` inside ``_metrics.export_operation``.
    "session": earlier releases post the serialized request with ``_export(data, timeout)``.
    """
    if callable(getattr(getattr(exporter, "_client", None), "export", None)) and hasattr(
        exporter, "_metrics"
    ):
        return "client"
    if callable(getattr(exporter, "_export", None)):
        return "session"
    return None


def check_sdk(exporters: Sequence[object]) -> None:
    """Fail with one clear message when an SDK exporter lacks an internal ``export_encoded`` uses.

    Raises:
        SdkMismatch: naming the attributes that are missing and the supported range.
    """
    missing = []
    for exporter in exporters:
        if isinstance(exporter, _SdkGrpcExporter):
            label = _label(_SdkGrpcExporter)
            missing += [
                f"{label}.{name}"
                for name in ("_export", "_translate_data", "_client", "_shutdown")
                if not hasattr(exporter, name)
            ]
        elif isinstance(exporter, _SdkHttpExporter):
            label = _label(_SdkHttpExporter)
            if http_generation(exporter) is None:
                missing.append(f"{label}._client.export and {label}._export")
            if not hasattr(exporter, "_shutdown"):
                missing.append(f"{label}._shutdown")
    if missing:
        raise SdkMismatch(
            [
                f"the installed opentelemetry-exporter-otlp lacks {', '.join(sorted(set(missing)))}, which "
                f"hydra-otel's span export uses; install a release in the range pyproject.toml declares"
            ]
        )


def _label(cls: type) -> str:
    # "http OTLPSpanExporter": the module's transport part and the SDK's class name.
    return f"{cls.__module__.split('.')[-2]} {cls.__name__}"


def _is_request_too_large(payload: bytes, max_request_size: int) -> bool:
    # The HTTP exporter's own rule (a non-positive limit disables the check), kept here because the
    # SDK's helper is private and absent from some releases.
    return 0 < max_request_size < len(payload)


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
        current: object = getattr(self, "_metrics", None)
        if not isinstance(current, ExportWatch):
            watch(self, "traces")  # its retry lines give way to the exporter task's
        # The status code the exporter gave up on is only on the stub's exception: record it.
        client: Any = self._client  # the SDK annotates it as always None
        stub = (
            _RecordingStub(client)
            if client is not None and not isinstance(client, _RecordingStub)
            else client
        )
        if stub is not client:
            self._client = stub  # type: ignore[assignment]  # a stub wrapper, not None
        if stub is not None:
            stub.last_error = None
        result = self._export(batch)  # type: ignore[arg-type]  # _translate_data above accepts Encoded
        if result is SpanExportResult.SUCCESS:
            return SENT
        # After an UNAVAILABLE the exporter may have replaced the stub: no code then, a plain failure.
        now: Any = self._client
        error = stub.last_error if stub is not None and now is stub else None
        if error is None:
            return Sent(
                ok=False, reason="not sent (the exporter is shut down)" if self._shutdown else "failed"
            )
        code, details = error.code(), error.details()
        return Sent(ok=False, refused=code in REFUSING_GRPC_CODES, reason=f"{code.name}: {details}")


class _RecordingStub:
    """The exporter's gRPC stub, remembering (per thread) the error its ``Export`` last raised."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._local = threading.local()

    @property
    def last_error(self) -> Any:
        return getattr(self._local, "error", None)

    @last_error.setter
    def last_error(self, error: Any) -> None:
        self._local.error = error

    def Export(self, *args: Any, **kwargs: Any) -> Any:  # the stub's method name
        try:
            return self._inner.Export(*args, **kwargs)
        except grpc.RpcError as error:
            self.last_error = error
            raise


class HttpSpanExporter(_SdkHttpExporter):
    """The SDK's HTTP/protobuf span exporter, plus :meth:`export_encoded`."""

    def export_encoded(self, batch: Encoded) -> Sent:
        """Send ``batch`` as the SDK's ``export`` does after its encoding step."""
        if self._shutdown:
            return Sent(ok=False, reason="not sent (the exporter is shut down)")
        if http_generation(self) == "session":
            return self._post(batch)
        current: object = self._metrics
        metrics = current if isinstance(current, ExportWatch) else watch(self, "traces")
        # The watch quiets the SDK's retry lines, which give way to the exporter task's.
        with (metrics or self._metrics).export_operation(batch.spans) as result:
            if _is_request_too_large(batch.payload, getattr(self, "_max_request_size", 0)):
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

    def _post(self, batch: Encoded) -> Sent:
        """Releases before 1.45: one POST through the exporter's session (it compresses).

        No retry loop here: a failure goes back to the exporter task, which retries with backoff.
        """
        watch(self, "traces")
        try:
            # timeout None: the exporter's own (its _export falls back to self._timeout).
            answer = self._export(batch.payload, None)  # type: ignore[attr-defined]  # see http_generation
        except OSError as exc:  # requests' errors are OSErrors: connection refused, reset, timeout
            return Sent(ok=False, reason=f"{type(exc).__name__}: {exc}")
        if answer.ok:
            return SENT
        status = answer.status_code
        return Sent(
            ok=False, refused=status in REFUSING_HTTP_STATUSES, reason=f"HTTP {status} {answer.reason or ''}"
        )
