"""Attribute keys and values, in one place.

The ``cicd.*`` keys follow the OpenTelemetry CI/CD semantic conventions
(incubating); ``error.type`` and ``exception.*`` are stable general keys.
Everything Hydra-specific lives under ``hydra.*``. They are our own string
constants so the core does not import OpenTelemetry.
"""

from __future__ import annotations

CICD_PIPELINE_NAME = "cicd.pipeline.name"
CICD_PIPELINE_RUN_ID = "cicd.pipeline.run.id"
CICD_PIPELINE_RUN_URL_FULL = "cicd.pipeline.run.url.full"
CICD_PIPELINE_RESULT = "cicd.pipeline.result"
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"

# cicd.pipeline.result values (semantic conventions enum)
RESULT_SUCCESS = "success"
RESULT_FAILURE = "failure"
RESULT_ERROR = "error"
RESULT_TIMEOUT = "timeout"
RESULT_CANCELLATION = "cancellation"
RESULT_SKIP = "skip"

HYDRA_PROJECT = "hydra.project"
HYDRA_JOBSET = "hydra.jobset"
HYDRA_JOBSET_ID = "hydra.jobset.id"
HYDRA_EVAL_ID = "hydra.eval.id"
HYDRA_EVAL_HASH = "hydra.eval.input_hash"
HYDRA_EVAL_FLAKE = "hydra.eval.flake"
HYDRA_EVAL_NIXEXPR_INPUT = "hydra.eval.nixexpr.input"
HYDRA_EVAL_NIXEXPR_PATH = "hydra.eval.nixexpr.path"
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
