"""Read pacing of the LISTEN connection: one latency budget with the exporter.

Theory of operation. At a steady trickle each commit's notifications arrive in a read of
their own, and each read wakes trio-asyncio's reader machinery and every pipeline stage, and
costs the resolver its queries and the exporter a request (about 2.3 ms of CPU per read on
the project machine, docs/performance.md). So after a read the connection stops reading for
``linger`` seconds (the export delay: the exporter then sends what the window brought at once,
so both waits are one budget) and lets the kernel's socket buffer collect what arrives
meanwhile: one read, one wake-up of each stage, one query per table and one export serve the
whole window. Nothing is lost while paused: the server keeps what does not fit in the socket
buffer.

A burst must not wait for the window. While paused, the socket is checked every ``poll``
seconds for bytes waiting (``ioctl(FIONREAD)``, which reads nothing). The checks run in a
small thread of their own (:class:`_BurstWatch`), which wakes the event loop only when
``quiet`` bytes wait: on the loop, each check took a timer, two wake-ups of trio-asyncio's
loop and a pass of trio's scheduler, about 0.5 % of a core at a steady 100 builds a second,
an eighth of the daemon's CPU then (docs/performance.md). At the end of the window one timer
resumes reading.

* ``quiet`` bytes or more waiting end the pause at once;
* if they came faster than ``quiet`` bytes per ``poll`` seconds, it is a burst: pacing stops,
  and every read is handed on at once until a whole ``poll`` window of reads brings less than
  ``quiet`` bytes again. (Slower, it is a busy trickle: the pause ends early, pacing goes on.)

A read of ``quiet`` bytes or more that is not a pause's backlog (a burst that began while the
connection was reading) stops pacing at once too.

So a burst that starts during a pause waits ``poll`` seconds at most, a burst is read as fast
as without pacing, and a notification waits ``linger`` at most. A caller that expects an answer
on the connection (the health probe) holds reading open with :meth:`ReadPacer.hold_open`.

asyncio-flavoured: the methods run in the trio-asyncio loop's thread, as asyncio callbacks.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import fcntl
import functools
import logging
import math
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("hydra_otel.db")

#: Seconds between checks of the socket while reads are paused; also the window over which a
#: burst is told from a trickle.
POLL_INTERVAL = 0.05
#: Bytes per ``POLL_INTERVAL`` from which notifications count as a burst (about 5,000
#: notifications a second); also the bytes waiting that end a pause early.
QUIET_BYTES = 16 * 1024
#: A timer may fire this early (the loop's clock resolution): a pause that has this little left ends.
_EARLY = 0.001


def bytes_waiting(sock: Any) -> int:
    """Bytes readable on ``sock`` now, without reading them (0 if it is closed or cannot tell)."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return 0
        buf = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
        return buf[0]
    except (OSError, ValueError, AttributeError):
        return 0


class ProtocolInFront(asyncio.Protocol):
    """A protocol put in front of asyncpg's on the LISTEN connection's transport: passes every
    event on to ``inner``; subclasses look at (or hold back) what is read."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self._inner = inner

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _BurstWatch:
    """A thread that, while armed, checks ``waiting()`` every ``poll`` seconds and calls ``wake``
    (thread-safe) once ``quiet`` bytes or more wait; it then disarms itself.

    Disarmed, it waits on a condition and costs nothing. Started at the first ``arm``, ended by
    ``close`` (the connection is lost) or by a ``wake`` that fails (its loop is closed).
    """

    def __init__(self, waiting: Callable[[], int], *, quiet: int, poll: float) -> None:
        self._waiting = waiting
        self._quiet = quiet
        self._poll = poll
        self._cond = threading.Condition()
        self._wake: Callable[[], object] | None = None  # set while armed
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, wake: Callable[[], object]) -> None:
        with self._cond:
            if self._closed:
                return
            self._wake = wake
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hydra-otel-read-pacer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._wake = None

    def close(self) -> None:
        with self._cond:
            self._closed, self._wake = True, None
            self._cond.notify()

    def _run(self) -> None:
        try:
            with self._cond:
                while not self._closed:
                    if self._wake is None:
                        self._cond.wait()
                    elif not self._cond.wait(self._poll):  # not armed again or closed meanwhile
                        self._look()
        except Exception:  # a bug: say so in the log, not as a bare traceback on stderr
            log.exception(
                "the read pacer's socket watch stopped; a burst that begins while reads are paused "
                "now waits for the end of the pause (--export-delay)"
            )

    def _look(self) -> None:
        """One check, with the lock held: wake the loop once ``quiet`` bytes wait."""
        wake = self._wake
        if wake is None or self._waiting() < self._quiet:
            return
        self._wake = None
        try:
            wake()
        except RuntimeError:  # the loop is closed: nothing is left to wake
            self._closed = True


class ReadPacer(ProtocolInFront):
    """Sits in front of the LISTEN connection's protocol; pauses reads after each small one.

    See the module docstring. ``waiting()`` says how many bytes wait in the socket.
    """

    def __init__(
        self,
        inner: asyncio.Protocol,
        transport: Any,
        *,
        linger: float,
        quiet: int = QUIET_BYTES,
        poll: float = POLL_INTERVAL,
        waiting: Callable[[], int],
    ) -> None:
        super().__init__(inner)
        self._transport = transport
        self._linger = linger
        self._quiet = quiet
        self._poll = poll
        self._waiting = waiting
        self._pacing = True  # False while a burst is read
        self._paused_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None  # the end of the current pause
        self._watch = _BurstWatch(waiting, quiet=quiet, poll=poll)
        self._window_start = -math.inf  # the current window of reads, while not pacing
        self._window_bytes = 0
        self._holds = 0
        self._backlog = False  # the next read is what gathered during a pause
        self.bursts = 0  # pauses ended because a burst began (tests, diagnostics)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)
        now = asyncio.get_running_loop().time()
        backlog, self._backlog = self._backlog, False
        if self._pacing and len(data) >= self._quiet and not backlog:
            # A burst began while reading (a pause's backlog says nothing: it gathered slowly).
            self.bursts += 1
            self._pacing = False
            self._window_start, self._window_bytes = now, 0
        if not self._pacing:
            if now - self._window_start >= self._poll:
                # A new window. A gap since the last read says nothing (the trio thread may have
                # been busy with the burst); only what the last window brought does.
                self._pacing = self._window_bytes < self._quiet
                self._window_start, self._window_bytes = now, 0
            self._window_bytes += len(data)
            self._pacing = self._pacing and self._window_bytes < self._quiet
        if self._pacing and not self._holds:
            self._pause(now)

    def _pause(self, now: float) -> None:
        if self._paused_at is not None or self._transport.is_closing():
            return
        self._transport.pause_reading()
        self._paused_at = now
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._linger, self._linger_over)
        self._watch.arm(self._waker(loop))

    def _linger_over(self) -> None:
        self._timer = None
        self._check()

    def _check(self) -> None:
        """While paused: end the pause at its end, or early if enough is waiting (see the module).

        Called by the pause's timer and, through the loop, by the watch thread; a call from a
        watch that saw an earlier pause just looks at the current one.
        """
        if self._paused_at is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        waited = now - self._paused_at
        ready = self._waiting()
        if ready >= self._quiet and ready * self._poll >= self._quiet * waited:
            self.bursts += 1
            self._pacing = False
            self._window_start, self._window_bytes = now, 0
        if ready >= self._quiet or waited >= self._linger - _EARLY:
            self._resume()
            return
        if self._timer is None:  # it fired early (the loop's clock resolution)
            self._timer = loop.call_later(self._linger - waited, self._linger_over)
        self._watch.arm(self._waker(loop))

    def _waker(self, loop: asyncio.AbstractEventLoop) -> Callable[[], object]:
        # The watch thread's own context lacks trio-asyncio's loop: a check run in it would resume
        # reading with a reader task that cannot find its loop. So the check runs in this one.
        return functools.partial(loop.call_soon_threadsafe, self._check, context=contextvars.copy_context())

    def _resume(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watch.disarm()
        if self._paused_at is not None:
            self._paused_at = None
            self._backlog = True
            self._transport.resume_reading()  # a no-op once the transport is closing

    @contextlib.contextmanager
    def hold_open(self) -> Iterator[None]:
        """Read without pauses inside this block (an answer to a query is awaited)."""
        self._holds += 1
        self._resume()
        try:
            yield
        finally:
            self._holds -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watch.close()
        super().connection_lost(exc)


def pace_reads(transport: Any, linger: float) -> ReadPacer | None:
    """Put a :class:`ReadPacer` in front of ``transport``'s protocol; None if ``linger`` <= 0."""
    if linger <= 0:
        return None
    sock = transport.get_extra_info("socket")
    pacer = ReadPacer(transport.get_protocol(), transport, linger=linger, waiting=lambda: bytes_waiting(sock))
    transport.set_protocol(pacer)
    return pacer
