"""The real ``hydra-otel run`` process: starts, exports, and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import trio

from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.harness import Hydra, daemon_env, daemon_process

CID = "77.1"


async def read_until(stream: trio.abc.ReceiveStream, needle: str, log: list[str]) -> None:
    """Read JSON log lines from ``stream`` until one has ``message == needle``."""
    buffer = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"process closed stderr before {needle!r}; log: {log}")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            log.append(line.decode())
            if json.loads(line).get("message") == needle:
                return


async def test_run_exports_and_stops_on_sigterm(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """`hydra-otel run` exports an evaluation span, drains and exits 0 on SIGTERM, and never logs the password."""
    # The sandbox trusts local connections, so the password is never checked: only its redaction is.
    dsn = hydra_db.replace("postgres@", "postgres:s3cret@")
    env = daemon_env(dsn, f"http://{otlp_grpc.endpoint}", tmp_path)
    log: list[str] = []
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        await hydra.run(*hydra.sim.evaluator_starts(1, CID, 1_700_000_000))
        await hydra.run(hydra.sim.eval_fetch_failed(1, CID, 1_700_000_005, "no network"))
        (span,) = await otlp_grpc.wait_for_spans(1)
        assert span.span.name == "BUILD nixpkgs:trunk"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await read_until(stderr, "stopped", log)
            assert await proc.wait() == 0
    assert not any('"level": "error"' in line for line in log), log
    assert "s3cret" not in "\n".join(log)
    assert any("***" in line for line in log), "the DSN is logged, redacted"


async def http_get(port: int, path: str) -> tuple[int, str]:
    """A minimal HTTP/1.1 GET against 127.0.0.1 (no client library needed)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_metrics_and_health_during_a_run(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """`/metrics` counts what the running daemon did and `/healthz` says ready, over real HTTP."""
    port = free_port()
    env = daemon_env(
        hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path, HYDRA_OTEL_METRICS_ADDRESS=f"127.0.0.1:{port}"
    )
    log: list[str] = []
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        await hydra.run(*hydra.sim.evaluator_starts(1, CID, 1_700_000_000))
        await hydra.run(hydra.sim.eval_fetch_failed(1, CID, 1_700_000_005, "no network"))
        await hydra.run("SELECT pg_notify('eval_added', 'garbage');")
        await otlp_grpc.wait_for_spans(1)
        with trio.fail_after(10):
            while True:  # the export is acknowledged before the counter moves: poll under the deadline
                status, body = await http_get(port, "/metrics")
                # The span goes as soon as it is resolved; the garbage may be read after it (the
                # connection pauses its reads after the first, docs/performance.md).
                garbage = 'hydra_otel_payload_errors_total{channel="eval_added"} 1'
                if "hydra_otel_spans_exported_total 1\n" in body and garbage in body:
                    break
                await trio.sleep(0.05)
        assert status == 200
        assert 'hydra_otel_events_received_total{channel="eval_started"} 1' in body
        assert 'hydra_otel_payload_errors_total{channel="eval_added"} 1' in body
        assert "hydra_otel_ready 1" in body
        health, _ = await http_get(port, "/healthz")
        assert health == 200
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0


async def test_second_signal_exits_at_once(hydra: Hydra, hydra_db: str, tmp_path: Path) -> None:
    """With the endpoint down the drain waits up to the grace period; a second SIGTERM ends it at once."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = daemon_env(hydra_db, nowhere, tmp_path, HYDRA_OTEL_SHUTDOWN_GRACE="60")
    log: list[str] = []
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        await hydra.run(*hydra.sim.evaluator_starts(1, CID, 1_700_000_000))
        await hydra.run(hydra.sim.eval_fetch_failed(1, CID, 1_700_000_005, "no network"))
        with trio.fail_after(20):
            await read_until(stderr, "OTLP export failed; retrying with backoff", log)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await read_until(stderr, "signal received; draining", log)
        with trio.move_on_after(1):  # the first signal alone does not end it: the export is still failing
            await proc.wait()
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):  # far less than the 60 s grace
            await read_until(stderr, "second signal; exiting now", log)
            assert await proc.wait() == 0
