"""The progress store: processed-up-to marks in the state directory.

A small SQLite database (``<state dir>/progress.sqlite3``), written in WAL mode
with synchronous=FULL so a committed mark survives a crash or power loss. Marks
are only written after the OTLP endpoint acknowledged every span derived from
what they cover (see tasks/catchup.py), so losing the process at any moment
re-exports at most the window since the last mark. The store is the daemon's
only write, and it never touches Hydra's database.

Calls are short, local and synchronous; tasks run them through
``trio.to_thread.run_sync`` so the event loop never waits on the disk.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

from hydra_otel.core.catchup import Marks

FILENAME = "progress.sqlite3"


class StateStore:
    """Reads and writes :class:`Marks` (blocking; call from a worker thread)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / FILENAME
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def load(self) -> Marks | None:
        """The stored marks, or None on first start."""
        row = self._db.execute("SELECT value FROM marks WHERE name = 'progress'").fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["jobsets"] = {int(k): v for k, v in (data.get("jobsets") or {}).items()}
        return Marks(**data)

    def save(self, marks: Marks) -> None:
        """Store ``marks`` durably (one atomic transaction)."""
        value = json.dumps(asdict(marks), sort_keys=True)
        self._db.execute(
            "INSERT INTO marks (name, value) VALUES ('progress', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (value,),
        )

    def merge(self, marks: Marks) -> Marks:
        """Store the stored marks merged with ``marks`` (marks only move forward); return the result.

        Several writers (the catch-up's first marks, checkpoints, live jobset checks) can each pass
        just what they cover.
        """
        merged = (self.load() or Marks()).merged(marks)
        self.save(merged)
        return merged

    def close(self) -> None:
        """Close the database file."""
        self._db.close()
