"""A build_finished naming a build that is still running must not hide that build's finished steps."""

from __future__ import annotations

from hydra_otel.adapters.db import open_database
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.events import BuildFinished, StepFinished
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.resolver import Resolver
from tests.integration.harness import HYDRA_URL, Hydra

T0 = 1_700_000_000


async def test_step_of_a_running_build_survives_a_forged_build_finished(hydra: Hydra, hydra_db: str) -> None:
    """A finished step of a running build and a (forged) build_finished for that build in one batch:
    the step is rendered, the build is counted as not finished. Before, the step was dropped as
    "comes with its build", which never came, and catch-up had already marked it seen."""
    _, (build,), sql = hydra.sim.eval_added(
        1,
        "c.1",
        eval_start=T0,
        timestamp=T0 + 10,
        checkout_time=1,
        eval_time=5,
        new_builds=[NewBuild(job="a")],
    )
    await hydra.run(*sql, hydra.sim.substituted_step(build, 1, start=T0 + 20, stop=T0 + 21))
    stats = Stats()
    cfg = RenderConfig(instance="hydra", hydra_url=HYDRA_URL, error_text_limit=1000)
    async with open_database(hydra_db, stats=stats) as db:
        resolver = Resolver.create(db, cfg, stats)
        spans = await resolver.resolve(
            [
                StepFinished(build_id=build, step_nr=1, log_path=None),
                BuildFinished(build_id=build, dependents=()),
            ]
        )
    assert [dict(s.attributes).get("hydra.span.type") for s in spans] == ["step"]
    assert stats.not_finished == 1
