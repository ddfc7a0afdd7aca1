"""A throwaway PostgreSQL cluster for the test suite, the benchmarks and ``hydra-otel demo``.

Theory of operation:

* ``PgCluster()`` makes a private directory (mode 0700) under the temp dir, runs ``initdb`` into
  ``<base>/data`` and starts the server with ``pg_ctl -w``. ``initdb`` creates ``data`` itself, so it
  gets the mode 0700 the server insists on, whatever the umask.
* The server listens on no TCP address at all, only on a unix socket in ``<base>/sock``: nothing
  outside the machine can reach it, and authentication can be ``trust``. The port number only names
  the socket file; it is still taken from the free TCP ports so that two clusters never share one,
  even if a caller turns TCP on through ``settings`` to debug.
* As root, ``initdb`` refuses to run and the server must not run as root, so every server-side
  command runs as the ``postgres`` OS user, which owns ``<base>``. Clients (``psql``, the tests, the
  daemon) keep running as root and connect through the socket as the role ``postgres``.
* ``pg_ctl`` starts the postmaster in its own session, so it outlives the test process unless it is
  stopped. ``stop()`` therefore escalates: ``pg_ctl stop -m fast``, then ``-m immediate``, then
  SIGKILL to the postmaster's process group; on Linux it also looks in ``/proc`` for any postmaster
  still serving the data directory. It runs on every exit path: ``with``, a failed start, and
  ``atexit`` as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self
from urllib.parse import quote

from hydra_otel.demo.sandbox.schema import CURRENT_SCHEMA_VERSION, schema_sql
from hydra_otel.errors import HydraOtelError

#: Printed when no PostgreSQL installation is found.
INSTALL_HINT: Final = (
    "PostgreSQL's server programs (initdb, pg_ctl) were not found on PATH, in /usr/lib/postgresql/*/bin, "
    "/run/current-system/sw/bin or ~/.nix-profile/bin. Install PostgreSQL:\n"
    "  Debian/Ubuntu: apt-get install postgresql\n"
    "  NixOS/Nix:     nix-shell -p postgresql   (or add pkgs.postgresql to the environment)\n"
    "  macOS:         brew install postgresql   (and put its bin directory on PATH)\n"
    "or put the directory holding initdb and pg_ctl on PATH."
)

#: The superuser role ``initdb`` creates, and the OS user the server runs as when we are root.
SUPERUSER: Final = "postgres"

#: How ``stop_server`` asks the server to stop (``pg_ctl stop -m``).
ShutdownMode = Literal["smart", "fast", "immediate"]

#: Settings for a cluster that only has to be fast; ``PgCluster(settings=...)`` overrides them.
DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "max_connections": "100",
    "shared_buffers": "16MB",
    # Durability is worthless for a throwaway cluster; without it DDL, CREATE DATABASE and commits
    # cost no disk flushes.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}

_INITDB_TIMEOUT: Final = 120.0
_STOP_TIMEOUT: Final = 30  # pg_ctl -t, whole seconds
_PSQL_TIMEOUT: Final = 120.0
_EXIT_TIMEOUT: Final = 10.0
# An exited postmaster was the child of pg_ctl, so it is reaped by init. Some inits (container
# PID 1s) reap lazily; waiting a little keeps `pgrep postgres` clean after a test run.
_REAP_GRACE: Final = 3.0
_POLL: Final = 0.02
# sun_path is 108 bytes on Linux and 104 on macOS, NUL included.
_MAX_SOCKET_PATH: Final = 103
_SETTING_NAME: Final = re.compile(r"[a-z_][a-z0-9_.]*")


class SandboxError(HydraOtelError):
    """The sandbox cluster could not be set up or a command against it failed."""


class PostgresNotFoundError(SandboxError):
    """No PostgreSQL server installation was found; the message says how to install one."""


class PsqlError(SandboxError):
    """``psql`` reported an error; ``stderr`` holds its messages."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True, slots=True, kw_only=True)
class _Account:
    """The OS user server-side commands run as, when we are root."""

    uid: int
    gid: int


def find_pg_bindir(*, search_path: str | None = None, fallback_dirs: Sequence[Path] | None = None) -> Path:
    """Find the directory holding PostgreSQL's ``initdb`` and ``pg_ctl``.

    Looks on ``PATH`` first, then in ``/usr/lib/postgresql/*/bin`` (highest version first, Debian),
    ``/run/current-system/sw/bin`` (NixOS) and ``~/.nix-profile/bin`` (Nix).

    Args:
        search_path: a ``PATH``-style string to search instead of the environment's ``PATH``.
        fallback_dirs: directories to try after ``search_path`` instead of the standard ones.

    Returns:
        The directory, with symlinks resolved, so that ``postgres`` and ``psql`` are found next to
        the programs.

    Raises:
        PostgresNotFoundError: if no directory has both programs.
    """
    path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
    pg_ctl = shutil.which("pg_ctl", path=path)
    candidates: list[Path] = []
    if pg_ctl is not None and shutil.which("initdb", path=path) is not None:
        # Resolve symlinks (Debian's /usr/local/bin links, Nix profiles): pg_ctl itself looks for
        # `postgres` next to its real location, and psql should come from the same installation.
        candidates += [Path(pg_ctl).resolve().parent, Path(pg_ctl).parent]
    candidates += _standard_bindirs() if fallback_dirs is None else fallback_dirs
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return bindir.resolve()
    raise PostgresNotFoundError(INSTALL_HINT)


def _standard_bindirs() -> list[Path]:
    """Return the well-known install locations, Debian's newest major version first."""

    def version(bindir: Path) -> tuple[int, ...]:
        parts = bindir.parent.name.split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (-1,)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    return [*debian, Path("/run/current-system/sw/bin"), Path(os.path.expanduser("~/.nix-profile/bin"))]


class PgCluster:
    """A private PostgreSQL server on a unix socket, deleted with its data by ``stop()``.

    Creating the object runs ``initdb`` and starts the server; use it as a context manager (or call
    ``stop()``) so that no server outlives it. Not thread-safe.

    Args:
        bindir: where PostgreSQL's programs are; found with ``find_pg_bindir()`` if omitted.
        base_dir: where to create the cluster's private directory; the system temp dir if omitted.
            As root it must be searchable by the ``postgres`` OS user.
        settings: server settings (``postgresql.conf`` names) added to, or overriding,
            ``DEFAULT_SETTINGS`` and the socket settings.
        start_timeout: seconds ``pg_ctl`` waits for the server to accept connections.

    Raises:
        PostgresNotFoundError: if PostgreSQL is not installed.
        SandboxError: if the cluster cannot be created or started; nothing is left behind then.
    """

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        base_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.bindir: Final = bindir if bindir is not None else find_pg_bindir()
        self._account = _server_account()
        parent = Path(base_dir if base_dir is not None else tempfile.gettempdir()).resolve()
        if self._account is not None:
            _check_searchable(parent, self._account)
        self._start_timeout = start_timeout
        self._templates: set[int] = set()
        self._postmaster_pid: int | None = None
        self._stopped = False
        self.port: Final = _free_port()
        # No PG* variable of the caller's may redirect our commands to another server.
        self._env: Final = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # Untranslated messages in the errors we pass on.
        self._env["LC_ALL"] = "C"
        # From here on, stop() owns the cleanup: nothing that can fail comes between these two.
        self._base: Final = Path(tempfile.mkdtemp(prefix="hydra-otel-pg-", dir=parent))
        atexit.register(self.stop)
        self.data_dir: Final = self._base / "data"
        self.socket_dir: Final = self._base / "sock"
        self.log_file: Final = self._base / "server.log"
        try:
            self._setup(settings or {})
            self.start_server()
        except BaseException:
            self.stop()
            raise

    @property
    def host(self) -> str:
        """The unix socket directory, which libpq and asyncpg take as ``host``."""
        return str(self.socket_dir)

    @property
    def postmaster_pid(self) -> int | None:
        """The server's process ID while it runs (per ``start_server``), else None."""
        return self._postmaster_pid

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a ``postgresql://`` URL for ``dbname`` as the superuser, through the socket.

        Args:
            dbname: the database to connect to.

        Returns:
            A URL such as ``postgresql://postgres@/hydra?host=/tmp/hydra-otel-pg-x/sock&port=40123``,
            understood by libpq, psql and asyncpg.
        """
        return f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}?host={quote(self.host)}&port={self.port}"

    def psql(self, dbname: str, sql: str, *, single_transaction: bool = False) -> str:
        """Run SQL through ``psql`` and return what it prints, unaligned and without headers.

        Args:
            dbname: the database to run it in.
            sql: one or more statements; execution stops at the first error.
            single_transaction: run all statements in one transaction (``psql -1``).

        Returns:
            psql's standard output: one line per row, columns separated by ``|``.

        Raises:
            PsqlError: if a statement failed or psql could not connect.
        """
        psql = self.bindir / "psql"
        if not os.access(psql, os.X_OK):
            found = shutil.which("psql")
            if found is None:
                raise SandboxError(f"psql is neither in {self.bindir} nor on PATH")
            psql = Path(found)
        command = [str(psql), "--no-psqlrc", "--quiet", "--no-align", "--tuples-only"]
        command += ["--set", "ON_ERROR_STOP=1", "--host", self.host, "--port", str(self.port)]
        command += ["--username", SUPERUSER, "--dbname", dbname]
        if single_transaction:
            command.append("--single-transaction")
        proc = self._run(command, as_server=False, timeout=_PSQL_TIMEOUT, stdin_text=sql)
        if proc.returncode != 0:
            raise PsqlError(
                f"psql on {dbname!r} failed (exit {proc.returncode}): {proc.stderr.strip()}", proc.stderr
            )
        return proc.stdout

    def createdb(self, name: str, schema_version: int | None = CURRENT_SCHEMA_VERSION) -> str:
        """Create a database, with the Hydra schema subset at ``schema_version`` loaded.

        The schema is loaded once per version into a template database and copied from there, which
        is much faster than running the script for every test.

        Args:
            name: the new database's name.
            schema_version: Hydra schema version (85 or 87), or None for an empty database.

        Returns:
            The new database's DSN (see ``dsn``).

        Raises:
            ValueError: if there is no schema for ``schema_version``.
            PsqlError: if the database exists already or cannot be created.
        """
        statement = f"CREATE DATABASE {_ident(name)}"
        if schema_version is not None:
            statement += f" TEMPLATE {_ident(self._template(schema_version))}"
        self.psql("postgres", statement)
        return self.dsn(name)

    def dropdb(self, name: str) -> None:
        """Drop a database if it exists, disconnecting its sessions first.

        Args:
            name: the database's name.

        Raises:
            PsqlError: if the database cannot be dropped.
        """
        self.psql("postgres", f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    def start_server(self) -> None:
        """Start the server and wait until it accepts connections; a no-op if it runs.

        Raises:
            SandboxError: if the server did not start (the message quotes its log); a server that
                started half-way is killed first.
        """
        if self._stopped:
            raise SandboxError("this cluster has been stopped and deleted")
        if self._postmaster_pid is not None and _alive(self._postmaster_pid):
            return
        wait = str(max(1, round(self._start_timeout)))
        try:
            self._pg_ctl(
                "start", "-w", "-t", wait, "-l", str(self.log_file), timeout=self._start_timeout + 30
            )
            self._postmaster_pid = self._read_pid_file()
        except BaseException:
            self._kill_server()
            raise

    def stop_server(self, mode: ShutdownMode = "fast") -> None:
        """Stop the server but keep its data, e.g. to simulate a database outage; a no-op if stopped.

        Args:
            mode: ``pg_ctl stop -m`` mode. ``immediate`` makes the server exit without a clean
                shutdown, as a crash would.
        """
        try:
            self._pg_ctl("stop", "-m", mode, "-w", "-t", str(_STOP_TIMEOUT), timeout=_STOP_TIMEOUT + 30)
        except SandboxError:
            # Either it was not running, or a stuck backend outlasted the timeout: make sure.
            self._kill_server()
        pid, self._postmaster_pid = self._postmaster_pid, None
        if pid is not None and not _wait_exited(pid, _EXIT_TIMEOUT):
            self._kill_server()

    def restart(self) -> None:
        """Stop the server (fast mode) and start it again; clients see their connections dropped.

        Raises:
            SandboxError: if the server does not start again.
        """
        self.stop_server("fast")
        self.start_server()

    def stop(self) -> None:
        """Stop the server, make sure none of its processes is left, and delete the cluster's files.

        Safe to call more than once, and on a cluster whose start failed.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        pid = self._postmaster_pid
        try:
            self.stop_server("fast")
        finally:
            try:
                self._kill_server()
            finally:
                shutil.rmtree(self._base, ignore_errors=True)
        if pid is not None:
            _wait_reaped(pid, _REAP_GRACE)

    def __enter__(self) -> Self:
        """Return the (already running) cluster."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the cluster and delete its files."""
        self.stop()

    def __repr__(self) -> str:
        """Show where the cluster lives."""
        return f"<PgCluster host={self.host!r} port={self.port} pid={self._postmaster_pid}>"

    # -- internals -------------------------------------------------------------------------------

    def _setup(self, settings: Mapping[str, str]) -> None:
        """Create the socket directory and the data directory, and write the server settings."""
        self.socket_dir.mkdir(mode=0o700)
        socket_file = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_file)) > _MAX_SOCKET_PATH:
            raise SandboxError(
                f"socket path {socket_file} is too long for a unix socket; use a shorter base_dir"
            )
        if self._account is not None:
            for path in (self._base, self.socket_dir):
                os.chown(path, self._account.uid, self._account.gid)
        initdb = [str(self.bindir / "initdb"), "--pgdata", str(self.data_dir), "--username", SUPERUSER]
        initdb += ["--auth", "trust", "--encoding", "UTF8", "--no-locale", "--no-sync"]
        proc = self._run(initdb, as_server=True, timeout=_INITDB_TIMEOUT)
        if proc.returncode != 0:
            raise SandboxError(f"initdb failed (exit {proc.returncode}): {proc.stderr.strip()}")
        merged = {
            "listen_addresses": "",
            "unix_socket_directories": self.host,
            "port": str(self.port),
            **DEFAULT_SETTINGS,
            **settings,
        }
        lines = ["", "# Added by hydra-otel's sandbox (hydra_otel.demo.sandbox.pgcluster)."]
        for name, value in merged.items():
            if not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"not a PostgreSQL setting name: {name!r}")
            lines.append(f"{name} = {_conf_quote(value)}")
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n".join(lines) + "\n")

    def _template(self, version: int) -> str:
        """Return the name of a template database holding schema ``version``, creating it once."""
        name = f"hydra_otel_schema_{version}"
        if version in self._templates:
            return name
        sql = schema_sql(version)
        self.psql("postgres", f"CREATE DATABASE {_ident(name)}")
        try:
            self.psql(name, sql, single_transaction=True)
            # No connections allowed: CREATE DATABASE ... TEMPLATE fails while anyone is connected.
            self.psql(
                "postgres", f"ALTER DATABASE {_ident(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
            )
        except BaseException:
            with contextlib.suppress(SandboxError):
                self.psql("postgres", f"DROP DATABASE IF EXISTS {_ident(name)}")
            raise
        self._templates.add(version)
        return name

    def _pg_ctl(self, action: str, *args: str, timeout: float) -> None:
        """Run ``pg_ctl <action>`` on this cluster as the server's user."""
        command = [str(self.bindir / "pg_ctl"), action, "--pgdata", str(self.data_dir), "--silent", *args]
        proc = self._run(command, as_server=True, timeout=timeout)
        if proc.returncode != 0:
            message = f"pg_ctl {action} failed (exit {proc.returncode}): {proc.stderr.strip()}"
            if action == "start":
                message += "\n--- server log ---\n" + _tail(self.log_file)
            raise SandboxError(message)

    def _run(
        self, command: list[str], *, as_server: bool, timeout: float, stdin_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the cluster directory, as the server's user if ``as_server``."""
        account = self._account if as_server else None
        try:
            return subprocess.run(
                command,
                input=stdin_text,
                stdin=subprocess.DEVNULL if stdin_text is None else None,
                capture_output=True,
                text=True,
                env=self._env,
                # The server's user may not be allowed into our working directory.
                cwd=self._base,
                timeout=timeout,
                check=False,
                user=None if account is None else account.uid,
                group=None if account is None else account.gid,
                extra_groups=None if account is None else [],
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{Path(command[0]).name} did not finish within {timeout:g}s") from exc

    def _read_pid_file(self) -> int | None:
        """Return the PID in ``postmaster.pid``, or None if there is no readable one."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _kill_server(self) -> None:
        """SIGKILL every postmaster serving this data directory, with its backends, and wait."""
        pids = set(_find_postmasters(self.data_dir))
        for pid in (self._postmaster_pid, self._read_pid_file()):
            # Outside /proc we cannot check a PID file is not stale; a live PID is all we have.
            if pid is not None and not _HAS_PROC and _alive(pid):
                pids.add(pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                # pg_ctl starts the postmaster as a session leader: its group is its backends.
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        for pid in pids:
            if not _wait_exited(pid, _EXIT_TIMEOUT):
                raise SandboxError(f"postgres process {pid} survived SIGKILL")


_HAS_PROC: Final = Path("/proc/self/cmdline").exists()


def _server_account() -> _Account | None:
    """Return the ``postgres`` OS user to run the server as if we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise SandboxError(
            "running as root, but there is no 'postgres' OS user to run the server as (initdb refuses "
            "root); create one (e.g. `useradd --system postgres`) or run as an unprivileged user"
        ) from None
    return _Account(uid=entry.pw_uid, gid=entry.pw_gid)


def _check_searchable(directory: Path, account: _Account) -> None:
    """Raise SandboxError unless ``account`` can reach ``directory`` (it has no extra groups)."""
    for path in (directory, *directory.parents):
        st = path.stat()
        if st.st_uid == account.uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == account.gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            raise SandboxError(
                f"the postgres OS user cannot enter {path}, so it cannot use a cluster under {directory}; "
                "pass base_dir (e.g. /tmp) or set TMPDIR"
            )


def _free_port() -> int:
    """Return a TCP port number that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _ident(name: str) -> str:
    """Quote ``name`` as an SQL identifier."""
    if "\0" in name:
        raise ValueError("an identifier cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def _conf_quote(value: str) -> str:
    """Quote ``value`` for postgresql.conf, where any setting may be written as a string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log file, or a note that it cannot be read."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _find_postmasters(data_dir: Path) -> list[int]:
    """Return the PIDs of running postmasters of ``data_dir`` (Linux only; empty elsewhere).

    The postmaster keeps the command line pg_ctl gave it, ``postgres -D <data_dir>``; backends
    rename themselves, but they exit on their own once the postmaster is gone. The data directory
    name is random, so no other server matches, and requiring the program name spares, say, a
    ``less`` someone runs on a file in it.
    """
    if not _HAS_PROC:
        return []
    needle = os.fsencode(data_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = os.path.basename(argv[0])
        # Substrings: Nix may wrap the binary (e.g. ".postgres-wrapped").
        if (b"postgres" in program or b"postmaster" in program) and needle in argv:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """Tell whether ``pid`` runs; an exited but unreaped process (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Tell whether ``pid`` has exited and waits to be reaped (Linux only; False elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may contain anything.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "Z"


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` no longer runs; return False if it still does after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _wait_reaped(pid: int, timeout: float) -> None:
    """Wait a little for an exited process to disappear from the process table, then give up."""
    deadline = time.monotonic() + timeout
    while _is_zombie(pid) and time.monotonic() < deadline:
        time.sleep(_POLL)
