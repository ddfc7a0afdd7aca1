"""Process-wide counters: what happened, for logs, tests and (later) metrics.

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
    spans_deduplicated: int = 0  # exact repeats of recently exported spans, skipped
    not_finished: int = 0  # build_finished for a build with no recorded finish (bad input)
    spans_exported: int = 0
    spans_dropped: int = 0  # given up on (shutdown deadline passed with the endpoint down)
    spans_refused: int = 0  # refused for good by the endpoint (bad data), dropped alone
    spans_repaired: int = 0  # sent with impossible values clamped or omitted (hydra.data_issue)
    export_failures: int = 0  # failed export attempts (each retried)
    exporting_failed: bool = False  # the latest export attempt failed (health)
    queries: int = 0
    checkpoints: int = 0  # progress marks stored after the endpoint acknowledged what they cover

    def snapshot(self) -> dict[str, object]:
        """A JSON-friendly copy of every counter."""
        return {
            "events": dict(self.events),
            "payload_errors": dict(self.payload_errors),
            "missing_rows": dict(self.missing_rows),
            "resyncs": dict(self.resyncs),
            "spans_deduplicated": self.spans_deduplicated,
            "not_finished": self.not_finished,
            "spans_exported": self.spans_exported,
            "spans_dropped": self.spans_dropped,
            "spans_refused": self.spans_refused,
            "spans_repaired": self.spans_repaired,
            "export_failures": self.export_failures,
            "checkpoints": self.checkpoints,
            "queries": self.queries,
        }
