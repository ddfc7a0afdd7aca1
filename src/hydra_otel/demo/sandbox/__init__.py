"""Throwaway infrastructure for the test suite, the benchmarks and ``hydra-otel demo``.

Nothing here is used by the daemon itself:

* :mod:`hydra_otel.demo.sandbox.pgcluster`: a private PostgreSQL cluster on a unix socket;
* :mod:`hydra_otel.demo.sandbox.schema`: the subset of Hydra's schema (versions 85 and 87) the daemon reads,
  with Hydra's NOTIFY triggers;
* :mod:`hydra_otel.demo.sandbox.receiver`: in-process OTLP/gRPC and OTLP/HTTP trace receivers.
"""
