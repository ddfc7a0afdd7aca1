"""The progress store: marks in ``<state dir>/progress.sqlite3``."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from hydra_otel.adapters.progress_store import FILENAME, LOCK_FILENAME, ProgressStore, inspect
from hydra_otel.core.catchup import Marks
from hydra_otel.errors import StateDirError
from hydra_otel.selfmon.stats import Stats

MARKS = Marks(eval_id=42, stop_time=1_700_000_123, jobsets={1: 1_700_000_100, 20: 1_700_000_050})


def open_store(path: Path, instance: str = "hydra", **kwargs: object) -> ProgressStore:
    return ProgressStore(path, instance=instance, **kwargs)  # type: ignore[arg-type]


def test_first_start_has_no_marks(tmp_path: Path) -> None:
    """A new state directory (created if missing) holds no marks."""
    store = open_store(tmp_path / "new" / "state")
    try:
        assert store.load() is None
        assert (tmp_path / "new" / "state" / FILENAME).is_file()
    finally:
        store.close()


def test_round_trip(tmp_path: Path) -> None:
    """What is saved is loaded back equal, jobset IDs as integers; a later save replaces it."""
    store = open_store(tmp_path)
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
    first = open_store(tmp_path)
    first.save(Marks())
    first.save(MARKS)
    first.close()
    second = open_store(tmp_path)
    try:
        assert second.load() == MARKS
    finally:
        second.close()
    with closing(sqlite3.connect(tmp_path / FILENAME)) as db:
        assert db.execute("SELECT count(*) FROM marks").fetchone() == (1,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def write_raw(state_dir: Path, value: str | None = None, meta: dict[str, str] | None = None) -> None:
    """Write the store's tables directly, as another version or a damaged disk might have."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(state_dir / FILENAME)) as db, db:
        db.execute("CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        if value is not None:
            db.execute("INSERT OR REPLACE INTO marks VALUES ('progress', ?)", (value,))
        if meta is not None:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())


GOOD_JSON = json.dumps({"eval_id": 7, "stop_time": 100, "jobsets": {"1": 5}})
REFUSED: list[tuple[str | None, dict[str, str] | None, str]] = [
    ("{not json", None, "holds progress marks that are not valid: Expecting property name"),
    (json.dumps({"eval_id": 7, "stop_time": 100, "jobsets": {}, "x": 1}), None, "unknown key 'x'"),
    (json.dumps({"eval_id": "7", "stop_time": 100, "jobsets": {}}), None, "'eval_id' is a string"),
    (json.dumps({"eval_id": 7, "stop_time": -5, "jobsets": {}}), None, "'stop_time' is -5, outside"),
    (GOOD_JSON, {"format": "2", "instance": "hydra"}, "store format '2', written by a newer hydra-otel"),
    (GOOD_JSON, {"format": "x", "instance": "hydra"}, "store format 'x', which no hydra-otel writes"),
    (GOOD_JSON, {"format": "1", "instance": "staging"}, "holds the progress of instance 'staging', not"),
]


@pytest.mark.parametrize(("value", "meta", "reason"), REFUSED)
def test_unusable_store_refused(
    tmp_path: Path, value: str | None, meta: dict[str, str] | None, reason: str
) -> None:
    """Invalid marks, another store format or another instance's marks: refused, saying why and what to do."""
    write_raw(tmp_path, value, meta)
    with pytest.raises(StateDirError, match="delete it to start from the present") as info:
        open_store(tmp_path)
    assert reason in str(info.value)
    with pytest.raises(StateDirError) as checked:
        inspect(tmp_path, "hydra")
    assert str(checked.value) == str(info.value), "check says what the daemon would"
    open_store(tmp_path / "other").close()  # the lock was released


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is no SQLite database is refused with a message, not a traceback."""
    (tmp_path / FILENAME).write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StateDirError, match="is not a progress store"):
        open_store(tmp_path)


def test_store_of_an_earlier_version_is_adopted(tmp_path: Path) -> None:
    """A store written before the format and instance were recorded is read, and gets them recorded."""
    write_raw(tmp_path, GOOD_JSON)
    store = open_store(tmp_path, "main")
    assert store.load() == Marks(eval_id=7, stop_time=100, jobsets={1: 5})
    store.close()
    with pytest.raises(StateDirError, match="instance 'main', not of --instance 'other'"):
        open_store(tmp_path, "other")


def test_one_process_per_state_directory(tmp_path: Path) -> None:
    """While one store is open, another on the same directory is refused (naming the PID); after close it opens."""
    first = open_store(tmp_path)
    with pytest.raises(StateDirError, match=f"in use by another hydra-otel process \\(pid {os.getpid()}\\)"):
        open_store(tmp_path)
    first.close()
    open_store(tmp_path).close()
    assert (tmp_path / LOCK_FILENAME).exists()


@contextmanager
def writes_blocked(state_dir: Path) -> Iterator[None]:
    """Hold SQLite's write lock from another connection, so the store's writes fail as on a full disk."""
    with closing(sqlite3.connect(state_dir / FILENAME, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")


def test_failed_writes_keep_the_marks_and_retry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write that fails is logged once, counted and retried with the next merge; nothing raises."""
    caplog.set_level(logging.INFO, "hydra_otel.state")
    stats = Stats()
    store = open_store(tmp_path, stats=stats, timeout=0.01)
    store.merge(MARKS)
    with writes_blocked(tmp_path):
        first = store.merge(Marks(eval_id=50))
        second = store.merge(Marks(stop_time=1_800_000_000))
        assert (store.pending, stats.marks_store_failures) == (True, 2)
    assert second == first.merged(Marks(stop_time=1_800_000_000))
    assert store.load() == second, "kept in memory"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "logged once per outage"
    assert store.merge(Marks()) == second
    assert not store.pending
    assert caplog.records[-1].getMessage() == "progress marks stored again"
    store.close()
    reopened = open_store(tmp_path)
    assert reopened.load() == second
    reopened.close()


def test_close_tries_once_more(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Marks a failed write left behind are written at close if the disk allows, else an error says so."""
    store = open_store(tmp_path, timeout=0.01)
    with writes_blocked(tmp_path):
        store.merge(MARKS)
    store.close()
    assert inspect(tmp_path, "hydra").startswith("marks: evaluation 42")
    store = open_store(tmp_path, timeout=0.01)
    with writes_blocked(tmp_path), caplog.at_level(logging.ERROR, "hydra_otel.state"):
        store.merge(Marks(eval_id=99))
        store.close()
    assert "progress marks could not be stored" in caplog.text


def test_inspect_changes_nothing(tmp_path: Path) -> None:
    """``check``'s reading of the store neither creates files nor records anything."""
    assert inspect(tmp_path / "none", "hydra").startswith("no progress marks yet")
    assert not (tmp_path / "none").exists()
    store = open_store(tmp_path)
    store.save(MARKS)
    assert inspect(tmp_path, "hydra").startswith("marks: evaluation 42"), "also while a daemon has it open"
    store.close()
    before = sorted(os.listdir(tmp_path))
    assert inspect(tmp_path, "hydra") == "marks: evaluation 42, stop time 1700000123, 2 jobsets"
    assert sorted(os.listdir(tmp_path)) == before


def test_inspect_an_empty_database(tmp_path: Path) -> None:
    """An empty SQLite file is what the daemon would start with as a new store, so check accepts it."""
    sqlite3.connect(tmp_path / FILENAME).close()
    assert inspect(tmp_path, "hydra").startswith("no progress marks yet")
