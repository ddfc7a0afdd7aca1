"""Fixtures shared by the whole test suite.

* ``pg_cluster`` (session): one private PostgreSQL server for the run, started on first use.
* ``hydra_db`` / ``hydra_db_legacy``: a fresh database with Hydra's schema 87 / 85, dropped after
  the test. ``hydra_db`` takes the version as an indirect parameter:
  ``@pytest.mark.parametrize("hydra_db", [85, 87], indirect=True)``.
* ``aio_loop``: the trio-asyncio loop. Every fixture or test that uses asyncpg must depend on it
  explicitly; pytest-trio sets fixtures up concurrently, so ``autouse`` is not enough.
* ``otlp_grpc`` / ``otlp_http``: in-process OTLP trace receivers.

Every test under ``tests/integration/`` is marked ``integration``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio_asyncio

from hydra_otel.demo.sandbox.pgcluster import PgCluster
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver
from hydra_otel.demo.sandbox.schema import CURRENT_SCHEMA_VERSION

_INTEGRATION_DIR = Path(__file__).parent / "integration"
_database_numbers = itertools.count(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration/ as ``integration``."""
    for item in items:
        if _INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL server for the whole run, stopped and deleted at the end."""
    with PgCluster() as cluster:
        yield cluster


def _fresh_database(cluster: PgCluster, schema_version: int) -> Iterator[str]:
    """Create a database with the Hydra schema, yield its DSN, then drop it."""
    # The PID keeps names apart if several test processes ever share a cluster.
    name = f"hydra_test_{os.getpid()}_{next(_database_numbers)}"
    dsn = cluster.createdb(name, schema_version)
    try:
        yield dsn
    finally:
        cluster.dropdb(name)


@pytest.fixture
def hydra_db(request: pytest.FixtureRequest, pg_cluster: PgCluster) -> Iterator[str]:
    """The DSN of a fresh database with Hydra's schema (87 unless parametrized indirectly)."""
    version: int = getattr(request, "param", CURRENT_SCHEMA_VERSION)
    yield from _fresh_database(pg_cluster, version)


@pytest.fixture
def hydra_db_legacy(pg_cluster: PgCluster) -> Iterator[str]:
    """The DSN of a fresh database with the legacy Hydra's schema (85)."""
    yield from _fresh_database(pg_cluster, 85)


@pytest.fixture
async def aio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """The trio-asyncio loop that asyncpg runs on (see tests/conftest.py's docstring)."""
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
def otlp_grpc() -> Iterator[GrpcOtlpReceiver]:
    """A running OTLP/gRPC trace receiver; its ``endpoint`` is ``127.0.0.1:PORT``."""
    with GrpcOtlpReceiver() as receiver:
        yield receiver


@pytest.fixture
def otlp_http() -> Iterator[HttpOtlpReceiver]:
    """A running OTLP/HTTP trace receiver; the exporter's endpoint is its ``traces_url``."""
    with HttpOtlpReceiver() as receiver:
        yield receiver
