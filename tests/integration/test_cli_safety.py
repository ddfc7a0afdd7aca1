"""The real ``hydra-otel run`` process refuses what it cannot use safely: exit 2 and one clear message.

Secrets in URLs, a state directory that is corrupt, foreign or in use; and it survives what it can:
SIGHUP drains like SIGTERM, a progress store that cannot be written does not stop the export.
"""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import trio

from hydra_otel.adapters.progress_store import FILENAME, inspect
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.harness import Hydra, daemon_env, daemon_process
from tests.integration.test_cli import CID, free_port, http_get, read_until


async def run_to_exit(env: dict[str, str]) -> tuple[int, str]:
    """Run ``hydra-otel run`` until it exits on its own; its exit status and everything on its stderr."""
    async with daemon_process(env) as (proc, stderr):
        out = b""
        with trio.fail_after(30):
            while chunk := await stderr.receive_some():
                out += chunk
            status = await proc.wait()
    return status, out.decode()


async def read_to_end(stream: trio.abc.ReceiveStream) -> list[str]:
    """The lines left on ``stream`` until the process closes it (what it logged after a line waited for)."""
    out = b""
    while chunk := await stream.receive_some():
        out += chunk
    return out.decode().splitlines()


async def test_password_with_reserved_characters_never_logged(hydra_db: str, tmp_path: Path) -> None:
    """A database URL whose password has an unencoded '?' is refused (exit 2) and never shown, even in part."""
    dsn = hydra_db.replace("postgres@", "postgres:hun?ter2@")
    status, err = await run_to_exit(daemon_env(dsn, "http://127.0.0.1:1", tmp_path))
    assert status == 2, err
    assert "percent-encode" in err
    assert "ter2" not in err, err
    assert "hun?" not in err, err


async def test_credentials_in_otlp_endpoint_refused(hydra_db: str, tmp_path: Path) -> None:
    """An OTLP endpoint with user:password is refused (exit 2), pointing at OTEL_EXPORTER_OTLP_HEADERS."""
    env = daemon_env(hydra_db, "https://user:hunter2@otlp.example:4317", tmp_path)
    status, err = await run_to_exit(env)
    assert status == 2, err
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in err
    assert "OTEL_EXPORTER_OTLP_HEADERS" in err
    assert "hunter2" not in err, err


def write_marks(state_dir: Path, value: str) -> None:
    """Store ``value`` as the progress marks, as a damaged disk or another version might have."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(state_dir / FILENAME)) as db, db:
        db.execute("CREATE TABLE marks (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO marks VALUES ('progress', ?)", (value,))


@pytest.mark.parametrize(
    ("marks", "reason"),
    [
        ('{"eval_id": 1, "stop_time": 2, "jobsets": {}, "build_id": 3}', "unknown key 'build_id'"),
        ('{"eval_id": "1", "stop_time": 2, "jobsets": {}}', "'eval_id' is a string, not an integer"),
        (
            '{"eval_id": 1, "stop_time": 99999999999999, "jobsets": {}}',
            "'stop_time' is 99999999999999, outside",
        ),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range"],
)
async def test_invalid_marks_exit_2(hydra_db: str, tmp_path: Path, marks: str, reason: str) -> None:
    """Stored marks that fail validation stop the daemon with exit 2 and a message saying which and what to do."""
    write_marks(tmp_path, marks)
    status, err = await run_to_exit(daemon_env(hydra_db, "http://127.0.0.1:1", tmp_path))
    assert status == 2, err
    (line,) = [json.loads(x) for x in err.splitlines() if '"level": "error"' in x]
    assert reason in line["message"]
    assert str(tmp_path / FILENAME) in line["message"]
    assert "delete it to start from the present" in line["message"]
    assert "bug" not in err


async def test_state_directory_not_shared(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """A second daemon on a state directory in use exits 2 naming the first's PID; another instance's too."""
    endpoint = f"http://{otlp_grpc.endpoint}"
    log: list[str] = []
    async with daemon_process(daemon_env(hydra_db, endpoint, tmp_path)) as (first, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        status, err = await run_to_exit(daemon_env(hydra_db, endpoint, tmp_path))
        assert status == 2, err
        assert f"is in use by another hydra-otel process (pid {first.pid})" in err
        first.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await first.wait() == 0
    status, err = await run_to_exit(daemon_env(hydra_db, endpoint, tmp_path, HYDRA_OTEL_INSTANCE="staging"))
    assert status == 2, err
    assert "holds the progress of instance 'hydra', not of --instance 'staging'" in err


async def wait_for_metric(port: int, needle: str) -> str:
    """Poll ``/metrics`` until it has the line ``needle``; the whole text."""
    with trio.fail_after(20):
        while True:
            _, body = await http_get(port, "/metrics")
            if needle in body.splitlines():
                return body
            await trio.sleep(0.05)


async def wait_for_count(port: int, name: str, at_least: int) -> int:
    """Poll ``/metrics`` until the unlabelled sample ``name`` is ``at_least``; its value."""
    with trio.fail_after(20):
        while True:
            _, body = await http_get(port, "/metrics")
            values = [int(x.split()[1]) for x in body.splitlines() if x.startswith(f"{name} ")]
            if values and values[0] >= at_least:
                return values[0]
            await trio.sleep(0.05)


async def test_sighup_drains(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """SIGHUP stops the daemon as SIGTERM does: the notification committed just before it (waiting
    in the paused LISTEN socket, or on its way through the pipeline) is exported, then exit 0."""
    port = free_port()
    env = daemon_env(
        hydra_db,
        f"http://{otlp_grpc.endpoint}",
        tmp_path,
        HYDRA_OTEL_METRICS_ADDRESS=f"127.0.0.1:{port}",
        # After a read the LISTEN connection waits up to the export delay before reading again,
        # so the evaluation's end, committed just before the signal, may still be in the socket.
        HYDRA_OTEL_EXPORT_DELAY="60",
        HYDRA_OTEL_CATCHUP_INTERVAL="600",
    )
    log: list[str] = []
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        await hydra.run(*hydra.sim.evaluator_starts(1, CID, 1_700_000_000))
        await wait_for_metric(port, 'hydra_otel_events_received_total{channel="eval_started"} 1')
        await hydra.run(hydra.sim.eval_fetch_failed(1, CID, 1_700_000_005, "no network"))
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(15):
            await read_until(stderr, "stopped", log)
            rest = await read_to_end(stderr)
            assert await proc.wait() == 0, "\n".join(log + rest)  # whole lines: a list repr is cut short
    assert any('"signal": "SIGHUP"' in line for line in log), log
    assert [s.span.name for s in otlp_grpc.spans()] == ["BUILD nixpkgs:trunk"]


async def test_full_disk_keeps_exporting(
    hydra: Hydra, hydra_db: str, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """When the marks cannot be written (file size limit: a full disk) export goes on; writes resume later."""
    port = free_port()
    env = daemon_env(
        hydra_db,
        f"http://{otlp_grpc.endpoint}",
        tmp_path,
        HYDRA_OTEL_METRICS_ADDRESS=f"127.0.0.1:{port}",
        HYDRA_OTEL_CATCHUP_INTERVAL="0.2",  # a checkpoint, so a write, every 0.2 s
    )
    log: list[str] = []
    wal = tmp_path / f"{FILENAME}-wal"
    async with daemon_process(env) as (proc, stderr):
        with trio.fail_after(20):
            await read_until(stderr, "ready", log)
        # Python ignores SIGXFSZ, so writing past RLIMIT_FSIZE fails with EFBIG, as on a full disk.
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, resource.RLIM_INFINITY))
        with trio.fail_after(20):
            await read_until(
                stderr, "cannot store progress marks; exporting goes on and every checkpoint tries again", log
            )
        await hydra.run(*hydra.sim.evaluator_starts(1, CID, 1_700_000_000))
        await hydra.run(hydra.sim.eval_fetch_failed(1, CID, 1_700_000_005, "no network"))
        (span,) = await otlp_grpc.wait_for_spans(1)
        assert span.span.name == "BUILD nixpkgs:trunk"
        await wait_for_metric(port, "hydra_otel_ready 1")
        # Every checkpoint (one a scan, every 0.2 s) tries again: a second failure comes, however slow
        # the machine (the first came just before the warning).
        await wait_for_count(port, "hydra_otel_marks_store_failures_total", 2)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        with trio.fail_after(20):
            await read_until(stderr, "progress marks stored again", log)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    warnings = [line for line in log if "cannot store progress marks" in line]
    assert len(warnings) == 1, "logged once per outage"
    assert inspect(tmp_path, "hydra").startswith("marks: evaluation")
