"""hydra-otel imports no private name of opentelemetry-python unless listed here with its reason.

A private name can vanish in any release (``_is_request_too_large`` did, between releases a
distribution ships), and then ``hydra-otel run`` fails at import while a package's import check
may still pass. The logs signal is the exception: opentelemetry-python publishes it only under
``_logs`` modules, in every release of the declared range (CI runs the suite on the lowest too).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from hydra_otel.adapters import otlp_exporters
from hydra_otel.adapters.otlp import ExporterSettings, make_exporter
from hydra_otel.adapters.otlp_exporters import HttpSpanExporter, SdkMismatch, Sent, check_sdk
from hydra_otel.core.otlp_wire import Encoded
from hydra_otel.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src" / "hydra_otel"

#: The logs signal's only published import paths.
ALLOWED = {
    "opentelemetry._logs",
    "opentelemetry.sdk._logs",
    "opentelemetry.sdk._logs.export",
    "opentelemetry.exporter.otlp.proto.grpc._log_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
}


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opentelemetry"):
            module = node.module or ""
            names = [a.name for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in module.split(".")) and module not in ALLOWED:
                found.append(f"{path.name}: from {module} import ...")
            found += [f"{path.name}: from {module} import {n}" for n in names]
        elif isinstance(node, ast.Import):
            found += [
                f"{path.name}: import {a.name}"
                for a in node.names
                if a.name.startswith("opentelemetry") and "._" in a.name and a.name not in ALLOWED
            ]
    return found


def test_no_private_opentelemetry_name_is_imported() -> None:
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in _private_imports(path)]
    assert found == []


def test_the_scan_sees_the_import_that_broke_old_releases(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from opentelemetry.exporter.otlp.proto.http._common import _is_request_too_large\n")
    assert _private_imports(bad) == [
        "bad.py: from opentelemetry.exporter.otlp.proto.http._common import ...",
        "bad.py: from opentelemetry.exporter.otlp.proto.http._common import _is_request_too_large",
    ]


def test_the_request_size_rule_matches_the_http_exporters() -> None:
    assert otlp_exporters._is_request_too_large(b"x" * 11, 10)
    assert not otlp_exporters._is_request_too_large(b"x" * 10, 10)
    assert not otlp_exporters._is_request_too_large(b"x" * 11, 0)  # 0 disables the check


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_installed_exporters_have_what_export_encoded_uses(protocol: str) -> None:
    settings = ExporterSettings(protocol=protocol, endpoint="http://127.0.0.1:1", headers={}, timeout_s=1)
    make_exporter(settings).shutdown()  # check_sdk passed


def test_a_release_without_an_internal_fails_at_start_with_a_clear_message() -> None:
    exporter = HttpSpanExporter(endpoint="http://127.0.0.1:1/v1/traces")
    try:
        exporter._client = None  # type: ignore[assignment]  # neither the client of 1.45 on ...
        exporter._export = None  # type: ignore[attr-defined]  # ... nor the session of the releases before
        with pytest.raises(SdkMismatch, match=r"lacks http OTLPSpanExporter\._client\.export and ") as caught:
            check_sdk([exporter])
    finally:
        exporter._shutdown = True
    assert isinstance(caught.value, ConfigError)  # the CLI exits 2 with the message, no traceback


@dataclass
class Answer:
    """What a requests.Response tells (the session path reads these three)."""

    ok: bool
    status_code: int
    reason: str


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Answer(True, 200, "OK"), Sent(ok=True)),
        (Answer(False, 400, "Bad Request"), Sent(ok=False, refused=True, reason="HTTP 400 Bad Request")),
        (Answer(False, 503, "Unavailable"), Sent(ok=False, reason="HTTP 503 Unavailable")),
        (ConnectionRefusedError("refused"), Sent(ok=False, reason="ConnectionRefusedError: refused")),
    ],
)
def test_the_session_path_of_releases_before_1_45(answer: Answer | OSError, expected: Sent) -> None:
    """Where the exporter has no client (before 1.45), one POST through its ``_export``."""
    exporter = HttpSpanExporter(endpoint="http://127.0.0.1:1/v1/traces")
    posted: list[bytes] = []

    def export(data: bytes, timeout: float | None) -> Answer:
        posted.append(data)
        if isinstance(answer, OSError):
            raise answer
        return answer

    try:
        exporter._client = None  # type: ignore[assignment]
        exporter._export = export  # type: ignore[attr-defined]
        assert otlp_exporters.http_generation(exporter) == "session"
        check_sdk([exporter])
        assert exporter.export_encoded(Encoded(b"request", spans=1)) == expected
    finally:
        exporter._shutdown = True
    assert posted == [b"request"]
