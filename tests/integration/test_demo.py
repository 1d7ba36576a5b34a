"""The demo fleet's data: the bank split over two shards as the hash shard function says; and
the least-privilege PostgreSQL roles its keys run as.

``proxy.demo.load_fleet`` runs here against databases of the session's embedded cluster (one
per demo database, plus ``demo_seed``: the unsharded bank, as the reference). The placement is
checked twice: with ``shard_of`` and with the server's own ``PARTITION BY HASH``.

``proxy.demo.create_roles`` then creates the demo's backend roles in that cluster (roles are
cluster-wide; their grants are in the demo databases only), and each test logs in as one of
them directly, over TCP with its password as pgfleet would, to show what PostgreSQL itself lets
it do: the demo's promise holds whatever SQL reaches the backend.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy import config as pgconfig
from proxy import demo
from proxy.embedded import Cluster, EmbeddedError
from proxy.router.shard import shard_of

ROOT = Path(__file__).resolve().parents[2]
DBNAMES = {"primary": "demo_primary", "secondary": "demo_secondary", "analytics": "demo_analytics"}
SHARD_DBS = [DBNAMES[name] for name in demo.SHARDS]
SEED = "demo_seed"
BANK_TABLES = ["users", "accounts", "transactions"]
TENANT = demo.TENANT_ROLE.name
APP = demo.APP_ROLE.name
ROLE_PASSWORDS = {role.name: f"{role.name}-test-password" for role in demo.BACKEND_ROLES}
TENANT_DB = SHARD_DBS[shard_of(demo.TENANT_USER_ID, "bigint", len(SHARD_DBS), "hash")]


@pytest.fixture(scope="module")
def fleet(pg: Cluster) -> Iterator[dict[str, tuple[Cluster, str]]]:
    targets = {name: (pg, dbname) for name, dbname in DBNAMES.items()}
    try:
        demo.load_sql(pg, SEED, demo.BANK_SQL)
        demo.load_fleet(targets)
        yield targets
    finally:
        for dbname in [*DBNAMES.values(), SEED]:
            pg.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@pytest.fixture(scope="module")
def roles(pg: Cluster, fleet: dict[str, tuple[Cluster, str]]) -> dict[str, str]:
    """The demo's backend roles in the session cluster, granted in the demo databases; the
    roles outlive the module (the cluster is the session's), their grants go with the
    databases."""
    demo.create_roles(fleet, ROLE_PASSWORDS)
    return ROLE_PASSWORDS


def connect_as(pg: Cluster, role: str, dbname: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A direct login as a backend role, as pgfleet's pools make it: TCP, SCRAM, its password."""
    return psycopg.connect(pg.dsn(dbname, user=role, password=ROLE_PASSWORDS[role]),
                           autocommit=True)


def query(pg: Cluster, dbname: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def rows_as_text(pg: Cluster, dbname: str, table: str) -> list[str]:
    return [text for (text,) in query(pg, dbname, f"SELECT t::text FROM {table} t ORDER BY 1")]


@pytest.mark.parametrize("table", BANK_TABLES)
def test_every_row_is_on_the_shard_that_owns_its_user(pg: Cluster, fleet: object, table: str) -> None:
    column = demo.SHARDED_TABLES[table]
    for index, dbname in enumerate(SHARD_DBS):
        keys = [key for (key,) in query(pg, dbname, f"SELECT {column} FROM {table}")]
        assert keys, f"{dbname} has no {table}"
        wrong = [key for key in keys if shard_of(key, "bigint", len(SHARD_DBS), "hash") != index]
        assert not wrong, f"{table} rows of {column} {wrong[:5]} are on {dbname}"


@pytest.mark.parametrize("table", BANK_TABLES)
def test_the_shards_together_hold_each_seed_row_once(pg: Cluster, fleet: object, table: str) -> None:
    seed = rows_as_text(pg, SEED, table)
    on_shards = sorted(row for dbname in SHARD_DBS for row in rows_as_text(pg, dbname, table))
    assert len(on_shards) == len(seed) > 0
    assert on_shards == seed


def test_users_are_split_over_both_shards(pg: Cluster, fleet: object) -> None:
    counts = [query(pg, dbname, "SELECT count(*) FROM users")[0][0] for dbname in SHARD_DBS]
    assert sum(counts) == 50 and all(counts), counts


def test_currencies_are_identical_on_both_shards(pg: Cluster, fleet: object) -> None:
    seed = rows_as_text(pg, SEED, "currencies")
    assert len(seed) == 5
    for dbname in SHARD_DBS:
        assert rows_as_text(pg, dbname, "currencies") == seed


def test_placement_agrees_with_partition_by_hash(pg: Cluster, fleet: object) -> None:
    """A native hash-partitioned table puts each user id where the demo loaded its rows."""
    n = len(SHARD_DBS)
    loaded = sorted({(key, index) for index, dbname in enumerate(SHARD_DBS) for table in BANK_TABLES
                     for (key,) in query(pg, dbname,
                                         f"SELECT {demo.SHARDED_TABLES[table]} FROM {table}")})
    with psycopg.connect(pg.dsn(SEED), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS demo_placement")
        conn.execute("CREATE TABLE demo_placement (user_id bigint, loaded_on int) "
                     "PARTITION BY HASH (user_id)")
        for remainder in range(n):
            conn.execute(f"CREATE TABLE demo_placement_{remainder} PARTITION OF demo_placement "
                         f"FOR VALUES WITH (MODULUS {n}, REMAINDER {remainder})")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO demo_placement VALUES (%s, %s)", loaded)
        placed = conn.execute("SELECT user_id, loaded_on, tableoid::regclass::text "
                              "FROM demo_placement").fetchall()
        conn.execute("DROP TABLE demo_placement")
    assert len(placed) == len(loaded) >= 50
    wrong = [(key, on, part) for key, on, part in placed if part != f"demo_placement_{on}"]
    assert not wrong, wrong[:5]


def test_the_sharded_schema_is_the_same_on_both_shards(pg: Cluster, fleet: object) -> None:
    columns = ("SELECT table_name, column_name, data_type, is_nullable, column_default "
               "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2")
    seed = query(pg, SEED, columns)
    assert {row[0] for row in seed} == {*BANK_TABLES, "currencies"}
    for dbname in SHARD_DBS:
        assert query(pg, dbname, columns) == seed
        assert query(pg, dbname, f"SELECT to_regnamespace('{demo.SEED_SCHEMA}')") == [(None,)]


def test_events_live_on_analytics_only(pg: Cluster, fleet: object) -> None:
    assert query(pg, DBNAMES["analytics"], "SELECT (SELECT count(*) FROM events), "
                 "(SELECT count(*) FROM user_activity), to_regclass('users')") == [(300, 350, None)]
    for dbname in SHARD_DBS:
        assert query(pg, dbname, "SELECT to_regclass('events'), to_regclass('user_activity')") \
            == [(None, None)]


def test_loading_again_changes_nothing(pg: Cluster, fleet: dict[str, tuple[Cluster, str]]) -> None:
    before = {(db, t): rows_as_text(pg, db, t) for db in SHARD_DBS for t in [*BANK_TABLES, "currencies"]}
    demo.load_fleet(fleet)
    assert {(db, t): rows_as_text(pg, db, t) for db, t in before} == before


def test_a_row_on_the_wrong_shard_stops_the_load(pg: Cluster,
                                                  fleet: dict[str, tuple[Cluster, str]]) -> None:
    stray = next(i for i in range(1000, 2000) if shard_of(i, "bigint", 2, "hash") == 1)
    pg.psql(f"INSERT INTO users (id, email) VALUES ({stray}, 'stray@example.org')",
            dbname=SHARD_DBS[0])
    try:
        with pytest.raises(EmbeddedError, match=rf"users\.id = {stray} .*delete the demo directory"):
            demo.load_fleet(fleet)
    finally:
        pg.psql(f"DELETE FROM users WHERE id = {stray}", dbname=SHARD_DBS[0])


def _written_config(tmp_path: Path) -> pgconfig.Config:
    clusters = {db.name: Cluster(db.name, tmp_path / db.name, port=db.port) for db in demo.DATABASES}
    keys = {key_id: f"{key_id}-secret" for key_id, _, _ in demo.KEYS} | ROLE_PASSWORDS
    return pgconfig.load_text(demo.render_config(demo.demo_targets(clusters), keys, 6432))


def test_the_config_file_describes_what_the_demo_writes(tmp_path: Path) -> None:
    written = _written_config(tmp_path)
    env = {**os.environ, **{f"PGFLEET_DEMO_{name}_SECRET": "x"
                            for name in ("ADMIN", "SERVER", "CLIENT", "TENANT")},
           "PGFLEET_DEMO_TENANT_ROLE_PASSWORD": "x", "PGFLEET_DEMO_APP_ROLE_PASSWORD": "x"}
    documented = pgconfig.load(ROOT / "config" / "demo.yaml", env)
    assert written.sharding == documented.sharding
    assert written.sharding.tables == demo.SHARDED_TABLES
    assert written.tables == documented.tables == demo.MAPPED_TABLES
    assert [(k.id, k.role, k.user_id) for k in written.keys] == \
        [(k.id, k.role, k.user_id) for k in documented.keys]
    assert {name: role.default_for for name, role in written.backend_roles.items()} == \
        {name: role.default_for for name, role in documented.backend_roles.items()} == \
        {role.name: role.default_for for role in demo.BACKEND_ROLES}
    assert {name: role.password for name, role in written.backend_roles.items()} == ROLE_PASSWORDS


def test_the_banner_names_the_role_each_key_runs_as(tmp_path: Path) -> None:
    """What the demo prints is what the config it writes makes pgfleet do."""
    written = _written_config(tmp_path)
    printed = {line.split()[0]: line.split()[2] for line in demo.role_lines()}
    assert printed == {key.id: written.backend_role_of(key) or demo.SUPERUSER
                       for key in written.keys}
    assert printed["pf_admin"] == demo.SUPERUSER
    assert printed["pf_tenant42"] == TENANT
    assert printed["pf_server"] == printed["pf_client"] == APP


def test_keys_json_keeps_the_role_passwords(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"pf_admin": "kept-secret"}')  # a keys.json from before the roles
    keys = demo.load_keys(path)
    assert keys["pf_admin"] == "kept-secret"
    assert all(keys[role.name] for role in demo.BACKEND_ROLES)
    assert demo.load_keys(path) == keys


def test_the_examples_name_the_tenants_shard() -> None:
    lines = demo.example_lines()
    tenant_shard = demo.SHARDS[shard_of(demo.TENANT_USER_ID, "bigint", 2, "hash")]
    assert any("WHERE user_id = 42" in line and f"({tenant_shard})" in line
               for line in lines["pf_server"])
    assert any("pgfleet: shard=1" in line for line in lines["pf_server"])
    assert all("user_id = 42" in line and f"({tenant_shard})" in line for line in lines["pf_tenant42"])


# ---------------------------------------------------------------------------------------------
# The backend roles


def test_the_backend_roles_may_log_in_and_nothing_more(pg: Cluster, roles: object) -> None:
    attributes = query(pg, "postgres", "SELECT rolname, rolcanlogin, rolsuper, rolbypassrls, "
                       "rolcreatedb, rolcreaterole, rolreplication FROM pg_roles "
                       f"WHERE rolname IN ('{TENANT}', '{APP}') ORDER BY 1")
    # The application's role bypasses row-level security (COPY FROM into sharded tables); the
    # tenants' never does.
    assert attributes == [(APP, True, False, True, False, False, False),
                          (TENANT, True, False, False, False, False, False)]
    # Not a member of any role either (pg_read_server_files, pg_execute_server_program, ...).
    assert query(pg, "postgres", "SELECT member::regrole::text, roleid::regrole::text "
                 f"FROM pg_auth_members WHERE member::regrole::text IN ('{TENANT}', '{APP}')") == []


def test_the_tenant_role_cannot_read_pg_authid(pg: Cluster, roles: object) -> None:
    with connect_as(pg, TENANT, TENANT_DB) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_authid"):
        conn.execute("SELECT rolname, rolpassword FROM pg_authid")


def test_the_tenant_role_cannot_copy_to_a_program(pg: Cluster, roles: object) -> None:
    marker = Path(tempfile.gettempdir()) / f"pgfleet-demo-copy-program-{os.getpid()}"
    marker.unlink(missing_ok=True)
    try:
        with connect_as(pg, TENANT, TENANT_DB) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="external program"):
            conn.execute(f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'")
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE evil (id int)",
    "CREATE TABLE public.evil (id int)",
    "CREATE VIEW evil AS SELECT * FROM users",
    "CREATE FUNCTION evil() RETURNS SETOF users LANGUAGE sql AS 'SELECT * FROM users'",
])
def test_the_tenant_role_cannot_create_in_public(pg: Cluster, roles: object, ddl: str) -> None:
    with connect_as(pg, TENANT, TENANT_DB) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema public"):
        conn.execute(ddl)


def test_the_tenant_role_reads_and_writes_the_bank_tables(pg: Cluster, roles: object) -> None:
    # pgfleet.tenant as pgfleet sets it: with row-level security applied or not, the tenant's
    # own rows are there.
    user = demo.TENANT_USER_ID
    with connect_as(pg, TENANT, TENANT_DB) as conn:
        conn.execute(f"SET pgfleet.tenant = '{user}'")
        assert conn.execute(f"SELECT id FROM users WHERE id = {user}").fetchall() == [(user,)]
        assert conn.execute("SELECT count(*) FROM currencies").fetchall() == [(5,)]
        with conn.transaction(force_rollback=True):
            updated = conn.execute(f"UPDATE accounts SET balance = balance WHERE user_id = {user}")
            assert updated.rowcount >= 1
            conn.execute(f"DELETE FROM transactions WHERE user_id = {user}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="currencies"):
            conn.execute("INSERT INTO currencies VALUES ('XXX', 'Nothing', 0)")


def test_the_tenant_role_has_nothing_on_analytics(pg: Cluster, roles: object) -> None:
    with connect_as(pg, TENANT, DBNAMES["analytics"]) as conn:
        for table in demo.MAPPED_TABLES:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=table):
                conn.execute(f"SELECT count(*) FROM {table}")


def test_the_app_role_writes_every_table_but_creates_none(pg: Cluster, roles: object) -> None:
    with connect_as(pg, APP, DBNAMES["analytics"]) as conn:
        with conn.transaction(force_rollback=True):  # a new id from the events' sequence
            inserted = conn.execute("INSERT INTO events (kind) VALUES ('demo-test') RETURNING id")
            assert inserted.fetchall()[0][0] > 300
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema public"):
            conn.execute("CREATE TABLE evil (id int)")
    with connect_as(pg, APP, TENANT_DB) as conn:
        assert conn.execute("SELECT count(*) FROM currencies").fetchall() == [(5,)]
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO currencies VALUES ('XXX', 'Nothing', 0)")


def test_tables_the_superuser_creates_later_are_the_app_roles_only(pg: Cluster, roles: object) -> None:
    pg.psql("CREATE TABLE demo_later (id serial PRIMARY KEY, note text)", dbname=TENANT_DB)
    try:
        with connect_as(pg, APP, TENANT_DB) as conn, conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO demo_later (note) VALUES ('by the app role')")
        with connect_as(pg, TENANT, TENANT_DB) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="demo_later"):
            conn.execute("SELECT * FROM demo_later")
    finally:
        pg.psql("DROP TABLE demo_later", dbname=TENANT_DB)


GRANTS = ("SELECT c.relname, a.grantee::regrole::text, a.privilege_type "
          "FROM pg_class c, aclexplode(c.relacl) a "
          f"WHERE a.grantee::regrole::text IN ('{TENANT}', '{APP}') ORDER BY 1, 2, 3")


def test_creating_the_roles_again_restores_them(pg: Cluster,
                                                fleet: dict[str, tuple[Cluster, str]],
                                                roles: object) -> None:
    """A rerun of the demo: the same grants, and a role made a superuser by hand is not one."""
    before = {dbname: query(pg, dbname, GRANTS) for dbname in DBNAMES.values()}
    assert before[TENANT_DB] and before[DBNAMES["analytics"]]
    pg.psql(f"ALTER ROLE {APP} SUPERUSER")
    pg.psql(f"ALTER ROLE {TENANT} BYPASSRLS")
    pg.psql(f"GRANT ALL ON events TO {TENANT}", dbname=DBNAMES["analytics"])
    demo.create_roles(fleet, ROLE_PASSWORDS)
    assert {dbname: query(pg, dbname, GRANTS) for dbname in DBNAMES.values()} == before
    assert query(pg, "postgres", "SELECT rolname, rolsuper, rolbypassrls FROM pg_roles "
                 f"WHERE rolname IN ('{APP}', '{TENANT}') ORDER BY 1") == [(APP, False, True), (TENANT, False, False)]


def test_the_demo_applies_row_level_security(pg: Cluster, fleet: dict[str, tuple[Cluster, str]],
                                             roles: object, tmp_path: Path) -> None:
    """``pgfleet rls --apply`` on the config the demo writes: the tenant role sees only the
    rows of the tenant in pgfleet.tenant, whatever it asks; the app role and the superuser all."""
    config = tmp_path / "demo.yaml"
    keys = {key_id: f"{key_id}-secret" for key_id, _, _ in demo.KEYS} | ROLE_PASSWORDS
    demo.write_config(config, demo.render_config(fleet, keys, 6432))
    result = demo.apply_rls(config, demo.proxy_env())
    assert result.returncode == 0, result.stderr
    owners = "SELECT DISTINCT user_id FROM accounts ORDER BY 1"
    everyone = query(pg, TENANT_DB, owners)
    assert len(everyone) > 1
    with connect_as(pg, TENANT, TENANT_DB) as conn:
        assert conn.execute(owners).fetchall() == []  # no tenant set: no rows
        conn.execute(f"SET pgfleet.tenant = '{demo.TENANT_USER_ID}'")
        assert conn.execute(owners).fetchall() == [(demo.TENANT_USER_ID,)]
        assert conn.execute("SELECT count(*) FROM accounts WHERE user_id <> "
                            f"{demo.TENANT_USER_ID}").fetchall() == [(0,)]
        other = everyone[0][0] if everyone[0][0] != demo.TENANT_USER_ID else everyone[1][0]
        with conn.transaction(force_rollback=True), \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(f"INSERT INTO accounts (id, user_id) VALUES (999999, {other})")
    with connect_as(pg, APP, TENANT_DB) as conn:
        assert conn.execute(owners).fetchall() == everyone


def test_through_pgfleet_the_demo_keys_run_as_their_roles(pg: Cluster, fleet: dict[str, tuple[Cluster, str]],
                                                         roles: object, tmp_path: Path) -> None:
    """The demo's config served by pgfleet: pf_tenant42 runs as pgfleet_tenant and cannot read
    pg_authid (refused by its policy, and by PostgreSQL were it asked), sees its own accounts;
    pf_server runs as pgfleet_app."""
    import yaml

    from proxy.embedded import free_port

    from .conftest import Fleet

    keys = {key_id: f"{key_id}-secret" for key_id, _, _ in demo.KEYS} | ROLE_PASSWORDS
    config_path = tmp_path / "demo.yaml"
    demo.write_config(config_path, demo.render_config(fleet, keys, free_port()))
    assert demo.apply_rls(config_path, demo.proxy_env()).returncode == 0
    workdir = tmp_path / "fleet"
    workdir.mkdir()
    proxy = Fleet(yaml.safe_load(config_path.read_text()), workdir).start()
    try:
        tenant = demo.TENANT_USER_ID
        with psycopg.connect(proxy.dsn("pf_tenant42", secret=keys["pf_tenant42"]), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (TENANT,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pf_tenant42"):
                conn.execute("SELECT count(*) FROM pg_authid")
            mine = conn.execute(f"SELECT count(*) FROM accounts WHERE user_id = {tenant}").fetchone()
        assert mine == query(pg, TENANT_DB, f"SELECT count(*) FROM accounts WHERE user_id = {tenant}")[0]
        with connect_as(pg, TENANT, TENANT_DB) as direct, pytest.raises(psycopg.errors.InsufficientPrivilege):
            direct.execute("SELECT count(*) FROM pg_authid")  # the role itself may not either
        with psycopg.connect(proxy.dsn("pf_server", secret=keys["pf_server"]), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (APP,)
    finally:
        assert proxy.stop() == 0
