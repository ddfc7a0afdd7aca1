"""PostgreSQL data sources: legacy Hydra's ``HYDRA_DBI``, libpq ``key=value`` text, URLs, redaction.

Pure text handling, used by the configuration. Error messages never quote the data source,
since it may hold a password.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

#: Set as ``application_name`` unless the URL names one, so Hydra's DBAs see who is connected.
APPLICATION_NAME = "hydra-otel"


class DsnError(ValueError):
    """A data source hydra-otel cannot use; the message says why and never quotes the text."""


_PASSWORD_PARAM = re.compile(r"(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:\\.|[^&;\s#\\])*)")
_DBI_PREFIX = re.compile(r"(?i:dbi):Pg:")
_DBI_TOKEN = re.compile(r"\\.|'(?:[^'\\]|\\.)*'?|;", re.DOTALL)
_CONNINFO_PAIR = re.compile(r"\s*([^\s=]+)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(?!')((?:[^\s\\]|\\.)*))", re.DOTALL)
_NETLOC_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")


def redacted_dsn(url: str) -> str:
    """Return ``url`` with every password replaced by ``***``, for logs and error messages.

    Args:
        url: a ``postgresql://`` URL or a ``key=value`` data source (``dbi:Pg:...``, libpq).

    Returns:
        The same text with the userinfo password and any ``password=``/``sslpassword=`` value masked.
    """
    scheme, sep, rest = url.partition("://")
    at = rest.split("?", 1)[0].rfind("@")
    user, colon, _ = rest[: max(at, 0)].partition(":")
    if sep and at >= 0 and colon:
        url = f"{scheme}://{user}:***{rest[at:]}"
    return _PASSWORD_PARAM.sub(r"\1***", url)


def dbi_to_url(dsn: str) -> str:
    """Convert legacy Hydra's ``HYDRA_DBI`` (a Perl DBI data source) to a ``postgresql://`` URL.

    Reads the text as DBD::Pg does (``;`` outside single quotes separates libpq ``key=value``
    pairs; ``db``/``database`` mean ``dbname``); keys other than user, password, host, port and
    dbname, and hosts that are socket directories or lists, become query parameters.

    Args:
        dsn: e.g. ``dbi:Pg:dbname=hydra;host=db;port=5432;user=hydra;password=...``.

    Returns:
        The equivalent URL, without ``application_name`` unless the data source set one.

    Raises:
        ValueError: the text is not a ``dbi:Pg:`` data source (the message never quotes it).
    """
    if not _DBI_PREFIX.match(dsn):
        raise DsnError("it does not start with dbi:Pg:")
    body = re.sub(r"\b(?:db|database)\s*=", "dbname=", dsn[len("dbi:Pg:") :], count=1)
    body = re.sub(r'dbname\s*=\s*"(.+?)"', r"dbname='\1'", body, count=1)
    body = _DBI_TOKEN.sub(lambda m: " " if m[0] == ";" else m[0], body)
    return _conninfo_to_url(_parse_conninfo(body))


def _parse_conninfo(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while text[pos:].strip():
        m = _CONNINFO_PAIR.match(text, pos)
        if m is None:
            raise DsnError(f"cannot parse it after {len(params)} key=value pair(s)")
        value = m[2] if m[2] is not None else m[3]
        params[m[1]] = re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL)
        pos = m.end()
    return params


def _conninfo_to_url(params: dict[str, str]) -> str:
    user, password = params.pop("user", ""), params.pop("password", "")
    host, port, dbname = params.pop("host", ""), params.pop("port", ""), params.pop("dbname", "")
    if port and not (port.isascii() and port.isdigit()):
        raise DsnError("port is not a number")
    netloc = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    netloc += "@" if netloc else ""
    if _NETLOC_HOST.fullmatch(host):
        netloc += (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    else:  # a socket directory, a host list, or none: libpq and asyncpg both take ?host=&port=
        params = {"host": host, "port": port} | params
    query = urlencode({k: v for k, v in params.items() if v}, safe="/", quote_via=quote)
    return (
        f"postgresql://{netloc}"
        + (f"/{quote(dbname, safe='')}" if dbname else "")
        + (f"?{query}" if query else "")
    )


def database_url(text: str) -> str:
    """``text`` as a ``postgresql://`` URL that names hydra-otel as its ``application_name``."""
    if urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise DsnError("the scheme must be postgresql:// or postgres://")
    base, hash_, fragment = text.partition("#")
    query = urlsplit(base).query
    if any(k == "application_name" for k, _ in parse_qsl(query, keep_blank_values=True)):
        return text
    sep = "&" if query else ("" if base.endswith("?") else "?")
    return f"{base}{sep}application_name={APPLICATION_NAME}{hash_}{fragment}"
