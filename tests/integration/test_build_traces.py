"""End to end: builds and their steps become child spans of their evaluation's trace.

The scripted Hydra plays the queue runner's rows and notifications; the tests
assert on the exact tree, IDs, links, times and attributes the receiver got.
"""

from __future__ import annotations

import pytest

from hydra_otel.core import ids
from hydra_otel.demo.sandbox.hydrasim import NewBuild, store_path
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import HYDRA_URL, Hydra, StartDaemon

S = 1_000_000_000
T0 = 1_700_000_000
STATUS_OK, STATUS_ERROR = 1, 2


def tid(value: int) -> bytes:
    return value.to_bytes(16, "big")


def sid(value: int) -> bytes:
    return value.to_bytes(8, "big")


def find(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.span.name == name]


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    (span,) = find(spans, name)
    return span


async def eval_with_builds(hydra: Hydra, jobs: list[str]) -> tuple[int, list[int]]:
    eval_id, build_ids, sql = hydra.sim.eval_added(
        1,
        "1.1",
        eval_start=T0,
        timestamp=T0 + 10,
        checkout_time=5,
        eval_time=12,
        new_builds=[NewBuild(job=j, nixname=j) for j in jobs],
    )
    await hydra.run(*sql)
    return eval_id, build_ids


@pytest.mark.parametrize("worker", ["thread", "process"])
async def test_mixed_evaluation(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, worker: str
) -> None:
    """Success, failure with dependents, cached failure, substitution, remote machine: the exact tree."""
    await start_daemon(export_worker=worker)
    eval_id, (ok, bad, dep1, dep2, subst) = await eval_with_builds(
        hydra, ["ok", "bad", "dep1", "dep2", "subst"]
    )
    sim = hydra.sim
    dep_drv = store_path("openssl-3.0.drv", 99)
    await hydra.run(
        # ok: a dependency step on builder-1, then its own step on builder-2
        sim.step_started(ok, 1, now=T0 + 20, machine="ssh://builder-1", drvpath=dep_drv),
        sim.step_finished(ok, 1, now=T0 + 50, log_path="/var/lib/hydra/build-logs/ab/cd.drv"),
        sim.step_started(ok, 2, now=T0 + 51, machine="ssh://builder-2"),
        sim.step_finished(ok, 2, now=T0 + 80),
        sim.build_finished(ok, start=T0 + 51, stop=T0 + 80),
        # bad fails; dep1 and dep2 fail because of it
        sim.step_started(bad, 1, now=T0 + 30),
        sim.step_finished(bad, 1, now=T0 + 40, status=1, error="builder failed with exit code 1"),
        sim.build_failed_with_dependents(bad, start=T0 + 30, stop=T0 + 40, dependents=[(dep1, 1), (dep2, 1)]),
        # subst: fully substituted, no step notifications
        sim.substituted_step(subst, 1, start=T0 + 21, stop=T0 + 22),
        sim.build_finished(subst, start=T0 + 21, stop=T0 + 22),
    )
    # eval: 4 (root, checkout, evaluate, no evaluator run: not observed) -> 3; ok: build+queued+2 steps;
    # bad: build+queued+1 step; dep1/dep2: build + propagated step each; subst: build+queued+step.
    spans = await otlp_grpc.wait_for_spans(3 + 4 + 3 + 2 + 2 + 3)
    key = ids.eval_trace("hydra", eval_id)
    root = one(spans, "BUILD nixpkgs:trunk")
    assert {s.span.trace_id for s in spans} == {tid(ids.trace_id(key))}
    assert len({s.span.span_id for s in spans}) == len(spans), "no duplicate span IDs"

    b_ok = one(spans, "build ok")
    assert b_ok.span.parent_span_id == root.span.span_id
    assert b_ok.span.span_id == sid(ids.span_id(key, "build", ok, 0))
    assert (b_ok.span.start_time_unix_nano, b_ok.span.end_time_unix_nano) == ((T0 + 10) * S, (T0 + 80) * S)
    assert b_ok.span.status.code == STATUS_OK
    a = attributes_dict(b_ok.span.attributes)
    assert a["cicd.pipeline.task.name"] == "ok"
    assert a["cicd.pipeline.task.run.id"] == str(ok)
    assert a["cicd.pipeline.task.run.url.full"] == f"{HYDRA_URL}/build/{ok}"
    assert a["cicd.pipeline.task.run.result"] == "success"
    assert a["hydra.system"] == "x86_64-linux"
    assert a["hydra.build.size_bytes"] == 4096
    queued = [s for s in find(spans, "queued") if s.span.parent_span_id == b_ok.span.span_id]
    assert [(q.span.start_time_unix_nano, q.span.end_time_unix_nano) for q in queued] == [
        ((T0 + 10) * S, (T0 + 20) * S)
    ]
    dep_step = one(spans, "step openssl-3.0")
    assert one(spans, "step ok").span.parent_span_id == b_ok.span.span_id
    step2 = [
        s
        for s in spans
        if attributes_dict(s.span.attributes).get("hydra.step.nr") == 2
        and s.span.parent_span_id == b_ok.span.span_id
    ]
    assert len(step2) == 1
    assert attributes_dict(step2[0].span.attributes)["cicd.worker.name"] == "ssh://builder-2"
    d = attributes_dict(dep_step.span.attributes)
    assert dep_step.span.parent_span_id == b_ok.span.span_id
    assert d["cicd.worker.name"] == "ssh://builder-1"
    assert d["hydra.step.log_url"] == f"{HYDRA_URL}/build/{ok}/nixlog/1"
    assert (dep_step.span.start_time_unix_nano, dep_step.span.end_time_unix_nano) == (
        (T0 + 20) * S,
        (T0 + 50) * S,
    )

    b_bad = one(spans, "build bad")
    assert b_bad.span.status.code == STATUS_ERROR
    assert attributes_dict(b_bad.span.attributes)["error.type"] == "build_failed"
    for dep, name in ((dep1, "build dep1"), (dep2, "build dep2")):
        b = one(spans, name)
        attrs = attributes_dict(b.span.attributes)
        assert attrs["error.type"] == "dependency_failed"
        assert attrs["hydra.build.id"] == dep
        (link,) = b.span.links
        assert (link.trace_id, link.span_id) == (b_bad.span.trace_id, b_bad.span.span_id)
        assert attributes_dict(link.attributes) == {"hydra.link.type": "caused_by", "hydra.build.id": bad}
    propagated = [
        s for s in spans if attributes_dict(s.span.attributes).get("hydra.step.propagated_from") == bad
    ]
    assert len(propagated) == 2
    for p in propagated:
        assert p.span.start_time_unix_nano == p.span.end_time_unix_nano == (T0 + 40) * S

    b_subst = one(spans, "build subst")
    (s_step,) = [
        s for s in spans if s.span.parent_span_id == b_subst.span.span_id and s.span.name != "queued"
    ]
    assert s_step.span.name == "substitute subst"
    assert attributes_dict(s_step.span.attributes)["hydra.step.type"] == "substitution"


async def test_restart_and_redelivery(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A restarted build finishes twice: two build spans in one trace; a re-delivered finish adds nothing."""
    await start_daemon()
    eval_id, (b,) = await eval_with_builds(hydra, ["flaky"])
    sim = hydra.sim
    await hydra.run(
        sim.step_started(b, 1, now=T0 + 20),
        sim.step_finished(b, 1, now=T0 + 30, status=1, error="flaky test"),
        sim.build_finished(b, start=T0 + 20, stop=T0 + 30, status=1),
    )
    first = await otlp_grpc.wait_for_spans(3 + 3)
    await hydra.run(
        sim.restart(b),
        sim.step_started(b, 2, now=T0 + 100),
        sim.step_finished(b, 2, now=T0 + 130),
        sim.build_finished(b, start=T0 + 100, stop=T0 + 130),
    )
    spans = await otlp_grpc.wait_for_spans(len(first) + 2)  # build + step (no queued wait)
    key = ids.eval_trace("hydra", eval_id)
    attempts = sorted(find(spans, "build flaky"), key=lambda s: s.span.start_time_unix_nano)
    assert [s.span.span_id for s in attempts] == [sid(ids.span_id(key, "build", b, n)) for n in (0, 1)]
    assert [attributes_dict(s.span.attributes)["hydra.build.attempt"] for s in attempts] == [0, 1]
    assert [s.span.status.code for s in attempts] == [STATUS_ERROR, STATUS_OK]
    assert (attempts[1].span.start_time_unix_nano, attempts[1].span.end_time_unix_nano) == (
        (T0 + 100) * S,
        (T0 + 130) * S,
    )
    second_steps = [
        s for s in spans if s.span.parent_span_id == attempts[1].span.span_id and s.span.name != "queued"
    ]
    assert [attributes_dict(s.span.attributes)["hydra.step.nr"] for s in second_steps] == [2]

    # Hydra replays build_finished (at least once): nothing new, nothing different.
    before = {(s.span.span_id, s.span.SerializeToString()) for s in otlp_grpc.spans()}
    await hydra.run(f"SELECT pg_notify('build_finished', '{b}');", *hydra.sim.evaluator_starts(2, "9.9", T0))
    await hydra.run(hydra.sim.eval_fetch_failed(2, "9.9", T0 + 1, "marker"))  # a later span to wait for
    after = await otlp_grpc.wait_for_spans(
        lambda got: any(s.span.name == "BUILD nixpkgs:staging" for s in got)
    )
    assert {
        (s.span.span_id, s.span.SerializeToString()) for s in after if s.span.name != "BUILD nixpkgs:staging"
    } == before


async def test_step_exported_before_build_finishes(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A finished step shows up while its build is still running, under the build's future span ID."""
    await start_daemon()
    eval_id, (b,) = await eval_with_builds(hydra, ["long"])
    await hydra.run(
        hydra.sim.step_started(b, 1, now=T0 + 20, drvpath=store_path("dep.drv", 5)),
        hydra.sim.step_finished(b, 1, now=T0 + 25),
    )
    spans = await otlp_grpc.wait_for_spans(4)
    step = one(spans, "step dep")
    key = ids.eval_trace("hydra", eval_id)
    assert step.span.parent_span_id == sid(ids.span_id(key, "build", b, 0))
    assert find(spans, "build long") == []


@pytest.mark.parametrize("hydra_db", [85, 87], indirect=True)
async def test_budget_splits_big_evaluations(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Beyond --max-builds-per-trace, builds get traces of their own linked both ways; nothing is lost."""
    await start_daemon(max_builds_per_trace="3", max_links="2")
    eval_id, builds = await eval_with_builds(hydra, [f"job{i}" for i in range(7)])
    for i, b in enumerate(builds):
        await hydra.run(
            hydra.sim.step_started(b, 1, now=T0 + 20 + i),
            hydra.sim.step_finished(b, 1, now=T0 + 30 + i),
            hydra.sim.build_finished(b, start=T0 + 20 + i, stop=T0 + 30 + i),
        )
    spans = await otlp_grpc.wait_for_spans(3 + 7 * 3)
    key = ids.eval_trace("hydra", eval_id)
    eval_trace = tid(ids.trace_id(key))
    root = one(spans, "BUILD nixpkgs:trunk")
    attrs = attributes_dict(root.span.attributes)
    assert attrs["hydra.eval.builds.own_traces"] == 4
    assert len(root.span.links) == 2
    by_trace: dict[bytes, int] = {}
    for s in spans:
        by_trace[s.span.trace_id] = by_trace.get(s.span.trace_id, 0) + 1
    assert by_trace[eval_trace] == 3 + 3 * 3
    assert len(by_trace) == 1 + 4
    for b in builds[3:]:
        own = ids.build_trace("hydra", b)
        span = one(spans, f"build job{builds.index(b)}")
        assert span.span.trace_id == tid(ids.trace_id(own))
        assert span.span.parent_span_id == b""
        (link,) = span.span.links
        assert (link.trace_id, link.span_id) == (eval_trace, root.span.span_id)
    linked = {(lk.trace_id, lk.span_id) for lk in root.span.links}
    expected = {
        (
            tid(ids.trace_id(ids.build_trace("hydra", b))),
            sid(ids.span_id(ids.build_trace("hydra", b), "build", b, 0)),
        )
        for b in builds[3:5]
    }
    assert linked == expected


async def test_missing_build_is_counted(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """build_finished and step_finished for IDs that are not in the database are counted and skipped."""
    service = await start_daemon()
    await hydra.run(
        "SELECT pg_notify('build_finished', E'424242\\t424243');",
        "SELECT pg_notify('step_finished', E'77\\t1\\t');",
    )
    await hydra.run(
        *hydra.sim.evaluator_starts(2, "9.9", T0), hydra.sim.eval_fetch_failed(2, "9.9", T0 + 1, "x")
    )
    await otlp_grpc.wait_for_spans(1)
    assert service.stats.missing_rows == {"builds": 2, "buildsteps": 1}
