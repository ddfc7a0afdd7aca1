"""A span sink that encodes and sends in a child process, on the machine's other core.

The daemon's Trio thread renders spans while :class:`~hydra_otel.adapters.otlp.OtlpSink`
encodes and sends the previous batch in a worker thread, and the two share one GIL:
in a burst the export thread took about a third of the process's samples from the
thread that renders. :class:`ProcessSink` hands each batch to a child process instead
(adapters/export_worker.py, a fresh interpreter started with ``python -m``, never a
fork of this threaded process), which runs the very same ``OtlpSink``. A batch crosses
the pipe as plain tuples in marshal (core/span_tuples.py: about 2 µs a span here,
against 6-8 µs to pickle the records). docs/decisions/0007-export-process.md has the
measurements.

Behind the :class:`~hydra_otel.adapters.otlp.SpanSink` protocol nothing changes for the
exporter task: one batch in flight, a :class:`Delivery` back with refused spans
identified by their index, and a retry of the same batch object resumes at the first
unacknowledged request (the child keeps that state).

When the child dies (killed, out of memory, a bug), the call that was waiting for it
returns a Delivery that is not done, so the exporter task retries the batch with its
backoff; the death is logged once and counted (:attr:`ProcessSink.restarts`), and the
next call starts a new child and sends what the old one had not settled. Nothing is
lost: at worst requests acknowledged just before the death are sent again, which
at-least-once delivery allows. A call cancelled while the child works (the shutdown
deadline, a pipeline restart) kills the child, so a late answer can never be taken for
the next batch's.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio
from opentelemetry.sdk.resources import Resource

import hydra_otel
from hydra_otel.adapters.export_worker import BATCH, RESUME, frame, init_frame
from hydra_otel.adapters.otlp import DEFAULT_MAX_REQUEST_BYTES, Delivery, ExporterSettings
from hydra_otel.core.span_tuples import pack
from hydra_otel.core.spans import SpanRecord
from hydra_otel.selfmon.stats import Stats

log = logging.getLogger("hydra_otel.export")

#: How long :meth:`ProcessSink.shutdown` waits for the child to finish and exit before killing it.
EXIT_WAIT_S = 5.0
_WORKER = "hydra_otel.adapters.export_worker"


class ChildDiedError(Exception):
    """The export process ended (or closed its pipe) while an export waited for it."""


class _Child:
    """One running export process and the parent's (non-blocking) ends of its two pipes."""

    def __init__(self, init: bytes) -> None:
        child_in, self.to_child = os.pipe()  # (read end, write end)
        self.from_child, child_out = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", _WORKER, str(child_in), str(child_out)],
            pass_fds=(child_in, child_out),
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),  # a stray print() must not reach the protocol pipe
            env=_child_env(),
        )
        os.close(child_in)
        os.close(child_out)
        os.write(self.to_child, init)  # small: fits the pipe's buffer, so this never blocks
        os.set_blocking(self.to_child, False)
        os.set_blocking(self.from_child, False)
        self.buffer = bytearray()
        self.closed = False
        #: The child holds the unfinished state of the sink's held batch.
        self.holds_batch = False
        #: Where in the batch the spans the child was sent start (after a restart, past the settled ones).
        self.offset = 0

    async def exchange(self, request: bytes) -> bytes:
        """Send one frame and wait for the answer's body.

        Raises:
            ChildDiedError: the child ended before answering.
        """
        await self._write(request)
        head = await self._read(4)
        return await self._read(int.from_bytes(head, "big"))

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.to_child, view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.to_child)
            except BrokenPipeError as exc:
                raise ChildDiedError from exc
        await trio.lowlevel.checkpoint()

    async def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                chunk = os.read(self.from_child, 1 << 16)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.from_child)
                continue
            if not chunk:
                raise ChildDiedError
            self.buffer += chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def close(self) -> None:
        """Close the pipes (the child sees the end of its input and exits)."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.to_child, self.from_child):
            with contextlib.suppress(RuntimeError):  # outside Trio: no task can be waiting on it
                trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def kill(self) -> None:
        """End the child now and close the pipes (reap it with ``proc.wait()``)."""
        self.close()
        if self.proc.poll() is None:
            self.proc.kill()


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path as the child's ``PYTHONPATH``.

    As multiprocessing's *spawn* does: a launcher may set up the path in the program itself (Nix's
    wrapped scripts do), and the child must import the same hydra_otel and the same OpenTelemetry.
    """
    env = dict(os.environ)
    src = str(Path(hydra_otel.__file__).resolve().parents[1])
    paths = [src, *(p for p in sys.path if p and p != src)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class ProcessSink:
    """A :class:`~hydra_otel.adapters.otlp.SpanSink` whose export runs in a child process.

    The child is started here, so that its imports overlap the daemon's own start-up.

    Args:
        settings: the OTLP exporter's settings (TLS, headers, compression: the child builds
            its exporter from them exactly as :func:`~hydra_otel.adapters.otlp.make_exporter` does).
        resource: the resource every span carries.
        max_request_bytes: encoded size of one request at most.
        log_level: the child's log level (its lines go to the same stderr, in the same format).
        secrets: what the child's log lines must never show.
        stats: where deaths of the child are counted (``export_process_restarts``), if anywhere.
    """

    def __init__(
        self,
        settings: ExporterSettings,
        resource: Resource,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        *,
        log_level: str = "info",
        secrets: Sequence[str] = (),
        stats: Stats | None = None,
    ) -> None:
        self._init = init_frame(settings, resource, max_request_bytes, log_level, secrets)
        self._child: _Child | None = _Child(self._init)
        #: The batch whose last export did not finish, how many of its first spans are settled, and
        #: whether its repaired spans were counted already.
        self._held: Sequence[SpanRecord] | None = None
        self._settled = 0
        self._counted = False
        #: Children killed after a cancelled export, still to be waited for.
        self._killed: list[subprocess.Popen[bytes]] = []
        #: Export processes that died and were replaced.
        self.restarts = 0
        self._stats = stats

    @property
    def pid(self) -> int | None:
        """The running child's process ID (for tests and operators), or None between children."""
        return None if self._child is None else self._child.proc.pid

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        """Export ``batch`` in the child; a retry of the same object resumes where it stopped."""
        self._killed = [p for p in self._killed if p.poll() is None]
        if self._child is None:
            self._child = _Child(self._init)
        child = self._child
        resume = batch is self._held and child.holds_batch
        if batch is not self._held:
            self._held, self._settled, self._counted = batch, 0, False
        if resume:
            request = frame(RESUME)
        else:  # a new batch, or the rest of one a dead child had not settled
            child.offset = self._settled
            flag = b"\x00" if self._counted else b"\x01"
            request = frame(BATCH + flag + pack(batch[child.offset :]))
        done = False
        try:
            body = await child.exchange(request)
            done = True
        except ChildDiedError:
            return await self._died(child)
        finally:
            if not done and self._child is child:  # cancelled mid-exchange: the pipe is out of step
                child.kill()
                self._killed.append(child.proc)
                self._child = None
        return self._delivery(child, batch, body)

    def _delivery(self, child: _Child, batch: Sequence[SpanRecord], body: bytes) -> Delivery:
        done, refused, repaired, example, reason, unsettled = marshal.loads(body)
        self._counted = True
        # The unsettled spans are always the batch's last ones (OtlpSink.unsettled).
        self._settled, child.holds_batch = len(batch) - unsettled, not done
        if done:
            self._held = None
        return Delivery(
            done=done,
            refused=tuple((batch[child.offset + i], why) for i, why in refused),
            repaired=repaired,
            repair_example=example,
            reason=reason,
        )

    async def _died(self, child: _Child) -> Delivery:
        child.kill()
        self._child = None
        code = await trio.to_thread.run_sync(child.proc.wait)
        self.restarts += 1
        if self._stats is not None:
            self._stats.export_process_restarts += 1
        log.error(
            "the span export process ended unexpectedly; starting a new one and retrying the batch",
            extra={"exit_code": code, "pid": child.proc.pid, "restarts": self.restarts},
        )
        return Delivery(done=False, reason=f"the span export process ended (exit code {code})")

    def shutdown(self) -> None:
        """Let the child finish and exit (its input ends), killing it after :data:`EXIT_WAIT_S`."""
        for proc in self._killed:
            proc.wait()
        self._killed = []
        child, self._child = self._child, None
        if child is None:
            return
        child.close()
        try:
            child.proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
