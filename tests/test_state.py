"""The progress store: marks in ``<state dir>/progress.sqlite3``."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from hydra_otel.adapters.state import FILENAME, StateStore
from hydra_otel.core.catchup import Marks

MARKS = Marks(eval_id=42, stop_time=1_700_000_123, jobsets={1: 1_700_000_100, 20: 1_700_000_050})


def test_first_start_has_no_marks(tmp_path: Path) -> None:
    """A new state directory (created if missing) holds no marks."""
    store = StateStore(tmp_path / "new" / "state")
    try:
        assert store.load() is None
        assert (tmp_path / "new" / "state" / FILENAME).is_file()
    finally:
        store.close()


def test_round_trip(tmp_path: Path) -> None:
    """What is saved is loaded back equal, jobset IDs as integers; a later save replaces it."""
    store = StateStore(tmp_path)
    try:
        store.save(MARKS)
        loaded = store.load()
        assert loaded == MARKS
        assert all(isinstance(k, int) for k in loaded.jobsets), "not JSON's string keys"
        newer = MARKS.merged(Marks(eval_id=43, jobsets={3: 5}))
        store.save(newer)
        assert store.load() == newer
    finally:
        store.close()


def test_marks_survive_reopening(tmp_path: Path) -> None:
    """Marks saved by one store are there for the next process's store; only one row is kept."""
    first = StateStore(tmp_path)
    first.save(Marks())
    first.save(MARKS)
    first.close()
    second = StateStore(tmp_path)
    try:
        assert second.load() == MARKS
    finally:
        second.close()
    with closing(sqlite3.connect(tmp_path / FILENAME)) as db:
        assert db.execute("SELECT count(*) FROM marks").fetchone() == (1,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
