"""PostgreSQL failures against the real daemon and a real server (docs/operations.md, PostgreSQL failures).

* A fast restart while queries run is only ever "database unavailable": retried, never fatal
  (asyncpg's InternalClientError "cannot switch to state 12" included, raced and injected).
* An unexpected error in a task restarts the pipeline instead of ending the process.
* A missing grant holds only the work that needs the table, makes health unhealthy, and the held
  work is exported once the grant is given.
* An invalid UTF-8 notification (possible on a SQL_ASCII database) is counted and dropped; the
  LISTEN connection and the rest of the delivery survive.
* ``sslmode=bogus`` (in the URL or PGSSLMODE) is a configuration error: exit 2 at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.adapters.db import open_database
from hydra_otel.demo.sandbox.hydrasim import HydraSim
from hydra_otel.demo.sandbox.pgcluster import SUPERUSER, PgCluster
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from hydra_otel.demo.sandbox.schema import schema_sql
from hydra_otel.errors import DbUnavailable
from hydra_otel.tasks import resolver as resolver_module
from tests.integration.harness import Hydra, daemon_env
from tests.integration.workload import (
    Daemons,
    Player,
    assert_exactly,
    merge_tx,
    received_key,
    wait_for_expected,
)

STATE_12 = "cannot switch to state 12; another operation (2) is in progress"


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server of this module's own, which tests restart and add roles to."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
async def daemons(
    aio_loop: asyncio.AbstractEventLoop, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[Daemons]:
    """In-process daemons (each test gives its own database URL); all stopped after the test."""
    started = Daemons(nursery, "", f"http://{otlp_grpc.endpoint}", tmp_path / "state")
    yield started
    await started.stop_all()


async def new_hydra(cluster: PgCluster, name: str, *, encoding: str | None = None) -> Hydra:
    """A database ``name`` with Hydra's schema, a project and jobsets 1 and 2, and a scripted Hydra on it."""
    if encoding is None:
        cluster.createdb(name)
    else:
        cluster.createdb(name, None)
        cluster.psql("postgres", f"DROP DATABASE {name}")
        cluster.psql(
            "postgres",
            f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        cluster.psql(name, schema_sql(87), single_transaction=True)
    conn = await aio_as_trio(asyncpg.connect)(cluster.dsn(name))
    hydra = Hydra(HydraSim(), conn)
    await hydra.run(hydra.sim.create_project("nixpkgs"))
    for jobset in ("trunk", "staging"):
        await hydra.run(hydra.sim.create_jobset("nixpkgs", jobset)[1])
    return hydra


async def poll(condition: str, check: Callable[[], bool], *, timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Wait until ``check()`` is true (state set by the daemon's tasks), failing after ``timeout``."""
    try:
        with trio.fail_after(timeout):
            while not check():  # noqa: ASYNC110 - state set by the daemon's tasks, polled under a deadline
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout:g}s: {condition}") from None


# --- fast restarts while querying -------------------------------------------------------------------


async def test_fast_restarts_while_querying_are_only_ever_unavailable(
    aio_loop: asyncio.AbstractEventLoop, private_cluster: PgCluster
) -> None:
    """Four tasks query without pause through eight ``pg_ctl restart -m fast``: every failure is DbUnavailable.

    Before the fix about one restart in two raised asyncpg's InternalClientError from a pooled
    connection left mid-protocol by the server's FATAL.
    """
    private_cluster.createdb("race", None)
    failures: collections.Counter[str] = collections.Counter()
    answered = 0
    async with open_database(private_cluster.dsn("race"), size=4) as db:

        async def query() -> None:
            nonlocal answered
            while True:
                try:
                    assert await db.fetchval("SELECT $1::int + 1 FROM pg_sleep(0.002)", 1) == 2
                    answered += 1
                except DbUnavailable as exc:
                    failures[type(exc.__cause__).__name__] += 1
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(query)
            for _ in range(8):
                before = answered
                await poll("queries answered", lambda before=before: answered > before + 20)  # type: ignore[misc]
                await trio.to_thread.run_sync(private_cluster.restart)
            before = answered
            await poll("queries answered after the last restart", lambda: answered > before + 20)
            nursery.cancel_scope.cancel()
    assert failures, "no query ever failed: the restarts did not hit running queries"


async def test_daemon_survives_fast_restarts_while_resolving(
    aio_loop: asyncio.AbstractEventLoop,
    private_cluster: PgCluster,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
) -> None:
    """PostgreSQL restarted (fast) five times while the daemon queries: it rides every restart out in-process.

    Catch-up scans every 20 ms keep queries in flight when the server shuts down; before the fix
    this ended the daemon with the crash report's InternalClientError in two runs out of two.
    """
    hydra = await new_hydra(private_cluster, "restarts")
    daemon = await daemons.start(daemons.config(dsn=private_cluster.dsn("restarts"), catchup_interval="0.02"))
    play = Player(hydra)
    try:
        for round_ in range(5):
            _, builds = await play.evaluation(1 + round_ % 2, 30)
            for i in range(0, len(builds), 5):
                await hydra.run(merge_tx(*(sql for b in builds[i : i + 5] for sql in play.finish_sql(b))))
            hydra.conn.terminate()
            await trio.to_thread.run_sync(private_cluster.restart)  # while the resolver reads the burst
            hydra.conn = await aio_as_trio(asyncpg.connect)(private_cluster.dsn("restarts"))
            daemon.check_alive()
        await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=40)
        await daemon.stop()
    finally:
        await aio_as_trio(hydra.conn.close)()
    assert daemon.error is None
    assert daemon.service.stats.task_restarts == 0  # classified and retried, not restarted
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


async def test_injected_internal_client_error_is_retried_on_a_new_connection(
    aio_loop: asyncio.AbstractEventLoop,
    private_cluster: PgCluster,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exact error of the crash report, raised by the step query: held, retried, exported; no restart."""
    hydra = await new_hydra(private_cluster, "injected")
    broken: list[object] = []
    real_fetch = asyncpg.Connection.fetch

    async def fetch(self: asyncpg.Connection, query: str, *args: object, **kwargs: object) -> object:
        if "FROM buildsteps" in query and len(broken) < 3:
            broken.append(self)
            raise asyncpg.InternalClientError(STATE_12)
        if self in broken:
            raise AssertionError("a connection that failed mid-operation was handed out again")
        return await real_fetch(self, query, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch)
    daemon = await daemons.start(daemons.config(dsn=private_cluster.dsn("injected")))
    play = Player(hydra)
    _, builds = await play.evaluation(1, 3)
    for b in builds:
        await play.finish(b)
    try:
        await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=30)
        await daemon.stop()
    finally:
        await aio_as_trio(hydra.conn.close)()
    assert len(broken) == 3
    assert daemon.service.stats.task_restarts == 0
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


async def test_unexpected_task_error_restarts_the_pipeline(
    aio_loop: asyncio.AbstractEventLoop,
    private_cluster: PgCluster,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a task (here: the resolver raises once) restarts the pipeline; the lost work is re-derived."""
    hydra = await new_hydra(private_cluster, "bug")
    real_resolve = resolver_module.Resolver.resolve
    raised = trio.Event()

    async def resolve(self: resolver_module.Resolver, batch: list[object]) -> object:
        if not raised.is_set() and batch:
            raised.set()
            raise RuntimeError("a bug in the resolver")
        return await real_resolve(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(resolver_module.Resolver, "resolve", resolve)
    daemon = await daemons.start(daemons.config(dsn=private_cluster.dsn("bug"), catchup_interval="1"))
    play = Player(hydra)
    try:
        _, builds = await play.evaluation(1, 3)
        for b in builds:
            await play.finish(b)
        await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=30)
        await daemon.stop()
    finally:
        await aio_as_trio(hydra.conn.close)()
    assert daemon.error is None
    assert daemon.service.stats.task_restarts == 1
    (line,) = [r for r in caplog.records if "restarting the pipeline" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert line.exc_info is not None
    assert "a bug in the resolver" in caplog.text
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


# --- a missing grant --------------------------------------------------------------------------------


async def test_missing_grant_on_buildsteps_holds_builds_and_exports_evaluations(
    aio_loop: asyncio.AbstractEventLoop,
    private_cluster: PgCluster,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """REVOKE on buildsteps: unhealthy, counted, the GRANT named; evaluations still go out; builds after GRANT."""
    hydra = await new_hydra(private_cluster, "grants")
    private_cluster.psql(
        "grants",
        "DO $$ BEGIN CREATE ROLE otel_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO otel_reader;"
        "REVOKE SELECT ON buildsteps FROM otel_reader;",
    )
    dsn = private_cluster.dsn("grants").replace(f"{SUPERUSER}@", "otel_reader@", 1)
    daemon = await daemons.start(daemons.config(dsn=dsn, catchup_interval="1"))
    service = daemon.service
    play = Player(hydra)
    try:
        eval_id, builds = await play.evaluation(1, 2)
        evaluation_only = Player(hydra)
        evaluation_only.expected.evaluation(eval_id)
        for b in builds:
            await play.finish(b)
        await wait_for_expected(otlp_grpc, evaluation_only.expected, daemon)
        await poll("builds held", lambda: "holding work" in caplog.text)
        assert not service.healthy()
        assert "buildsteps" in service.stats.denied_tables
        assert service.stats.permission_denied["buildsteps"] >= 1
        assert "GRANT SELECT ON buildsteps TO otel_reader;" in caplog.text
        # The builds are held, and so are the progress marks behind them: the catch-up scans
        # (every second) send checkpoints, and none is stored while the builds are held.
        progress = service.catchup_state
        assert progress is not None
        scans = progress.scans
        await poll("a catch-up scan", lambda: progress.scans > scans)
        stored, scans = service.stats.checkpoints, progress.scans
        await poll("two more catch-up scans", lambda: progress.scans >= scans + 2)
        assert service.stats.checkpoints == stored
        assert not service.healthy()
        assert play.expected.keys - {received_key(s) for s in otlp_grpc.spans()}  # builds held

        private_cluster.psql("grants", "GRANT SELECT ON buildsteps TO otel_reader")
        await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=40)
        await poll("healthy again", service.healthy, timeout=10)
        await poll("marks stored again", lambda: service.stats.checkpoints > stored)
        await daemon.stop()
    finally:
        await aio_as_trio(hydra.conn.close)()
    assert service.stats.task_restarts == 0
    assert caplog.text.count("permission denied for table buildsteps") == 1  # once per episode
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)


# --- undecodable notifications ----------------------------------------------------------------------


async def test_invalid_utf8_notification_is_counted_and_listen_survives(
    aio_loop: asyncio.AbstractEventLoop,
    private_cluster: PgCluster,
    daemons: Daemons,
    otlp_grpc: GrpcOtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a SQL_ASCII database any role can NOTIFY bytes that are not UTF-8: one is dropped, nothing else."""
    hydra = await new_hydra(private_cluster, "ascii", encoding="SQL_ASCII")
    daemon = await daemons.start(daemons.config(dsn=private_cluster.dsn("ascii")))
    listen = daemon.service.listen
    play = Player(hydra)
    try:
        _, builds = await play.evaluation(1, 2)
        bad = "SELECT pg_notify('step_finished', E'1\\t1\\t/nix/var/log/\\xff\\xfe.drv');"
        await hydra.run(merge_tx(bad, *play.finish_sql(builds[0])))
        await poll("counted", lambda: listen.undecodable == 1)
        # Past the next health probe of the LISTEN connection (every 5 s): before the fix the probe
        # found asyncpg's protocol stuck by the decode error, and the daemon lost the connection.
        with trio.move_on_after(6):
            await poll("LISTEN lost", lambda: listen.connects > 1 or daemon.done.is_set(), timeout=7)
        await play.finish(builds[1])
        await wait_for_expected(otlp_grpc, play.expected, daemon)
        await daemon.stop()
    finally:
        await aio_as_trio(hydra.conn.close)()
    assert daemon.error is None
    assert (listen.connects, listen.connection_losses, listen.undecodable) == (1, 0, 1)
    (line,) = [r for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert line.__dict__["channel"] == "step_finished"
    assert "/nix/var/log/" in line.__dict__["payload"]
    assert "xff" in line.__dict__["payload"]
    assert_exactly(otlp_grpc.spans(), play.expected)


# --- invalid connection settings --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["url", "PGSSLMODE"])
async def test_bogus_sslmode_exits_2_at_once(
    private_cluster: PgCluster, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path, where: str
) -> None:
    """``sslmode=bogus`` cannot work however long hydra-otel waits: a clear message and exit 2."""
    dsn, extra = private_cluster.dsn("postgres"), {}
    if where == "url":
        dsn += "&sslmode=bogus"
    else:
        extra["PGSSLMODE"] = "bogus"
    env = daemon_env(dsn, f"http://{otlp_grpc.endpoint}", tmp_path, **extra)
    with trio.fail_after(30):
        proc = await trio.run_process(
            [sys.executable, "-m", "hydra_otel", "run"],
            env=env,
            capture_stderr=True,
            check=False,
            stdout=subprocess.DEVNULL,
        )
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert "sslmode" in stderr
    assert "PGSSLMODE" in stderr
