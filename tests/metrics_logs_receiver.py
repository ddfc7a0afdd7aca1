"""An in-process OTLP/gRPC receiver for metrics and logs, for the tests.

It serves ``MetricsService/Export`` and ``LogsService/Export`` on one 127.0.0.1 port the OS
picks (the :class:`~hydra_otel.demo.sandbox.receiver.GrpcServer` the trace receiver runs on),
keeps every request in a lock-protected list (the gRPC server answers on its own threads), and
offers helpers that flatten requests into data points and log records. The trace receivers live
in ``hydra_otel.demo.sandbox.receiver`` because the demo needs them; nothing but the tests needs
this one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

import grpc
import trio
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import HistogramDataPoint, Metric, NumberDataPoint

from hydra_otel.demo.sandbox.receiver import (
    AttributeValue,
    GrpcServer,
    ServerTls,
    ServesGrpc,
    attributes_dict,
)


class ReceivedMetric(NamedTuple):
    """One metric as received, with its resource's attributes."""

    resource: dict[str, AttributeValue]
    metric: Metric


class ReceivedLog(NamedTuple):
    """One log record as received, with its resource's attributes."""

    resource: dict[str, AttributeValue]
    record: LogRecord


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: GrpcMetricsLogsReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        """Store a metrics batch."""
        with self._receiver.lock:
            self._receiver.metric_requests.append(request)
        return ExportMetricsServiceResponse()


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: GrpcMetricsLogsReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> ExportLogsServiceResponse:
        """Store a logs batch."""
        with self._receiver.lock:
            self._receiver.log_requests.append(request)
        return ExportLogsServiceResponse()


class GrpcMetricsLogsReceiver(ServesGrpc):
    """OTLP/gRPC MetricsService and LogsService on 127.0.0.1; use as a context manager.

    Args:
        host: the address to listen on.
        tls: serve over TLS (then ``endpoint`` is an ``https://`` URL), mutual if it says so.
    """

    def __init__(self, host: str = "127.0.0.1", tls: ServerTls | None = None) -> None:
        self.lock = threading.Lock()
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.log_requests: list[ExportLogsServiceRequest] = []
        self._grpc = GrpcServer(
            self._add_servicers, host=host, tls=tls, threads="otlp-metrics-logs-receiver", workers=2
        )
        self.port: Final[int] = self._grpc.port
        #: What the gRPC exporters take as ``endpoint`` (an ``https://`` URL with TLS).
        self.endpoint: Final = self._grpc.endpoint

    def _add_servicers(self, server: grpc.Server) -> None:
        # The generated gRPC modules are unannotated.
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MetricsServicer(self), server
        )
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _LogsServicer(self), server
        )

    def metrics(self) -> list[ReceivedMetric]:
        """Every metric received so far, in order."""
        with self.lock:
            requests = list(self.metric_requests)
        return [
            ReceivedMetric(attributes_dict(rm.resource.attributes), metric)
            for request in requests
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        ]

    def logs(self) -> list[ReceivedLog]:
        """Every log record received so far, in order."""
        with self.lock:
            requests = list(self.log_requests)
        return [
            ReceivedLog(attributes_dict(rl.resource.attributes), record)
            for request in requests
            for rl in request.resource_logs
            for sl in rl.scope_logs
            for record in sl.log_records
        ]

    # ASYNC109: a test helper owns a default deadline, so a forgotten fail_after cannot hang a run.
    async def wait_until(self, condition: Callable[[], bool], *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``condition()`` holds, polling (data arrives on the server's threads).

        Raises:
            trio.TooSlowError: it did not hold within ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            # ASYNC110: a condition set on other threads, polled under a deadline.
            while not condition():  # noqa: ASYNC110
                await trio.sleep(0.01)


def histogram_points(metrics: Iterable[ReceivedMetric], name: str) -> list[HistogramDataPoint]:
    """The histogram data points of every metric named ``name``."""
    return [p for m in metrics if m.metric.name == name for p in m.metric.histogram.data_points]


def sum_points(metrics: Iterable[ReceivedMetric], name: str) -> list[NumberDataPoint]:
    """The sum (counter) data points of every metric named ``name``."""
    return [p for m in metrics if m.metric.name == name for p in m.metric.sum.data_points]


def point_attributes(point: HistogramDataPoint | NumberDataPoint) -> dict[str, AttributeValue]:
    """A data point's attributes as a dict."""
    return attributes_dict(point.attributes)
