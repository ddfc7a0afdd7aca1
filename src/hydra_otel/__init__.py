"""hydra-otel: Hydra CI evaluations, builds and steps as OpenTelemetry traces."""

__version__ = "0.1.0"
