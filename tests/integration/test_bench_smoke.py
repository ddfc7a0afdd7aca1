"""``benchmarks/run.py`` at a tiny scale: it runs to the end, prints its table and JSON, and loses nothing.

Only that it runs: the performance targets are the benchmark's own output (docs/performance.md),
not assertions here, since a shared CI machine cannot time them reliably.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 300.0


def test_bench_smoke_runs_and_loses_nothing(tmp_path: Path) -> None:
    """A few thousand notifications and spans through the real daemon: every one arrives."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--scale", "0.01", "--idle-seconds", "2"]
    proc = subprocess.Popen(
        [*argv, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark stops everything it started, then exits
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"the benchmark did not finish within {DEADLINE:g}s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-5000:]
    assert "receive rate vs R_listen" in stdout, stdout
    assert "PASS" in stdout or "FAIL" in stdout, stdout
    results = json.loads(out.read_text())
    assert {t["name"] for t in results["targets"]} >= {
        "receive rate vs R_listen",
        "spans/s vs R_export",
        "lost (spans + notifications)",
        "peak RSS growth, eval burst",
        "enrichment queries / 1k events",
        "p99 commit-to-receiver latency",
        "idle CPU",
        "spans/s vs R_export direct",
        "build bursts commit -> last span",
        "eval burst commit -> last span",
    }
    assert len(results["targets"]) == 11
    lost = results["daemon"]["lost"]
    assert lost["spans_missing"] == 0, lost
    assert lost["notifications_missing"] == 0, lost
    assert lost["spans_received"] >= lost["spans_expected"] > 0, lost
    assert results["baselines"]["R_listen"]["imported_trio_asyncio"] is False
