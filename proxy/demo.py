"""`pgfleet demo`: the demo bank fleet on this machine, from nothing to psql lines to paste.

This module owns the demo's directory (``.pgfleet/`` under the current directory): three
embedded clusters (primary and secondary are the two shards of the bank, analytics holds the
events), the demo data and how it is split over the shards, the least-privilege PostgreSQL
roles the keys run as (and their grants), the generated config ``demo.yaml`` and the secrets in
``keys.json`` (key secrets and role passwords, created once, so a rerun prints the same ones),
row-level security on the sharded tables (through ``pgfleet rls --apply``), and a pgfleet
subprocess on port 6432 for as long as the command runs. Whatever happens it stops pgfleet and
the three clusters before returning (clusters that a killed earlier run left behind are reused,
then stopped too). It never shows a traceback for an expected failure (one line on stderr,
exit 1), never deletes demo data, and knows nothing about the proxy beyond its command line
and its TCP port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .embedded import LOCALHOST, Cluster, EmbeddedError, free_port
from .router.shard import key_value, shard_of

SQL_DIR = Path(__file__).resolve().parent.parent / "config" / "demo"
BANK_SQL = SQL_DIR / "bank.sql"
ANALYTICS_SQL = SQL_DIR / "analytics.sql"

DEFAULT_PROXY_PORT = 6432
FLEET = "app"
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class DemoDatabase:
    name: str          # the pgfleet database name, also the cluster's directory name
    port: int          # preferred port; the cluster remembers the one it really got
    dbname: str        # the PostgreSQL database inside the cluster
    sql: Path          # its data; a shard keeps only its own rows of it (load_shards)


DATABASES = (
    DemoDatabase("primary", 55432, "bank", BANK_SQL),
    DemoDatabase("secondary", 55433, "bank", BANK_SQL),
    DemoDatabase("analytics", 55434, "analytics", ANALYTICS_SQL),
)

# The demo's routing map (DESIGN.md "Words"): the bank's tables split over two shards by the
# user each row belongs to, currencies copied to both, events and user_activity on analytics.
SHARDS = ("primary", "secondary")
SHARD_FUNCTION = "hash"
SHARD_KEY_TYPE = "bigint"
SHARDED_TABLES = {"users": "id", "accounts": "user_id", "transactions": "user_id"}
REFERENCE_TABLES = ("currencies",)
MAPPED_TABLES = {"events": "analytics", "user_activity": "analytics"}
# Where each shard first runs BANK_SQL whole, before it keeps only its own rows.
SEED_SCHEMA = "pgfleet_demo_seed"

TENANT_USER_ID = 42

# (key id, role, extra YAML fields); one key per role, as in DESIGN.md.
KEYS = (
    ("pf_admin", "admin", ""),
    ("pf_server", "server", ""),
    ("pf_client", "client", ""),
    ("pf_tenant42", "database", f", user_id: {TENANT_USER_ID}"),
)

# The clusters' superuser (proxy/embedded.py), the user of every DSN: pgfleet's control plane,
# the admin key, DDL and `pgfleet rls --apply` run as it. No other key does (docs/security.md).
SUPERUSER = "postgres"


@dataclass(frozen=True)
class BackendRole:
    name: str                      # the PostgreSQL role, the same on every cluster
    default_for: tuple[str, ...]   # the key roles whose statements run as it
    may: str                       # what it may do, as the banner says it


TENANT_ROLE = BackendRole(
    "pgfleet_tenant", ("database",),
    "read and write the bank's tables; row-level security: its tenant's rows only")
APP_ROLE = BackendRole(
    "pgfleet_app", ("client", "server"),
    "read and write every table; no DDL")
BACKEND_ROLES = (TENANT_ROLE, APP_ROLE)
# Everything a backend role's login may do besides what it is granted: nothing, but that the
# application's role bypasses row-level security (it sees every row anyway, and PostgreSQL
# refuses COPY FROM to a role that row-level security applies to; `pgfleet rls` gives it the
# same). Set on every run, so a role someone made a superuser by hand becomes an ordinary one.
ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"


def _rls_attribute(role: BackendRole) -> str:
    return "NOBYPASSRLS" if "database" in role.default_for else "BYPASSRLS"


def _read_sql(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EmbeddedError(f"cannot read the demo SQL {path}: {exc.strerror}") from None


def load_sql(cluster: Cluster, dbname: str, path: Path) -> None:
    """Create ``dbname`` if missing and run the (idempotent) demo script ``path`` in it."""
    sql = _read_sql(path)
    cluster.create_database(dbname)
    cluster.psql(sql, dbname=dbname)


def owner(value: int | str, n_shards: int = len(SHARDS)) -> int:
    """The index of the shard that holds rows whose shard key is ``value``."""
    return shard_of(key_value(str(value), SHARD_KEY_TYPE), SHARD_KEY_TYPE, n_shards,
                    SHARD_FUNCTION)


def _keys_query(schema: str, tables: Mapping[str, str]) -> str:
    """One line ``table|key`` per distinct shard-key value of each table (an empty key is NULL)."""
    return "\nUNION ALL\n".join(
        f"SELECT DISTINCT '{table}', {column}::text FROM {schema}.{table}"
        for table, column in tables.items()) + ";\n"


def _rows(output: str) -> list[tuple[str, str]]:
    return [(table, key) for table, _, key in (line.partition("|")
                                               for line in output.splitlines() if line)]


def load_shards(shards: Sequence[tuple[Cluster, str]], path: Path = BANK_SQL) -> None:
    """Give each shard (a cluster and database name) the tables of ``path`` and its own rows.

    ``path`` (the unsharded bank) runs whole in a scratch schema of each shard; the shard then
    gets the same tables in ``public``, every row of the reference tables, and the rows of the
    sharded tables whose shard key ``shard_of`` gives to it, and the scratch schema goes.
    Rerunning adds what is missing and changes nothing else. A row found on a shard that does
    not own it (left by a demo from before sharding) is an error: it is neither kept silently
    nor deleted.
    """
    sql = _read_sql(path)
    for index, (cluster, dbname) in enumerate(shards):
        cluster.create_database(dbname)
        keys = _stage(cluster, dbname, path, sql)
        owned = {table: [key for key in values if owner(key, len(shards)) == index]
                 for table, values in keys.items()}
        cluster.psql(_keep_owned(owned), dbname=dbname)
        _check_placement(cluster, dbname, index, len(shards))


def _stage(cluster: Cluster, dbname: str, path: Path, sql: str) -> dict[str, list[str]]:
    """Run ``sql`` in the scratch schema; return the distinct shard keys of each sharded table."""
    cluster.psql(f"DROP SCHEMA IF EXISTS {SEED_SCHEMA} CASCADE;\n"
                 f"CREATE SCHEMA {SEED_SCHEMA};\n"
                 f"SET search_path = {SEED_SCHEMA};\n{sql}", dbname=dbname)
    created = sorted(cluster.psql(f"SELECT tablename FROM pg_tables "
                                  f"WHERE schemaname = '{SEED_SCHEMA}'", dbname=dbname).split())
    expected = sorted([*SHARDED_TABLES, *REFERENCE_TABLES])
    if created != expected:
        raise EmbeddedError(f"{path} creates tables {', '.join(created)} but the demo shards or "
                            f"copies {', '.join(expected)}: make them agree in proxy/demo.py")
    keys: dict[str, list[str]] = {table: [] for table in SHARDED_TABLES}
    for table, key in _rows(cluster.psql(_keys_query(SEED_SCHEMA, SHARDED_TABLES), dbname=dbname)):
        if not key:
            raise EmbeddedError(f"{path}: {table}.{SHARDED_TABLES[table]} is NULL in some rows: "
                                f"every row of a sharded table needs its shard key")
        keys[table].append(key)
    return keys


def _keep_owned(owned: Mapping[str, list[str]]) -> str:
    """The script that copies the scratch schema's tables to public: all of the reference
    tables, the ``owned`` keys' rows of the sharded ones; then drops the scratch schema."""
    script = ["BEGIN;"]
    for table in [*REFERENCE_TABLES, *SHARDED_TABLES]:
        where = ""
        if table in owned:
            where = (f" WHERE {SHARDED_TABLES[table]} = "
                     f"ANY('{{{','.join(owned[table])}}}'::{SHARD_KEY_TYPE}[])")
        script.append(f"CREATE TABLE IF NOT EXISTS public.{table} "
                      f"(LIKE {SEED_SCHEMA}.{table} INCLUDING ALL);")
        script.append(f"INSERT INTO public.{table} SELECT * FROM {SEED_SCHEMA}.{table}{where} "
                      f"ON CONFLICT DO NOTHING;")
    script += [f"DROP SCHEMA {SEED_SCHEMA} CASCADE;", "COMMIT;"]
    return "\n".join(script)


def _check_placement(cluster: Cluster, dbname: str, index: int, n_shards: int) -> None:
    """Every shard key in the shard's sharded tables (its rows, and any added since) is its own."""
    stray = [(table, key) for table, key in _rows(cluster.psql(
                 _keys_query("public", SHARDED_TABLES), dbname=dbname))
             if key and owner(key, n_shards) != index]
    if stray:
        table, key = stray[0]
        raise EmbeddedError(
            f"{cluster.name} ({dbname}) holds rows that belong on another shard, e.g. "
            f"{table}.{SHARDED_TABLES[table]} = {key} (left by a demo from before sharding?): "
            f"delete the demo directory (.pgfleet) and run the demo again")


def load_fleet(targets: Mapping[str, tuple[Cluster, str]]) -> None:
    """Load the demo data: ``targets`` maps each demo database name to a cluster and dbname."""
    load_shards([targets[name] for name in SHARDS])
    for db in DATABASES:
        if db.name not in SHARDS:
            cluster, dbname = targets[db.name]
            load_sql(cluster, dbname, db.sql)


def create_roles(targets: Mapping[str, tuple[Cluster, str]], passwords: Mapping[str, str]) -> None:
    """Create the backend roles on every cluster of ``targets`` (or bring them up to date:
    attributes and ``passwords``, by role name) and grant them, in each demo database, what
    they need and no more. Run after ``load_fleet``: the grants name its tables."""
    clusters = {id(cluster): cluster for cluster, _ in targets.values()}
    for cluster in clusters.values():
        for role in BACKEND_ROLES:
            cluster.create_role(role.name, passwords[role.name])  # LOGIN, SCRAM password
            cluster.psql(f"ALTER ROLE {role.name} WITH {ROLE_ATTRIBUTES} {_rls_attribute(role)}")
    for name, (cluster, dbname) in targets.items():
        cluster.psql(grants_sql(bank=name in SHARDS), dbname=dbname)


def grants_sql(bank: bool) -> str:
    """The backend roles' privileges in one demo database, the same after every run (what an
    earlier run granted is revoked first). ``bank``: a shard, whose bank tables the tenant role
    may use; elsewhere (analytics) it gets nothing."""
    tenant, app = TENANT_ROLE.name, APP_ROLE.name
    rows = "SELECT, INSERT, UPDATE, DELETE"
    sql = f"""\
BEGIN;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {tenant}, {app};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {tenant}, {app};
-- PostgreSQL 15's default already; older servers let every role create tables here.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
-- The application role: the rows of every table, and of the tables the superuser creates
-- later (DDL stays the superuser's).
GRANT USAGE ON SCHEMA public TO {app};
GRANT {rows} ON ALL TABLES IN SCHEMA public TO {app};
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {app};
ALTER DEFAULT PRIVILEGES FOR ROLE {SUPERUSER} IN SCHEMA public GRANT {rows} ON TABLES TO {app};
ALTER DEFAULT PRIVILEGES FOR ROLE {SUPERUSER} IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {app};
"""
    if bank:
        sharded = ", ".join(SHARDED_TABLES)
        sql += f"""\
-- The tenant role: the rows of the sharded tables (row-level security narrows them to its
-- tenant), reading the reference tables, and the sequences those tables own.
GRANT USAGE ON SCHEMA public TO {tenant};
GRANT {rows} ON {sharded} TO {tenant};
GRANT SELECT ON {", ".join(REFERENCE_TABLES)} TO {tenant};
SELECT format('GRANT USAGE, SELECT ON SEQUENCE %s TO {tenant}', seq.oid::regclass)
  FROM pg_depend dep JOIN pg_class seq ON seq.oid = dep.objid AND seq.relkind = 'S'
 WHERE dep.refobjid = ANY('{{{",".join(SHARDED_TABLES)}}}'::regclass[])
   AND dep.deptype IN ('a', 'i')  -- serial and identity columns
\\gexec
"""
    return sql + "COMMIT;\n"


def start_clusters(root: Path) -> dict[str, Cluster]:
    """Start (creating on first use) and load the three demo clusters under ``root``.

    On failure the clusters already started are stopped again before the error goes up.
    """
    clusters: dict[str, Cluster] = {}
    try:
        for db in DATABASES:
            cluster = clusters[db.name] = Cluster(db.name, root / db.name, port=db.port)
            cluster.start()
        load_fleet(demo_targets(clusters))
    except BaseException:
        # Ctrl-C or an error half-way: leave no postmaster behind, then let the cause go up.
        with _shielded():
            stop_clusters(clusters)
        raise
    return clusters


def demo_targets(clusters: Mapping[str, Cluster]) -> dict[str, tuple[Cluster, str]]:
    """Each demo database's cluster and dbname, as load_fleet, create_roles and render_config
    take them."""
    return {db.name: (clusters[db.name], db.dbname) for db in DATABASES}


def stop_clusters(clusters: dict[str, Cluster]) -> list[str]:
    """Stop every cluster, even if one fails; return the failures as operator lines."""
    failures = []
    for cluster in clusters.values():
        try:
            cluster.stop()
        except EmbeddedError as exc:
            failures.append(str(exc))
    return failures


def load_keys(path: Path) -> dict[str, str]:
    """The demo secrets, generated on first use and kept (mode 0600) so reruns print the same:
    each key's secret by key id and each backend role's password by role name."""
    keys: dict[str, str] = {}
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise EmbeddedError(f"cannot read {path} ({exc}): delete it and run the demo again "
                            f"(new secrets will be generated)") from None
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise EmbeddedError(f"{path} is not a JSON object of key id (or role name) to secret: "
                            f"delete it and run the demo again")
    names = [*(key_id for key_id, _, _ in KEYS), *(role.name for role in BACKEND_ROLES)]
    missing = [name for name in names if name not in keys]
    if missing:
        keys.update({name: secrets.token_urlsafe(18) for name in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(keys, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return keys


def _flow(mapping: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def render_config(targets: Mapping[str, tuple[Cluster, str]], keys: Mapping[str, str],
                  proxy_port: int) -> str:
    """The demo's pgfleet config, in the DESIGN.md format, with the clusters' real ports.

    ``targets`` maps each demo database to its cluster and dbname (``demo_targets``); ``keys``
    holds the key secrets and the role passwords (``load_keys``)."""
    dsns = {name: cluster.dsn(dbname) for name, (cluster, dbname) in targets.items()}
    role_lines = "\n".join(
        f'  {role.name}: {{password: "{keys[role.name]}", '
        f'default_for: [{", ".join(role.default_for)}]}}'
        for role in BACKEND_ROLES)
    key_lines = "\n".join(
        f'  - {{id: {key_id}, secret: "{keys[key_id]}", role: {role}{extra}}}'
        for key_id, role, extra in KEYS)
    types = {table: SHARD_KEY_TYPE for table in SHARDED_TABLES}
    return f"""\
# Generated by `pgfleet demo`; rewritten on every run (the secrets live in keys.json).
listen: {{host: {LOCALHOST}, port: {proxy_port}, database: {FLEET}}}
pool: {{mode: transaction, size: 20, acquire_timeout: 5s, idle_timeout: 60s, lifetime: 1h}}
databases:
  primary:   {{dsn: "{dsns['primary']}"}}
  secondary: {{dsn: "{dsns['secondary']}"}}
  analytics: {{dsn: "{dsns['analytics']}"}}
default_database: primary
sharding:
  shards: [{', '.join(SHARDS)}]
  function: {SHARD_FUNCTION}
  tables: {_flow(SHARDED_TABLES)}
  reference_tables: [{', '.join(REFERENCE_TABLES)}]
  types: {_flow(types)}
tables: {_flow(MAPPED_TABLES)}
# The roles keys run as; the dsns' user (the superuser) is the admin key's and pgfleet's own.
backend_roles:
{role_lines}
keys:
{key_lines}
"""


def write_config(path: Path, text: str) -> None:
    # The file holds the secrets in plain text: private, like keys.json.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


def connection_lines(keys: dict[str, str], port: int) -> list[str]:
    """One ready-to-paste psql line per key (and the server key's direct database)."""
    lines = [
        ("pf_admin", "pgfleet", "admin console: SHOW HELP, SHOW DATABASES"),
        ("pf_server", FLEET, "the fleet: full router (shard keys, table map, hints)"),
        ("pf_server", "analytics", "one database directly: analytics"),
        ("pf_client", FLEET, "client key: always the primary"),
        ("pf_tenant42", FLEET, f"database key bound to user_id {TENANT_USER_ID}"),
    ]
    commands = [f'psql "postgresql://{key_id}:{keys[key_id]}@{LOCALHOST}:{port}/{dbname}"'
                for key_id, dbname, _ in lines]
    width = max(len(command) for command in commands)
    return [f"{command:<{width}}  # {why}" for command, (_, _, why) in zip(commands, lines)]


def backend_role_of(key_role: str) -> BackendRole | None:
    """The backend role a key of ``key_role`` runs as; None: the superuser of the DSNs."""
    return next((role for role in BACKEND_ROLES if key_role in role.default_for), None)


def role_lines() -> list[str]:
    """One line per key: the PostgreSQL role its statements run as, and what that role may do."""
    rows = []
    for key_id, key_role, _ in KEYS:
        role = backend_role_of(key_role)
        rows.append((key_id, role.name, role.may) if role is not None else
                    (key_id, SUPERUSER, "the clusters' superuser: the console, DDL, anything"))
    id_width = max(len(key_id) for key_id, _, _ in rows)
    name_width = max(len(name) for _, name, _ in rows)
    return [f"{key_id:<{id_width}}  as {name:<{name_width}}  {may}" for key_id, name, may in rows]


def example_lines() -> dict[str, list[str]]:
    """One statement per kind of route, by the key whose session to paste it into."""
    tenant_shard = SHARDS[owner(TENANT_USER_ID)]
    server = [
        (f"SELECT * FROM accounts WHERE user_id = {TENANT_USER_ID};",
         f"shard key: only the shard that owns it ({tenant_shard})"),
        ("SELECT * FROM currencies;", "reference table: any one shard"),
        ("SELECT kind, count(*) FROM events GROUP BY kind;", "mapped table: analytics"),
        ("/* pgfleet: shard=1 */ SELECT count(*) FROM users;", f"hint: shard 1 ({SHARDS[1]}) only"),
        ("UPDATE users SET updated_at = now();", "no key: every shard, row counts summed"),
    ]
    tenant = [(f"SELECT * FROM accounts WHERE user_id = {TENANT_USER_ID};",
               f"its own tenant: user {TENANT_USER_ID}'s shard ({tenant_shard}) and no other")]
    width = max(len(sql) for sql, _ in server + tenant)
    return {key_id: [f"{sql:<{width}}  -- {why}" for sql, why in pairs]
            for key_id, pairs in (("pf_server", server), ("pf_tenant42", tenant))}


def proxy_port_from_env() -> int:
    raw = os.environ.get("PGFLEET_DEMO_PORT", "")
    if not raw:
        return DEFAULT_PROXY_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise EmbeddedError(f"PGFLEET_DEMO_PORT={raw!r} is not a TCP port: set a number "
                            f"such as 6432")
    return int(raw)


def proxy_env() -> dict[str, str]:
    """The environment for ``python -m proxy``: the same proxy package as this module, even
    when the demo runs from outside the checkout."""
    package_root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [package_root, os.environ.get("PYTHONPATH")]))}


def apply_rls(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``pgfleet rls --config CONFIG --apply``: row-level security on every sharded table of
    every shard, so the tenant role sees only its tenant's rows (docs/security.md)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "rls", "--config", str(config), "--apply"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
            timeout=READY_TIMEOUT * 3, check=False)
    except subprocess.TimeoutExpired:
        raise EmbeddedError(f"`pgfleet rls --config {config} --apply` did not finish within "
                            f"{READY_TIMEOUT * 3:g}s") from None


def wait_until_accepting(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """True once 127.0.0.1:port accepts TCP; False if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful shutdown, as DESIGN.md defines it
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore a second Ctrl-C/SIGTERM while we clean up, so cleanup always completes."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stop(Exception):
    """SIGTERM, turned into an exception so the finally blocks run."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def run(root: Path) -> int:
    proxy_port = proxy_port_from_env()
    # Checked before touching the clusters: a demo already running here holds this port, and
    # its clusters (which we would reuse, then stop on the way out) must be left alone.
    if free_port(proxy_port) != proxy_port:
        print(f"pgfleet demo: port {proxy_port} is in use: stop the other pgfleet/PgBouncer "
              f"or set PGFLEET_DEMO_PORT", file=sys.stderr)
        return 1
    clusters = start_clusters(root)
    proc: subprocess.Popen[bytes] | None = None
    try:
        targets = demo_targets(clusters)
        keys = load_keys(root / "keys.json")
        create_roles(targets, keys)
        config = root / "demo.yaml"
        write_config(config, render_config(targets, keys, proxy_port))
        env = proxy_env()
        rls = apply_rls(config, env)
        if rls.returncode != 0:
            print(f"pgfleet demo: `pgfleet rls --config {config} --apply` exited with code "
                  f"{rls.returncode}:\n{rls.stderr.strip() or rls.stdout.strip()}",
                  file=sys.stderr)
            return 1
        log = root / "pgfleet.log"
        with open(log, "wb") as out:
            # Its own session, so that Ctrl-C reaches us only and we shut it down in order.
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        if not wait_until_accepting(proc, proxy_port, READY_TIMEOUT):
            state = (f"exited with code {proc.returncode}" if proc.poll() is not None
                     else f"did not accept connections within {READY_TIMEOUT:g}s")
            print(f"pgfleet demo: pgfleet {state}; its output ({log}):\n{_log_tail(log)}",
                  file=sys.stderr)
            return 1
        _banner(clusters, keys, proxy_port, config, log)
        code = proc.wait()
        if code == 0:
            return 0
        print(f"pgfleet demo: pgfleet exited with code {code}; its output ({log}):\n"
              f"{_log_tail(log)}", file=sys.stderr)
        return 1
    finally:
        with _shielded():
            if proc is not None:
                _stop_proxy(proc)
            for failure in stop_clusters(clusters):
                print(f"pgfleet demo: {failure}", file=sys.stderr)


def _banner(clusters: dict[str, Cluster], keys: dict[str, str], port: int,
            config: Path, log: Path) -> None:
    fleet = ", ".join(f"{db.name} :{clusters[db.name].port}/{db.dbname}" for db in DATABASES)
    print(f"\npgfleet demo is running on {LOCALHOST}:{port} (fleet database '{FLEET}')")
    print(f"  databases: {fleet}")
    print(f"  sharding:  {', '.join(SHARDED_TABLES)} by user over {', '.join(SHARDS)} "
          f"({SHARD_FUNCTION}); {', '.join(REFERENCE_TABLES)} on both; "
          f"{', '.join(MAPPED_TABLES)} on analytics")
    print(f"  config:    {config}\n  log:       {log}\n")
    print("Each key runs as a PostgreSQL role (docs/security.md):")
    for line in role_lines():
        print(f"  {line}")
    print("\nPaste one of these:")
    for line in connection_lines(keys, port):
        print(f"  {line}")
    for key_id, lines in example_lines().items():
        print(f"\nThen, in the {key_id} session on /{FLEET}:")
        for line in lines:
            print(f"  {line}")
    print("\nCtrl-C stops pgfleet and the three clusters.", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pgfleet demo",
        description="Start three embedded PostgreSQL clusters with the demo bank sharded over "
                    "two of them and pgfleet in front (port 6432 or $PGFLEET_DEMO_PORT).")
    parser.add_argument("--dir", type=Path, default=Path(".pgfleet"),
                        help="where the clusters, config and keys live (default: .pgfleet)")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args.dir.absolute())
    except EmbeddedError as exc:
        print(f"pgfleet demo: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("\npgfleet demo: stopped", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
