"""End to end: forged eval_cached / eval_failed / eval_added floods stay bounded; real ones still export.

Any role may NOTIFY. Before the stitcher checked closing events against the
``jobsets`` and ``jobsetevals`` rows, each forged payload naming an existing
jobset became an attempt span of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from hydra_otel.core import ids
from hydra_otel.core.stitch import SUPERSEDE_BURST
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import Hydra, Mallory, StartDaemon

T0 = 1_700_000_000
FORGED = 5_000  # per channel and per wave; two waves, around the real evaluations
JOBSETS = 50  # the flood names jobsets 1..50; only 1 (trunk) and 2 (staging) exist
PAIRS = 2_000  # forged eval_started + eval_added pairs
CHECKS = 5  # lastcheckedtime values the jobsets' rows show during the floods (2 old, 3 real)


def attempts(spans: Sequence[ReceivedSpan], prefix: str) -> list[ReceivedSpan]:
    return [
        s
        for s in spans
        if str(attributes_dict(s.span.attributes).get("hydra.eval.correlation_id", "")).startswith(prefix)
        and attributes_dict(s.span.attributes).get("hydra.span.type") == "attempt"
    ]


async def flood(mallory: Mallory, wave: int) -> None:
    """FORGED eval_failed and FORGED eval_cached from a role with no grant at all."""
    await mallory(
        f"SELECT count(pg_notify('eval_failed', 'forged.{wave}.' || i || E'\\t' || (i % {JOBSETS} + 1))), "
        f"count(pg_notify('eval_cached', 'forged.{wave}.' || i || E'\\t' || (i % {JOBSETS} + 1) "
        f"|| E'\\t' || (i % 7 + 1))) FROM generate_series(1, {FORGED}) i"
    )


async def test_forged_closing_flood_is_bounded(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, mallory: Mallory
) -> None:
    """20,000 forged closing events: at most two attempt spans per check Hydra made, real attempts export."""
    sim = hydra.sim
    # Hydra's history before the daemon starts: trunk evaluated (eval IDs 1..), staging's fetch failed.
    old, _, sql = sim.eval_added(
        1,
        "old.1",
        eval_start=T0,
        timestamp=T0 + 10,
        checkout_time=1,
        eval_time=5,
        new_builds=[NewBuild(job="o")],
    )
    await hydra.run(*sql, sim.eval_fetch_failed(2, "old.2", T0 + 20, "cannot fetch"))
    service = await start_daemon()
    await flood(mallory, 1)
    # Real evaluations meanwhile: trunk evaluates, then finds its inputs unchanged; staging fails.
    new, _, sql = sim.eval_added(
        1, "real.1", eval_start=T0 + 100, timestamp=T0 + 110, checkout_time=1, eval_time=5
    )
    await hydra.run(
        *sim.evaluator_starts(1, "real.1", T0 + 100),
        *sql,
        *sim.evaluator_starts(1, "real.2", T0 + 200),
        sim.eval_cached(1, "real.2", new, T0 + 201),
        *sim.evaluator_starts(2, "real.3", T0 + 300),
        sim.eval_check_failed(2, "real.3", T0 + 301, "error: undefined variable 'foo'"),
    )
    await flood(mallory, 2)
    real = {ids.attempt_trace("hydra", 1, "real.2"), ids.attempt_trace("hydra", 2, "real.3")}
    real_ids = {ids.trace_id(k).to_bytes(16, "big") for k in real}
    evaluation = ids.trace_id(ids.eval_trace("hydra", new)).to_bytes(16, "big")

    def real_arrived(spans: Sequence[ReceivedSpan]) -> bool:
        got = {bytes(s.span.trace_id) for s in spans}
        return real_ids | {evaluation} <= got

    await otlp_grpc.wait_for_spans(real_arrived, timeout=60)
    with trio.move_on_after(30):  # every forged notification received and judged (asserted below)
        while min(service.stats.events[c] for c in ("eval_cached", "eval_failed")) <= 2 * FORGED:  # noqa: ASYNC110 - live counters
            await trio.sleep(0.05)
        while sum(service.stats.notifications_rejected.values()) < 4 * FORGED - CHECKS:  # noqa: ASYNC110
            await trio.sleep(0.05)
    with trio.move_on_after(1):  # anything still in flight would only add to the count below
        await otlp_grpc.wait_for_spans(len(otlp_grpc.spans()) + 1)
    spans = otlp_grpc.spans()
    forged = attempts(spans, "forged.")
    # Per change of a jobset's row, at most two orphans: one agreeing with the row (rows are read
    # when the stitcher gets to a notification, maybe after Hydra committed the next check) and one
    # that the row may have overwritten (spans.md, "Stitching evaluations").
    assert len(forged) <= 2 * CHECKS, sorted(
        str(attributes_dict(s.span.attributes)["hydra.eval.correlation_id"]) for s in forged
    )
    assert {s.span.name for s in attempts(spans, "real.")} == {"BUILD nixpkgs:trunk", "BUILD nixpkgs:staging"}
    rejected = service.stats.notifications_rejected
    assert rejected["unknown_jobset"] == 4 * FORGED * (JOBSETS - 2) // JOBSETS
    assert sum(rejected.values()) == 4 * FORGED - len(forged)
    assert {"row_disagrees", "check_already_reported"} <= set(rejected)
    assert old < new


async def test_forged_pairs_add_no_evaluator_runs(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, mallory: Mallory
) -> None:
    """eval_started + eval_added pairs naming real evaluations: no evaluator run span beyond the real one."""
    sim = hydra.sim
    other, _, sql = sim.eval_added(2, "old.2", eval_start=T0, timestamp=T0 + 10, checkout_time=1, eval_time=5)
    await hydra.run(*sql)
    service = await start_daemon()
    real, _, sql = sim.eval_added(
        1, "real.1", eval_start=T0 + 100, timestamp=T0 + 110, checkout_time=1, eval_time=5
    )
    await hydra.run(*sim.evaluator_starts(1, "real.1", T0 + 100), *sql)

    def runs(spans: Sequence[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.span.name == "evaluator run"]

    await otlp_grpc.wait_for_spans(lambda got: len(runs(got)) == 1, timeout=30)
    # each pair in order: start, then eval_added naming trunk's evaluation or staging's
    await mallory(
        "SELECT count(pg_notify(c, p)) FROM (SELECT i, "
        "CASE WHEN i % 2 = 0 THEN 'eval_started' ELSE 'eval_added' END AS c, "
        "'pair.' || (i / 2) || E'\\t1' || CASE WHEN i % 2 = 0 THEN '' "
        f"ELSE E'\\t' || CASE WHEN i % 4 = 1 THEN {other} ELSE {real} END END AS p "
        f"FROM generate_series(0, {2 * PAIRS - 1}) i ORDER BY i) t"
    )
    with trio.move_on_after(30):  # every pair received and judged (asserted below)
        while service.stats.events["eval_added"] < PAIRS + 1:  # noqa: ASYNC110 - live counters
            await trio.sleep(0.05)
        rejected = service.stats.notifications_rejected
        while rejected["run_already_reported"] + rejected["eval_of_other_jobset"] < PAIRS:  # noqa: ASYNC110
            await trio.sleep(0.05)
    with trio.move_on_after(1):  # anything still in flight would only add to the count below
        await otlp_grpc.wait_for_spans(len(otlp_grpc.spans()) + 1)
    spans = otlp_grpc.spans()
    assert len(runs(spans)) == 1
    rejected = service.stats.notifications_rejected
    assert rejected["run_already_reported"] == PAIRS // 2
    assert rejected["eval_of_other_jobset"] == PAIRS // 2
    # Starts left open by the rejected pairs supersede one another: a few reported abandoned.
    assert len(attempts(spans, "pair.")) <= SUPERSEDE_BURST
