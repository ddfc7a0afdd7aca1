"""The pipeline both ``hydra-otel run`` and ``hydra-otel backfill`` build from.

``factories`` turns the configuration into what the pipeline needs (render settings, the
OTLP span sink, the CI/CD metrics sink, the step-log tails) and releases the sinks at the
end; ``tail`` starts the resolver → exporter stages that turn work into exported spans
and acknowledged checkpoints into stored progress marks. ``service.py`` adds the live
head (listener, intake, stitcher, catch-up); ``backfill/run.py`` adds its own producer of
work. Neither imports the other.
"""
