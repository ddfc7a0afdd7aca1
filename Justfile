# hydra-otel developer tasks. `just setup` first; everything else uses .venv.

venv := ".venv/bin"

# Create the virtualenv with the project, test and lint tools.
setup:
    python3 -m venv .venv
    {{venv}}/pip install -q -e '.[dev]'

# Run the whole test suite (starts its own PostgreSQL cluster and OTLP receivers).
test *args:
    {{venv}}/pytest {{args}}

# Only the fast, I/O-free unit tests.
test-unit *args:
    {{venv}}/pytest -m "not integration" {{args}}

# The tests against a real OpenTelemetry Collector and Jaeger v2 (built from Go modules, cached; needs Go).
test-peers *args:
    bash tests/peers/build.sh
    {{venv}}/pytest tests/peers {{args}}

# Format check, lint, strict typing, then the tests.
check:
    {{venv}}/ruff format --check .
    {{venv}}/ruff check .
    {{venv}}/mypy
    {{venv}}/pytest -q

# Format the code.
fmt:
    {{venv}}/ruff format .
    {{venv}}/ruff check --fix .

# Run the daemon (configure with flags or HYDRA_OTEL_* / OTEL_* variables; see docs/configuration.md).
run *args:
    {{venv}}/hydra-otel run {{args}}

# Benchmarks at nixpkgs scale: a throwaway PostgreSQL, an OTLP receiver, the real daemon (docs/performance.md);
# then the same again with a CPU hog on the machine.
bench *args:
    {{venv}}/python benchmarks/run.py --hog-pass {{args}}

# A small benchmark run (scale 0.02), to check it still works.
bench-smoke:
    {{venv}}/python benchmarks/run.py --scale 0.02 --out bench-smoke-results.json

# A mixed Hydra workload under random faults (PostgreSQL restarts, killed backends, SIGKILLed daemon,
# collector UNAVAILABLE), then every span checked against the database. `just chaos --seed N` replays.
chaos *args:
    {{venv}}/python -m tests.chaos {{args}}
