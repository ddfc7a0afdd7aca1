"""What the configuration asks for: render settings, the OTLP sinks of the three signals.

Built once per process by ``hydra-otel run`` (service.py), ``hydra-otel backfill``, ``check``,
``ids`` and the demo, so every one of them renders and exports exactly as the daemon does.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio
from opentelemetry.sdk.resources import Resource

import hydra_otel
from hydra_otel.adapters.export_process import ProcessSink
from hydra_otel.adapters.otlp import ExporterSettings, OtlpSink, SpanSink, make_exporter
from hydra_otel.adapters.otlp_metrics import MetricsSink, make_metrics_sink
from hydra_otel.adapters.steplogs import LogTailSink, StepLogs, TailSettings, make_log_exporter
from hydra_otel.config import Config, ExportWorker, OtlpTarget, Signal
from hydra_otel.core.evals import RenderConfig
from hydra_otel.selfmon.stats import Stats


def render_config(cfg: Config) -> RenderConfig:
    """What span rendering needs from the configuration."""
    return RenderConfig(
        instance=cfg.stitch.instance,
        hydra_url=cfg.stitch.hydra_url,
        error_text_limit=cfg.stitch.error_text_limit,
        max_builds_per_trace=cfg.stitch.max_builds_per_trace,
        max_links=cfg.stitch.max_links,
        max_spans_per_trace=cfg.stitch.max_spans_per_trace,
    )


def export_settings(cfg: Config, kind: Signal = Signal.TRACES) -> ExporterSettings:
    """The OTLP exporter settings the configuration asks for, for one signal."""
    t: OtlpTarget = getattr(cfg.export, kind)

    def path(p: Path | None) -> str | None:
        return None if p is None else str(p)

    return ExporterSettings(
        protocol=t.protocol,
        endpoint=t.endpoint,
        headers=dict(t.headers),
        timeout_s=t.timeout,
        certificate=path(t.certificate),
        client_key=path(t.client_key),
        client_certificate=path(t.client_certificate),
        insecure=t.insecure,
        compression=str(t.compression),
    )


def otel_resource(cfg: Config) -> Resource:
    """The resource every exported span, metric and log record carries.

    ``service.instance.id`` defaults to ``<instance>@<host name>``: HA instances share the instance
    name (and so the trace IDs) but not the host, and the exporting one must be told apart.
    ``OTEL_RESOURCE_ATTRIBUTES`` can set it.
    """
    instance_id = f"{cfg.stitch.instance}@{socket.gethostname()}"
    return Resource(
        {
            "service.instance.id": instance_id,
            **dict(cfg.export.resource),
            "service.version": hydra_otel.__version__,
        }
    )


def make_sink(cfg: Config, worker: ExportWorker | None = None, stats: Stats | None = None) -> SpanSink:
    """The OTLP span sink the configuration asks for.

    Args:
        cfg: the configuration.
        worker: where to encode and send, if not ``cfg.export.worker`` (``check`` sends one span:
            a thread, rather than a process started for it).
        stats: where the export process's deaths are counted.

    Raises:
        SdkMismatch: the installed exporter release lacks an internal that sending relies on.
        OSError: a certificate or key file cannot be read.
    """
    settings = export_settings(cfg)
    exporter = make_exporter(settings)  # here too for the process: its errors stop the start-up
    if (worker or cfg.export.worker) is ExportWorker.THREAD:
        return OtlpSink(exporter, otel_resource(cfg), max_request_bytes=cfg.export.max_request_bytes)
    exporter.shutdown()
    return ProcessSink(
        settings,
        otel_resource(cfg),
        max_request_bytes=cfg.export.max_request_bytes,
        log_level=cfg.log_level,
        secrets=cfg.secrets,
        stats=stats,
    )


def make_metrics(cfg: Config) -> MetricsSink:
    """The CI/CD metrics sink (a no-op unless ``--metrics-export``)."""
    t = cfg.telemetry
    return make_metrics_sink(
        export_settings(cfg, Signal.METRICS),
        otel_resource(cfg),
        enabled=t.metrics_export,
        interval_s=t.metrics_interval,
        endpoint=cfg.export.metrics.endpoint,  # final: a per-signal URL is used as it is
    )


def make_step_logs(cfg: Config) -> StepLogs | None:
    """Failed-step log tails (span events, or OTLP log records with ``--logs-export``), or None when off."""
    t = cfg.telemetry
    if not t.step_logs:
        return None
    sink = None
    if t.logs_export:
        exporter = make_log_exporter(export_settings(cfg, Signal.LOGS), cfg.export.logs.endpoint)
        sink = LogTailSink(exporter, otel_resource(cfg))
    return StepLogs(TailSettings(logs_dir=str(t.step_logs_dir), max_lines=t.step_log_lines), sink)


async def close_sinks(
    sink: SpanSink, metrics: MetricsSink | None = None, step_logs: StepLogs | None = None
) -> None:
    """Release the exporters, once, when the program ends (a restarted pipeline reuses them)."""
    sink.shutdown()
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 5  # a last metric export and the queued log records
        if metrics is not None:
            await metrics.shutdown()
        if step_logs is not None:
            await step_logs.aclose()
