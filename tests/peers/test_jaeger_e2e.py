"""End to end through real peers: Hydra -> hydra-otel -> the shipped collector -> Jaeger v2.

A scripted Hydra plays a workload with every kind of trace (added, cached and failed evaluations;
builds with steps, a failure with dependents, a restart, an evaluation over the trace budget).
The assertions read Jaeger's query APIs only: api/v3 (OTLP JSON, raw) for whole traces, the
internal api/traces for the search by service and tag that Jaeger's UI does.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from hydra_otel.core import ids
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, attributes_dict
from tests.integration.harness import Hydra, StartDaemon
from tests.integration.workload import INSTANCE, Player, SpanKey, now, span_key
from tests.peers.peers import SHIPPED_CONFIG, Collector, Jaeger, http_json
from tests.test_collector_config import parse_yaml, section

SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2
STATUS_OK, STATUS_ERROR = 1, 2
BUDGET = 3


def value(attribute: dict[str, Any]) -> object:
    """The Python value of an OTLP JSON ``AnyValue``."""
    (kind, v), *_ = attribute["value"].items()
    return int(v) if kind == "intValue" else v


def attrs(items: list[dict[str, Any]]) -> dict[str, object]:
    """OTLP JSON attributes as a dict."""
    return {a["key"]: value(a) for a in items}


def hexkey(key: SpanKey) -> tuple[str, str]:
    """A span key as Jaeger's OTLP JSON writes it: lower-case hex."""
    return key[0].hex(), key[1].hex()


@dataclass
class Workload:
    """What the workload produced: the IDs of interest, and every expected span by key."""

    player: Player
    eval_a: int = 0
    eval_b: int = 0
    builds_b: list[int] = field(default_factory=list)
    flaky: int = 0
    bad: int = 0
    dependent: int = 0
    cached_cid: str = ""
    failed_cid: str = ""

    def key(self, trace: ids.TraceKey, *span: str | int) -> tuple[str, str]:
        """The hex key of span ``span`` (root when empty) in ``trace``."""
        span_id = ids.span_id(trace, *span) if span else ids.root_span_id(trace)  # type: ignore[arg-type]
        return hexkey(span_key(trace, span_id))


async def play(hydra: Hydra, forwarded: GrpcOtlpReceiver) -> Workload:
    """Every kind of trace hydra-otel makes, in Hydra's order of events.

    ``forwarded`` is where the collector also sends the spans: a restart waits until the failed
    attempt was exported, as a person restarting a build in Hydra's web UI would.
    """
    w = Workload(Player(hydra))
    p = w.player
    w.eval_a, (w.flaky, w.bad, w.dependent) = await p.evaluation(1, 3)
    await p.finish(w.flaky, status=1)
    first = span_key(
        ids.eval_trace(INSTANCE, w.eval_a),
        ids.span_id(ids.eval_trace(INSTANCE, w.eval_a), "build", w.flaky, 0),
    )
    await forwarded.wait_for_spans(
        lambda got: first in {(s.span.trace_id, s.span.span_id) for s in got}, timeout=30
    )
    await p.restart(w.flaky)
    await p.finish(w.flaky)  # attempt 1 succeeds
    await p.fail_with_dependents(w.bad, [w.dependent])
    # Over the trace budget: the last two builds get traces of their own.
    w.eval_b, w.builds_b = await p.evaluation(1, BUDGET + 2)
    for b in w.builds_b:
        await p.finish(b)
    for b in w.builds_b[BUDGET:]:
        own = ids.build_trace(INSTANCE, b)
        in_eval = ids.eval_trace(INSTANCE, w.eval_b)
        for span in (("build", b, 0), ("queued", b, 0), ("step", b, 1)):
            name = p.expected.names.pop(span_key(in_eval, ids.span_id(in_eval, *span)))
            p.expected.names[span_key(own, ids.span_id(own, *span))] = name
    t = now()
    w.cached_cid, w.failed_cid = f"1.{t}.cached", f"2.{t}.failed"
    await hydra.run(*hydra.sim.evaluator_starts(1, w.cached_cid, t - 2))
    await hydra.run(hydra.sim.eval_cached(1, w.cached_cid, previous_eval_id=w.eval_b, now=t))
    p.expected.attempt(1, w.cached_cid)
    await hydra.run(*hydra.sim.evaluator_starts(2, w.failed_cid, t - 2))
    await hydra.run(hydra.sim.eval_fetch_failed(2, w.failed_cid, t, "error: cannot fetch input 'src'"))
    p.expected.attempt(2, w.failed_cid)
    return w


async def in_jaeger(
    jaeger: Jaeger,
    expected: set[tuple[str, str]],
    timeout: float = 60,  # noqa: ASYNC109 - a test helper's own deadline
    names: dict[tuple[str, str], str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Poll Jaeger until every expected span is there; every expected trace's spans, by trace ID."""
    deadline = trio.current_time() + timeout
    while True:
        traces = {t: await trio.to_thread.run_sync(jaeger.trace, t) for t in {t for t, _ in expected}}
        got = {(t, s["spanId"]) for t, spans in traces.items() for s in spans}
        if expected <= got:
            return traces
        if trio.current_time() > deadline:
            missing = sorted((names or {}).get(k, f"{k[0]}/{k[1]}") for k in expected - got)
            raise AssertionError(f"not in Jaeger after {timeout}s: {missing}")
        await trio.sleep(0.5)


def assert_exactly_once(traces: dict[str, list[dict[str, Any]]], expected: set[tuple[str, str]]) -> None:
    """Jaeger holds exactly the expected spans, each once."""
    counts = Counter((t, s["spanId"]) for t, spans in traces.items() for s in spans)
    assert set(counts) == expected, (set(counts) - expected, expected - set(counts))
    assert [k for k, n in counts.items() if n > 1] == []


async def test_workload_in_jaeger(
    hydra: Hydra,
    start_daemon: StartDaemon,
    collector: Collector,
    jaeger: Jaeger,
    otlp_grpc: GrpcOtlpReceiver,
    hydra_db: str,
    tmp_path: Path,
) -> None:
    """Every trace is in Jaeger as hydra-otel made it: spans, tree, kinds, status, links, attributes."""
    started = time.time()
    await start_daemon(f"http://{collector.otlp_grpc}", max_builds_per_trace=str(BUDGET), max_links="2")
    w = await play(hydra, otlp_grpc)
    expected = {hexkey(k) for k in w.player.expected.keys}
    traces = await in_jaeger(
        jaeger, expected, names={hexkey(k): n for k, n in w.player.expected.names.items()}
    )
    assert_exactly_once(traces, expected)
    spans = {(t, s["spanId"]): s for t, ss in traces.items() for s in ss}

    # Jaeger returns what the collector forwarded, field by field (the Tempo stand-in got the same).
    sent = {(s.span.trace_id.hex(), s.span.span_id.hex()): s for s in otlp_grpc.spans()}
    assert set(sent) == expected
    for key, s in spans.items():
        original = sent[key].span
        assert s["name"] == original.name
        assert s["kind"] == original.kind
        assert s.get("parentSpanId", "") == original.parent_span_id.hex()
        start, end = original.start_time_unix_nano, original.end_time_unix_nano
        # Jaeger's ingest sanitizer makes every span at least 1 ns long (a propagated step has no
        # duration of its own).
        assert (int(s["startTimeUnixNano"]), int(s["endTimeUnixNano"])) == (start, max(end, start + 1))
        assert s.get("status", {}).get("code", 0) == original.status.code
        got = attrs(s.get("attributes", []))
        if end == start:  # and the UI shows a warning on it
            assert "Negative duration" in str(got.pop("@jaeger@warnings")), s["name"]
        assert got == attributes_dict(original.attributes), s["name"]
        assert [(lk["traceId"], lk["spanId"]) for lk in s.get("links", [])] == [
            (lk.trace_id.hex(), lk.span_id.hex()) for lk in original.links
        ]
        resource = attrs(s["resource"])
        assert resource["service.name"] == "hydra-otel"
        assert resource["deployment.environment.name"] == "test"

    # The tree, kinds and status of evaluation A: a failed attempt, its successful retry, a failure
    # and the dependent that failed because of it.
    a = ids.eval_trace(INSTANCE, w.eval_a)
    root = spans[w.key(a)]
    assert root["kind"] == SPAN_KIND_SERVER
    assert "parentSpanId" not in root or root["parentSpanId"] == ""
    assert attrs(root["attributes"])["cicd.pipeline.name"] == "nixpkgs:trunk"
    assert attrs(root["attributes"])["cicd.pipeline.run.id"] == str(w.eval_a)
    for phase in ("checkout", "evaluate"):
        assert spans[w.key(a, phase)]["parentSpanId"] == root["spanId"]
    for build, attempt, status in (
        (w.flaky, 0, STATUS_ERROR),
        (w.flaky, 1, STATUS_OK),
        (w.bad, 0, STATUS_ERROR),
    ):
        span = spans[w.key(a, "build", build, attempt)]
        assert (span["parentSpanId"], span["kind"], span["status"]["code"]) == (
            root["spanId"],
            SPAN_KIND_INTERNAL,
            status,
        )
        assert attrs(span["attributes"])["cicd.pipeline.task.run.id"] == str(build)
        assert spans[w.key(a, "step", build, attempt + 1)]["parentSpanId"] == span["spanId"]
    assert (
        spans[w.key(a, "queued", w.flaky, 0)]["parentSpanId"]
        == spans[w.key(a, "build", w.flaky, 0)]["spanId"]
    )
    dependent = spans[w.key(a, "build", w.dependent, 0)]
    assert dependent["status"]["code"] == STATUS_ERROR
    (link,) = dependent["links"]
    assert (link["traceId"], link["spanId"]) == w.key(a, "build", w.bad, 0)
    assert attrs(link["attributes"])["hydra.link.type"] == "caused_by"

    # Evaluation B over the budget: split traces linked both ways.
    b = ids.eval_trace(INSTANCE, w.eval_b)
    b_root = spans[w.key(b)]
    assert len(traces[w.key(b)[0]]) == 3 + BUDGET * 3
    own_links = {(lk["traceId"], lk["spanId"]) for lk in b_root["links"]}
    for build in w.builds_b[BUDGET:]:
        own = ids.build_trace(INSTANCE, build)
        own_root = spans[w.key(own, "build", build, 0)]
        assert len(traces[w.key(own)[0]]) == 3
        assert own_root.get("parentSpanId", "") == ""
        (back,) = own_root["links"]
        assert (back["traceId"], back["spanId"]) == w.key(b)
        assert w.key(own, "build", build, 0) in own_links

    # The cached evaluation links to the previous one; the failed one is an error.
    cached = spans[w.key(ids.attempt_trace(INSTANCE, 1, w.cached_cid))]
    (previous,) = cached["links"]
    assert (previous["traceId"], previous["spanId"]) == w.key(b)
    assert attrs(previous["attributes"])["hydra.link.type"] == "previous_evaluation"
    failed = spans[w.key(ids.attempt_trace(INSTANCE, 2, w.failed_cid))]
    assert (failed["kind"], failed["status"]["code"]) == (SPAN_KIND_SERVER, STATUS_ERROR)
    assert attrs(failed["attributes"])["cicd.pipeline.result"] == "failure"

    # Jaeger's search by service and cicd.pipeline.name finds each evaluation of the jobset.
    def search(pipeline: str) -> set[str]:
        query = urllib.parse.urlencode(
            {
                "service": "hydra-otel",
                "tags": json.dumps({"cicd.pipeline.name": pipeline}),
                "start": int((started - 3600) * 1e6),
                "end": int((time.time() + 60) * 1e6),
                "limit": 100,
            }
        )
        return {t["traceID"] for t in http_json(f"{jaeger.query_url}/api/traces?{query}")["data"]}

    trunk = await trio.to_thread.run_sync(search, "nixpkgs:trunk")
    assert {w.key(a)[0], w.key(b)[0], cached["traceId"]} <= trunk
    assert failed["traceId"] not in trunk
    assert failed["traceId"] in await trio.to_thread.run_sync(search, "nixpkgs:staging")

    # `hydra-otel ids --build N` gives the IDs Jaeger has, in and beyond the evaluation's trace.
    for build in (w.bad, w.builds_b[-1]):
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-m", "hydra_otel", "ids", "--build", str(build), "--json"],
                env={
                    "PATH": "/usr/bin:/bin",
                    "HYDRA_OTEL_DATABASE_URL": hydra_db,
                    "HYDRA_OTEL_MAX_BUILDS_PER_TRACE": str(BUDGET),
                },
                capture_stdout=True,
            )
        found = json.loads(result.stdout)
        held = {s["spanId"] for s in await trio.to_thread.run_sync(jaeger.trace, found["trace_id"])}
        assert found["span_id"] in held

    # The span metrics carry the dimensions otel-collector.yaml configures (and docs/collector.md
    # lists), one label each; the connector flushes every 15 s.
    config = parse_yaml(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    spanmetrics = section(config, "connectors", "spanmetrics")
    assert isinstance(spanmetrics["dimensions"], list)
    dimensions = {str(section(d)["name"]).replace(".", "_") for d in spanmetrics["dimensions"]}
    with trio.fail_after(40):
        while 'hydra_span_type="attempt"' not in (text := await trio.to_thread.run_sync(collector.metrics)):  # noqa: ASYNC110 - polls another process
            await trio.sleep(0.5)
    calls = [line for line in text.splitlines() if line.startswith("hydra_traces_span_metrics_calls_total{")]
    labels = {name for line in calls for name in re.findall(r'([a-z_]+)="', line)}
    assert dimensions <= labels, calls
    assert labels - dimensions == {
        *("service_name", "span_kind", "status_code"),  # the connector's defaults less span.name
        "collector_instance_id",  # added by the connector
        # by the exporter; `job` and `instance` from service.name and service.instance.id
        *("job", "instance", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url"),
    }, labels
