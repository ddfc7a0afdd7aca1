"""The trace budget: how many spans one trace may hold, and which step spans fit.

Theory of operation. Backends refuse large traces (Tempo: 5 MB by default), and
the size of a trace grows with its spans, not its builds: one build of a new
platform's bootstrap can have 20,000 steps. So the budget counts spans.

A trace's spans are rendered piecemeal, over hours: a step when its
``step_finished`` arrives, a build with all its steps when it finishes, each
restart again. No process ever sees a whole trace, so the budget cannot be a
running total (a restarted daemon or a backfill would count differently).
Instead every build gets a fixed **share** of its trace, computed from rows
that do not change once the evaluation is committed:

* a build in its evaluation's trace: ``(max_spans_per_trace - EVAL_SPANS) // n``,
  where ``n`` is the number of builds that trace holds (the evaluation's new
  builds, at most ``max_builds_per_trace``);
* a build in a trace of its own: ``max_spans_per_trace``.

One finish of a build spends its share on its build span, its ``queued`` span
and its steps: the step that ended the attempt (the build's own derivation)
always, and the other steps of the attempt by step number, first come first
kept. A step's place in its attempt is its step number minus the previous
attempt's ending step, both in the rows whenever the step is rendered, so the
live path, a restarted daemon and a backfill keep exactly the same steps. The
build span says how many of the attempt's steps were left out.
"""

from __future__ import annotations

from hydra_otel.core import semconv as sc
from hydra_otel.core.spans import SpanRecord

#: Spans of an evaluation's own: root, ``checkout``, ``evaluate``, ``evaluator run``.
EVAL_SPANS = 4
#: Spans of one build finish besides its steps: the build span and ``queued``.
BUILD_SPANS = 2


def build_share(max_spans: int, trace_builds: int, *, own_trace: bool) -> int:
    """Spans one finish of a build may take in its trace.

    Args:
        max_spans: the trace budget (``--max-spans-per-trace``).
        trace_builds: builds sharing the trace (1 for a build in a trace of its own).
        own_trace: whether the build is the root of its own trace.
    """
    if own_trace:
        return max_spans
    return (max_spans - EVAL_SPANS) // max(1, trace_builds)


def step_limit(share: int) -> int:
    """Step spans one finish of a build may have: its share minus the build's own spans, at least 1."""
    return max(1, share - BUILD_SPANS)


def step_kept(limit: int, position: int, *, ends_attempt: bool) -> bool:
    """Whether a step fits: the attempt's ending step always, others while ``position < limit``.

    Args:
        limit: :func:`step_limit` of the build.
        position: the step's place in its attempt, from 1 (step number minus the previous
            attempt's ending step number).
        ends_attempt: whether the step ended the attempt (it is then kept, in the last place).
    """
    return ends_attempt or position < limit


def min_spans_per_trace(max_builds: int) -> int:
    """The smallest budget that leaves every build of a full trace one step (configuration check)."""
    return EVAL_SPANS + max_builds * (BUILD_SPANS + 1)


def steps_omitted(record: SpanRecord) -> int:
    """The steps a build span says were left out of its trace (0 for any other span).

    Only a build span carries the count, as its last attribute (core/builds.py): one look, not a
    scan, since this runs for every exported span.
    """
    if record.attributes:
        key, value = record.attributes[-1]
        if key == sc.HYDRA_BUILD_STEPS_OMITTED and isinstance(value, int):
            return value
    return 0
