"""Fixtures for end-to-end tests: a scripted Hydra and a running daemon.

``hydra`` plays Hydra's SQL through its own asyncpg connection, so every NOTIFY
is a real one delivered at commit. ``start_daemon`` runs the real
:class:`~hydra_otel.service.Service` (listener, stitcher, resolver, exporter)
against the test database and an in-process OTLP receiver, and stops it
gracefully at teardown.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.demo.sandbox.hydrasim import HydraSim
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from hydra_otel.pipeline.factories import make_sink
from hydra_otel.service import Service
from tests.integration.harness import Hydra, Mallory, StartDaemon, daemon_config, stop
from tests.integration.workload import Daemons


@pytest.fixture
async def hydra(aio_loop: asyncio.AbstractEventLoop, hydra_db: str) -> AsyncIterator[Hydra]:
    """A Hydra with one project ``nixpkgs`` and jobsets ``trunk`` (ID 1) and ``staging`` (ID 2)."""
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    h = Hydra(HydraSim(), conn)
    await h.run(h.sim.create_project("nixpkgs"))
    for name in ("trunk", "staging"):
        _, sql = h.sim.create_jobset("nixpkgs", name)
        await h.run(sql)
    yield h
    await aio_as_trio(conn.close)()


@pytest.fixture
async def start_daemon(
    aio_loop: asyncio.AbstractEventLoop,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> AsyncIterator[StartDaemon]:
    """Start a daemon (gRPC to ``otlp_grpc`` unless overridden); every one is stopped at teardown."""
    services: list[Service] = []

    async def start(endpoint: str | None = None, **overrides: str) -> Service:
        cfg = daemon_config(hydra_db, endpoint or f"http://{otlp_grpc.endpoint}", tmp_path, **overrides)
        service = Service(cfg=cfg, sink=make_sink(cfg))
        nursery.start_soon(service.run)
        with trio.fail_after(15):
            await service.ready.wait()
        services.append(service)
        return service

    yield start
    for service in services:
        await stop(service)


@pytest.fixture
async def daemons(
    aio_loop: asyncio.AbstractEventLoop,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> AsyncIterator[Daemons]:
    """In-process daemons on the test database, ``otlp_grpc`` and ``tmp_path``; stopped after the test."""
    started = Daemons(nursery, hydra_db, f"http://{otlp_grpc.endpoint}", tmp_path / "state")
    yield started
    await started.stop_all()


@pytest.fixture
async def mallory(hydra: Hydra, hydra_db: str, tmp_path: Path) -> AsyncIterator[Mallory]:
    """What any role that can connect may do (NOTIFY needs no privilege); the role is dropped after."""
    role = re.sub(r"[^a-z0-9_]", "_", f"mallory_{tmp_path.name.lower()[-20:]}")
    await hydra.run(f"CREATE ROLE {role} LOGIN")
    dsn = hydra_db.replace("postgres@", f"{role}@")

    async def run(sql: str) -> None:
        conn = await aio_as_trio(asyncpg.connect)(dsn)
        try:
            await aio_as_trio(conn.execute)(sql)
        finally:
            await aio_as_trio(conn.close)()

    try:
        yield run
    finally:
        await hydra.run(f"DROP ROLE {role}")
