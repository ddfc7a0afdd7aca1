"""The parts of the resolver → exporter tail that ``run`` and ``backfill`` share."""

from __future__ import annotations

import threading

import pytest

from hydra_otel.core.catchup import Marks
from hydra_otel.pipeline.tail import span_lists, store_marks
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.resolver import RESOLVE_BATCH


@pytest.mark.parametrize(
    ("queue_size", "lists"),
    [(1, 2), (RESOLVE_BATCH, 2), (3 * RESOLVE_BATCH, 3), (10_000, 10_000 // RESOLVE_BATCH)],
)
def test_the_span_channel_holds_lists_of_a_resolved_batch(queue_size: int, lists: int) -> None:
    assert span_lists(queue_size) == lists


@pytest.mark.parametrize(("stored", "counted"), [(True, 1), (False, 0)])
async def test_a_checkpoint_counts_once_its_marks_are_stored(stored: bool, counted: int) -> None:
    stats, saved, threads = Stats(), [], []

    def save(marks: Marks) -> bool:
        saved.append(marks)
        threads.append(threading.current_thread())
        return stored

    await store_marks(save, stats)(Marks(eval_id=7))
    assert saved == [Marks(eval_id=7)]
    assert threads != [threading.main_thread()]  # file I/O stays off the trio thread
    assert stats.checkpoints == counted
