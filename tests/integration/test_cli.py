"""The real ``hydra-otel run`` process: starts, exports, and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from hydra_otel.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.harness import Hydra

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
    env = {
        **os.environ,
        # The sandbox trusts local connections, so the password is never checked: only its redaction is.
        "HYDRA_OTEL_DATABASE_URL": hydra_db.replace("postgres@", "postgres:s3cret@"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{otlp_grpc.endpoint}",
        "HYDRA_OTEL_STATE_DIR": str(tmp_path),
        "HYDRA_OTEL_EXPORT_DELAY": "0.05",
    }
    log: list[str] = []
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hydra_otel", "run"], env=env, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        with trio.fail_after(20):
            await read_until(proc.stderr, "ready", log)
        await hydra.run(*hydra.sim.evaluator_starts(1, CID, 1_700_000_000))
        await hydra.run(hydra.sim.eval_fetch_failed(1, CID, 1_700_000_005, "no network"))
        (span,) = await otlp_grpc.wait_for_spans(1)
        assert span.span.name == "eval nixpkgs:trunk"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await read_until(proc.stderr, "stopped", log)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not any('"level": "error"' in line for line in log), log
    assert "s3cret" not in "\n".join(log)
    assert any("***" in line for line in log), "the DSN is logged, redacted"
