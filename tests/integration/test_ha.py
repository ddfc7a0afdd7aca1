"""High availability: two instances, one active exporter, the standby takes over when it dies."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio

from hydra_otel.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.harness import Hydra, daemon_env
from tests.integration.test_cli import read_until


async def test_standby_takes_over_after_sigkill(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """Only the lock holder exports; after it is killed, the standby becomes active within seconds."""
    endpoint = f"http://{otlp_grpc.endpoint}"
    cmd = [sys.executable, "-m", "hydra_otel", "run"]
    env_a, env_b = (
        daemon_env(hydra_db, endpoint, tmp_path / n, HYDRA_OTEL_TAKEOVER_WINDOW="120") for n in "ab"
    )
    a = await trio.lowlevel.open_process(cmd, env=env_a, stderr=subprocess.PIPE)
    b: trio.Process | None = None
    log_a: list[str] = []
    log_b: list[str] = []
    assert a.stderr is not None
    try:
        with trio.fail_after(20):
            await read_until(a.stderr, "ready", log_a)
        # B starts only once A holds the lock, so which one is active is not a race.
        b = await trio.lowlevel.open_process(cmd, env=env_b, stderr=subprocess.PIPE)
        assert b.stderr is not None
        with trio.fail_after(20):
            await read_until(
                b.stderr, "standby: another instance holds the lock; waiting to take over", log_b
            )
        await hydra.run(*hydra.sim.evaluator_starts(1, "1.1", 1_700_000_000))
        await hydra.run(hydra.sim.eval_fetch_failed(1, "1.1", 1_700_000_001, "first"))
        (first,) = await otlp_grpc.wait_for_spans(1)
        a.send_signal(signal.SIGKILL)
        await a.wait()
        with trio.fail_after(15):
            await read_until(b.stderr, "ready", log_b)
        await hydra.run(*hydra.sim.evaluator_starts(2, "2.2", 1_700_000_010))
        await hydra.run(hydra.sim.eval_fetch_failed(2, "2.2", 1_700_000_011, "second"))
        spans = await otlp_grpc.wait_for_spans(
            lambda got: any(s.span.name == "eval nixpkgs:staging" for s in got)
        )
        # The standby's catch-up re-reads the takeover window: a span may come again, but only identical.
        assert {s.span.name for s in spans} == {"eval nixpkgs:trunk", "eval nixpkgs:staging"}
        distinct = {(s.span.span_id, s.span.SerializeToString()) for s in spans}
        assert len(distinct) == len({s.span.span_id for s in spans}) == 2
        assert first.span.SerializeToString() in {encoded for _, encoded in distinct}
        b.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await b.wait() == 0
    finally:
        for proc in (a, b):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
