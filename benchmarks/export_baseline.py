"""R_export: the OTLP exporter alone, sending pre-built spans to the benchmark's receiver.

Run as its own process: ``python benchmarks/export_baseline.py ENDPOINT LAYOUT_JSON BATCH``.
Before timing it renders the burst phase's spans with the daemon's core (model.py) and
converts them with ``adapters.otlp.to_readable``, exactly the spans the daemon exports for
that phase; it prints ``{"ready": N}``, waits for ``go`` on stdin, then exports them in
batches of BATCH with the exporter the daemon uses (``adapters.otlp.make_exporter``), one
request at a time, and prints the monotonic start and end times.
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
from hydra_otel.adapters.otlp import ExporterSettings, make_exporter, to_readable


def main(endpoint: str, layout: dict[str, Any], batch: int) -> dict[str, object]:
    lay = w.Layout(w.Sizes(**layout["sizes"]), int(layout["t0"]))
    records = [r for b in lay.bursts() for r in model.burst_records(lay, b)]
    resource = Resource({"service.name": "hydra-otel", "service.version": hydra_otel.__version__})
    spans = [to_readable(r, resource) for r in records]
    batches = [spans[i : i + batch] for i in range(0, len(spans), batch)]
    settings = ExporterSettings(protocol="grpc", endpoint=endpoint, headers={}, timeout_s=5.0, insecure=True)
    exporter = make_exporter(settings)
    print(json.dumps({"ready": len(spans)}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return {"error": "not started"}
    failures = 0
    cpu0, t_start = time.process_time(), time.monotonic()
    for b in batches:
        if exporter.export(b) is not SpanExportResult.SUCCESS:
            failures += 1
    t_end = time.monotonic()
    cpu = time.process_time() - cpu0
    exporter.shutdown()
    return {"spans": len(spans), "t_start": t_start, "t_end": t_end, "cpu_s": cpu, "failures": failures}


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    result = main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(result), flush=True)
