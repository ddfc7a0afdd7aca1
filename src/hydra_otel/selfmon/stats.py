"""Process-wide counters of the daemon itself: what happened, for logs, tests and /metrics.

One mutable object owned by the service and handed to each task; tasks only
increment. ``snapshot()`` gives a plain dict for a log line or a test.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Stats:
    """Counters shared by the pipeline's tasks."""

    events: Counter[str] = field(default_factory=Counter)  # parsed notifications, by channel
    payload_errors: Counter[str] = field(default_factory=Counter)  # malformed payloads, by channel
    missing_rows: Counter[str] = field(default_factory=Counter)  # IDs not found, by table
    resyncs: Counter[str] = field(default_factory=Counter)  # catch-up requests, by reason
    # eval_started not opened, or superseded attempts not reported, by reason (core/stitch.py)
    notifications_rejected: Counter[str] = field(default_factory=Counter)
    spans_deduplicated: int = 0  # exact repeats of recently exported spans, skipped
    # build finishes not rendered again: the live path and the catch-up both brought them
    builds_deduplicated: int = 0
    spans_over_budget: int = 0  # step spans left out of a build's share of its trace (core/budget.py)
    not_finished: int = 0  # build_finished for a build with no recorded finish (bad input)
    spans_exported: int = 0
    spans_dropped: int = 0  # lost: live-only spans given up on unacknowledged (the pipeline stopped)
    spans_requeued: int = 0  # given up on unacknowledged, found again by the catch-up (marks not stored)
    spans_refused: int = 0  # refused for good by the endpoint (bad data), dropped alone
    spans_repaired: int = 0  # sent with impossible values clamped or omitted (hydra.data_issue)
    export_failures: int = 0  # failed export attempts (each retried)
    exporting_failed: bool = False  # the latest export attempt failed (health)
    queries: int = 0
    checkpoints: int = 0  # progress marks stored after the endpoint acknowledged what they cover
    marks_store_failures: int = 0  # progress-mark writes that failed (a full disk); each retried later
    permission_denied: Counter[str] = field(default_factory=Counter)  # queries refused (42501), by table
    #: Tables hydra-otel may not read now, with the GRANT that fixes each (health: unhealthy while any).
    denied_tables: dict[str, str] = field(default_factory=dict)
    task_restarts: int = 0  # pipeline restarts after an unexpected error
    export_process_restarts: int = 0  # span export processes that died and were replaced

    def snapshot(self) -> dict[str, object]:
        """A JSON-friendly copy of every counter."""
        return {
            "events": dict(self.events),
            "payload_errors": dict(self.payload_errors),
            "missing_rows": dict(self.missing_rows),
            "resyncs": dict(self.resyncs),
            "notifications_rejected": dict(self.notifications_rejected),
            "spans_deduplicated": self.spans_deduplicated,
            "builds_deduplicated": self.builds_deduplicated,
            "spans_over_budget": self.spans_over_budget,
            "not_finished": self.not_finished,
            "spans_exported": self.spans_exported,
            "spans_dropped": self.spans_dropped,
            "spans_requeued": self.spans_requeued,
            "spans_refused": self.spans_refused,
            "spans_repaired": self.spans_repaired,
            "export_failures": self.export_failures,
            "checkpoints": self.checkpoints,
            "marks_store_failures": self.marks_store_failures,
            "permission_denied": dict(self.permission_denied),
            "task_restarts": self.task_restarts,
            "export_process_restarts": self.export_process_restarts,
            "queries": self.queries,
        }


@dataclass(slots=True)
class ListenStatistics:
    """Counters of the LISTEN connection (mutable, owned by the listener)."""

    received: int = 0
    dropped: int = 0
    connects: int = 0
    connection_losses: int = 0
    undecodable: int = 0  # notifications whose channel or payload is not UTF-8, dropped
