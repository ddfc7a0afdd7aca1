"""The build step of the peers: cached, and clear when Go is missing."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.peers import peers
from tests.peers.peers import BUILD_SCRIPT, NO_GO, Binaries


def run_build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run build.sh with ``env`` as the whole environment."""
    return subprocess.run(
        ["/bin/bash", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, check=False, timeout=600
    )


def test_a_repeated_build_is_quick(peer_binaries: Binaries) -> None:
    """Once built, build.sh finds both peers in its cache in well under a few seconds."""
    started = time.monotonic()
    result = run_build(dict(os.environ))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"otelcol={peer_binaries.otelcol}", f"jaeger={peer_binaries.jaeger}"]
    assert "building" not in result.stderr
    assert elapsed < 5


def test_without_go_the_script_says_so() -> None:
    """No Go anywhere: exit status 3 and a message saying what is missing and what it is for."""
    result = run_build({"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "HYDRA_OTEL_PEERS_GO_DIRS": ""})
    assert result.returncode == NO_GO
    assert "Go is not installed" in result.stderr
    assert "hydra-otel itself does not need Go" in result.stderr
    assert result.stdout == ""


def test_without_go_tests_skip_but_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer without Go sees the tests skipped with the reason; CI sees them fail."""
    monkeypatch.setattr(peers, "_build", lambda: "Go is not installed")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Go is not installed"):
        peers.binaries()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI must run .*Go is not installed"):
        peers.binaries()
