"""Fixtures for the tests against real peers (tests/peers/peers.py).

* ``peer_binaries`` (session): the built collector and Jaeger (skipped without Go, failed in CI).
* ``jaeger``: Jaeger v2 with in-memory storage on free ports (``"badger"`` as an indirect
  parameter: Badger on disk, which keeps the spans across a restart).
* ``logs_receiver``: an OTLP/HTTP logs receiver standing in for a logs backend.
* ``collector``: the shipped otel-collector.yaml in the test collector, exporting to ``jaeger``,
  to ``otlp_grpc`` (standing in for Tempo, which the project does not run) and to
  ``logs_receiver``.
* ``hydra`` and ``start_daemon``: the scripted Hydra and daemon of tests/integration.

Every peer is stopped at teardown, whatever the test did; its log tail is printed then, so
pytest shows it with a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from tests.integration.conftest import hydra, start_daemon
from tests.peers.otlp_logs import LogsReceiver
from tests.peers.peers import Binaries, Collector, Jaeger, Peer, binaries, collector_env

__all__ = ["collector", "hydra", "jaeger", "logs_receiver", "peer_binaries", "start_daemon"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here starts real processes: mark it ``integration``."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def peer_binaries() -> Binaries:
    """The peers, built (or found in the cache) by tests/peers/build.sh."""
    return binaries()


def stop_and_show(peer: Peer) -> None:
    """Stop ``peer`` and print its log tail (shown by pytest when the test failed)."""
    peer.stop()
    print(f"----- {peer.name} log ({peer.log_path}) -----\n{peer.log()}")


@pytest.fixture
def jaeger(request: pytest.FixtureRequest, peer_binaries: Binaries, tmp_path: Path) -> Iterator[Jaeger]:
    """A running Jaeger v2 with in-memory storage (Badger on disk when parametrized ``"badger"``)."""
    badger = tmp_path / "badger" if getattr(request, "param", "memory") == "badger" else None
    peer = Jaeger.make(peer_binaries.jaeger, tmp_path, badger_dir=badger)
    try:
        peer.peer.start()
        yield peer
    finally:
        stop_and_show(peer.peer)


@pytest.fixture
def logs_receiver() -> Iterator[LogsReceiver]:
    """A running OTLP/HTTP logs receiver."""
    with LogsReceiver() as receiver:
        yield receiver


@pytest.fixture
def collector(
    peer_binaries: Binaries,
    tmp_path: Path,
    jaeger: Jaeger,
    otlp_grpc: GrpcOtlpReceiver,
    logs_receiver: LogsReceiver,
) -> Iterator[Collector]:
    """The shipped collector configuration, running, in front of ``jaeger`` and the stand-ins."""
    env = collector_env(jaeger.otlp_endpoint, otlp_grpc.endpoint, logs_receiver.url)
    peer = Collector.make(peer_binaries.otelcol, tmp_path, env)
    try:
        peer.peer.start()
        yield peer
    finally:
        stop_and_show(peer.peer)
