"""A forged ``step_finished`` cannot make the real daemon read a file outside Hydra's log directory.

Any role that can connect to Hydra's database can send any notification. Here a role with no
grant of its own sends ``step_finished`` for a failed step, naming a secret file (or a FIFO) as the
log path, against the real ``hydra-otel run`` process: the secret never reaches the collector, the
step's real log (in the log directory, found from the step row's derivation) does, a FIFO stalls
nothing, and SIGTERM still stops the daemon promptly.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.core.logtail import hydra_log_path
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import AttributeValue, GrpcOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import Hydra, daemon_env, daemon_process
from tests.integration.test_cli import free_port, http_get, read_until

T0 = 1_700_000_000
SECRET = "OTEL_EXPORTER_OTLP_HEADERS=api-key=TOPSECRET"
REAL_TAIL = "error: builder for '/nix/store/...-bad.drv' failed with exit code 2"
_roles = itertools.count(1)


@asynccontextmanager
async def intruder(hydra: Hydra, dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as a fresh login role that has been granted nothing (PUBLIC's defaults only)."""
    role = f"intruder_{os.getpid()}_{next(_roles)}"
    await hydra.run(f"CREATE ROLE {role} LOGIN")
    conn = await aio_as_trio(asyncpg.connect)(dsn.replace("postgres@", f"{role}@", 1))
    try:
        assert await aio_as_trio(conn.fetchval)("SELECT has_table_privilege('buildsteps', 'SELECT')") is False
        yield conn
    finally:
        await aio_as_trio(conn.close)()
        await hydra.run(f"DROP ROLE {role}")


async def failed_step(hydra: Hydra, jobset: int) -> tuple[int, str]:
    """A build whose step 1 failed: rows written as the queue runner does, but no notification sent."""
    _, (build,), sql = hydra.sim.eval_added(
        jobset,
        f"{jobset}.1",
        eval_start=T0,
        timestamp=T0 + 10,
        checkout_time=2,
        eval_time=5,
        new_builds=[NewBuild(job="bad", nixname="bad")],
    )
    await hydra.run(*sql, hydra.sim.step_started(build, 1, now=T0 + 20))
    await hydra.run(
        "UPDATE buildsteps SET busy = 0, status = 1, errormsg = 'builder failed', stoptime = "
        f"{T0 + 30}, overhead = 10, timesbuilt = 1 WHERE build = {build} AND stepnr = 1"
    )
    return build, hydra.sim.drvpaths[build]


def step_spans(spans: list[ReceivedSpan], build: int) -> list[ReceivedSpan]:
    return [
        s
        for s in spans
        if (a := attributes_dict(s.span.attributes)).get("hydra.build.id") == build
        and a.get("hydra.step.nr") == 1
    ]


def tail_events(span: ReceivedSpan) -> list[dict[str, AttributeValue]]:
    return [attributes_dict(e.attributes) for e in span.span.events if e.name == "hydra.step.log_tail"]


def everything_received(receiver: GrpcOtlpReceiver) -> bytes:
    return b"".join(r.SerializeToString() for r in receiver.requests)


async def test_forged_step_finished_cannot_export_a_file_outside_the_log_dir(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """The secret named by a forged notification never reaches the receiver; the step's real log tail does."""
    secret = tmp_path / "hydra-otel.env"
    secret.write_text(SECRET + "\n")
    logs = tmp_path / "build-logs"
    port = free_port()
    env = daemon_env(
        hydra_db,
        f"http://{otlp_grpc.endpoint}",
        tmp_path / "state",
        HYDRA_OTEL_STEP_LOGS_DIR=str(logs),
        HYDRA_OTEL_METRICS_ADDRESS=f"127.0.0.1:{port}",
    )
    log: list[str] = []
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        build, drv = await failed_step(hydra, 1)
        real = Path(hydra_log_path(str(logs), drv))
        real.parent.mkdir(parents=True)
        real.write_text(f"building\n{REAL_TAIL}\n")  # noqa: ASYNC240 - a small test file
        async with intruder(hydra, hydra_db) as conn:
            for path in (secret, f"{logs}/../{secret.name}", "/proc/self/environ"):
                await aio_as_trio(conn.execute)(f"SELECT pg_notify('step_finished', E'{build}\\t1\\t{path}')")
        spans = await otlp_grpc.wait_for_spans(lambda s: bool(step_spans(list(s), build)))
        (step,) = step_spans(spans, build)
        (event,) = tail_events(step)
        assert event["hydra.step.log_tail"] == f"building\n{REAL_TAIL}"
        assert event["log.file.path"] == str(real)
        with trio.fail_after(10):
            while True:  # the counters move after the export: poll under the deadline
                _, body = await http_get(port, "/metrics")
                if 'hydra_otel_log_tails_total{outcome="found"} 1' in body:
                    break
                await trio.sleep(0.05)
        assert 'hydra_otel_log_tails_refused_total{reason="notified_path"} 1' in body
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await read_until(stderr, "stopped", log)
            assert await proc.wait() == 0
    assert b"TOPSECRET" not in everything_received(otlp_grpc)
    assert "TOPSECRET" not in "\n".join(log)
    refusals = [line for line in log if "not the step's log" in line]
    assert len(refusals) == 1, log  # one line, not one per notification


async def test_fifo_as_log_stalls_nothing_and_sigterm_stops_promptly(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """A FIFO where the log should be, and one named by a forged payload, are refused without blocking."""
    logs = tmp_path / "build-logs"
    outside_fifo = tmp_path / "fifo"
    os.mkfifo(outside_fifo)
    env = daemon_env(
        hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path / "state", HYDRA_OTEL_STEP_LOGS_DIR=str(logs)
    )
    log: list[str] = []
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        build, drv = await failed_step(hydra, 1)
        fifo = Path(hydra_log_path(str(logs), drv))
        fifo.parent.mkdir(parents=True)
        os.mkfifo(fifo)
        async with intruder(hydra, hydra_db) as conn:
            await aio_as_trio(conn.execute)(
                f"SELECT pg_notify('step_finished', E'{build}\\t1\\t{outside_fifo}')"
            )
        # A later evaluation (another jobset) must still be exported.
        await hydra.run(*hydra.sim.evaluator_starts(2, "2.9", T0 + 100))
        await hydra.run(hydra.sim.eval_fetch_failed(2, "2.9", T0 + 101, "later evaluation"))
        spans = await otlp_grpc.wait_for_spans(
            lambda s: (
                any(x.span.name == "BUILD nixpkgs:staging" for x in s) and bool(step_spans(list(s), build))
            )
        )
        (step,) = step_spans(spans, build)
        assert tail_events(step) == []
        start = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await read_until(stderr, "stopped", log)
            assert await proc.wait() == 0
        assert trio.current_time() - start < 5
    assert any("not a regular file where a step log should be" in line for line in log), log
