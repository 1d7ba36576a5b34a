"""Tenants for the tenant-directory tests: many small databases on two real clusters and the
registry table that names them.

``build`` makes them: a role ``tenant_owner`` and a template database ``tenant_template``
(one table ``marker(name text)``) on each cluster; the tenant databases made from that template
in parallel (a few connections per cluster, both clusters at once); one marker row in each
holding the tenant's own name, so that a client that reads it knows which database answered;
and the registry database on the first cluster with one row per tenant, its password a Fernet
token under a key made here (a few rows give a plain ``dsn`` instead). Everything goes straight
to PostgreSQL; pgfleet is not involved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psycopg
import pytest
from cryptography.fernet import Fernet

from proxy.embedded import Cluster

from .conftest import CONTROL_PLANE, Fleet
from .rawclient import LoginError, Raw

TEMPLATE = "tenant_template"
OWNER = "tenant_owner"
OWNER_PASSWORD = "tenant-owner-pass"
REGISTRY = "registry"
TABLE = "tenants"
REGISTRY_DDL = (f'CREATE TABLE IF NOT EXISTS {TABLE} (name text PRIMARY KEY, host text, port int, dbname text, '
                f'"user" text, password text, dsn text)')
# Rows whose number ends in these give a dsn (with the plain password) and no other column:
# one even, one odd, so both clusters have as many of them.
DSN_ROWS = (3, 4)
# FILE_COPY (a checkpoint, then the files copied) makes a database from a small template about
# twice as fast as the default WAL_LOG here (measured: 400 in 4.5 s against 9.7 s, two clusters).
STRATEGY = "FILE_COPY"


def tenant_name(i: int) -> str:
    return f"tenant_{i:04d}"


@dataclass
class Tenants:
    """The tenants made by ``build``: ``tenant_0000`` ... on ``clusters[i % 2]``."""

    clusters: tuple[Cluster, Cluster]
    count: int
    key: bytes  # the Fernet key of the registry's passwords
    seconds: dict[str, float] = field(default_factory=dict)  # how long each step of build took

    @property
    def names(self) -> list[str]:
        return [tenant_name(i) for i in range(self.count)]

    def cluster_of(self, name: str) -> Cluster:
        return self.clusters[int(name.rsplit("_", 1)[1]) % 2]

    def token(self, password: str = OWNER_PASSWORD, key: bytes | None = None) -> str:
        return Fernet(key or self.key).encrypt(password.encode()).decode()

    def row(self, name: str, cluster: Cluster, dbname: str | None = None) -> dict[str, Any]:
        """A registry row for ``dbname`` (default: ``name``) on ``cluster``, its password encrypted."""
        return {"name": name, "host": cluster.host, "port": cluster.port, "dbname": dbname or name,
                "user": OWNER, "password": self.token(), "dsn": None}

    def registry(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """What the superuser reads (or does) in the registry database."""
        with psycopg.connect(self.clusters[0].dsn(REGISTRY), autocommit=True) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description else []

    def register(self, *rows: dict[str, Any]) -> None:
        with psycopg.connect(self.clusters[0].dsn(REGISTRY), autocommit=True) as conn:
            for row in rows:
                conn.execute(f'INSERT INTO {TABLE} (name, host, port, dbname, "user", password, dsn) VALUES '
                             "(%(name)s, %(host)s, %(port)s, %(dbname)s, %(user)s, %(password)s, %(dsn)s)", row)

    def unregister(self, *names: str) -> None:
        self.registry(f"DELETE FROM {TABLE} WHERE name = ANY(%s)", list(names))

    def add_database(self, cluster: Cluster, name: str) -> None:
        """A tenant database made from the template, its marker row holding ``name``."""
        cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name} TEMPLATE {TEMPLATE} "
                     f"STRATEGY {STRATEGY}")
        with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
            conn.execute("INSERT INTO marker VALUES (%s)", (name,))


def _timed(seconds: dict[str, float], step: str, work: Callable[[], object]) -> None:
    started = time.monotonic()
    work()
    seconds[step] = round(time.monotonic() - started, 2)


def prepare(cluster: Cluster) -> None:
    """The tenants' role and the template database (its table owned by that role)."""
    cluster.create_role(OWNER, OWNER_PASSWORD)
    cluster.psql(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE); CREATE DATABASE {TEMPLATE} OWNER {OWNER}")
    cluster.psql(f"CREATE TABLE marker (name text); ALTER TABLE marker OWNER TO {OWNER}", dbname=TEMPLATE)


def _local(cluster: Cluster, dbname: str) -> psycopg.Connection[Any]:
    """The superuser over the cluster's Unix socket (trust: no SCRAM round trips), else TCP."""
    socket_dir = cluster.socket_dir
    if socket_dir is None:
        return psycopg.connect(cluster.dsn(dbname), autocommit=True)
    return psycopg.connect(host=str(socket_dir), port=cluster.port, user="postgres", dbname=dbname, autocommit=True)


def _create_databases(cluster: Cluster, names: list[str], connections: int) -> None:
    """Each database made from the template, then given its marker row (a connection to it),
    over ``connections`` threads at once: a database is marked while others are being copied."""
    def create(share: list[str]) -> None:
        with _local(cluster, "postgres") as conn:
            for name in share:
                conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY {STRATEGY}")
                with _local(cluster, name) as tenant:
                    tenant.execute("INSERT INTO marker VALUES (%s)", (name,))
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(create, [names[i::connections] for i in range(connections)]))


def _registry(tenants: Tenants) -> None:
    registry = tenants.clusters[0]
    registry.psql(f"DROP DATABASE IF EXISTS {REGISTRY} WITH (FORCE); CREATE DATABASE {REGISTRY}")
    rows: list[tuple[Any, ...]] = []
    for i, name in enumerate(tenants.names):
        cluster = tenants.cluster_of(name)
        if i % 100 in DSN_ROWS:
            rows.append((name, None, None, None, None, None, cluster.dsn(name, user=OWNER, password=OWNER_PASSWORD)))
        else:
            row = tenants.row(name, cluster)
            rows.append((name, row["host"], row["port"], row["dbname"], row["user"], row["password"], None))
    with psycopg.connect(registry.dsn(REGISTRY), autocommit=True) as conn:
        conn.execute(REGISTRY_DDL)
        with conn.cursor().copy(f'COPY {TABLE} (name, host, port, dbname, "user", password, dsn) '
                                "FROM STDIN") as copy:
            for values in rows:
                copy.write_row(values)


def build(clusters: tuple[Cluster, Cluster], count: int, connections: int = 3) -> Tenants:
    """``count`` tenants, even numbers on ``clusters[0]``, odd ones on ``clusters[1]``."""
    tenants = Tenants(clusters, count, Fernet.generate_key())
    seconds = tenants.seconds
    _timed(seconds, "template", lambda: list(map(prepare, clusters)))

    def databases(cluster: Cluster) -> None:
        half = [n for n in tenants.names if tenants.cluster_of(n) is cluster]
        _timed(seconds, f"databases:{cluster.name}", lambda: _create_databases(cluster, half, connections))
    with ThreadPoolExecutor(len(clusters)) as pool:  # both clusters at once
        _timed(seconds, "databases", lambda: list(pool.map(databases, clusters)))
    _timed(seconds, "registry", lambda: _registry(tenants))
    return tenants


MEMORY = Path("/dev/shm")
_MEMORY_PREFIX = "pgfleet-tenants-"


@contextlib.contextmanager
def scratch(tmp_path_factory: pytest.TempPathFactory, need_gb: float = 5) -> Iterator[Path]:
    """A directory for a cluster of many databases: in memory (a directory of our own under
    /dev/shm, removed at the end) when it has room to spare, else under pytest's temp root.

    Writing a few GB of new database files is what makes the tenants slow to build on a
    machine whose disk is shared and throttled; tmpfs takes them at memory speed. Directories
    left there by a test run that was killed (its pid gone) are stopped and removed first."""
    if not _memory_has_room(need_gb):
        yield tmp_path_factory.mktemp("tenants")
        return
    for stale in MEMORY.glob(f"{_MEMORY_PREFIX}*"):
        pid = stale.name[len(_MEMORY_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            Cluster("stale-tenants", stale / "data").stop()
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{_MEMORY_PREFIX}{os.getpid()}-", dir=MEMORY))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _memory_has_room(need_gb: float) -> bool:
    if not MEMORY.is_dir() or not os.access(MEMORY, os.W_OK):
        return False
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    need = need_gb * 2**30
    return shutil.disk_usage(MEMORY).free > need and available * 1024 > 2 * need


# ---------------------------------------------------------------------------------------------
# What the tests ask of PostgreSQL and of pgfleet


def tenant_backends(cluster: Cluster, like: str = "tenant\\_%") -> int:
    """Client backends of the tenants' role on databases named ``like`` that pgfleet's tenant
    pools opened (its control-plane connections are left out)."""
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                           "AND usename = %s AND datname LIKE %s AND application_name <> ALL(%s)",
                           (OWNER, like, list(CONTROL_PLANE))).fetchone()
    assert row is not None
    return int(row[0])


class Sampler:
    """Counts ``tenant_backends`` on each cluster every ``interval`` seconds in a thread of its
    own (one connection per cluster) and keeps the largest count seen."""

    QUERY = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = %s "
             "AND datname LIKE 'tenant\\_%%' AND application_name <> ALL(%s)")

    def __init__(self, clusters: Iterable[Cluster], interval: float = 0.02) -> None:
        self.clusters = list(clusters)
        self.interval = interval
        self.most = {c.port: 0 for c in self.clusters}
        self.samples = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            conns = [psycopg.connect(c.dsn("postgres"), autocommit=True) for c in self.clusters]
            try:
                while not self._stop.is_set():
                    for cluster, conn in zip(self.clusters, conns, strict=True):
                        row = conn.execute(self.QUERY, (OWNER, list(CONTROL_PLANE))).fetchone()
                        assert row is not None
                        self.most[cluster.port] = max(self.most[cluster.port], int(row[0]))
                    self.samples += 1
                    self._stop.wait(self.interval)
            finally:
                for conn in conns:
                    conn.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised by __exit__, in the test's thread
            self._error = exc


def login_error(fleet: Fleet, key: str, secret: str, database: str) -> dict[str, str]:
    """The ErrorResponse fields of a login that pgfleet refuses (it must refuse it)."""
    with Raw(fleet.port) as raw:
        with pytest.raises(LoginError) as err:
            raw.login(key, secret, database)
        assert raw.closed_soon(), "pgfleet kept the connection open after a failed login"
    return err.value.fields


def marker(fleet: Fleet, key: str, secret: str, database: str) -> str:
    """The marker row that a client of ``key`` reads through pgfleet in ``database``."""
    with psycopg.connect(f"postgresql://{key}:{secret}@127.0.0.1:{fleet.port}/{database}", autocommit=True) as conn:
        rows = conn.execute("SELECT name FROM marker").fetchall()
    assert len(rows) == 1, rows
    return str(rows[0][0])


def console(fleet: Fleet, text: str) -> list[dict[str, Any]]:
    """A console command's rows as dicts (an admin key, simple queries)."""
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as conn:
        cur = conn.execute(text)
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def rss_kb(pid: int) -> int:
    """The resident set size of process ``pid`` in kB (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
