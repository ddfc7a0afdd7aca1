"""High availability: two instances, one active exporter, the standby takes over when it dies."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.harness import Hydra, daemon_env, daemon_process
from tests.integration.test_cli import read_until


async def test_standby_takes_over_after_sigkill(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """Only the lock holder exports; after it is killed, the standby becomes active within seconds."""
    endpoint = f"http://{otlp_grpc.endpoint}"
    env_a, env_b = (
        daemon_env(hydra_db, endpoint, tmp_path / n, HYDRA_OTEL_TAKEOVER_WINDOW="120") for n in "ab"
    )
    log_a: list[str] = []
    log_b: list[str] = []
    async with daemon_process(env_a) as (a, a_err):
        with trio.fail_after(20):
            await read_until(a_err, "ready", log_a)
        # B starts only once A holds the lock, so which one is active is not a race.
        async with daemon_process(env_b) as (b, b_err):
            with trio.fail_after(20):
                await read_until(
                    b_err, "standby: another instance holds the lock; waiting to take over", log_b
                )
            await hydra.run(*hydra.sim.evaluator_starts(1, "1.1", 1_700_000_000))
            await hydra.run(hydra.sim.eval_fetch_failed(1, "1.1", 1_700_000_001, "first"))
            (first,) = await otlp_grpc.wait_for_spans(1)
            a.send_signal(signal.SIGKILL)
            await a.wait()
            with trio.fail_after(15):
                await read_until(b_err, "ready", log_b)
            await hydra.run(*hydra.sim.evaluator_starts(2, "2.2", 1_700_000_010))
            await hydra.run(hydra.sim.eval_fetch_failed(2, "2.2", 1_700_000_011, "second"))
            spans = await otlp_grpc.wait_for_spans(
                lambda got: any(s.span.name == "BUILD nixpkgs:staging" for s in got)
            )
            # The standby's catch-up re-reads the takeover window: a span may come again, but only identical.
            assert {s.span.name for s in spans} == {"BUILD nixpkgs:trunk", "BUILD nixpkgs:staging"}
            distinct = {(s.span.span_id, s.span.SerializeToString()) for s in spans}
            assert len(distinct) == len({s.span.span_id for s in spans}) == 2
            assert first.span.SerializeToString() in {encoded for _, encoded in distinct}
            b.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await b.wait() == 0
