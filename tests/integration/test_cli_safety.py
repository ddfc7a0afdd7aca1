"""The real ``hydra-otel run`` process refuses what it cannot use safely: exit 2 and one clear message.

Secrets in URLs, a state directory that is corrupt, foreign or in use; and it survives what it can:
SIGHUP drains like SIGTERM, a progress store that cannot be written does not stop the export.
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.integration.harness import daemon_env, daemon_process


async def run_to_exit(env: dict[str, str]) -> tuple[int, str]:
    """Run ``hydra-otel run`` until it exits on its own; its exit status and everything on its stderr."""
    async with daemon_process(env) as (proc, stderr):
        out = b""
        with trio.fail_after(30):
            while chunk := await stderr.receive_some():
                out += chunk
            status = await proc.wait()
    return status, out.decode()


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
