"""``hydra-otel ids`` and ``hydra-otel check`` against a real database, daemon and OTLP receivers.

The tools run in-process through :func:`run_tool_async` inside the test's trio run (the
``aio_loop`` fixture provides the trio-asyncio loop), and through the synchronous
:func:`run_tool` in a worker thread, which starts a trio loop of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import trio

from hydra_otel import cli, config
from hydra_otel.adapters import db, queries
from hydra_otel.adapters.progress_store import FILENAME, ProgressStore
from hydra_otel.core.catchup import Marks
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver, ReceivedSpan
from hydra_otel.tools import (
    HYDRA_COLUMNS,
    add_tool_commands,
    run_tool,
    run_tool_async,
    schema_results,
    schema_version_result,
    tempo_url,
)
from tests.integration.harness import HYDRA_URL, Hydra, StartDaemon, daemon_config

T0 = 1_700_000_000
WATCHDOG = 30

# (instance, eval ID, trace ID, root span ID): the golden vectors of docs/ids.md.
GOLDEN = [
    ("hydra", 1, "4525ad9192d1f3ea7f66c615f45f49cc", "0846140944f64a65"),
    ("hydra", 320000000, "f8c5264be8dcde83fe704127f7309c5f", "635c1e7301f11cf5"),
    ("staging", 1, "f5dd676a402fad9ab4b8b43d0c1bd74b", "8e1777c3e7647495"),
]


def parse(*argv: str) -> argparse.Namespace:
    """Parse a tool command line the way a CLI that calls add_tool_commands does."""
    parser = argparse.ArgumentParser(prog="hydra-otel")
    add_tool_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def tool_config(
    dsn: str, endpoint: str, state_dir: Path, env: dict[str, str] | None = None, **flags: str
) -> config.Config:
    """A configuration from flags and an explicit environment (never the test process's)."""
    values: dict[str, str | None] = {
        "database_url": dsn,
        "hydra_url": HYDRA_URL,
        "otlp_endpoint": endpoint,
        "state_dir": str(state_dir),
    }
    values.update(flags)
    return config.load(values, env or {})


async def run(args: argparse.Namespace, cfg: config.Config, **environ: str) -> tuple[int, str, str]:
    """Run a tool in-process; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(WATCHDOG):
        status = await run_tool_async(args, cfg, out=out, err=err, environ=environ)
    return status, out.getvalue(), err.getvalue()


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def lines_by_name(output: str) -> dict[str, str]:
    """``check`` output as {check name: whole line}."""
    found = {}
    for line in output.splitlines():
        m = re.fullmatch(r"(ok  |FAIL) ([^:]+)(: .*)?", line)
        assert m, f"unexpected line {line!r}"
        found[m.group(2)] = line
    return found


# --- ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("instance", "eval_id", "trace_hex", "span_hex"), GOLDEN)
async def test_ids_eval_golden_vectors(
    instance: str, eval_id: int, trace_hex: str, span_hex: str, tmp_path: Path
) -> None:
    """`ids --eval N` prints the documented trace and root span IDs, without any database."""
    cfg = tool_config(
        "postgresql://nobody@127.0.0.1:1/none", "http://127.0.0.1:1", tmp_path, instance=instance
    )
    status, out, err = await run(parse("ids", "--eval", str(eval_id)), cfg)
    assert (status, out, err) == (0, f"trace_id {trace_hex}\nspan_id {span_hex}\n", "")


async def test_ids_eval_json_and_links_through_run_tool(tmp_path: Path) -> None:
    """The synchronous run_tool (own trio loop, in a thread) prints JSON with Jaeger and Grafana links."""
    cfg = tool_config("postgresql://nobody@127.0.0.1:1/none", "http://127.0.0.1:1", tmp_path)
    args = parse("ids", "--eval", "1", "--json", "--tempo-url", "https://grafana.example.org/")
    out = io.StringIO()
    env = {"HYDRA_OTEL_JAEGER_URL": "https://jaeger.example.org/", "HYDRA_OTEL_TEMPO_DATASOURCE": "tempo-uid"}
    with trio.fail_after(WATCHDOG):
        status = await trio.to_thread.run_sync(lambda: run_tool(args, cfg, out=out, environ=env))
    assert status == 0
    trace = "4525ad9192d1f3ea7f66c615f45f49cc"
    assert json.loads(out.getvalue()) == {
        "instance": "hydra",
        "eval_id": 1,
        "trace_id": trace,
        "span_id": "0846140944f64a65",
        "jaeger_url": f"https://jaeger.example.org/trace/{trace}",
        "tempo_url": tempo_url("https://grafana.example.org", "tempo-uid", trace),
    }


def test_tempo_url_form() -> None:
    """The Grafana link is Explore's schema-1 URL with one Tempo pane querying the trace ID."""
    url = tempo_url("https://grafana.example.org/", "P214B5B846CF3925F", "ab" * 16)
    prefix = "https://grafana.example.org/explore?schemaVersion=1&panes="
    assert url.startswith(prefix)
    assert json.loads(unquote(url.removeprefix(prefix))) == {
        "hot": {
            "datasource": "P214B5B846CF3925F",
            "queries": [
                {
                    "refId": "A",
                    "datasource": {"type": "tempo", "uid": "P214B5B846CF3925F"},
                    "queryType": "traceql",
                    "query": "ab" * 16,
                }
            ],
            "range": {"from": "now-30d", "to": "now"},
        }
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("ids", "--eval", "1", "--attempt", "0"), "--attempt needs --build"),
        (
            ("ids", "--eval", "1", "--jaeger-url", "jaeger:16686"),
            "--jaeger-url (or HYDRA_OTEL_JAEGER_URL) must be",
        ),
        (
            ("ids", "--eval", "1", "--tempo-url", "https://admin:hun?ter2@grafana"),
            "--tempo-url (or HYDRA_OTEL_TEMPO_URL) must not hold a user name or password",
        ),
    ],
)
async def test_ids_usage_errors(argv: tuple[str, ...], message: str, tmp_path: Path) -> None:
    """Combinations argparse cannot reject exit 2 with a message on stderr."""
    cfg = tool_config("postgresql://nobody@127.0.0.1:1/none", "http://127.0.0.1:1", tmp_path)
    status, out, err = await run(parse(*argv), cfg)
    assert (status, out) == (2, "")
    assert message in err
    assert "ter2" not in err


async def eval_with_builds(hydra: Hydra, jobs: list[str]) -> tuple[int, list[int]]:
    eval_id, build_ids, sql = hydra.sim.eval_added(
        1, "1.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=12,
        new_builds=[NewBuild(job=j, nixname=j) for j in jobs],
    )  # fmt: skip
    await hydra.run(*sql)
    return eval_id, build_ids


def build_span(spans: list[ReceivedSpan], job: str, attempt: int) -> ReceivedSpan:
    (span,) = [
        s
        for s in spans
        if s.span.name == f"build {job}"
        and any(a.key == "hydra.build.attempt" and a.value.int_value == attempt for a in s.span.attributes)
    ]
    return span


async def test_ids_build_matches_exported_spans(
    hydra: Hydra, hydra_db: str, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """`ids --build` names the spans the daemon exported: latest attempt by default, any with --attempt."""
    await start_daemon()
    _, (b,) = await eval_with_builds(hydra, ["flaky"])
    sim = hydra.sim
    await hydra.run(
        sim.step_started(b, 1, now=T0 + 20),
        sim.step_finished(b, 1, now=T0 + 30, status=1, error="flaky test"),
        sim.build_finished(b, start=T0 + 20, stop=T0 + 30, status=1),
    )
    with trio.fail_after(WATCHDOG):  # the first finish is read before the restart overwrites the row
        await otlp_grpc.wait_for_spans(lambda got: any(s.span.name == "build flaky" for s in got))
    await hydra.run(
        sim.restart(b),
        sim.step_started(b, 2, now=T0 + 100),
        sim.step_finished(b, 2, now=T0 + 130),
        sim.build_finished(b, start=T0 + 100, stop=T0 + 130),
    )
    with trio.fail_after(WATCHDOG):
        spans = await otlp_grpc.wait_for_spans(
            lambda got: sum(s.span.name == "build flaky" for s in got) == 2
        )
    cfg = daemon_config(hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path)
    for argv, attempt in ((("--build", str(b)), 1), (("--build", str(b), "--attempt", "0"), 0)):
        status, out, err = await run(parse("ids", *argv), cfg)
        span = build_span(spans, "flaky", attempt).span
        assert (status, err) == (0, "")
        assert out == f"trace_id {span.trace_id.hex()}\nspan_id {span.span_id.hex()}\nattempt {attempt}\n"


async def test_ids_build_in_its_own_trace(
    hydra: Hydra, hydra_db: str, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """A build beyond the evaluation's trace budget is looked up in its own trace, as the daemon put it."""
    await start_daemon(max_builds_per_trace="1")
    eval_id, (_, b) = await eval_with_builds(hydra, ["first", "second"])
    await hydra.run(hydra.sim.build_finished(b, start=T0 + 20, stop=T0 + 30))
    with trio.fail_after(WATCHDOG):
        spans = await otlp_grpc.wait_for_spans(lambda got: any(s.span.name == "build second" for s in got))
    cfg = daemon_config(hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path, max_builds_per_trace="1")
    status, out, _ = await run(parse("ids", "--build", str(b), "--json"), cfg)
    span = build_span(spans, "second", 0).span
    assert status == 0
    assert json.loads(out) == {
        "instance": "hydra",
        "build_id": b,
        "eval_id": eval_id,
        "own_trace": True,
        "finished": True,
        "attempt": 0,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
    }


async def test_ids_build_unknown_or_unfinished(
    aio_loop: asyncio.AbstractEventLoop, hydra: Hydra, hydra_db: str, tmp_path: Path
) -> None:
    """An unknown build exits 1; an unfinished one answers with a note on stderr."""
    cfg = tool_config(hydra_db, "http://127.0.0.1:1", tmp_path)
    status, out, err = await run(parse("ids", "--build", "4242"), cfg)
    assert (status, out) == (1, "")
    assert "build 4242 is not in the database" in err
    _, (b,) = await eval_with_builds(hydra, ["queued"])
    status, out, err = await run(parse("ids", "--build", str(b)), cfg)
    assert status == 0
    assert out.endswith("attempt 0\n")
    assert f"build {b} is not finished" in err


async def test_ids_build_database_unreachable(aio_loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """Without a database, `ids --build` says so, exits 1 and does not print the password."""
    dsn = f"postgresql://hydra:s3cret-pw@127.0.0.1:{closed_port()}/hydra"
    status, out, err = await run(
        parse("ids", "--build", "1"), tool_config(dsn, "http://127.0.0.1:1", tmp_path)
    )
    assert (status, out) == (1, "")
    assert "cannot read the database postgresql://hydra:***@127.0.0.1" in err
    assert "s3cret" not in err


# --- check --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_check_all_ok(
    aio_loop: asyncio.AbstractEventLoop,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    otlp_http: HttpOtlpReceiver,
    tmp_path: Path,
    protocol: str,
) -> None:
    """Against a healthy database and receiver every check is ok, the span arrives, and the exit status is 0."""
    receiver = otlp_grpc if protocol == "grpc" else otlp_http
    endpoint = f"http://{otlp_grpc.endpoint}" if protocol == "grpc" else otlp_http.traces_url
    cfg = tool_config(hydra_db, endpoint, tmp_path / "state", otlp_protocol=protocol)
    status, out, _ = await run(parse("check"), cfg)
    lines = lines_by_name(out)
    assert status == 0, out
    assert all(line.startswith("ok   ") for line in lines.values()), out
    assert set(lines) == {
        "database connection",
        "hydra schema version",
        *(f"table {t}" for t in HYDRA_COLUMNS),
        "SELECT privilege",
        "LISTEN/NOTIFY",
        "otlp export",
        f"state directory {tmp_path / 'state'}",
        "progress store",
    }
    assert lines["hydra schema version"] == "ok   hydra schema version: 87"
    assert (
        lines["progress store"]
        == "ok   progress store: no progress marks yet: the first start begins at the present"
    )
    assert lines[f"state directory {tmp_path / 'state'}"].endswith(
        "can be created and written (removed again)"
    )
    assert not (tmp_path / "state").exists()
    with trio.fail_after(WATCHDOG):
        (span,) = await receiver.wait_for_spans(1)
    assert span.span.name == "hydra-otel check"
    assert span.resource["service.name"] == "hydra-otel"


@pytest.mark.parametrize("hydra_db", [85], indirect=True)
async def test_check_legacy_schema(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """On the legacy Hydra (schema 85) the missing resolveddrvpath is noted, not failed."""
    cfg = tool_config(hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path)
    status, out, _ = await run(parse("check"), cfg)
    assert status == 0, out
    lines = lines_by_name(out)
    assert lines["table buildsteps"] == (
        "ok   table buildsteps: buildsteps.resolveddrvpath missing: fine on Hydra schema < 87"
    )
    assert lines["hydra schema version"] == "ok   hydra schema version: 85"


async def test_check_missing_column(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """A dropped column fails its table's check by name, and the exit status is 1."""
    async with db.open_connection(hydra_db) as conn:
        await conn.execute("ALTER TABLE builds DROP COLUMN closuresize")
    status, out, _ = await run(
        parse("check"), tool_config(hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path)
    )
    assert status == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed == [
        "FAIL table builds: builds.closuresize missing: every Hydra schema hydra-otel supports has it; "
        "is this Hydra's database, and its schema on the search_path?"
    ]


@pytest.mark.parametrize(("protocol", "path"), [("grpc", ""), ("http/protobuf", "/v1/traces")])
async def test_check_dead_otlp_endpoint(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, tmp_path: Path, protocol: str, path: str
) -> None:
    """A closed OTLP port fails the export check, saying the connection was refused, within the timeout."""
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}{path}"
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "1000"}
    cfg = tool_config(hydra_db, endpoint, tmp_path, env=env, otlp_protocol=protocol)
    status, out, _ = await run(parse("check"), cfg)
    assert status == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed == [
        f"FAIL otlp export: {endpoint} ({protocol}): cannot connect to 127.0.0.1:{port}: Connection refused"
    ]


async def test_check_database_unreachable(
    aio_loop: asyncio.AbstractEventLoop, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """Without a database only the connection fails (redacted); the other checks still run."""
    dsn = f"postgresql://hydra:s3cret-pw@127.0.0.1:{closed_port()}/hydra"
    status, out, err = await run(parse("check"), tool_config(dsn, f"http://{otlp_grpc.endpoint}", tmp_path))
    assert status == 1
    lines = lines_by_name(out)
    assert set(lines) == {
        "database connection",
        "otlp export",
        f"state directory {tmp_path}",
        "progress store",
    }
    assert lines["database connection"].startswith(
        "FAIL database connection: postgresql://hydra:***@127.0.0.1:"
    )
    assert "Connect call failed" in lines["database connection"]
    assert lines[f"state directory {tmp_path}"] == f"ok   state directory {tmp_path}: writable"
    assert "s3cret" not in out + err


async def test_check_privileges_and_state_dir(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """A role without SELECT on some tables fails the privilege check by table; an unusable state dir fails."""
    role = f"reader_{tmp_path.name.lower()[-20:].replace('-', '_')}"
    role = re.sub(r"[^a-z0-9_]", "_", role)
    async with db.open_connection(hydra_db) as conn:
        await conn.execute(
            f"CREATE ROLE {role} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; "
            f"REVOKE SELECT ON builds, buildsteps, jobsetevalinputs FROM {role}; "
            f"GRANT SELECT (id, finished) ON builds TO {role};"
        )
        try:
            blocker = tmp_path / "file"
            blocker.write_text("")
            dsn = hydra_db.replace("postgres@", f"{role}@")
            cfg = tool_config(dsn, f"http://{otlp_grpc.endpoint}", blocker / "state")
            status, out, _ = await run(parse("check"), cfg)
        finally:
            await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert status == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed == [
        "FAIL SELECT privilege: not readable: builds, buildsteps, jobsetevalinputs "
        "(GRANT SELECT ON them TO the daemon's role)",
        f"FAIL state directory {blocker / 'state'}: Not a directory: {blocker / 'state'}",
    ]
    assert "ok   table builds" in out.splitlines(), "a missing privilege is not reported as a missing column"


async def test_check_progress_store(
    aio_loop: asyncio.AbstractEventLoop, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """check reads the progress store as the daemon would: good marks are shown, another instance's fail."""
    store = ProgressStore(tmp_path, instance="hydra")
    store.save(Marks(eval_id=12, stop_time=1_700_000_000, jobsets={1: 5}))
    store.close()
    endpoint = f"http://{otlp_grpc.endpoint}"
    status, out, _ = await run(parse("check"), tool_config(hydra_db, endpoint, tmp_path))
    assert status == 0, out
    assert "ok   progress store: marks: evaluation 12, stop time 1700000000, 1 jobsets" in out.splitlines()
    status, out, _ = await run(parse("check"), tool_config(hydra_db, endpoint, tmp_path, instance="other"))
    assert status == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert failed[0].startswith(
        f"FAIL progress store: {tmp_path / FILENAME} holds the progress of instance 'hydra'"
    )


# --- pure parts ---------------------------------------------------------------------------------------


def test_schema_results_hints() -> None:
    """Missing tables and columns are named with the Hydra version that added them; optional ones pass."""
    present = {t: set(cols) for t, cols in HYDRA_COLUMNS.items()}
    del present["evaluationerrors"]
    present["jobsetevals"] -= {"evaluationerror_id"}
    present["buildsteps"] -= {"resolveddrvpath", "timesbuilt"}
    present["builds"] -= {"closuresize"}
    present["jobsets"] -= {"lastcheckedtime"}
    results = {r.name: (r.ok, r.detail) for r in schema_results(present)}
    old = "Hydra older than schema 73 is not supported"
    other = "every Hydra schema hydra-otel supports has it; is this Hydra's database, and its schema on the search_path?"
    assert results == {
        "table schemaversion": (True, ""),
        "table projects": (True, ""),
        "table jobsets": (False, f"jobsets.lastcheckedtime missing: {other}"),
        "table jobsetevals": (False, f"jobsetevals.evaluationerror_id missing: {old}"),
        "table evaluationerrors": (False, f"evaluationerrors missing: {old}"),
        "table jobsetevalmembers": (True, ""),
        "table jobsetevalinputs": (True, ""),
        "table builds": (False, f"builds.closuresize missing: {other}"),
        "table buildsteps": (False, f"buildsteps.timesbuilt missing: added in Hydra schema 52; {old}"),
    }
    present["buildsteps"].add("timesbuilt")
    (steps,) = [r for r in schema_results(present) if r.name == "table buildsteps"]
    assert (
        steps.line() == "ok   table buildsteps: buildsteps.resolveddrvpath missing: fine on Hydra schema < 87"
    )


@pytest.mark.parametrize(
    ("version", "line"),
    [
        (87, "ok   hydra schema version: 87"),
        (90, "ok   hydra schema version: 90 (newer than 87, the newest known)"),
        (72, "FAIL hydra schema version: 72, older than 73 (not supported)"),
        (None, "FAIL hydra schema version: schemaversion is empty"),
    ],
)
def test_schema_version_result(version: int | None, line: str) -> None:
    """The schema version line says whether hydra-otel supports it."""
    assert schema_version_result(version).line() == line


# Table aliases used in adapters/queries.py's SQL.
ALIASES = {
    "b": "builds",
    "s": "buildsteps",
    "e": "jobsetevals",
    "j": "jobsets",
    "m": "jobsetevalmembers",
    "jm": "jobsetevalmembers",
    "i": "jobsetevalinputs",
    "er": "evaluationerrors",
}


def test_columns_cover_the_daemons_queries() -> None:
    """Every alias.column in adapters/queries.py's SQL is declared in HYDRA_COLUMNS (keeps check honest)."""
    texts = [
        v
        for k, v in vars(queries).items()
        if isinstance(v, str) and (k.endswith("_SQL") or k == "STEP_COLUMNS")
    ]
    assert len(texts) > 5
    computed = {name for text in texts for name in re.findall(r"\bAS\s+([a-z_]+)", text)}  # subquery outputs
    referenced = {
        (ALIASES[alias], column)
        for text in texts
        for alias, column in re.findall(r"\b([a-z]{1,2})\.([a-z_]+)\b", text)
        if alias in ALIASES and column not in computed
    }
    missing = {f"{t}.{c}" for t, c in referenced if c not in HYDRA_COLUMNS[t]}
    assert not missing
    # Unqualified columns of the catch-up scans, read by hand from queries.py.
    for table, column in [("builds", "stoptime"), ("builds", "finished"), ("jobsets", "lastcheckedtime")]:
        assert column in HYDRA_COLUMNS[table]


def cli_has_tools() -> bool:
    """Whether cli.py has wired the tool commands in yet."""
    subs = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("ids" in a.choices for a in subs)


@pytest.mark.skipif(not cli_has_tools(), reason="cli.py does not wire the ids/check commands yet")
async def test_ids_subprocess() -> None:
    """`python -m hydra_otel ids --eval 1` prints the golden vector."""
    with trio.fail_after(WATCHDOG):
        proc = await trio.run_process(
            [sys.executable, "-m", "hydra_otel", "ids", "--eval", "1"],
            capture_stdout=True,
            capture_stderr=True,
            env={k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "OTEL_"))},
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == "trace_id 4525ad9192d1f3ea7f66c615f45f49cc\nspan_id 0846140944f64a65\n"
