"""R_export: the OTLP exporter alone, sending pre-built spans to the benchmark's receiver.

Run as its own process: ``python benchmarks/export_baseline.py ENDPOINT LAYOUT_JSON BATCH MODE``.
Before timing it renders the burst phase's spans with the daemon's core (model.py), exactly
the spans the daemon exports for that phase; it prints ``{"ready": N}``, waits for ``go`` on
stdin, then exports them in batches of BATCH, one request at a time, with the exporter the
daemon uses (``adapters.otlp.make_exporter``), and prints the monotonic start and end times.

MODE ``sdk`` is the issue's R_export: the spans are converted to the SDK's ``ReadableSpan``
(``adapters.otlp.to_readable``) before timing and sent with the SDK's ``export``, which
encodes them with the SDK's encoder. MODE ``direct`` sends the same ``SpanRecord``s the way
the daemon does: its own encoder (``core/otlp_wire.py``, timed) and ``export_encoded``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import model
import workload as w
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExportResult

import hydra_otel
from hydra_otel.adapters.otlp import (
    DEFAULT_MAX_REQUEST_BYTES,
    ExporterSettings,
    make_exporter,
    span_encoder,
    to_readable,
)


def main(endpoint: str, layout: dict[str, Any], batch: int, mode: str) -> dict[str, object]:
    lay = w.Layout(w.Sizes(**layout["sizes"]), int(layout["t0"]))
    records = [r for b in lay.bursts() for r in model.burst_records(lay, b)]
    resource = Resource({"service.name": "hydra-otel", "service.version": hydra_otel.__version__})
    settings = ExporterSettings(protocol="grpc", endpoint=endpoint, headers={}, timeout_s=5.0, insecure=True)
    exporter = make_exporter(settings)
    if mode == "sdk":
        spans = [to_readable(r, resource) for r in records]

        def send(i: int) -> bool:
            return exporter.export(spans[i : i + batch]) is SpanExportResult.SUCCESS

    else:
        encoder = span_encoder(resource)

        def send(i: int) -> bool:  # as OtlpSink does it
            parts = encoder.requests(records[i : i + batch], DEFAULT_MAX_REQUEST_BYTES)
            return all(exporter.export_encoded(request).ok for request in parts)

    print(json.dumps({"ready": len(records)}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return {"error": "not started"}
    failures = 0
    cpu0, t_start = time.process_time(), time.monotonic()
    for i in range(0, len(records), batch):
        if not send(i):
            failures += 1
    t_end = time.monotonic()
    cpu = time.process_time() - cpu0
    exporter.shutdown()
    return {"spans": len(records), "t_start": t_start, "t_end": t_end, "cpu_s": cpu, "failures": failures}


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    result = main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    print(json.dumps(result), flush=True)
