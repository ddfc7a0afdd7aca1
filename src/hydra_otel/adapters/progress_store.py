"""The progress store: processed-up-to marks in the state directory.

A small SQLite database (``<state dir>/progress.sqlite3``), written in WAL mode
with synchronous=FULL so a committed mark survives a crash or power loss. Marks
are only written after the OTLP endpoint acknowledged every span derived from
what they cover (see tasks/catchup_task.py), so losing the process at any moment
re-exports at most the window since the last mark. The store is the daemon's
only write, and it never touches Hydra's database.

What makes a store unusable is found when it is opened, before anything else
starts, and reported as a :class:`StateDirError` (exit code 2) that says what to
do: another process using the directory (``progress.lock``, held with
``flock`` while the store is open), marks of another instance name or of an
unknown store format (the ``meta`` table), marks that fail validation
(:func:`hydra_otel.core.catchup.marks_from_json`), a file that is no SQLite
database. A write that fails later (a full disk) is not fatal: the marks are
kept in memory, the failure is logged once and counted, and every later
checkpoint tries again; at worst a restart re-exports from the last stored marks.

Calls are short, local and synchronous; tasks run them through
``trio.to_thread.run_sync`` so the event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Final

from hydra_otel.core.catchup import Marks, marks_from_json, marks_to_json
from hydra_otel.errors import StateDirError
from hydra_otel.selfmon.stats import Stats

log = logging.getLogger("hydra_otel.state")

FILENAME: Final = "progress.sqlite3"
LOCK_FILENAME: Final = "progress.lock"
#: The store's format. Stores written before the ``meta`` table existed are format 1 too.
FORMAT: Final = 1
#: What a failed write or read of the store can raise.
STORE_ERRORS: Final = (OSError, sqlite3.Error)
_START_OVER = "delete it to start from the present (`hydra-otel backfill` loads history)"


class ProgressStore:
    """Reads and writes :class:`Marks` (blocking; call from a worker thread).

    Args:
        state_dir: the directory; created if missing.
        instance: the ``--instance`` name, recorded on first use and checked on every open.
        stats: where failed writes are counted (``marks_store_failures``).
        timeout: seconds a write waits for SQLite's own lock before it counts as failed.

    Raises:
        StateDirError: the directory or the store cannot be used; the message says why and what to do.
    """

    def __init__(
        self, state_dir: Path, *, instance: str, stats: Stats | None = None, timeout: float = 5.0
    ) -> None:
        self.path = state_dir / FILENAME
        self._stats = stats
        self.pending = False  # the latest marks are not on disk (a write failed)
        self._lock = _lock(state_dir)
        try:
            self._db = _connect(self.path, timeout)
            try:
                self._marks = _open_checked(self._db, self.path, instance)
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            os.close(self._lock)
            raise

    def load(self) -> Marks | None:
        """The marks (as read when opened, then as merged since), or None on first start."""
        return self._marks

    def save(self, marks: Marks) -> None:
        """Store ``marks`` durably (one atomic transaction).

        Raises:
            OSError, sqlite3.Error: the write failed; nothing changed on disk.
        """
        self._db.execute(
            "INSERT INTO marks (name, value) VALUES ('progress', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (json.dumps(marks_to_json(marks), sort_keys=True),),
        )
        self._marks = marks

    def merge(self, marks: Marks) -> Marks:
        """Merge ``marks`` into the current ones (marks only move forward), store them and return them.

        Several writers (the catch-up's first marks, checkpoints, live jobset checks) can each pass
        just what they cover. A failed write does not raise: it is logged (once until a write
        succeeds again) and counted, the merged marks are kept and returned, :attr:`pending` is set,
        and the next call writes everything again.
        """
        merged = (self._marks or Marks()).merged(marks)
        try:
            self.save(merged)
        except STORE_ERRORS as exc:
            self._marks = merged
            self._failed(exc)
        else:
            if self.pending:
                log.info("progress marks stored again", extra={"path": str(self.path)})
            self.pending = False
        return merged

    def _failed(self, exc: BaseException) -> None:
        if self._stats is not None:
            self._stats.marks_store_failures += 1
        if not self.pending:
            log.warning(
                "cannot store progress marks; exporting goes on and every checkpoint tries again",
                extra={"path": str(self.path), "error": str(exc) or type(exc).__name__},
            )
        self.pending = True

    def close(self) -> None:
        """Try once more to store marks a failed write left behind, close the file, release the lock."""
        try:
            if self.pending and self._marks is not None:
                self.merge(Marks())
                if self.pending:
                    log.error(
                        "progress marks could not be stored; the next start exports again from the "
                        "last stored ones (identical spans, same IDs)",
                        extra={"path": str(self.path)},
                    )
            self._db.close()
        finally:
            os.close(self._lock)


def inspect(state_dir: Path, instance: str) -> str:
    """Read the store without changing anything, as ``hydra-otel check`` does (blocking).

    Returns:
        What the store holds, in a few words.

    Raises:
        StateDirError: the daemon would refuse to start with this store; the message says why.
    """
    path = state_dir / FILENAME
    if not path.exists():
        return "no progress marks yet: the first start begins at the present"
    # Read-only still creates the -wal and -shm files when they are missing, and owned by whoever runs
    # check (root, say) they would lock the daemon out; then the database file alone is complete.
    wal = all(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))
    mode = "mode=ro" if wal else "immutable=1"
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?{mode}", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    with contextlib.closing(db):
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            _check_recorded(_read_meta(db) if "meta" in tables else {}, path, instance)
            marks = _read_marks(db, path) if "marks" in tables else None
        except sqlite3.Error as exc:
            raise _unusable(path, exc) from None
    if marks is None:
        return "no progress marks yet: the first start begins at the present"
    return f"marks: evaluation {marks.eval_id}, stop time {marks.stop_time}, {len(marks.jobsets)} jobsets"


def _lock(state_dir: Path) -> int:
    """Create the directory and take ``progress.lock``; its file descriptor (closing it unlocks)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateDirError(
            f"cannot use the state directory {state_dir}: {exc.strerror or exc}; "
            "set --state-dir / HYDRA_OTEL_STATE_DIR to a writable directory"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirError(
            f"the state directory {state_dir} is in use by another hydra-otel process (pid {holder}); "
            "give each daemon its own --state-dir / HYDRA_OTEL_STATE_DIR (standbys too)"
        ) from None
    with contextlib.suppress(OSError):  # the PID only makes the message above more helpful
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    except sqlite3.Error as exc:
        db.close()
        raise _unusable(path, exc) from None
    return db


def _unusable(path: Path, exc: BaseException) -> StateDirError:
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return StateDirError(f"{path} is not a progress store (not a SQLite database): {_START_OVER}")
    return StateDirError(
        f"cannot use the progress store {path}: {exc}; free space or fix its permissions, "
        "or set --state-dir / HYDRA_OTEL_STATE_DIR to a writable directory"
    )


def _read_meta(db: sqlite3.Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}


def _open_checked(db: sqlite3.Connection, path: Path, instance: str) -> Marks | None:
    """Refuse a store of another format or instance, or with invalid marks; return the marks.

    A new store, or one written before the ``meta`` table existed, gets its format and instance
    recorded.
    """
    try:
        meta = _read_meta(db)
        _check_recorded(meta, path, instance)
        marks = _read_marks(db, path)
        if meta.get("format") is None or meta.get("instance") is None:
            with db:  # one transaction
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(FORMAT),))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('instance', ?)", (instance,))
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    return marks


def _check_recorded(meta: dict[str, str], path: Path, instance: str) -> None:
    found = meta.get("format")
    if found is not None and found != str(FORMAT):
        if found.isdigit() and int(found) > FORMAT:
            origin = "written by a newer hydra-otel"
            fix = "run that version, or "
        else:
            origin, fix = "which no hydra-otel writes", ""
        raise StateDirError(
            f"{path} has store format {found[:20]!r}, {origin} (this one reads format {FORMAT}): "
            f"{fix}{_START_OVER}"
        )
    recorded = meta.get("instance")
    if recorded is not None and recorded != instance:
        raise StateDirError(
            f"{path} holds the progress of instance {recorded!r}, not of --instance {instance!r}: "
            "each instance needs its own --state-dir / HYDRA_OTEL_STATE_DIR (sharing one would mix "
            f"their marks and lose spans); if the instance was renamed on purpose, {_START_OVER}"
        )


def _read_marks(db: sqlite3.Connection, path: Path) -> Marks | None:
    row = db.execute("SELECT value FROM marks WHERE name = 'progress'").fetchone()
    if row is None:
        return None
    try:
        return marks_from_json(json.loads(row[0]))
    except ValueError as exc:  # json.JSONDecodeError is one too
        raise StateDirError(f"{path} holds progress marks that are not valid: {exc}; {_START_OVER}") from None
