"""pgfleet fixtures: one pgfleet process per test module, in front of the session's cluster.

``Fleet`` starts ``python -m proxy run`` on a free port with a config written under
``tmp_path``, waits until it has logged that it listens, and stops it at the end (checking it
exited cleanly). Helpers give the DSN for a key, run psql/pgbench against it, and read the log.
The backends are the real cluster from ``tests/conftest.py``; nothing here mocks PostgreSQL.

Determinism: nothing here asserts what a moment happens to look like. ``wait_until`` polls a
condition with a deadline; ``own_role`` gives a test a backend role of its own, so counting
its fleet's backends in ``pg_stat_activity`` (``pooled_backends``, which leaves out pgfleet's
control-plane connections: health checks, catalog reads, the two-phase commit log) cannot
see another test's backends that are still closing; ``closed_port`` is a port that refuses
connections for as long as the test holds it (other pytest sessions run on the same machine).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.backend.health import APPLICATION_NAME as HEALTH_APPLICATION_NAME
from proxy.embedded import Cluster, free_port
from tests.configs import overridden

from ..conftest import PG_GROUP

ROOT = Path(__file__).resolve().parents[2]

# The application_name of pgfleet's own control-plane connections (asyncpg; never pooled):
# health checks (backend/health.py), catalog reads (backend/catalog.py), the two-phase
# commit log (backend/twophase.py) and replication jobs (replication/: the stored jobs, read at
# start). Pooled backends log in as "pgfleet", then carry the application_name of the client
# they serve.
CONTROL_PLANE = (HEALTH_APPLICATION_NAME, "pgfleet catalog", "pgfleet two-phase commit", "pgfleet replication",
                 "pgfleet directory")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed; its last answer.

    For conditions that become true and stay true (a backend closed, a line logged): the
    deadline is generous because a loaded machine is slow, never because the test is unsure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
    return True


def pooled_backends(pg: Cluster, user: str, dbname: str = "bank") -> int:
    """Client backends of ``user`` on ``dbname`` that pgfleet's pools opened (its control-plane
    connections, which log in as the same user, are not pool connections)."""
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where usename = %s and datname = %s "
                           "and backend_type = 'client backend' and application_name <> all(%s)",
                           (user, dbname, list(CONTROL_PLANE))).fetchone()
    assert row is not None
    return int(row[0])


_roles = itertools.count(1)
OWN_ROLE_PASSWORD = "own-role-pass"


@pytest.fixture
def own_role(pg: Cluster) -> str:
    """A backend role no other test uses (SCRAM, in the pf_fleet group like the pf_* roles), so
    that ``pg_stat_activity`` rows of that user are this test's fleet's and nobody else's: not a
    previous test's backends still closing, not another fleet's."""
    name = f"pf_own_{os.getpid()}_{next(_roles)}"
    pg.create_role(name, OWN_ROLE_PASSWORD)
    pg.psql(f"GRANT {PG_GROUP} TO {name}")
    return name


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """``closed_port`` for the whole test; ask for it before ``make_fleet``, so that it outlives
    the fleets that try to connect there."""
    with closed_port() as port:
        yield port


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A local port that refuses connections while the block runs: bound (so that no other
    process can listen there meanwhile, as could happen to a port merely found free) and never
    listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]

# One key of each role; secrets are plain (pgfleet hashes them at load).
KEYS = {
    "pf_admin": ("admin-secret", "admin"),
    "pf_server": ("server-secret", "server"),
    "pf_client": ("client-secret", "client"),
    "pf_tenant": ("tenant-secret", "database"),
}


class Fleet:
    """A running pgfleet process."""

    def __init__(self, config: dict[str, Any], workdir: Path, workers: int = 1) -> None:
        self.config = config
        self.workers = workers  # pgfleet run --workers N (1: one process, no supervisor)
        self.port = config["listen"]["port"]
        self.workdir = workdir
        self.config_path = workdir / "pgfleet.yaml"
        self.log_path = workdir / "pgfleet.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Fleet:
        """Start pgfleet and wait until it has logged that it listens (its last start-up step).

        A port found free by ``free_port`` can be taken by another process (other pytest
        sessions run on this machine) before pgfleet binds it: pgfleet then exits with "address
        already in use", and it is started again on new ports. Readiness is this process's own
        "listening" line, never a TCP connect alone, which another process's listener would
        answer just as well."""
        for attempt in range(5):
            started = self._start_once()
            if started:
                return self
            if attempt < 4:  # the port was taken between free_port() and pgfleet's bind: new ones
                self.config["listen"]["port"] = self.port = free_port()
                if isinstance(self.config.get("http"), dict) and "port" in self.config["http"]:
                    self.config["http"]["port"] = free_port()
        raise RuntimeError(f"pgfleet could not bind a port in 5 attempts: {self.log()}")

    def _start_once(self) -> bool:
        """One start; False when pgfleet could not bind its ports (another process had them)."""
        self.config_path.write_text(yaml.safe_dump(self.config))
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(self.config_path),
                                          "--log-level", "debug", "--workers", str(self.workers)],
                                         stdout=log, stderr=log, env=env, cwd=ROOT)
        listening = f"pgfleet listening on {self.config['listen']['host']}:{self.port} "
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            since = self._log_since(offset)
            if exited:
                if "address already in use" in since.lower():
                    return False
                raise RuntimeError(f"pgfleet exited early: {self.log()}")
            if listening in since:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                return True
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"pgfleet did not start listening: {self.log()}")

    def _log_since(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_logged(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until the log holds ``text`` ``count`` times: pgfleet has seen what the test did."""
        assert wait_until(lambda: self.log().count(text) >= count, timeout), \
            f"{text!r} not logged {count} time(s) within {timeout:g}s: {self.log()[-3000:]}"

    def health_checked(self, timeout: float = 10.0) -> None:
        """Until every database's first health check has ended (SHOW HEALTH has its last_check).

        The first round starts with pgfleet, in the background, over connections of the
        databases' own users; a test that counts or cuts connections waits for it first."""
        def checked() -> bool:
            with psycopg.connect(self.dsn("pf_admin", "pgfleet"), autocommit=True) as conn:
                return all(row[2] is not None for row in conn.execute("SHOW HEALTH").fetchall())
        assert wait_until(checked, timeout, 0.05), f"no health check round within {timeout:g}s: {self.log()[-3000:]}"

    def dsn(self, key: str = "pf_server", database: str = "app", secret: str | None = None, **extra: str) -> str:
        secret = KEYS[key][0] if secret is None else secret
        query = "&".join(f"{k}={v}" for k, v in extra.items())
        return f"postgresql://{key}:{secret}@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    def kw(self, key: str = "pf_server", database: str = "app") -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": key, "password": KEYS[key][0],
                "dbname": database}

    def psql(self, sql: str, key: str = "pf_server", database: str = "app", *args: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", self.dsn(key, database), *args,
                               "-c", sql], capture_output=True, text=True, timeout=60, check=check)


def fleet_config(pg: Cluster, **overrides: Any) -> dict[str, Any]:
    """A three-database fleet on the session cluster: primary=bank, secondary, analytics."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port(), "database": "app"},
        "pool": {"mode": "transaction", "size": 10, "acquire_timeout": "3s"},
        "databases": {
            "primary": {"dsn": pg.dsn("bank", user="pf_scram", password="scrampass")},
            "secondary": {"dsn": pg.dsn("secondary", user="pf_md5", password="md5pass")},
            "analytics": {"dsn": pg.dsn("analytics", user="pf_trust")},
        },
        "default_database": "primary",
        "tables": {"events": "analytics", "user_activity": "analytics"},
        "shutdown_timeout": "5s",
        "keys": [{"id": key, "secret": secret, "role": role, **({"user_id": 42} if role == "database" else {})}
                 for key, (secret, role) in KEYS.items()],
    }
    return overridden(config, overrides)


@pytest.fixture(scope="module")
def fleet(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The standard three-database fleet, one pgfleet process for the module."""
    proc = Fleet(fleet_config(pg), tmp_path_factory.mktemp("fleet")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def make_fleet(pg: Cluster, tmp_path: Path) -> Iterator[Any]:
    """Start a pgfleet with config overrides, for tests that need their own settings."""
    started: list[Fleet] = []

    def make(**overrides: Any) -> Fleet:
        proc = Fleet(fleet_config(pg, **overrides), tmp_path / f"fleet{len(started)}")
        proc.workdir.mkdir()
        started.append(proc.start())
        return proc

    yield make
    for proc in started:
        proc.stop()


_empty = itertools.count(1)


@pytest.fixture
def empty_shards(pg: Cluster) -> Iterator[tuple[str, str]]:
    """Two empty databases of the session cluster (dropped at the end): a fleet that starts
    from nothing, its schema created through pgfleet."""
    n = next(_empty)
    names = (f"empty_{os.getpid()}_{n}_a", f"empty_{os.getpid()}_{n}_b")
    for name in names:
        pg.create_database(name)
    yield names
    for name in names:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def sharded_on(pg: Cluster, shards: tuple[str, str], tables: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """Config overrides for a fleet of two shards x0, x1 on ``shards``, sharding ``tables``."""
    return {"databases": {"x0": {"dsn": pg.dsn(shards[0])}, "x1": {"dsn": pg.dsn(shards[1])}},
            "default_database": "x0", "tables": {}, "sharding": {"shards": ["x0", "x1"], "tables": tables},
            **overrides}


def rows_on(pg: Cluster, dbname: str, sql: str) -> list[tuple[Any, ...]]:
    """What the superuser reads straight from a database."""
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
        return conn.execute(sql).fetchall()
