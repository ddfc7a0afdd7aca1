"""The chaos run at a small size (tests/chaos/run.py; ``just chaos`` runs the full size).

One fault of each kind (PostgreSQL fast restart, LISTEN backend terminated, every daemon backend
terminated, daemon SIGKILLed and restarted, collector UNAVAILABLE) at random moments of a mixed
Hydra workload, against the real daemon process; then every evaluation, build and step with a
row must have arrived, under an existing parent, with the database's times and status, no span
ID twice with different content, and the daemon must never have exited on its own. Set
``CHAOS_SEED`` to replay a seed.
"""

from __future__ import annotations

import os

from tests.chaos.run import Settings, chaos

SEED = int(os.environ.get("CHAOS_SEED", "20261206"))


def test_small_chaos_run() -> None:
    """Five faults, one of each kind, in under a minute."""
    report = chaos(Settings(seed=SEED, faults=5, gap=(0.5, 1.5), settle=30.0))
    print(report.text())
    assert not report.failures, report.text()
