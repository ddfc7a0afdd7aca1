"""Nothing lost: every span a known workload must produce arrives, whatever fails in between.

Each test plays a known Hydra workload around a failure (daemon down, silent
table changes, LISTEN connection killed, PostgreSQL restarted, daemon
SIGKILLed, collector failing, down or hung, garbage notifications) and asserts
that the receiver ends with exactly the expected spans, computed from the core
ID functions (tests/integration/workload.py): none missing, none extra, and no
two spans with the same IDs but different bytes. A span may arrive twice,
byte-identical, only after a crash (the next start re-exports from its last
stored marks). Daemons are stopped gracefully before the final comparison, so
whatever was in flight has been exported by then.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.core.events import DATA_CHANNELS, TRIGGER_CHANNELS
from hydra_otel.demo.sandbox.hydrasim import HydraSim
from hydra_otel.demo.sandbox.pgcluster import PgCluster
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from hydra_otel.service import Service
from hydra_otel.tasks import resolver as resolver_module
from tests.integration.harness import Hydra
from tests.integration.workload import (
    Daemons,
    Player,
    assert_exactly,
    daemon_processes,
    merge_tx,
    now,
    wait_for_expected,
)

#: Short OTLP request timeout, so that a failing or hung collector fails an attempt quickly.
FAST_OTLP = {"OTEL_EXPORTER_OTLP_TIMEOUT": "500"}


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server of this module's own, which tests may stop and start."""
    with PgCluster() as cluster:
        yield cluster


async def poll(condition: str, check: Callable[[], bool], *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until ``check()`` is true (state set by the daemon's tasks), failing after ``timeout``."""
    try:
        with trio.fail_after(timeout):
            while not check():  # noqa: ASYNC110 - state set by the daemon's tasks, polled under a deadline
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout:g}s: {condition}") from None


async def committed(service: Service) -> None:
    """Wait until the daemon has stored progress marks once."""
    await poll("progress marks stored", lambda: service.committed is not None)


# --- the daemon away, and changes that send no notification ---------------------------------------------


async def test_daemon_down_while_hydra_works(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """What Hydra did while the daemon was stopped is exported by the next start on the same state dir."""
    first = await daemons.start(daemons.config(catchup_interval="0.5"))
    await committed(first.service)
    await first.stop()
    marks = first.service.committed
    assert marks is not None
    play = Player(hydra)
    _, (ok, bad, dep1, dep2, cancelled) = await play.evaluation(1, 5)
    await play.finish(ok)
    await play.fail_with_dependents(bad, [dep1, dep2])
    await play.cancel(cancelled, at=now() - 3)
    # Checked after the time the first daemon recorded for the jobset, so it is news to the next one.
    await play.fetch_failed_unseen(2, max(now(), marks.jobsets.get(2, 0) + 1))
    second = await daemons.start(daemons.config(catchup_interval="0.5"))
    await wait_for_expected(otlp_grpc, play.expected, second)
    await second.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_new_jobset_first_failure_while_down(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """The first check of a jobset created while the daemon ran fails while it is down: the failure arrives."""
    first = await daemons.start(daemons.config(catchup_interval="0.5"))
    jobset_id, sql = hydra.sim.create_jobset("nixpkgs", "new")
    progress = first.service.catchup_state
    assert progress is not None
    scans = progress.scans
    await hydra.run(sql)  # jobsets_added: a scan sees the new jobset, not checked yet
    await poll("a whole scan after the jobset was added", lambda: progress.scans >= scans + 2)
    await first.stop()
    play = Player(hydra)
    await play.fetch_failed_unseen(jobset_id, now())
    second = await daemons.start(daemons.config(catchup_interval="0.5"))
    await wait_for_expected(otlp_grpc, play.expected, second, timeout=5)
    await second.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_graceful_restart_repeats_only_identical_spans(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A graceful stop and start re-exports at most the overlap window, byte-identical (docs/operations.md)."""
    first = await daemons.start(daemons.config(catchup_interval="0.5"))
    play = Player(hydra)
    _, builds = await play.evaluation(1, 3)
    for b in builds:
        await play.finish(b)
    await wait_for_expected(otlp_grpc, play.expected, first)
    last_stop = max(play.last_stop.values())
    await poll(
        "marks stored past every build",
        lambda: first.service.committed is not None and first.service.committed.stop_time > last_stop,
    )
    await first.stop()
    second = await daemons.start(daemons.config(catchup_interval="0.5"))
    progress = second.service.catchup_state
    assert progress is not None
    await poll("the second daemon's first scan", lambda: progress.scans >= 1)
    await second.stop()
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


async def test_live_failure_not_reported_again_after_restart(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """An evaluation failure exported live is not exported again, in another trace, by the next start."""
    first = await daemons.start()
    progress = first.service.catchup_state
    assert progress is not None
    # The start-up scan and the one LISTEN's "connected" resync asks for; then none for the default 30 s.
    await poll("the first daemon's first two scans", lambda: progress.scans >= 2)
    at = max(now(), progress.marks.jobsets.get(2, 0) + 1)
    await hydra.run(*hydra.sim.evaluator_starts(2, "7.7", at - 1))
    await hydra.run(hydra.sim.eval_fetch_failed(2, "7.7", at, "cannot fetch 'src'"))
    play = Player(hydra)
    play.expected.attempt(2, "7.7")
    await wait_for_expected(otlp_grpc, play.expected, first)
    await first.stop()
    second = await daemons.start()
    second_progress = second.service.catchup_state
    assert second_progress is not None
    await poll("the second daemon's first scan", lambda: second_progress.scans >= 1)
    await second.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_silent_changes_while_running(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A web cancel, a substitution with no notification and a restart are all found by catch-up scans."""
    daemon = await daemons.start(daemons.config(catchup_interval="0.5"))
    play = Player(hydra)
    _, (cancelled, running, restarted) = await play.evaluation(1, 3)
    await play.finish(restarted)
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    await play.cancel(cancelled)  # stoptime = now: only a scan after the catch-up lag can see it
    await play.substituted_step(running)
    await play.restart(restarted)
    await play.finish(restarted)
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    await daemon.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


# --- losing PostgreSQL ---------------------------------------------------------------------------------


async def test_listen_connection_killed_mid_burst(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend on the LISTEN connection mid-burst: it reconnects and every span arrives."""
    caplog.set_level(logging.INFO, logger="hydra_otel.db")
    daemon = await daemons.start(daemons.config(catchup_interval="1"))
    (pid,) = [r.__dict__["backend_pid"] for r in caplog.records if r.getMessage() == "LISTEN active"]
    play = Player(hydra)
    _, builds = await play.evaluation(1, 40)
    for i in range(0, len(builds), 5):
        if i == 20:
            assert await hydra.fetchval(f"SELECT pg_terminate_backend({pid})") is True
        await hydra.run(merge_tx(*(sql for b in builds[i : i + 5] for sql in play.finish_sql(b))))
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    await poll("LISTEN reconnected", lambda: daemon.service.listen.connects >= 2)
    await daemon.stop()
    assert daemon.service.listen.connection_losses >= 1
    assert_exactly(otlp_grpc.spans(), play.expected)


async def private_hydra(cluster: PgCluster, name: str, sim: HydraSim | None = None) -> Hydra:
    """A scripted Hydra on database ``name`` of ``cluster`` (created with the project and jobsets if new)."""
    conn = await aio_as_trio(asyncpg.connect)(cluster.dsn(name))
    hydra = Hydra(sim or HydraSim(), conn)
    if sim is None:
        await hydra.run(hydra.sim.create_project("nixpkgs"))
        for jobset in ("trunk", "staging"):
            await hydra.run(hydra.sim.create_jobset("nixpkgs", jobset)[1])
    return hydra


async def restart_postgres(cluster: PgCluster, hydra: Hydra, name: str) -> Hydra:
    """Stop the server (fast: every session is terminated), start it again, reconnect Hydra to ``name``."""
    hydra.conn.terminate()
    await trio.to_thread.run_sync(cluster.stop_server, "fast")
    await trio.to_thread.run_sync(cluster.start_server)
    return await private_hydra(cluster, name, hydra.sim)


async def test_postgres_restart_daemon_keeps_running(
    aio_loop: asyncio.AbstractEventLoop,
    private_cluster: PgCluster,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL restarts: the daemon reconnects and keeps running; work before and after arrives."""
    private_cluster.createdb("keeps_running")
    hydra = await private_hydra(private_cluster, "keeps_running")
    daemon = await daemons.start(
        daemons.config(dsn=private_cluster.dsn("keeps_running"), catchup_interval="1")
    )
    play = Player(hydra)
    _, (before, after) = await play.evaluation(1, 2)
    await play.finish(before)
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    play.hydra = await restart_postgres(private_cluster, hydra, "keeps_running")
    await play.finish(after)
    await play.evaluation(2, 0)
    try:
        await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=20)
        await poll("LISTEN reconnected", lambda: daemon.service.listen.connects >= 2)
        await daemon.stop()
    finally:
        await aio_as_trio(play.hydra.conn.close)()
    assert any("reconnecting" in r.getMessage() for r in caplog.records)
    assert_exactly(otlp_grpc.spans(), play.expected)


# --- the daemon killed ---------------------------------------------------------------------------------


async def test_sigkill_mid_burst(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """`hydra-otel run` SIGKILLed mid-burst; the next one on the same state dir exports every span."""
    env = {
        **os.environ,
        "HYDRA_OTEL_DATABASE_URL": hydra_db,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{otlp_grpc.endpoint}",
        "HYDRA_OTEL_STATE_DIR": str(tmp_path / "state"),
        "HYDRA_OTEL_CATCHUP_INTERVAL": "1",
        "HYDRA_OTEL_EXPORT_DELAY": "0.05",
    }
    play = Player(hydra)
    async with daemon_processes(env) as spawn:
        first = await spawn()
        await first.wait_for("ready")
        _, builds = await play.evaluation(1, 60)
        chunks = [builds[i : i + 5] for i in range(0, len(builds), 5)]
        for n, chunk in enumerate(chunks):
            if n == len(chunks) // 2:
                # Partway: some of the burst exported, some not yet.
                await otlp_grpc.wait_for_spans(10)
                first.process.send_signal(signal.SIGKILL)
                assert await first.process.wait() == -signal.SIGKILL
            await hydra.run(merge_tx(*(sql for b in chunk for sql in play.finish_sql(b))))
        second = await spawn()
        await second.wait_for("ready")
        await wait_for_expected(otlp_grpc, play.expected)
        second.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await second.process.wait() == 0
    assert not any(line.get("level") == "error" for line in second.lines), second.lines
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


# --- the collector failing, down or hung ---------------------------------------------------------------


async def test_collector_unavailable_then_down_then_back(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """UNAVAILABLE answers, then a collector down for a while: every span arrives once it is back."""
    daemon = await daemons.start(
        daemons.config(environ=FAST_OTLP, export_max_backoff="0.2", catchup_interval="1")
    )
    stats = daemon.service.stats
    play = Player(hydra)
    otlp_grpc.fail_next(3)
    _, builds = await play.evaluation(1, 10)
    for b in builds[:5]:
        await play.finish(b)
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    assert stats.export_failures >= 3
    otlp_grpc.set_down()
    for b in builds[5:]:
        await play.finish(b)
    attempts = otlp_grpc.attempts
    await poll("exports retried while down", lambda: otlp_grpc.attempts >= attempts + 3)
    otlp_grpc.set_up()
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    await daemon.stop()
    assert stats.export_failures >= 6
    assert stats.spans_dropped == 0
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_collector_down_during_burst_memory_is_bounded(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Collector down, burst larger than the queues: notifications are dropped, not buffered, then caught up."""
    daemon = await daemons.start(
        daemons.config(environ=FAST_OTLP, export_max_backoff="0.2", catchup_interval="1", queue_size="10")
    )
    service = daemon.service
    otlp_grpc.set_down()
    play = Player(hydra)
    _, builds = await play.evaluation(1, 150)
    for i in range(0, len(builds), 15):
        await hydra.run(merge_tx(*(sql for b in builds[i : i + 15] for sql in play.finish_sql(b))))
    # ~300 queued notifications (step_finished, build_finished; hints are only counted) against
    # queues of 10: the listener must drop rather than grow.
    await poll(
        "exports failed and the listener dropped notifications",
        lambda: service.stats.export_failures > 0 and service.listen.dropped > 0,
    )
    assert service.stats.spans_exported == 0
    otlp_grpc.set_up()
    await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=30)
    await daemon.stop()
    assert service.stats.resyncs["overflow"] >= 1
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_first_start_with_collector_down_then_restart(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A first start that never reaches the collector, then a restart: every evaluation since is exported."""
    play = Player(hydra)
    await play.evaluation(1, 0)  # before the first start, but re-read by its first scan (10-ID overlap)
    otlp_grpc.set_down()
    cfg = daemons.config(environ=FAST_OTLP, export_max_backoff="0.2", shutdown_grace="1")
    first = await daemons.start(cfg)
    await poll("the first scan's spans failed to export", lambda: first.service.stats.export_failures >= 1)
    for _ in range(12):
        await play.evaluation(2, 0)
    await first.stop()
    assert first.service.stats.checkpoints == 0
    otlp_grpc.set_up()
    second = await daemons.start(cfg)
    await wait_for_expected(otlp_grpc, play.expected, second, timeout=5)
    await second.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_hung_collector_stop_is_bounded_and_next_start_exports(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver, nursery: trio.Nursery
) -> None:
    """A collector that accepts and never answers: stop() keeps to the grace, and the next start exports all."""

    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    grace = 1.0
    hung = await daemons.start(
        daemons.config(
            endpoint=f"http://127.0.0.1:{port}",
            environ={"OTEL_EXPORTER_OTLP_TIMEOUT": "300"},
            export_max_backoff="0.2",
            shutdown_grace=str(grace),
        )
    )
    play = Player(hydra)
    _, builds = await play.evaluation(1, 3)
    for b in builds:
        await play.finish(b)
    await poll("an export timed out", lambda: hung.service.stats.export_failures >= 2)
    started = trio.current_time()
    await hung.stop(timeout=grace + 5)
    assert trio.current_time() - started < grace + 2
    # Rendered from rows, their marks not stored: the next start exports them, so none is lost.
    assert (hung.service.stats.spans_requeued > 0, hung.service.stats.spans_dropped) == (True, 0)
    assert hung.service.stats.spans_exported == 0
    good = await daemons.start()
    await wait_for_expected(otlp_grpc, play.expected, good)
    await good.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


async def test_pipeline_restart_with_spans_in_flight_requeues_them(
    hydra: Hydra,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug restarts the pipeline while spans wait at the exporter for a collector that is down.

    Their progress marks were not stored, so they are not lost: counted as requeued, not dropped,
    and the restarted pipeline's catch-up exports them once the collector is back.
    """
    real_resolve = resolver_module.Resolver.resolve
    armed, raised = trio.Event(), trio.Event()

    async def resolve(self: resolver_module.Resolver, batch: list[object]) -> object:
        if armed.is_set() and not raised.is_set() and batch:
            raised.set()
            raise RuntimeError("a bug in the resolver")
        return await real_resolve(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(resolver_module.Resolver, "resolve", resolve)
    otlp_grpc.set_down()
    daemon = await daemons.start(daemons.config(environ=FAST_OTLP, export_max_backoff="0.2"))
    stats = daemon.service.stats
    play = Player(hydra)
    _, builds = await play.evaluation(1, 2)  # no eval_started: no live-only span
    for b in builds:
        await play.finish(b)
    await poll("the spans wait at the exporter", lambda: stats.export_failures >= 2)
    armed.set()
    await play.evaluation(2, 0)  # the next work the resolver takes meets the bug
    await poll("the pipeline restarted", lambda: stats.task_restarts == 1 and daemon.service.ready.is_set())
    assert stats.spans_requeued > 0
    assert stats.spans_dropped == 0
    otlp_grpc.set_up()
    await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=30)
    await daemon.stop()
    assert stats.spans_dropped == 0
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)
    (line,) = [r for r in caplog.records if r.__dict__.get("requeued")]
    assert line.levelno == logging.WARNING
    assert "exported again by the catch-up" in line.getMessage()
    assert not [r for r in caplog.records if "lost" in r.getMessage()]


# --- garbage in ----------------------------------------------------------------------------------------


def random_payload(rng: random.Random, channel: str) -> str:
    """A payload that is wrong, odd or names rows that do not exist.

    Never IDs 1-99, which the test's real rows use, nor IDs in int4's range's complement below 2**63
    (see ``test_ids_beyond_int4_are_counted_not_fatal``).
    """

    def an_id() -> str:
        return rng.choice(
            [
                str(rng.randint(100, 2**31 - 1)),  # well-formed, no such row
                str(rng.choice([2**63, 10**19, 10**40])),  # out of range
                rng.choice(["0", "-1", "+5", "1e3", " 7", "0x10", "", "\u0663", "\uff11\uff12"]),
            ]
        )

    def text() -> str:
        alphabet = "ab\\t\t\n\r %'\"é日😀\u202e\ufffd\x01\x7fÃ©"  # a literal backslash-t too
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))

    kind = rng.randrange(6)
    if kind == 0:
        return text() or "x"
    if kind == 1 and channel == "build_finished":
        ids = [an_id() if rng.random() < 0.1 else str(rng.randint(100, 9_999_999)) for _ in range(1000)]
        payload = "\t".join(ids)
        return payload.encode()[: rng.randint(7900, 7999)].decode(errors="ignore").rstrip("\t") or "x"
    fields = [rng.choice([an_id, text, an_id])() for _ in range(rng.randint(1, 5))]
    return "\t".join(fields) or "\\t"


async def test_fuzzed_notifications_are_counted_and_survived(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Random payloads on every channel: the daemon counts them, keeps running and still exports a real evaluation."""
    daemon = await daemons.start()
    service = daemon.service
    rng = random.Random(20240611)
    sent: set[tuple[str, str]] = set()
    for channel in DATA_CHANNELS + TRIGGER_CHANNELS:
        for _ in range(40):
            sent.add((channel, random_payload(rng, channel)))
    # One statement per channel batch; identical (channel, payload) pairs were folded above, as NOTIFY would.
    pairs = sorted(sent)
    for i in range(0, len(pairs), 100):
        batch = pairs[i : i + 100]
        await aio_as_trio(hydra.conn.execute)(
            "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
            [c for c, _ in batch],
            [p for _, p in batch],
        )
    stats = service.stats

    def counted() -> int:
        return sum(stats.events.values()) + sum(stats.payload_errors.values())

    await poll(
        "every notification parsed or counted as malformed", lambda: counted() >= len(sent), timeout=15
    )
    daemon.check_alive()
    assert service.listen.received == counted() == len(sent)
    for channel, n in Counter(c for c, _ in sent).items():
        assert stats.events[channel] + stats.payload_errors[channel] == n, channel
    play = Player(hydra)
    await play.evaluation(1, 0)
    await wait_for_expected(otlp_grpc, play.expected, daemon)
    assert sum(service.stats.payload_errors.values()) > 0
    assert sum(service.stats.missing_rows.values()) > 0
    daemon.check_alive()
    await daemon.stop()
    assert_exactly(otlp_grpc.spans(), play.expected)


@pytest.mark.parametrize(
    ("channel", "payload"),
    [
        ("build_finished", "4294967296"),
        ("step_finished", "5\t4294967296\t"),
        ("eval_added", "1.1\t1\t4294967296"),
        ("eval_failed", "1.1\t4294967296"),
        ("eval_cached", "1.1\t4294967296\t3"),
    ],
)
async def test_ids_beyond_int4_are_counted_not_fatal(
    channel: str, payload: str, hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """An ID beyond Hydra's int4 columns is a malformed payload, counted; a real evaluation still arrives."""
    daemon = await daemons.start()
    await aio_as_trio(hydra.conn.execute)("SELECT pg_notify($1, $2)", channel, payload)
    play = Player(hydra)
    await play.evaluation(2, 0)
    await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=5)
    await daemon.stop()
    assert daemon.service.stats.payload_errors == {channel: 1}
    assert_exactly(otlp_grpc.spans(), play.expected)
