"""core/vcs.py: the main input of an evaluation and its repository address."""

from __future__ import annotations

import pytest

from hydra_otel.core.vcs import EvalInput, MainInput, clean_uri, flake_main_input, main_input, repository_url

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("uri", "url"),
    [
        ("https://github.com/NixOS/nixpkgs.git", "https://github.com/NixOS/nixpkgs"),
        ("https://user:secret@git.example.org/r.git/", "https://git.example.org/r"),
        ("git+https://git.example.org/r?ref=main&rev=" + REV, "https://git.example.org/r"),
        ("http://host:8080/r", "http://host:8080/r"),
        ("git@github.com:NixOS/nixpkgs.git", None),
        ("ssh://git@host/r", None),
        ("/srv/repos/r", None),
        ("", None),
        (None, None),
    ],
)
def test_repository_url(uri: str | None, url: str | None) -> None:
    """Only HTTP(S) addresses, without credentials, query or .git."""
    assert repository_url(uri) == url


def test_clean_uri_drops_only_user_information() -> None:
    assert clean_uri("https://u:p@host/r?x=1") == "https://host/r?x=1"
    assert clean_uri("git@github.com:o/r") == "git@github.com:o/r"


@pytest.mark.parametrize(
    ("flake", "rev", "url"),
    [
        (f"github:NixOS/nixpkgs/{REV}", REV, "https://github.com/NixOS/nixpkgs"),
        (f"gitlab:o/r/{REV}", REV, "https://gitlab.com/o/r"),
        (f"sourcehut:~u/r/{REV}", REV, "https://git.sr.ht/~u/r"),
        (f"github:NixOS/nixpkgs/{REV}?narHash=sha256-x", REV, "https://github.com/NixOS/nixpkgs"),
        (f"git+https://git.example.org/r?ref=main&rev={REV}", REV, "https://git.example.org/r"),
        ("github:NixOS/nixpkgs/nixos-unstable", None, "https://github.com/NixOS/nixpkgs"),
        ("path:/nix/store/abc-source?narHash=sha256-x", None, None),
    ],
)
def test_flake_main_input(flake: str, rev: str | None, url: str | None) -> None:
    """Locked flake references give their revision and forge address; a branch name is no revision."""
    assert flake_main_input(flake) == MainInput("flake", rev, url)


def test_main_input_is_the_nixexpr_input_alternative_zero() -> None:
    inputs = (
        EvalInput(name="src", alt_nr=1, type="git", uri="https://h/other", revision="1" * 40),
        EvalInput(name="src", alt_nr=0, type="git", uri="https://h/r", revision=REV),
        EvalInput(name="lib", alt_nr=0, type="git", uri="https://h/lib", revision="2" * 40),
    )
    assert main_input(None, "src", inputs) == MainInput("src", REV, "https://h/r")
    assert main_input(None, "missing", inputs) is None
    assert main_input(None, None, inputs) is None
    assert main_input(f"github:o/r/{REV}", "src", inputs) == MainInput("flake", REV, "https://github.com/o/r")
