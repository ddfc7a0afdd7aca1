"""Table tests of hydra_otel.config: precedence, conversions, validation, redaction and the generated docs."""

from __future__ import annotations

import argparse
from operator import attrgetter
from pathlib import Path

import pytest

from hydra_otel.config import (
    SETTINGS,
    Compression,
    Config,
    LogLevel,
    OtlpProtocol,
    add_arguments,
    load,
    render_reference,
)
from hydra_otel.dsn import has_userinfo, redacted_dsn, url_secrets
from hydra_otel.errors import ConfigError

Flags = dict[str, str | None]
Env = dict[str, str]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
APP = "application_name=hydra-otel"


def problems_of(flags: Flags, env: Env) -> list[str]:
    """Return the problems that loading ``flags`` and ``env`` reports."""
    with pytest.raises(ConfigError) as info:
        load(flags, env)
    return info.value.problems


def test_defaults() -> None:
    """With no flags and an empty environment every setting takes its documented default."""
    c = load({}, {})
    assert (c.db.url, c.db.source) == (f"postgresql:///hydra?{APP}", "default")
    assert (c.stitch.instance, c.stitch.hydra_url) == ("hydra", "http://localhost:3000")
    assert (c.stitch.abandon_after, c.stitch.max_open_evals, c.stitch.error_text_limit) == (7200, 10000, 4096)
    assert (c.export.protocol, c.export.endpoint, c.export.timeout) == ("grpc", "http://localhost:4317", 5.0)
    assert (c.export.headers, c.export.certificate, c.export.insecure) == ((), None, None)
    assert (c.export.compression, c.export.batch_size, c.export.delay) == (Compression.NONE, 512, 1.0)
    assert (c.export.max_backoff, c.export.resource) == (30.0, (("service.name", "hydra-otel"),))
    assert (c.state_dir, c.log_level) == (Path("/var/lib/hydra-otel"), LogLevel.INFO)
    assert (c.shutdown_grace, c.queue_size) == (10.0, 100000)


PRECEDENCE: list[tuple[Flags, Env, str, object]] = [
    ({}, {"HYDRA_OTEL_MAX_OPEN_EVALS": "5"}, "stitch.max_open_evals", 5),
    ({"max_open_evals": "7"}, {"HYDRA_OTEL_MAX_OPEN_EVALS": "5"}, "stitch.max_open_evals", 7),
    ({"max_open_evals": None}, {"HYDRA_OTEL_MAX_OPEN_EVALS": "5"}, "stitch.max_open_evals", 5),
    ({}, {"HYDRA_OTEL_MAX_OPEN_EVALS": ""}, "stitch.max_open_evals", 10000),
    ({"unrelated_cli_option": "x"}, {}, "queue_size", 100000),
    ({"hydra_url": "https://hydra.example/"}, {}, "stitch.hydra_url", "https://hydra.example"),
    ({}, {"HYDRA_OTEL_INSTANCE": "nixos.org"}, "stitch.instance", "nixos.org"),
    ({}, {"HYDRA_OTEL_EVAL_ABANDON_AFTER": "90.5"}, "stitch.abandon_after", 90.5),
    ({}, {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "state_dir", Path("/var/lib/a")),
    ({}, {"HYDRA_OTEL_STATE_DIR": "/srv/o", "STATE_DIRECTORY": "/var/lib/a"}, "state_dir", Path("/srv/o")),
    ({"state_dir": "/flag"}, {"HYDRA_OTEL_STATE_DIR": "/srv/o"}, "state_dir", Path("/flag")),
    ({"log_level": "DEBUG"}, {"HYDRA_OTEL_LOG_LEVEL": "error"}, "log_level", LogLevel.DEBUG),
    ({}, {"HYDRA_OTEL_SHUTDOWN_GRACE": "2.5", "HYDRA_OTEL_QUEUE_SIZE": "1"}, "shutdown_grace", 2.5),
    ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "export.protocol", OtlpProtocol.HTTP_PROTOBUF),
    (
        {},
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        "export.protocol",
        OtlpProtocol.GRPC,
    ),
    ({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, "export.timeout", 2.5),
    (
        {},
        {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "9"},
        "export.timeout",
        0.1,
    ),
    ({}, {"OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP"}, "export.compression", Compression.GZIP),
    ({"export_batch_size": "10000"}, {}, "export.batch_size", 10000),
    ({"export_delay": "60"}, {}, "export.delay", 60.0),
    ({}, {"HYDRA_OTEL_EXPORT_MAX_BACKOFF": "5"}, "export.max_backoff", 5.0),
    ({}, {"OTEL_EXPORTER_OTLP_INSECURE": "TRUE"}, "export.insecure", True),
    ({}, {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false"}, "export.insecure", False),
    (
        {"otlp_protocol": "http/protobuf"},
        {"OTEL_EXPORTER_OTLP_INSECURE": "true"},
        "export.insecure",
        None,
    ),
]


@pytest.mark.parametrize(("flags", "env", "path", "expected"), PRECEDENCE)
def test_precedence(flags: Flags, env: Env, path: str, expected: object) -> None:
    """A flag beats an environment variable, which beats the default; empty variables count as unset."""
    assert attrgetter(path)(load(flags, env)) == expected


DATABASE: list[tuple[Flags, Env, str, str]] = [
    ({}, {"HYDRA_DATABASE_URL": "postgres:///hydra"}, f"postgres:///hydra?{APP}", "HYDRA_DATABASE_URL"),
    (
        {},
        {
            "HYDRA_OTEL_DATABASE_URL": "postgresql://a/x",
            "HYDRA_DATABASE_URL": "postgres://b/y",
            "HYDRA_DBI": "dbi:Pg:",
        },
        f"postgresql://a/x?{APP}",
        "HYDRA_OTEL_DATABASE_URL",
    ),
    (
        {},
        {"HYDRA_DATABASE_URL": "postgres://b/y", "HYDRA_DBI": "dbi:Pg:dbname=z"},
        f"postgres://b/y?{APP}",
        "HYDRA_DATABASE_URL",
    ),
    (
        {"database_url": "postgresql://flag/db"},
        {"HYDRA_OTEL_DATABASE_URL": "postgresql://a/x"},
        f"postgresql://flag/db?{APP}",
        "--database-url",
    ),
    (
        {"database_url": "postgresql://h/db?sslmode=require"},
        {},
        f"postgresql://h/db?sslmode=require&{APP}",
        "--database-url",
    ),
    (
        {"database_url": "postgresql://h/db?application_name=me"},
        {},
        "postgresql://h/db?application_name=me",
        "--database-url",
    ),
]


@pytest.mark.parametrize(("flags", "env", "url", "source"), DATABASE)
def test_database_url_resolution(flags: Flags, env: Env, url: str, source: str) -> None:
    """The URL comes from the first source set, gains application_name and records where it came from."""
    db = load(flags, env).db
    assert (db.url, db.source) == (url, source)


DBI: list[tuple[str, str]] = [
    ("dbi:Pg:dbname=hydra;", f"postgresql:///hydra?{APP}"),
    (
        "dbi:Pg:dbname=hydra;host=db.example;port=5433;user=hydra;password=s3cr%t",
        f"postgresql://hydra:s3cr%25t@db.example:5433/hydra?{APP}",
    ),
    (
        "DBI:Pg:database=hydra;host=/run/postgresql;port=5433",
        f"postgresql:///hydra?host=/run/postgresql&port=5433&{APP}",
    ),
    ("dbi:Pg:db=hydra;user=hydra;sslmode=require", f"postgresql://hydra@/hydra?sslmode=require&{APP}"),
    ("dbi:Pg:dbname='my db';user=u;password='a;b\\'c'", f"postgresql://u:a%3Bb%27c@/my%20db?{APP}"),
    ('dbi:Pg:dbname="hydra";host=::1', f"postgresql://[::1]/hydra?{APP}"),
    ("dbi:Pg:dbname = hydra ; host = h", f"postgresql://h/hydra?{APP}"),
    (
        "dbi:Pg:dbname=hydra;application_name=hydra-notify",
        "postgresql:///hydra?application_name=hydra-notify",
    ),
    ("dbi:Pg:", f"postgresql://?{APP}"),
]


@pytest.mark.parametrize(("dbi", "url"), DBI)
def test_hydra_dbi_conversion(dbi: str, url: str) -> None:
    """Legacy HYDRA_DBI data sources are read as DBD::Pg reads them and turned into equivalent URLs."""
    db = load({}, {"HYDRA_DBI": dbi}).db
    assert (db.url, db.source) == (url, "HYDRA_DBI")


ENDPOINTS: list[tuple[Flags, Env, str]] = [
    ({"otlp_protocol": "http/protobuf"}, {}, "http://localhost:4318/v1/traces"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"}, "https://c:4317"),
    (
        {"otlp_protocol": "http/protobuf"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
        "http://c:4318/v1/traces",
    ),
    (
        {"otlp_protocol": "http/protobuf"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c/otlp/"},
        "http://c/otlp/v1/traces",
    ),
    (
        {"otlp_protocol": "http/protobuf"},
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
        },
        "http://c:4318/custom",
    ),
    (
        {"otlp_protocol": "http/protobuf", "otlp_endpoint": "http://flag:4318"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"},
        "http://flag:4318",
    ),
]


@pytest.mark.parametrize(("flags", "env", "endpoint"), ENDPOINTS)
def test_otlp_endpoint(flags: Flags, env: Env, endpoint: str) -> None:
    """Only the generic OTEL_EXPORTER_OTLP_ENDPOINT gets /v1/traces appended, and only for http/protobuf."""
    assert load(flags, env).export.endpoint == endpoint


PAIRS: list[tuple[Env, str, tuple[tuple[str, str], ...]]] = [
    (
        {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc%20def, X-Tenant = t1"},
        "headers",
        (("api-key", "abc def"), ("x-tenant", "t1")),
    ),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "a=1,,b=2,"}, "headers", (("a", "1"), ("b", "2"))),
    (
        {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Basic%20dXM6cA=="},
        "headers",
        (("authorization", "Basic dXM6cA=="),),
    ),
    (
        {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=1", "OTEL_EXPORTER_OTLP_HEADERS": "b=2"},
        "headers",
        (("a", "1"),),
    ),
    (
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=x,deployment.environment=prod%2Feu"},
        "resource",
        (("deployment.environment", "prod/eu"), ("service.name", "x")),
    ),
    (
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=x", "OTEL_SERVICE_NAME": "y"},
        "resource",
        (("service.name", "y"),),
    ),
    ({"OTEL_SERVICE_NAME": "hydra-otel-staging"}, "resource", (("service.name", "hydra-otel-staging"),)),
]


@pytest.mark.parametrize(("env", "field", "expected"), PAIRS)
def test_headers_and_resource(env: Env, field: str, expected: tuple[tuple[str, str], ...]) -> None:
    """Headers and resource attributes are URL-decoded k=v lists; OTEL_SERVICE_NAME wins for service.name."""
    assert getattr(load({}, env).export, field) == expected


def test_certificate_that_exists(tmp_path: Path) -> None:
    """An existing certificate file is accepted and kept as a path."""
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    assert load({}, {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(pem)}).export.certificate == pem


INVALID: list[tuple[Flags, Env, str]] = [
    ({}, {"HYDRA_OTEL_MAX_OPEN_EVALS": "x"}, "HYDRA_OTEL_MAX_OPEN_EVALS: must be an integer ≥ 1, got 'x'"),
    ({"max_open_evals": "0"}, {}, "--max-open-evals: must be an integer ≥ 1, got '0'"),
    (
        {},
        {"HYDRA_OTEL_ERROR_TEXT_LIMIT": "63"},
        "HYDRA_OTEL_ERROR_TEXT_LIMIT: must be an integer between 64 and 1000000, got '63'",
    ),
    (
        {"error_text_limit": "1000001"},
        {},
        "--error-text-limit: must be an integer between 64 and 1000000, got '1000001'",
    ),
    ({"export_delay": "0"}, {}, "--export-delay: must be a number of seconds > 0 and ≤ 60, got '0'"),
    ({"export_delay": "61"}, {}, "--export-delay: must be a number of seconds > 0 and ≤ 60, got '61'"),
    ({"export_delay": "nan"}, {}, "--export-delay: must be a number of seconds > 0 and ≤ 60, got 'nan'"),
    (
        {},
        {"HYDRA_OTEL_EVAL_ABANDON_AFTER": "inf"},
        "HYDRA_OTEL_EVAL_ABANDON_AFTER: must be a number of seconds > 0, got 'inf'",
    ),
    ({"eval_abandon_after": "-1"}, {}, "--eval-abandon-after: must be a number of seconds > 0, got '-1'"),
    ({"shutdown_grace": "10s"}, {}, "--shutdown-grace: must be a number of seconds > 0, got '10s'"),
    ({"export_max_backoff": "0"}, {}, "--export-max-backoff: must be a number of seconds > 0, got '0'"),
    ({"queue_size": "0"}, {}, "--queue-size: must be an integer ≥ 1, got '0'"),
    (
        {"export_batch_size": "10001"},
        {},
        "--export-batch-size: must be an integer between 1 and 10000, got '10001'",
    ),
    ({"log_level": "verbose"}, {}, "--log-level: must be one of debug, info, warning, error, got 'verbose'"),
    (
        {"otlp_protocol": "http/json"},
        {},
        "--otlp-protocol: must be one of grpc, http/protobuf, got 'http/json'",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"},
        "OTEL_EXPORTER_OTLP_COMPRESSION: must be one of gzip, none, got 'brotli'",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_INSECURE": "yes"},
        "OTEL_EXPORTER_OTLP_INSECURE: must be true or false, got 'yes'",
    ),
    (
        {"otlp_endpoint": "https://c:4317"},
        {"OTEL_EXPORTER_OTLP_INSECURE": "true"},
        "OTEL_EXPORTER_OTLP_INSECURE: must not be true with an https endpoint",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "1.5"},
        "OTEL_EXPORTER_OTLP_TIMEOUT: must be a whole number of milliseconds between 1 and 600000, got '1.5'",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
        "OTEL_EXPORTER_OTLP_CERTIFICATE: must be an existing file, got '/nonexistent/ca.pem' (no such file)",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"},
        "OTEL_EXPORTER_OTLP_ENDPOINT: must be an http(s) URL with a host, got 'localhost:4317'",
    ),
    (
        {"hydra_url": "ftp://hydra"},
        {},
        "--hydra-url: must be an http(s) URL with a host, no query or fragment, got 'ftp://hydra'",
    ),
    (
        {"hydra_url": "http://h/?q=1"},
        {},
        "--hydra-url: must be an http(s) URL with a host, no query or fragment, got 'http://h/?q=1'"
        " (no query or fragment allowed)",
    ),
    (
        {"instance": ""},
        {},
        "--instance: must be 1 to 64 printable ASCII characters, no surrounding spaces, got ''",
    ),
    (
        {},
        {"HYDRA_OTEL_INSTANCE": "h" * 65},
        "HYDRA_OTEL_INSTANCE: must be 1 to 64 printable ASCII characters, no surrounding spaces,"
        f" got '{'h' * 65}'",
    ),
    (
        {"instance": "héllo"},
        {},
        "--instance: must be 1 to 64 printable ASCII characters, no surrounding spaces, got 'héllo'",
    ),
    (
        {"instance": " hydra"},
        {},
        "--instance: must be 1 to 64 printable ASCII characters, no surrounding spaces, got ' hydra'",
    ),
    ({}, {"HYDRA_OTEL_STATE_DIR": "state"}, "HYDRA_OTEL_STATE_DIR: must be an absolute path, got 'state'"),
    (
        {"database_url": "mysql://u:hunter2@h/db"},
        {},
        "--database-url: must be a postgresql:// URL, or for HYDRA_DBI a dbi:Pg: data source,"
        " got 'mysql://u:***@h/db' (the scheme must be postgresql:// or postgres://)",
    ),
    (
        {},
        {"HYDRA_DBI": "dbi:mysql:database=hydra"},
        "HYDRA_DBI: must be a postgresql:// URL, or for HYDRA_DBI a dbi:Pg: data source,"
        " got 'dbi:mysql:database=hydra' (it does not start with dbi:Pg:)",
    ),
    (
        {},
        {"HYDRA_DBI": "dbi:Pg:dbname=hydra;password='hunter2"},
        "HYDRA_DBI: must be a postgresql:// URL, or for HYDRA_DBI a dbi:Pg: data source,"
        " got 'dbi:Pg:dbname=hydra;password=***' (cannot parse it after 1 key=value pair(s))",
    ),
    (
        {},
        {"HYDRA_DBI": "dbi:Pg:port=abc"},
        "HYDRA_DBI: must be a postgresql:// URL, or for HYDRA_DBI a dbi:Pg: data source,"
        " got 'dbi:Pg:port=abc' (port is not a number)",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_HEADERS": "a=1,Bearer hunter2"},
        "OTEL_EXPORTER_OTLP_HEADERS: must be comma-separated name=value pairs, URL-encoded,"
        " got (value hidden) (entry 2 is not key=value)",
    ),
    (
        {},
        {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x token=hunter2"},
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS: must be comma-separated name=value pairs, URL-encoded,"
        " got (value hidden) (entry 1 has an invalid header name)",
    ),
    (
        {},
        {"OTEL_RESOURCE_ATTRIBUTES": "=x"},
        "OTEL_RESOURCE_ATTRIBUTES: must be comma-separated key=value pairs, URL-encoded, got '=x'"
        " (entry 1 is not key=value)",
    ),
]


@pytest.mark.parametrize(("flags", "env", "problem"), INVALID)
def test_invalid(flags: Flags, env: Env, problem: str) -> None:
    """Each invalid value is reported as exactly one problem naming the flag or variable it came from."""
    assert problems_of(flags, env) == [problem]


def test_several_problems_reported_together() -> None:
    """All problems are collected into one ConfigError instead of stopping at the first."""
    env = {"HYDRA_OTEL_MAX_OPEN_EVALS": "x", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}
    with pytest.raises(ConfigError) as info:
        load({"queue_size": "0", "log_level": "loud"}, env)
    origins = [p.split(":", 1)[0] for p in info.value.problems]
    assert origins == [
        "HYDRA_OTEL_MAX_OPEN_EVALS",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "--log-level",
        "--queue-size",
    ]
    assert all(p in str(info.value) for p in info.value.problems)


REDACTED: list[tuple[str, str]] = [
    ("postgresql://hydra:s3cret@db/hydra", "postgresql://hydra:***@db/hydra"),
    ("postgresql://hydra@db/hydra", "postgresql://hydra@db/hydra"),
    ("postgresql://db:5432/hydra", "postgresql://db:5432/hydra"),
    (
        "postgresql:///hydra?user=h&password=s3cret&sslmode=require",
        "postgresql:///hydra?user=h&password=***&sslmode=require",
    ),
    ("postgresql://u:p%40ss@h/db?sslpassword=k", "postgresql://u:***@h/db?sslpassword=***"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
    ("dbi:Pg:dbname=hydra;password='a b;c';host=h", "dbi:Pg:dbname=hydra;password=***;host=h"),
    # Unencoded reserved characters in the password: still masked, whatever a URL parser makes of them.
    ("postgresql://u:pa?ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:pa#ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:p?a/s#s@h:5432/db?sslmode=require", "postgresql://u:***@h:5432/db?sslmode=require"),
    (
        "postgres://u:12?x=y@h/db&application_name=hydra-otel",
        "postgres://u:***@h/db&application_name=hydra-otel",
    ),
]


@pytest.mark.parametrize(("url", "expected"), REDACTED)
def test_redacted_dsn(url: str, expected: str) -> None:
    """Passwords in the userinfo or in password= parameters are replaced by ***, the rest is kept."""
    assert redacted_dsn(url) == expected


URL_SECRETS: list[tuple[str, list[str]]] = [
    ("postgresql://u:s3cret@h/db", ["s3cret"]),
    ("postgresql://u:p%3Fss@h/db", ["p%3Fss", "p?ss"]),
    ("postgresql://u:pa?ss@h/db", ["pa?ss"]),
    ("postgresql:///db?password=s3cret&sslpassword='k e y'", ["s3cret", "k e y"]),
    ("postgresql://u@h/db", []),
    ("postgresql://h:5432/db", []),
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:p@collector:4317", True),
        ("https://u@collector", True),
        ("http://u:pa?ss@collector", True),
        ("http://u:pa/ss@collector", True),
        ("http://u:pa#ss@collector/v1/traces", True),
        ("https://collector:4317/v1/traces", False),
        ("https://collector/path?x=a@b", False),
    ],
)
def test_has_userinfo(url: str, expected: bool) -> None:
    """A user:password part is found also when an unencoded '/', '?' or '#' hides it from urlsplit."""
    assert has_userinfo(url) is expected


@pytest.mark.parametrize(("url", "expected"), URL_SECRETS)
def test_url_secrets(url: str, expected: list[str]) -> None:
    """The log redactor is given every password, as written and percent-decoded, even in a malformed URL."""
    assert sorted(url_secrets(url)) == sorted(expected)


REFUSED_URLS: list[tuple[str, str]] = [
    ("postgresql://u:hun?ter2@h/db", "an '@' that does not end"),
    ("postgresql://u:hun#ter2@h/db", "has a '#'"),
    ("postgresql://u:hun/ter2@h/db", "an '@' that does not end"),
    ("postgresql://u:hun@ter2@h/db", "an '@' that does not end"),
    ("postgresql://h:5432x/db", "a port is not a number"),
    ("postgresql://h:99/a/b", "the database name has a '/'"),
    ("postgresql://h/db?x y=1", "a query parameter name is not a name"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_URLS)
def test_malformed_database_urls_refused(url: str, reason: str) -> None:
    """URLs that parsers read differently are refused with a hint to percent-encode, never quoting the password."""
    (problem,) = problems_of({"database_url": url}, {})
    assert reason in problem
    assert "percent-encode" in problem
    assert "ter2" not in problem


ACCEPTED_URLS = [
    "postgresql://u:p%40s%2Fs%3F%23@h:5432/db",
    "postgresql://[::1]:5432/db",
    "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",
    "postgresql:///db?host=/run/postgresql",
    "postgres://u@/db?options=-c%20search_path%3Dhydra",
]


@pytest.mark.parametrize("url", ACCEPTED_URLS)
def test_well_formed_database_urls_accepted(url: str) -> None:
    """Percent-encoded passwords, IPv6 hosts, host lists and socket directories stay accepted."""
    assert load({"database_url": url}, {}).db.url.startswith(url)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:hunter2@otlp.example:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://u:hun?ter2@c:4318/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:hun/ter2@c:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"HYDRA_OTEL_HYDRA_URL": "https://admin:hunter2@hydra.example"}, "HYDRA_OTEL_HYDRA_URL"),
    ],
)
def test_credentials_in_urls_refused(env: Env, variable: str) -> None:
    """User and password in the OTLP endpoint or Hydra's URL are refused, pointing at the headers variable."""
    (problem,) = problems_of({}, env)
    assert problem.startswith(f"{variable}: ")
    assert "OTEL_EXPORTER_OTLP_HEADERS" in problem
    assert "ter2" not in problem


def test_config_collects_secrets() -> None:
    """The configuration hands the log redactor the database password, header values and PGPASSWORD."""
    env = {
        "HYDRA_OTEL_DATABASE_URL": "postgresql://u:pw%3F1@h/db",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20tok3n",
        "PGPASSWORD": "pgpass-value",
    }
    config = load({}, env)
    assert set(config.secrets) == {"pw%3F1", "pw?1", "Bearer tok3n", "pgpass-value"}
    assert "tok3n" not in repr(config)


SECRET_SOURCES: list[Env] = [
    {"HYDRA_DATABASE_URL": "postgresql://hydra:hunter2@db/hydra"},
    {"HYDRA_OTEL_DATABASE_URL": "postgresql:///hydra?password=hunter2"},
    {"HYDRA_DBI": "dbi:Pg:dbname=hydra;user=hydra;password=hunter2"},
    {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20hunter2"},
]


@pytest.mark.parametrize("env", SECRET_SOURCES)
def test_secrets_not_in_repr(env: Env) -> None:
    """Neither database passwords nor header values appear in repr() of the configuration."""
    config = load({}, env)
    assert "hunter2" not in repr(config)
    assert "hunter2" in config.db.url + repr(config.export.headers)


SECRET_ERRORS: list[Env] = [
    {"HYDRA_DATABASE_URL": "mysql://hydra:hunter2@db/hydra"},
    {"HYDRA_OTEL_DATABASE_URL": "mysql:///hydra?password=hunter2"},
    {"HYDRA_DBI": "dbi:Pg:dbname=hydra;password=hunter2;port=x"},
    {"HYDRA_DBI": "dbi:Pg:dbname=hydra;password = 'hunter2"},
    {"HYDRA_DBI": "dbi:Pg:password=hun\\ ter2 oops"},
    {"OTEL_EXPORTER_OTLP_HEADERS": "hunter2"},
    {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20hunter2,x y=hunter2"},
]


@pytest.mark.parametrize("env", SECRET_ERRORS)
def test_secrets_not_in_errors(env: Env) -> None:
    """An invalid value that holds a password or header value is reported without showing it."""
    problems = problems_of({}, env)
    assert len(problems) == 1
    assert "hunter2" not in problems[0]
    assert "ter2" not in problems[0]


def test_add_arguments_declares_every_flag() -> None:
    """add_arguments declares exactly the table's flags, as unset strings that load then validates."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert vars(parser.parse_args([])) == {s.key: None for s in SETTINGS if s.flag}
    assert "--otlp-protocol" in parser.format_help()
    args = parser.parse_args(["--max-open-evals", "5", "--otlp-protocol", "http/protobuf"])
    config: Config = load(vars(args), {})
    assert (config.stitch.max_open_evals, config.export.protocol) == (5, OtlpProtocol.HTTP_PROTOBUF)


def test_docs_match_table() -> None:
    """docs/configuration.md is exactly what render_reference() generates from the table."""
    assert DOCS.read_text(encoding="utf-8") == render_reference(), (
        "docs/configuration.md is stale: run `python -m hydra_otel.config > docs/configuration.md`"
    )
