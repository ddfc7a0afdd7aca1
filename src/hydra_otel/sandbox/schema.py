"""The Hydra schema subset the sandbox databases are created with.

The SQL lives in package data files (``hydra-85.sql``, ``hydra-87.sql``) so that it can be read,
diffed against Hydra's own ``hydra.sql`` and loaded with ``psql`` as it is. Version 85 is the legacy
Hydra (C++ queue runner); version 87 is the current one (Rust queue runner). Each file ends by
recording its version in ``schemaversion``, which is how the daemon tells the two apart.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

#: Schema versions a sandbox database can be created with, oldest first.
SCHEMA_VERSIONS: Final = (85, 87)

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
    return resources.files("hydra_otel.sandbox").joinpath(f"hydra-{version}.sql").read_text(encoding="utf-8")
