"""The daemon's own health and counters: how hydra-otel itself is doing, not Hydra's CI/CD.

* :mod:`hydra_otel.selfmon.stats`: the counters the pipeline's tasks increment (``Stats``);
* :mod:`hydra_otel.selfmon.server`: the ``/metrics`` (Prometheus text) and ``/healthz`` server
  that shows them.

The CI/CD metrics hydra-otel *exports* (evaluation and build durations, errors, ...) are
another thing: :mod:`hydra_otel.core.cicd_metrics` derives them and
:mod:`hydra_otel.adapters.otlp_metrics` sends them over OTLP.
"""
