"""OTLP metrics: :class:`~hydra_otel.core.cicd_metrics.Observation` values -> SDK instruments -> OTLP.

Theory of operation. Unlike spans, metrics go through the SDK's own pipeline: a
``MeterProvider`` with one instrument per entry of ``core.cicd_metrics.INSTRUMENTS``,
explicit-bucket Views for the histograms, and a ``PeriodicExportingMetricReader``
whose daemon thread collects and exports every ``interval_s`` seconds
(cumulative temporality, the OTLP exporters' default). Recording is a locked
in-memory update, cheap and thread-safe, so :meth:`MetricsSink.record` is called
straight from trio code; only ``force_flush`` and ``shutdown``, which export,
run in a worker thread (Trio-flavoured async methods).

The exporter takes its own :class:`~hydra_otel.adapters.otlp.ExporterSettings`, built
from the ``OTEL_EXPORTER_OTLP_METRICS_*`` variables where set and otherwise from the
traces' (config.py); an endpoint not given is derived from the traces' (with HTTP the
path becomes ``/v1/metrics``: :func:`signal_endpoint`). :class:`MeteredSpanSink` wraps the span
sink so that exactly the batches the endpoint acknowledged are measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import trio
from opentelemetry.metrics import CallbackOptions, Counter, Histogram
from opentelemetry.metrics import Observation as OtelObservation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

import hydra_otel
from hydra_otel.adapters.export_log import watch
from hydra_otel.adapters.otlp import Delivery, ExporterSettings, SpanSink, signal_exporter
from hydra_otel.core.cicd_metrics import (
    DURATION_BUCKETS,
    INSTRUMENTS,
    InstrumentKind,
    MetricDeriver,
    Observation,
)
from hydra_otel.core.spans import SpanRecord

#: Seconds between two exports of the cumulative metrics.
DEFAULT_INTERVAL_S = 60.0


def signal_endpoint(s: ExporterSettings, signal: str) -> str:
    """The endpoint for OTLP signal ``signal`` ("metrics", "logs") on the traces' collector.

    gRPC serves every signal on one endpoint. For HTTP, a trailing ``/v1/traces`` becomes
    ``/v1/<signal>``; any other path gets ``/v1/<signal>`` appended (as the OTel spec does with a
    base URL).

    Args:
        s: the traces exporter settings.
        signal: the OTLP signal name.

    Returns:
        The URL or ``host:port`` the signal's exporter takes.
    """
    if s.protocol == "grpc":
        return s.endpoint
    parts = urlsplit(s.endpoint)
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1/traces")
    return urlunsplit(parts._replace(path=f"{path}/v1/{signal}"))


def make_metric_exporter(s: ExporterSettings, endpoint: str | None = None) -> MetricExporter:
    """The official OTLP metric exporter for ``s``.

    Args:
        s: the metrics exporter settings (protocol, headers, TLS, timeout, compression).
        endpoint: overrides :func:`signal_endpoint`.

    Returns:
        A gRPC or HTTP/protobuf exporter (cumulative temporality).
    """
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    exporter: MetricExporter = signal_exporter(
        s, GrpcExporter, HttpExporter, endpoint or signal_endpoint(s, "metrics")
    )
    watch(exporter, "metrics")  # one line per outage (adapters/export_log.py)
    return exporter


def histogram_views(boundaries: Sequence[float] = DURATION_BUCKETS) -> list[View]:
    """One explicit-bucket View per histogram in ``INSTRUMENTS``."""
    return [
        View(
            instrument_name=i.name,
            aggregation=ExplicitBucketHistogramAggregation(boundaries=tuple(boundaries)),
        )
        for i in INSTRUMENTS.values()
        if i.kind is InstrumentKind.HISTOGRAM
    ]


class MetricsSink:
    """Records observations into SDK instruments exported periodically over OTLP.

    With ``exporter=None`` the sink is off: :meth:`record` does nothing and no thread starts.

    Args:
        exporter: the OTLP metric exporter, or None to disable metrics.
        resource: the resource (the same as the traces').
        interval_s: seconds between exports; ``math.inf`` exports only on flush and shutdown.
        export_timeout_s: how long one export may take.
    """

    def __init__(
        self,
        exporter: MetricExporter | None,
        resource: Resource,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        export_timeout_s: float = 30.0,
    ) -> None:
        self._provider: MeterProvider | None = None
        self._histograms: dict[str, Histogram] = {}
        self._counters: dict[str, Counter] = {}
        # Latest values of the observed instruments, replaced whole by set_live (an atomic rebind)
        # and read by the SDK's collection thread.
        self._live: dict[str, list[Observation]] = {}
        # Without a periodic thread (interval inf) the SDK's shutdown does not export: flush first.
        self._flush_on_shutdown = math.isinf(interval_s)
        #: Observations recorded, for statistics.
        self.recorded = 0
        if exporter is None:
            return
        reader = PeriodicExportingMetricReader(
            exporter,
            export_interval_millis=interval_s * 1000,  # inf stays inf: no periodic thread
            export_timeout_millis=export_timeout_s * 1000,
        )
        self._provider = MeterProvider(
            metric_readers=[reader], resource=resource, views=histogram_views(), shutdown_on_exit=False
        )
        meter = self._provider.get_meter("hydra_otel", hydra_otel.__version__)
        for i in INSTRUMENTS.values():
            if i.kind is InstrumentKind.HISTOGRAM:
                self._histograms[i.name] = meter.create_histogram(
                    i.name, unit=i.unit, description=i.description
                )
            elif i.kind is InstrumentKind.OBSERVED_UP_DOWN_COUNTER:
                meter.create_observable_up_down_counter(
                    i.name, callbacks=[self._callback(i.name)], unit=i.unit, description=i.description
                )
            else:
                self._counters[i.name] = meter.create_counter(i.name, unit=i.unit, description=i.description)

    @property
    def enabled(self) -> bool:
        """True when observations are exported."""
        return self._provider is not None

    def record(self, observations: Iterable[Observation]) -> None:
        """Record ``observations`` (non-blocking; safe from any thread).

        Raises:
            KeyError: an observation names no instrument in ``core.cicd_metrics.INSTRUMENTS`` (a bug).
        """
        if self._provider is None:
            return
        for o in observations:
            attributes = dict(o.attributes)
            if o.name in self._histograms:
                self._histograms[o.name].record(o.value, attributes)
            else:
                self._counters[o.name].add(o.value, attributes)
            self.recorded += 1

    def set_live(self, observations: Iterable[Observation]) -> None:
        """Replace the current values of the observed instruments (``cicd.pipeline.run.active``,
        ``cicd.worker.count``); the next collection reports them. Safe from any thread."""
        live: dict[str, list[Observation]] = {}
        for o in observations:
            live.setdefault(o.name, []).append(o)
        self._live = live

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[OtelObservation]]:
        def observe(_options: CallbackOptions) -> Iterable[OtelObservation]:
            return [OtelObservation(o.value, dict(o.attributes)) for o in self._live.get(name, ())]

        return observe

    async def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Collect and export now, in a worker thread; True on success (or when off)."""
        provider = self._provider
        if provider is None:
            return True
        return await trio.to_thread.run_sync(provider.force_flush, timeout_s * 1000)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Export what was recorded since the last export and stop the reader's thread (worker thread)."""
        provider, self._provider = self._provider, None
        if provider is None:
            return
        if self._flush_on_shutdown:
            await trio.to_thread.run_sync(provider.force_flush, timeout_s * 1000)
        await trio.to_thread.run_sync(provider.shutdown, timeout_s * 1000)


def make_metrics_sink(
    s: ExporterSettings,
    resource: Resource,
    *,
    enabled: bool,
    interval_s: float = DEFAULT_INTERVAL_S,
    endpoint: str | None = None,
) -> MetricsSink:
    """The metrics sink the configuration asks for (off unless ``enabled``).

    Args:
        s: the metrics exporter settings (protocol, headers, TLS, timeout, compression).
        resource: the traces' resource.
        enabled: the off switch.
        interval_s: seconds between exports.
        endpoint: the metrics endpoint as configured; else derived with :func:`signal_endpoint`.

    Returns:
        A :class:`MetricsSink`; call ``await sink.shutdown()`` after the exporter task ended.
    """
    if not enabled:
        return MetricsSink(None, resource)
    return MetricsSink(
        make_metric_exporter(s, endpoint), resource, interval_s=interval_s, export_timeout_s=s.timeout_s + 1
    )


class MeteredSpanSink:
    """A :class:`~hydra_otel.adapters.otlp.SpanSink` that measures the batches the endpoint took.

    Args:
        inner: the span sink that exports.
        metrics: where the observations go.
        deriver: spans -> observations, counting each span once.
    """

    def __init__(self, inner: SpanSink, metrics: MetricsSink, deriver: MetricDeriver | None = None) -> None:
        self._inner = inner
        self._metrics = metrics
        self._deriver = deriver or MetricDeriver()

    @property
    def deriver(self) -> MetricDeriver:
        """The span -> observation state (for statistics)."""
        return self._deriver

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        """Export ``batch``; once it is done, record its observations.

        Spans the endpoint refused are observed too: the builds they describe did run.
        """
        delivery = await self._inner.export(batch)
        if delivery.done and self._metrics.enabled:
            self._metrics.record(self._deriver.observe(batch))
        return delivery

    def shutdown(self) -> None:
        """Shut the inner sink down; the metrics sink is shut down separately (it exports, so it is async)."""
        self._inner.shutdown()
