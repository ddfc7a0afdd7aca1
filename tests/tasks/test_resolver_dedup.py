"""A build the live path and the catch-up both bring is read and rendered once.

In a burst the live path lags: a ``build_finished`` can still be queued when the catch-up
scan finds the same build in ``builds`` and sends it too. The catch-up records the key
("build", ID, stop time) when it sends it; the resolver looks the key up once it has read
the row, before rendering, so only one copy is rendered. A notification's payload never
records a key: a forged ``build_finished`` must not make the catch-up skip the build.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from hydra_otel.adapters import queries as q
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.dedup import RecentKeys
from hydra_otel.core.events import BuildFinished, StepFinished
from hydra_otel.core.spans import SpanRecord
from hydra_otel.core.stitch import Work
from hydra_otel.errors import DbUnavailable
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.catchup_task import Catchup, CatchupSettings, CatchupState
from hydra_otel.tasks.exporter import ExportItem
from hydra_otel.tasks.resolver import Resolver, run_resolver
from tests.factories import RENDER_CONFIG
from tests.tasks.fakedb import FakeDb, Row

T = 1_700_000_000
SETTINGS = CatchupSettings(lag=2, overlap=100)


def database() -> FakeDb:
    db = FakeDb(now=T)
    db.add_build(5, T - 30, starttime=T - 60)
    db.add_step(5, 1, T - 30)
    return db


def live(build_id: int) -> BuildFinished:
    return BuildFinished(build_id=build_id, dependents=())


async def scan(db: FakeDb, handled: RecentKeys) -> list[Work | Checkpoint]:
    """What one catch-up scan from ``T - 60`` sends, with ``handled`` shared with the resolver."""
    tx, rx = trio.open_memory_channel[Work | Checkpoint](100)
    catchup = Catchup(db, tx, SETTINGS, seen=handled)
    await catchup.scan(CatchupState(marks=Marks(stop_time=T - 60), live_jobsets={}))
    tx.close()
    return [item async for item in rx]


async def run(resolver: Resolver, work: Sequence[Work | Checkpoint]) -> list[SpanRecord]:
    """Every span run_resolver sends for ``work``, resolved one item at a time (a lagging live path)."""
    work_tx, work_rx = trio.open_memory_channel[Work | Checkpoint](100)
    out_tx, out_rx = trio.open_memory_channel[ExportItem](100)
    for item in work:
        work_tx.send_nowait(item)
    work_tx.close()
    with trio.fail_after(5):
        await run_resolver(work_rx, out_tx, resolver, backoff=Backoff(), batch_size=1)
    return [s async for out in out_rx if isinstance(out, list) for s in out]


async def alone(db: FakeDb) -> list[SpanRecord]:
    """The build's spans, rendered by a resolver of its own."""
    return await Resolver.create(db, RENDER_CONFIG, Stats()).resolve([live(5)])


async def test_a_queued_notification_and_a_catch_up_of_the_same_build_render_it_once() -> None:
    """The live copy queued before the scan (so the scan sends the build too) is not rendered again."""
    db, stats, handled = database(), Stats(), RecentKeys()
    resolver = Resolver.create(db, RENDER_CONFIG, stats, handled=handled)
    caught_up = await scan(db, handled)
    assert BuildFinished(build_id=5, dependents=(), stop_time=T - 30) in caught_up
    spans = await run(resolver, [live(5), *caught_up])
    assert spans == await alone(db)
    assert stats.builds_deduplicated == 1
    assert stats.spans_deduplicated == 0  # no span rendered twice, so none to drop at the end


async def test_a_catch_up_copy_resolved_first_makes_the_late_notification_render_nothing() -> None:
    db, stats, handled = database(), Stats(), RecentKeys()
    resolver = Resolver.create(db, RENDER_CONFIG, stats, handled=handled)
    spans = await run(resolver, [*await scan(db, handled), live(5)])
    assert spans == await alone(db)
    assert (stats.builds_deduplicated, stats.spans_deduplicated) == (1, 0)


async def test_a_build_rendered_live_is_not_sent_by_the_next_scan() -> None:
    db, handled = database(), RecentKeys()
    resolver = Resolver.create(db, RENDER_CONFIG, Stats(), handled=handled)
    assert await run(resolver, [live(5)]) == await alone(db)
    assert not [w for w in await scan(db, handled) if isinstance(w, BuildFinished)]


async def test_a_forged_notification_for_a_running_build_does_not_hide_its_finish() -> None:
    """Only a row read finished records a key: the build's real finish is rendered by the catch-up."""
    db, stats, handled = database(), Stats(), RecentKeys()
    db.builds[0].update(finished=0, stoptime=None)
    resolver = Resolver.create(db, RENDER_CONFIG, stats, handled=handled)
    assert await run(resolver, [live(5)]) == []
    assert stats.not_finished == 1
    db.builds[0].update(finished=1, stoptime=T - 30)  # it really finishes
    spans = await run(resolver, await scan(db, handled))
    assert spans == await alone(db)


async def test_a_catch_up_copy_of_a_build_that_finished_again_is_rendered_once_more() -> None:
    """The row changed after the scan (restarted, finished again): its new finish is claimed like live work."""
    db, stats, handled = database(), Stats(), RecentKeys()
    resolver = Resolver.create(db, RENDER_CONFIG, stats, handled=handled)
    caught_up = await scan(db, handled)
    db.builds[0].update(stoptime=T - 10)
    assert await run(resolver, [*caught_up, live(5)]) == await alone(db)
    assert stats.builds_deduplicated == 1


class FailsOnce(FakeDb):
    """Answers the step query of a StepFinished only on the second try (the server went away once)."""

    failed: bool = False

    async def fetch(self, sql: str, *args: object) -> Sequence[Row]:
        if sql.startswith(q.STEP_SUBSET_SQL.split("{")[0]):
            if not self.failed:
                self.failed = True
                raise DbUnavailable("database query failed: ConnectionResetError")
            return []
        return await super().fetch(sql, *args)


async def test_a_batch_retried_after_an_outage_still_renders_its_builds() -> None:
    """Keys are recorded only once the whole batch was read: the retry must not find its own."""
    db = FailsOnce(now=T)
    db.add_build(5, T - 30, starttime=T - 60)
    db.add_step(5, 1, T - 30)
    resolver = Resolver.create(db, RENDER_CONFIG, Stats())
    batch: list[Work] = [live(5), StepFinished(build_id=6, step_nr=1, log_path=None)]
    try:
        await resolver.resolve(batch)
        raise AssertionError("the first try should fail")
    except DbUnavailable:
        pass
    assert await resolver.resolve(batch) == await alone(db)
