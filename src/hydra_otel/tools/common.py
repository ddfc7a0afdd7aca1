"""What ``ids`` and ``check`` share: the tables and columns the daemon reads, errors, redaction."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote, urlsplit

import trio

from hydra_otel.config import Config
from hydra_otel.errors import HydraOtelError, first_leaf

#: Every Hydra table and column the daemon reads (adapters/queries.py), plus what ``check`` reads itself.
HYDRA_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "schemaversion": ("version",),  # read by check only, for the version hint
    "projects": ("name",),  # not queried (jobsets.project names it); its absence means "not Hydra's database"
    "jobsets": (
        "id", "name", "project", "errormsg", "errortime", "fetcherrormsg", "starttime", "lastcheckedtime",
    ),
    "jobsetevals": (
        "id", "jobset_id", "evaluationerror_id", "timestamp", "checkouttime", "evaltime", "hasnewbuilds",
        "nrbuilds", "hash", "flake", "nixexprinput", "nixexprpath",
    ),
    "evaluationerrors": ("id", "errormsg", "errortime"),
    "jobsetevalmembers": ("eval", "build", "isnew"),
    "jobsetevalinputs": ("eval", "name", "altnr", "type", "uri", "revision"),
    "builds": (
        "id", "finished", "timestamp", "jobset_id", "job", "nixname", "drvpath", "system", "priority",
        "globalpriority", "starttime", "stoptime", "iscachedbuild", "buildstatus", "size", "closuresize",
        "releasename",
    ),
    "buildsteps": (
        "build", "stepnr", "type", "drvpath", "busy", "status", "errormsg", "starttime", "stoptime", "machine",
        "system", "propagatedfrom", "overhead", "timesbuilt", "isnondeterministic", "resolveddrvpath",
    ),
}  # fmt: skip

#: Hydra schema version that added a table or column; anything not listed predates them all.
ADDED_IN: Final[Mapping[str, int]] = {
    "builds.globalpriority": 40,
    "buildsteps.overhead": 45,
    "buildsteps.timesbuilt": 52,
    "buildsteps.isnondeterministic": 52,
    "jobsets.starttime": 53,
    "jobsetevals.flake": 58,
    "jobsets.id": 59,
    "builds.jobset_id": 61,
    "jobsetevals.nixexprinput": 71,
    "jobsetevals.nixexprpath": 71,
    "jobsetevals.jobset_id": 72,
    "evaluationerrors": 73,
    "jobsetevals.evaluationerror_id": 73,
    "buildsteps.resolveddrvpath": 87,
}

#: Columns the daemon reads only when present (adapters/queries.py checks for them).
OPTIONAL_COLUMNS: Final = frozenset({"buildsteps.resolveddrvpath"})

#: The oldest Hydra schema with everything required, and the newest one hydra-otel was written against.
OLDEST_SCHEMA: Final = 73
NEWEST_SCHEMA: Final = 87

JAEGER_URL_ENV: Final = "HYDRA_OTEL_JAEGER_URL"
TEMPO_URL_ENV: Final = "HYDRA_OTEL_TEMPO_URL"
TEMPO_DATASOURCE_ENV: Final = "HYDRA_OTEL_TEMPO_DATASOURCE"

#: Seconds allowed for each database step of ``check``, and for ``ids --build``'s queries.
DB_TIMEOUT: Final = 20.0
#: Seconds allowed for the LISTEN/NOTIFY round trip, connection included.
LISTEN_TIMEOUT: Final = 10.0
#: The name of the span ``check`` exports.
CHECK_SPAN_NAME: Final = "hydra-otel check"


class UsageError(Exception):
    """A command-line combination argparse cannot reject by itself (exit status 2)."""


class ToolError(Exception):
    """The command cannot answer (unreachable database, unknown build); exit status 1."""


def describe(exc: BaseException, cfg: Config) -> str:
    """A one-line reason for ``exc`` that never shows the database password."""
    exc = first_leaf(exc)
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    first = str(exc).strip().split("\n", 1)[0]
    if isinstance(exc, HydraOtelError) and first:
        text = first  # our own messages say what happened; the class adds nothing
    else:
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    text = text.replace(cfg.db.url, cfg.db.redacted_url)
    for secret in _secrets_of(cfg.db.url):
        text = text.replace(secret, "***")
    return text


def _secrets_of(url: str) -> list[str]:
    found = [m.group(1) for m in re.finditer(r"(?i)password\s*=\s*'?([^'\s&;]+)", url)]
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found += [password, unquote(password)]
    return [s for s in found if len(s) >= 3]  # replacing a one-letter "password" would garble the text
