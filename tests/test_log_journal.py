"""Severities reach journald: ``<N>`` prefixes when, and only when, stderr is the journal stream."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from hydra_otel import log as hlog
from hydra_otel.log import JournalPrefixFormatter, JsonFormatter, TextFormatter, journal_priority


def record(level: int, msg: str = "hello") -> logging.LogRecord:
    return logging.LogRecord("hydra_otel.test", level, __file__, 1, msg, None, None)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.WARNING + 5, 4),
    ],
)
def test_levels_map_to_syslog_priorities(level: int, priority: int) -> None:
    assert journal_priority(level) == priority


def test_every_line_of_a_record_carries_the_prefix() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        rec = record(logging.ERROR, "failed")
        rec.exc_info = (type(exc), exc, exc.__traceback__)
    lines = JournalPrefixFormatter(TextFormatter()).format(rec).split("\n")
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


def test_a_json_line_stays_json_after_the_prefix() -> None:
    line = JournalPrefixFormatter(JsonFormatter()).format(record(logging.WARNING))
    assert line.startswith("<4>{")
    assert json.loads(line.removeprefix("<4>"))["level"] == "warning"


def journal_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_stderr_is_the_journal_only_when_its_device_and_inode_match(tmp_path: Path) -> None:
    journal, other = tmp_path / "journal", tmp_path / "other"
    journal.touch()
    other.touch()
    with journal.open("w") as j, other.open("w") as o:
        assert hlog.stderr_is_journal(j, journal_env(journal))
        assert not hlog.stderr_is_journal(o, journal_env(journal))  # inherited, but redirected
        assert not hlog.stderr_is_journal(j, {})
        assert not hlog.stderr_is_journal(j, {"JOURNAL_STREAM": "garbage"})


def test_configure_prefixes_what_it_writes_to_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "journal"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with journal.open("w") as stream:
            monkeypatch.setattr("sys.stderr", stream)
            for key, value in journal_env(journal).items():
                monkeypatch.setenv(key, value)
            hlog.configure("info", secrets=["hunter2-secret"])
            logging.getLogger("hydra_otel.test").error("db password hunter2-secret refused")
            logging.getLogger("hydra_otel.test").info("started")
        lines = journal.read_text().splitlines()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [line[:4] for line in lines] == ["<3>{", "<6>{"]
    assert "hunter2-secret" not in lines[0]  # the redactor still runs
    assert json.loads(lines[0][3:])["message"] == "db password *** refused"
