"""The spans the daemon must export for the workload, rendered with the daemon's own pure core.

``BuildFacts``/``StepFacts`` are built from the workload's layout (mirroring the SQL in
workload.py) and rendered with ``hydra_otel.core.builds``, so span IDs (and, for the
R_export baseline, span content) are what the daemon derives from the database rows.
"""

from __future__ import annotations

import workload as w

from hydra_otel.core import ids
from hydra_otel.core.builds import BuildFacts, Cause, StepFacts, build_span_id, build_spans
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.spans import SpanRecord

#: The daemon is started with exactly these settings (run.py passes them as environment).
CFG = RenderConfig(
    instance="hydra",
    hydra_url="http://localhost:3000",
    error_text_limit=4096,
    max_builds_per_trace=1000,
    max_links=32,
)


def _build(
    lay: w.Layout, build_id: int, *, stop: int, status: int = 0, start: int | None = None
) -> BuildFacts:
    history = build_id <= lay.sizes.history
    return BuildFacts(
        build_id=build_id,
        finished=True,
        timestamp=lay.t_hist if history else lay.t0,
        jobset_id=w.JOBSET,
        project="nixpkgs",
        jobset="trunk",
        job=w.job(build_id),
        nixname=w.nixname(build_id),
        drvpath=w.drvpath(build_id),
        system=w.SYSTEM,
        priority=100,
        global_priority=0,
        starttime=lay.step_start if start is None else start,
        stoptime=stop,
        cached=False,
        status=status,
        size=4096 if status == 0 else None,
        closure_size=65536 if status == 0 else None,
        release_name=None,
        eval_id=lay.eval_of(build_id),
        in_eval_trace=lay.in_eval_trace(build_id, CFG.max_builds_per_trace),
    )


def _step(build_id: int, stepnr: int, drv: str, *, start: int, stop: int, status: int = 0) -> StepFacts:
    return StepFacts(
        build_id=build_id,
        stepnr=stepnr,
        type=0,
        drvpath=drv,
        status=status,
        errormsg=f"builder for '{drv}' failed with exit code 1" if status else None,
        starttime=start,
        stoptime=stop,
        machine=w.MACHINE,
        system=w.SYSTEM,
        propagated_from=None,
        overhead_ms=1200,
        times_built=1,
        nondeterministic=False,
        resolved_drv_path=None,
    )


def burst_records(lay: w.Layout, builds: range) -> list[SpanRecord]:
    """Build, queued and 3 step spans of each build finishing in a burst."""
    t1, tb = lay.step_start, lay.burst_stop
    out: list[SpanRecord] = []
    for i in builds:
        steps = [_step(i, n, w.dep_drvpath(i, n), start=t1, stop=tb) for n in (1, 2)]
        steps.append(_step(i, 3, w.drvpath(i), start=t1, stop=tb))
        out += build_spans(CFG, _build(lay, i, stop=tb), steps)
    return out


def dependents_records(lay: w.Layout) -> list[SpanRecord]:
    """The failed build's spans, then each dependent's build span and its propagated step."""
    f, t1, tf = lay.failed, lay.step_start, lay.burst_stop
    failed = _build(lay, f, stop=tf, status=1)
    out = build_spans(CFG, failed, [_step(f, 1, failed.drvpath, start=t1, stop=tf, status=1)])
    cause = Cause(f, *build_span_id(CFG, failed, 0))
    for d in lay.dependents():
        step = StepFacts(
            build_id=d,
            stepnr=1,
            type=0,
            drvpath=failed.drvpath,
            status=1,
            errormsg=None,
            starttime=None,
            stoptime=None,
            machine="",
            system=w.SYSTEM,
            propagated_from=f,
            overhead_ms=None,
            times_built=None,
            nondeterministic=None,
            resolved_drv_path=None,
        )
        out += build_spans(CFG, _build(lay, d, stop=tf, status=2, start=tf), [step], cause)
    return out


def single_records(lay: w.Layout, build_id: int, stop: int) -> list[SpanRecord]:
    """A build finishing with one step (steady events, sentinels): build, queued, step."""
    steps = [_step(build_id, 1, w.drvpath(build_id), start=lay.step_start, stop=stop)]
    return build_spans(CFG, _build(lay, build_id, stop=stop), steps)


def build_span(lay: w.Layout, build_id: int) -> int:
    """The span ID of a build's (first) finish; the first record ``build_spans`` returns."""
    return single_records(lay, build_id, lay.burst_stop)[0].span_id


def eval_span_ids(lay: w.Layout, eval_id: int) -> list[int]:
    """Root, checkout, evaluate and (live) evaluator run spans of an added evaluation."""
    key = ids.eval_trace(CFG.instance, eval_id)
    return [
        ids.root_span_id(key),
        ids.span_id(key, "checkout"),
        ids.span_id(key, "evaluate"),
        ids.span_id(key, "evaluator-run", w.JOBSET, lay.correlation_id),
    ]
