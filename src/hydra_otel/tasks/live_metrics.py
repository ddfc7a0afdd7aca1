"""Poll what runs now (evaluations, busy machines) for the observed CI/CD metrics.

Two small queries per interval (the jobsets table, and busy steps through Hydra's partial index
on ``buildsteps.busy``; docs/metrics-and-logs.md). The first poll runs before the daemon is
ready; a database outage skips polls (the values keep their last reading) and never stops the
daemon. Runs in the sources nursery, so a graceful stop cancels it at once.
"""

from __future__ import annotations

import logging

import trio

from hydra_otel.adapters import queries
from hydra_otel.adapters.db import Database
from hydra_otel.adapters.otlp_metrics import MetricsSink
from hydra_otel.core.cicd_metrics import live_observations
from hydra_otel.errors import DbUnavailable

log = logging.getLogger("hydra_otel.live_metrics")


async def run_live_metrics(
    db: Database,
    sink: MetricsSink,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read the live state every ``interval`` seconds into ``sink``'s observed instruments;
    started once the first reading was taken (or failed)."""
    known: set[str] = set()
    while True:
        try:
            active, busy = await queries.live_state(db)
        except DbUnavailable as exc:
            log.debug("live metrics not read: %s", exc)
        else:
            sink.set_live(live_observations(active, busy, known))
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        await trio.sleep(interval)
