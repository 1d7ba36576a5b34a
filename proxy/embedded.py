"""Throw-away PostgreSQL clusters started from the machine's own server binaries.

This module owns the life of the local clusters that the demo, the tests and the benchmarks
run against: finding the binaries, ``initdb``, the ``pg_hba.conf`` that offers trust, md5 and
SCRAM side by side, picking a port, ``pg_ctl start``/``stop``, and running SQL through
``psql``. initdb and postgres refuse to run as root, so when we are root every server command
runs as an unprivileged user (``postgres`` where it exists, else one we create); when we are
not root they simply run as us. It uses the standard library only, is never imported by the
proxy's hot path, never touches a data directory it was not given, and reports every failure
as one ``EmbeddedError`` line that says what to do.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

LOCALHOST = "127.0.0.1"
# Unprivileged user we create when running as root on a machine without a `postgres` user.
FALLBACK_USER = "pgfleet"
# A Unix socket path must fit sun_path (108 bytes); keep a margin for "/.s.PGSQL.<port>".
_SOCKET_PATH_MAX = 100
_SOCKET_PREFIX = "pgfleet-sock-"

# Server settings for a fast, disposable cluster: no durability (fsync off) because the data
# is recreated at will; enough connections for pooled tests and pgbench; prepared transactions
# for 2PC; logical WAL so the replication jobs' `mode: logical` can be tested without restarts.
DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": LOCALHOST,
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_prepared_transactions": "20",
    "shared_buffers": "64MB",
    "wal_level": "logical",
}

# Over TCP the test roles pf_trust and pf_md5 exercise the backends' other auth methods;
# everyone else, the postgres superuser included, must answer SCRAM.
PG_HBA = """\
# Written by pgfleet (proxy/embedded.py) on every start; edits here are overwritten.
local   all          all                       trust
host    all          pf_trust   127.0.0.1/32   trust
host    all          pf_md5     127.0.0.1/32   md5
host    all          all        127.0.0.1/32   scram-sha-256
host    replication  all        127.0.0.1/32   scram-sha-256
"""


class EmbeddedError(Exception):
    """A local cluster could not be found, created, started, stopped or queried."""


# ---------------------------------------------------------------------------------------------
# Binaries, ports, users


def find_pg_bindir() -> Path:
    """The directory holding initdb/pg_ctl/postgres: pg_config's, else the newest Debian one."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                check=False)
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    # Debian/Ubuntu keep the server binaries out of PATH, one directory per major version.
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    versioned = [p for p in candidates if p.parent.name.isdigit()]
    if versioned:
        return max(versioned, key=lambda p: int(p.parent.name))
    raise EmbeddedError("no PostgreSQL server binaries found: install postgresql "
                        "(apt-get install postgresql) or put pg_config on PATH")


def _bindable(port: int, host: str) -> bool:
    # SO_REUSEADDR as PostgreSQL and asyncio set it, so a port in TIME_WAIT counts as free
    # while one with a listener (on this host or on 0.0.0.0) does not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, host: str = LOCALHOST) -> int:
    """``preferred`` if it can be bound on ``host``, else a port the OS says is free."""
    if preferred is not None and _bindable(preferred, host):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_user() -> pwd.struct_passwd | None:
    """Who runs initdb/pg_ctl/postgres: None means "us" (we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedError(f"running as root and there is no 'postgres' user nor useradd to "
                            f"create '{FALLBACK_USER}': create an unprivileged user or run as "
                            f"non-root")
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmbeddedError(f"could not create the unprivileged user '{FALLBACK_USER}' to run "
                            f"PostgreSQL as: {_last_line(result.stderr)}")
    return pwd.getpwnam(FALLBACK_USER)


def _as_user(user: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    # setpriv execs directly (no PAM session, no lingering parent); runuser is the fallback.
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                "--", *argv]
    if shutil.which("runuser"):
        return ["runuser", "-u", user.pw_name, "--", *argv]
    raise EmbeddedError("running as root needs setpriv or runuser (util-linux) to start "
                        "PostgreSQL as an unprivileged user: install util-linux or run as non-root")


def _make_traversable(path: Path) -> None:
    """Let the server user reach ``path``: add o+x (search, not read) to each ancestor lacking it.

    Only the search bit: listing stays private. Done for us, as root, on directories we use.
    """
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _error_line(text: str) -> str:
    """psql's ERROR/FATAL line, not the NOTICEs before it nor the LINE/HINT context after it."""
    for line in text.splitlines():
        if "ERROR:" in line or "FATAL:" in line or "error:" in line:
            return re.sub(r"\s+", " ", line.strip())
    return _last_line(text)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------
# Cluster


class Cluster:
    """One local PostgreSQL cluster in ``datadir``: created on first start, reused afterwards.

    The chosen port is remembered in ``<datadir>.port`` so that a rerun (the demo twice) comes
    back on the same port and its printed connection lines stay valid.
    """

    host = LOCALHOST

    def __init__(self, name: str, datadir: Path | str, port: int | None = None,
                 password: str = "postgres", settings: dict[str, str] | None = None) -> None:
        self.name = name
        self.datadir = Path(datadir).absolute()
        self.preferred_port = port
        self.port: int = port or 0
        self.password = password
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.logfile = self.datadir / "server.log"
        self.port_file = self.datadir.with_name(self.datadir.name + ".port")
        self._bindir: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._user_known = False

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, {str(self.datadir)!r}, port={self.port})"

    # -- plumbing --------------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def user(self) -> pwd.struct_passwd | None:
        if not self._user_known:
            self._user = server_user()
            self._user_known = True
        return self._user

    def _server_cmd(self, tool: str, *args: str,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = _as_user(self.user, [str(self.bindir / tool), *args])
        # cwd "/" because the server user may not be allowed into our working directory.
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise EmbeddedError(f"cluster {self.name}: {tool} did not finish within {timeout:g}s; "
                                f"see {self.logfile}") from None

    def _give(self, path: Path) -> None:
        """Hand a file or directory we (root) made to the server user."""
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return " | ".join(line.strip() for line in tail if line.strip()) or "(empty server log)"

    # -- state -----------------------------------------------------------------------------

    def _running_pid_port(self) -> tuple[int, int] | None:
        """(pid, port) from postmaster.pid if that postmaster is alive; removes a stale file."""
        pidfile = self.datadir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except FileNotFoundError:
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            # A half-written pid file: the postmaster is still starting or died while starting.
            return None
        if _postgres_alive(pid):
            return pid, port
        pidfile.unlink(missing_ok=True)
        return None

    def is_running(self) -> bool:
        return self._running_pid_port() is not None

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        running = self._running_pid_port()
        if running is not None:
            self.port = running[1]
            return self
        if not self.initialised():
            self._initdb()
        if self.user is not None:
            # Checked on every start: pytest, for one, resets its temp root to 0700 each session.
            _make_traversable(self.datadir.parent)
        self.port = self._choose_port()
        self._write_hba()
        socket_dir = self._new_socket_dir()
        options = " ".join(f"-c {k}={shlex.quote(v)}" for k, v in self.settings.items())
        result = self._server_cmd(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
            "-o", f"-p {self.port} -k {shlex.quote(str(socket_dir))} {options}", "start",
            timeout=90)
        if result.returncode != 0:
            raise EmbeddedError(f"cluster {self.name} did not start on port {self.port} "
                                f"(datadir {self.datadir}): {self._log_tail()}")
        return self

    def stop(self) -> None:
        """Fast shutdown; a cluster that is not running is already stopped."""
        if not self.is_running():
            return
        socket_dir = self.socket_dir
        result = self._server_cmd("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w",
                                  "-t", "30", "stop", timeout=45)
        if result.returncode != 0 and self.is_running():
            # Fast shutdown waits for nothing but checkpoint; if even that hangs, crash it:
            # the data is disposable and fsync is off anyway.
            self._server_cmd("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
            if self.is_running():
                raise EmbeddedError(f"cluster {self.name} did not stop (datadir {self.datadir}): "
                                    f"{_last_line(result.stderr)}; kill its postmaster by hand")
        if socket_dir is not None and socket_dir.name.startswith(_SOCKET_PREFIX):
            shutil.rmtree(socket_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _initdb(self) -> None:
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise EmbeddedError(f"cluster {self.name}: {self.datadir} exists but is not a "
                                f"PostgreSQL data directory: remove it or choose another one")
        self.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.datadir.chmod(0o700)
        if self.user is not None:
            _make_traversable(self.datadir.parent)
        self._give(self.datadir)
        # The password travels in a private file: never on a command line that ps can show.
        fd, pwfile = tempfile.mkstemp(prefix="pgfleet-pw-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            self._give(Path(pwfile))
            result = self._server_cmd(
                "initdb", "-D", str(self.datadir), "-U", "postgres", f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C",
                "--no-sync", timeout=120)
        finally:
            os.unlink(pwfile)
        if result.returncode != 0:
            raise EmbeddedError(f"cluster {self.name}: initdb failed in {self.datadir}: "
                                f"{_last_line(result.stderr)}")

    def _choose_port(self) -> int:
        remembered: int | None = None
        try:
            remembered = int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            pass
        port = free_port(remembered or self.preferred_port)
        if port != remembered:
            self.port_file.write_text(f"{port}\n")
        return port

    def _write_hba(self) -> None:
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(PG_HBA)
        self._give(hba)

    def _new_socket_dir(self) -> Path:
        # The datadir already belongs to the server user; a deep (pytest) path would overflow
        # sun_path, so then a short private directory under /tmp is made (removed by stop()).
        if len(str(self.datadir)) + len("/.s.PGSQL.65535") < _SOCKET_PATH_MAX:
            return self.datadir
        short = Path(tempfile.mkdtemp(prefix=_SOCKET_PREFIX))
        self._give(short)
        return short

    @property
    def socket_dir(self) -> Path | None:
        """Where the running postmaster keeps its Unix socket (for psql -h / pgbench -h)."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        return Path(lines[4]) if len(lines) > 4 and lines[4] else None

    # -- SQL -------------------------------------------------------------------------------

    def replica(self, name: str, datadir: Path | str) -> Cluster:
        """A streaming replica of this (running) cluster: ``pg_basebackup -R`` into ``datadir``,
        then started on a port of its own."""
        datadir = Path(datadir)
        datadir.parent.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _make_traversable(datadir.parent)
            self._give(datadir.parent)
        # The password in a private file (never on a command line), kept: the replica's
        # primary_conninfo (written by -R) names it for every reconnection to the primary.
        passfile = datadir.parent / f".pgpass-{name}"
        passfile.write_text(f"{LOCALHOST}:{self.port}:*:postgres:{self.password}\n")
        passfile.chmod(0o600)
        self._give(passfile)
        argv = _as_user(self.user, [str(self.bindir / "pg_basebackup"), "-D", str(datadir), "-R",
                                    "-X", "stream", "-h", LOCALHOST, "-p", str(self.port), "-U", "postgres",
                                    "-w", "--checkpoint=fast"])
        result = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=120,
                                stdin=subprocess.DEVNULL, check=False,
                                env={**os.environ, "PGPASSFILE": str(passfile)})
        if result.returncode != 0:
            raise EmbeddedError(f"cluster {self.name}: pg_basebackup for replica {name} failed: "
                                f"{result.stderr.strip()[-500:]}")
        return Cluster(name, datadir, password=self.password, settings=self.settings).start()

    def dsn(self, dbname: str = "postgres", user: str = "postgres",
            password: str | None = None) -> str:
        """A postgresql:// URL over TCP; the superuser's password unless another is given."""
        from urllib.parse import quote

        secret = self.password if password is None and user == "postgres" else password
        auth = quote(user, safe="") + (f":{quote(secret, safe='')}" if secret is not None else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` (any number of statements) as the superuser; return psql's -At output."""
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        for var in ("PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGTARGETSESSIONATTRS"):
            env.pop(var, None)
        argv = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-A", "-t",
                "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", dbname, "-f", "-"]
        try:
            result = subprocess.run(argv, input=sql, capture_output=True, text=True, env=env,
                                    timeout=120, check=False)
        except subprocess.TimeoutExpired:
            raise EmbeddedError(f"cluster {self.name}: psql on {dbname} did not finish within "
                                f"120s; see {self.logfile}") from None
        if result.returncode != 0:
            message = re.sub(r"^psql:<stdin>:\d+: ", "", _error_line(result.stderr))
            raise EmbeddedError(f"cluster {self.name} ({self.host}:{self.port}/{dbname}): "
                                f"{message}")
        return result.stdout.rstrip("\n")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """Create database ``name`` unless it exists (rerunning is harmless)."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = {_quote_literal(name)}")
        if exists.strip() != "1":
            owner_sql = f" OWNER {_quote_ident(owner)}" if owner else ""
            self.psql(f"CREATE DATABASE {_quote_ident(name)}{owner_sql}")

    def create_role(self, name: str, password: str, *, md5: bool = False) -> None:
        """A LOGIN, non-superuser role whose password is stored as md5 or SCRAM (idempotent)."""
        encryption = "md5" if md5 else "scram-sha-256"
        # password_encryption decides how ALTER ROLE stores the password, so it must be set in
        # the same session; psql runs the whole script on one connection.
        self.psql(
            f"SET password_encryption = {_quote_literal(encryption)};\n"
            f"SELECT format('CREATE ROLE %I', {_quote_literal(name)})\n"
            f" WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {_quote_literal(name)})\n"
            f"\\gexec\n"
            f"ALTER ROLE {_quote_ident(name)} WITH LOGIN NOSUPERUSER"
            f" PASSWORD {_quote_literal(password)};\n")


def _postgres_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by the server user while we are not root
    # A stale pid file may name a pid that an unrelated process has reused since.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (not Linux): trust kill()
    except PermissionError:
        return True
    return b"postgres" in cmdline or b"postmaster" in cmdline
