"""Which revision an evaluation built: ``vcs.*`` attributes from Hydra's inputs.

Theory of operation. Hydra records every input of an evaluation in
``jobsetevalinputs`` (name, alternative number, type, URI, revision). The
*main* input is the one holding the Nix expression: for a flake jobset the
locked flake reference in ``jobsetevals.flake`` (``nix flake metadata``'s
``url``, which pins the revision), otherwise the input named by
``jobsetevals.nixexprinput`` (alternative 0). Its revision becomes
``vcs.ref.head.revision`` and its URL ``vcs.repository.url.full``.

The registry asks for the repository's browsable HTTP(S) address, without
``.git`` and, like every ``url.full``, without credentials. URIs are therefore
cleaned (user information, query and fragment dropped); a URI that is not
HTTP(S) after that (``git@host:path``, a local path) gives no
``vcs.repository.url.full``; the input event still carries the cleaned URI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit, urlunsplit


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalInput:
    """One ``jobsetevalinputs`` row (the columns hydra-otel reads)."""

    name: str
    alt_nr: int
    type: str
    uri: str | None
    revision: str | None


@dataclass(frozen=True, slots=True)
class MainInput:
    """The ``vcs.*`` values of an evaluation, and where they came from."""

    source: str  # "flake" or the input's name
    revision: str | None
    url: str | None


_REV = re.compile(r"^[0-9a-fA-F]{7,64}$")
#: Flake reference schemes that name a repository on a known forge: scheme -> base URL.
_FORGES = {"github": "https://github.com", "gitlab": "https://gitlab.com", "sourcehut": "https://git.sr.ht"}


def clean_uri(uri: str) -> str:
    """``uri`` without user information (credentials); other forms are returned unchanged."""
    parts = urlsplit(uri)
    if not parts.scheme or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def repository_url(uri: str | None) -> str | None:
    """The browsable HTTP(S) address of repository ``uri``, or None if it has none."""
    if not uri:
        return None
    parts = urlsplit(clean_uri(uri.removeprefix("git+")))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    path = parts.path.rstrip("/").removesuffix(".git")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def flake_main_input(flake: str) -> MainInput:
    """Revision and repository URL of a locked flake reference (``github:o/r/<rev>``,
    ``git+https://host/r?ref=main&rev=<rev>``, ...); parts it does not show are None."""
    parts = urlsplit(flake)
    if parts.scheme in _FORGES:
        segments = parts.path.split("/")
        url = f"{_FORGES[parts.scheme]}/{'/'.join(segments[:2])}" if len(segments) >= 2 else None
        rev = segments[2] if len(segments) >= 3 and _REV.match(segments[2]) else None
        return MainInput("flake", rev or _query_rev(parts.query), url)
    return MainInput("flake", _query_rev(parts.query), repository_url(flake))


def _query_rev(query: str) -> str | None:
    revs = parse_qs(query).get("rev")
    return revs[0] if revs and _REV.match(revs[0]) else None


def main_input(
    flake: str | None, nixexpr_input: str | None, inputs: tuple[EvalInput, ...]
) -> MainInput | None:
    """The evaluation's main input (see the module docstring), or None when there is none."""
    if flake:
        return flake_main_input(flake)
    for i in inputs:
        if i.name == nixexpr_input and i.alt_nr == 0:
            return MainInput(i.name, i.revision or None, repository_url(i.uri))
    return None
