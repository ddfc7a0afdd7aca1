"""The benchmark's OTLP/gRPC receiver, run as its own process: ``python benchmarks/otlp_sink.py``.

It records, per span ID, the ``time.monotonic()`` of the request that first brought it
(CLOCK_MONOTONIC is system-wide on Linux, so the parent compares it with its commit
times), and counts duplicates. It decodes only what it needs: the request's protobuf
(in C), then each span's ``span_id``; attributes are never looked at.

Protocol: it prints ``{"port": N}`` once listening, then answers one JSON line per
command read from stdin:

* ``stats`` -> totals, plus how many spans of the expected set arrived and when the
  first and last of them did;
* ``expect PATH`` -> the expected set becomes the 8-byte big-endian span IDs in PATH;
* ``dump PATH`` -> writes every (span ID, arrival) as 16-byte records (>Qd) to PATH;
* ``reset`` -> forgets everything; ``quit`` -> stops.
"""

from __future__ import annotations

import json
import math
import signal
import struct
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class Counter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.arrivals: dict[bytes, float] = {}
        self.spans = self.duplicates = self.requests = 0
        self.last = math.nan
        self.expected: frozenset[bytes] = frozenset()
        self.got = 0
        self.first_expected = math.inf
        self.last_expected = -math.inf

    def Export(self, request: ExportTraceServiceRequest, context: object) -> ExportTraceServiceResponse:
        now = time.monotonic()
        span_ids = [s.span_id for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with self.lock:
            self.requests += 1
            self.spans += len(span_ids)
            self.last = now
            arrivals, expected = self.arrivals, self.expected
            for sid in span_ids:
                if sid in arrivals:
                    self.duplicates += 1
                    continue
                arrivals[sid] = now
                if sid in expected:
                    self.got += 1
                    self.first_expected = min(self.first_expected, now)
                    self.last_expected = now
        return ExportTraceServiceResponse()

    def expect(self, path: str) -> None:
        with open(path, "rb") as f:
            raw = f.read()
        wanted = frozenset(raw[i : i + 8] for i in range(0, len(raw), 8))
        with self.lock:
            self.expected = wanted
            times = [self.arrivals[s] for s in wanted if s in self.arrivals]
            self.got = len(times)
            self.first_expected = min(times, default=math.inf)
            self.last_expected = max(times, default=-math.inf)

    def stats(self) -> dict[str, object]:
        with self.lock:
            return {
                "spans": self.spans,
                "distinct": len(self.arrivals),
                "duplicates": self.duplicates,
                "requests": self.requests,
                "last": None if math.isnan(self.last) else self.last,
                "expected": len(self.expected),
                "got": self.got,
                "first": self.first_expected if self.got else None,
                "last_expected": self.last_expected if self.got else None,
            }

    def dump(self, path: str) -> int:
        with self.lock:
            items = list(self.arrivals.items())
        with open(path, "wb") as f:
            f.write(b"".join(struct.pack(">Qd", int.from_bytes(k, "big"), t) for k, t in items))
        return len(items)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (it may be handling Ctrl-C)
    counter = Counter()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    try:
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "stats":
                reply: object = counter.stats()
            elif cmd == "expect":
                counter.expect(arg)
                reply = counter.stats()
            elif cmd == "dump":
                reply = {"dumped": counter.dump(arg)}
            elif cmd == "reset":
                with counter.lock:
                    counter.reset()
                reply = {"ok": True}
            elif cmd == "quit":
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        server.stop(grace=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
