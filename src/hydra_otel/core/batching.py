"""The exporter's batching policy: when to send which spans, and when marks may be stored.

Theory of operation. Spans arrive as lists (one per resolved batch of work) and
progress marks arrive between them. The policy keeps the spans not yet
acknowledged, in order, and says what to send next:

* a full batch (``size`` spans) goes at once;
* a partial batch goes once its oldest span has waited ``delay`` seconds
  (:meth:`Batcher.next_deadline`, then :meth:`Batcher.expire`);
* a checkpoint, or the end of the input, sends everything pending, in full
  batches and then the remainder;
* a *complete* list (:class:`CompleteSpans`: live work, nothing more will join
  it) sends everything pending once no more input is queued
  (:meth:`Batcher.idle`). The LISTEN connection has batched that work for up
  to the same ``delay`` already (adapters/read_pacer.py), so ageing it again
  would only add latency: the two waits are one budget. Waiting for the input
  to be drained first keeps a burst in full batches: its lists follow each
  other, so only its last remainder goes early. Catch-up pages are not
  complete: they keep batching until their checkpoint.

The age is timed from the span that arrived first into an empty batch, and
kept when a full batch leaves a remainder behind: the rest of an oversized
list must not wait for the next arrival (which may be the next catch-up
checkpoint, 30 s later).

At-least-once: a checkpoint's marks say "everything before this was exported",
so they are handed out by :meth:`Batcher.take_commits` only once every span
added before the checkpoint was acknowledged (:meth:`Batcher.sent`). A span
refused for good counts as acknowledged: the caller counted and logged it, and
holding the marks back for it would hold up every later evaluation.

It does no I/O and reads no clock: the caller passes the monotonic ``now``
and does the sending, the retrying and the storing (tasks/exporter.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from hydra_otel.core.catchup import Marks
from hydra_otel.core.spans import SpanRecord


@dataclass(frozen=True, slots=True)
class CompleteSpans:
    """The spans of one resolved batch of live work: nothing more will join it, send it soon."""

    spans: Sequence[SpanRecord]


class Batcher:
    """Batches spans by size and age and orders commits behind them; see the module docstring."""

    def __init__(self, *, size: int, delay: float) -> None:
        """Args:
        size: spans per batch at most (a full batch is sent at once).
        delay: seconds the oldest pending span waits for company at most.

        Raises:
            ValueError: ``size`` < 1 or ``delay`` < 0.
        """
        if size < 1 or delay < 0:
            raise ValueError("size must be >= 1 and delay >= 0")
        self._size = size
        self._delay = delay
        self._pending: list[SpanRecord] = []
        self._oldest = 0.0  # when the oldest pending span arrived (meaningful while any is pending)
        self._flush = False  # send everything pending, not only full batches
        self._complete = False  # a complete list is pending: send it once the input is drained
        self._in_flight = 0  # length of the batch handed out by next_batch(), not yet sent()
        self._added = 0  # spans added since construction
        self._acked = 0  # spans acknowledged since construction
        self._checkpoints: deque[tuple[int, Marks]] = deque()  # (spans added before it, marks)

    @property
    def pending(self) -> int:
        """Spans added and not yet acknowledged (including a batch being sent)."""
        return len(self._pending)

    def unacknowledged(self) -> list[SpanRecord]:
        """The spans added and not yet acknowledged, in order (a copy).

        No marks :meth:`take_commits` handed out cover any of them: each checkpoint comes out
        only once every span added before it was acknowledged. So when they are given up on,
        the catch-up finds again those it renders from Hydra's tables.
        """
        return list(self._pending)

    def add(self, spans: Sequence[SpanRecord], now: float, *, complete: bool = False) -> None:
        """Queue ``spans``, received at the monotonic time ``now``.

        ``complete``: nothing more will join them (a :class:`CompleteSpans`); everything
        pending goes at the next :meth:`idle`.
        """
        if not spans:
            return
        if not self._pending:
            self._oldest = now
        self._pending.extend(spans)
        self._added += len(spans)
        self._complete = self._complete or complete

    def idle(self) -> None:
        """No more input is queued now: send everything pending if a complete list is among it."""
        if self._complete and self._pending:
            self._flush = True

    def checkpoint(self, marks: Marks) -> None:
        """A checkpoint: send everything before it, then hand out ``marks`` to be stored."""
        self._checkpoints.append((self._added, marks))
        self._flush = bool(self._pending)

    def close(self) -> None:
        """The input ended: send everything pending."""
        self._flush = bool(self._pending)

    def expire(self, now: float) -> None:
        """Send everything pending if the oldest span has waited ``delay`` seconds at ``now``."""
        if self._pending and now >= self._oldest + self._delay:
            self._flush = True

    def next_deadline(self) -> float | None:
        """The monotonic time at which :meth:`expire` would flush, or None when nothing is pending."""
        return self._oldest + self._delay if self._pending else None

    def next_batch(self) -> list[SpanRecord] | None:
        """The batch to send now, or None: wait for input (or the deadline).

        The same batch is returned until :meth:`sent` acknowledges it.
        """
        if len(self._pending) >= self._size or (self._flush and self._pending):
            batch = self._pending[: self._size]
            self._in_flight = len(batch)
            return batch
        return None

    def sent(self) -> None:
        """The batch from :meth:`next_batch` was delivered (or refused for good): forget it."""
        del self._pending[: self._in_flight]
        self._acked += self._in_flight
        self._in_flight = 0
        if not self._pending:
            self._flush = self._complete = False

    def take_commits(self) -> list[Marks]:
        """Marks of the checkpoints whose spans were all acknowledged, in arrival order; store them."""
        out: list[Marks] = []
        while self._checkpoints and self._checkpoints[0][0] <= self._acked:
            out.append(self._checkpoints.popleft()[1])
        return out
