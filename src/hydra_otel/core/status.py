"""Hydra's build and step status codes, mapped to CI/CD results and error types.

One table, :data:`STATUSES`, is the single source: span status, the
``cicd.pipeline.task.run.result`` value and ``error.type`` all come from it,
and docs/spans.md prints it. Codes from Hydra's ``BuildStatus`` (both queue
runner generations use the same numbers; 5 "obsolete" exists only in old rows).

The mapping follows the CI/CD conventions and "Recording errors": a span is an
error exactly when its result is ``failure``, ``error`` or ``timeout``, and
only then carries ``error.type``. Cancelled (4) and obsolete (5) builds are
``cancellation`` and ``skip``: nobody's mistake, so their span status is UNSET
and they count in no error metric (docs/decisions/0005-cicd-results.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra_otel.core import semconv as sc
from hydra_otel.core.spans import Status

#: Results that make a span an error (span status ERROR, ``error.type`` set, an error metric counted).
ERROR_RESULTS = frozenset({sc.RESULT_FAILURE, sc.RESULT_ERROR, sc.RESULT_TIMEOUT})

#: ``error.type`` values that are failures of Hydra itself, not of what it built or evaluated,
#: with the Hydra component that failed (``cicd.system.component``): they count in
#: ``cicd.system.errors`` instead of ``cicd.pipeline.run.errors``.
SYSTEM_ERROR_COMPONENTS: dict[str, str] = {
    "aborted": sc.COMPONENT_QUEUE_RUNNER,
    "evaluator_died": sc.COMPONENT_EVALUATOR,
}


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """What one Hydra status code means for a span."""

    name: str  # Hydra's wording, lower case
    result: str  # cicd.pipeline.task.run.result
    error_type: str | None  # error.type when the span is an error; None otherwise
    #: OK for success, ERROR for an error result, UNSET for cancellation and skip. Derived once:
    #: every build and step span reads it.
    span_status: Status = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "span_status", span_status(self.result))  # frozen: set once, here


def span_status(result: str) -> Status:
    """The span status for a ``cicd.*.result`` value (see the module docstring)."""
    if result == sc.RESULT_SUCCESS:
        return Status.OK
    return Status.ERROR if result in ERROR_RESULTS else Status.UNSET


STATUSES: dict[int, StatusInfo] = {
    0: StatusInfo("succeeded", sc.RESULT_SUCCESS, None),
    1: StatusInfo("failed", sc.RESULT_FAILURE, "build_failed"),
    2: StatusInfo("dependency failed", sc.RESULT_FAILURE, "dependency_failed"),
    3: StatusInfo("aborted", sc.RESULT_ERROR, "aborted"),
    4: StatusInfo("cancelled", sc.RESULT_CANCELLATION, None),
    5: StatusInfo("obsolete", sc.RESULT_SKIP, None),
    6: StatusInfo("failed with output", sc.RESULT_FAILURE, "failed_with_output"),
    7: StatusInfo("timed out", sc.RESULT_TIMEOUT, "timed_out"),
    8: StatusInfo("cached failure", sc.RESULT_FAILURE, "cached_failure"),
    9: StatusInfo("unsupported system", sc.RESULT_ERROR, "unsupported_system"),
    10: StatusInfo("log limit exceeded", sc.RESULT_ERROR, "log_limit_exceeded"),
    11: StatusInfo("output size limit exceeded", sc.RESULT_ERROR, "output_limit_exceeded"),
    12: StatusInfo("not deterministic", sc.RESULT_FAILURE, "not_deterministic"),
    13: StatusInfo("resolved to a content-addressed derivation", sc.RESULT_SUCCESS, None),
}

_UNKNOWN = StatusInfo("unknown", sc.RESULT_ERROR, "unknown_status")


def status_info(code: int | None) -> StatusInfo:
    """The meaning of ``code``; unknown codes are errors named after their number."""
    if code is None:
        return _UNKNOWN
    return STATUSES.get(code) or StatusInfo(f"unknown status {code}", sc.RESULT_ERROR, f"status_{code}")
