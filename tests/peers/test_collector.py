"""The shipped otel-collector.yaml in a real collector: it validates, and traffic goes through it.

The collector is built from the same component modules otelcol-contrib uses (tests/peers/otelcol),
and the file is loaded as shipped, with the environment variables docs/collector.md documents.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from hydra_otel.core.logtail import hydra_log_path
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, attributes_dict
from tests.integration.harness import Hydra, daemon_env
from tests.integration.workload import Player, daemon_processes
from tests.peers.otlp_logs import LogsReceiver
from tests.peers.peers import SHIPPED_CONFIG, Binaries, Collector, Jaeger, collector_env, http_json
from tests.test_collector_config import parse_yaml, section

ENV = collector_env("jaeger.example.org:4317", "tempo.example.org:4317", "http://logs.example.org:4318")


def validate(binary: Path, config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``otelcol validate --config CONFIG`` with ``env`` (and nothing else) as the environment."""
    return subprocess.run(
        [str(binary), "validate", "--config", str(config)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_shipped_config_validates(peer_binaries: Binaries) -> None:
    """`validate` accepts the file as shipped, with the documented variables set."""
    result = validate(peer_binaries.otelcol, SHIPPED_CONFIG, ENV)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variable", ["JAEGER_OTLP_ENDPOINT", "TEMPO_OTLP_ENDPOINT", "LOGS_OTLP_ENDPOINT"])
def test_required_variables_are_required(peer_binaries: Binaries, variable: str) -> None:
    """Each endpoint documented as required makes the collector refuse the file when unset."""
    env = {k: v for k, v in ENV.items() if k != variable}
    result = validate(peer_binaries.otelcol, SHIPPED_CONFIG, env)
    assert result.returncode != 0
    assert "endpoint" in result.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("    check_interval: 1s\n", "    check_interval: 1s\n    limit_percentage_typo: 50\n"),
        ("      exporters: [otlphttp/logs]\n", "      exporters: [otlphttp/loki]\n"),
        ("  health_check:\n", "  health_check:\n    path_typo: /\n"),
    ],
    ids=["unknown key", "missing component", "unknown extension key"],
)
def test_a_broken_config_fails(peer_binaries: Binaries, tmp_path: Path, old: str, new: str) -> None:
    """A deliberate break in the file fails `validate`, so it fails this test suite and CI."""
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    assert text.count(old) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(old, new), encoding="utf-8")
    assert validate(peer_binaries.otelcol, broken, ENV).returncode != 0


def test_collector_has_exactly_the_named_components(peer_binaries: Binaries) -> None:
    """The test collector is built with the component types the file names, no more and no fewer."""
    config = parse_yaml(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    named = {
        kind: {name.split("/")[0] for name in section(config, kind)}
        for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
    }
    out = subprocess.run(
        [str(peer_binaries.otelcol), "components"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    built: dict[str, set[str]] = {kind: set() for kind in named}
    kind = ""
    for line in out.splitlines():
        if line.rstrip(":") in built:
            kind = line.rstrip(":")
        elif kind and (match := re.match(r"\s+- name: (\S+)", line)):
            built[kind].add(match[1])
    # v0.165.0 lists these under new names and accepts the file's names as deprecated aliases
    # (the file keeps them for older collectors, see its comments).
    renamed = {"otlp_grpc": "otlp", "otlp_http": "otlphttp", "span_metrics": "spanmetrics"}
    assert {kind: {renamed.get(n, n) for n in ns} for kind, ns in built.items()} == named


async def test_traces_metrics_and_logs_go_through(
    hydra: Hydra,
    hydra_db: str,
    collector: Collector,
    jaeger: Jaeger,
    otlp_grpc: GrpcOtlpReceiver,
    logs_receiver: LogsReceiver,
    tmp_path: Path,
) -> None:
    """`hydra-otel run`'s spans, its own metrics and a failed step's log record all pass the collector.

    Spans reach Jaeger and the Tempo stand-in; the span metrics have one series per span type;
    hydra-otel's metrics appear on the Prometheus endpoint; the log record reaches the logs backend.
    """
    logs_dir = tmp_path / "build-logs"
    env = daemon_env(
        hydra_db,
        f"http://{collector.otlp_grpc}",
        tmp_path / "state",
        HYDRA_OTEL_METRICS_EXPORT="true",
        HYDRA_OTEL_METRICS_INTERVAL="3600",  # exported once, at the graceful stop
        HYDRA_OTEL_LOGS_EXPORT="true",
        HYDRA_OTEL_STEP_LOGS_DIR=str(logs_dir),
    )
    player = Player(hydra)
    async with daemon_processes(env) as spawn:
        daemon = await spawn()
        await daemon.wait_for("ready")
        _, (good, bad) = await player.evaluation(1, 2)
        log = trio.Path(hydra_log_path(str(logs_dir), hydra.sim.drvpaths[bad]))
        await log.parent.mkdir(parents=True)
        await log.write_bytes(b"compiling\nerror: builder for 'bad' failed with exit code 2\n")
        await player.finish(good)
        await player.finish(bad, status=1)
        expected = {s.hex() for _, s in player.expected.keys}
        with trio.fail_after(30):
            while {s.span.span_id.hex() for s in otlp_grpc.spans()} < expected:  # noqa: ASYNC110 - polls a receiver thread
                await trio.sleep(0.1)
        daemon.process.send_signal(signal.SIGTERM)  # a graceful stop flushes metrics and logs
        with trio.fail_after(30):
            assert await daemon.process.wait() == 0
    refused = [line for line in daemon.lines if line.get("level") in ("warning", "error")]
    assert refused == []

    with trio.fail_after(30):
        while not logs_receiver.records():  # noqa: ASYNC110 - polls a receiver thread
            await trio.sleep(0.1)
    (record,) = logs_receiver.records()
    assert "exit code 2" in record.body.string_value
    assert attributes_dict(record.attributes)["hydra.build.id"] == bad

    trace_ids = {t.hex() for t, _ in player.expected.keys}
    in_jaeger: set[str] = set()
    with trio.fail_after(30):
        while in_jaeger != expected:
            in_jaeger = {
                s["spanId"] for t in trace_ids for s in await trio.to_thread.run_sync(jaeger.trace, t)
            }
            await trio.sleep(0.2)

    with trio.fail_after(30):
        while "hydra_build_duration_seconds" not in (  # noqa: ASYNC110 - polls another process
            text := await trio.to_thread.run_sync(collector.metrics)
        ):
            await trio.sleep(0.5)
        while "hydra_traces_span_metrics_calls_total" not in text:
            await trio.sleep(0.5)
            text = await trio.to_thread.run_sync(collector.metrics)
    calls = [line for line in text.splitlines() if line.startswith("hydra_traces_span_metrics_calls_total{")]
    types = {m[1] for line in calls if (m := re.search(r'hydra_span_type="([^"]+)"', line))}
    assert types == {"evaluation", "checkout", "evaluate", "build", "queued", "step"}, calls
    assert not any("span_name=" in line for line in calls)
    # hydra-otel's own metrics keep their names (docs/collector.md).
    for name in ("cicd_pipeline_run_duration_seconds_count", "hydra_build_duration_seconds_count"):
        assert re.search(rf"^{name}{{.*}} \d", text, re.M), name


def test_health_check_answers(collector: Collector) -> None:
    """The health_check extension answers on its endpoint once the pipelines run."""
    assert http_json(collector.peer.health_url)["status"] == "Server available"
