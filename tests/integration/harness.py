"""Helpers for end-to-end tests: a scripted Hydra driver and daemon configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from hydra_otel import config
from hydra_otel.demo.sandbox.hydrasim import HydraSim
from hydra_otel.service import Service

HYDRA_URL = "https://hydra.example.org"


@dataclass
class Hydra:
    """A scripted Hydra: ``sim`` renders SQL, ``run`` executes it on Hydra's own connection."""

    sim: HydraSim
    conn: asyncpg.Connection

    async def run(self, *statements: str) -> None:
        """Execute each statement (or transaction script) in order."""
        for sql in statements:
            await aio_as_trio(self.conn.execute)(sql)

    async def fetchval(self, sql: str) -> object:
        """One value, for assertions about the database."""
        return await aio_as_trio(self.conn.fetchval)(sql)


def daemon_config(dsn: str, endpoint: str, state_dir: Path, **overrides: str) -> config.Config:
    """A configuration for a test daemon; ``overrides`` are flag values by setting key."""
    flags: dict[str, str | None] = {
        "database_url": dsn,
        "hydra_url": HYDRA_URL,
        "otlp_endpoint": endpoint,
        "state_dir": str(state_dir),
        "export_delay": "0.05",
        "shutdown_grace": "5",
    }
    flags.update(overrides)
    return config.load(flags, {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test"})


StartDaemon = Callable[..., Awaitable[Service]]
#: Runs one SQL text as a login role with no grant at all (the ``mallory`` fixture).
Mallory = Callable[[str], Awaitable[None]]


async def stop(service: Service) -> None:
    """Stop gracefully and wait until the service has drained."""
    service.stop()
    with trio.fail_after(15):
        await service.stopped.wait()


def daemon_env(dsn: str, endpoint: str, state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``hydra-otel run`` subprocess: this process's, plus the daemon's settings."""
    return {
        **os.environ,
        "HYDRA_OTEL_DATABASE_URL": dsn,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "HYDRA_OTEL_STATE_DIR": str(state_dir),
        "HYDRA_OTEL_EXPORT_DELAY": "0.05",
        **extra,
    }


@asynccontextmanager
async def daemon_process(
    env: Mapping[str, str],
) -> AsyncIterator[tuple[trio.Process, trio.abc.ReceiveStream]]:
    """A real ``hydra-otel run`` process and its stderr; killed on exit if it is still running."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hydra_otel", "run"], env=dict(env), stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        yield proc, proc.stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
