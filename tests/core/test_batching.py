"""The exporter's batching policy, without trio: sizes, ages, flushes and commit order."""

from __future__ import annotations

import pytest

from hydra_otel.core.batching import Batcher
from hydra_otel.core.catchup import Marks
from hydra_otel.core.spans import SpanRecord
from tests.factories import make_span

SIZE = 4
DELAY = 1.0


def spans(*ids: int) -> list[SpanRecord]:
    return [make_span(span_id=i) for i in ids]


def ids(batch: list[SpanRecord] | None) -> list[int] | None:
    return None if batch is None else [r.span_id for r in batch]


def send_all(b: Batcher) -> list[list[int]]:
    """Send what the policy says to send now, acknowledging each batch."""
    out = []
    while (batch := b.next_batch()) is not None:
        out.append([r.span_id for r in batch])
        b.sent()
    return out


def test_a_full_batch_is_ready_at_once() -> None:
    """``size`` spans make a batch to send now; fewer wait."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1, 2, 3), now=0.0)
    assert b.next_batch() is None
    b.add(spans(4), now=0.1)
    assert send_all(b) == [[1, 2, 3, 4]]
    assert b.pending == 0
    assert b.next_deadline() is None


def test_a_partial_batch_goes_when_its_oldest_span_is_delay_old() -> None:
    """The deadline is timed from the first span into an empty batch, not the latest one."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1), now=10.0)
    b.add(spans(2), now=10.5)
    assert b.next_deadline() == 11.0
    b.expire(10.99)
    assert b.next_batch() is None
    b.expire(11.0)
    assert send_all(b) == [[1, 2]]
    assert b.next_deadline() is None
    b.add(spans(3), now=20.0)  # a new batch: a new age
    assert b.next_deadline() == 21.0
    assert b.next_batch() is None  # the old flush does not carry over


def test_the_remainder_of_an_oversized_list_keeps_its_age() -> None:
    """Full batches go at once; the rest keeps the list's arrival time, it does not wait for more input."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(*range(10)), now=5.0)
    assert send_all(b) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert b.pending == 2
    assert b.next_deadline() == 6.0


def test_a_checkpoint_flushes_everything_then_its_marks_may_be_stored() -> None:
    """A checkpoint sends full batches and the remainder, and its marks come out only after them."""
    b = Batcher(size=SIZE, delay=DELAY)
    marks = Marks(stop_time=123)
    b.add(spans(*range(5)), now=0.0)
    assert send_all(b) == [[0, 1, 2, 3]]
    b.checkpoint(marks)
    assert b.take_commits() == []  # span 4 is not acknowledged yet
    batch = b.next_batch()
    assert ids(batch) == [4]
    assert b.take_commits() == []  # handed out is not acknowledged
    b.sent()
    assert b.take_commits() == [marks]
    assert b.take_commits() == []


def test_a_checkpoint_with_nothing_pending_is_stored_at_once() -> None:
    """Marks behind spans already acknowledged need no send."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.checkpoint(Marks(eval_id=1))
    b.checkpoint(Marks(eval_id=2))
    assert b.next_batch() is None
    assert b.take_commits() == [Marks(eval_id=1), Marks(eval_id=2)]  # each one, in order


def test_marks_wait_for_the_spans_before_them_only() -> None:
    """Spans added after a checkpoint do not hold its marks back; a later checkpoint waits for them."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1), now=0.0)
    b.checkpoint(Marks(eval_id=1))
    b.add(spans(2, 3, 4, 5, 6), now=0.0)
    b.checkpoint(Marks(eval_id=2))
    assert ids(b.next_batch()) == [1, 2, 3, 4]
    b.sent()
    assert b.take_commits() == [Marks(eval_id=1)]
    assert ids(b.next_batch()) == [5, 6]
    b.sent()
    assert b.take_commits() == [Marks(eval_id=2)]


def test_unacknowledged_spans_follow_every_stored_checkpoint() -> None:
    """What is given up on (the batch being sent, the rest) comes after every marks handed out."""
    b = Batcher(size=2, delay=DELAY)
    b.add(spans(1, 2), now=0.0)
    b.checkpoint(Marks(eval_id=1))
    b.add(spans(3, 4, 5), now=0.0)
    b.checkpoint(Marks(eval_id=2))
    assert ids(b.next_batch()) == [1, 2]
    b.sent()
    assert b.take_commits() == [Marks(eval_id=1)]
    assert ids(b.next_batch()) == [3, 4]  # being sent when the pipeline stops
    assert ids(b.unacknowledged()) == [3, 4, 5]
    assert b.take_commits() == []  # eval_id=2 is never handed out: the catch-up scans past 1 again


def test_closing_flushes_what_is_left() -> None:
    """At the end of the input every pending span goes, without waiting for its age."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(*range(6)), now=0.0)
    assert send_all(b) == [[0, 1, 2, 3]]
    b.close()
    assert send_all(b) == [[4, 5]]
    b.close()
    assert send_all(b) == []


def test_a_batch_being_sent_is_still_pending() -> None:
    """A batch handed out but not acknowledged is counted (if the pipeline stops) and handed out again."""
    b = Batcher(size=2, delay=DELAY)
    b.add(spans(1, 2, 3), now=0.0)
    assert ids(b.next_batch()) == [1, 2]
    assert ids(b.next_batch()) == [1, 2]  # a retry sends the same batch
    assert b.pending == 3
    b.sent()
    assert b.pending == 1


def test_empty_lists_change_nothing() -> None:
    """An empty list neither starts an age nor makes a batch."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add([], now=3.0)
    assert b.next_deadline() is None
    b.add(spans(1), now=7.0)
    b.add([], now=7.5)
    assert b.next_deadline() == 8.0


@pytest.mark.parametrize(("size", "delay"), [(0, 1.0), (1, -1.0)])
def test_invalid_settings_are_refused(size: int, delay: float) -> None:
    with pytest.raises(ValueError, match="size"):
        Batcher(size=size, delay=delay)


def test_a_complete_list_goes_once_the_input_is_drained() -> None:
    """Live work's spans (nothing more will join them) go at the next idle, without their age."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1, 2), now=0.0, complete=True)
    assert b.next_batch() is None  # more input may be queued: a burst fills its batches first
    b.idle()
    assert send_all(b) == [[1, 2]]
    assert b.next_deadline() is None


def test_a_burst_of_complete_lists_fills_full_batches_and_sends_its_last_remainder_at_once() -> None:
    """While input is queued (no idle), complete lists only fill batches; the remainder goes at idle."""
    b = Batcher(size=SIZE, delay=DELAY)
    out: list[list[int]] = []
    for i in range(3):  # three lists of three, queued one behind the other
        b.add(spans(3 * i, 3 * i + 1, 3 * i + 2), now=0.0, complete=True)
        out += send_all(b)
    assert out == [[0, 1, 2, 3], [4, 5, 6, 7]]
    b.idle()
    assert send_all(b) == [[8]]


def test_idle_without_a_complete_list_waits_for_the_delay() -> None:
    """A list that is not complete (a catch-up page before its checkpoint) keeps batching."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1), now=0.0)
    b.idle()
    assert b.next_batch() is None
    b.expire(DELAY)
    assert send_all(b) == [[1]]


def test_a_complete_list_takes_what_is_pending_before_it_along() -> None:
    """Spans pending ahead of a complete list go with it (in order); the flag ends with the flush."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1), now=0.0)
    b.add(spans(2), now=0.2, complete=True)
    b.idle()
    assert send_all(b) == [[1, 2]]
    b.add(spans(3), now=0.3)  # not complete: the earlier flag does not carry over
    b.idle()
    assert b.next_batch() is None
    assert b.next_deadline() == 0.3 + DELAY


def test_marks_still_wait_for_a_complete_list_sent_early() -> None:
    """Sending early changes no commit order: a checkpoint after a complete list waits for its ack."""
    b = Batcher(size=SIZE, delay=DELAY)
    b.add(spans(1), now=0.0, complete=True)
    b.checkpoint(Marks(eval_id=5))
    b.idle()
    assert ids(b.next_batch()) == [1]
    assert b.take_commits() == []
    b.sent()
    assert b.take_commits() == [Marks(eval_id=5)]
