"""OTLP export: SpanRecord batches -> OTLP/protobuf bytes -> the official OTLP exporters.

The SDK's TracerProvider and BatchSpanProcessor are not used: spans here have
chosen IDs and times from Hydra's rows. Batches are encoded by
:class:`~hydra_otel.core.otlp_wire.SpanEncoder` and handed, already
serialized, to the official OTLP exporters (gRPC or HTTP/protobuf; see
adapters/otlp_exporters.py), which bring the transport, TLS, headers,
compression, timeouts and retries. The exporters block, so
:meth:`OtlpSink.export` runs them in a worker thread; their own ``timeout``
bounds each call.

:func:`to_readable` is the SDK's view of the same record. The daemon does not
use it; it is the reference the direct encoder is tested against, and what the
benchmark's R_export baseline sends through the SDK's own encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import requests
import trio
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status as OtelStatus
from opentelemetry.trace.status import StatusCode

import hydra_otel
from hydra_otel.adapters.otlp_exporters import GrpcSpanExporter, HttpSpanExporter, Sent, check_sdk
from hydra_otel.core.otlp_wire import Encoded, SpanEncoder
from hydra_otel.core.spans import Kind, SpanRecord, Status

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_KINDS = {Kind.INTERNAL: SpanKind.INTERNAL, Kind.SERVER: SpanKind.SERVER}
_SCOPE = InstrumentationScope("hydra_otel", hydra_otel.__version__)


def _context(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)


def _status(record: SpanRecord) -> OtelStatus:
    if record.status is Status.ERROR:
        return OtelStatus(StatusCode.ERROR, record.status_message or None)
    if record.status is Status.OK:
        return OtelStatus(StatusCode.OK)
    return OtelStatus(StatusCode.UNSET)


def to_readable(record: SpanRecord, resource: Resource) -> ReadableSpan:
    """Convert one record; the result encodes to the same bytes for the same record."""
    parent = None if record.parent_span_id is None else _context(record.trace_id, record.parent_span_id)
    return ReadableSpan(
        name=record.name,
        context=_context(record.trace_id, record.span_id),
        parent=parent,
        resource=resource,
        attributes=dict(record.attributes),
        events=[Event(e.name, dict(e.attributes), e.time_ns) for e in record.events],
        links=[Link(_context(lk.trace_id, lk.span_id), dict(lk.attributes)) for lk in record.links],
        kind=_KINDS[record.kind],
        status=_status(record),
        start_time=record.start_ns,
        end_time=record.end_ns,
        instrumentation_scope=_SCOPE,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExporterSettings:
    """What the OTLP exporter needs; built from the validated configuration."""

    protocol: str  # "grpc" or "http/protobuf"
    endpoint: str
    headers: Mapping[str, str]
    timeout_s: float
    certificate: str | None = None
    client_key: str | None = None
    client_certificate: str | None = None
    insecure: bool | None = None
    compression: str | None = None


def make_exporter(s: ExporterSettings) -> GrpcSpanExporter | HttpSpanExporter:
    """Build the official OTLP span exporter for ``s`` (with :meth:`export_encoded`).

    Raises:
        SdkMismatch: the installed exporter release lacks an internal that sending relies on.
    """
    exporter = signal_exporter(s, GrpcSpanExporter, HttpSpanExporter)
    check_sdk([exporter])
    return exporter


G = TypeVar("G")
H = TypeVar("H")


def signal_exporter(
    s: ExporterSettings,
    grpc_class: Callable[..., G],
    http_class: Callable[..., H],
    endpoint: str | None = None,
) -> G | H:
    """The official OTLP exporter of any signal (traces, metrics, logs), built the same way for each.

    gRPC takes TLS and compression from :func:`grpc_options`; HTTP/protobuf verifies with the CA
    file even where requests' environment variables name another (:func:`http_session`).

    Args:
        s: the signal's exporter settings (protocol, headers, TLS, timeout, compression).
        grpc_class: the signal's gRPC exporter class (or a subclass).
        http_class: the signal's HTTP/protobuf exporter class (or a subclass).
        endpoint: the URL or ``host:port`` to send to, if not ``s.endpoint``.

    Raises:
        OSError: a certificate or key file cannot be read.
    """
    url = s.endpoint if endpoint is None else endpoint
    if s.protocol == "grpc":
        import grpc

        o = grpc_options(s)
        return grpc_class(
            endpoint=url,
            insecure=o.insecure,
            credentials=o.credentials,
            headers=dict(s.headers),
            timeout=s.timeout_s,
            compression=grpc.Compression.Gzip if o.gzip else grpc.Compression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression

    return http_class(
        endpoint=url,
        certificate_file=s.certificate,
        client_key_file=s.client_key,
        client_certificate_file=s.client_certificate,
        session=http_session(s.certificate),
        headers=dict(s.headers),
        timeout=s.timeout_s,
        compression=Compression.Gzip if s.compression == "gzip" else Compression.NoCompression,
    )


class _KeepCaSession(requests.Session):
    """A session whose own CA file wins over ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE``."""

    def __init__(self, certificate: str) -> None:
        super().__init__()
        self._certificate = certificate

    def merge_environment_settings(
        self, url: str, proxies: dict[str, str] | None, stream: bool | None, verify: Any, cert: Any
    ) -> dict[str, Any]:
        """Proxies and the rest from the environment, as usual, but verify with our CA file."""
        return super().merge_environment_settings(
            url, proxies, stream, self._certificate if verify in (None, True) else verify, cert
        )


def http_session(certificate: str | None) -> requests.Session | None:
    """A requests session for an OTLP/HTTP exporter that verifies with ``certificate``, or None.

    requests lets ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE`` win over a session's own CA file
    (requests issue 3829), and NixOS sets both system-wide: the exporters' ``certificate_file``
    would be ignored and a private collector CA refused. This session keeps it; proxies and the
    rest of the environment still apply.

    Args:
        certificate: the CA file the collector's certificate must chain to; None for the defaults.

    Returns:
        A session for the exporter's ``session`` argument, or None to let it make its own.
    """
    return None if certificate is None else _KeepCaSession(certificate)


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcOptions:
    """gRPC channel options derived from :class:`ExporterSettings` (same rules as for traces)."""

    insecure: bool
    credentials: object | None  # grpc.ChannelCredentials; grpc ships no type hints
    gzip: bool


def grpc_options(s: ExporterSettings) -> GrpcOptions:
    """TLS and compression for a gRPC exporter of any signal.

    The OTel spec's rule: an ``http://`` endpoint is plaintext and an ``https://`` one TLS;
    ``insecure`` decides only for an endpoint without a scheme (``host:port``), and is False when
    unset. TLS credentials are always built here, with the CA file and the client key pair when
    given: left to the SDK, they would come from its own reading of the environment.

    Args:
        s: the exporter settings.

    Returns:
        ``insecure``, and the channel credentials when it is False.

    Raises:
        OSError: a certificate or key file cannot be read.
    """
    import grpc

    scheme = s.endpoint.partition("://")[0] if "://" in s.endpoint else ""
    insecure = scheme == "http" if scheme else bool(s.insecure)
    credentials = None
    if not insecure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(s.certificate),
            private_key=_read(s.client_key),
            certificate_chain=_read(s.client_certificate),
        )
    return GrpcOptions(insecure=insecure, credentials=credentials, gzip=s.compression == "gzip")


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one :meth:`SpanSink.export` call achieved.

    Args:
        done: every span of the batch was acknowledged or refused for good; False means try the
            same batch again later (the sink resumes where it stopped).
        refused: spans the endpoint refused for good during this call, each with the reason;
            they were dropped.
        repaired: spans encoded, during this call, from a copy with impossible values repaired.
        repair_example: one of them, as ``"<name>: <its hydra.data_issue>"``.
        reason: why the call did not finish.
    """

    done: bool
    refused: tuple[tuple[SpanRecord, str], ...] = ()
    repaired: int = 0
    repair_example: str = ""
    reason: str = ""


#: A batch the endpoint took whole.
DELIVERED = Delivery(done=True)


class SpanSink(Protocol):
    """Where finished spans go (Trio-flavoured)."""

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        """Export one batch, or as much of it as the endpoint takes now."""
        ...

    def shutdown(self) -> None:
        """Release the transport."""
        ...


def span_encoder(resource: Resource) -> SpanEncoder:
    """The encoder for spans of ``resource``, under hydra-otel's instrumentation scope."""
    attributes = tuple(
        (str(k), v) for k, v in resource.attributes.items() if isinstance(v, str | bool | int | float)
    )
    return SpanEncoder(attributes, _SCOPE.name, _SCOPE.version or "")


class EncodedExporter(Protocol):
    """What :class:`OtlpSink` sends with: :func:`make_exporter`'s exporters (or a test's fake)."""

    def export_encoded(self, batch: Encoded) -> Sent:
        """Send one encoded request."""
        ...

    def shutdown(self) -> None:
        """Release the transport."""
        ...


#: Encoded bytes per export request at most (``--export-max-request-bytes``): under the 4 MiB a
#: Collector's, Jaeger's or Tempo's OTLP/gRPC receiver accepts by default.
DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Part:
    """One request and the spans it holds (consecutive spans of the batch)."""

    records: Sequence[SpanRecord]
    request: Encoded


class OtlpSink:
    """A :class:`SpanSink` that encodes batches itself and sends them with an OTLP exporter.

    A batch larger than ``max_request_bytes`` once encoded goes as several requests, in order. If
    one fails, the requests already acknowledged are not sent again when the exporter task
    retries the same batch: the retry resumes at the first unacknowledged request.

    A request the endpoint refuses for good (:class:`~hydra_otel.adapters.otlp_exporters.Sent`)
    is split in two and each half sent again, until the refused spans are alone: those are
    dropped and reported in :attr:`Delivery.refused`, and the rest of the batch goes on. One
    poison span among n costs about 2·log2(n) more requests.

    Args:
        exporter: from :func:`make_exporter`.
        resource: the resource every span carries.
        max_request_bytes: encoded size of one request at most.
    """

    def __init__(
        self,
        exporter: EncodedExporter,
        resource: Resource,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self._exporter = exporter
        self._encoder = span_encoder(resource)
        self._max_bytes = max_request_bytes
        # The batch that failed part-way and its requests still to send (the exporter task retries
        # the very same batch object until it succeeds).
        self._unfinished: tuple[Sequence[SpanRecord], list[_Part]] | None = None

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        """Encode and export ``batch`` in a worker thread."""
        return await trio.to_thread.run_sync(self.send, batch, abandon_on_cancel=True)

    def _parts(self, records: Sequence[SpanRecord]) -> list[_Part]:
        parts, start = [], 0
        for request in self._encoder.requests(records, self._max_bytes):
            parts.append(_Part(records[start : start + request.spans], request))
            start += request.spans
        return parts

    def send(self, batch: Sequence[SpanRecord]) -> Delivery:
        """Encode and export ``batch`` in the calling thread (blocks; see :meth:`export`).

        The export process (adapters/export_process.py) calls it directly: it has no Trio thread
        to keep free. Calling it again with the same ``batch`` object resumes an unfinished one.
        """
        # Encoding happens here, in the worker thread, so a batch never holds up the Trio thread for
        # more than the interpreter's switch interval.
        repaired, example = 0, ""
        if self._unfinished is not None and self._unfinished[0] is batch:
            pending = self._unfinished[1]
        else:
            pending = self._parts(batch)
            repaired = sum(p.request.repaired for p in pending)
            example = next((p.request.example for p in pending if p.request.example), "")
        self._unfinished = None
        refused: list[tuple[SpanRecord, str]] = []
        while pending:
            part = pending[0]
            sent = self._exporter.export_encoded(part.request)
            if not sent.ok and not sent.refused:
                self._unfinished = (batch, pending)
                return Delivery(
                    done=False,
                    refused=tuple(refused),
                    repaired=repaired,
                    repair_example=example,
                    reason=sent.reason,
                )
            del pending[0]
            if sent.refused:
                if len(part.records) == 1:
                    refused.append((part.records[0], sent.reason))
                else:
                    half = len(part.records) // 2
                    pending[:0] = self._parts(part.records[:half]) + self._parts(part.records[half:])
        return Delivery(done=True, refused=tuple(refused), repaired=repaired, repair_example=example)

    def unsettled(self) -> int:
        """Spans at the end of the last batch neither acknowledged nor refused (0 once it is done).

        They are always its last ones: requests go in order, and a refused one is split in place.
        """
        return 0 if self._unfinished is None else sum(len(p.records) for p in self._unfinished[1])

    def shutdown(self) -> None:
        """Shut the exporter down (returns quickly; interrupts retry sleeps)."""
        self._exporter.shutdown()
