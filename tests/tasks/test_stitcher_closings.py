"""The stitcher task checks eval_cached / eval_failed against fresh rows, once per batch."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from hydra_otel.core.evals import Attempt
from hydra_otel.core.events import EvalCached, EvalFailed, Received
from hydra_otel.core.stitch import UNVERIFIED_BURST, JobsetCheck, Stitcher, Work
from hydra_otel.errors import DbUnavailable
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.channels import DRAIN_LIMIT
from hydra_otel.tasks.stitch_task import KnownJobsets, run_stitcher

T = 1_700_000_000


class FakeRows:
    def __init__(self) -> None:
        self.jobsets = {1: JobsetCheck(last_checked=T, has_error=True, error_time=T, has_fetch_error=False)}
        self.evals = {7: 1, 8: 2}
        self.queries: list[tuple[list[int], list[int]]] = []
        self.down = False

    async def exists(self, ids: Sequence[int]) -> set[int]:
        return {i for i in ids if i in self.jobsets}

    async def closing(
        self, jobset_ids: Sequence[int], eval_ids: Sequence[int]
    ) -> tuple[dict[int, JobsetCheck], dict[int, int]]:
        self.queries.append((list(jobset_ids), list(eval_ids)))
        if self.down:
            raise DbUnavailable("down")
        return (
            {j: self.jobsets[j] for j in jobset_ids if j in self.jobsets},
            {e: self.evals[e] for e in eval_ids if e in self.evals},
        )


async def stitch(rows: FakeRows, events: list[EvalCached | EvalFailed], stats: Stats) -> list[Work]:
    ev_tx, ev_rx = trio.open_memory_channel[Received](100_000)
    out_tx, out_rx = trio.open_memory_channel[Work](100_000)
    for i, e in enumerate(events):
        ev_tx.send_nowait(Received(event=e, at_ns=i + 1))
    ev_tx.close()
    known = KnownJobsets(rows.exists, closing=rows.closing)
    await run_stitcher(ev_rx, out_tx, Stitcher(abandon_after=100.0, max_open=10), stats=stats, jobsets=known)
    return [w async for w in out_rx]


async def test_run_stitcher_checks_closings_in_one_query_per_batch() -> None:
    """A batch of forged closings costs one lookup of each ID; only the one the rows vouch for becomes an attempt."""
    rows, stats = FakeRows(), Stats()
    events: list[EvalCached | EvalFailed] = [
        EvalFailed(correlation_id=f"f.{i}", jobset_id=1 + i % 3) for i in range(300)
    ]
    events += [
        EvalCached(correlation_id=f"c.{i}", jobset_id=1, previous_eval_id=6 + i % 3) for i in range(300)
    ]
    out = await stitch(rows, events, stats)
    assert [(w.correlation_id, w.kind.value) for w in out if isinstance(w, Attempt)] == [("f.0", "failed")]
    assert rows.queries[0] == ([1, 2, 3], [6, 7, 8])  # each ID once
    assert len(rows.queries) == -(-len(events) // DRAIN_LIMIT)
    assert stats.notifications_rejected == {
        "unknown_jobset": 200,
        # eval_failed and eval_cached of the right evaluation both agree with the row (eval_cached
        # leaves errormsg as it was): the first reports the check.
        "check_already_reported": 199,
        "unknown_previous_eval": 100,
        "previous_eval_of_other_jobset": 100,
    }


async def test_run_stitcher_accepts_a_bounded_few_closings_when_rows_are_unreadable() -> None:
    """With the database down, closing events are accepted only within the global budget."""
    rows, stats = FakeRows(), Stats()
    rows.down = True
    out = await stitch(rows, [EvalFailed(correlation_id=f"f.{i}", jobset_id=i) for i in range(1, 101)], stats)
    assert len(out) == UNVERIFIED_BURST
    assert stats.notifications_rejected == {"unverified_over_budget": 100 - UNVERIFIED_BURST}
