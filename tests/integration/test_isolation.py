"""Red team: a tenant with valid credentials and arbitrary SQL, against real PostgreSQL.

The threat (docs/security.md): a client holding a ``database`` key bound to user 42 (or a
``client`` key) sends whatever SQL it likes, in the simple and the extended protocol. It must
never reach another tenant's rows nor the server's files, programs and other sessions. Three
lines stand in its way and each is tested here: the statement policy (42501 naming the key and
the rule), the least-privilege backend role its statements run as, and row-level security,
which PostgreSQL applies to whatever the router cannot see through (functions, views,
triggers, cursors, prepared statements).

Set-up, once for the module: the demo bank split over two databases of the session cluster
(``proxy.demo.load_shards``), a tenant role (LOGIN NOSUPERUSER NOBYPASSRLS, SELECT/INSERT/
UPDATE/DELETE on the bank tables only) and an application role, functions, views and a trigger
made by the superuser on the shards (what a DBA would create, and what a tenant can use but
not create), ``pgfleet rls --apply``, and one pgfleet for the module. Tenant 42's shard also
holds the rows of ``NEIGHBOUR``, a tenant of the same shard, so that a leak would show. The
fleet's pools have one connection each, so that tenants take turns on the same backend.
Everything made on the shared cluster is named with this process's pid and dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Self

import asyncpg
import psycopg
import pytest
import yaml

from proxy import demo
from proxy.config import load
from proxy.embedded import Cluster, free_port
from proxy.router.route import Direct, Route
from proxy.router.router import Router

from .conftest import ROOT, Fleet

PID = os.getpid()
TENANT_ROLE = f"pf_iso_tenant_{PID}"
APP_ROLE = f"pf_iso_app_{PID}"
ROLE_PASSWORDS = {TENANT_ROLE: "iso-tenant-pass", APP_ROLE: "iso-app-pass"}
SHARD_DBS = {"primary": f"pf_iso_a_{PID}", "secondary": f"pf_iso_b_{PID}"}
BANK_TABLES = ("users", "accounts", "transactions", "currencies")

TENANT = 42
TENANT_SHARD = demo.SHARDS[demo.owner(TENANT)]
# Another tenant whose rows live on tenant 42's shard: what a leak would show.
NEIGHBOUR = next(i for i in range(1, 51) if i != TENANT and demo.owner(i) == demo.owner(TENANT))

# key id -> (secret, role, extra config). The database keys run as TENANT_ROLE, the others
# (admin aside, which keeps the dsn's superuser) as APP_ROLE: backend_roles' default_for.
KEYS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pf_iso_admin": ("iso-admin-secret", "admin", {}),
    "pf_iso_server": ("iso-server-secret", "server", {}),
    "pf_iso_client": ("iso-client-secret", "client", {}),
    "pf_iso_tenant": ("iso-tenant-secret", "database", {"user_id": TENANT}),
    "pf_iso_neighbour": ("iso-neighbour-secret", "database", {"user_id": NEIGHBOUR}),
    "pf_iso_wide": ("iso-wide-secret", "client", {"policy": {"statements": {"allow": ["do"]}}}),
    "pf_iso_narrow": ("iso-narrow-secret", "client", {"policy": {
        "statements": {"deny": ["delete"]}, "functions": {"deny": ["md5"]}, "tables": {"deny": ["currencies"]}}}),
}
RED_TEAM_KEYS = ("pf_iso_tenant", "pf_iso_client")  # the key roles the default policy restricts

# Made by the superuser on each shard: what a DBA would create and a tenant may use (the
# functions are SECURITY INVOKER, the default, so they run as the tenant's role).
SHARD_OBJECTS = f"""
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO {TENANT_ROLE}, {APP_ROLE};
GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(BANK_TABLES)} TO {TENANT_ROLE}, {APP_ROLE};
CREATE FUNCTION all_users() RETURNS SETOF users LANGUAGE sql STABLE AS 'SELECT * FROM users';
CREATE FUNCTION all_users_plpgsql() RETURNS SETOF users LANGUAGE plpgsql AS
    $$ BEGIN RETURN QUERY SELECT * FROM users; END $$;
CREATE FUNCTION count_users() RETURNS bigint LANGUAGE plpgsql AS
    $$ BEGIN RETURN (SELECT count(*) FROM users); END $$;
CREATE FUNCTION all_accounts() RETURNS SETOF accounts LANGUAGE sql STABLE AS 'SELECT * FROM accounts';
CREATE VIEW v_users_invoker WITH (security_invoker = true) AS SELECT * FROM users;
-- A plain view runs with its owner's rights: the superuser's, who bypasses RLS.
CREATE VIEW v_users_owner AS SELECT * FROM users;
GRANT SELECT ON v_users_invoker, v_users_owner TO {TENANT_ROLE}, {APP_ROLE};
-- Each new account's balance is the number of users its inserter can see.
CREATE FUNCTION accounts_seen_users() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN NEW.balance := (SELECT count(*) FROM users); RETURN NEW; END $$;
CREATE TRIGGER accounts_seen_users BEFORE INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION accounts_seen_users();
"""


# ---------------------------------------------------------------------------------------------
# the module's fleet


def fleet_config(pg: Cluster, port: int) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port, "database": "app"},
        # One backend per (database, role): tenants take turns on the same connection.
        "pool": {"mode": "transaction", "size": 1, "acquire_timeout": "5s"},
        "databases": {name: {"dsn": pg.dsn(dbname)} for name, dbname in SHARD_DBS.items()},
        "default_database": TENANT_SHARD,  # client keys land where tenant 42 and its neighbour live
        "sharding": {"shards": list(demo.SHARDS), "function": demo.SHARD_FUNCTION,
                     "tables": dict(demo.SHARDED_TABLES), "reference_tables": list(demo.REFERENCE_TABLES)},
        # The operator lists the security_invoker view (on the tenants' shard) so that database
        # keys may use it; the superuser-owned one is not listed, and the router refuses it.
        "tables": {"v_users_invoker": TENANT_SHARD},
        "backend_roles": {TENANT_ROLE: {"password": ROLE_PASSWORDS[TENANT_ROLE], "default_for": ["database"]},
                          APP_ROLE: {"password": ROLE_PASSWORDS[APP_ROLE], "default_for": ["client", "server"]}},
        "shutdown_timeout": "5s",
        "keys": [{"id": key, "secret": secret, "role": role, **extra} for key, (secret, role, extra) in KEYS.items()],
    }


def rls(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "rls", "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)


@pytest.fixture(scope="module")
def shards(pg: Cluster) -> Iterator[dict[str, str]]:
    """The bank over two databases, the two roles, the DBA's objects; dropped at the end."""
    try:
        for role, password in ROLE_PASSWORDS.items():
            pg.create_role(role, password)
            pg.psql(f"ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE")
        demo.load_shards([(pg, SHARD_DBS[name]) for name in demo.SHARDS])
        for dbname in SHARD_DBS.values():
            pg.psql(SHARD_OBJECTS, dbname=dbname)
        yield SHARD_DBS
    finally:
        for dbname in SHARD_DBS.values():
            pg.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        for role in ROLE_PASSWORDS:
            pg.psql(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="module")
def fleet(pg: Cluster, shards: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("isolation")
    proc = Fleet(fleet_config(pg, free_port()), workdir)
    proc.config_path.write_text(yaml.safe_dump(proc.config))
    applied = rls(proc.config_path, "--apply")
    assert applied.returncode == 0, f"pgfleet rls --apply failed: {applied.stdout}{applied.stderr}"
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def dsn(fleet: Fleet, key: str, database: str = "app") -> str:
    return f"postgresql://{key}:{KEYS[key][0]}@127.0.0.1:{fleet.port}/{database}"


def connect(fleet: Fleet, key: str = "pf_iso_tenant", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn(fleet, key), autocommit=True, **kwargs)


def on_shard(pg: Cluster, sql: str, params: Any = None, shard: str = TENANT_SHARD) -> list[tuple[Any, ...]]:
    """What the superuser sees, straight on a shard (RLS does not apply to it)."""
    with psycopg.connect(pg.dsn(SHARD_DBS[shard]), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def ids(conn: psycopg.Connection[Any], sql: str, params: Any = None, **kwargs: Any) -> set[Any] | None:
    """The first column of the last result of ``sql`` (user ids, mostly), or None when it is
    refused (42501). A refusal is as good as an answer of the tenant's rows only: either way
    nothing leaked."""
    try:
        cur = conn.execute(sql, params, **kwargs)
    except psycopg.errors.InsufficientPrivilege:
        return None
    found: set[Any] = set()
    while True:
        if cur.description is not None:
            found = {row[0] for row in cur.fetchall()}
        if not cur.nextset():
            return found


@contextlib.contextmanager
def rolled_back(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction of an autocommit connection that always rolls back, even once failed."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")


def assert_own(seen: set[int] | None, what: str) -> None:
    assert seen is None or seen <= {TENANT}, f"{what}: other tenants' rows {sorted(seen - {TENANT})}"


def test_the_shard_holds_other_tenants_rows_and_rls_is_on(pg: Cluster, fleet: Fleet) -> None:
    """The premise of every test below: a leak would show, and PostgreSQL has the policies."""
    users = {row[0] for row in on_shard(pg, "SELECT id FROM users")}
    assert {TENANT, NEIGHBOUR} <= users and len(users) > 2
    for shard in demo.SHARDS:
        secured = on_shard(pg, "SELECT relname FROM pg_class WHERE relrowsecurity AND relkind = 'r' ORDER BY 1",
                           shard=shard)
        assert [r[0] for r in secured] == sorted(demo.SHARDED_TABLES), shard
        policies = on_shard(pg, "SELECT tablename, policyname, roles::text[] FROM pg_policies ORDER BY 1, 2",
                            shard=shard)
        for table in demo.SHARDED_TABLES:
            assert (table, "pgfleet_tenant", [TENANT_ROLE]) in policies, policies
            assert (table, "pgfleet_open", [APP_ROLE]) in policies, policies
    roles = on_shard(pg, "SELECT rolname, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = ANY(%s) ORDER BY 1",
                     ([TENANT_ROLE, APP_ROLE],))
    # The app role bypasses row-level security (pgfleet rls): it sees every row anyway, and
    # PostgreSQL refuses COPY FROM to a role that row-level security applies to.
    assert roles == sorted((role, False, role == APP_ROLE) for role in ROLE_PASSWORDS)


def test_rls_prints_the_policy_of_each_sharded_table(fleet: Fleet) -> None:
    printed = rls(fleet.config_path)
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    assert text.count("ENABLE ROW LEVEL SECURITY") == len(SHARD_DBS) * len(demo.SHARDED_TABLES) or \
        text.count("ENABLE ROW LEVEL SECURITY") == len(demo.SHARDED_TABLES), text
    for table in demo.SHARDED_TABLES:
        assert re.search(rf"CREATE POLICY pgfleet_tenant ON (public\.)?\"?{table}\"?\s", text), text
    assert TENANT_ROLE in text and APP_ROLE in text and "current_setting('pgfleet.tenant'" in text, text


@pytest.mark.parametrize(("key", "role"), [("pf_iso_tenant", TENANT_ROLE), ("pf_iso_neighbour", TENANT_ROLE),
                                           ("pf_iso_client", APP_ROLE), ("pf_iso_server", APP_ROLE),
                                           ("pf_iso_admin", "postgres")])
def test_each_key_runs_as_its_backend_role(fleet: Fleet, key: str, role: str) -> None:
    with connect(fleet, key) as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == (role, role)


# ---------------------------------------------------------------------------------------------
# the statement policy: every statement of the table, and more of the same kind

MARKER = f"/tmp/pgfleet-iso-{PID}-{uuid.uuid4().hex[:8]}"

# (statement, what its refusal says beside the key: the rule, "(statements: do)", ...; None: any refusal
# of pgfleet's own). set_config of pgfleet.* is pgfleet's own setting either way.
HINTS = "may not set pgfleet routing hints"
REFUSED: list[tuple[str, str | tuple[str, ...] | None]] = [
    (f"COPY (SELECT 1) TO PROGRAM 'id > {MARKER}-program'", "(statements: copy_program)"),
    ("COPY users FROM PROGRAM 'id'", "(statements: copy_program)"),
    ("CREATE FUNCTION f() RETURNS SETOF users LANGUAGE sql AS 'SELECT * FROM users'", "(statements: create_function)"),
    ("CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'", "(statements: create_function)"),
    ("SELECT count(*) FROM pg_authid", "(tables: pg_authid)"),
    ("SELECT passwd FROM pg_shadow", "(tables: pg_shadow)"),
    ("SELECT query FROM pg_stat_activity", "(tables: pg_stat_activity)"),
    ("SELECT pg_read_file('PG_VERSION')", "(functions: pg_read_file)"),
    ("SELECT pg_read_binary_file('PG_VERSION')", "(functions: pg_read_binary_file)"),
    ("SELECT pg_stat_file('PG_VERSION')", "(functions: pg_stat_file)"),
    ("SELECT pg_ls_dir('.')", "(functions: pg_ls_dir)"),
    ("SELECT * FROM pg_ls_waldir()", "(functions: pg_ls_waldir)"),
    ("SELECT lo_import('/etc/hostname')", "(functions: lo_import)"),
    (f"SELECT lo_export(1, '{MARKER}-lo')", "(functions: lo_export)"),
    ("SELECT pg_terminate_backend(pg_backend_pid())", "(functions: pg_terminate_backend)"),
    ("SELECT pg_cancel_backend(pg_backend_pid())", "(functions: pg_cancel_backend)"),
    ("SELECT dblink('dbname=postgres', 'SELECT 1')", "(functions: dblink)"),
    ("SELECT * FROM dblink_connect('dbname=postgres')", "(functions: dblink_connect)"),
    ("SELECT query_to_xml('SELECT * FROM users', true, true, '')", "(functions: query_to_xml)"),
    ("SELECT pg_reload_conf()", "(functions: pg_reload_conf)"),
    ("ALTER SYSTEM SET work_mem = '1MB'", "(statements: alter_system)"),
    ("DO $$ BEGIN END $$", "(statements: do)"),
    ("CREATE TABLE evil (a int)", "(statements: ddl)"),
    ("CREATE TEMP TABLE evil (a int)", "(statements: ddl)"),
    ("SELECT * INTO evil FROM currencies", "(statements: ddl)"),
    ("ALTER ROLE CURRENT_USER SET pgfleet.tenant = '43'", "(statements: ddl)"),
    ("SET ROLE postgres", "(statements: set_role)"),
    ("SET SESSION AUTHORIZATION postgres", "(statements: set_role)"),
    ("RESET ROLE", "(statements: set_role)"),
    ("RESET SESSION AUTHORIZATION", "(statements: set_role)"),
    ('SET "Role" = \'postgres\'', "(statements: set_role)"),  # GUC names are case-insensitive
    ('SET "Session_Authorization" = \'postgres\'', "(statements: set_role)"),
    ("SELECT set_config('role', 'postgres', false)", "(statements: set_role)"),
    ("SELECT pg_catalog.set_config('session_authorization', 'postgres', false)", "(statements: set_role)"),
    ("SELECT set_config('pgfleet.tenant', '43', false)", ("(statements: set_role)", HINTS)),
    ("SELECT set_config('pgfleet.tenant', '43', true)", ("(statements: set_role)", HINTS)),
    ("SELECT set_config('PGFLEET.TENANT', '43', false)", ("(statements: set_role)", HINTS)),
    ("SELECT set_config(U&'pgfleet\\002etenant', '43', false)", ("(statements: set_role)", HINTS)),
    ("SELECT set_config(lower('PGFLEET.TENANT'), '43', false)", "(statements: set_role)"),  # a computed name
    (f"SELECT id FROM users WHERE id = {TENANT} AND set_config('pgfleet.tenant', '43', false) <> ''",
     ("(statements: set_role)", HINTS)),
    ("SET pgfleet.tenant = '43'", None),
    ("RESET pgfleet.tenant", None),
    ("SET LOCAL pgfleet.tenant = '43'", None),
    (f"COPY users TO '{MARKER}-file'", "(statements: copy_file)"),
    ("COPY users FROM '/etc/hostname'", "(statements: copy_file)"),
    ("LOAD 'x'", "(statements: load)"),
    ("LOCK TABLE currencies", "(statements: lock)"),
    ("VACUUM currencies", "(statements: maintenance)"),
    ("CHECKPOINT", "(statements: maintenance)"),
    # the same, nested where a walk of the top statement alone would miss them
    ("WITH x AS (SELECT pg_read_file('PG_VERSION')) SELECT * FROM x", "(functions: pg_read_file)"),
    ("PREPARE evil AS SELECT pg_read_file('PG_VERSION')", "(functions: pg_read_file)"),
    ("EXPLAIN ANALYZE SELECT pg_read_file('PG_VERSION')", "(functions: pg_read_file)"),
    ("SELECT 1 UNION ALL SELECT count(*) FROM pg_authid", "(tables: pg_authid)"),
    ("SELECT (SELECT count(*) FROM pg_authid)", "(tables: pg_authid)"),
    ("SELECT 1; SELECT pg_read_file('PG_VERSION')", "(functions: pg_read_file)"),
    ("COPY (SELECT set_config('pgfleet.tenant', '43', false)) TO STDOUT", ("(statements: set_role)", HINTS)),
    ("EXPLAIN ANALYZE SELECT set_config('pgfleet.tenant', '43', false)", ("(statements: set_role)", HINTS)),
    ("WITH x AS (SELECT set_config('role', 'postgres', false)) SELECT * FROM x", "(statements: set_role)"),
]
# SET/RESET pgfleet.* is pgfleet's own in the simple protocol only (0A000 in the extended one,
# tests/integration/test_sharding.py); a query of several statements cannot be one Parse.
SIMPLE_ONLY = {"SET pgfleet.tenant = '43'", "RESET pgfleet.tenant", "SET LOCAL pgfleet.tenant = '43'",
               "SELECT 1; SELECT pg_read_file('PG_VERSION')"}


def refusal(conn: psycopg.Connection[Any], sql: str, extended: bool) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
        conn.execute(sql, prepare=True) if extended else conn.execute(sql)
    return str(err.value)


BY_PROTOCOL = [(sql, rule, extended) for sql, rule in REFUSED for extended in (False, True)
               if not (extended and sql in SIMPLE_ONLY)]


@pytest.mark.parametrize(("sql", "rule", "extended"), BY_PROTOCOL,
                         ids=[f"{sql}-{'extended' if extended else 'simple'}" for sql, _, extended in BY_PROTOCOL])
@pytest.mark.parametrize("key", RED_TEAM_KEYS)
def test_a_tenant_statement_of_the_server_is_refused_naming_the_key_and_rule(
        fleet: Fleet, key: str, sql: str, rule: str | tuple[str, ...] | None, extended: bool) -> None:
    with connect(fleet, key) as conn:
        message = refusal(conn, sql, extended)
        # The key's id in the message: pgfleet refused it, not PostgreSQL after running it as the role.
        assert key in message, message
        if rule is not None:
            assert any(said in message for said in ((rule,) if isinstance(rule, str) else rule)), message
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    for suffix in ("-program", "-lo", "-file"):
        assert not Path(MARKER + suffix).exists(), f"{sql} wrote {MARKER + suffix} on the database server"


# ---------------------------------------------------------------------------------------------
# row-level security: SQL the router cannot see through answers only the tenant's rows


def test_sql_and_plpgsql_functions_return_only_the_tenants_rows(pg: Cluster, fleet: Fleet) -> None:
    assert on_shard(pg, "SELECT count(*) FROM all_users()")[0][0] > 2  # the superuser sees them all
    with connect(fleet) as conn:
        assert ids(conn, "SELECT id FROM all_users()") == {TENANT}
        assert ids(conn, "SELECT id FROM all_users_plpgsql()") == {TENANT}
        assert ids(conn, "SELECT user_id FROM all_accounts()") == {TENANT}
        assert conn.execute("SELECT count_users()").fetchone() == (1,)
        assert ids(conn, "SELECT id FROM all_users() WHERE id = %s", (NEIGHBOUR,)) == set()
        assert conn.execute("SELECT count(*) FROM all_users() u JOIN all_accounts() a ON a.user_id = u.id "
                            "WHERE u.id <> %s", (TENANT,)).fetchone() == (0,)


def test_a_security_invoker_view_returns_only_the_tenants_rows(fleet: Fleet) -> None:
    with connect(fleet) as conn:  # listed in tables:, so the router lets it through: PostgreSQL filters
        assert ids(conn, "SELECT id FROM v_users_invoker") == {TENANT}
        assert ids(conn, "SELECT id FROM v_users_invoker WHERE id = %s", (NEIGHBOUR,)) == set()


def test_a_view_owned_by_the_superuser_leaks_nothing(pg: Cluster, fleet: Fleet) -> None:
    """A plain view runs as its owner; owned by the superuser it bypasses RLS. The DBA granted
    the tenant role SELECT on it, as ``GRANT SELECT ON ALL TABLES`` would: it must then be
    refused (the router: a view on a sharded table) or answer the tenant's rows only."""
    assert on_shard(pg, "SELECT count(*) FROM v_users_owner")[0][0] > 2
    with connect(fleet) as conn:
        for sql in ("SELECT id FROM v_users_owner", f"SELECT id FROM v_users_owner WHERE id = {NEIGHBOUR}"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="v_users_owner is not one of the fleet's tables"):
                conn.execute(sql)


def test_prepared_statements_with_another_tenants_id_answer_nothing(fleet: Fleet) -> None:
    with connect(fleet) as conn:  # SQL PREPARE pins the backend until this connection closes
        conn.execute("PREPARE mine AS SELECT id FROM all_users()")
        assert ids(conn, "EXECUTE mine") == {TENANT}
        conn.execute("PREPARE theirs(bigint) AS SELECT id FROM all_users() WHERE id = $1")
        assert ids(conn, f"EXECUTE theirs({NEIGHBOUR})") == set()
        assert ids(conn, f"EXECUTE theirs({TENANT})") == {TENANT}
        if ids(conn, "PREPARE direct_read(bigint) AS SELECT id FROM users WHERE id = $1") is not None:
            assert_own(ids(conn, f"EXECUTE direct_read({NEIGHBOUR})"), "PREPARE/EXECUTE on users")
    with connect(fleet) as conn:  # the extended protocol, text and binary parameters
        for binary in (False, True):
            for _ in range(3):  # prepared on the backend from the first or second use on
                assert ids(conn, "SELECT id FROM all_users() WHERE id = %s", (NEIGHBOUR,), prepare=True,
                           binary=binary) == set()
                assert ids(conn, "SELECT id FROM all_users() WHERE id <> %s", (TENANT,), prepare=True,
                           binary=binary) == set()
                assert ids(conn, "SELECT id FROM all_users() WHERE id = %s", (TENANT,), prepare=True,
                           binary=binary) == {TENANT}
                assert_own(ids(conn, "SELECT id FROM users WHERE id = %s", (NEIGHBOUR,), prepare=True,
                               binary=binary), "users by parameter")
                assert_own(ids(conn, "SELECT user_id FROM accounts WHERE user_id = %s", (NEIGHBOUR,),
                               prepare=True, binary=binary), "accounts by parameter")


def test_cursors_fetch_only_the_tenants_rows(fleet: Fleet) -> None:
    with connect(fleet) as conn:
        with conn.transaction():
            conn.execute("DECLARE c CURSOR FOR SELECT id FROM all_users()")
            assert ids(conn, "FETCH ALL FROM c") == {TENANT}
            conn.execute("DECLARE d CURSOR FOR SELECT user_id FROM all_accounts() ORDER BY 1")
            assert ids(conn, "FETCH 100 FROM d") == {TENANT}
        with conn.transaction(), conn.cursor("iso_named") as cur:  # psycopg's server-side cursor
            cur.execute("SELECT id FROM all_users_plpgsql()")
            assert {row[0] for row in cur.fetchall()} == {TENANT}
        with rolled_back(conn):
            if ids(conn, f"DECLARE e CURSOR FOR SELECT id FROM users WHERE id = {NEIGHBOUR}") is not None:
                assert_own(ids(conn, "FETCH ALL FROM e"), "a cursor on users")


def copy_out(conn: psycopg.Connection[Any], sql: str) -> set[int] | None:
    try:
        with conn.cursor().copy(sql) as copy:
            return {int(row[0]) for row in copy.rows()}
    except psycopg.errors.InsufficientPrivilege:
        return None


def test_copy_of_a_query_to_stdout_has_only_the_tenants_rows(fleet: Fleet) -> None:
    with connect(fleet) as conn:
        assert copy_out(conn, "COPY (SELECT id FROM all_users()) TO STDOUT") == {TENANT}
        assert copy_out(conn, "COPY (SELECT user_id FROM all_accounts()) TO STDOUT") == {TENANT}
        assert_own(copy_out(conn, "COPY (SELECT id FROM users) TO STDOUT"), "COPY (SELECT ... users)")
        assert_own(copy_out(conn, "COPY (SELECT id FROM v_users_invoker) TO STDOUT"), "COPY of a view")


def test_a_trigger_the_tenant_fires_sees_only_the_tenants_rows(pg: Cluster, fleet: Fleet) -> None:
    """The superuser's BEFORE INSERT trigger on accounts sets each new row's balance to the
    number of users it can see; it runs as the role that inserts, so RLS applies to it."""
    with psycopg.connect(pg.dsn(SHARD_DBS[TENANT_SHARD])) as conn:  # the trigger really counts
        seen = conn.execute("INSERT INTO accounts (id, user_id, currency) VALUES (-1, %s, 'EUR') "
                            "RETURNING balance", (TENANT,)).fetchone()
        conn.rollback()
    assert seen is not None and seen[0] > 2
    with connect(fleet) as conn:
        with rolled_back(conn):  # so that nothing stays
            seen = conn.execute("INSERT INTO accounts (id, user_id, currency) VALUES (9001, %s, 'EUR') "
                                "RETURNING balance", (TENANT,)).fetchone()
        assert seen == (1,)
        assert ids(conn, "SELECT id FROM all_accounts() WHERE id = 9001") == set()


def actual_rows(plan: dict[str, Any]) -> list[int]:
    return [plan["Actual Rows"]] + [n for child in plan.get("Plans", ()) for n in actual_rows(child)]


def test_explain_analyze_counts_only_the_tenants_rows(fleet: Fleet) -> None:
    with connect(fleet) as conn:
        for sql in ("SELECT id FROM all_users()", "SELECT * FROM v_users_invoker",
                    f"SELECT * FROM users WHERE id = {TENANT}"):
            row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").fetchone()
            assert row is not None
            plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
            assert max(actual_rows(plan[0]["Plan"])) <= 1, (sql, plan)
        try:
            text = "\n".join(r[0] for r in conn.execute("EXPLAIN ANALYZE SELECT * FROM users").fetchall())
        except psycopg.errors.InsufficientPrivilege:
            return
        assert all(int(n) <= 1 for n in re.findall(r"actual time=\S+ rows=(\d+)", text)), text


def test_the_extended_protocol_with_asyncpg_answers_only_the_tenants_rows(fleet: Fleet) -> None:
    async def run() -> tuple[list[Any], list[Any], list[Any], list[Any] | None]:
        conn = await asyncpg.connect(dsn(fleet, "pf_iso_tenant"))
        try:
            mine = await conn.fetch("SELECT id FROM all_users()")
            stmt = await conn.prepare("SELECT user_id FROM all_accounts() WHERE user_id = $1")
            theirs = await stmt.fetch(NEIGHBOUR)
            others = await conn.fetch("SELECT id FROM all_users_plpgsql() WHERE id <> $1", TENANT)
            try:
                direct = await conn.fetch("SELECT id FROM users WHERE id = $1", NEIGHBOUR)
            except asyncpg.exceptions.InsufficientPrivilegeError:
                direct = None
            return mine, theirs, others, direct
        finally:
            await conn.close()

    mine, theirs, others, direct = asyncio.run(run())
    assert [r[0] for r in mine] == [TENANT]
    assert theirs == [] and others == []
    assert_own(None if direct is None else {r[0] for r in direct}, "users by parameter (asyncpg)")


def test_resetting_every_setting_fails_closed(fleet: Fleet) -> None:
    with connect(fleet) as conn:
        assert_own(ids(conn, "RESET ALL; SELECT id FROM all_users()"), "after RESET ALL, same transaction")
        assert ids(conn, "SELECT id FROM all_users()") == {TENANT}, "the transaction after RESET ALL"
        conn.execute("DISCARD ALL")
        assert ids(conn, "SELECT id FROM all_users()") == {TENANT}, "the transaction after DISCARD ALL"
        with rolled_back(conn):
            conn.execute("RESET ALL")
            assert_own(ids(conn, "SELECT id FROM all_users()"), "after RESET ALL in a transaction")
        conn.execute("SET row_security = off")  # a role without BYPASSRLS: PostgreSQL errors, never filters less
        assert_own(ids(conn, "SELECT id FROM all_users()"), "row_security off")


# ---------------------------------------------------------------------------------------------
# the tenant setting: SQL that pgfleet cannot see must not move it

# Ways to set the tenant setting that no FuncCall named set_config and no SET pgfleet.* shows:
# functions that run SQL text (PostgreSQL runs it as the tenant's role), GUC names spelled in
# another case (PostgreSQL's are case-insensitive), SET LOCAL, and pg_settings' update rule.
HIDDEN_SET_TENANT = {
    "ts_stat": "SELECT * FROM ts_stat($q$SELECT to_tsvector(set_config('pgfleet.tenant', '{n}', false))$q$)",
    "ts_rewrite": "SELECT ts_rewrite('a'::tsquery, $q$SELECT set_config('pgfleet.tenant', '{n}', false)::tsquery, "
                  "'b'::tsquery$q$)",
    "quoted-mixed-case": 'SET "Pgfleet.Tenant" = \'{n}\'',
    "quoted-prefix": 'SET "PGFLEET".tenant TO \'{n}\'',
    "set-local": "SET LOCAL pgfleet.tenant = '{n}'",
    "pg_settings": "UPDATE pg_settings SET setting = '{n}' WHERE name = 'pgfleet.tenant'",
}


@pytest.fixture
def fresh_fleet(pg: Cluster, fleet: Fleet, tmp_path: Path) -> Iterator[Fleet]:
    """A pgfleet of its own on the module's shards (roles and RLS already there): an attack that
    leaves its backend in a wrong state must neither spoil the module's fleet nor be blamed for
    another attack's."""
    proc = Fleet(fleet_config(pg, free_port()), tmp_path).start()
    try:
        yield proc
    finally:
        proc.stop()


def attempt(conn: psycopg.Connection[Any], sql: str) -> set[Any] | None:
    try:
        return ids(conn, sql)
    except psycopg.errors.FeatureNotSupported:  # e.g. SET pgfleet.* with other statements
        return None


@pytest.mark.parametrize("way", HIDDEN_SET_TENANT)
def test_sql_the_policy_cannot_see_does_not_change_the_tenant(fresh_fleet: Fleet, way: str) -> None:
    """Each way, tried in the query that reads, in a transaction, and alone; then the read in
    the transactions after it, and the other tenant on the same (single) backend."""
    sql = HIDDEN_SET_TENANT[way].format(n=NEIGHBOUR)
    wrong: list[str] = []

    def check(seen: set[Any] | None, when: str, tenant: int = TENANT) -> None:
        if seen is not None and seen != {tenant}:
            wrong.append(f"{when}: tenant {tenant} sees the rows of {sorted(seen) or 'nobody'}")

    with connect(fresh_fleet) as conn:
        check(attempt(conn, f"{sql}; SELECT id FROM all_users()"), "in the same query")
        with rolled_back(conn):
            if attempt(conn, sql) is not None:
                check(ids(conn, "SELECT id FROM all_users()"), "later in its transaction")
        attempt(conn, sql)
        check(ids(conn, "SELECT id FROM all_users()"), "in the next transaction")
        check(ids(conn, "SELECT id FROM all_users()", prepare=True), "in the next transaction (extended)")
    with connect(fresh_fleet, "pf_iso_neighbour") as other:
        check(ids(other, "SELECT id FROM all_users()"), "then the other tenant on that backend", NEIGHBOUR)
    with connect(fresh_fleet) as conn:
        check(ids(conn, "SELECT id FROM all_users()"), "then a new connection of the tenant")
    assert not wrong, f"{sql}: " + "; ".join(wrong)


@pytest.mark.parametrize("options", [f"-c pgfleet.tenant={NEIGHBOUR}", f"-c Pgfleet.Tenant={NEIGHBOUR}",
                                     "-c role=postgres", "-c session_authorization=postgres",
                                     "-c row_security=off"])
def test_startup_options_cannot_change_the_tenant_or_the_role(fleet: Fleet, options: str) -> None:
    try:
        conn = connect(fleet, options=options)
    except psycopg.OperationalError:
        return  # refused at login: nothing leaked
    with conn:
        assert_own(ids(conn, "SELECT id FROM all_users()"), f"options {options}")
        assert_own(ids(conn, "SELECT id FROM all_users()", prepare=True), f"options {options} (extended)")
        who = ids(conn, "SELECT current_user")
        assert who is None or who == {TENANT_ROLE}, who


def test_two_tenants_taking_turns_on_one_backend_each_see_their_own(fleet: Fleet) -> None:
    """The pool has one connection: each statement of one tenant runs on the backend the other
    just used, so the tenant setting must be the right one for every transaction."""
    with connect(fleet) as mine, connect(fleet, "pf_iso_neighbour") as theirs:
        for _ in range(3):
            for conn, tenant in ((mine, TENANT), (theirs, NEIGHBOUR)):
                assert ids(conn, "SELECT id FROM all_users()") == {tenant}
                assert ids(conn, "SELECT id FROM all_users() WHERE id > %s", (0,), prepare=True) == {tenant}
                assert ids(conn, "SELECT id FROM all_users() WHERE id > %s", (0,), binary=True) == {tenant}
                assert copy_out(conn, "COPY (SELECT id FROM all_users()) TO STDOUT") == {tenant}
                with conn.transaction():
                    assert ids(conn, "SELECT user_id FROM all_accounts()") == {tenant}
                    assert ids(conn, "SELECT id FROM all_users_plpgsql()") == {tenant}


def test_writes_through_sql_the_router_cannot_see_cannot_reach_another_tenant(pg: Cluster, fleet: Fleet) -> None:
    before = on_shard(pg, "SELECT balance FROM accounts WHERE user_id = %s ORDER BY id", (NEIGHBOUR,))
    with connect(fleet) as conn:
        for sql in (
                f"UPDATE accounts SET balance = 0 WHERE user_id = {TENANT} OR id IN (SELECT id FROM all_accounts())",
                f"UPDATE accounts SET balance = 0 WHERE user_id = {TENANT} AND id IN (SELECT id FROM accounts)",
                f"DELETE FROM accounts WHERE user_id = {TENANT} AND id NOT IN (SELECT id FROM all_accounts())",
                f"INSERT INTO accounts (id, user_id, currency, balance) SELECT 9002, {NEIGHBOUR}, 'EUR', 0",
                f"INSERT INTO accounts VALUES ({TENANT}, {TENANT}) ON CONFLICT (id) DO UPDATE SET user_id = {NEIGHBOUR}",
        ):
            with rolled_back(conn):
                try:
                    conn.execute(sql)
                except (psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported):
                    continue  # refused (the router, or RLS's WITH CHECK)
                assert_own(ids(conn, "SELECT user_id FROM all_accounts()"), sql)
        copy_in = "COPY accounts (id, user_id, currency, balance) FROM STDIN"
        # Refused by the router, or by PostgreSQL: COPY FROM is not supported under RLS (0A000).
        with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported)), \
                conn.cursor().copy(copy_in) as copy:
            copy.write_row((9004, TENANT, "EUR", 0))
            copy.write_row((9005, NEIGHBOUR, "EUR", 0))
    assert on_shard(pg, "SELECT balance FROM accounts WHERE user_id = %s ORDER BY id", (NEIGHBOUR,)) == before
    assert on_shard(pg, "SELECT count(*) FROM accounts WHERE id IN (9004, 9005)") == [(0,)]


@pytest.mark.parametrize("key", ["pf_iso_server", "pf_iso_admin"])
def test_rls_leaves_a_server_keys_copy_into_a_sharded_table_working(pg: Cluster, fleet: Fleet, key: str) -> None:
    """Not isolation but its price: PostgreSQL refuses COPY FROM into a table with RLS to a role
    that RLS applies to (``pgfleet_open`` makes the application role one of those), and a
    server key's sharded COPY FROM STDIN is one of pgfleet's features (README)."""
    elsewhere = next(i for i in range(1, 51) if demo.owner(i) != demo.owner(TENANT))  # on the other shard
    rows = [(9101, NEIGHBOUR), (9102, TENANT), (9103, elsewhere)]
    try:
        with connect(fleet, key) as conn, \
                conn.cursor().copy("COPY accounts (id, user_id, currency, balance) FROM STDIN") as copy:
            for account, user in rows:
                copy.write_row((account, user, "EUR", 0))
        placed = sum(on_shard(pg, "SELECT count(*) FROM accounts WHERE id BETWEEN 9101 AND 9103", shard=shard)[0][0]
                     for shard in demo.SHARDS)
        assert placed == len(rows)
    finally:
        for shard in demo.SHARDS:
            on_shard(pg, "DELETE FROM accounts WHERE id BETWEEN 9101 AND 9103 RETURNING id", shard=shard)


# ---------------------------------------------------------------------------------------------
# defense in depth: the router's tenant check off, PostgreSQL still filters


class InProcessServer:
    """pgfleet's Server on an event loop of its own thread, so that a test can patch the
    router of this process (the module's fleet is a subprocess, out of reach)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pgfleet-in-process", daemon=True)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self) -> Any:
        from proxy.server import Server
        server = Server(load(self.config_path), str(self.config_path))
        await server.start()
        return server

    def __enter__(self) -> Self:
        self.thread.start()
        self.server = self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self.server.close(5.0, fast=True))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


def test_with_the_routers_tenant_check_off_postgresql_still_answers_only_the_tenants_rows(
        pg: Cluster, fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defense in depth. ``Router._tenant`` is where a database key's statements are checked
    against its binding (no key, another key, OR true, ...); here it is replaced by a function
    that sends every statement to the key's own shard unchecked, as a router bug would. The
    statement policy, the backend role and the tenant setting are pgfleet's real ones, in
    this process. What PostgreSQL answers must still be the tenant's rows only."""

    def unchecked(self: Router, analysis: Any, ctx: Any, hints: Any, params: Any, write: bool) -> Route:
        return Route(Direct(self.shards[self._tenant_shard(ctx.key)]), write, "test: tenant check off")

    with connect(fleet) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT count(*) FROM users")  # the real router refuses it
    own_accounts = on_shard(pg, "SELECT count(*) FROM accounts WHERE user_id = %s", (TENANT,))[0][0]
    assert on_shard(pg, "SELECT count(*) FROM users")[0][0] > 2

    monkeypatch.setattr(Router, "_tenant", unchecked)
    config = fleet_config(pg, free_port())
    path = tmp_path / "in-process.yaml"
    path.write_text(yaml.safe_dump(config))
    with InProcessServer(path) as server:
        port = server.server.config.listen.port
        with psycopg.connect(f"postgresql://pf_iso_tenant:{KEYS['pf_iso_tenant'][0]}@127.0.0.1:{port}/app",
                             autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM users").fetchone() == (1,)
            assert ids(conn, "SELECT id FROM users") == {TENANT}
            assert ids(conn, f"SELECT id FROM users WHERE id = {NEIGHBOUR} OR true") == {TENANT}
            assert ids(conn, "SELECT id FROM users WHERE id = %s", (NEIGHBOUR,), prepare=True) == set()
            assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (own_accounts,)
            assert conn.execute("SELECT count(DISTINCT user_id) FROM transactions").fetchone() == (1,)
            with rolled_back(conn):  # were PostgreSQL to let them through, the shard is left as it was
                assert conn.execute(f"UPDATE accounts SET balance = 0 WHERE user_id = {NEIGHBOUR}").rowcount == 0
                assert conn.execute("DELETE FROM transactions WHERE user_id <> %s", (TENANT,)).rowcount == 0
            with rolled_back(conn), pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                conn.execute("INSERT INTO users (id, name) VALUES (%s, 'planted')", (NEIGHBOUR + 1000,))
    assert on_shard(pg, "SELECT count(*) FROM users WHERE name = 'planted'") == [(0,)]


# ---------------------------------------------------------------------------------------------
# a key's own policy widens or narrows its role's defaults


def test_a_policy_that_allows_do_runs_it_and_keeps_the_other_defaults(fleet: Fleet) -> None:
    with connect(fleet, "pf_iso_wide") as conn:
        conn.execute("DO $$ BEGIN PERFORM 1; END $$")
        message = refusal(conn, "SELECT pg_read_file('PG_VERSION')", extended=False)
        assert "pf_iso_wide" in message and "(functions: pg_read_file)" in message
        message = refusal(conn, "CREATE TABLE evil (a int)", extended=False)
        assert "pf_iso_wide" in message and "(statements: ddl)" in message


@pytest.mark.parametrize(("sql", "rule"), [("DELETE FROM accounts WHERE id = -1", "statements: delete"),
                                           ("SELECT md5('x')", "functions: md5"),
                                           ("SELECT * FROM currencies", "tables: currencies"),
                                           ("SELECT count(*) FROM accounts a JOIN currencies c ON c.code = a.currency",
                                            "tables: currencies"),
                                           ("DO $$ BEGIN END $$", "statements: do")])
@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_a_policy_that_denies_refuses_naming_the_key_and_rule(fleet: Fleet, sql: str, rule: str,
                                                              extended: bool) -> None:
    with connect(fleet, "pf_iso_narrow") as conn:
        message = refusal(conn, sql, extended)
        assert "pf_iso_narrow" in message and f"({rule})" in message, message
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() is not None
        assert conn.execute("SELECT upper('x')").fetchone() == ("X",)
    with connect(fleet, "pf_iso_client") as conn:  # the same role without that policy
        if rule != "statements: do":
            conn.execute(sql)


def test_a_server_key_without_a_policy_runs_do_as_its_backend_role(fleet: Fleet) -> None:
    with connect(fleet, "pf_iso_server") as conn:
        conn.execute("DO $$ BEGIN IF current_user <> '" + APP_ROLE + "' THEN RAISE 'wrong role'; END IF; END $$")
        # ... and PostgreSQL, not pgfleet, stops what that role may not do
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT count(*) FROM pg_authid")
        assert "pf_iso_server" not in str(err.value)


def test_show_keys_shows_each_keys_backend_role_and_policy(fleet: Fleet) -> None:
    with psycopg.connect(dsn(fleet, "pf_iso_admin", "pgfleet"), autocommit=True) as conn:
        cur = conn.execute("SHOW KEYS")
        assert cur.description is not None
        names = [c.name for c in cur.description]
        rows = {row["id"]: row for row in (dict(zip(names, r, strict=True)) for r in cur.fetchall())}
    assert {key: rows[key]["backend_role"] for key in ("pf_iso_tenant", "pf_iso_client", "pf_iso_server")} == \
        {"pf_iso_tenant": TENANT_ROLE, "pf_iso_client": APP_ROLE, "pf_iso_server": APP_ROLE}
    assert "postgres" in rows["pf_iso_admin"]["backend_role"]

    def denied(key: str) -> set[str]:
        found = re.search(r"statements -([\w,]+)", rows[key]["policy"])
        return set(found.group(1).split(",")) if found else set()

    assert "do" in denied("pf_iso_client") and "do" in denied("pf_iso_tenant")
    assert "do" not in denied("pf_iso_wide") and "ddl" in denied("pf_iso_wide")
    assert "delete" in denied("pf_iso_narrow") and "delete" not in denied("pf_iso_client")
    assert denied("pf_iso_server") == set() and denied("pf_iso_admin") == set()


# ---------------------------------------------------------------------------------------------
# the second red team: SQL that pgfleet and PostgreSQL would read differently, and pgfleet's
# own statements on a shared backend

HIDDEN = (f"SELECT WHERE pg_catalog.num_nulls(pg_catalog.set_config($$pgfleet.tenant$$, $${NEIGHBOUR}$$, false)) < 0; "
          "SELECT id FROM users")


@pytest.mark.parametrize("sql", ["SET standard_conforming_strings = off", "SET LOCAL standard_conforming_strings = 0",
                                 "SET client_encoding = 'SJIS'", "SET NAMES 'GBK'",
                                 "SELECT set_config('standard_conforming_strings', 'off', false)"])
@pytest.mark.parametrize("key", RED_TEAM_KEYS)
def test_settings_that_change_how_sql_reads_are_refused(fleet: Fleet, key: str, sql: str) -> None:
    """With standard_conforming_strings off, or a client encoding whose characters may end in a
    backslash byte, a string to pgfleet's parser could be SQL to PostgreSQL: past the router and
    the policy (found by the second red team)."""
    with connect(fleet, key) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=re.escape("(statements: set_parser)")):
            conn.execute(sql)
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
        assert ids(conn, "SELECT 'a\\' AS q, ' ; " + HIDDEN + " ; SELECT ' AS r --'") in (None, {"a\\"})


@pytest.mark.parametrize("options", ["-c standard_conforming_strings=off", "-c client_encoding=SJIS"])
def test_startup_settings_that_change_how_sql_reads_are_refused(fleet: Fleet, options: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="may not connect with"):
        psycopg.connect(dsn(fleet, "pf_iso_tenant"), options=options)
    with pytest.raises(psycopg.OperationalError, match="may not connect with"):
        psycopg.connect(dsn(fleet, "pf_iso_tenant"), client_encoding="SJIS")


def test_a_setting_that_cannot_be_replayed_does_not_lose_the_tenant(fresh_fleet: Fleet) -> None:
    """SET transaction_isolation outside a transaction has no effect in PostgreSQL; pgfleet
    once replayed it as a session setting, the replay failed on the next backend, and the
    tenant set with it was lost: the statement ran as the backend's previous tenant."""
    with connect(fresh_fleet) as me, connect(fresh_fleet, "pf_iso_neighbour") as neighbour:
        me.execute("SET transaction_isolation = 'serializable'")
        assert ids(neighbour, "SELECT id FROM all_users()") == {NEIGHBOUR}  # the backend's tenant is theirs now
        assert ids(me, "SELECT id FROM all_users()") == {TENANT}
        assert ids(me, "SELECT id FROM v_users_invoker") == {TENANT}
    with connect(fresh_fleet, "pf_iso_client") as other:  # nothing left behind for the next login
        assert other.execute("SELECT 1").fetchone() == (1,)


def test_a_settings_value_with_backslashes_cannot_inject_sql_into_the_replay(fresh_fleet: Fleet) -> None:
    """pgfleet replays a client's settings as string literals; on a backend that another client
    (a server key, which may) left with standard_conforming_strings off, a backslash in a value
    once ended the literal early and the rest ran as SQL (found by the second red team)."""
    payload = "\\', false)) < 0; CREATE TEMP TABLE pwned AS SELECT 1 AS x; --"
    with connect(fresh_fleet, "pf_iso_server") as server, connect(fresh_fleet, "pf_iso_client") as client:
        client.execute("SET a.b = $Q$" + payload + "$Q$")
        server.execute("SET standard_conforming_strings = off")  # its backend, the app role's one (size 1)
        assert server.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        assert client.execute("SELECT current_setting('a.b')").fetchone() == (payload,)  # replayed as it was
        assert client.execute("SELECT count(*) FROM pg_class WHERE relname = 'pwned'").fetchone() == (0,)
        assert client.execute("SHOW standard_conforming_strings").fetchone() == ("on",)


@pytest.mark.parametrize("table", ["pg_prepared_statements", "pg_cursors", "pg_locks"])
def test_what_shared_backends_hold_from_other_clients_is_not_shown(fleet: Fleet, table: str) -> None:
    with connect(fleet) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"tables: {table}"):
        conn.execute(f"SELECT * FROM {table}")


@pytest.mark.parametrize("call", ["crosstab('select 1')", "connectby('t', 'a', 'b', '1', 0)",
                                  "xpath_table('a', 'b', 'c', 'd', 'e')"])
def test_contrib_functions_that_run_sql_text_are_refused(fleet: Fleet, call: str) -> None:
    with connect(fleet) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege, match="refused by its policy"):
        conn.execute(f"SELECT * FROM {call} AS t(a text)")


def test_another_permissive_policy_does_not_widen_the_tenants_rows(pg: Cluster, fleet: Fleet) -> None:
    """pgfleet's tenant policy is restrictive: a DBA's own permissive policy on the table (ORed
    with permissive ones) cannot show the tenant role other tenants' rows."""
    for shard in demo.SHARDS:
        on_shard_exec(pg, "CREATE POLICY everyone ON users TO PUBLIC USING (true)", shard)
    try:
        with connect(fleet) as conn:
            assert ids(conn, "SELECT id FROM all_users()") == {TENANT}
    finally:
        for shard in demo.SHARDS:
            on_shard_exec(pg, "DROP POLICY everyone ON users", shard)


def on_shard_exec(pg: Cluster, sql: str, shard: str) -> None:
    with psycopg.connect(pg.dsn(SHARD_DBS[shard]), autocommit=True) as conn:
        conn.execute(sql)
