"""End to end: forged evaluation notifications and oversized builds stay bounded.

Any role that can connect may NOTIFY, so a flood of made-up ``eval_started``
payloads must not become a flood of "abandoned" spans, and a build with tens
of thousands of steps must not become a trace a backend refuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from hydra_otel.core.stitch import SUPERSEDE_BURST
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import Hydra, Mallory, StartDaemon

T0 = 1_700_000_000
CID = "4112.262815283.16494"
FORGED = 20_000
REAL_JOBSETS = 2  # trunk (1) and staging (2); the flood also names jobsets 3..50, which do not exist


def trunk_evaluation(hydra: Hydra) -> tuple[int, list[str]]:
    """trunk's evaluation CID with one new build: its JobsetEval ID and the SQL that records it."""
    eval_id, _, sql = hydra.sim.eval_added(
        1,
        CID,
        eval_start=T0,
        timestamp=T0 + 100,
        checkout_time=20,
        eval_time=150,
        new_builds=[NewBuild(job="a")],
    )
    return eval_id, sql


def abandoned(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if attributes_dict(s.span.attributes).get("error.type") == "abandoned"]


async def test_forged_start_flood_is_bounded(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, mallory: Mallory
) -> None:
    """20,000 eval_started from a role with no grant: few abandoned spans, the real evaluation exports."""
    service = await start_daemon(eval_abandon_after="2")
    await mallory(
        "SELECT count(pg_notify('eval_started', 'forged.' || i || E'\\t' || (i % 50 + 1))) "
        f"FROM generate_series(1, {FORGED}) i"
    )
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    eval_id, sql = trunk_evaluation(hydra)
    await hydra.run(*sql)

    def real_eval_and_expiry(spans: Sequence[ReceivedSpan]) -> bool:
        names = {
            s.span.name for s in spans if attributes_dict(s.span.attributes).get("hydra.eval.id") == eval_id
        }
        expired = any(
            "abandon limit" in str(attributes_dict(s.span.attributes).get("hydra.eval.abandon_reason"))
            for s in spans
        )
        return {"BUILD nixpkgs:trunk", "evaluator run"} <= names and expired

    spans = await otlp_grpc.wait_for_spans(real_eval_and_expiry, timeout=60)
    with trio.move_on_after(1):  # anything still in flight would only add to the count below
        await otlp_grpc.wait_for_spans(len(spans) + 1)
    spans = otlp_grpc.spans()
    assert service.stats.events["eval_started"] == FORGED + 1
    # Per real jobset: the reported supersessions, and the last forged start expiring.
    assert len(abandoned(spans)) <= REAL_JOBSETS * (SUPERSEDE_BURST + 1)
    rejected = service.stats.notifications_rejected
    assert rejected["unknown_jobset"] == FORGED * 48 // 50
    assert sum(rejected.values()) >= FORGED - REAL_JOBSETS * (SUPERSEDE_BURST + 1)


async def test_added_before_started_is_not_abandoned(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """eval_added delivered before its eval_started (another connection, committed later): the
    evaluation exports once, and the late start is counted instead of ending as "abandoned"."""
    service = await start_daemon(eval_abandon_after="0.5")
    eval_id, sql = trunk_evaluation(hydra)
    await hydra.run(*sql, *hydra.sim.evaluator_starts(1, CID, T0))
    with trio.fail_after(10):
        while service.stats.notifications_rejected["already_closed"] < 1:  # noqa: ASYNC110 - a counter of the live pipeline
            await trio.sleep(0.01)
    spans = await otlp_grpc.wait_for_spans(3)
    # Past the abandon limit nothing more comes: on main, the start opened and was abandoned here.
    with trio.move_on_after(1.5):
        await otlp_grpc.wait_for_spans(len(spans) + 1, timeout=10)
    assert {s.span.name for s in otlp_grpc.spans()} == {"BUILD nixpkgs:trunk", "checkout", "evaluate"}
    assert abandoned(otlp_grpc.spans()) == []
    assert eval_id > 0


async def test_build_with_20000_steps_fits_tempo(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A build with 20,000 steps: its trace, measured as received, stays under Tempo's 5 MB, and the
    build span says how many steps were left out."""
    service = await start_daemon()
    eval_id, (build,), sql = hydra.sim.eval_added(
        1,
        CID,
        eval_start=T0,
        timestamp=T0 + 100,
        checkout_time=20,
        eval_time=150,
        new_builds=[NewBuild(job="big")],
    )
    await hydra.run(*sql)
    steps = 20_000
    own = hydra.sim.drvpaths[build]
    await hydra.run(
        "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, starttime, stoptime, machine, system) "
        f"SELECT {build}, i, 0, '/nix/store/' || lpad(i::text, 32, '0') || '-python3.12-some-package-' || i || "
        f"'.drv', 0, 0, {T0} + 100 + i, {T0} + 101 + i, 'ssh://builder@big-builder-01.example.org', "
        f"'x86_64-linux' FROM generate_series(1, {steps - 1}) i",
        "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, starttime, stoptime, machine, system) "
        f"VALUES ({build}, {steps}, 0, '{own}', 0, 0, {T0 + 100 + steps}, {T0 + 101 + steps}, '', 'x86_64-linux')",
        hydra.sim.build_finished(build, start=T0 + 100 + steps, stop=T0 + 101 + steps),
    )

    def build_span(spans: Sequence[ReceivedSpan]) -> bool:
        return any(s.span.name == "build big" for s in spans)

    spans = await otlp_grpc.wait_for_spans(build_span, timeout=60)
    (root,) = [s for s in spans if s.span.name == "build big"]
    omitted = attributes_dict(root.span.attributes)["hydra.build.steps_omitted"]
    assert isinstance(omitted, int)

    def steps_of(spans: Sequence[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if attributes_dict(s.span.attributes).get("hydra.span.type") == "step"]

    spans = await otlp_grpc.wait_for_spans(lambda got: len(steps_of(got)) >= steps - omitted, timeout=60)
    trace = [s for s in spans if s.span.trace_id == root.span.trace_id]
    size = sum(len(s.span.SerializeToString()) for s in trace)
    assert size <= 5_000_000, f"{len(trace)} spans, {size} bytes"
    assert len(steps_of(trace)) == steps - omitted
    assert service.stats.spans_over_budget == omitted
    assert {s.span.name for s in trace} >= {
        "BUILD nixpkgs:trunk",
        "checkout",
        "evaluate",
        "build big",
        "queued",
    }
    assert eval_id > 0


async def test_forged_start_during_a_real_evaluation_does_not_end_it(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, mallory: Mallory
) -> None:
    """A role with no grant sends eval_started for a jobset while Hydra evaluates it: the real
    attempt is not reported abandoned (it used to be, then again as failed under the same span ID)."""
    service = await start_daemon()
    # NOTIFYs reach the listener in commit order, and the pipeline keeps that order.
    await hydra.run(*hydra.sim.evaluator_starts(2, CID, T0))
    await mallory("SELECT pg_notify('eval_started', E'forged.1\\t2')")
    await hydra.run(hydra.sim.eval_check_failed(2, CID, T0 + 30, "error: undefined variable 'foo'"))
    spans = await otlp_grpc.wait_for_spans(
        lambda got: any(s.span.name == "BUILD nixpkgs:staging" for s in got), timeout=20
    )
    with trio.move_on_after(1):  # anything still in flight would only add to the spans below
        await otlp_grpc.wait_for_spans(len(spans) + 1)
    spans = otlp_grpc.spans()
    roots = [s for s in spans if s.span.name == "BUILD nixpkgs:staging"]
    assert abandoned(spans) == []
    assert len(roots) == 1, [attributes_dict(s.span.attributes) for s in roots]
    attrs = attributes_dict(roots[0].span.attributes)
    assert (attrs["hydra.eval.correlation_id"], attrs["hydra.eval.start_observed"]) == (CID, True)
    assert service.stats.notifications_rejected["contested_start"] == 1
