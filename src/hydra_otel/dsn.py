"""PostgreSQL data sources: legacy Hydra's ``HYDRA_DBI``, libpq ``key=value`` text, URLs, redaction.

Pure text handling, used by the configuration. Error messages never quote the data source,
since it may hold a password.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

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

    Works on malformed text too: a password with an unencoded ``?``, ``#``, ``/`` or ``@`` hides
    the userinfo from an RFC 3986 parser, so everything between the first ``:`` after ``://`` and
    the last ``@`` counts as the password (this over-redacts only URLs :func:`database_url` refuses).

    Args:
        url: a ``postgresql://`` URL or a ``key=value`` data source (``dbi:Pg:...``, libpq).

    Returns:
        The same text with the userinfo password and any ``password=``/``sslpassword=`` value masked.
    """
    span = _userinfo_password(url)
    if span is not None:
        url = f"{url[: span[0]]}***{url[span[1] :]}"
    return _PASSWORD_PARAM.sub(r"\1***", url)


def _userinfo_password(url: str) -> tuple[int, int] | None:
    """Where the userinfo password is in ``url`` (start, end), read conservatively; None if none."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    colon = rest.find(":", 0, max(at, 0))
    if not sep or at < 0 or colon < 0:
        return None
    start = len(scheme) + len(sep)
    return start + colon + 1, start + at


def has_userinfo(url: str) -> bool:
    """Whether ``url`` holds a ``user[:password]@`` part, also when a password hides it from urlsplit.

    An unencoded ``/`` or ``#`` in a password ends the authority early for a URL parser, ``?`` too;
    looking before the first ``/`` and before the first ``?`` finds the ``@`` either way.
    """
    rest = url.partition("://")[2]
    return "@" in rest.split("/", 1)[0] or "@" in rest.split("?", 1)[0]


def url_secrets(url: str) -> list[str]:
    """Every password in ``url`` as written and percent-decoded, for a log redactor.

    Read as conservatively as :func:`redacted_dsn`, so a malformed URL's password is found too.

    Args:
        url: a data source, in any of the forms :func:`redacted_dsn` takes.

    Returns:
        The distinct secrets, longest first.
    """
    found: list[str] = []
    span = _userinfo_password(url)
    if span is not None:
        found.append(url[span[0] : span[1]])
    for m in _PASSWORD_PARAM.finditer(url):
        value = m[2]
        found.append(value[1:-1] if len(value) > 1 and value[0] == value[-1] == "'" else value)
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


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
    """``text`` as a ``postgresql://`` URL that names hydra-otel as its ``application_name``.

    Refuses what parsers read differently (asyncpg splits the userinfo at the last ``@``, libpq at
    the first; both end the host part at the first ``/``, ``?`` or ``#``), since a password with an
    unencoded ``@``, ``/``, ``?`` or ``#`` would otherwise be sent as a host name, a database name
    or an option, and show up in error messages.

    Raises:
        DsnError: the text is not such a URL (the message never quotes it).
    """
    if urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise DsnError("the scheme must be postgresql:// or postgres://")
    _check_reserved(text.partition("://")[2])
    query = urlsplit(text).query
    if any(k == "application_name" for k, _ in parse_qsl(query, keep_blank_values=True)):
        return text
    sep = "&" if query else ("" if text.endswith("?") else "?")
    return f"{text}{sep}application_name={APPLICATION_NAME}"


_ENCODE = "percent-encode @ as %40, / as %2F, ? as %3F and # as %23 (in a password, say)"
_QUERY_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT = re.compile(r"(?:\[[^\]]*\]|[^:\[\]]*)(?::(\d*))?")


def _check_reserved(rest: str) -> None:
    """Refuse a URL (after ``://``) whose reserved characters say its password was not encoded."""
    if "#" in rest:
        raise DsnError(f"it has a '#' (a PostgreSQL URL has no fragment): {_ENCODE}")
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    if rest.count("@") > 1 or ("@" in rest and "@" not in authority):
        raise DsnError(f"it has an '@' that does not end the user name and password: {_ENCODE}")
    hosts = authority.rpartition("@")[2]
    if any(not _PORT.fullmatch(h) for h in hosts.split(",")):
        raise DsnError(f"a port is not a number: {_ENCODE}")
    path, _, query = rest[len(authority) :].partition("?")
    if path.count("/") > 1:
        raise DsnError(f"the database name has a '/': {_ENCODE}")
    keys = [k for k, _ in parse_qsl(query, keep_blank_values=True)]
    if any(not _QUERY_KEY.fullmatch(k) for k in keys):
        raise DsnError(f"a query parameter name is not a name: {_ENCODE}")
