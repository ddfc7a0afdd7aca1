"""Faults through the real chain: the collector restarted mid-workload, Jaeger stopped behind it.

After recovery Jaeger holds every expected span exactly once per span ID: hydra-otel retries
what the collector refused while it was down, and the collector retries what Jaeger refused.
"""

from __future__ import annotations

import pytest
import trio

from tests.integration.harness import Hydra, StartDaemon
from tests.integration.workload import Player
from tests.peers.peers import Collector, Jaeger
from tests.peers.test_jaeger_e2e import assert_exactly_once, hexkey, in_jaeger

#: What the collector logs when an export failed and will be retried (exporterhelper).
RETRY = "Exporting failed. Will retry the request after interval."


async def phase(player: Player, jobset_id: int = 1) -> None:
    """An evaluation whose three builds finish, one of them failing."""
    _, builds = await player.evaluation(jobset_id, 3)
    for n, b in enumerate(builds):
        await player.finish(b, status=1 if n == 1 else 0)


def expected(player: Player) -> set[tuple[str, str]]:
    """Every span the workload so far must produce, as Jaeger's hex keys."""
    return {hexkey(k) for k in player.expected.keys}


async def test_collector_restarted_mid_workload(
    hydra: Hydra, start_daemon: StartDaemon, collector: Collector, jaeger: Jaeger
) -> None:
    """Spans sent while the collector is down arrive once it is back, and none twice."""
    service = await start_daemon(f"http://{collector.otlp_grpc}", export_max_backoff="1")
    player = Player(hydra)
    await phase(player)
    await in_jaeger(jaeger, expected(player))
    await trio.to_thread.run_sync(collector.peer.stop)
    await phase(player, 2)
    with trio.fail_after(30):
        while service.stats.export_failures == 0:  # noqa: ASYNC110 - hydra-otel saw the collector down
            await trio.sleep(0.1)
    await trio.to_thread.run_sync(collector.peer.start)
    await phase(player)
    traces = await in_jaeger(jaeger, expected(player))
    assert_exactly_once(traces, expected(player))


@pytest.mark.parametrize("jaeger", ["badger"], indirect=True)
async def test_jaeger_stopped_behind_the_collector(
    hydra: Hydra, start_daemon: StartDaemon, collector: Collector, jaeger: Jaeger
) -> None:
    """The collector queues and retries while Jaeger is down; Jaeger ends with each span once."""
    await start_daemon(f"http://{collector.otlp_grpc}")
    player = Player(hydra)
    await phase(player)
    await in_jaeger(jaeger, expected(player))
    await trio.to_thread.run_sync(jaeger.peer.stop)
    await phase(player, 2)
    with trio.fail_after(30):  # the collector's export to the stopped Jaeger fails and is retried
        while RETRY not in await trio.Path(collector.peer.log_path).read_text():  # noqa: ASYNC110 - polls a log file
            await trio.sleep(0.2)
    await trio.to_thread.run_sync(jaeger.peer.start)
    await phase(player)
    traces = await in_jaeger(jaeger, expected(player), timeout=90)
    assert_exactly_once(traces, expected(player))
    assert "Dropping data" not in collector.peer.log(tail=10_000)
