"""Each OTEL_* variable of the OTel specification's OTLP exporter page: what hydra-otel does with it.

The list below is copied from the specification (protocol/exporter.md: nine options, each as a
general variable and one per signal) and its SDK environment-variable page (the switches that
apply to an exporter). docs/configuration.md's table (:func:`otel_variables`) must list exactly
these, and each row's claim is checked here against :func:`load` and the exporter settings the
daemon builds from it: honoured for the signals it names, or refused at start-up with a message
naming the variable. mTLS against real receivers is in tests/integration/test_otlp_tls.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from hydra_otel import cli
from hydra_otel.adapters.otlp import ExporterSettings, grpc_options, make_exporter
from hydra_otel.adapters.otlp_metrics import make_metric_exporter
from hydra_otel.adapters.steplogs import make_log_exporter
from hydra_otel.config import Config, OtlpProtocol, OtlpTarget, Signal, load, otel_variables
from hydra_otel.errors import ConfigError
from hydra_otel.pipeline.factories import export_settings

Env = dict[str, str]
OPTIONS = (
    "ENDPOINT",
    "INSECURE",
    "CERTIFICATE",
    "CLIENT_KEY",
    "CLIENT_CERTIFICATE",
    "HEADERS",
    "COMPRESSION",
    "TIMEOUT",
    "PROTOCOL",
)
SCOPES = {
    "": tuple(Signal),
    "TRACES_": (Signal.TRACES,),
    "METRICS_": (Signal.METRICS,),
    "LOGS_": (Signal.LOGS,),
}
SDK = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)
SPEC = {f"OTEL_EXPORTER_OTLP_{scope}{option}" for option in OPTIONS for scope in SCOPES} | set(SDK)


def refusal(env: Env) -> str:
    """The problems loading ``env`` reports, joined (fails if it loads)."""
    with pytest.raises(ConfigError) as info:
        load({}, env)
    return "\n".join(info.value.problems)


def target(config: Config, signal: Signal) -> OtlpTarget:
    """The configured OTLP target of ``signal``."""
    result: OtlpTarget = getattr(config.export, signal)
    return result


def test_table_lists_the_specification() -> None:
    """docs/configuration.md's table has one row for each variable of the specification, no more."""
    names = [name for name, _ in otel_variables()]
    assert len(names) == len(set(names))
    assert set(names) == SPEC


def _option_case(option: str, tmp_path: Path) -> tuple[Env, str, Callable[[OtlpTarget], object], object]:
    """(extra environment, value, what to read from a target, the value read when honoured)."""
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    field = {"CLIENT_KEY": "client_key", "CLIENT_CERTIFICATE": "client_certificate"}.get(
        option, option.lower()
    )

    def read(t: OtlpTarget) -> object:
        return getattr(t, field)

    cases: dict[str, tuple[Env, str, object]] = {
        "ENDPOINT": ({}, "http://collector.example:4317", "http://collector.example:4317"),
        # INSECURE decides only for a gRPC endpoint without a scheme.
        "INSECURE": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector.example:4317"}, "true", True),
        "CERTIFICATE": ({}, str(pem), pem),
        "CLIENT_KEY": ({}, str(pem), pem),
        "CLIENT_CERTIFICATE": ({}, str(pem), pem),
        "HEADERS": ({}, "x-api-key=abc", (("x-api-key", "abc"),)),
        "COMPRESSION": ({}, "gzip", "gzip"),
        "TIMEOUT": ({}, "1234", 1.234),
        "PROTOCOL": ({}, "http/protobuf", OtlpProtocol.HTTP_PROTOBUF),
    }
    env, value, expected = cases[option]
    return env, value, read, expected


def _partner(variable: str) -> str | None:
    """The other half of a client key pair, which must be set with it."""
    if variable.endswith("CLIENT_KEY"):
        return variable.removesuffix("KEY") + "CERTIFICATE"
    if variable.endswith("CLIENT_CERTIFICATE"):
        return variable.removesuffix("CERTIFICATE") + "KEY"
    return None


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_otlp_option_honoured_for_its_signals(scope: str, option: str, tmp_path: Path) -> None:
    """Each OTLP option's variable sets the signals it names and leaves the others as they were."""
    variable = f"OTEL_EXPORTER_OTLP_{scope}{option}"
    env, value, read, expected = _option_case(option, tmp_path)
    # Each signal with an endpoint of its own, so that a TRACES variable stays with traces.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **env, variable: value}
    if partner := _partner(variable):
        env[partner] = value
    before, after = load({}, {k: v for k, v in env.items() if k != variable and k != partner}), load({}, env)
    for signal in Signal:
        got = read(target(after, signal))
        if signal in SCOPES[scope]:
            assert got == expected, (signal, got)
        else:
            assert got == read(target(before, signal)), signal


@pytest.mark.parametrize(
    ("option", "bad", "reason"),
    [
        ("PROTOCOL", "http/json", "must be one of grpc, http/protobuf"),
        ("COMPRESSION", "brotli", "must be one of gzip, none"),
        ("TIMEOUT", "10s", "must be a whole number of milliseconds"),
        ("INSECURE", "yes", "must be true or false"),
        ("CERTIFICATE", "/nonexistent.pem", "must be an existing file"),
        ("ENDPOINT", "ftp://c", "must be an http(s) URL with a host, or for grpc host:port"),
        ("HEADERS", "no-equals-sign", "must be comma-separated name=value pairs"),
    ],
)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_otlp_option_bad_value_refused(option: str, bad: str, reason: str, scope: str) -> None:
    """A malformed value of any signal's variable stops start-up with a message naming the variable."""
    variable = f"OTEL_EXPORTER_OTLP_{scope}{option}"
    assert f"{variable}: {reason}" in refusal({variable: bad})


@pytest.mark.parametrize("scope", list(SCOPES))
def test_client_key_without_certificate_refused(scope: str, tmp_path: Path) -> None:
    """Half a client key pair is refused at start-up rather than sent without a client certificate."""
    key = tmp_path / "key.pem"
    key.write_text("k")
    assert (
        f"OTEL_EXPORTER_OTLP_{scope}CLIENT_KEY: must be set together with the client certificate"
        in refusal({f"OTEL_EXPORTER_OTLP_{scope}CLIENT_KEY": str(key)})
    )
    assert (
        f"OTEL_EXPORTER_OTLP_{scope}CLIENT_CERTIFICATE: must be set together with the client key"
        in refusal({f"OTEL_EXPORTER_OTLP_{scope}CLIENT_CERTIFICATE": str(key)})
    )


ENDPOINTS: list[tuple[Env, dict[Signal, str]]] = [
    (  # the general variable is a base URL for OTLP/HTTP ...
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4318/otlp/",
        },
        {s: f"https://c:4318/otlp/v1/{s}" for s in Signal},
    ),
    (  # ... and a per-signal variable is used as it is
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4318",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://m/custom",
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "https://l:4318",
        },
        {
            Signal.TRACES: "https://c:4318/v1/traces",
            Signal.METRICS: "https://m/custom",
            Signal.LOGS: "https://l:4318",
        },
    ),
    (  # gRPC: every signal on the one endpoint
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "l:4317"},
        {Signal.TRACES: "https://c:4317", Signal.METRICS: "https://c:4317", Signal.LOGS: "l:4317"},
    ),
    (  # without their own or the general variable, metrics and logs follow the traces' collector
        {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/v1/traces",
        },
        {
            Signal.TRACES: "http://t/v1/traces",
            Signal.METRICS: "http://t/v1/metrics",
            Signal.LOGS: "http://t/v1/logs",
        },
    ),
    (  # ... unless their protocol differs: then the specification's default for it
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf",
        },
        {
            Signal.TRACES: "http://t:4317",
            Signal.METRICS: "http://t:4317",
            Signal.LOGS: "http://localhost:4318/v1/logs",
        },
    ),
]


@pytest.mark.parametrize(("env", "expected"), ENDPOINTS)
def test_signal_endpoints(env: Env, expected: dict[Signal, str]) -> None:
    """Each signal's endpoint follows the specification's URL rules, and reaches its exporter's settings."""
    config = load({}, env)
    assert {s: target(config, s).endpoint for s in Signal} == expected
    assert {s: export_settings(config, s).endpoint for s in Signal} == expected


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "ENDPOINT"])
def test_traces_settings_follow_to_the_traces_collector(option: str, tmp_path: Path) -> None:
    """Metrics and logs without an endpoint variable go to the traces' collector with its settings."""
    env, value, read, expected = _option_case(option, tmp_path)
    variable = f"OTEL_EXPORTER_OTLP_TRACES_{option}"
    env = {**env, variable: value}
    if partner := _partner(variable):
        env[partner] = value
    if option == "INSECURE":
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = env.pop("OTEL_EXPORTER_OTLP_ENDPOINT")
    config = load({}, env)
    assert read(target(config, Signal.METRICS)) == read(target(config, Signal.LOGS)) == expected


def test_traces_headers_never_go_to_another_collector() -> None:
    """A signal with an endpoint of its own does not get the traces' headers, TLS files or timeout."""
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=tempo",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "100",
    }
    config = load({}, {**env, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://metrics.example:4317"})
    assert (target(config, Signal.METRICS).headers, target(config, Signal.METRICS).timeout) == ((), 5.0)
    assert target(config, Signal.LOGS).headers == (("authorization", "tempo"),)


def test_flags_apply_to_every_signal() -> None:
    """--otlp-protocol is the protocol of a signal whose variables do not say, wherever it goes."""
    config = load(
        {"otlp_protocol": "http/protobuf"}, {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/v1/metrics"}
    )
    assert target(config, Signal.METRICS).protocol is OtlpProtocol.HTTP_PROTOBUF


def test_flag_endpoint_carries_to_metrics_and_logs() -> None:
    """--otlp-endpoint sends all three signals to one collector unless a variable says otherwise."""
    config = load({"otlp_protocol": "http/protobuf", "otlp_endpoint": "http://flag:4318/v1/traces"}, {})
    assert target(config, Signal.METRICS).endpoint == "http://flag:4318/v1/metrics"
    assert target(config, Signal.LOGS).endpoint == "http://flag:4318/v1/logs"


def test_scheme_less_endpoint_refused_for_http() -> None:
    """host:port is gRPC's form; with http/protobuf it is refused, naming the variable."""
    problems = refusal(
        {
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "m:4318",
        }
    )
    assert (
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: must be an http(s) URL with http/protobuf, got 'm:4318'"
        in problems
    )


TLS_MODES: list[tuple[str, str | None, bool]] = [
    ("http://c:4317", "false", True),  # the scheme wins: plaintext
    ("http://c:4317", None, True),
    ("https://c:4317", "true", False),  # the scheme wins: TLS
    ("c:4317", "true", True),
    ("c:4317", "false", False),
    ("c:4317", None, False),  # the specification's default: secure
]


@pytest.mark.parametrize(("endpoint", "insecure", "plaintext"), TLS_MODES)
def test_insecure_only_without_a_scheme(endpoint: str, insecure: str | None, plaintext: bool) -> None:
    """OTEL_EXPORTER_OTLP_INSECURE decides only for a gRPC endpoint without a scheme; a scheme wins."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    if insecure is not None:
        env["OTEL_EXPORTER_OTLP_INSECURE"] = insecure
    config = load({}, env)
    for signal in Signal:
        assert target(config, signal).insecure is plaintext
        options = grpc_options(export_settings(config, signal))
        assert options.insecure is plaintext
        assert (options.credentials is None) is plaintext


def test_insecure_ignored_with_http_protobuf() -> None:
    """With http/protobuf the URL's scheme alone decides; INSECURE is read (and checked) but has no effect."""
    config = load(
        {}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_INSECURE": "false"}
    )
    assert target(config, Signal.TRACES).insecure is None
    assert target(config, Signal.TRACES).endpoint.startswith("http://")


def test_grpc_options_scheme_wins_over_insecure_false() -> None:
    """Settings saying insecure=False for an http:// endpoint still give a plaintext channel."""
    settings = ExporterSettings(
        protocol="grpc", endpoint="http://c:4317", headers={}, timeout_s=1, insecure=False
    )
    assert grpc_options(settings).insecure is True


def test_sdk_disabled_refused() -> None:
    """OTEL_SDK_DISABLED=true stops start-up with a message saying how to turn hydra-otel off."""
    problems = refusal({"OTEL_SDK_DISABLED": "TRUE"})
    assert "OTEL_SDK_DISABLED: is true" in problems
    assert "stop and disable its service" in problems
    assert load({}, {"OTEL_SDK_DISABLED": "false"}).export.traces.endpoint == "http://localhost:4317"
    assert "OTEL_SDK_DISABLED: must be true or false, got 'yes'" in refusal({"OTEL_SDK_DISABLED": "yes"})


@pytest.mark.parametrize("value", ["none", "console", "zipkin", "otlp,console"])
def test_traces_exporter_other_than_otlp_refused(value: str) -> None:
    """OTEL_TRACES_EXPORTER accepts only otlp: hydra-otel has nothing else to do."""
    assert "OTEL_TRACES_EXPORTER: must be otlp" in refusal({"OTEL_TRACES_EXPORTER": value})
    assert load({}, {"OTEL_TRACES_EXPORTER": "OTLP"}).export.traces.protocol is OtlpProtocol.GRPC


@pytest.mark.parametrize(
    ("variable", "switch", "field"),
    [
        ("OTEL_METRICS_EXPORTER", "HYDRA_OTEL_METRICS_EXPORT", "metrics_export"),
        ("OTEL_LOGS_EXPORTER", "HYDRA_OTEL_LOGS_EXPORT", "logs_export"),
    ],
)
def test_metrics_and_logs_exporter(variable: str, switch: str, field: str) -> None:
    """otlp leaves the switch in charge; none means off, and is refused with the switch on; others are refused."""
    assert getattr(load({}, {variable: "otlp", switch: "true"}).telemetry, field) is True
    assert getattr(load({}, {variable: "otlp"}).telemetry, field) is False
    assert getattr(load({}, {variable: "none"}).telemetry, field) is False
    assert f"{variable}: is none, but {switch} is true" in refusal({variable: "none", switch: "true"})
    for other in ("console", "prometheus", "otlp,console"):
        assert f"{variable}: must be otlp or none" in refusal({variable: other})


def test_service_name_and_resource_attributes() -> None:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES make the resource of every signal."""
    config = load(
        {}, {"OTEL_SERVICE_NAME": "ci", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod"}
    )
    assert config.export.resource == (("deployment.environment.name", "prod"), ("service.name", "ci"))


def test_every_signals_headers_are_secrets() -> None:
    """Header values of metrics and logs are redacted from logs like the traces'."""
    config = load(
        {},
        {
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "authorization=metricsecret",
            "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "k=logsecret",
        },
    )
    assert {"metricsecret", "logsecret"} <= set(config.secrets)
    assert "secret" not in repr(config)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_SDK_DISABLED": "true"}, "OTEL_SDK_DISABLED: is true"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER: must be otlp"),
    ],
)
def test_cli_refuses_before_touching_anything(
    env: Env, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`hydra-otel run` exits with code 2 (not restarted by systemd) and says why, before any connection."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HYDRA_OTEL_DATABASE_URL", "postgresql://nowhere.invalid/hydra")
    assert cli.main(["run"]) == 2
    assert message in capsys.readouterr().err


def test_grpc_exporters_read_no_variable_behind_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the configuration decided is what the SDK's gRPC exporters use, not their own reading.

    ``compression=None`` made the SDK fall back to OTEL_EXPORTER_OTLP_COMPRESSION, over a signal's own
    ``none``.
    """
    env = {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"} | {
        f"OTEL_EXPORTER_OTLP_{s}_COMPRESSION": "none" for s in ("TRACES", "METRICS", "LOGS")
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = load({}, env)
    exporters = [
        make_exporter(export_settings(config)),
        make_metric_exporter(export_settings(config, Signal.METRICS), config.export.metrics.endpoint),
        make_log_exporter(export_settings(config, Signal.LOGS), config.export.logs.endpoint),
    ]
    try:
        for exporter in exporters:
            assert exporter._compression is grpc.Compression.NoCompression  # type: ignore[union-attr]
    finally:
        for exporter in exporters:
            exporter.shutdown()
