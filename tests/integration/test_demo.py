"""``hydra-otel demo`` end to end: in-process, as a real process, against an external endpoint, interrupted.

Every run starts its own throwaway PostgreSQL; each test checks that it is stopped and its files are
gone afterwards (the demo prints the cluster's data directory).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from hydra_otel.config import Config
from hydra_otel.demo import run as demo
from hydra_otel.demo.run import DemoOptions, run_demo
from hydra_otel.demo.sandbox.pgcluster import INSTALL_HINT, PostgresNotFoundError
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from hydra_otel.demo.workload import SHORT
from hydra_otel.pipeline.factories import make_sink
from hydra_otel.service import Service

STATUS_OK, STATUS_ERROR = 1, 2
Span = dict[str, Any]


def daemon(cfg: Config) -> Service:
    """The daemon as ``hydra-otel demo`` gets it from the CLI."""
    return Service(cfg=cfg, sink=make_sink(cfg))


def attrs(span: Span) -> dict[str, Any]:
    """An OTLP/JSON span's attributes as Python values (intValue is a decimal string in JSON)."""
    out: dict[str, Any] = {}
    for kv in span.get("attributes", []):
        ((kind, value),) = kv["value"].items()
        out[kv["key"]] = int(value) if kind == "intValue" else value
    return out


def json_spans(path: Path) -> list[Span]:
    """Every span of an OTLP/JSON file."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]


def status(span: Span) -> int:
    return int(span.get("status", {}).get("code", 0))


def cluster_base(output: str) -> Path:
    """The demo cluster's private directory, from the line announcing its data directory."""
    match = re.search(r"data in (\S+)/data\b", output)
    assert match, output
    return Path(match[1])


def assert_cluster_gone(output: str) -> None:
    """The demo's PostgreSQL left no files and no process."""
    base = cluster_base(output)
    assert not base.exists()
    if shutil.which("pgrep"):
        found = subprocess.run(["pgrep", "-a", "-f", str(base)], capture_output=True, text=True, check=False)
        assert found.stdout == ""


def by_trace(spans: list[Span]) -> Iterator[list[Span]]:
    traces: dict[str, list[Span]] = {}
    for s in spans:
        traces.setdefault(s["traceId"], []).append(s)
    return iter(traces.values())


def assert_short_traces(out_dir: Path) -> None:
    """The JSON files hold exactly the short workload's traces, with the right tree and statuses."""
    files = sorted(out_dir.glob("*.json"))
    per_trace = [f for f in files if f.name != "all-traces.json"]
    assert len(per_trace) == SHORT.traces
    spans = json_spans(out_dir / "all-traces.json")
    assert len(spans) == SHORT.spans
    assert sorted(s["spanId"] for f in per_trace for s in json_spans(f)) == sorted(s["spanId"] for s in spans)
    for trace in by_trace(spans):
        ids = {s["spanId"] for s in trace}
        assert [s for s in trace if s.get("parentSpanId", "") not in ids | {""}] == [], "no orphans"
        assert len(ids) == len(trace), "no duplicate span IDs"
    assert_builds(spans)
    assert_attempts(spans)


def assert_builds(spans: list[Span]) -> None:
    """The failed build, its dependent, and the restarted build's two attempts."""
    named = {s["name"]: s for s in spans}
    assert {"BUILD nixpkgs:trunk", "checkout", "evaluate", "evaluator run", "queued"} <= set(named)
    openssl, curl = named["build openssl"], named["build curl"]
    assert status(openssl) == STATUS_ERROR
    assert attrs(openssl)["error.type"] == "build_failed"
    assert (status(curl), attrs(curl)["error.type"]) == (STATUS_ERROR, "dependency_failed")
    assert [(link["spanId"], attrs(link)["hydra.link.type"]) for link in curl["links"]] == [
        (openssl["spanId"], "caused_by")
    ]
    hello = sorted(
        (s for s in spans if s["name"] == "build hello"), key=lambda s: attrs(s)["hydra.build.attempt"]
    )
    assert [(attrs(s)["hydra.build.attempt"], status(s)) for s in hello] == [
        (0, STATUS_ERROR),
        (1, STATUS_OK),
    ]
    steps = {s["parentSpanId"]: attrs(s) for s in spans if s["name"] == "step hello-2.12.1"}
    assert steps[hello[0]["spanId"]]["cicd.worker.name"] == "ssh://builder-1"
    assert steps[hello[1]["spanId"]]["cicd.worker.name"] == "ssh://builder-2"
    assert steps[hello[1]["spanId"]]["hydra.step.nr"] == 2


def assert_attempts(spans: list[Span]) -> None:
    """One root span per evaluation attempt that left no JobsetEval row, each saying how it ended."""
    roots = [attrs(s) for s in spans if not s.get("parentSpanId") and "hydra.eval.id" not in attrs(s)]
    outcomes = sorted(
        (a["cicd.pipeline.name"], a["cicd.pipeline.result"], a.get("error.type")) for a in roots
    )
    assert outcomes == [
        ("nixpkgs:staging", "error", "evaluator_died"),
        ("nixpkgs:staging", "failure", "fetch_error"),
        ("nixpkgs:staging", "timeout", "abandoned"),
        ("nixpkgs:trunk", "success", None),
    ]


def assert_waterfalls(output: str) -> None:
    """The terminal output has one waterfall per trace, with build and step lines."""
    assert output.count("  trace ") == SHORT.traces
    assert "\nBUILD nixpkgs:trunk " in output
    assert "  build hello " in output
    assert "    step openssl-3.0.15 " in output
    assert f"[{len(SHORT.steps)}/{len(SHORT.steps)}]" in output
    assert "(parent missing)" not in output


async def test_short_demo_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run_demo under the test's own trio run plays the short workload and shows and saves every trace."""
    out_dir = tmp_path / "out"
    code = await run_demo(DemoOptions(short=True, out_dir=out_dir, width=100, speed=0.0), daemon)
    output = capsys.readouterr().out
    assert code == 0, output
    assert_waterfalls(output)
    assert_short_traces(out_dir)
    assert_cluster_gone(output)


async def test_short_demo_process(tmp_path: Path) -> None:
    """`python -m hydra_otel demo --short` exits 0, draws the waterfalls, writes the JSON, leaves nothing running."""
    out_dir = tmp_path / "demo"
    with trio.fail_after(120):
        proc = await trio.run_process(
            [sys.executable, "-m", "hydra_otel", "demo", "--short", "--out", str(out_dir), "--width", "100"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = proc.stdout.decode()
    assert proc.returncode == 0, output + proc.stderr.decode()
    assert proc.stderr == b"", "the daemon's info lines are silenced and nothing warns"
    assert_waterfalls(output)
    assert_short_traces(out_dir)
    assert_cluster_gone(output)


async def test_external_endpoint(
    tmp_path: Path,
    otlp_grpc: GrpcOtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the spans go there, and no waterfall or file is made."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{otlp_grpc.endpoint}")
    out_dir = tmp_path / "out"
    code = await run_demo(DemoOptions(short=True, out_dir=out_dir, width=100, speed=0.0), daemon)
    output = capsys.readouterr().out
    assert code == 0, output
    spans = otlp_grpc.spans()
    assert len(spans) == SHORT.spans
    assert len({s.span.trace_id for s in spans}) == SHORT.traces
    assert f"exported to http://{otlp_grpc.endpoint}" in output
    assert "  trace " not in output
    assert not out_dir.exists()
    assert_cluster_gone(output)


async def test_interrupted_demo_cleans_up(tmp_path: Path) -> None:
    """SIGINT while the workload plays: exit 130, PostgreSQL stopped and deleted, no output directory."""
    out_dir = tmp_path / "demo"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hydra_otel", "demo", "--out", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    output = b""
    try:
        with trio.fail_after(60):
            while b"[ 3/" not in output:
                chunk = await proc.stdout.receive_some()
                assert chunk, output.decode()
                output += chunk
            proc.send_signal(signal.SIGINT)
            async for chunk in proc.stdout:
                output += chunk
            assert await proc.wait() == 130, output.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"interrupted" in output
    assert not out_dir.exists()
    assert_cluster_gone(output.decode())


async def test_postgres_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without PostgreSQL, the demo says how to install it and exits 1."""

    def missing() -> None:
        raise PostgresNotFoundError(INSTALL_HINT)

    monkeypatch.setattr(demo, "PgCluster", missing)
    assert await run_demo(DemoOptions(short=True, out_dir=tmp_path / "out"), daemon) == 1
    assert "apt-get install postgresql" in capsys.readouterr().err
