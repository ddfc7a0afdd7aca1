"""Restarted builds: every attempt rendered, with the same IDs live, after a restart and in a backfill.

Each scenario is a timeline of what Hydra writes to one build's rows (steps finishing, the build
finishing, a web restart or cancel). Three renderers follow it:

* *live*: a daemon that hears every notification and renders as the resolver does (a step at
  ``step_finished``, the whole build at ``build_finished`` or at the scan a trigger starts);
* *restart*: a daemon that heard the first step and was then down until the end (``kill -9``),
  whose catch-up renders the steps of the still-running build and the build's last finish;
* *backfill*: the final rows only.

Every span any of them exports must be in the backfill with the same bytes, every step row must
have a span, and every parent must exist. The backfill's rendering is compared with
``tests/data/attempts/<scenario>.txt``; after a deliberate change, rewrite those files with
``UPDATE_GOLDEN=1 pytest tests/core/test_attempts.py`` and review the diff.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hydra_otel.core import ids
from hydra_otel.core import semconv as sc
from hydra_otel.core.builds import (
    BuildFacts,
    StepFacts,
    build_spans,
    step_attempt,
    step_needs_build,
    step_span,
)
from hydra_otel.core.spans import Kind, SpanRecord
from hydra_otel.demo.waterfall import from_record, render_waterfall
from tests.factories import RENDER_CONFIG, make_build, make_step

T0 = 1_700_000_000
S = 1_000_000_000
DRV = f"/nix/store/{'0' * 32}-hello-2.12.drv"
DEP = f"/nix/store/{'1' * 32}-glibc-2.40.drv"
GOLDEN = Path(__file__).parent.parent / "data" / "attempts"
EVAL_KEY = ids.eval_trace(RENDER_CONFIG.instance, 42)
EVAL_ROOT = ids.root_span_id(EVAL_KEY)

Key = tuple[int, int]


@dataclass
class Rows:
    """One build's ``builds`` row and ``buildsteps`` rows as Hydra leaves them."""

    build: BuildFacts = field(
        default_factory=lambda: make_build(
            drvpath=DRV,
            finished=False,
            starttime=None,
            stoptime=None,
            status=None,
            size=None,
            closure_size=None,
        )
    )
    steps: dict[int, StepFacts] = field(default_factory=dict)

    def step_list(self) -> list[StepFacts]:
        return [self.steps[n] for n in sorted(self.steps)]


# Hydra's actions on the rows. Each returns the notification it sends ("step", "build") or a
# trigger ("trigger": a payload-less channel such as builds_cancelled), or None.
Action = Callable[[Rows], tuple[str, int] | None]


def step(
    nr: int, status: int, start: int, stop: int, *, drv: str = DRV, machine: str = "builder-1"
) -> Action:
    """A build step that ran from ``start`` to ``stop`` (seconds after T0) and ended with ``status``."""

    def act(rows: Rows) -> tuple[str, int]:
        rows.steps[nr] = make_step(
            stepnr=nr,
            drvpath=drv,
            status=status,
            errormsg=None if status == 0 else "builder failed",
            starttime=T0 + start,
            stoptime=T0 + stop,
            machine=machine,
        )
        return "step", nr

    return act


def running(nr: int, start: int) -> Action:
    """A build step of the build's own derivation that started and is still running."""

    def act(rows: Rows) -> None:
        rows.steps[nr] = make_step(stepnr=nr, drvpath=DRV, status=None, starttime=T0 + start, stoptime=None)

    return act


def finish(status: int, stop: int) -> Action:
    """The queue runner finishes the build with its top-level step's status and times."""

    def act(rows: Rows) -> tuple[str, int]:
        top = max((s for s in rows.steps.values() if s.drvpath == DRV), key=lambda s: s.stepnr)
        done = status == 0
        rows.build = rows.build._replace(
            finished=True,
            status=status,
            starttime=top.starttime,
            stoptime=T0 + stop,
            cached=False,
            size=1_000 if done else rows.build.size,
            closure_size=5_000 if done else rows.build.closure_size,
        )
        return "build", 0

    return act


def restart(rows: Rows) -> tuple[str, int]:
    """The web UI's restart: only ``finished`` (and ``iscachedbuild``) change; builds_restarted fires."""
    rows.build = rows.build._replace(finished=False, cached=False)
    return "trigger", 0


def cancel(at: int, *, killing: int) -> Action:
    """The web UI's cancel at ``at`` (finished, status 4; only builds_cancelled fires), and the queue
    runner killing step ``killing``, which no build needs any more (status 4, no notification).

    One action: the scan the trigger starts sees the row only once the catch-up lag has passed, by
    when the queue runner (woken by the same change) has killed the step.
    """

    def act(rows: Rows) -> tuple[str, int]:
        rows.build = rows.build._replace(
            finished=True, status=4, starttime=T0 + at, stoptime=T0 + at, cached=False
        )
        rows.steps[killing] = rows.steps[killing]._replace(status=4, stoptime=T0 + at)
        return "trigger", 0

    return act


SCENARIOS: dict[str, list[Action]] = {
    # The first attempt's own step timed out on a named machine; the restart succeeded.
    "timed-out-then-restarted": [
        step(1, 0, 10, 20, drv=DEP, machine=""),
        step(2, 7, 30, 100, machine="builder-2"),
        finish(7, 100),
        restart,
        step(3, 0, 200, 260),
        finish(0, 260),
    ],
    # The first attempt's own step failed; the restart succeeded.
    "failed-then-restarted": [
        step(1, 1, 30, 90),
        finish(1, 90),
        restart,
        step(2, 0, 150, 200),
        finish(0, 200),
    ],
    # Cancelled from the web UI while its own step ran (the queue runner kills the step at once);
    # restarted, it succeeded.
    "cancelled-then-restarted": [
        running(1, 30),
        cancel(60, killing=1),
        restart,
        step(2, 0, 120, 180),
        finish(0, 180),
    ],
    # Failed, restarted and timed out, restarted and succeeded.
    "restarted-twice": [
        step(1, 0, 10, 15, drv=DEP, machine=""),
        step(2, 1, 20, 50),
        finish(1, 50),
        restart,
        step(3, 7, 100, 160, machine="builder-2"),
        finish(7, 160),
        restart,
        step(4, 0, 200, 230),
        finish(0, 230),
    ],
}


class Exported:
    """What a daemon process sent: spans by (trace, span) ID, as the resolver filters them."""

    def __init__(self) -> None:
        self.spans: dict[Key, SpanRecord] = {}
        self.contents: dict[Key, set[SpanRecord]] = {}

    def add(self, records: list[SpanRecord], rebuilt: set[Key] = frozenset()) -> None:  # type: ignore[assignment]
        for r in records:
            key = (r.trace_id, r.span_id)
            if key in rebuilt and key in self.spans:
                continue  # the resolver keeps the span it exported from the row (Resolver._new_attempts)
            self.spans[key] = r
            self.contents.setdefault(key, set()).add(r)


def render_build(rows: Rows, out: Exported) -> None:
    """What the resolver exports for a build (the earlier attempts' build spans count as rebuilt)."""
    b, steps = rows.build, rows.step_list()
    spans = build_spans(RENDER_CONFIG, b, steps)
    latest = spans[0].attrs()[sc.HYDRA_BUILD_ATTEMPT]
    assert isinstance(latest, int)
    rebuilt = {
        (s.trace_id, s.span_id)
        for s in spans
        if s.name.startswith("build ") and s.attrs()[sc.HYDRA_BUILD_ATTEMPT] != latest
    }
    out.add(spans, rebuilt)


def render_step(rows: Rows, nr: int, out: Exported) -> None:
    """What the resolver exports for a finished step (resolver._steps)."""
    b, steps = rows.build, rows.step_list()
    attempt = step_attempt(b, steps, nr)
    if step_needs_build(b, steps, attempt):
        render_build(rows, out)
    else:
        out.add([step_span(RENDER_CONFIG, b, rows.steps[nr], attempt)])


def live(actions: list[Action]) -> tuple[Rows, Exported]:
    """A daemon that hears every notification and trigger."""
    rows, out = Rows(), Exported()
    for act in actions:
        heard = act(rows)
        if heard is None:
            continue
        kind, nr = heard
        if kind == "step":
            render_step(rows, nr, out)
        elif rows.build.stoptime is not None and (kind == "build" or rows.build.finished):
            render_build(rows, out)  # build_finished, or a triggered scan that finds a finished row
    return rows, out


def after_a_restart(actions: list[Action]) -> tuple[Rows, Exported]:
    """A daemon that heard the first step, then was down until the end; its catch-up then runs.

    The catch-up sends the finished steps of builds still running (here: restarted ones) and the
    finished builds; both go through the resolver.
    """
    rows, out = Rows(), Exported()
    first = True
    for act in actions:
        heard = act(rows)
        if heard is not None and heard[0] == "step" and first:
            render_step(rows, heard[1], out)
            first = False
    if rows.build.finished:
        render_build(rows, out)
    else:
        for nr, s in rows.steps.items():
            if s.status is not None and s.stoptime is not None:
                render_step(rows, nr, out)
    return rows, out


def backfill(rows: Rows) -> dict[Key, SpanRecord]:
    """A backfill renders every finished build from its final rows."""
    out = Exported()
    render_build(rows, out)
    return out.spans


def eval_root(spans: list[SpanRecord]) -> SpanRecord:
    """A stand-in for the evaluation's root span, so the waterfall shows the build spans under it."""
    return SpanRecord(
        trace_id=ids.trace_id(EVAL_KEY),
        span_id=EVAL_ROOT,
        parent_span_id=None,
        name="eval 42",
        kind=Kind.SERVER,
        start_ns=min(s.start_ns for s in spans),
        end_ns=max(s.end_ns for s in spans),
        attributes=(),
    )


def describe(spans: dict[Key, SpanRecord]) -> str:
    """The golden text: a waterfall, then one line per span with its IDs, attempt and result."""
    records = sorted(spans.values(), key=lambda r: (r.start_ns, r.name, r.span_id))
    text = render_waterfall([from_record(r) for r in [eval_root(records), *records]], width=100)
    lines = []
    for r in records:
        a = r.attrs()
        what = [f"{k}={a[k]}" for k in (sc.HYDRA_BUILD_ATTEMPT, sc.HYDRA_STEP_NR) if k in a]
        result = a.get(sc.CICD_PIPELINE_TASK_RUN_RESULT, "-")
        lines.append(
            f"{r.span_id:016x} parent {r.parent_span_id or 0:016x} {r.name:<26} {' '.join(what):<22} "
            f"{(r.start_ns // S - T0):>4}..{(r.end_ns // S - T0):<4} {result}"
        )
    return text + "\n" + "\n".join(line.rstrip() for line in lines) + "\n"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_step_row_has_a_span_under_an_existing_parent(name: str) -> None:
    """The backfill has a span for every step row, and every span's parent exists."""
    rows, _ = live(SCENARIOS[name])
    spans = backfill(rows)
    step_nrs = {r.attrs().get(sc.HYDRA_STEP_NR) for r in spans.values()} - {None}
    assert step_nrs == set(rows.steps)
    span_ids = {k[1] for k in spans} | {EVAL_ROOT}
    assert {r.parent_span_id for r in spans.values()} <= span_ids
    attempts = {r.attrs()[sc.HYDRA_BUILD_ATTEMPT] for r in spans.values() if r.name.startswith("build ")}
    assert attempts == set(range(len(attempts)))
    assert len(attempts) == 1 + sum(1 for act in SCENARIOS[name] if act is restart)


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("renderer", [live, after_a_restart])
def test_live_and_restarted_renderings_agree_with_the_backfill(
    name: str, renderer: Callable[[list[Action]], tuple[Rows, Exported]]
) -> None:
    """Whatever a daemon exported, live or after a restart, is in the backfill with the same bytes, once."""
    rows, exported = renderer(SCENARIOS[name])
    final = backfill(rows)
    assert set(exported.spans) == set(final)
    for key, contents in exported.contents.items():
        assert contents == {final[key]}, final[key].name


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_golden(name: str) -> None:
    """The backfill of each scenario, drawn and listed (see the module docstring to update)."""
    rows, _ = live(SCENARIOS[name])
    text = describe(backfill(rows))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
