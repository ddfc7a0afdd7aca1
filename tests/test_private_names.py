"""hydra-otel imports no private name of opentelemetry-python unless listed here with its reason.

A private name can vanish in any release (``_is_request_too_large`` did, between releases a
distribution ships), and then ``hydra-otel run`` fails at import while a package's import check
may still pass. The logs signal is the exception: opentelemetry-python publishes it only under
``_logs`` modules, in every release of the declared range (CI runs the suite on the lowest too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hydra_otel.adapters import otlp_exporters
from hydra_otel.adapters.otlp import ExporterSettings, make_exporter
from hydra_otel.adapters.otlp_exporters import HttpSpanExporter, SdkMismatch, check_sdk
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
        del exporter._client  # as in releases before the HTTP client was split out
        with pytest.raises(SdkMismatch, match=r"lacks http OTLPSpanExporter\._client, ") as caught:
            check_sdk([exporter])
    finally:
        exporter._shutdown = True
    assert isinstance(caught.value, ConfigError)  # the CLI exits 2 with the message, no traceback
