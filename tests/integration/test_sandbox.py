"""The sandbox works: a private PostgreSQL with Hydra's schema and triggers, and OTLP receivers.

These run on the real clock against a real server (see tests/conftest.py). Notification tests listen
with asyncpg under trio-asyncio, the way the daemon does, and act from a second connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from trio_asyncio import aio_as_trio

from hydra_otel.demo.sandbox.pgcluster import (
    PgCluster,
    PostgresNotFoundError,
    PsqlError,
    SandboxError,
    find_pg_bindir,
)
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver, ReceivedSpan, attributes_dict
from hydra_otel.demo.sandbox.schema import schema_sql

TRIGGER_CHANNELS = (
    "builds_restarted",
    "builds_cancelled",
    "builds_deleted",
    "builds_bumped",
    "jobsets_added",
    "jobsets_deleted",
    "jobset_shares_changed",
    "jobset_scheduling_changed",
)

# One project, one legacy jobset (id 1), build 1 queued, build 2 finished with success.
HYDRA_ROWS = """
INSERT INTO projects (name, displayname, owner) VALUES ('nixpkgs', 'Nixpkgs', 'alice');
INSERT INTO jobsets (name, project, nixexprinput, nixexprpath, emailoverride)
    VALUES ('trunk', 'nixpkgs', 'nixpkgs', 'pkgs/top-level/release.nix', '');
INSERT INTO builds (finished, timestamp, jobset_id, job, drvpath, system)
    VALUES (0, 1700000000, 1, 'hello.x86_64-linux', '/nix/store/aaa-hello.drv', 'x86_64-linux');
INSERT INTO builds (finished, timestamp, jobset_id, job, drvpath, system, buildstatus, starttime, stoptime)
    VALUES (1, 1700000000, 1, 'zlib.x86_64-linux', '/nix/store/bbb-zlib.drv', 'x86_64-linux', 0,
            1700000010, 1700000020);
"""

# What the web interface's "cancel" writes (Hydra::Helper::Nix::cancelBuilds).
CANCEL = "UPDATE builds SET finished = 1, iscachedbuild = 0, buildstatus = 4, starttime = {t}, stoptime = {t}"

TRIGGER_CASES = [
    pytest.param(CANCEL.format(t=1700000100) + " WHERE id = 1", ["builds_cancelled"], id="cancel"),
    pytest.param(
        CANCEL.format(t=1700000100) + " WHERE finished = 0 OR id = 2",
        ["builds_cancelled"],
        id="cancel-many-once",
    ),
    pytest.param(
        "UPDATE builds SET finished = 1, buildstatus = 0, starttime = 1700000100, stoptime = 1700000200"
        " WHERE id = 1",
        [],
        id="finish-is-silent",
    ),
    pytest.param("UPDATE builds SET buildstatus = 4 WHERE id = 2", [], id="status-4-on-finished-is-silent"),
    pytest.param("UPDATE builds SET finished = 0 WHERE id = 2", ["builds_restarted"], id="restart"),
    pytest.param("UPDATE builds SET globalpriority = 10 WHERE id = 1", ["builds_bumped"], id="bump"),
    pytest.param("UPDATE builds SET globalpriority = 0 WHERE id = 1", [], id="same-priority-is-silent"),
    pytest.param("DELETE FROM builds WHERE id = 2", ["builds_deleted"], id="delete-build"),
    pytest.param("DELETE FROM builds WHERE id = -1", ["builds_deleted"], id="delete-nothing-still-notifies"),
    pytest.param(
        "INSERT INTO jobsets (name, project, type, flake, emailoverride)"
        " VALUES ('flake', 'nixpkgs', 1, 'github:NixOS/nixpkgs', '')",
        ["jobsets_added"],
        id="add-jobset",
    ),
    pytest.param(
        "DELETE FROM jobsets WHERE id = 1", ["builds_deleted", "jobsets_deleted"], id="delete-jobset-cascades"
    ),
    pytest.param("UPDATE jobsets SET schedulingshares = 50", ["jobset_shares_changed"], id="shares"),
    pytest.param("UPDATE jobsets SET triggertime = 1700000300", ["jobset_scheduling_changed"], id="trigger"),
    pytest.param("UPDATE jobsets SET checkinterval = 60", ["jobset_scheduling_changed"], id="interval"),
    pytest.param("UPDATE jobsets SET enabled = 0", ["jobset_scheduling_changed"], id="disable"),
    pytest.param(
        "UPDATE jobsets SET errormsg = '', errortime = 1700000400, lastcheckedtime = 1700000400",
        [],
        id="evaluator-bookkeeping-is-silent",
    ),
]


async def connect(dsn: str) -> asyncpg.Connection[Any]:
    """Open an asyncpg connection from trio (needs the ``aio_loop`` fixture)."""
    conn: asyncpg.Connection[Any] = await aio_as_trio(asyncpg.connect)(dsn)
    return conn


async def execute(conn: asyncpg.Connection[Any], sql: str) -> None:
    """Run SQL on an asyncpg connection from trio."""
    await aio_as_trio(conn.execute)(sql)


@asynccontextmanager
async def listening(
    dsn: str, channels: Sequence[str]
) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, str]]]:
    """LISTEN on ``channels`` with asyncpg and yield a channel of (channel, payload) pairs."""
    send, receive = trio.open_memory_channel[tuple[str, str]](1000)

    def on_notification(conn: object, pid: int, channel: str, payload: object) -> None:
        # A callback that raises would crash the trio-asyncio loop: a full channel fails the test
        # by timing out instead.
        with suppress(trio.WouldBlock, trio.BrokenResourceError):
            send.send_nowait((channel, str(payload)))

    conn = await connect(dsn)
    try:
        for channel in channels:
            await aio_as_trio(conn.add_listener)(channel, on_notification)
        yield receive
    finally:
        with trio.CancelScope(shield=True):
            await aio_as_trio(conn.close)()


async def channels_before_sentinel(receive: trio.MemoryReceiveChannel[tuple[str, str]]) -> list[str]:
    """Collect notification channels until the ``sentinel`` notification arrives."""
    received: list[str] = []
    with trio.fail_after(10):
        async for channel, _payload in receive:
            if channel == "sentinel":
                return received
            received.append(channel)
    raise AssertionError("notification channel closed before the sentinel")


def process_running(pid: int) -> bool:
    """Tell whether ``pid`` runs (an exited, unreaped process does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] != "Z"


def processes_mentioning(text: str) -> list[int]:
    """Return the PIDs whose command line contains ``text`` (Linux; empty elsewhere)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


# -- the cluster ----------------------------------------------------------------------------------


def test_cluster_listens_only_on_its_socket(pg_cluster: PgCluster) -> None:
    """The session cluster answers on its private unix socket and on no TCP address."""
    assert pg_cluster.psql("postgres", "SHOW listen_addresses").strip() == ""
    assert pg_cluster.psql("postgres", "SHOW unix_socket_directories").strip() == pg_cluster.host
    assert pg_cluster.psql("postgres", "SELECT current_user").strip() == "postgres"
    assert pg_cluster.dsn("hydra").startswith("postgresql://postgres@/hydra?host=/")


def test_psql_reports_errors(pg_cluster: PgCluster) -> None:
    """A failing statement raises PsqlError carrying the server's message."""
    with pytest.raises(PsqlError, match="no_such_table"):
        pg_cluster.psql("postgres", "SELECT * FROM no_such_table")


def test_stop_leaves_no_process_and_no_files() -> None:
    """stop() ends the postmaster and its backends, deletes the files, and can be repeated."""
    cluster = PgCluster()
    pid = cluster.postmaster_pid
    assert pid is not None
    assert process_running(pid)
    # An open session must not hold the shutdown up.
    session = subprocess.Popen(
        [
            str(cluster.bindir / "psql"),
            "--no-psqlrc",
            "--dbname",
            cluster.dsn(),
            "--command",
            "SELECT pg_sleep(60)",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        data_dir = cluster.data_dir
        cluster.stop()
        assert not process_running(pid)
        assert processes_mentioning(str(data_dir)) == []
        assert not data_dir.parent.exists()
        cluster.stop()
    finally:
        session.kill()
        session.wait()


def test_server_can_be_stopped_and_started_again() -> None:
    """stop_server/start_server/restart keep the data while clients see an outage."""
    with PgCluster() as cluster:
        cluster.psql("postgres", "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        first = cluster.postmaster_pid
        cluster.stop_server()
        stopped_pid = cluster.postmaster_pid
        assert stopped_pid is None
        with pytest.raises(PsqlError):
            cluster.psql("postgres", "SELECT 1")
        cluster.start_server()
        assert cluster.psql("postgres", "SELECT x FROM kept").strip() == "42"
        cluster.stop_server("immediate")
        cluster.restart()
        assert cluster.postmaster_pid not in (None, first)
        assert cluster.psql("postgres", "SELECT x FROM kept").strip() == "42"


def test_failed_start_cleans_up() -> None:
    """A server that cannot start raises with its log, and leaves neither files nor processes."""
    base = Path(tempfile.mkdtemp(prefix="hydra-otel-test-"))
    try:
        base.chmod(0o755)  # The postgres OS user must be able to enter it when we run as root.
        with pytest.raises(SandboxError, match="shared_buffers"):
            PgCluster(base_dir=base, settings={"shared_buffers": "not-a-size"})
        assert list(base.iterdir()) == []
        assert processes_mentioning(str(base)) == []
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to the postgres user")
def test_unreachable_base_dir_is_refused(tmp_path: Path) -> None:
    """As root, a base directory the postgres OS user cannot enter is refused up front."""
    tmp_path.chmod(0o700)
    with pytest.raises(SandboxError, match="cannot enter"):
        PgCluster(base_dir=tmp_path)


def test_missing_postgres_explains_how_to_install() -> None:
    """Without PostgreSQL, the error says how to install it on Debian, NixOS and macOS."""
    assert (find_pg_bindir() / "initdb").exists()
    with pytest.raises(PostgresNotFoundError) as info:
        find_pg_bindir(search_path="", fallback_dirs=[])
    for hint in ("apt-get install postgresql", "nix-shell -p postgresql", "brew install postgresql"):
        assert hint in str(info.value)


# -- the schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hydra_db", [85, 87], indirect=True)
def test_schema_version_is_recorded(
    pg_cluster: PgCluster, hydra_db: str, request: pytest.FixtureRequest
) -> None:
    """Each schema loads and records its version in schemaversion."""
    expected = request.node.callspec.params["hydra_db"]
    # psql takes a DSN where a database name goes.
    assert pg_cluster.psql(hydra_db, "SELECT version FROM schemaversion").strip() == str(expected)


def test_schemas_differ_only_in_buildsteps(
    pg_cluster: PgCluster, hydra_db: str, hydra_db_legacy: str
) -> None:
    """85 has a nullable buildsteps.drvpath and no resolveddrvpath; 87 has Hydra's later columns."""
    query = (
        "SELECT table_name, column_name, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY 1, 2"
    )
    current = set(pg_cluster.psql(hydra_db, query).splitlines())
    legacy = set(pg_cluster.psql(hydra_db_legacy, query).splitlines())
    assert current - legacy == {"buildsteps|drvpath|NO", "buildsteps|resolveddrvpath|YES"}
    assert legacy - current == {"buildsteps|drvpath|YES"}


def test_unknown_schema_version_is_refused() -> None:
    """schema_sql only knows 85 and 87."""
    assert "resolveddrvpath" in schema_sql(87)
    with pytest.raises(ValueError, match="86"):
        schema_sql(86)


# -- notifications --------------------------------------------------------------------------------


async def test_notify_from_psql_reaches_asyncpg_listener(
    aio_loop: object, pg_cluster: PgCluster, hydra_db: str
) -> None:
    """A NOTIFY sent by another process arrives, payload intact, on an asyncpg listener."""
    payload = "4112.262815283.16494\t1\t7"
    async with listening(hydra_db, ["eval_added"]) as receive:
        await trio.to_thread.run_sync(pg_cluster.psql, hydra_db, f"NOTIFY eval_added, '{payload}'")
        with trio.fail_after(10):
            assert await receive.receive() == ("eval_added", payload)


@pytest.mark.parametrize(("action", "expected"), TRIGGER_CASES)
async def test_trigger_fires_like_hydra(
    aio_loop: object, hydra_db: str, action: str, expected: list[str]
) -> None:
    """Hydra's triggers notify exactly when Hydra's do, once per transaction and channel."""
    actor = await connect(hydra_db)
    try:
        await execute(actor, HYDRA_ROWS)
        async with listening(hydra_db, [*TRIGGER_CHANNELS, "sentinel"]) as receive:
            await execute(actor, action)
            # NOTIFYs are delivered in commit order: the sentinel closes the action's batch.
            await execute(actor, "NOTIFY sentinel")
            assert sorted(await channels_before_sentinel(receive)) == expected
    finally:
        await aio_as_trio(actor.close)()


async def test_cancel_fires_on_legacy_schema(aio_loop: object, hydra_db_legacy: str) -> None:
    """The legacy schema has the same builds_cancelled trigger."""
    actor = await connect(hydra_db_legacy)
    try:
        await execute(actor, HYDRA_ROWS)
        async with listening(hydra_db_legacy, ["builds_cancelled", "sentinel"]) as receive:
            await execute(actor, CANCEL.format(t=1700000100) + " WHERE id = 1; NOTIFY sentinel")
            assert await channels_before_sentinel(receive) == ["builds_cancelled"]
    finally:
        await aio_as_trio(actor.close)()


# -- OTLP receivers -------------------------------------------------------------------------------

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
T0 = 1_700_000_000_123_456_789


class FixedIds(IdGenerator):
    """Chosen trace ID, counting span IDs: what hydra-otel's deterministic IDs look like on the wire."""

    def __init__(self, trace_id: int) -> None:
        self._trace_id = trace_id
        self._next_span_id = 0x1000

    def generate_trace_id(self) -> int:
        """Return the chosen trace ID."""
        return self._trace_id

    def generate_span_id(self) -> int:
        """Return the next span ID."""
        self._next_span_id += 1
        return self._next_span_id


def make_spans() -> list[ReadableSpan]:
    """An ended root span with a chosen trace ID and explicit times, and one child."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": "hydra-otel-test"}),
        id_generator=FixedIds(TRACE_ID),
        shutdown_on_exit=False,
    )
    tracer = provider.get_tracer("tests")
    root = tracer.start_span("eval", context=Context(), start_time=T0, attributes={"hydra.jobset_id": 1})
    root.end(end_time=T0 + 1_500_000_000)
    child = tracer.start_span("build", context=trace.set_span_in_context(root), start_time=T0 + 1)
    child.end(end_time=T0 + 999)
    assert isinstance(root, ReadableSpan)
    assert isinstance(child, ReadableSpan)
    return [root, child]


def assert_exact(received: list[ReceivedSpan]) -> None:
    """The spans of make_spans() arrived with IDs, parents, times and attributes unchanged."""
    (resource, root), (_, child) = received
    assert resource["service.name"] == "hydra-otel-test"
    assert root.trace_id == child.trace_id == TRACE_ID.to_bytes(16, "big")
    assert root.parent_span_id == b""
    assert child.parent_span_id == root.span_id == (0x1001).to_bytes(8, "big")
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (T0, T0 + 1_500_000_000)
    assert (child.start_time_unix_nano, child.end_time_unix_nano) == (T0 + 1, T0 + 999)
    assert attributes_dict(root.attributes) == {"hydra.jobset_id": 1}


async def export(exporter: SpanExporter, spans: Sequence[ReadableSpan]) -> SpanExportResult:
    """Export from a worker thread, as the official exporters block; then shut the exporter down."""
    try:
        return await trio.to_thread.run_sync(exporter.export, spans)
    finally:
        await trio.to_thread.run_sync(exporter.shutdown)


async def test_grpc_receiver_gets_exact_spans(otlp_grpc: GrpcOtlpReceiver) -> None:
    """The official gRPC exporter's spans arrive unchanged."""
    exporter = GrpcSpanExporter(endpoint=otlp_grpc.endpoint, insecure=True, timeout=5)
    assert await export(exporter, make_spans()) is SpanExportResult.SUCCESS
    assert_exact(await otlp_grpc.wait_for_spans(2, timeout=5))


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip, Compression.Deflate])
async def test_http_receiver_gets_exact_spans(otlp_http: HttpOtlpReceiver, compression: Compression) -> None:
    """The official HTTP exporter's spans arrive unchanged, compressed or not."""
    exporter = HttpSpanExporter(endpoint=otlp_http.traces_url, timeout=5, compression=compression)
    assert await export(exporter, make_spans()) is SpanExportResult.SUCCESS
    assert_exact(await otlp_http.wait_for_spans(lambda spans: len(spans) == 2, timeout=5))


async def test_grpc_fail_next_makes_exporter_retry(otlp_grpc: GrpcOtlpReceiver) -> None:
    """An injected UNAVAILABLE is retried by the gRPC exporter, which then succeeds."""
    otlp_grpc.fail_next(1)
    exporter = GrpcSpanExporter(endpoint=otlp_grpc.endpoint, insecure=True, timeout=10)
    assert await export(exporter, make_spans()) is SpanExportResult.SUCCESS
    assert otlp_grpc.attempts == 2
    assert len(otlp_grpc.requests) == 1


async def test_http_fail_next_makes_exporter_retry(otlp_http: HttpOtlpReceiver) -> None:
    """An injected 503 is retried by the HTTP exporter, which then succeeds."""
    otlp_http.fail_next(1)
    exporter = HttpSpanExporter(endpoint=otlp_http.traces_url, timeout=10)
    assert await export(exporter, make_spans()) is SpanExportResult.SUCCESS
    assert otlp_http.attempts == 2
    assert len(otlp_http.requests) == 1


async def test_receivers_can_be_down(otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver) -> None:
    """While set_down, exports fail; after set_up they succeed again."""
    otlp_grpc.set_down()
    otlp_http.set_down()
    # A timeout shorter than the first backoff makes the exporters give up after one attempt.
    down = [
        GrpcSpanExporter(endpoint=otlp_grpc.endpoint, insecure=True, timeout=0.5),
        HttpSpanExporter(endpoint=otlp_http.traces_url, timeout=0.5),
    ]
    for exporter in down:
        assert await export(exporter, make_spans()) is SpanExportResult.FAILURE
    otlp_grpc.set_up()
    otlp_http.set_up()
    up = [
        GrpcSpanExporter(endpoint=otlp_grpc.endpoint, insecure=True, timeout=5),
        HttpSpanExporter(endpoint=otlp_http.traces_url, timeout=5),
    ]
    for exporter in up:
        assert await export(exporter, make_spans()) is SpanExportResult.SUCCESS
    assert (len(otlp_grpc.spans()), len(otlp_http.spans())) == (2, 2)


async def test_wait_for_spans_times_out(otlp_http: HttpOtlpReceiver) -> None:
    """wait_for_spans gives up at its deadline and says how many spans it saw."""
    with pytest.raises(trio.TooSlowError, match="0 spans"):
        await otlp_http.wait_for_spans(1, timeout=0.05)
