"""In-process OTLP trace receivers for the tests and ``hydra-otel demo``.

Theory of operation: ``GrpcOtlpReceiver`` (a grpcio server) and ``HttpOtlpReceiver`` (a stdlib
``ThreadingHTTPServer``) listen on 127.0.0.1, on a port the OS picks, and speak enough OTLP for the
official exporters: gRPC ``TraceService/Export``, and HTTP ``POST /v1/traces`` with a protobuf body,
gzip or deflate compressed or not. Both keep every ``ExportTraceServiceRequest`` they accept in a
lock-protected list, on their own threads; tests read it from the trio thread through ``spans()`` or
wait for it with ``wait_for_spans``. ``fail_next`` and ``set_down`` make them answer with a
retryable error (gRPC UNAVAILABLE, HTTP 503) to exercise exporters' retries; ``refuse`` makes them
refuse, for good (gRPC INVALID_ARGUMENT, HTTP 400), every request holding a span it picks, as a
collector refuses a request with bad data.

Both gRPC receivers, this trace one and the tests' metrics and logs one, run on a
:class:`GrpcServer`. For benchmarks run a receiver in another process (benchmarks/otlp_sink.py): in
the same process it competes for the GIL.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Final, Generic, NamedTuple, Self, TypeAlias, TypeVar
from urllib.parse import urlsplit

import grpc
import trio

# protobuf ships no type stubs and types-protobuf is not a dependency.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

#: An OTLP attribute value as a Python value; arrays become lists and key-value lists dicts.
AttributeValue: TypeAlias = (
    "str | bool | int | float | bytes | list[AttributeValue] | dict[str, AttributeValue] | None"
)

#: What ``wait_for_spans`` waits for: a number of spans, or a test on all spans received so far.
SpanCondition: TypeAlias = "int | Callable[[Sequence[ReceivedSpan]], bool]"

#: Seconds between two looks at the received spans in ``wait_for_spans``.
POLL_INTERVAL: Final = 0.01

_CodeT = TypeVar("_CodeT")


class ReceivedSpan(NamedTuple):
    """One received span with the attributes of the resource it was sent under."""

    resource: dict[str, AttributeValue]
    span: Span


def to_python(value: AnyValue) -> AttributeValue:
    """Convert an OTLP ``AnyValue`` to the Python value it holds (None if it holds nothing).

    Args:
        value: the protobuf value.

    Returns:
        The value; arrays become lists and key-value lists dicts, recursively.
    """
    match value.WhichOneof("value"):
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "int_value":
            return value.int_value
        case "double_value":
            return value.double_value
        case "bytes_value":
            return value.bytes_value
        case "array_value":
            return [to_python(v) for v in value.array_value.values]
        case "kvlist_value":
            return attributes_dict(value.kvlist_value.values)
        case _:
            return None


def attributes_dict(attributes: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    """Convert OTLP key-value pairs (span, resource or event attributes) to a dict.

    Args:
        attributes: the repeated ``KeyValue`` field.

    Returns:
        A dict from key to Python value (see ``to_python``).
    """
    return {kv.key: to_python(kv.value) for kv in attributes}


class TraceSink(Generic[_CodeT]):
    """What both receivers share: the requests received and the failure injection.

    Thread-safe: the servers' threads add, any thread reads.

    Args:
        default_failure: what ``fail_next`` and ``set_down`` answer with unless told otherwise.
        refusal: what ``refuse`` answers with.
    """

    def __init__(self, default_failure: _CodeT, refusal: _CodeT) -> None:
        self._lock = threading.Lock()
        self._requests: list[ExportTraceServiceRequest] = []
        self._attempts = 0
        self._default_failure = default_failure
        self._failures: list[_CodeT] = []
        self._down: _CodeT | None = None
        self._refusal = refusal
        self._refuse: Callable[[Span], bool] | None = None
        self._refused: list[Span] = []

    @property
    def requests(self) -> list[ExportTraceServiceRequest]:
        """The export requests accepted so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def attempts(self) -> int:
        """How many export requests arrived, including the ones answered with a failure."""
        with self._lock:
            return self._attempts

    def spans(self) -> list[ReceivedSpan]:
        """Return every span accepted so far, flattened, in the order received.

        Returns:
            (resource attributes, span) pairs.
        """
        received = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = attributes_dict(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    received += [ReceivedSpan(resource, span) for span in scope_spans.spans]
        return received

    def clear(self) -> None:
        """Forget the requests received and the attempts counted; pending failures stay."""
        with self._lock:
            self._requests.clear()
            self._attempts = 0

    def fail_next(self, n: int = 1, code: _CodeT | None = None) -> None:
        """Answer the next ``n`` export requests with a failure instead of accepting them.

        Args:
            n: how many requests to fail.
            code: the gRPC status code or HTTP status to answer with; UNAVAILABLE or 503 if omitted,
                which the official exporters retry.
        """
        with self._lock:
            self._failures += [self._default_failure if code is None else code] * n

    def set_down(self, code: _CodeT | None = None) -> None:
        """Fail every export request until ``set_up()``, as a collector in trouble would.

        The receiver still accepts connections: this is an unhealthy collector, not an absent one.

        Args:
            code: the failure to answer with (see ``fail_next``).
        """
        with self._lock:
            self._down = self._default_failure if code is None else code

    def set_up(self) -> None:
        """Accept export requests again after ``set_down()``."""
        with self._lock:
            self._down = None

    def refuse(self, condition: Callable[[Span], bool] | None) -> None:
        """Refuse for good every request holding a span for which ``condition`` is true.

        Args:
            condition: picks the poison spans; None accepts every request again.
        """
        with self._lock:
            self._refuse = condition

    @property
    def refused(self) -> list[Span]:
        """The poison spans of every request refused so far (a span refused twice is listed twice)."""
        with self._lock:
            return list(self._refused)

    # ASYNC109: a test helper owns a default deadline, so that a forgotten fail_after cannot hang a
    # test run.
    async def wait_for_spans(
        self,
        condition: SpanCondition = 1,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[ReceivedSpan]:
        """Wait until enough spans have arrived (Trio-flavored).

        Polls every ``POLL_INTERVAL`` seconds: the spans arrive on the servers' threads, and a short
        poll under a deadline is simpler than waking the trio thread from them.

        Args:
            condition: a minimum number of spans, or a function of all spans received so far that
                returns True when the wait is over.
            timeout: seconds to wait at most.

        Returns:
            All spans received so far (see ``spans()``).

        Raises:
            trio.TooSlowError: if the condition does not hold within ``timeout``.
        """
        satisfied: Callable[[Sequence[ReceivedSpan]], bool]
        if isinstance(condition, int):
            count = condition

            def satisfied(spans: Sequence[ReceivedSpan]) -> bool:
                return len(spans) >= count

        else:
            satisfied = condition
        try:
            with trio.fail_after(timeout):
                # ASYNC110: a condition set on other threads, polled under a deadline (see above).
                while not satisfied(spans := self.spans()):  # noqa: ASYNC110
                    await trio.sleep(POLL_INTERVAL)
                return spans
        except trio.TooSlowError:
            got = len(self.spans())
            raise trio.TooSlowError(
                f"span condition not met within {timeout:g}s ({got} spans received)"
            ) from None

    def _admit(self) -> _CodeT | None:
        """Count an incoming request; return the failure to answer it with, or None to accept it."""
        with self._lock:
            self._attempts += 1
            if self._down is not None:
                return self._down
            return self._failures.pop(0) if self._failures else None

    def _accept(self, request: ExportTraceServiceRequest) -> _CodeT | None:
        """Store an accepted request; return the refusal to answer with instead, or None."""
        with self._lock:
            if self._refuse is not None:
                poison = [
                    s
                    for rs in request.resource_spans
                    for ss in rs.scope_spans
                    for s in ss.spans
                    if self._refuse(s)
                ]
                if poison:
                    self._refused += poison
                    return self._refusal
            self._requests.append(request)
            return None


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    """The gRPC TraceService, storing into a ``GrpcOtlpReceiver``."""

    def __init__(self, sink: TraceSink[grpc.StatusCode]) -> None:
        self._sink = sink

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        """Accept a batch, or answer with an injected failure."""
        failure = self._sink._admit()
        if failure is not None:
            context.abort(failure, "failure injected by the test receiver")
        refusal = self._sink._accept(request)
        if refusal is not None:
            context.abort(refusal, "span refused by the test receiver")
        return ExportTraceServiceResponse()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTls:
    """A receiver's TLS: its certificate chain and key (PEM files), and the CA its clients must show.

    Args:
        certificate: the server's certificate chain.
        key: the server's private key (unencrypted).
        client_ca: when set, a client must present a certificate signed by this CA (mutual TLS).
    """

    certificate: Path
    key: Path
    client_ca: Path | None = None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """The credentials for ``grpc.Server.add_secure_port``."""
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.certificate.read_bytes())],
            root_certificates=None if self.client_ca is None else self.client_ca.read_bytes(),
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for the HTTP receiver."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, self.key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_ca)
        return context


class GrpcServer:
    """A grpcio server on ``host``, at a port the OS picks, answering on worker threads.

    The trace receiver here and the tests' metrics and logs receiver share it; what each serves is
    up to ``add_servicers``.

    Args:
        add_servicers: adds the receiver's servicers to the server.
        host: the address to listen on.
        tls: serve over TLS (then ``endpoint`` is an ``https://`` URL), mutual if it says so.
        threads: the name prefix of the worker threads.
        workers: how many requests are answered at once.
    """

    def __init__(
        self,
        add_servicers: Callable[[grpc.Server], None],
        *,
        host: str,
        tls: ServerTls | None,
        threads: str,
        workers: int,
    ) -> None:
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=threads)
        self._server = grpc.server(self._executor)
        add_servicers(self._server)
        self.port: Final[int] = (
            self._server.add_insecure_port(f"{host}:0")
            if tls is None
            else self._server.add_secure_port(f"{host}:0", tls.grpc_credentials())
        )
        #: What the gRPC exporters take as ``endpoint``: ``"HOST:PORT"``, with TLS ``"https://HOST:PORT"``.
        self.endpoint: Final = f"{host}:{self.port}" if tls is None else f"https://{host}:{self.port}"

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving, cancel calls in progress, and join the worker threads."""
        self._server.stop(grace=None).wait()
        self._executor.shutdown(wait=True)


class ServesGrpc:
    """A receiver that runs on a :class:`GrpcServer` (``_grpc``) and serves inside a ``with`` block."""

    _grpc: GrpcServer

    def __enter__(self) -> Self:
        """Start serving."""
        self._grpc.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop serving, cancel calls in progress, and join the worker threads."""
        self._grpc.stop()


class GrpcOtlpReceiver(TraceSink[grpc.StatusCode], ServesGrpc):
    """An OTLP/gRPC trace receiver on 127.0.0.1, for ``OTLPSpanExporter(endpoint, insecure=True)``.

    Use as a context manager: the server runs inside the ``with`` block.

    Args:
        host: the address to listen on.
        tls: serve over TLS (then ``endpoint`` is an ``https://`` URL), mutual if it says so.
    """

    def __init__(self, host: str = "127.0.0.1", tls: ServerTls | None = None) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT)
        self._grpc = GrpcServer(
            self._add_servicer, host=host, tls=tls, threads="otlp-grpc-receiver", workers=4
        )
        self.port: Final[int] = self._grpc.port
        #: What the gRPC exporter takes as ``endpoint``: ``"127.0.0.1:PORT"``, with TLS ``"https://..."``.
        self.endpoint: Final = self._grpc.endpoint

    def _add_servicer(self, server: grpc.Server) -> None:
        # The generated gRPC module is unannotated.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceServicer(self), server
        )


class _OtlpHttpServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its receiver and can close kept-alive connections."""

    # Join handler threads on close; _close_connections makes sure none waits for a client.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], receiver: HttpOtlpReceiver) -> None:
        super().__init__(address, _OtlpHttpHandler)
        self.receiver = receiver
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        """Remember the connection, then serve it on a new thread."""
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        """Forget the connection, then close it."""
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        """Stay quiet about a refused TLS handshake (a client without the certificate asked for)."""
        if isinstance(sys.exc_info()[1], ssl.SSLError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open connection, so that handler threads see EOF and finish."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # OSError: already closed by the client or the handler.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    """Serves ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` body."""

    # The exporter keeps its connection alive; HTTP/1.1 with Content-Length lets it.
    protocol_version = "HTTP/1.1"
    # An idle kept-alive connection is dropped after this many seconds.
    timeout = 30

    def do_POST(self) -> None:
        """Accept a batch, or answer with an injected failure or a client error."""
        assert isinstance(self.server, _OtlpHttpServer)
        receiver = self.server.receiver
        try:
            body = self._read_body()
        except ValueError as exc:
            self._reply(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain")
            return
        if urlsplit(self.path).path != "/v1/traces":
            self._reply(HTTPStatus.NOT_FOUND, b"only /v1/traces is served", "text/plain")
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != "application/x-protobuf":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, b"only application/x-protobuf", "text/plain")
            return
        failure = receiver._admit()
        if failure is not None:
            self._reply(failure, b"failure injected by the test receiver", "text/plain")
            return
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            self._reply(HTTPStatus.BAD_REQUEST, f"bad protobuf: {exc}".encode(), "text/plain")
            return
        refusal = receiver._accept(request)
        if refusal is not None:
            self._reply(refusal, b"span refused by the test receiver", "text/plain")
            return
        self._reply(HTTPStatus.OK, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Stay quiet: a test's output is no place for an access log."""

    def _read_body(self) -> bytes:
        """Read the request body, de-chunked and decompressed."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        try:
            if encoding == "gzip":
                return gzip.decompress(raw)
            if encoding == "deflate":
                return zlib.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"bad {encoding} body: {exc}") from exc
        if encoding not in ("identity", ""):
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        return raw

    def _read_chunked(self) -> bytes:
        """Read a ``Transfer-Encoding: chunked`` body and its trailers."""
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        """Send a complete response with a Content-Length, keeping the connection usable."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HttpOtlpReceiver(TraceSink[int]):
    """An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1.

    Give the HTTP exporter ``endpoint + "/v1/traces"``. Use as a context manager: the server runs on
    a background thread inside the ``with`` block.

    Args:
        host: the address to listen on.
        tls: serve over TLS (then ``endpoint`` is an ``https://`` URL), mutual if it says so.
    """

    def __init__(self, host: str = "127.0.0.1", tls: ServerTls | None = None) -> None:
        super().__init__(HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.BAD_REQUEST)
        self._server = _OtlpHttpServer((host, 0), self)
        if tls is not None:
            # The handshake runs on the handler's thread, at its first read, not in serve_forever.
            self._server.socket = tls.ssl_context().wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: Final[int] = self._server.server_address[1]
        #: The base URL, ``"http://127.0.0.1:PORT"`` (``https://`` with TLS).
        self.endpoint: Final = f"{'http' if tls is None else 'https'}://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-http-receiver"
        )

    @property
    def traces_url(self) -> str:
        """The full URL the HTTP exporter takes as ``endpoint``."""
        return f"{self.endpoint}/v1/traces"

    def __enter__(self) -> Self:
        """Start serving."""
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop serving, drop open connections and join every server thread."""
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()
