"""The Hydra schema subset the sandbox databases are created with.

The SQL lives in package data files so that it can be read, diffed against Hydra's own schema and
loaded with ``psql`` as it is. As in Hydra, there is one base schema (``hydra-85.sql``, the legacy
Hydra with the C++ queue runner) and one small upgrade script per later version
(``upgrade-86.sql``, ``upgrade-87.sql``: the current Hydra with the Rust queue runner), each
recording its version in ``schemaversion``, which is how the daemon tells the two apart.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

#: Schema versions a sandbox database can be created with, oldest first.
SCHEMA_VERSIONS: Final = (85, 87)

#: The base schema's version; later versions apply ``upgrade-N.sql`` scripts to it.
BASE_SCHEMA_VERSION: Final = 85

#: The version ``PgCluster.createdb`` uses unless told otherwise: the current Hydra's.
CURRENT_SCHEMA_VERSION: Final = 87


def schema_sql(version: int) -> str:
    """Return the SQL script that creates the Hydra tables hydra-otel reads, at ``version``.

    The script creates the tables, indexes and NOTIFY triggers and inserts ``version`` into
    ``schemaversion``. It is meant to run in one transaction on an empty database.

    Args:
        version: Hydra schema version, 85 (legacy Hydra) or 87 (current Hydra).

    Returns:
        The SQL text.

    Raises:
        ValueError: if there is no script for ``version``.
    """
    if version not in SCHEMA_VERSIONS:
        known = ", ".join(str(v) for v in SCHEMA_VERSIONS)
        raise ValueError(f"no sandbox schema for Hydra schema version {version!r} (known: {known})")
    files = resources.files("hydra_otel.demo.sandbox")
    scripts = [f"hydra-{BASE_SCHEMA_VERSION}.sql"]
    scripts += [f"upgrade-{v}.sql" for v in range(BASE_SCHEMA_VERSION + 1, version + 1)]
    return "\n".join(files.joinpath(name).read_text(encoding="utf-8") for name in scripts)
