"""Cheap checks of the deployment files: ``deploy/hydra-otel.service`` and ``nix/module.nix``.

Neither systemd nor Nix is needed. The unit file is read by a small parser of systemd's INI
dialect (sections, ``Key=value`` lines, repeated keys kept in order, ``#``/``;`` comments), and
the checks pin what the daemon relies on: the state directory, restarts after exit code 3, a stop
timeout longer than the shutdown grace, and the hardening. The Nix module is scanned by a small
lexer that knows comments, both string kinds and ``${...}`` interpolation, so that brackets and
quotes can be checked for balance; it does not evaluate anything (there is no ``nix-instantiate``
here). Both files must also agree with each other, with docs/operations.md and with the tables
the daemon reads.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from hydra_otel.config import load
from hydra_otel.tools import HYDRA_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "hydra-otel.service"
NIX = ROOT / "nix" / "module.nix"
OPERATIONS = ROOT / "docs" / "operations.md"

Unit = dict[str, list[tuple[str, str]]]

#: Hardening directives and their values, as the unit file must set them (and the Nix module too).
HARDENING: dict[str, str] = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}

_SECTION = re.compile(r"\[([A-Za-z][A-Za-z0-9-]*)\]\Z")
_ASSIGNMENT = re.compile(r"([A-Za-z][A-Za-z0-9]*)=(.*)\Z")
_TIME_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def parse_unit(text: str) -> Unit:
    """Read a systemd unit file into its sections' ``(key, value)`` lines, in file order.

    Raises:
        ValueError: on a line that is neither a comment, a section header nor an assignment, on
            an assignment before the first section, on a repeated section, or on a line
            continuation (the file has none, so one would be a mistake).
    """
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            raise ValueError(f"line {number}: line continuations are not used in this file")
        if header := _SECTION.match(line):
            if header[1] in unit:
                raise ValueError(f"line {number}: section [{header[1]}] repeated")
            section = unit[header[1]] = []
        elif (assignment := _ASSIGNMENT.match(line)) and section is not None:
            section.append((assignment[1], assignment[2].strip()))
        else:
            raise ValueError(f"line {number}: not a section header or Key=value: {raw!r}")
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value ``key`` is given in ``section``, in order."""
    return [value for name, value in unit.get(section, []) if name == key]


def single(unit: Unit, section: str, key: str) -> str:
    """The one value of ``key`` in ``section``; fails the test if it is missing or repeated."""
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= is set {len(found)} times, expected once"
    return found[0]


def timespan_seconds(text: str) -> float:
    """A systemd time span (``30``, ``45s``, ``1min 30s``, ``500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts, f"not a time span: {text!r}"
    assert "".join(number + unit for number, unit in parts) == re.sub(r"\s+", "", text), text
    return sum(float(number) * _TIME_UNITS[unit or "s"] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def nix() -> str:
    return NIX.read_text(encoding="utf-8")


class _CaseSensitiveParser(configparser.ConfigParser):
    """configparser lower-cases keys by default; systemd's are case-sensitive."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def test_unit_file_reads_as_ini() -> None:
    """configparser, set up for systemd's dialect, reads the file and finds the same sections."""
    parser = _CaseSensitiveParser(
        strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser.get("Service", "StateDirectory") == "hydra-otel"


def test_unit_sections(unit: Unit) -> None:
    assert list(unit) == ["Unit", "Service", "Install"]
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_unit_runs_the_daemon(unit: Unit) -> None:
    """ExecStart runs ``hydra-otel run`` as a fixed, unprivileged system user."""
    argv = shlex.split(single(unit, "Service", "ExecStart"))
    assert Path(argv[0]).is_absolute()
    assert Path(argv[0]).name == "hydra-otel"
    assert argv[1] == "run"
    assert single(unit, "Service", "Type") in {"exec", "simple"}
    assert single(unit, "Service", "User") == "hydra-otel"
    assert values(unit, "Service", "DynamicUser") in ([], ["no"])


def test_unit_runs_the_script_the_documented_install_makes(unit: Unit) -> None:
    """docs/deployment.md's virtualenv is where ExecStart looks (no documented install made /usr/bin's)."""
    script = shlex.split(single(unit, "Service", "ExecStart"))[0]
    install = (ROOT / "docs" / "deployment.md").read_text().split("## Installing", 1)[1].split("\n## ", 1)[0]
    venv = Path(script).parent.parent
    assert f"python3 -m venv {venv}\n" in install
    assert f"{script} --version" in install
    assert values(unit, "Service", "SyslogLevelPrefix") in ([], ["yes"])  # reads the <N> prefixes


def test_unit_state_and_environment(unit: Unit) -> None:
    """The daemon finds its state through $STATE_DIRECTORY; secrets come from an optional file."""
    assert single(unit, "Service", "StateDirectory") == "hydra-otel"
    assert single(unit, "Service", "EnvironmentFile") == "-/etc/hydra-otel/env"
    # ProtectSystem=strict leaves StateDirectory= writable; nothing else should be.
    assert values(unit, "Service", "ReadWritePaths") == []


def test_unit_restarts(unit: Unit) -> None:
    """Exit code 3 (lost the instance lock) relies on the service manager restarting the daemon."""
    assert single(unit, "Service", "Restart") == "always"
    assert timespan_seconds(single(unit, "Service", "RestartSec")) == 2
    assert "3" not in single(unit, "Service", "RestartPreventExitStatus").split()
    assert single(unit, "Service", "KillSignal") == "SIGTERM"
    assert values(unit, "Service", "ExecReload") == [], "SIGHUP stops the daemon: no reload"


def test_unit_stop_timeout_exceeds_shutdown_grace(unit: Unit) -> None:
    """systemd must not SIGKILL the daemon while it is still draining within --shutdown-grace."""
    grace = load({}, {}).shutdown_grace
    assert grace == 10
    assert timespan_seconds(single(unit, "Service", "TimeoutStopSec")) > grace


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_unit_hardening(unit: Unit, key: str, expected: str) -> None:
    assert single(unit, "Service", key) == expected


def test_unit_address_families(unit: Unit) -> None:
    families = [
        word for value in values(unit, "Service", "RestrictAddressFamilies") for word in value.split()
    ]
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_timespan_parser() -> None:
    assert timespan_seconds("30") == 30
    assert timespan_seconds("1min 30s") == 90
    assert timespan_seconds("500ms") == 0.5


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Key=value\n", "not a section header"),
        ("[Unit]\nno equals sign\n", "not a section header"),
        ("[Unit]\n[Unit]\n", "repeated"),
        ("[Service]\nExecStart=/bin/true \\\n  --flag\n", "continuations"),
    ],
)
def test_unit_parser_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_unit(text)


# ---- the NixOS module -------------------------------------------------------------------------

_CLOSERS = {")": "(", "]": "[", "}": "{"}


def nix_code(text: str) -> str:
    """The code of a Nix file with comments removed and every string replaced by ``""``.

    Interpolations (``${ ... }``) inside strings are kept, as code. Handles ``# ...`` and
    ``/* ... */`` comments, ``"..."`` strings with backslash escapes, and ``''...''`` strings with
    their ``'''``, ``''$`` and ``''\\`` escapes; ``$${`` is literal text in both string kinds.

    Raises:
        ValueError: on an unterminated string, comment or interpolation, or on a bracket that
            closes another kind of bracket or closes nothing.
    """
    out: list[str] = []
    # Each frame is the kind of context: "{", "(", "[" (code brackets), "${" (interpolation,
    # code), '"' or "''" (strings).
    stack: list[str] = []
    i, n = 0, len(text)

    def in_string() -> str | None:
        return stack[-1] if stack and stack[-1] in ('"', "''") else None

    while i < n:
        kind = in_string()
        if kind is not None:
            if text.startswith("$${", i):
                i += 3
            elif text.startswith("${", i):
                stack.append("${")
                out.append("${")
                i += 2
            elif kind == '"' and text[i] == "\\":
                i += 2
            elif kind == '"' and text[i] == '"':
                stack.pop()
                out.append('""')
                i += 1
            elif kind == "''" and text.startswith("''", i):
                if text.startswith(("'''", "''$", "''\\"), i):
                    i += 3 + (text[i + 2] == "\\")
                else:
                    stack.pop()
                    out.append("''''")
                    i += 2
            else:
                i += 1
            continue
        char = text[i]
        if char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError("unterminated /* comment")
            i = end + 2
        elif char == '"' or text.startswith("''", i):
            stack.append('"' if char == '"' else "''")
            i += 1 if char == '"' else 2
        elif char in "([{":
            stack.append(char)
            out.append(char)
            i += 1
        elif char in ")]}":
            opener = "${" if char == "}" and stack and stack[-1] == "${" else _CLOSERS[char]
            if not stack or stack[-1] != opener:
                line = text.count("\n", 0, i) + 1
                raise ValueError(f"line {line}: {char!r} closes {stack[-1] if stack else 'nothing'}")
            stack.pop()
            out.append(char)
            i += 1
        else:
            out.append(char)
            i += 1
    if stack:
        raise ValueError(f"unterminated {stack[-1]!r} at the end of the file")
    return "".join(out)


def test_nix_brackets_and_quotes_balance(nix: str) -> None:
    code = nix_code(nix)
    assert code.count("{") == code.count("}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{ a = "b; }', "unterminated"),
        ("{ a = ''b; }", "unterminated"),
        ("{ a = [ 1 2 ); }", "closes"),
        ("{ a = 1; }}", "closes nothing"),
        ('{ a = "${b"; }', "unterminated|closes"),
        ("/* open", "unterminated"),
    ],
)
def test_nix_lexer_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        nix_code(text)


def test_nix_lexer_strings() -> None:
    """Brackets and quotes inside strings and comments do not count; interpolations do."""
    assert nix_code('{ a = "} ) \\" ]"; } # ( [ {') == '{ a = ""; } '
    # ''$, ''' and ''\n are escapes inside an indented string; a lone '' would end it.
    assert nix_code("x = ''a ''$ ''' ''\\n } ( b''; ") == "x = ''''; "
    assert nix_code("x = ''a '' b ''c''; ") == "x = '''' b ''''; "
    assert nix_code('x = "$${not} ${f { y = 1; }}";') == 'x = ${f { y = 1; }}"";'


def test_nix_defines_the_module(nix: str) -> None:
    code = nix_code(nix)
    assert "options.services.hydra-otel" in code
    assert "config.services.hydra-otel" in code
    for option in (
        "enable",
        "package",
        "user",
        "databaseUrl",
        "otlpEndpoint",
        "otlpProtocol",
        "hydraUrl",
        "instance",
        "metricsAddress",
        "environmentFile",
        "settings",
        "extraArgs",
        "configurePostgresql",
        "supplementaryGroups",
    ):
        assert re.search(rf"\n    {option} =\s+lib\.mk(Option|EnableOption|PackageOption)\b", code), option
    assert "systemd.services.hydra-otel" in code
    assert "systemd.services.hydra-otel-db-setup" in code


def test_nix_package_defaults_to_the_overlay_or_this_checkout(nix: str) -> None:
    """nixpkgs has no hydra-otel: the default is the flake overlay's package, else ../package.nix."""
    assert 'lib.mkPackageOption pkgs "hydra-otel" { }' in nix
    assert "default = pkgs.hydra-otel or (pkgs.callPackage ../package.nix { });" in nix


def test_nix_service_can_read_hydras_build_logs(nix: str) -> None:
    """nixpkgs: /var/lib/hydra is 0750 hydra:hydra, build-logs 0750 hydra-queue-runner:hydra."""
    assert "SupplementaryGroups = cfg.supplementaryGroups;" in nix
    assert 'default = lib.optional hydraLocal "hydra";' in nix
    assert "path = [ pkgs.zstd ];" in nix  # .zst logs; steplogs finds zstd on PATH
    assert 'default = if hydraLocal then "${hydraBaseDir}/build-logs" else null;' in nix


def test_nix_service_matches_the_unit(nix: str, unit: Unit) -> None:
    """The NixOS service sets the unit file's directives, hardening included, to the same values."""
    code = nix_code(nix)
    assert 'StateDirectory = "hydra-otel"' in nix
    assert 'Restart = "always"' in nix
    assert 'KillSignal = "SIGTERM"' in nix
    assert '"run"' in nix
    as_nix = {"yes": "true", "": '""'}
    for key, value in HARDENING.items():
        expected = as_nix.get(value, f'"{value}"')
        if key == "SystemCallFilter":
            expected = f'[ "{value}" ]'
        assert f"{key} = {expected};" in nix, key
    for key in ("RestartSec", "TimeoutStopSec"):
        found = re.search(rf"\b{key} = (\d+);", code)
        assert found, key
        assert float(found[1]) == timespan_seconds(single(unit, "Service", key))


def test_granted_tables_are_the_tables_the_daemon_reads(nix: str) -> None:
    """The module's GRANT and docs/operations.md's name exactly the tables hydra-otel reads."""
    pattern = re.compile(r"GRANT SELECT ON ([a-z_,\s]+?)\s+TO ")
    for text in (nix, OPERATIONS.read_text(encoding="utf-8")):
        found = pattern.search(text)
        assert found
        assert {table.strip() for table in found[1].split(",")} == set(HYDRA_COLUMNS)


def test_nix_role_setup_is_idempotent_sql(nix: str) -> None:
    assert "IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '${dbRole}')" in nix
    assert "ON_ERROR_STOP=1" in nix
    assert re.search(r'dbRole = "hydra_otel";', nix)
    # Peer authentication: the system user maps to the role, and the pg_hba line goes first.
    assert "services.postgresql.authentication = lib.mkBefore" in nix
    assert "local ${dbName} ${dbRole} peer map=${identMapName}" in nix
    assert "${identMapName} ${cfg.user} ${dbRole}" in nix


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing (ExecStart pointed at a stand-in for the script,
    which this machine has not installed: verify checks that the program exists)."""
    script = tmp_path / "opt" / "hydra-otel" / "venv" / "bin" / "hydra-otel"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    text = UNIT.read_text().replace("ExecStart=/opt/hydra-otel/venv/bin/hydra-otel", f"ExecStart={script}")
    assert str(script) in text
    copy = tmp_path / "hydra-otel.service"
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
