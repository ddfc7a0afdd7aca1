"""Closing a gap promptly: rows that stopped just before a reconnect or a start arrive within seconds.

A catch-up scan covers rows stopped up to ``lag`` (2) seconds before the database's clock. Builds
that finished in the last seconds of an outage, whose notifications nobody heard, are therefore
invisible to the scan that follows the reconnect or the start; the follow-up scan (lag + 1 s
later) finds them, instead of the periodic scan up to ``--catchup-interval`` (30 s) later. Each
test measures the time from recovery to the last of those spans and prints it (``pytest -s``);
docs/operations.md quotes the figures.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.demo.sandbox.hydrasim import HydraSim
from hydra_otel.demo.sandbox.pgcluster import PgCluster
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.harness import Hydra
from tests.integration.workload import Daemons, Player, assert_exactly, now, wait_for_expected

#: Recovery to last gap span must stay well under the default 30 s interval: lag + 1 s, plus a scan.
PROMPT = 8.0


def silently(sql: str) -> str:
    """A Hydra transaction without its NOTIFYs: what a daemon that was not listening never heard."""
    return "\n".join(line for line in sql.splitlines() if not line.startswith("SELECT pg_notify("))


async def finish_now_unheard(play: Player, builds: list[int]) -> None:
    """Each build runs one step that stops *now* and finishes now; no notification is delivered."""
    t, sim = now(), play.hydra.sim
    for b in builds:
        eval_id = play.owner[b]
        await play.hydra.run(
            silently(sim.step_started(b, 1, now=t - 1)),
            silently(sim.step_finished(b, 1, now=t)),
            silently(sim.build_finished(b, start=t - 1, stop=t)),
        )
        play.expected.build(eval_id, b, queued=True)
        play.expected.step(eval_id, b, 1)


async def test_reconnect_closes_its_gap_within_seconds(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """LISTEN backend terminated right after builds finished unheard: their spans come lag + 1 s later."""
    caplog.set_level(logging.INFO, logger="hydra_otel.db")
    daemon = await daemons.start()  # the default 30 s interval
    play = Player(hydra)
    _, builds = await play.evaluation(1, 5)
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    (pid,) = [r.__dict__["backend_pid"] for r in caplog.records if r.getMessage() == "LISTEN active"]
    listen = daemon.service.listen
    await finish_now_unheard(play, builds)
    assert await hydra.fetchval(f"SELECT pg_terminate_backend({pid})") is True
    with trio.fail_after(10):
        while listen.connects < 2:  # noqa: ASYNC110 - set by the daemon's listener
            await trio.sleep(0.01)
    recovered = trio.current_time()
    await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=PROMPT)
    took = trio.current_time() - recovered
    print(f"\nreconnect: last gap span {took:.2f} s after LISTEN was active again")
    await daemon.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_start_closes_the_gap_of_the_downtime_within_seconds(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Builds that finished in the last second before a start: their spans come lag + 1 s after ready."""
    first = await daemons.start()
    play = Player(hydra)
    _, builds = await play.evaluation(1, 5)
    await wait_for_expected(otlp_grpc, play.expected, first)
    await first.stop()
    await finish_now_unheard(play, builds)
    second = await daemons.start()
    ready = trio.current_time()
    await wait_for_expected(otlp_grpc, play.expected, second, timeout=PROMPT)
    took = trio.current_time() - ready
    print(f"\nrestart: last gap span {took:.2f} s after ready")
    await second.stop()
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


async def test_postgres_restart_closes_its_gap_within_seconds(
    aio_loop: asyncio.AbstractEventLoop,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
) -> None:
    """Builds finished unheard just before a PostgreSQL fast restart: their spans come lag + 1 s after LISTEN."""
    with PgCluster() as cluster:
        cluster.createdb("hydra")
        conn = await aio_as_trio(asyncpg.connect)(cluster.dsn("hydra"))
        hydra = Hydra(HydraSim(), conn)
        await hydra.run(hydra.sim.create_project("nixpkgs"), hydra.sim.create_jobset("nixpkgs", "trunk")[1])
        daemon = await daemons.start(daemons.config(dsn=cluster.dsn("hydra")))
        play = Player(hydra)
        _, builds = await play.evaluation(1, 5)
        await wait_for_expected(otlp_grpc, play.expected, daemon)
        listen = daemon.service.listen
        await finish_now_unheard(play, builds)
        conn.terminate()
        await trio.to_thread.run_sync(cluster.stop_server, "fast")
        await trio.to_thread.run_sync(cluster.start_server)
        with trio.fail_after(20):
            while listen.connects < 2:  # noqa: ASYNC110 - set by the daemon's listener
                await trio.sleep(0.01)
        recovered = trio.current_time()
        await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=PROMPT)
        took = trio.current_time() - recovered
        print(f"\nPostgreSQL restart: last gap span {took:.2f} s after LISTEN was active again")
        await daemon.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)
