"""Log tails read only regular files inside the log directory, without blocking (adapters/steplogs.py).

Each test puts something hostile where a failed step's log should be, or names a file outside the
directory, and checks that it is refused (counted, logged once) and that a secret outside the
directory never ends up in a tail. Reads that could block run in a worker thread under a deadline,
so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import bz2
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from hydra_otel.adapters import steplogs
from hydra_otel.adapters.steplogs import (
    Refusal,
    StepLogs,
    TailOutcome,
    TailResult,
    TailSettings,
    open_below,
    read_tail_sync,
)
from hydra_otel.core.builds import step_span
from hydra_otel.core.logtail import hydra_log_path
from tests.test_steplogs import BUILD, CFG, DRV, STEP, ZSTD, candidates, needs_zstd, settings

SECRET = b"OTEL_EXPORTER_OTLP_HEADERS=api-key=TOPSECRET\n"


def logs_dir(tmp_path: Path) -> Path:
    """The log directory, next to (not above) a secret file."""
    (tmp_path / "secret").write_bytes(SECRET)
    root = tmp_path / "build-logs"
    root.mkdir()
    return root


def laid_out(root: Path, suffix: str = "") -> Path:
    """DRV's log path in ``root``, its bucket directory created."""
    path = Path(hydra_log_path(str(root), DRV) + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def read(root: Path, limit: float = 5.0, **kw: object) -> TailResult:
    """read_tail_sync for DRV in a worker thread, failing (not hanging) if it takes over ``limit`` s."""
    s = settings(root, **kw)
    with trio.fail_after(limit):
        return await trio.to_thread.run_sync(read_tail_sync, candidates(), s, abandon_on_cancel=True)


def assert_refused(result: TailResult, root: Path, reason: Refusal) -> None:
    """``result`` refuses DRV's plain log in ``root`` for ``reason`` and carries no text."""
    assert (result.outcome, result.reason, result.tail) == (TailOutcome.REFUSED, reason, None)
    assert result.path == hydra_log_path(str(root), DRV)


async def test_symlink_to_a_file_outside(tmp_path: Path) -> None:
    """A log that is a link to a file outside the directory is refused, not followed."""
    root = logs_dir(tmp_path)
    laid_out(root).symlink_to(tmp_path / "secret")
    assert_refused(await read(root), root, Refusal.SYMLINK)


async def test_symlinked_bucket_directory(tmp_path: Path) -> None:
    """A bucket directory that is a link out of the tree is refused, whatever it holds."""
    root = logs_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    log = Path(hydra_log_path(str(root), DRV))
    (outside / log.name).write_bytes(SECRET)
    log.parent.symlink_to(outside)
    assert_refused(await read(root), root, Refusal.SYMLINK)


async def test_symlink_inside_the_tree_is_refused_too(tmp_path: Path) -> None:
    """Hydra writes no links in its log directory, so none is followed, even one that stays inside."""
    root = logs_dir(tmp_path)
    (root / "real.log").write_bytes(b"inside\n")
    laid_out(root).symlink_to(root / "real.log")
    assert_refused(await read(root), root, Refusal.SYMLINK)


async def test_compressed_symlink(tmp_path: Path) -> None:
    """The compressed candidates are opened the same way."""
    root = logs_dir(tmp_path)
    laid_out(root, ".bz2").symlink_to(tmp_path / "secret")
    result = await read(root)
    assert (result.outcome, result.reason) == (TailOutcome.REFUSED, Refusal.SYMLINK)


async def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO (no writer) is refused at once; opening it would wait for ever."""
    root = logs_dir(tmp_path)
    os.mkfifo(laid_out(root))
    assert_refused(await read(root, limit=2), root, Refusal.NOT_REGULAR)


async def test_directory_is_refused(tmp_path: Path) -> None:
    """A directory where the log should be is refused."""
    root = logs_dir(tmp_path)
    laid_out(root).mkdir()
    assert_refused(await read(root), root, Refusal.NOT_REGULAR)


async def test_socket_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Unix socket where the log should be is refused."""
    root = logs_dir(tmp_path)
    path = laid_out(root)
    monkeypatch.chdir(path.parent)  # a socket's path is limited to ~100 bytes: bind a relative name
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path.name)
        assert_refused(await read(root), root, Refusal.NOT_REGULAR)


async def test_device_is_refused(tmp_path: Path) -> None:
    """A character device (like /dev/zero, which never ends) is refused without being opened."""
    root = logs_dir(tmp_path)
    path = laid_out(root)
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("creating a device node needs privileges")
    assert_refused(await read(root), root, Refusal.NOT_REGULAR)


async def test_bucket_that_is_a_file(tmp_path: Path) -> None:
    """A regular file where the bucket directory should be is refused."""
    root = logs_dir(tmp_path)
    Path(hydra_log_path(str(root), DRV)).parent.write_bytes(b"x")
    assert_refused(await read(root), root, Refusal.NOT_REGULAR)


@pytest.mark.parametrize("parts", [("..", "secret"), ("a/b",), (".",), ("",), ()])
def test_open_below_refuses_names_that_leave(tmp_path: Path, parts: tuple[str, ...]) -> None:
    """Only plain names are opened: ``..``, slashes and empty names are refused before any system call."""
    root = logs_dir(tmp_path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(steplogs._Refused) as info:
            open_below(fd, parts)
        assert info.value.reason is Refusal.BAD_NAME
    finally:
        os.close(fd)


def test_open_below_refuses_a_link_that_appears_after_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the file becomes a link between the lstat and the open, O_NOFOLLOW refuses it."""
    root = logs_dir(tmp_path)
    log = laid_out(root)
    log.write_bytes(b"fine\n")
    real_open = os.open

    def swapping_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == log.name:
            log.unlink()
            log.symlink_to(tmp_path / "secret")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", swapping_open)
    fd = real_open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(steplogs._Refused) as info:
            open_below(fd, (log.parent.name, log.name))
        assert info.value.reason is Refusal.SYMLINK
    finally:
        os.close(fd)


async def test_a_fifo_swapped_in_after_the_check_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the file becomes a FIFO between the lstat and the open, O_NONBLOCK and fstat refuse it."""
    root = logs_dir(tmp_path)
    log = laid_out(root)
    log.write_bytes(b"fine\n")
    real_open = os.open

    def swapping_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == log.name and log.is_file():
            log.unlink()
            os.mkfifo(log)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", swapping_open)
    assert_refused(await read(root, limit=2), root, Refusal.NOT_REGULAR)


async def test_missing_log_directory(tmp_path: Path) -> None:
    """A log directory that does not exist gives MISSING, not an error."""
    assert (await read(tmp_path / "nowhere")).outcome is TailOutcome.MISSING


def test_huge_plain_file_reads_one_window(tmp_path: Path) -> None:
    """A 64 GiB (sparse) log costs one bounded read from its end."""
    root = logs_dir(tmp_path)
    with open(laid_out(root), "wb") as f:
        f.truncate(64 << 30)
        f.seek(0, 2)
        f.write(b"last line\n")
    result = read_tail_sync(candidates(), settings(root))
    assert result.tail is not None
    assert result.tail.text.endswith("last line")
    assert result.tail.bytes_read == 1024


def bomb(stream: bytes, copies: int) -> bytes:
    """``copies`` concatenated compressed streams: tiny on disk, gigabytes once decompressed."""
    return stream * copies


def test_bz2_bomb_stops_at_the_deadline(tmp_path: Path) -> None:
    """A small .bz2 that decompresses to 10 GiB is abandoned at the deadline."""
    root = logs_dir(tmp_path)
    laid_out(root, ".bz2").write_bytes(bomb(bz2.compress(b"\0" * (10 << 20)), 1024))
    start = time.monotonic()
    result = read_tail_sync(candidates(), settings(root, timeout_s=0.3))
    assert result.outcome is TailOutcome.TIMED_OUT
    assert time.monotonic() - start < 3


@needs_zstd
def test_zstd_bomb_stops_at_the_deadline_and_the_program_is_killed(tmp_path: Path) -> None:
    """A small .zst that decompresses to 64 GiB is abandoned at the deadline; zstd does not outlive it."""
    assert ZSTD is not None
    root = logs_dir(tmp_path)
    frame = subprocess.run(
        [ZSTD, "-q", "-c"], input=b"\0" * (64 << 20), capture_output=True, check=True
    ).stdout
    laid_out(root, ".zst").write_bytes(bomb(frame, 1024))
    start = time.monotonic()
    result = read_tail_sync(candidates(), settings(root, timeout_s=0.3))
    assert result.outcome is TailOutcome.TIMED_OUT
    assert time.monotonic() - start < 3
    ps = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    assert "zstd -dcq" not in ps.stdout


@pytest.mark.parametrize(
    ("suffix", "data"),
    [
        (".bz2", b"BZh91AY&SY" + b"\xff" * 64),  # a bzip2 header, then garbage
        (".bz2", b""),  # empty: no stream at all
        pytest.param(
            ".zst", b"\x28\xb5\x2f\xfd" + b"\xff" * 64, marks=needs_zstd
        ),  # zstd magic, then garbage
    ],
)
async def test_bad_compression_is_unreadable_or_empty(tmp_path: Path, suffix: str, data: bytes) -> None:
    """Corrupt compressed logs are reported (or give no text), never raised, and never block."""
    root = logs_dir(tmp_path)
    laid_out(root, suffix).write_bytes(data)
    result = await read(root)
    assert result.outcome in {TailOutcome.UNREADABLE, TailOutcome.FOUND}
    assert result.tail is None or result.tail.text == ""


# --- StepLogs: counting, logging once, the payload's path, time bounds -----------------------------


async def test_forged_notified_path_outside_is_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """step_finished naming a secret outside the directory: the step's own log is read, the secret is not."""
    root = logs_dir(tmp_path)
    laid_out(root).write_bytes(b"error: the real failure\n")
    failed = step_span(CFG, BUILD, STEP, 0)
    logs = StepLogs(settings(root))
    with caplog.at_level(logging.WARNING, "hydra_otel.steplogs"):
        for secret in (str(tmp_path / "secret"), f"{root}/0c/../../secret", "/proc/self/environ"):
            (out,) = await logs.process([failed], {(100, 2): secret})
            assert dict(out.events[0].attributes)["hydra.step.log_tail"] == "error: the real failure"
            assert "TOPSECRET" not in repr(out)
    assert logs.stats.refused == {"notified_path": 3}
    assert logs.stats.outcomes == {"found": 3}
    (record,) = [r for r in caplog.records if r.message == steplogs._REFUSAL_TEXT[Refusal.NOTIFIED_PATH]]
    assert record.__dict__["path"] == repr(str(tmp_path / "secret"))  # quoted: the sender chose it


async def test_notified_path_is_quoted_and_bounded_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged path with a newline and 8,000 characters cannot forge or flood a log line."""
    logs = StepLogs(settings(logs_dir(tmp_path)))
    forged = "/x\nlevel=error message=forged" + "a" * 8000
    with caplog.at_level(logging.WARNING, "hydra_otel.steplogs"):
        await logs.process([step_span(CFG, BUILD, STEP, 0)], {(100, 2): forged})
    (record,) = caplog.records
    assert "\n" not in record.__dict__["path"]
    assert len(record.__dict__["path"]) < 300


async def test_refusals_are_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every refused log is counted; the warning comes once per reason, not once per step."""
    root = logs_dir(tmp_path)
    os.mkfifo(laid_out(root))
    logs = StepLogs(settings(root))
    spans = [step_span(CFG, BUILD, STEP._replace(stepnr=n), 0) for n in range(1, 6)]
    with caplog.at_level(logging.WARNING, "hydra_otel.steplogs"), trio.fail_after(5):
        assert await logs.process(spans) == spans
        assert await logs.process(spans) == spans
    assert logs.stats.snapshot() == {
        "outcomes": {"refused": 10},
        "refused": {"not_regular": 10},
        "skipped": 0,
    }
    (record,) = caplog.records
    assert record.message == steplogs._REFUSAL_TEXT[Refusal.NOT_REGULAR]
    assert record.__dict__["path"] == hydra_log_path(str(root), DRV)


async def test_bad_derivation_path_is_refused(tmp_path: Path) -> None:
    """A step row whose derivation path names no file is refused (nothing is opened)."""
    root = logs_dir(tmp_path)
    odd = STEP._replace(drvpath="/nix/store/..")
    logs = StepLogs(settings(root))
    span = step_span(CFG, BUILD, odd, 0)
    assert await logs.process([span]) == [span]
    assert logs.stats.refused == {"bad_name": 1}


def blocking_reader(release: threading.Event) -> Callable[..., None]:
    """A stand-in for the reading thread's loop that is stuck (in the kernel, say) until ``release``."""

    def stuck(*args: object) -> None:
        finished = args[-1]
        assert isinstance(finished, threading.Event)
        try:
            release.wait(30)
        finally:
            finished.set()

    return stuck


async def test_a_stuck_read_is_abandoned_and_not_stacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read stuck past the deadline is left behind; later batches skip reading until it returns."""
    release = threading.Event()
    monkeypatch.setattr(steplogs, "_read_all", blocking_reader(release))
    monkeypatch.setattr(steplogs, "ABANDON_GRACE_S", 0.05)
    failed = step_span(CFG, BUILD, STEP, 0)
    logs = StepLogs(settings(tmp_path, timeout_s=0.1))
    try:
        with trio.fail_after(5):
            assert await logs.process([failed]) == [failed]
        assert logs.stats.outcomes == {"timed_out": 1}
        with trio.fail_after(1):  # no second thread while the first is stuck
            assert await logs.process([failed]) == [failed]
        assert logs.stats.skipped == 1
    finally:
        release.set()
    monkeypatch.undo()
    laid_out(tmp_path).write_bytes(b"readable again\n")
    with trio.fail_after(5):
        if logs._abandoned is not None:  # the thread left behind returns once released
            assert await trio.to_thread.run_sync(logs._abandoned.wait, 5)
        (out,) = await logs.process([failed])
    assert dict(out.events[0].attributes)["hydra.step.log_tail"] == "readable again"


async def test_cancelling_a_stuck_read_returns_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown (cancellation) does not wait for a stuck reading thread."""
    release = threading.Event()
    monkeypatch.setattr(steplogs, "_read_all", blocking_reader(release))
    logs = StepLogs(settings(tmp_path, timeout_s=60))
    failed = step_span(CFG, BUILD, STEP, 0)
    try:
        with trio.move_on_after(0.2) as scope:
            await logs.process([failed])
        assert scope.cancelled_caught
    finally:
        release.set()


def test_settings_default_timeout() -> None:
    """A batch of tails may take 10 s by default."""
    assert TailSettings().timeout_s == steplogs.DEFAULT_TIMEOUT_S == 10.0
