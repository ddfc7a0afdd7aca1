"""hydra-otel's configuration: one declaration table, one frozen tree, validated once at start-up.

Theory of operation: every setting is declared once, in ``SETTINGS``, with its flag, environment
variables, default, validation rule and documentation. Three things are derived from that table and
nothing else: the argparse flags (:func:`add_arguments`), the loader (:func:`load`: flag, then
environment, then default; every problem collected into one :class:`ConfigError`) and
docs/configuration.md (:func:`render_reference`; regenerate with
``python -m hydra_otel.config > docs/configuration.md``).

Secrets (database passwords, OTLP header values) never appear in ``repr()`` or in an error message.
This module imports only the standard library, :mod:`hydra_otel.errors` and :mod:`hydra_otel.dsn`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from hydra_otel.core.budget import min_spans_per_trace
from hydra_otel.dsn import DsnError, database_url, dbi_to_url, has_userinfo, redacted_dsn, url_secrets
from hydra_otel.errors import ConfigError, quote_payload

_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)
Pairs = tuple[tuple[str, str], ...]
REGENERATE = "python -m hydra_otel.config > docs/configuration.md"


class LogLevel(StrEnum):
    """Log levels an operator may choose."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class OtlpProtocol(StrEnum):
    """OTLP transports, spelled as in ``OTEL_EXPORTER_OTLP_PROTOCOL``."""

    GRPC = "grpc"
    HTTP_PROTOBUF = "http/protobuf"


class Compression(StrEnum):
    """OTLP request compression."""

    GZIP = "gzip"
    NONE = "none"


class ExportWorker(StrEnum):
    """Where spans are encoded and sent: a child process (the second core) or a thread of the daemon."""

    PROCESS = "process"
    THREAD = "thread"


@dataclass(frozen=True, slots=True, kw_only=True)
class DbConfig:
    """Where Hydra's database is: ``url`` (hidden from repr), ``redacted_url`` for logs, ``source``."""

    url: str = field(repr=False)
    redacted_url: str
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StitchConfig:
    """What span rendering needs: instance name, Hydra base URL, bounds on open evaluations and traces."""

    instance: str
    hydra_url: str
    abandon_after: float
    max_open_evals: int
    error_text_limit: int
    max_builds_per_trace: int
    max_links: int
    max_spans_per_trace: int


class Signal(StrEnum):
    """The OTLP signals hydra-otel sends, spelled as in the per-signal ``OTEL_EXPORTER_OTLP_*`` variables."""

    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpTarget:
    """Where and how one signal is sent; ``headers`` are hidden from repr, ``timeout`` is in seconds.

    ``endpoint`` is final (an OTLP/HTTP URL includes its ``/v1/<signal>`` path). ``insecure`` is
    None with http/protobuf; with gRPC it is decided: the endpoint's scheme, else
    ``OTEL_EXPORTER_OTLP_INSECURE``, else False (TLS).
    """

    protocol: OtlpProtocol
    endpoint: str
    headers: Pairs = field(repr=False)
    timeout: float
    certificate: Path | None
    client_key: Path | None
    client_certificate: Path | None
    insecure: bool | None
    compression: Compression


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportConfig:
    """What the OTLP exporters need: one target per signal, and the span batching settings."""

    traces: OtlpTarget
    metrics: OtlpTarget
    logs: OtlpTarget
    batch_size: int
    max_request_bytes: int
    delay: float
    max_backoff: float
    resource: Pairs
    #: Encode and send spans in a thread of the daemon's process (default) or in a child process.
    worker: ExportWorker = ExportWorker.THREAD


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryConfig:
    """What goes out besides traces: CI/CD metrics and failed-step log tails."""

    metrics_export: bool
    metrics_interval: float
    step_logs: bool
    step_logs_dir: Path
    step_log_lines: int
    logs_export: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration; built only by :func:`load`."""

    db: DbConfig
    stitch: StitchConfig
    export: ExportConfig
    state_dir: Path
    log_level: LogLevel
    shutdown_grace: float
    catchup_interval: float
    catchup_overlap: int
    takeover_window: int
    metrics_address: tuple[str, int] | None
    telemetry: TelemetryConfig
    queue_size: int
    #: Every secret value (passwords as written and decoded, header values), for the log redactor.
    secrets: tuple[str, ...] = field(default=(), repr=False)


class _Invalid(ValueError):
    """A parse failure whose message is safe to show (it never quotes the value)."""


@dataclass(frozen=True, slots=True)
class _Check(Generic[_T]):
    rule: str
    parse: Callable[[str], _T]


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting(Generic[_T]):
    """One setting: where it is read from, its default, how it is checked and what it means."""

    flag: str | None
    env: tuple[str, ...]
    default: str
    check: _Check[_T]
    doc: str
    section: str
    default_doc: str | None = None
    show: Callable[[str], str] = quote_payload

    @property
    def key(self) -> str:
        """The flag's argparse ``dest`` (``--queue-size`` -> ``queue_size``), else the first variable."""
        return self.flag.removeprefix("--").replace("-", "_") if self.flag else self.env[0]


# --- value checks -------------------------------------------------------------------------------------


def _int(lo: int, hi: int | None = None, what: str = "an integer") -> _Check[int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < lo or (hi is not None and value > hi):
            raise ValueError
        return value

    rule = f"{what} ≥ {lo}" if hi is None else f"{what} between {lo} and {hi}"
    return _Check(rule, parse)


def _seconds(hi: float | None = None) -> _Check[float]:
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value <= 0 or (hi is not None and value > hi):
            raise ValueError
        return value

    return _Check("a number of seconds > 0" + ("" if hi is None else f" and ≤ {hi:g}"), parse)


def _choice(enum: type[_E]) -> _Check[_E]:
    return _Check("one of " + ", ".join(v.value for v in enum), lambda t: enum(t.strip().lower()))


def _optional(check: _Check[_T]) -> _Check[_T | None]:
    return _Check(check.rule, lambda t: check.parse(t) if t else None)


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if has_userinfo(text):
        raise _Invalid(
            "credentials in a URL end up in logs and span attributes: remove them, and for the OTLP "
            "endpoint give them as a header in OTEL_EXPORTER_OTLP_HEADERS, e.g. authorization=Basic%20..."
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError
    return text


def _endpoint_url(text: str) -> str:
    """An http(s) URL, or ``host:port`` (gRPC's own form: :func:`_signal_url` refuses it for HTTP)."""
    if "://" in text or not re.fullmatch(r"[\w.\-]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+", text.strip()):
        return _http_url(text)
    _host_port(text.strip())
    return text.strip()


def _exporter(allowed: tuple[str, ...]) -> Callable[[str], str]:
    """An ``OTEL_*_EXPORTER`` value: one of ``allowed`` (lists such as ``otlp,console`` are not)."""

    def parse(text: str) -> str:
        if text.strip().lower() not in allowed:
            raise ValueError
        return text.strip().lower()

    return parse


def _hydra_url(text: str) -> str:
    parts = urlsplit(_http_url(text))
    if parts.query or parts.fragment:
        raise _Invalid("no query or fragment allowed")
    return text.rstrip("/")


def _instance(text: str) -> str:
    if not (text.isascii() and text.isprintable() and text == text.strip() and 1 <= len(text) <= 64):
        raise ValueError
    return text


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError
    return host.strip("[]"), int(port)


def _abs_path(text: str) -> Path:
    if not Path(text).is_absolute():
        raise ValueError
    return Path(text)


def _existing_file(text: str) -> Path:
    try:
        found = Path(text).is_file()
    except OSError as exc:  # e.g. a parent directory we may not search
        raise _Invalid(exc.strerror or "it cannot be checked") from None
    if not found:
        raise _Invalid("no such file")
    return Path(text)


def _bool(text: str) -> bool:
    if text.strip().lower() not in ("true", "false"):
        raise ValueError
    return text.strip().lower() == "true"


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _pairs(header_names: bool) -> Callable[[str], Pairs]:
    """Parse W3C-baggage-style ``k=v,k2=v2``; details name entries by position, never by content."""

    def parse(text: str) -> Pairs:
        pairs: dict[str, str] = {}
        for n, entry in enumerate(text.split(","), 1):
            if not entry.strip():
                continue
            key, eq, value = entry.partition("=")
            key = unquote(key).strip()
            if not eq or not key:
                raise _Invalid(f"entry {n} is not key=value")
            if header_names and not _HEADER_NAME.fullmatch(key):
                raise _Invalid(f"entry {n} has an invalid header name")
            pairs[key.lower() if header_names else key] = unquote(value).strip()
        return tuple(pairs.items())

    return parse


#: Conversions applied to a value according to the variable it came from.
_FROM_ENV: Mapping[str, Callable[[str], str]] = {
    "HYDRA_DBI": dbi_to_url,
    "STATE_DIRECTORY": lambda text: text.split(":", 1)[0],
}


def _redacted(text: str) -> str:
    """How an error message shows a URL: quoted, with any password masked (malformed ones too)."""
    return quote_payload(redacted_dsn(text))


# --- the declaration table ----------------------------------------------------------------------------

_OTLP = "OTEL_EXPORTER_OTLP_"
_URL = "an http(s) URL with a host"

# fmt: off
DATABASE_URL = Setting(
    flag="--database-url", env=("HYDRA_OTEL_DATABASE_URL", "HYDRA_DATABASE_URL", "HYDRA_DBI"),
    default="postgresql:///hydra", section="Database", show=_redacted,
    check=_Check("a postgresql:// URL, or for HYDRA_DBI a dbi:Pg: data source", database_url),
    doc="Hydra's PostgreSQL database; `application_name=hydra-otel` is added unless the URL sets one. "
    "See *Database URL resolution*.")
HYDRA_URL = Setting(
    flag="--hydra-url", env=("HYDRA_OTEL_HYDRA_URL",), default="http://localhost:3000", section="Hydra",
    show=_redacted, check=_Check(f"{_URL}, no query or fragment", _hydra_url),
    doc="Hydra's web base URL, for `url.full` span attributes. Trailing slashes are removed.")
INSTANCE = Setting(
    flag="--instance", env=("HYDRA_OTEL_INSTANCE",), default="hydra", section="Hydra",
    check=_Check("1 to 64 printable ASCII characters, no surrounding spaces", _instance),
    doc="Name of this Hydra instance; part of every derived trace and span ID, so keep it stable.")
EVAL_ABANDON_AFTER = Setting(
    flag="--eval-abandon-after", env=("HYDRA_OTEL_EVAL_ABANDON_AFTER",), default="7200", section="Hydra",
    check=_seconds(),
    doc="An evaluation whose `eval_started` gets no closing event within this time is ended as abandoned "
    "(Hydra's evaluator has a one-hour alarm, plus the time to insert the builds).")
MAX_OPEN_EVALS = Setting(
    flag="--max-open-evals", env=("HYDRA_OTEL_MAX_OPEN_EVALS",), default="10000", section="Hydra",
    check=_int(1), doc="Bound on the evaluations awaiting their closing event; an `eval_started` beyond it is "
    "not opened and is counted in `hydra_otel_notifications_rejected_total{reason=\"too_many_open\"}`.")
ERROR_TEXT_LIMIT = Setting(
    flag="--error-text-limit", env=("HYDRA_OTEL_ERROR_TEXT_LIMIT",), default="4096", section="Hydra",
    check=_int(64, 1_000_000), doc="Hydra error text put on spans is cut to this many characters.")
MAX_BUILDS_PER_TRACE = Setting(
    flag="--max-builds-per-trace", env=("HYDRA_OTEL_MAX_BUILDS_PER_TRACE",), default="1000", section="Hydra",
    check=_int(1, 100_000),
    doc="Builds an evaluation's trace holds (by build ID); later ones get traces of their own, linked both "
    "ways, so a nixpkgs-sized evaluation stays within Tempo's 5 MB and Jaeger's UI limits (docs/spans.md).")
MAX_SPANS_PER_TRACE = Setting(
    flag="--max-spans-per-trace", env=("HYDRA_OTEL_MAX_SPANS_PER_TRACE",), default="6000", section="Hydra",
    check=_int(7, 10_000_000),
    doc="Spans a trace holds, split evenly between the builds in it; a build finish with more steps than "
    "its share keeps the first ones and its last, and its span says how many were left out "
    "(`hydra.build.steps_omitted`). At least 3 times `--max-builds-per-trace`, plus 4. About 0.6 KB a span: the "
    "default keeps a trace near 3.7 MB, under Tempo's 5 MB (docs/spans.md).")
MAX_LINKS = Setting(
    flag="--max-links", env=("HYDRA_OTEL_MAX_LINKS",), default="32", section="Hydra",
    check=_int(0, 128),
    doc="Links an evaluation span carries to builds in traces of their own, and to cached builds.")
OTLP_PROTOCOL = Setting(
    flag="--otlp-protocol", env=(f"{_OTLP}TRACES_PROTOCOL", f"{_OTLP}PROTOCOL"), default="grpc",
    section="Export", check=_choice(OtlpProtocol), doc="OTLP transport.")
OTLP_ENDPOINT = Setting(
    flag="--otlp-endpoint", env=(f"{_OTLP}TRACES_ENDPOINT", f"{_OTLP}ENDPOINT"), default="", section="Export",
    default_doc="`http://localhost:4317` (grpc), `http://localhost:4318/v1/traces` (http/protobuf)",
    show=_redacted, check=_optional(_Check(f"{_URL}, or for grpc host:port", _endpoint_url)),
    doc="Collector URL. With http/protobuf, `/v1/traces` is appended to `OTEL_EXPORTER_OTLP_ENDPOINT` "
    "(a base URL, per the OTel spec); the flag and the `TRACES` variable are used as they are. "
    "With grpc, `host:port` without a scheme is accepted too (see `OTEL_EXPORTER_OTLP_INSECURE`). "
    "Credentials in it are refused: put them in `OTEL_EXPORTER_OTLP_HEADERS`.")
OTLP_HEADERS = Setting(
    flag=None, env=(f"{_OTLP}TRACES_HEADERS", f"{_OTLP}HEADERS"), default="", section="Export",
    check=_Check("comma-separated name=value pairs, URL-encoded", _pairs(header_names=True)),
    show=lambda _: "(value hidden)",
    doc="Extra request headers, often credentials, so there is no flag (it would show in `ps`) and values "
    "never appear in `repr()`, logs or error messages. Names are lower-cased.")
OTLP_TIMEOUT = Setting(
    flag=None, env=(f"{_OTLP}TRACES_TIMEOUT", f"{_OTLP}TIMEOUT"), default="5000", section="Export",
    check=_int(1, 600_000, what="a whole number of milliseconds"),
    doc="Time limit of one export request, in milliseconds as the OTel spec says (the Python SDK would "
    "read seconds; it is handed the converted value). The spec's default is 10000 ms; hydra-otel's is "
    "5000 ms so that a dead collector cannot hold the export thread long.")
OTLP_CERTIFICATE = Setting(
    flag=None, env=(f"{_OTLP}TRACES_CERTIFICATE", f"{_OTLP}CERTIFICATE"), default="", section="Export",
    default_doc="the system's trust store", check=_optional(_Check("an existing file", _existing_file)),
    doc="PEM file of the CA certificate(s) trusted to verify the collector.")
OTLP_CLIENT_KEY = Setting(
    flag=None, env=(f"{_OTLP}TRACES_CLIENT_KEY", f"{_OTLP}CLIENT_KEY"), default="", section="Export",
    default_doc="no client certificate", check=_optional(_Check("an existing file", _existing_file)),
    doc="PEM file of the private key of hydra-otel's client certificate (mutual TLS, gRPC and HTTP); "
    "it must be unencrypted. Needs `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`, and a TLS endpoint.")
OTLP_CLIENT_CERTIFICATE = Setting(
    flag=None, env=(f"{_OTLP}TRACES_CLIENT_CERTIFICATE", f"{_OTLP}CLIENT_CERTIFICATE"), default="",
    section="Export", default_doc="no client certificate",
    check=_optional(_Check("an existing file", _existing_file)),
    doc="PEM file of hydra-otel's client certificate chain (mutual TLS, gRPC and HTTP). Needs "
    "`OTEL_EXPORTER_OTLP_CLIENT_KEY`, and a TLS endpoint.")
OTLP_INSECURE = Setting(
    flag=None, env=(f"{_OTLP}TRACES_INSECURE", f"{_OTLP}INSECURE"), default="", section="Export",
    default_doc="`false`", check=_optional(_Check("true or false", _bool)),
    doc="gRPC only, and only for an endpoint without a scheme (`host:port`): `true` for a plaintext "
    "channel, `false` for TLS. As the OTel spec says, an `http://` endpoint is always plaintext and an "
    "`https://` one always TLS, whatever this says; with http/protobuf it is ignored too.")
OTLP_COMPRESSION = Setting(
    flag=None, env=(f"{_OTLP}TRACES_COMPRESSION", f"{_OTLP}COMPRESSION"), default="none", section="Export",
    check=_choice(Compression), doc="Compression of export requests.")
SDK_DISABLED = Setting(
    flag=None, env=("OTEL_SDK_DISABLED",), default="false", section="Export",
    check=_Check("true or false", _bool),
    doc="`true` is refused at start-up (exit code 2, which the systemd unit does not restart): it turns "
    "off every signal, and exporting them is all hydra-otel does, so a daemon running as a no-op would "
    "hold Hydra's database connections and report healthy while exporting nothing. To turn hydra-otel "
    "off, stop and disable its service.")
TRACES_EXPORTER = Setting(
    flag=None, env=("OTEL_TRACES_EXPORTER",), default="otlp", section="Export",
    check=_Check("otlp (hydra-otel exists to export traces over OTLP; none and console are not "
    "supported)", _exporter(("otlp",))),
    doc="Only `otlp`; anything else is refused at start-up.")
METRICS_EXPORTER = Setting(
    flag=None, env=("OTEL_METRICS_EXPORTER",), default="otlp", section="Export",
    check=_Check("otlp or none (console and prometheus are not supported)", _exporter(("otlp", "none"))),
    doc="`otlp`: CI/CD metrics go over OTLP when `--metrics-export` is true (it is off by default). "
    "`none`: no metrics; refused together with `--metrics-export` true, which asks for the opposite.")
LOGS_EXPORTER = Setting(
    flag=None, env=("OTEL_LOGS_EXPORTER",), default="otlp", section="Export",
    check=_Check("otlp or none (console is not supported)", _exporter(("otlp", "none"))),
    doc="`otlp`: failed-step log tails go as OTLP log records when `--logs-export` is true (off by "
    "default). `none`: no log records; refused together with `--logs-export` true.")
EXPORT_BATCH_SIZE = Setting(
    flag="--export-batch-size", env=("HYDRA_OTEL_EXPORT_BATCH_SIZE",), default="512", section="Export",
    check=_int(1, 10_000), doc="Spans per export request.")
EXPORT_MAX_REQUEST_BYTES = Setting(
    flag="--export-max-request-bytes", env=("HYDRA_OTEL_EXPORT_MAX_REQUEST_BYTES",), default="3145728",
    section="Export", check=_int(65_536, 32 << 20),
    doc="A batch whose encoded spans exceed this many bytes (before compression) is sent as several "
    "requests. 3 MiB stays under the 4 MiB that the Collector's, Jaeger's and Tempo's OTLP/gRPC "
    "receivers accept by default; a refused oversized request would be retried for ever.")
EXPORT_DELAY = Setting(
    flag="--export-delay", env=("HYDRA_OTEL_EXPORT_DELAY",), default="1.0", section="Export",
    check=_seconds(60), doc="The latency budget of a span: how long a partial batch waits for more spans "
    "before it is exported. The same delay paces the LISTEN connection's reads while notifications "
    "trickle in (it collects them for up to this long, then reads them in one go), and the spans of "
    "such a batch are exported as soon as they are resolved, so a live span waits about this long "
    "once, not twice. A larger value costs less CPU per event at a steady rate; a burst is read and "
    "exported at once whatever the value (docs/performance.md).")
EXPORT_WORKER = Setting(
    flag="--export-worker", env=("HYDRA_OTEL_EXPORT_WORKER",), default="thread", section="Export",
    check=_choice(ExportWorker),
    doc="Where spans are encoded and sent: `thread`, a worker thread of the daemon's process, which "
    "shares its GIL; `process`, a child process, which takes about 15 µs of CPU per span off the "
    "daemon's process but costs about 10 µs more in all and 55 MB of memory. `process` pays off "
    "only where a core is free for it (PostgreSQL and the collector on other hosts, or more than "
    "two cores): on a busy two-core host it was no faster (docs/decisions/0007-export-process.md).")
EXPORT_MAX_BACKOFF = Setting(
    flag="--export-max-backoff", env=("HYDRA_OTEL_EXPORT_MAX_BACKOFF",), default="30", section="Export",
    check=_seconds(), doc="Cap on the pause between retries of a failed export.")
SERVICE_NAME = Setting(
    flag=None, env=("OTEL_SERVICE_NAME",), default="hydra-otel", section="Export",
    check=_Check("a service name", str),
    doc="Resource attribute `service.name`; when set, it wins over one in `OTEL_RESOURCE_ATTRIBUTES`.")
RESOURCE_ATTRIBUTES = Setting(
    flag=None, env=("OTEL_RESOURCE_ATTRIBUTES",), default="", section="Export",
    check=_Check("comma-separated key=value pairs, URL-encoded", _pairs(header_names=False)),
    doc="Further resource attributes of every exported span; a `service.name` here is used only when "
    "`OTEL_SERVICE_NAME` is unset.")
STATE_DIR = Setting(
    flag="--state-dir", env=("HYDRA_OTEL_STATE_DIR", "STATE_DIRECTORY"), default="/var/lib/hydra-otel",
    section="Service", check=_Check("an absolute path", _abs_path),
    doc="hydra-otel's own state: the progress marks (`progress.sqlite3`, docs/operations.md). "
    "`STATE_DIRECTORY` comes from systemd's `StateDirectory=` (its first entry is used). Created if "
    "missing; a directory that cannot be written, that another hydra-otel process uses, or whose marks "
    "are invalid or another instance's stops the daemon at start-up with exit code 2 and a message.")
LOG_LEVEL = Setting(
    flag="--log-level", env=("HYDRA_OTEL_LOG_LEVEL",), default="info", section="Service",
    check=_choice(LogLevel), doc="Least severe level logged.")
SHUTDOWN_GRACE = Setting(
    flag="--shutdown-grace", env=("HYDRA_OTEL_SHUTDOWN_GRACE",), default="10", section="Service",
    check=_seconds(), doc="On SIGTERM, SIGINT or SIGHUP, time allowed to drain the pipeline and flush the spans.")
CATCHUP_INTERVAL = Setting(
    flag="--catchup-interval", env=("HYDRA_OTEL_CATCHUP_INTERVAL",), default="30", section="Service",
    check=_seconds(),
    doc="Seconds between catch-up scans of Hydra's tables (also run at start-up, after a reconnect or "
    "overflow, and on Hydra's trigger channels); bounds how far progress marks lag behind.")
CATCHUP_OVERLAP = Setting(
    flag="--catchup-overlap", env=("HYDRA_OTEL_CATCHUP_OVERLAP",), default="120", section="Service",
    check=_int(0, 86_400),
    doc="Seconds before the progress mark that each scan reads again, for rows committed after the time "
    "they record; what was already sent is not sent twice.")
METRICS_EXPORT = Setting(
    flag="--metrics-export", env=("HYDRA_OTEL_METRICS_EXPORT",), default="false", section="Export",
    check=_Check("true or false", _bool),
    doc="Also export CI/CD metrics (evaluation, build, step and queue-wait durations, errors) over OTLP "
    "to the same collector (docs/metrics-and-logs.md).")
METRICS_INTERVAL = Setting(
    flag="--metrics-interval", env=("HYDRA_OTEL_METRICS_INTERVAL",), default="60", section="Export",
    check=_seconds(), doc="Seconds between two metric exports.")
STEP_LOGS = Setting(
    flag="--step-logs", env=("HYDRA_OTEL_STEP_LOGS",), default="true", section="Export",
    check=_Check("true or false", _bool),
    doc="Attach the last lines of a failed step's Hydra log to its span (a `hydra.step.log_tail` event) "
    "or, with `--logs-export`, send them as an OTLP log record correlated with the step span.")
STEP_LOGS_DIR = Setting(
    flag="--step-logs-dir", env=("HYDRA_OTEL_STEP_LOGS_DIR",), default="/var/lib/hydra/build-logs",
    section="Export", check=_Check("an absolute path", _abs_path),
    doc="Hydra's build-log directory (plain, `.bz2` and `.zst` logs; `.zst` needs the `zstd` program).")
STEP_LOG_LINES = Setting(
    flag="--step-log-lines", env=("HYDRA_OTEL_STEP_LOG_LINES",), default="50", section="Export",
    check=_int(1, 1000), doc="Lines of a failed step's log to attach (at most 64 KiB).")
LOGS_EXPORT = Setting(
    flag="--logs-export", env=("HYDRA_OTEL_LOGS_EXPORT",), default="false", section="Export",
    check=_Check("true or false", _bool),
    doc="Send failed-step log tails as OTLP log records instead of span events.")
METRICS_ADDRESS = Setting(
    flag="--metrics-address", env=("HYDRA_OTEL_METRICS_ADDRESS",), default="", section="Service",
    default_doc="off", check=_optional(_Check("host:port, e.g. 127.0.0.1:9464", _host_port)),
    doc="Serve Prometheus `/metrics` and `/healthz` on this address (docs/operations-tools.md). "
    "Off by default; bind to localhost unless a scraper elsewhere needs it.")
TAKEOVER_WINDOW = Setting(
    flag="--takeover-window", env=("HYDRA_OTEL_TAKEOVER_WINDOW",), default="600", section="Service",
    check=_int(0, 7 * 86_400),
    doc="A standby that takes over with no progress marks of its own starts its catch-up this many "
    "seconds in the past, to cover what the instance that died had not exported (docs/operations.md).")
QUEUE_SIZE = Setting(
    flag="--queue-size", env=("HYDRA_OTEL_QUEUE_SIZE",), default="100000", section="Service",
    check=_int(1), doc="Capacity of each bounded channel between pipeline stages; a full one makes the stage "
    "before it wait (the listener drops and asks for a catch-up). Items are small (100,000 take some "
    "tens of MB at most); hint notifications (build_queued, cached_build_*) are counted, never queued. "
    "Rendered spans travel as one list per batch of 512 work items, so that channel holds this / 512 lists.")

#: The declaration table, in documentation order.
SETTINGS: tuple[Setting[Any], ...] = (
    DATABASE_URL, HYDRA_URL, INSTANCE, EVAL_ABANDON_AFTER, MAX_OPEN_EVALS, ERROR_TEXT_LIMIT,
    MAX_BUILDS_PER_TRACE, MAX_SPANS_PER_TRACE, MAX_LINKS,
    OTLP_PROTOCOL, OTLP_ENDPOINT, OTLP_HEADERS, OTLP_TIMEOUT, OTLP_CERTIFICATE, OTLP_CLIENT_KEY,
    OTLP_CLIENT_CERTIFICATE, OTLP_INSECURE, OTLP_COMPRESSION, SDK_DISABLED, TRACES_EXPORTER,
    METRICS_EXPORTER, LOGS_EXPORTER, EXPORT_BATCH_SIZE, EXPORT_MAX_REQUEST_BYTES, EXPORT_DELAY, EXPORT_WORKER, EXPORT_MAX_BACKOFF,
    SERVICE_NAME,
    RESOURCE_ATTRIBUTES, STATE_DIR, LOG_LEVEL, SHUTDOWN_GRACE, CATCHUP_INTERVAL, CATCHUP_OVERLAP,
    TAKEOVER_WINDOW, METRICS_ADDRESS, METRICS_EXPORT, METRICS_INTERVAL, STEP_LOGS, STEP_LOGS_DIR,
    STEP_LOG_LINES, LOGS_EXPORT, QUEUE_SIZE,
)
# fmt: on
SECTIONS = ("Database", "Hydra", "Export", "Service")

#: The OTLP exporter options of the OTel specification, as set up for traces (flags included).
# fmt: off
OTLP_OPTIONS: tuple[Setting[Any], ...] = (
    OTLP_PROTOCOL, OTLP_ENDPOINT, OTLP_HEADERS, OTLP_TIMEOUT, OTLP_CERTIFICATE, OTLP_CLIENT_KEY,
    OTLP_CLIENT_CERTIFICATE, OTLP_INSECURE, OTLP_COMPRESSION,
)
# fmt: on


def option_name(s: Setting[Any]) -> str:
    """The spec's name of an OTLP option: ``OTEL_EXPORTER_OTLP_ENDPOINT`` -> ``ENDPOINT``."""
    return s.env[-1].removeprefix(_OTLP)


def _for_signal(s: Setting[Any], signal: Signal) -> Setting[Any]:
    """``s`` read from the signal's variable, then the general one; unset gives None (use traces')."""
    name = option_name(s)
    env = (f"{_OTLP}{signal.upper()}_{name}", f"{_OTLP}{name}")
    return replace(s, flag=None, env=env, default="", default_doc="as for traces", check=_optional(s.check))


#: Per-signal variants of :data:`OTLP_OPTIONS` for metrics and logs (no flags; not in the docs' list).
SIGNAL_OPTIONS: Mapping[Signal, tuple[Setting[Any], ...]] = {
    signal: tuple(_for_signal(s, signal) for s in OTLP_OPTIONS) for signal in (Signal.METRICS, Signal.LOGS)
}

# --- loading ------------------------------------------------------------------------------------------


class _Resolver:
    """Reads each setting from its flag, then its variables, then its default; collects problems."""

    def __init__(self, argv: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
        self._argv, self._environ = argv, environ
        self.problems: list[str] = []
        self.origins: dict[str, str] = {}

    def _find(self, s: Setting[Any]) -> tuple[str, str]:
        given = self._argv.get(s.key) if s.flag else None
        if given is not None and s.flag:
            return given, s.flag
        for name in s.env:
            if self._environ.get(name):  # empty means unset, as the OTel spec says
                return self._environ[name], name
        return s.default, "default"

    def get(self, s: Setting[_T]) -> _T:
        text, origin = self._find(s)
        self.origins[s.key] = origin
        try:
            return s.check.parse(_FROM_ENV.get(origin, str)(text))
        except ValueError as exc:
            detail = f" ({exc})" if isinstance(exc, _Invalid | DsnError) else ""
            self.problems.append(f"{origin}: must be {s.check.rule}, got {s.show(text)}{detail}")
            return s.check.parse(s.default)  # keep going so that every problem is reported


def load(argv_values: Mapping[str, str | None], environ: Mapping[str, str]) -> Config:
    """Build the configuration: flags override environment variables, which override defaults.

    Args:
        argv_values: flag values by setting key, e.g. ``vars(parser.parse_args())`` after
            :func:`add_arguments`; None means the flag was not given. Unknown keys are ignored.
        environ: the environment, usually ``os.environ``. Empty variables count as unset.

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: listing every problem found, each naming the flag or variable at fault.
    """
    r = _Resolver(argv_values, environ)
    url = r.get(DATABASE_URL)
    config = Config(
        db=DbConfig(url=url, redacted_url=redacted_dsn(url), source=r.origins[DATABASE_URL.key]),
        stitch=StitchConfig(
            instance=r.get(INSTANCE),
            hydra_url=r.get(HYDRA_URL),
            abandon_after=r.get(EVAL_ABANDON_AFTER),
            max_open_evals=r.get(MAX_OPEN_EVALS),
            error_text_limit=r.get(ERROR_TEXT_LIMIT),
            max_builds_per_trace=r.get(MAX_BUILDS_PER_TRACE),
            max_links=r.get(MAX_LINKS),
            max_spans_per_trace=_span_budget(r),
        ),
        export=_export(r),
        state_dir=r.get(STATE_DIR),
        log_level=r.get(LOG_LEVEL),
        shutdown_grace=r.get(SHUTDOWN_GRACE),
        catchup_interval=r.get(CATCHUP_INTERVAL),
        catchup_overlap=r.get(CATCHUP_OVERLAP),
        takeover_window=r.get(TAKEOVER_WINDOW),
        metrics_address=r.get(METRICS_ADDRESS),
        telemetry=TelemetryConfig(
            metrics_export=_exported(r, METRICS_EXPORT, METRICS_EXPORTER),
            metrics_interval=r.get(METRICS_INTERVAL),
            step_logs=r.get(STEP_LOGS),
            step_logs_dir=r.get(STEP_LOGS_DIR),
            step_log_lines=r.get(STEP_LOG_LINES),
            logs_export=_exported(r, LOGS_EXPORT, LOGS_EXPORTER),
        ),
        queue_size=r.get(QUEUE_SIZE),
    )
    _check_sdk(r)
    if r.problems:  # a general variable's problem is found once for each signal: report it once
        raise ConfigError(list(dict.fromkeys(r.problems)))
    return replace(config, secrets=_secrets(config, environ))


def _secrets(config: Config, environ: Mapping[str, str]) -> tuple[str, ...]:
    """What no log line may show: database passwords (also PGPASSWORD, which asyncpg reads) and headers."""
    e = config.export
    found = [*url_secrets(config.db.url), *(v for t in (e.traces, e.metrics, e.logs) for _, v in t.headers)]
    if environ.get("PGPASSWORD"):
        found.append(environ["PGPASSWORD"])
    return tuple(sorted(set(found), key=len, reverse=True))


def _check_sdk(r: _Resolver) -> None:
    """``OTEL_SDK_DISABLED`` and ``OTEL_TRACES_EXPORTER``: each may only ask for what hydra-otel does."""
    r.get(TRACES_EXPORTER)
    if r.get(SDK_DISABLED):
        r.problems.append(
            "OTEL_SDK_DISABLED: is true, which turns off every signal, and exporting them is all hydra-otel "
            "does: to turn it off, stop and disable its service (systemctl disable --now hydra-otel), "
            "or unset OTEL_SDK_DISABLED"
        )


def _exported(r: _Resolver, switch: Setting[bool], exporter: Setting[str]) -> bool:
    """``--metrics-export``/``--logs-export``, refused when ``OTEL_*_EXPORTER=none`` says the opposite."""
    on, kind = r.get(switch), r.get(exporter)
    if on and kind == "none":
        r.problems.append(
            f"{r.origins[exporter.key]}: is none, but {r.origins[switch.key]} is true: "
            "unset one of them to say whether to export"
        )
    return on


def _span_budget(r: _Resolver) -> int:
    spans, builds = r.get(MAX_SPANS_PER_TRACE), r.get(MAX_BUILDS_PER_TRACE)
    if spans < min_spans_per_trace(builds):
        r.problems.append(
            f"{r.origins[MAX_SPANS_PER_TRACE.key]}: must be at least {min_spans_per_trace(builds)} "
            f"(3 spans for each of the {builds} builds a trace may hold, plus 4), got {spans}"
        )
    return spans


def _export(r: _Resolver) -> ExportConfig:
    traces = _traces(r)
    return ExportConfig(
        traces=traces,
        metrics=_signal(r, Signal.METRICS, traces),
        logs=_signal(r, Signal.LOGS, traces),
        batch_size=r.get(EXPORT_BATCH_SIZE),
        max_request_bytes=r.get(EXPORT_MAX_REQUEST_BYTES),
        delay=r.get(EXPORT_DELAY),
        max_backoff=r.get(EXPORT_MAX_BACKOFF),
        resource=_resource(r),
        worker=r.get(EXPORT_WORKER),
    )


#: An OTLP option's value, or where it came from, by option name ("ENDPOINT", "TIMEOUT", ...).
_Options = dict[str, Any]


def _traces(r: _Resolver) -> OtlpTarget:
    values: _Options = {option_name(s): r.get(s) for s in OTLP_OPTIONS}
    protocol = values["PROTOCOL"]
    endpoint = _signal_url(r, OTLP_ENDPOINT, protocol, Signal.TRACES)
    values["ENDPOINT"] = endpoint or _DEFAULT_ENDPOINTS[protocol].format(signal=Signal.TRACES)
    return _target(r, values, {option_name(s): r.origins[s.key] for s in OTLP_OPTIONS})


#: Where a signal goes when nothing says: the spec's defaults (4317 for gRPC, 4318 for HTTP).
_DEFAULT_ENDPOINTS = {
    OtlpProtocol.GRPC: "http://localhost:4317",
    OtlpProtocol.HTTP_PROTOBUF: "http://localhost:4318/v1/{signal}",
}


def _signal_url(r: _Resolver, setting: Setting[Any], protocol: OtlpProtocol, signal: Signal) -> str | None:
    """The spec's rule: the general variable is a base URL for OTLP/HTTP, anything else is used as is."""
    url: str | None = r.get(setting)
    origin = r.origins[setting.key]
    if url is None or protocol is OtlpProtocol.GRPC:
        return url
    if "://" not in url:
        r.problems.append(f"{origin}: must be an http(s) URL with http/protobuf, got {_redacted(url)}")
        return url
    return f"{url.rstrip('/')}/v1/{signal}" if origin == f"{_OTLP}ENDPOINT" else url


def _signal(r: _Resolver, signal: Signal, traces: OtlpTarget) -> OtlpTarget:
    """A signal's target: each option from its own variable, then the general one, then as below.

    A signal with no endpoint variable of its own or general goes to the traces' collector and
    takes the rest of what traces use too (flags and ``TRACES`` variables). One with an endpoint
    of its own takes only the flags (hydra-otel's own settings) and else the defaults: the traces'
    headers, certificates and key never go to another server.
    """
    settings = {option_name(s): s for s in SIGNAL_OPTIONS[signal]}
    own: _Options = {name: r.get(s) for name, s in settings.items()}
    same_collector = own["ENDPOINT"] is None
    values: _Options = {}
    for t in OTLP_OPTIONS:
        name = option_name(t)
        inherited = r.get(t) if same_collector or r.origins[t.key] == t.flag else t.check.parse(t.default)
        values[name] = inherited if own[name] is None else own[name]
    protocol = values["PROTOCOL"]
    endpoint = _signal_url(r, settings["ENDPOINT"], protocol, signal)
    if endpoint is None:
        endpoint = (
            _derived_url(traces.endpoint, protocol, signal)
            if protocol is traces.protocol
            else _DEFAULT_ENDPOINTS[protocol].format(signal=signal)
        )
    values["ENDPOINT"] = endpoint
    origins = {name: r.origins[s.key] if own[name] is not None else s.env[0] for name, s in settings.items()}
    # Without a key or certificate variable of its own, the pair is the traces' (checked there) or none.
    pair_set = own["CLIENT_KEY"] is not None or own["CLIENT_CERTIFICATE"] is not None
    return _target(r, values, origins, check_pair=pair_set)


def _derived_url(traces_url: str, protocol: OtlpProtocol, signal: Signal) -> str:
    """The traces' collector for another signal: gRPC serves all on one port, HTTP swaps the path."""
    if protocol is OtlpProtocol.GRPC:
        return traces_url
    parts = urlsplit(traces_url)
    path = parts.path.rstrip("/").removesuffix("/v1/traces")
    return urlunsplit(parts._replace(path=f"{path}/v1/{signal}"))


def _target(r: _Resolver, values: _Options, origins: _Options, *, check_pair: bool = True) -> OtlpTarget:
    """Check what no single setting can: the client key pair; decide the gRPC TLS mode."""
    protocol, endpoint, key, chain = (
        values[k] for k in ("PROTOCOL", "ENDPOINT", "CLIENT_KEY", "CLIENT_CERTIFICATE")
    )
    if check_pair and (key is None) != (chain is None):
        r.problems.append(
            f"{origins['CLIENT_KEY'] if chain is None else origins['CLIENT_CERTIFICATE']}: must be set "
            f"together with the client {'certificate' if chain is None else 'key'}, or not at all"
        )
    # The spec: a scheme decides over INSECURE, which only applies to a gRPC endpoint without one.
    scheme = endpoint.partition("://")[0] if "://" in endpoint else ""
    tls_mode = scheme == "http" if scheme else bool(values["INSECURE"])
    return OtlpTarget(
        protocol=protocol,
        endpoint=endpoint,
        headers=values["HEADERS"],
        timeout=values["TIMEOUT"] / 1000,  # the spec's milliseconds, as seconds
        certificate=values["CERTIFICATE"],
        client_key=key,
        client_certificate=chain,
        insecure=tls_mode if protocol is OtlpProtocol.GRPC else None,
        compression=values["COMPRESSION"],
    )


def _resource(r: _Resolver) -> Pairs:
    pairs = r.get(RESOURCE_ATTRIBUTES)
    attributes = dict(pairs)
    service = r.get(SERVICE_NAME)
    if r.origins[SERVICE_NAME.key] != "default" or "service.name" not in attributes:
        attributes["service.name"] = service
    return tuple(sorted(attributes.items()))


# --- flags and docs -----------------------------------------------------------------------------------


def _default_text(s: Setting[Any]) -> str:
    return s.default_doc or (f"`{s.default}`" if s.default else "unset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every flag of the table on ``parser``, one argument group per section.

    Flags are plain strings defaulting to None, so that :func:`load` validates them together with
    the environment and reports every problem at once.

    Args:
        parser: the CLI's parser; pass ``vars(parser.parse_args())`` to :func:`load`.
    """
    for section in SECTIONS:
        group = parser.add_argument_group(section.lower())
        for s in SETTINGS:
            if s.section == section and s.flag:
                env = ", then ".join(s.env)
                text = f"{s.doc} Env: {env}. Default: {_default_text(s)}.".replace("`", "")
                group.add_argument(s.flag, dest=s.key, default=None, help=text.replace("%", "%%"))


_PROSE = f"""# Configuration reference

<!-- Generated from the table in src/hydra_otel/config.py; do not edit. Regenerate with:
     {REGENERATE} -->

Every setting comes from its command-line flag if given, else from the first of its environment
variables that is set, else from its default. An empty environment variable counts as unset (as the
OpenTelemetry specification says). All values are checked at start-up and every problem is reported
at once, naming the flag or variable it came from; hydra-otel then exits without starting.

## Database URL resolution

1. `--database-url`, else `HYDRA_OTEL_DATABASE_URL`;
2. else `HYDRA_DATABASE_URL`, the variable of current Hydra (`postgres://` and `postgresql://` both work);
3. else `HYDRA_DBI`, legacy Hydra's Perl DBI data source, converted the way DBD::Pg reads it:
   `dbi:Pg:dbname=hydra;host=db;port=5433;user=hydra;password=...` becomes
   `postgresql://hydra:...@db:5433/hydra`. `db` and `database` mean `dbname`; values may be
   single-quoted with `\\` escapes; a socket directory becomes `?host=/run/postgresql`; any other
   key (`sslmode`, ...) is passed through as a query parameter. `DBI_USER`/`DBI_PASS` are not read;
4. else `postgresql:///hydra`: database `hydra` over the local socket.

`application_name=hydra-otel` is added unless the URL already sets an `application_name`. The
source used is logged at start-up, with the URL redacted.

Reserved characters in the user name or password must be percent-encoded (`@` as `%40`, `/` as
`%2F`, `?` as `%3F`, `#` as `%23`). A URL in which they are not is refused at start-up (exit code 2)
rather than guessed at: asyncpg and libpq split such a URL differently, and would send part of the
password as a host, database name or option. So are a fragment (`#...`), an `@` anywhere but at the
end of the user name and password (also in a query value: write `%40`), a database name with a `/`
and a port that is not a number.

## Redaction

Passwords (the URL's `user:password@` part and `password=`/`sslpassword=` parameters) are shown as
`***` in logs, in `repr()` of the configuration and in error messages, also in a URL that is refused.
OTLP header values never appear at all: they are not in `repr()`, and a malformed header entry is
reported by position only. As a last line of defence every log line, traceback included, goes through
a redactor that masks the database password (as written and percent-decoded), `PGPASSWORD` and every
OTLP header value, also JSON- or `repr()`-escaped; secrets shorter than 4 characters are not searched
for. `hydra-otel check` masks its output the same way.

A URL with credentials (`https://user:password@collector:4317`) is refused for the OTLP endpoint and
Hydra's URL (exit code 2): the OpenTelemetry exporters would log it on every retry, and Hydra's URL is
copied into span attributes. Give collector credentials as a header instead, e.g.
`OTEL_EXPORTER_OTLP_HEADERS=authorization=Basic%20<base64 of user:password>`.
"""


def _render(s: Setting[Any]) -> str:
    rows = [
        ("Flag", f"`{s.flag}`" if s.flag else "none"),
        ("Environment", ", then ".join(f"`{e}`" for e in s.env)),
        ("Default", _default_text(s)),
        ("Validation", s.check.rule),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### `{s.flag or s.env[0]}`\n\n{s.doc}\n\n| | |\n|---|---|\n{table}\n"


#: What an OTLP option's variables add to "honoured", by option name.
_OPTION_NOTES = {
    "PROTOCOL": "`grpc` or `http/protobuf`; `http/json` is refused at start-up.",
    "ENDPOINT": "",
    "HEADERS": "Values never appear in logs.",
    "TIMEOUT": "Milliseconds.",
    "CERTIFICATE": "",
    "CLIENT_KEY": "Mutual TLS, gRPC and HTTP; refused at start-up without the client certificate.",
    "CLIENT_CERTIFICATE": "Mutual TLS, gRPC and HTTP; refused at start-up without the client key.",
    "INSECURE": "gRPC only, for an endpoint without a scheme (`host:port`); an `http://` or `https://` "
    "scheme decides, as the specification says.",
    "COMPRESSION": "`gzip` or `none`; anything else is refused at start-up.",
}


def otel_variables() -> tuple[tuple[str, str], ...]:
    """Every ``OTEL_*`` variable of the OTel specification's OTLP exporter and SDK pages hydra-otel reads.

    Returns:
        (variable, what hydra-otel does with it) pairs, for docs/configuration.md; tests/test_otel_vars.py
        checks each against :func:`load`.
    """
    rows: list[tuple[str, str]] = []
    for s in OTLP_OPTIONS:
        name, note = option_name(s), _OPTION_NOTES[option_name(s)]
        base = "A base URL: with http/protobuf `/v1/<signal>` is appended. " if name == "ENDPOINT" else ""
        as_is = "Used as it is. " if name == "ENDPOINT" else ""
        rows.append((f"{_OTLP}{name}", f"Honoured for every signal without its own variable. {base}{note}"))
        flag = f" (`{s.flag}` wins over it)" if s.flag else ""
        also = "; also for metrics and logs sent to the traces' collector" if name != "ENDPOINT" else ""
        rows.append((f"{_OTLP}TRACES_{name}", f"Honoured for traces{flag}{also}. {as_is}{note}"))
        rows.extend(
            (f"{_OTLP}{signal.upper()}_{name}", f"Honoured for {signal}. {as_is}{note}")
            for signal in (Signal.METRICS, Signal.LOGS)
        )
    rows += [
        ("OTEL_SDK_DISABLED", "`true` is refused at start-up (see `OTEL_SDK_DISABLED` above)."),
        ("OTEL_TRACES_EXPORTER", "`otlp` is honoured; anything else is refused at start-up."),
        (
            "OTEL_METRICS_EXPORTER",
            "`otlp` and `none` are honoured (see above); anything else is refused at start-up.",
        ),
        (
            "OTEL_LOGS_EXPORTER",
            "`otlp` and `none` are honoured (see above); anything else is refused at start-up.",
        ),
        ("OTEL_SERVICE_NAME", "Honoured."),
        ("OTEL_RESOURCE_ATTRIBUTES", "Honoured."),
    ]
    return tuple((variable, text.strip()) for variable, text in rows)


_OTEL_PROSE = """## OpenTelemetry variables

Each variable of the OpenTelemetry specification's OTLP exporter page, and the SDK ones that apply
to an exporter, with what hydra-otel does with it. Metrics and logs take each option from their own
variable, else the general one; without an endpoint variable of their own or general they go to the
traces' collector with the traces' settings (docs/metrics-and-logs.md). A value that is refused
stops hydra-otel at start-up with exit code 2 and a message naming the variable. Why each choice:
docs/decisions/0006-otel-environment-variables.md.

| Variable | What hydra-otel does |
|---|---|
"""


def render_reference() -> str:
    """Render docs/configuration.md from the declaration table.

    Returns:
        The Markdown text; a test checks that the committed file equals it.
    """
    parts = [_PROSE]
    for section in SECTIONS:
        parts.append(f"## {section}\n")
        parts.extend(_render(s) for s in SETTINGS if s.section == section)
    parts.append(_OTEL_PROSE + "".join(f"| `{v}` | {text} |\n" for v, text in otel_variables()))
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render_reference())
