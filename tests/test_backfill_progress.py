"""The backfill's progress file: validated when read, and a full disk does not stop a backfill."""

from __future__ import annotations

import json
import logging
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hydra_otel.backfill import PROGRESS_FILE, BackfillError, BackfillProgressFile
from hydra_otel.backfill.progress import SelectionProgress, selection_progress_from_json

ENTRY = {"since": 0, "until": 1_700_000_000, "jobsets": ["nixpkgs:trunk"], "last_eval_id": 7,
         "evals_done": 3, "complete": False, "updated": "2026-12-01T00:00:00Z"}  # fmt: skip
PROGRESS = SelectionProgress(since=0, until=1_700_000_000, jobsets=("nixpkgs:trunk",), last_eval_id=7)


def test_entry_round_trip_and_earlier_versions() -> None:
    """A full entry is read as written; one without the optional keys gets their defaults."""
    assert selection_progress_from_json(ENTRY).last_eval_id == 7
    assert selection_progress_from_json({"since": 1, "until": 2, "jobsets": []}) == SelectionProgress(
        since=1, until=2, jobsets=()
    )


INVALID: list[tuple[object, str]] = [
    ([], "the entry is not a JSON object"),
    ({**ENTRY, "rate": 5}, "unknown key 'rate'"),
    ({"since": 1, "jobsets": []}, "key 'until' is missing"),
    ({**ENTRY, "jobsets": "nixpkgs:trunk"}, "'jobsets' is not a list of jobset names"),
    ({**ENTRY, "jobsets": [1]}, "'jobsets' is not a list of jobset names"),
    ({**ENTRY, "last_eval_id": "7"}, "'last_eval_id' is \"7\", not an integer"),
    ({**ENTRY, "last_eval_id": -1}, "'last_eval_id' is -1, not an integer from 0"),
    ({**ENTRY, "evals_done": 2**40}, f"'evals_done' is {2**40}, not an integer"),
    ({**ENTRY, "until": 1.5}, "'until' is 1.5, not an integer"),
    ({**ENTRY, "since": True}, "'since' is true, not an integer"),
    ({**ENTRY, "complete": "yes"}, "'complete' is not true or false"),
]


@pytest.mark.parametrize(("entry", "reason"), INVALID)
def test_invalid_entries(entry: object, reason: str) -> None:
    """An entry with an unknown or missing key, a wrong type or an out-of-range value is refused, saying which."""
    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        selection_progress_from_json(entry)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            {"version": 1, "selections": {"k": {**ENTRY, "last_eval_id": "x"}}},
            "the progress of this selection is not valid",
        ),
        ({"version": 2, "selections": {}}, "has format 2, written by a newer hydra-otel"),
        ({"version": "1", "selections": {}}, "is not a backfill progress file"),
        ({"selections": {}}, "is not a backfill progress file"),
        ([], "is not a backfill progress file"),
    ],
)
def test_unusable_file_exit_2(tmp_path: Path, content: object, reason: str) -> None:
    """A file hydra-otel cannot use stops the backfill with exit code 2 and a message, never a traceback."""
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(content))
    with pytest.raises(BackfillError) as info:
        BackfillProgressFile(tmp_path).load("k")
    assert info.value.status == 2
    assert reason in str(info.value)


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_checkpoint_survives_a_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint that cannot be written returns False and is logged once; the next one writes everything."""
    caplog.set_level(logging.INFO, "hydra_otel.backfill")
    store = BackfillProgressFile(tmp_path)
    assert store.checkpoint("k", PROGRESS)
    with file_size_limit(16):
        assert not store.checkpoint("k", PROGRESS)
        assert not store.checkpoint("k", SelectionProgress(since=0, until=1, jobsets=(), last_eval_id=9))
    assert store.load("k") == PROGRESS, "the previous version is intact"
    assert [r.getMessage() for r in caplog.records] == [
        "cannot write the backfill progress; exporting goes on and every checkpoint tries again"
    ]
    assert store.checkpoint("k", SelectionProgress(since=0, until=1, jobsets=(), last_eval_id=10))
    assert caplog.records[-1].getMessage() == "backfill progress written again"
    assert store.load("k") == SelectionProgress(since=0, until=1, jobsets=(), last_eval_id=10)
    assert [p.name for p in tmp_path.iterdir()] == [PROGRESS_FILE], "no temporary file left behind"


def test_first_and_last_write_fail_clearly(tmp_path: Path) -> None:
    """The writes that cannot wait for a later checkpoint fail with exit code 2 and what to do."""
    with file_size_limit(16), pytest.raises(BackfillError, match="free space") as info:
        BackfillProgressFile(tmp_path).store("k", PROGRESS)
    assert info.value.status == 2
