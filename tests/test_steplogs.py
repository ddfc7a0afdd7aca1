"""Reading failed-step log tails from disk (adapters/steplogs.py): plain, .bz2 and .zst files.

Files are made in ``tmp_path`` in Hydra's layout. ``.zst`` tests need the ``zstd`` program (as
Hydra's own log compression does) and are skipped without it. Hostile layouts (links out of the
directory, FIFOs, devices, sockets, decompression bombs) are in tests/test_steplogs_hostile.py.
"""

from __future__ import annotations

import bz2
import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from hydra_otel.adapters.steplogs import (
    StepLogs,
    TailOutcome,
    TailSettings,
    read_tail_sync,
)
from hydra_otel.core.builds import step_span
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.logtail import EVENT_NAME, LogLocation, hydra_log_path, log_location
from tests.factories import make_build, make_step

ZSTD = shutil.which("zstd")
needs_zstd = pytest.mark.skipif(ZSTD is None, reason="the zstd program is not installed")

CFG = RenderConfig(instance="hydra", hydra_url="https://hydra.example.org", error_text_limit=100)
T0 = 1_700_000_000
DRV = "/nix/store/0c9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-hello-2.12.drv"
LINES = b"".join(b"building line %d\n" % i for i in range(200)) + b"error: builder failed with exit code 1\n"


def settings(tmp_path: Path, **kw: object) -> TailSettings:
    """Tail settings for logs under ``tmp_path`` (10 lines, 1 KiB)."""
    base: dict[str, object] = {"logs_dir": str(tmp_path), "max_lines": 10, "max_bytes": 1024, "zstd": ZSTD}
    base.update(kw)
    return TailSettings(**base)  # type: ignore[arg-type]


def write_log(tmp_path: Path, data: bytes, suffix: str = "") -> str:
    """Write ``data`` at DRV's laid-out log path (compressed per ``suffix``); return the plain path."""
    plain = hydra_log_path(str(tmp_path), DRV)
    Path(plain).parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".bz2":
        Path(plain + suffix).write_bytes(bz2.compress(data))
    elif suffix == ".zst":
        assert ZSTD is not None
        Path(plain + suffix).write_bytes(
            subprocess.run([ZSTD, "-q", "-c"], input=data, capture_output=True, check=True).stdout
        )
    else:
        Path(plain).write_bytes(data)
    return plain


def candidates() -> list[LogLocation]:
    """DRV's places below the log directory, as core.logtail.log_candidates gives them."""
    loc = log_location(DRV)
    assert loc is not None
    bucket, name = loc
    return [(bucket, name), (bucket, name + ".bz2"), (bucket, name + ".zst")]


def expected_tail(n: int = 10) -> str:
    """The last ``n`` lines of LINES."""
    return "\n".join(LINES.decode().rstrip("\n").split("\n")[-n:])


@pytest.mark.parametrize("suffix", ["", ".bz2", pytest.param(".zst", marks=needs_zstd)])
def test_tail_of_each_format(tmp_path: Path, suffix: str) -> None:
    """Plain, bzip2 and zstd logs give the same last lines."""
    plain = write_log(tmp_path, LINES, suffix)
    result = read_tail_sync(candidates(), settings(tmp_path))
    assert result.outcome is TailOutcome.FOUND
    assert result.tail is not None
    assert result.tail.path == plain + suffix
    assert result.tail.text == expected_tail()
    assert (result.tail.lines, result.tail.truncated) == (10, True)


def test_huge_plain_log_is_read_only_at_the_end(tmp_path: Path) -> None:
    """A 1 GiB (sparse) log costs one bounded read from its end."""
    plain = hydra_log_path(str(tmp_path), DRV)
    Path(plain).parent.mkdir(parents=True)
    with open(plain, "wb") as f:
        f.truncate(1 << 30)
        f.seek(0, 2)
        f.write(LINES)
    result = read_tail_sync(candidates()[:1], settings(tmp_path))
    assert result.tail is not None
    assert result.tail.bytes_read <= 1024
    assert result.tail.text.endswith("error: builder failed with exit code 1")
    assert result.tail.lines == 10


def test_small_log_is_whole(tmp_path: Path) -> None:
    """A log shorter than the bounds is returned whole and not marked truncated."""
    write_log(tmp_path, b"one\ntwo\n")
    tail = read_tail_sync(candidates()[:1], settings(tmp_path)).tail
    assert tail is not None
    assert (tail.text, tail.lines, tail.truncated) == ("one\ntwo", 2, False)


def test_large_bz2_keeps_a_bounded_tail(tmp_path: Path) -> None:
    """A bzip2 log much larger than the window streams through it and ends right."""
    big = b"".join(b"%08d some compiler output\n" % i for i in range(100_000))  # ~3 MB
    write_log(tmp_path, big, ".bz2")
    tail = read_tail_sync(candidates(), settings(tmp_path, max_lines=3)).tail
    assert tail is not None
    assert (
        tail.text
        == "00099997 some compiler output\n00099998 some compiler output\n00099999 some compiler output"
    )


def test_multistream_and_truncated_bz2(tmp_path: Path) -> None:
    """Concatenated bzip2 streams are read to the end; a stream cut short gives what it holds."""
    plain = hydra_log_path(str(tmp_path), DRV)
    Path(plain).parent.mkdir(parents=True)
    Path(plain + ".bz2").write_bytes(bz2.compress(b"first\n") + bz2.compress(b"second\n"))
    tail = read_tail_sync(candidates(), settings(tmp_path)).tail
    assert tail is not None
    assert tail.text == "first\nsecond"
    whole = bz2.compress(LINES)
    Path(plain + ".bz2").write_bytes(whole[: len(whole) // 2])
    result = read_tail_sync(candidates(), settings(tmp_path))
    assert result.outcome is TailOutcome.FOUND


def test_compressed_over_the_bound_is_skipped(tmp_path: Path) -> None:
    """A compressed log larger than max_compressed_bytes is not decompressed."""
    write_log(tmp_path, LINES, ".bz2")
    result = read_tail_sync(candidates(), settings(tmp_path, max_compressed_bytes=100))
    assert result == dataclasses.replace(result, outcome=TailOutcome.TOO_LARGE, tail=None)


def test_missing_log(tmp_path: Path) -> None:
    """No candidate exists: no tail."""
    result = read_tail_sync(candidates(), settings(tmp_path))
    assert (result.outcome, result.tail) == (TailOutcome.MISSING, None)


def test_corrupt_bz2_is_unreadable(tmp_path: Path) -> None:
    """A .bz2 file that is not bzip2 is reported, not raised."""
    plain = write_log(tmp_path, b"", ".bz2")
    Path(plain + ".bz2").write_bytes(b"this is not bzip2 at all")
    assert read_tail_sync(candidates(), settings(tmp_path)).outcome is TailOutcome.UNREADABLE


def test_zst_without_the_program(tmp_path: Path) -> None:
    """Without the zstd program a .zst log is unsupported (and nothing crashes)."""
    plain = hydra_log_path(str(tmp_path), DRV)
    Path(plain).parent.mkdir(parents=True)
    Path(plain + ".zst").write_bytes(b"\x28\xb5\x2f\xfd")
    assert read_tail_sync(candidates(), settings(tmp_path, zstd=None)).outcome is TailOutcome.UNSUPPORTED


@needs_zstd
def test_corrupt_zst_is_unreadable(tmp_path: Path) -> None:
    """A .zst file zstd cannot decode is reported, not raised."""
    plain = hydra_log_path(str(tmp_path), DRV)
    Path(plain).parent.mkdir(parents=True)
    Path(plain + ".zst").write_bytes(b"garbage, not zstd")
    assert read_tail_sync(candidates(), settings(tmp_path)).outcome is TailOutcome.UNREADABLE


def test_non_utf8_content(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 come out as replacement characters."""
    write_log(tmp_path, b"caf\xe9 \xff\n\xc3\xa9t\xc3\xa9\n")
    tail = read_tail_sync(candidates()[:1], settings(tmp_path)).tail
    assert tail is not None
    assert tail.text == "caf\ufffd \ufffd\n\u00e9t\u00e9"


def test_plain_preferred_over_compressed(tmp_path: Path) -> None:
    """While Hydra compresses a log both files exist; the plain one is read."""
    write_log(tmp_path, b"plain\n")
    write_log(tmp_path, b"compressed\n", ".bz2")
    tail = read_tail_sync(candidates(), settings(tmp_path)).tail
    assert tail is not None
    assert tail.text == "plain"


BUILD = make_build(drvpath=DRV, starttime=T0, stoptime=T0 + 60, status=1, size=None, closure_size=None)
STEP = make_step(
    stepnr=2,
    drvpath=DRV,
    status=1,
    errormsg="builder failed",
    starttime=T0,
    stoptime=T0 + 60,
    machine="builder1",
)


async def test_failed_step_gets_a_span_event_when_logs_export_is_off(tmp_path: Path) -> None:
    """Without a log sink, the failed step's span comes back with a log-tail event; others are untouched."""
    write_log(tmp_path, LINES, ".bz2")
    failed = step_span(CFG, BUILD, STEP, 0)
    ok = step_span(CFG, BUILD, STEP._replace(stepnr=1, status=0), 0)
    logs = StepLogs(settings(tmp_path))
    out = await logs.process([ok, failed])
    assert out[0] == ok
    (event,) = out[1].events
    assert event.name == EVENT_NAME
    assert event.time_ns == failed.end_ns
    assert dict(event.attributes)["hydra.step.log_tail"] == expected_tail()
    assert dict(event.attributes)["log.file.path"] == hydra_log_path(str(tmp_path), DRV)
    assert out[1]._replace(events=()) == failed
    assert logs.stats.snapshot() == {"outcomes": {"found": 1}, "refused": {}, "skipped": 0}


async def test_notified_log_path_is_not_read(tmp_path: Path) -> None:
    """The path step_finished carried is never opened: only the step's log in Hydra's layout is read."""
    write_log(tmp_path, b"the step's own log\n")
    elsewhere = tmp_path / "other" / "log.drv"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"from the notification\n")
    failed = step_span(CFG, BUILD, STEP, 0)
    logs = StepLogs(settings(tmp_path))
    out = await logs.process([failed], {(100, 2): str(elsewhere)})
    assert dict(out[0].events[0].attributes)["hydra.step.log_tail"] == "the step's own log"
    assert logs.stats.refused == {"notified_path": 1}
    # the queue runner's own path (the same log, seen through another directory name) is no refusal
    agreed = StepLogs(settings(tmp_path))
    await agreed.process([failed], {(100, 2): hydra_log_path("/elsewhere/build-logs", DRV) + ".bz2"})
    assert agreed.stats.refused == {}


async def test_missing_log_and_batch_bound(tmp_path: Path) -> None:
    """A missing log leaves the span as it was; failed steps beyond max_per_batch are skipped and counted."""
    spans = [step_span(CFG, BUILD, STEP._replace(stepnr=n), 0) for n in range(1, 4)]
    logs = StepLogs(settings(tmp_path, max_per_batch=2))
    assert await logs.process(spans) == spans
    assert logs.stats.snapshot() == {"outcomes": {"missing": 2}, "refused": {}, "skipped": 1}
