"""TLS and mutual TLS, configured through the OTEL_* variables, against receivers that require them.

Certificates are made per test module (tests/tls_certs.py). The configuration is loaded from an
environment as the daemon loads it, and the exporters are built by the daemon's own factories
(pipeline.factories: make_sink, make_metrics, make_step_logs), so what is checked is the path from variable to
TLS handshake. Each receiver asks for a client certificate signed by the test CA: an export
without one must fail, one with it must arrive.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hydra_otel.config import Config, load
from hydra_otel.core.builds import build_spans, step_span
from hydra_otel.core.cicd_metrics import BUILD_DURATION, MetricDeriver
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver, TraceSink
from hydra_otel.pipeline.factories import make_metrics, make_sink, make_step_logs
from tests.core.test_cicd_metrics import BUILD, CFG, STEPS
from tests.metrics_logs_receiver import GrpcMetricsLogsReceiver, histogram_points
from tests.test_steplogs import BUILD as LOG_BUILD
from tests.test_steplogs import CFG as LOG_CFG
from tests.test_steplogs import LINES, STEP, write_log
from tests.tls_certs import Certs, make_certs

Env = dict[str, str]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(autouse=True)
def foreign_ca_bundle(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA bundle in the environment that does not hold the test CA, as NixOS sets one system-wide.

    requests would prefer it to the exporter's own CA file; OTEL_EXPORTER_OTLP_CERTIFICATE must win.
    """
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(variable, str(certs.client_cert))


def tls_env(certs: Certs, prefix: str = "OTEL_EXPORTER_OTLP_", *, client: bool = True) -> Env:
    """The variables that trust the test CA and, if ``client``, present the client certificate."""
    env = {f"{prefix}CERTIFICATE": str(certs.ca)}
    if client:
        env |= {
            f"{prefix}CLIENT_KEY": str(certs.client_key),
            f"{prefix}CLIENT_CERTIFICATE": str(certs.client_cert),
        }
    return env


@pytest.fixture(params=["grpc", "http/protobuf"])
def mtls_receiver(
    request: pytest.FixtureRequest, certs: Certs
) -> Iterator[tuple[str, str, TraceSink[object]]]:
    """(protocol, traces endpoint, receiver) of a trace receiver that requires a client certificate."""
    tls = certs.server(require_client=True)
    if request.param == "grpc":
        with GrpcOtlpReceiver(tls=tls) as grpc_receiver:
            yield "grpc", grpc_receiver.endpoint, grpc_receiver
    else:
        with HttpOtlpReceiver(tls=tls) as http_receiver:
            yield "http/protobuf", http_receiver.traces_url, http_receiver  # type: ignore[misc]


def traces_config(protocol: str, endpoint: str, env: Env) -> Config:
    """The daemon's configuration for these traces variables (1 s timeout, so failures are quick)."""
    return load(
        {},
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
            **env,
        },
    )


async def export_traces(config: Config) -> bool:
    """Export one build's spans through the daemon's sink; True when acknowledged."""
    sink = make_sink(config)
    try:
        with trio.fail_after(20):
            return (await sink.export(build_spans(CFG, BUILD, STEPS))).done
    finally:
        sink.shutdown()


@pytest.mark.parametrize("scope", ["", "TRACES_"])
async def test_traces_mtls(
    certs: Certs, mtls_receiver: tuple[str, str, TraceSink[object]], scope: str
) -> None:
    """OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_KEY/_CLIENT_CERTIFICATE reach the handshake, over gRPC and HTTP."""
    protocol, endpoint, receiver = mtls_receiver
    config = traces_config(protocol, endpoint, tls_env(certs, f"OTEL_EXPORTER_OTLP_{scope}"))
    assert await export_traces(config)
    assert len(receiver.spans()) == len(build_spans(CFG, BUILD, STEPS))


async def test_traces_without_client_certificate_fail(
    certs: Certs, mtls_receiver: tuple[str, str, TraceSink[object]]
) -> None:
    """The receiver does require the client certificate: trusting its CA alone is not enough."""
    protocol, endpoint, receiver = mtls_receiver
    assert not await export_traces(traces_config(protocol, endpoint, tls_env(certs, client=False)))
    assert receiver.spans() == []


async def test_tls_without_client_certificate_when_not_required(certs: Certs) -> None:
    """Plain TLS with OTEL_EXPORTER_OTLP_CERTIFICATE alone, over gRPC."""
    with GrpcOtlpReceiver(tls=certs.server(require_client=False)) as receiver:
        assert await export_traces(traces_config("grpc", receiver.endpoint, tls_env(certs, client=False)))
        assert receiver.spans()


@pytest.fixture
def mtls_metrics_logs(certs: Certs) -> Iterator[GrpcMetricsLogsReceiver]:
    """An OTLP/gRPC metrics and logs receiver that requires a client certificate."""
    with GrpcMetricsLogsReceiver(tls=certs.server(require_client=True)) as receiver:
        yield receiver


def signals_config(certs: Certs, receiver: GrpcMetricsLogsReceiver, tmp_path: Path) -> Config:
    """Traces to a dead port; metrics and logs, each by its own variables only, to the mTLS receiver."""
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"}
    for signal in ("METRICS", "LOGS"):
        prefix = f"OTEL_EXPORTER_OTLP_{signal}_"
        env |= {f"{prefix}ENDPOINT": receiver.endpoint, **tls_env(certs, prefix)}
    env |= {"HYDRA_OTEL_METRICS_EXPORT": "true", "HYDRA_OTEL_LOGS_EXPORT": "true"}
    return load({"step_logs_dir": str(tmp_path)}, env)


async def test_metrics_by_their_own_variables_over_mtls(
    certs: Certs, mtls_metrics_logs: GrpcMetricsLogsReceiver, tmp_path: Path
) -> None:
    """OTEL_EXPORTER_OTLP_METRICS_* alone send the CI/CD metrics to their collector, with mTLS."""
    sink = make_metrics(signals_config(certs, mtls_metrics_logs, tmp_path))
    sink.record(MetricDeriver().observe(build_spans(CFG, BUILD, STEPS)))
    with trio.fail_after(20):
        assert await sink.force_flush()
        await mtls_metrics_logs.wait_until(lambda: bool(mtls_metrics_logs.metrics()))
        await sink.shutdown()
    assert histogram_points(mtls_metrics_logs.metrics(), BUILD_DURATION)[0].count == 1


async def test_logs_by_their_own_variables_over_mtls(
    certs: Certs, mtls_metrics_logs: GrpcMetricsLogsReceiver, tmp_path: Path
) -> None:
    """OTEL_EXPORTER_OTLP_LOGS_* alone send failed-step log tails to their collector, with mTLS."""
    write_log(tmp_path, LINES, ".bz2")
    logs = make_step_logs(signals_config(certs, mtls_metrics_logs, tmp_path))
    assert logs is not None
    assert logs.sink is not None
    failed = step_span(LOG_CFG, LOG_BUILD, STEP, 0)
    assert await logs.process([failed]) == [failed]  # the tail went as a log record
    with trio.fail_after(20):
        assert await logs.sink.force_flush()
        await logs.aclose()
        await mtls_metrics_logs.wait_until(lambda: bool(mtls_metrics_logs.logs()))
    assert mtls_metrics_logs.logs()[0].record.span_id == failed.span_id.to_bytes(8, "big")


@pytest.mark.parametrize(
    ("form", "insecure", "delivered"),
    [
        ("host:port", "true", True),  # INSECURE decides for an endpoint without a scheme ...
        ("host:port", None, False),  # ... and TLS is the default, which a plaintext receiver refuses
        ("http://", "false", True),  # the scheme wins over INSECURE
    ],
)
async def test_insecure_against_a_plaintext_receiver(
    form: str, insecure: str | None, delivered: bool
) -> None:
    """OTEL_EXPORTER_OTLP_INSECURE as the specification says, against a real plaintext gRPC receiver."""
    with GrpcOtlpReceiver() as receiver:
        endpoint = receiver.endpoint if form == "host:port" else f"http://{receiver.endpoint}"
        env = {} if insecure is None else {"OTEL_EXPORTER_OTLP_INSECURE": insecure}
        assert await export_traces(traces_config("grpc", endpoint, env)) is delivered
        assert bool(receiver.spans()) is delivered
