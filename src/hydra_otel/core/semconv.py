"""Attribute keys and values, in one place.

The ``cicd.*``, ``vcs.*`` and resource keys follow the OpenTelemetry semantic
conventions registry (model/cicd, model/vcs; incubating); ``error.type`` and
``exception.*`` are stable general keys. Everything Hydra-specific lives under
``hydra.*``. They are our own string constants so the core does not import
OpenTelemetry; the table in docs/spans.md lists each key with its registry
status, and tests/core/test_semconv_docs.py checks both against this module and
the installed registry package. Enum values have a ``RESULT_``, ``ACTION_``,
``STATE_`` or ``COMPONENT_`` prefix; every other upper-case name is a key.
"""

from __future__ import annotations

CICD_PIPELINE_NAME = "cicd.pipeline.name"
CICD_PIPELINE_ACTION_NAME = "cicd.pipeline.action.name"
CICD_PIPELINE_RUN_ID = "cicd.pipeline.run.id"
CICD_PIPELINE_RUN_URL_FULL = "cicd.pipeline.run.url.full"
CICD_PIPELINE_RESULT = "cicd.pipeline.result"
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"

CICD_PIPELINE_RUN_STATE = "cicd.pipeline.run.state"
CICD_SYSTEM_COMPONENT = "cicd.system.component"
CICD_WORKER_STATE = "cicd.worker.state"
VCS_REF_HEAD_REVISION = "vcs.ref.head.revision"
VCS_REPOSITORY_URL_FULL = "vcs.repository.url.full"
#: Resource attributes (set once per process, see docs/configuration.md).
SERVICE_INSTANCE_ID = "service.instance.id"
DEPLOYMENT_ENVIRONMENT_NAME = "deployment.environment.name"

#: cicd.pipeline.action.name: a Hydra evaluation and its builds build the jobset's jobs. It also
#: starts span names of pipeline runs, as the convention's ``{action} {pipeline}`` asks.
ACTION_BUILD = "BUILD"
#: cicd.pipeline.run.state: an evaluation's root span covers checkout and evaluation.
STATE_EXECUTING = "executing"
#: cicd.worker.state: a build machine running at least one step.
STATE_BUSY = "busy"
#: cicd.system.component values: the Hydra program that failed.
COMPONENT_EVALUATOR = "hydra-evaluator"
COMPONENT_QUEUE_RUNNER = "hydra-queue-runner"

# cicd.pipeline.result values (semantic conventions enum)
RESULT_SUCCESS = "success"
RESULT_FAILURE = "failure"
RESULT_ERROR = "error"
RESULT_TIMEOUT = "timeout"
RESULT_CANCELLATION = "cancellation"
RESULT_SKIP = "skip"

#: What a span stands for, a small fixed set (evaluation, attempt, checkout, evaluate, evaluator_run,
#: build, queued, step): span names carry job and derivation names, this never does, so span
#: metrics and queries group by it.
HYDRA_SPAN_TYPE = "hydra.span.type"
HYDRA_PROJECT = "hydra.project"
HYDRA_JOBSET = "hydra.jobset"
HYDRA_JOBSET_ID = "hydra.jobset.id"
HYDRA_JOBSET_URL = "hydra.jobset.url"
HYDRA_EVAL_ID = "hydra.eval.id"
HYDRA_EVAL_HASH = "hydra.eval.input_hash"
HYDRA_EVAL_FLAKE = "hydra.eval.flake"
HYDRA_EVAL_NIXEXPR_INPUT = "hydra.eval.nixexpr.input"
HYDRA_EVAL_NIXEXPR_PATH = "hydra.eval.nixexpr.path"
#: Event name, one per ``jobsetevalinputs`` row, with the four keys below.
HYDRA_EVAL_INPUT_EVENT = "hydra.eval.input"
HYDRA_EVAL_INPUT_NAME = "hydra.eval.input.name"
HYDRA_EVAL_INPUT_TYPE = "hydra.eval.input.type"
HYDRA_EVAL_INPUT_URI = "hydra.eval.input.uri"
HYDRA_EVAL_INPUT_REVISION = "hydra.eval.input.revision"
#: Which input ``vcs.*`` describes: ``flake`` or the name of the nixexpr input.
HYDRA_EVAL_MAIN_INPUT = "hydra.eval.main_input"
HYDRA_EVAL_HAS_NEW_BUILDS = "hydra.eval.has_new_builds"
HYDRA_EVAL_BUILDS = "hydra.eval.builds"
HYDRA_EVAL_BUILDS_NEW = "hydra.eval.builds.new"
HYDRA_EVAL_BUILDS_CACHED_FINISHED = "hydra.eval.builds.cached_finished"
HYDRA_EVAL_BUILDS_CACHED_QUEUED = "hydra.eval.builds.cached_queued"
HYDRA_EVAL_CHECKOUT_TIME = "hydra.eval.checkout_time_s"
HYDRA_EVAL_EVAL_TIME = "hydra.eval.eval_time_s"
HYDRA_EVAL_HAS_ERRORS = "hydra.eval.has_errors"
HYDRA_EVAL_INPUTS_UNCHANGED = "hydra.eval.inputs_unchanged"
HYDRA_EVAL_PREVIOUS_ID = "hydra.eval.previous_id"
HYDRA_EVAL_CORRELATION_ID = "hydra.eval.correlation_id"
HYDRA_EVAL_START_OBSERVED = "hydra.eval.start_observed"
HYDRA_EVAL_ABANDON_REASON = "hydra.eval.abandon_reason"
HYDRA_LINK_TYPE = "hydra.link.type"

CICD_PIPELINE_TASK_NAME = "cicd.pipeline.task.name"
CICD_PIPELINE_TASK_RUN_ID = "cicd.pipeline.task.run.id"
CICD_PIPELINE_TASK_RUN_URL_FULL = "cicd.pipeline.task.run.url.full"
CICD_PIPELINE_TASK_RUN_RESULT = "cicd.pipeline.task.run.result"
CICD_WORKER_ID = "cicd.worker.id"
CICD_WORKER_NAME = "cicd.worker.name"

HYDRA_BUILD_ID = "hydra.build.id"
HYDRA_BUILD_JOB = "hydra.build.job"
HYDRA_BUILD_SYSTEM = "hydra.system"
HYDRA_BUILD_NIXNAME = "hydra.build.nix_name"
HYDRA_BUILD_DRV_PATH = "hydra.drv_path"
HYDRA_BUILD_STATUS = "hydra.build.status"
HYDRA_BUILD_STATUS_NAME = "hydra.build.status_name"
HYDRA_BUILD_CACHED = "hydra.build.cached"
HYDRA_BUILD_PRIORITY = "hydra.build.priority"
HYDRA_BUILD_GLOBAL_PRIORITY = "hydra.build.global_priority"
HYDRA_BUILD_SIZE = "hydra.build.size_bytes"
HYDRA_BUILD_CLOSURE_SIZE = "hydra.build.closure_size_bytes"
HYDRA_BUILD_RELEASE_NAME = "hydra.build.release_name"
HYDRA_BUILD_ATTEMPT = "hydra.build.attempt"
HYDRA_BUILD_OWN_TRACE = "hydra.build.own_trace"
HYDRA_BUILD_STEPS_OMITTED = "hydra.build.steps_omitted"
HYDRA_EVAL_BUILDS_OWN_TRACES = "hydra.eval.builds.own_traces"

HYDRA_STEP_NR = "hydra.step.nr"
HYDRA_STEP_TYPE = "hydra.step.type"
HYDRA_STEP_STATUS = "hydra.step.status"
HYDRA_STEP_STATUS_NAME = "hydra.step.status_name"
HYDRA_STEP_ERROR = "hydra.step.error"
HYDRA_STEP_PROPAGATED_FROM = "hydra.step.propagated_from"
HYDRA_STEP_OVERHEAD_MS = "hydra.step.overhead_ms"
HYDRA_STEP_TIMES_BUILT = "hydra.step.times_built"
HYDRA_STEP_NONDETERMINISTIC = "hydra.step.nondeterministic"
HYDRA_STEP_RESOLVED_DRV_PATH = "hydra.step.resolved_drv_path"
HYDRA_STEP_LOG_URL = "hydra.step.log_url"
