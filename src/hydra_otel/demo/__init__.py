"""``hydra-otel demo`` and its kit, kept apart from the daemon: nothing the daemon runs imports it.

* :mod:`hydra_otel.demo.run`: the demo itself (the real daemon against a scripted Hydra);
* :mod:`hydra_otel.demo.workload`: the scripted workload it plays;
* :mod:`hydra_otel.demo.waterfall`: the terminal waterfall and the OTLP/JSON writer;
* :mod:`hydra_otel.demo.sandbox`: the throwaway PostgreSQL, the Hydra simulator and the in-process
  OTLP receivers that the demo, the test suite and the benchmarks share.
"""
