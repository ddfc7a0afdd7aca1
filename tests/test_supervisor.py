"""Which errors end the process instead of restarting the pipeline (service._fatal)."""

from __future__ import annotations

import pytest

from hydra_otel.errors import (
    ConfigError,
    DbSettingsError,
    DbUnavailable,
    LeadershipLost,
    PermissionDenied,
    StateDirError,
)
from hydra_otel.service import _fatal


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError(["bad"]),
        DbSettingsError("the database connection settings are invalid"),
        StateDirError("cannot use the state directory"),
        LeadershipLost("another instance took the lock"),
        ExceptionGroup("pipeline", [ExceptionGroup("sources", [DbSettingsError("sslmode")])]),
        ExceptionGroup("pipeline", [RuntimeError("bug"), LeadershipLost("lost")]),
    ],
    ids=repr,
)
def test_configuration_state_and_leadership_errors_end_the_process(exc: Exception) -> None:
    assert _fatal(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("a bug"),
        KeyError(3),
        DbUnavailable("down"),  # never reaches the supervisor in practice: every task retries it
        PermissionDenied("buildsteps", "GRANT SELECT ON buildsteps TO r;", "denied"),
        ExceptionGroup("pipeline", [ExceptionGroup("sources", [ValueError("bug")])]),
    ],
    ids=repr,
)
def test_anything_else_restarts_the_pipeline(exc: Exception) -> None:
    assert not _fatal(exc)
