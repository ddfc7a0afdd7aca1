"""Real peers for end-to-end tests: an OpenTelemetry Collector and Jaeger v2, as processes.

``tests/peers/build.sh`` builds both from pinned Go modules (cached outside the work tree);
:func:`binaries` runs it once per test session. :class:`Peer` is one running process on free
loopback ports, with its log in a file (shown when a test fails because of it); the fixtures in
``tests/peers/conftest.py`` start them and always stop them.

Without Go the peers cannot be built: the tests that need them are skipped with the build
script's message on a developer machine, and fail in CI (``CI`` set), where they must run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
BUILD_SCRIPT = HERE / "build.sh"
REPO = HERE.parent.parent
#: The collector configuration shipped for users, loaded exactly as it is.
SHIPPED_CONFIG = REPO / "otel-collector.yaml"
#: Exit status of build.sh when Go is missing or too old.
NO_GO = 3


@dataclass(frozen=True)
class Binaries:
    """Paths of the built peers."""

    otelcol: Path
    jaeger: Path


@cache
def _build() -> Binaries | str:
    """Run build.sh once: the binaries, or why there are none."""
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=1800
    )
    if proc.returncode == NO_GO:
        return proc.stderr.strip()
    if proc.returncode != 0:
        raise RuntimeError(f"tests/peers/build.sh failed ({proc.returncode}):\n{proc.stderr}")
    paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if time.monotonic() - started > 5:
        print(proc.stderr)  # the build log, shown with -s or on failure
    return Binaries(otelcol=Path(paths["otelcol"]), jaeger=Path(paths["jaeger"]))


def binaries() -> Binaries:
    """The built peers; skips (fails in CI) with build.sh's message when Go is missing."""
    result = _build()
    if isinstance(result, str):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the end-to-end tests against real peers: {result}")
        pytest.skip(result)
    return result


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); a refused connection is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def http_json(url: str) -> Any:
    """GET ``url`` and parse its JSON body; fails on any status but 200."""
    status, body = http_get(url)
    assert status == 200, f"GET {url}: {status} {body[:500]!r}"
    return json.loads(body)


@dataclass
class Peer:
    """One peer process: its command line, environment, health URL and log file."""

    name: str
    argv: Sequence[str]
    health_url: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_within: float = 60.0) -> None:
        """Start the process and wait until its health URL answers 200."""
        assert self.process is None, f"{self.name} is already running"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            list(self.argv),
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + ready_within
        while http_get(self.health_url, timeout=1)[0] != 200:
            if self.process.poll() is not None:
                self.process = None
                raise AssertionError(f"{self.name} exited while starting:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.name} not healthy after {ready_within}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; a no-op when not running."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log(self, tail: int = 25) -> str:
        """The last ``tail`` lines of the process's output."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])


def write_json(path: Path, value: object) -> Path:
    """Write ``value`` as JSON (YAML's superset, so both peers read it as configuration)."""
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


@dataclass
class Jaeger:
    """Jaeger v2 (``cmd/jaeger``) with an OTLP/gRPC receiver and its query service on free ports.

    Storage is in memory unless ``badger_dir`` is given: Badger on disk keeps the spans across a
    restart, which the fault tests need.
    """

    peer: Peer
    otlp_endpoint: str
    query_url: str

    @classmethod
    def make(cls, binary: Path, workdir: Path, *, badger_dir: Path | None = None) -> Jaeger:
        """Write the configuration into ``workdir``; the process is not started yet."""
        otlp, query_http, query_grpc, health = (free_port() for _ in range(4))
        backend: dict[str, object] = (
            {"memory": {"max_traces": 100_000}}
            if badger_dir is None
            else {
                "badger": {
                    "directories": {"keys": str(badger_dir), "values": str(badger_dir)},
                    "ephemeral": False,
                }
            }
        )
        config = {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
                "pipelines": {
                    "traces": {
                        "receivers": ["otlp"],
                        "processors": ["batch"],
                        "exporters": ["jaeger_storage_exporter"],
                    }
                },
                # Off: its own metrics endpoint would want the fixed port 8888.
                "telemetry": {"metrics": {"level": "none"}},
            },
            "extensions": {
                "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"127.0.0.1:{health}"}},
                "jaeger_query": {
                    "storage": {"traces": "store"},
                    # Off: Jaeger would send its own traces to localhost:4317, whoever listens there.
                    "enable_tracing": False,
                    "http": {"endpoint": f"127.0.0.1:{query_http}"},
                    "grpc": {"endpoint": f"127.0.0.1:{query_grpc}"},
                },
                "jaeger_storage": {"backends": {"store": backend}},
            },
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{otlp}"}}}},
            "processors": {"batch": {}},
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "store"}},
        }
        path = write_json(workdir / "jaeger.json", config)
        peer = Peer(
            name="jaeger",
            argv=[str(binary), "--config", str(path)],
            health_url=f"http://127.0.0.1:{health}/status",
            log_path=workdir / "jaeger.log",
        )
        return cls(peer, f"127.0.0.1:{otlp}", f"http://127.0.0.1:{query_http}")

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """Every span Jaeger holds for ``trace_id`` (api/v3, OTLP JSON, unadjusted), with its resource.

        Each span dict gets a ``resource`` key with its resource's attributes (OTLP JSON form).
        An unknown trace is an empty list.
        """
        status, body = http_get(f"{self.query_url}/api/v3/traces/{trace_id}?raw_traces=true")
        if status == 404:
            return []
        assert status == 200, f"api/v3 trace {trace_id}: {status} {body[:500]!r}"
        spans: list[dict[str, Any]] = []
        for resource_spans in json.loads(body)["result"]["resourceSpans"]:
            resource = resource_spans.get("resource", {}).get("attributes", [])
            for scope_spans in resource_spans.get("scopeSpans", []):
                spans.extend({**s, "resource": resource} for s in scope_spans.get("spans", []))
        return spans


@dataclass
class Collector:
    """The test collector running the shipped otel-collector.yaml.

    The file is loaded exactly as shipped, followed by a second configuration that the collector
    merges over it and that changes only listen addresses (to free loopback ports, so that runs
    side by side do not collide) and turns the collector's own metrics endpoint off (it wants the
    fixed port 8888). The environment variables are the documented ones.
    """

    peer: Peer
    otlp_grpc: str
    otlp_http: str
    metrics_url: str

    @classmethod
    def make(cls, binary: Path, workdir: Path, env: Mapping[str, str]) -> Collector:
        """Write the overlay into ``workdir``; the process is not started yet."""
        grpc, http, prometheus, health = (free_port() for _ in range(4))
        overlay = {
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": f"127.0.0.1:{grpc}"},
                        "http": {"endpoint": f"127.0.0.1:{http}"},
                    }
                }
            },
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{prometheus}"}},
            "extensions": {"health_check": {"endpoint": f"127.0.0.1:{health}"}},
            "service": {"telemetry": {"metrics": {"level": "none"}}},
        }
        path = write_json(workdir / "collector-ports.json", overlay)
        peer = Peer(
            name="otelcol",
            argv=[str(binary), "--config", str(SHIPPED_CONFIG), "--config", str(path)],
            health_url=f"http://127.0.0.1:{health}/",
            log_path=workdir / "otelcol.log",
            env=env,
        )
        return cls(peer, f"127.0.0.1:{grpc}", f"127.0.0.1:{http}", f"http://127.0.0.1:{prometheus}/metrics")

    def metrics(self) -> str:
        """The Prometheus exposition text on the collector's metrics endpoint."""
        status, body = http_get(self.metrics_url)
        assert status == 200, f"GET {self.metrics_url}: {status}"
        return body.decode()


def collector_env(jaeger_otlp: str, tempo_otlp: str, logs_url: str) -> dict[str, str]:
    """The documented environment of otel-collector.yaml (docs/collector.md), for plaintext backends."""
    return {
        "JAEGER_OTLP_ENDPOINT": jaeger_otlp,
        "JAEGER_OTLP_INSECURE": "true",
        "TEMPO_OTLP_ENDPOINT": tempo_otlp,
        "TEMPO_OTLP_INSECURE": "true",
        "LOGS_OTLP_ENDPOINT": logs_url,
    }
