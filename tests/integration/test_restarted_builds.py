"""A build restarted while hydra-otel was down: every attempt's build span arrives, no step is orphaned.

The first attempt's step is exported live; the daemon then stops before the build finishes. While
it is down the build times out, is restarted from the web UI and starts again. The next daemon
finds the first attempt's step among the steps of still-running builds: it renders the whole
build, so that attempt's build span (the step's parent) arrives even though its ``build_finished``
was never heard and its row is no longer finished. When the rerun finishes, the first attempt
comes again, rebuilt from its step, identical.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan
from tests.integration.harness import Hydra
from tests.integration.workload import Daemons, Player, assert_exactly, now, wait_for_expected


def orphans(spans: Sequence[ReceivedSpan]) -> list[str]:
    """Spans whose parent span ID no received span of the same trace has."""
    have = {(bytes(s.span.trace_id), bytes(s.span.span_id)) for s in spans}
    return sorted(
        s.span.name
        for s in spans
        if s.span.parent_span_id and (bytes(s.span.trace_id), bytes(s.span.parent_span_id)) not in have
    )


async def test_first_attempt_finished_and_restarted_while_down(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Timed out, restarted and rerun around a downtime: both attempts arrive, every parent exists."""
    first = await daemons.start()
    play = Player(hydra)
    eval_id, (build,) = await play.evaluation(1, 1)
    sim, t = hydra.sim, now()
    await hydra.run(
        sim.step_started(build, 1, now=t - 10, machine="ssh://builder-2"),
        sim.step_finished(build, 1, now=t - 5, status=7, error="timed out after 10 seconds"),
    )
    play.expected.step(eval_id, build, 1)
    await wait_for_expected(otlp_grpc, play.expected, first)  # the step, live; its parent not yet
    await first.stop()

    await hydra.run(
        sim.build_finished(build, start=t - 10, stop=t - 5, status=7),  # nobody hears it
        sim.restart(build),
        sim.step_started(build, 2, now=t - 2, machine="ssh://builder-1"),
    )
    play.expected.build(eval_id, build, 0, queued=True)
    second = await daemons.start()
    await wait_for_expected(otlp_grpc, play.expected, second)  # the first attempt, from the catch-up
    assert not orphans(otlp_grpc.spans())

    t = now()
    await hydra.run(
        sim.step_finished(build, 2, now=t),
        sim.build_finished(build, start=t - 2, stop=t),
    )
    play.expected.build(eval_id, build, 1, queued=False)
    play.expected.step(eval_id, build, 2)
    await wait_for_expected(otlp_grpc, play.expected, second)
    await second.stop()
    assert not orphans(otlp_grpc.spans())
    assert_exactly(otlp_grpc.spans(), play.expected, identical_repeats=True)
