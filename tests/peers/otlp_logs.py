"""A minimal OTLP/HTTP logs receiver: the stand-in for a logs backend behind the collector."""

from __future__ import annotations

import gzip
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: LogsReceiver


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        """Accept ``/v1/logs`` protobuf, gzip-compressed or not."""
        assert isinstance(self.server, _Server)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/logs":
            self._reply(HTTPStatus.NOT_FOUND, b"")
            return
        request = ExportLogsServiceRequest()
        request.ParseFromString(body)
        self.server.receiver.accept(request)
        self._reply(HTTPStatus.OK, ExportLogsServiceResponse().SerializeToString())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Quiet: the tests assert on what arrived."""


class LogsReceiver:
    """Serves OTLP/HTTP ``/v1/logs`` on 127.0.0.1 in a thread while used as a context manager."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self._lock = threading.Lock()
        self._records: list[LogRecord] = []

    @property
    def url(self) -> str:
        """The base URL (the collector's otlphttp exporter appends ``/v1/logs``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def accept(self, request: ExportLogsServiceRequest) -> None:
        """Keep every log record of ``request``."""
        with self._lock:
            for resource_logs in request.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    self._records.extend(scope_logs.log_records)

    def records(self) -> list[LogRecord]:
        """Every log record received so far."""
        with self._lock:
            return list(self._records)

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
