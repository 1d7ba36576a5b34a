"""Sharded routing through a running pgfleet on three real clusters.

primary = database ``shard_a`` on the session cluster, secondary = its own cluster,
analytics = a third cluster. users and accounts are sharded by user_id (bigint, type learned
from primary's catalog at start), currencies is a reference table, events lives on
analytics. Every check reads the shards directly to see where rows really landed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.embedded import Cluster, EmbeddedError
from proxy.router.shard import shard_of

from .conftest import KEYS, Fleet

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (user_id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (id serial PRIMARY KEY, user_id bigint NOT NULL, balance numeric NOT NULL);
CREATE TABLE IF NOT EXISTS currencies (code text PRIMARY KEY, name text NOT NULL);
INSERT INTO currencies VALUES ('EUR', 'Euro'), ('USD', 'US dollar') ON CONFLICT DO NOTHING;
"""
ANALYTICS = "CREATE TABLE IF NOT EXISTS events (id serial PRIMARY KEY, user_id bigint, kind text);"
SHARDS = ("primary", "secondary")
TENANT = 42  # pf_tenant's user_id


@pytest.fixture(scope="module")
def clusters(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Cluster, str]]]:
    base = tmp_path_factory.mktemp("shards")
    second = Cluster("shard-b", base / "b")
    third = Cluster("analytics-c", base / "c")
    try:
        second.start()
        third.start()
        pg.create_database("shard_a")
        second.create_database("shard_b")
        third.create_database("events_c")
        pg.psql(SCHEMA, dbname="shard_a")
        second.psql(SCHEMA, dbname="shard_b")
        third.psql(ANALYTICS, dbname="events_c")
    except EmbeddedError as exc:
        second.stop()
        third.stop()
        pytest.fail(f"embedded PostgreSQL: {exc}", pytrace=False)
    try:
        yield {"primary": (pg, "shard_a"), "secondary": (second, "shard_b"), "analytics": (third, "events_c")}
    finally:
        second.stop()
        third.stop()


@pytest.fixture(scope="module")
def sharded(clusters: dict[str, tuple[Cluster, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from proxy.embedded import free_port

    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port(), "database": "app"},
        "pool": {"mode": "transaction", "size": 4, "acquire_timeout": "3s"},
        "databases": {name: {"dsn": cluster.dsn(db)} for name, (cluster, db) in clusters.items()},
        "default_database": "primary",
        "tables": {"events": "analytics"},
        "sharding": {"shards": list(SHARDS), "function": "hash",
                     "tables": {"users": "user_id", "accounts": "user_id"},
                     "reference_tables": ["currencies"]},
        "keys": [{"id": key, "secret": secret, "role": role, **({"user_id": TENANT} if role == "database" else {})}
                 for key, (secret, role) in KEYS.items()],
    }
    fleet = Fleet(config, tmp_path_factory.mktemp("sharded-fleet")).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def direct(clusters: dict[str, tuple[Cluster, str]], name: str) -> psycopg.Connection[Any]:
    cluster, db = clusters[name]
    return psycopg.connect(cluster.dsn(db), autocommit=True)


def owner(user_id: int) -> str:
    return SHARDS[shard_of(user_id, "int8", len(SHARDS))]


def rows_on(clusters: dict[str, tuple[Cluster, str]], sql: str, *params: Any) -> dict[str, list[Any]]:
    found = {}
    for name in SHARDS:
        with direct(clusters, name) as conn:
            found[name] = conn.execute(sql, params).fetchall()
    return found


def test_the_shard_key_type_is_read_from_the_first_shard(sharded: Fleet) -> None:
    # No sharding.types in the config: without the catalog this would be refused with 55000.
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from users where user_id = -1").fetchone() == (0,)
    assert "could not read shard-key types" not in sharded.log()
    assert "has no shard-key column" not in sharded.log()


def test_inserts_by_parameter_land_on_the_shard_that_owns_the_key(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    ids = list(range(100, 140))
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        for user_id in ids:
            conn.execute("insert into users (user_id, name) values (%s, %s)", (user_id, f"u{user_id}"))
    placed = rows_on(clusters, "select user_id from users where user_id between 100 and 139")
    for name in SHARDS:
        assert sorted(r[0] for r in placed[name]) == [i for i in ids if owner(i) == name]
    assert all(placed[name] for name in SHARDS), "the ids were meant to cover both shards"


def test_simple_protocol_and_psql_route_by_constant(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    for user_id in (200, 201, 202, 203):
        sharded.psql(f"insert into users (user_id, name) values ({user_id}, 'psql')")
        out = sharded.psql(f"select name from users where user_id = {user_id}")
        assert out.stdout.strip() == "psql"
        placed = rows_on(clusters, "select 1 from users where user_id = %s", user_id)
        assert [name for name in SHARDS if placed[name]] == [owner(user_id)]


def test_reads_by_key_with_psycopg_and_asyncpg_prepared_statements(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        for user_id in (100, 101, 102, 103):
            assert conn.execute("select name from users where user_id = %s", (user_id,),
                                prepare=True).fetchone() == (f"u{user_id}",)

    async def run() -> list[str]:
        conn = await asyncpg.connect(sharded.dsn())
        try:
            stmt = await conn.prepare("select name from users where user_id = $1")
            return [await stmt.fetchval(i) for i in (104, 105, 106, 107)]
        finally:
            await conn.close()

    import asyncio
    assert asyncio.run(run()) == ["u104", "u105", "u106", "u107"]


def test_in_lists_on_one_shard_run_there(sharded: Fleet) -> None:
    same = [i for i in range(100, 140) if owner(i) == "secondary"][:3]
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        rows = conn.execute(f"select user_id from users where user_id in ({', '.join(map(str, same))}) "
                            "order by 1").fetchall()
        assert [r[0] for r in rows] == same


def test_statements_for_several_shards_are_refused_never_half_answered(sharded: Fleet) -> None:
    one = next(i for i in range(100, 140) if owner(i) == "primary")
    two = next(i for i in range(100, 140) if owner(i) == "secondary")
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        for sql in (f"select * from users where user_id in ({one}, {two})", "select count(*) from users"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                conn.execute(sql)
            assert "primary, secondary" in str(err.value)
        assert conn.execute("select 1").fetchone() == (1,)  # the session goes on


def test_cross_shard_join_is_refused_with_what_to_do(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("select * from users u join accounts a on a.id = u.user_id")
        assert "cross-shard join of accounts and users" in str(err.value)
        assert "join on the shard key user_id" in str(err.value)


def test_reference_table_reads_and_hints(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    counts = {name: len(rows) for name, rows in rows_on(clusters, "select * from users").items()}
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        assert conn.execute("select code from currencies order by 1").fetchall() == [("EUR",), ("USD",)]
        assert conn.execute("/* pgfleet: shard=1 */ select count(*) from users").fetchone() == (counts["secondary"],)
        assert conn.execute("/* pgfleet: database=analytics */ select current_database()").fetchone() == \
            ("events_c",)
        key_on_secondary = next(i for i in range(100, 140) if owner(i) == "secondary")
        conn.execute(f"set pgfleet.shard_key = '{key_on_secondary}'")
        assert conn.execute("select count(*) from users").fetchone() == (counts["secondary"],)
        conn.execute("reset pgfleet.shard_key")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("select count(*) from users")
        assert conn.execute("select current_database()").fetchone() == ("shard_a",)


def test_set_pgfleet_is_answered_by_pgfleet_in_the_simple_protocol(sharded: Fleet) -> None:
    script = ("set pgfleet.database = 'analytics';\nselect current_database();\n"
              "reset pgfleet.database;\nselect current_database();\nshow pgfleet.database;\n")
    result = subprocess.run(["psql", "-X", "-At", sharded.dsn()], input=script, capture_output=True,
                            text=True, timeout=60, check=False)
    # Never sent to a backend: the backend has no pgfleet.database placeholder to show.
    assert result.stdout.splitlines() == ["SET", "events_c", "RESET", "shard_a"], result
    assert 'unrecognized configuration parameter "pgfleet.database"' in result.stderr


def test_a_database_key_reaches_only_its_own_rows(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        conn.execute("insert into users (user_id, name) values (%s, 'tenant') on conflict do nothing", (TENANT,))
        conn.execute("insert into users (user_id, name) values (%s, 'other') on conflict do nothing", (TENANT + 1,))
    with psycopg.connect(sharded.dsn("pf_tenant"), autocommit=True) as conn:
        assert conn.execute("select name from users where user_id = %s", (TENANT,)).fetchone() == ("tenant",)
        assert conn.execute(f"select name from users where user_id = {TENANT}").fetchone() == ("tenant",)
        assert conn.execute("select code from currencies order by 1 limit 1").fetchone() == ("EUR",)
        ways_out = [
            ("select * from users where user_id = %s", (TENANT + 1,)),   # another value, by parameter
            (f"select * from users where user_id = {TENANT + 1}", None),  # ... by constant
            ("select * from users", None),                                # fan-out
            (f"select * from users where user_id = {TENANT} or true", None),
            (f"/* pgfleet: shard_key={TENANT + 1} */ select * from users where user_id = {TENANT}", None),
            ("set pgfleet.database = 'secondary'", None),
            ("select * from events", None),                               # another database
            (f"update currencies set name = 'x' where code = 'EUR' and {TENANT} = {TENANT}", None),
        ]
        for sql, params in ways_out:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql, params)
    for database in ("secondary", "analytics", "primary"):
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(sharded.dsn("pf_tenant", database))
        assert "42501" in str(err.value) or "may not connect" in str(err.value)


def test_a_write_that_would_move_a_row_is_refused(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("update users set user_id = 7 where user_id = 100")
        assert "move the row" in str(err.value)


def test_set_pgfleet_in_the_extended_protocol_is_refused_not_ignored(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("set pgfleet.shard_key = '3'", prepare=True)
        assert "simple query protocol" in str(err.value)
        assert conn.execute("select current_database()").fetchone() == ("shard_a",)


# ---------------------------------------------------------------------------------------------
# whole-fleet writes: every shard, one answer, all or nothing


def counts(clusters: dict[str, tuple[Cluster, str]], sql: str) -> dict[str, int]:
    return {name: rows[0][0] for name, rows in rows_on(clusters, sql).items()}


def test_a_multi_row_insert_is_split_by_shard_and_counted_once(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    ids = list(range(300, 310))
    values = ", ".join(f"({i}, 'split')" for i in ids)
    out = sharded.psql(f"insert into users (user_id, name) values {values} on conflict do nothing")
    assert out.stdout.strip() == "INSERT 0 10"
    placed = rows_on(clusters, "select user_id from users where name = 'split'")
    for name in SHARDS:
        assert sorted(r[0] for r in placed[name]) == [i for i in ids if owner(i) == name]
    out = sharded.psql(f"insert into users (user_id, name) values {values} on conflict do nothing returning user_id")
    assert out.stdout.strip() == "INSERT 0 0"


def test_update_and_delete_without_a_key_run_on_every_shard_with_counts_summed(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    ids = list(range(400, 412))
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        for i in ids:
            conn.execute("insert into accounts (user_id, balance) values (%s, 10)", (i,))
        cur = conn.execute("update accounts set balance = balance + 1 where user_id between 400 and 411")
        assert cur.rowcount == len(ids)
        assert cur.statusmessage == f"UPDATE {len(ids)}"
        cur = conn.execute("update accounts set balance = 0 where user_id between 400 and 405 returning user_id")
        assert sorted(r[0] for r in cur.fetchall()) == ids[:6]
    assert sum(counts(clusters, "select count(*) from accounts where balance = 11").values()) == 6
    out = sharded.psql("delete from accounts where user_id between 400 and 411")
    assert out.stdout.strip() == f"DELETE {len(ids)}"
    assert counts(clusters, "select count(*) from accounts where user_id between 400 and 411") == \
        {name: 0 for name in SHARDS}


def test_ddl_and_reference_writes_run_on_every_shard(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    assert sharded.psql("create index if not exists users_name on users (name)").stdout.strip() == "CREATE INDEX"
    assert counts(clusters, "select count(*) from pg_indexes where indexname = 'users_name'") == \
        {name: 1 for name in SHARDS}
    assert sharded.psql("insert into currencies values ('JPY', 'Yen')").stdout.strip() == "INSERT 0 1"
    assert counts(clusters, "select count(*) from currencies where code = 'JPY'") == {name: 1 for name in SHARDS}
    assert sharded.psql("update currencies set name = 'Japanese yen' where code = 'JPY'").stdout.strip() == \
        "UPDATE 1"  # one row of one table, however many copies the fleet keeps
    assert sharded.psql("delete from currencies where code = 'JPY'").stdout.strip() == "DELETE 1"


def test_a_failure_on_one_shard_rolls_back_every_shard(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    taken = next(i for i in range(100, 140) if owner(i) == "secondary")  # exists already
    fresh = next(i for i in range(500, 600) if owner(i) == "primary")
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):  # the backend's own error, as it sent it
            conn.execute(f"insert into users (user_id, name) values ({fresh}, 'new'), ({taken}, 'dup')")
        assert conn.execute("select 1").fetchone() == (1,)
    assert counts(clusters, f"select count(*) from users where user_id = {fresh}") == {name: 0 for name in SHARDS}


def test_whole_fleet_writes_are_refused_inside_a_transaction(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn()) as conn:
        conn.execute("select * from users where user_id = 100")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("update accounts set balance = 0")
        assert "transaction block" in str(err.value)
        conn.rollback()


def test_fan_out_reads_are_refused_naming_their_shape(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("select name, count(*) from users group by name order by 2 desc limit 3")
        assert "SELECT count(*) with GROUP BY, ORDER BY, LIMIT" in str(err.value)
