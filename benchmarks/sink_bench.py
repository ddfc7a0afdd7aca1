"""The span sinks alone: the thread (OtlpSink) against the export process (ProcessSink).

Sends the same batches of rendered build and step spans through each sink, one batch at a
time as the exporter task does, to an OTLP/gRPC receiver in a process of its own, and prints
spans/s, the batch latency and the CPU per span spent in this process and in the export
process (from /proc, after the child's start-up, which is left out).

Run: ``.venv/bin/python benchmarks/sink_bench.py [--batches N] [thread process ...]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import trio
from opentelemetry.sdk.resources import Resource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.factories: the test rows

from tests.factories import RENDER_CONFIG, make_build, make_step

from hydra_otel.adapters.export_process import ProcessSink
from hydra_otel.adapters.otlp import ExporterSettings, OtlpSink, SpanSink, make_exporter
from hydra_otel.core.builds import build_spans
from hydra_otel.core.spans import SpanRecord

BATCH = 512
_RECEIVER = """
import sys
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
with GrpcOtlpReceiver() as r:
    print(r.endpoint, flush=True)
    sys.stdin.read()
"""


def batches(n: int) -> list[list[SpanRecord]]:
    """``n`` batches of rendered spans, each span once."""
    spans: list[SpanRecord] = []
    build_id = 0
    while len(spans) < n * BATCH:
        build_id += 1
        steps = [make_step(build_id=build_id, stepnr=k) for k in (1, 2, 3)]
        spans += build_spans(RENDER_CONFIG, make_build(build_id=build_id), steps)
    return [spans[i * BATCH : (i + 1) * BATCH] for i in range(n)]


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pid_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(kind: str, settings: ExporterSettings, work: list[list[SpanRecord]]) -> str:
    """One sink through every batch; a line of figures."""
    resource_ = Resource({"service.name": "hydra-otel", "service.instance.id": "hydra@bench"})
    sink: SpanSink = (
        OtlpSink(make_exporter(settings), resource_) if kind == "thread" else ProcessSink(settings, resource_)
    )
    try:
        assert (await sink.export(work[0][:10])).done  # the child started, the channel connected
        pid = sink.pid if isinstance(sink, ProcessSink) else None
        here, child, start = _self_cpu(), _pid_cpu(pid), time.perf_counter()
        latencies = []
        for batch in work:
            t = time.perf_counter()
            assert (await sink.export(batch)).done
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        here, child = _self_cpu() - here, _pid_cpu(pid) - child
    finally:
        sink.shutdown()
    n = sum(map(len, work))
    latencies.sort()
    return (
        f"{kind:8} {n / elapsed:8,.0f} spans/s  batch p50 {latencies[len(latencies) // 2] * 1000:5.1f} ms"
        f"  max {latencies[-1] * 1000:5.1f} ms  CPU per span: this process {here / n * 1e6:5.1f} µs,"
        f" export process {child / n * 1e6:5.1f} µs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("sinks", nargs="*", default=["thread", "process", "thread", "process"])
    args = parser.parse_args()
    work = batches(args.batches)
    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        endpoint = receiver.stdout.readline().strip()
        settings = ExporterSettings(protocol="grpc", endpoint=f"http://{endpoint}", headers={}, timeout_s=5.0)
        for kind in args.sinks:
            print(trio.run(measure, kind, settings, work), flush=True)
    finally:
        assert receiver.stdin is not None
        receiver.stdin.close()
        receiver.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
