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
        for sql in (f"select * from users where user_id in ({one}, {two}) union select * from users",
                    "select stddev(user_id) from users"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                conn.execute(sql)
            assert "more than once" in str(err.value) or "cannot merge it exactly" in str(err.value)
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
        assert conn.execute("select count(*) from users").fetchone() == (sum(counts.values()),)  # every shard
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


def test_fan_out_reads_are_merged_as_one_database_answers(sharded: Fleet,
                                                          clusters: dict[str, tuple[Cluster, str]]) -> None:
    everything = sorted(r for rows in rows_on(clusters, "select user_id, name from users").values() for r in rows)
    assert {owner(r[0]) for r in everything} == set(SHARDS), "the test needs users on both shards"
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        assert sorted(conn.execute("select user_id, name from users").fetchall()) == everything
        assert conn.execute("select user_id, name from users order by name desc, user_id limit 3 offset 1"
                            ).fetchall() == sorted(everything, key=lambda r: (r[1], -r[0]), reverse=True)[1:4]
        assert conn.execute("select count(*), min(user_id), max(user_id) from users").fetchone() == \
            (len(everything), everything[0][0], everything[-1][0])
        names: dict[str, int] = {}
        for _, name in everything:
            names[name] = names.get(name, 0) + 1
        top = sorted(names.items(), key=lambda item: (-item[1], item[0]))[:3]
        assert conn.execute("select name, count(*) from users group by name order by 2 desc, 1 limit 3"
                            ).fetchall() == top
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("select name, row_number() over (order by user_id) from users")
        assert "window functions" in str(err.value)


# ---------------------------------------------------------------------------------------------
# whole-fleet writes in the extended protocol (Parse/Bind/Execute, as drivers send them)


def test_extended_update_and_delete_without_a_key_run_on_every_shard(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    ids = list(range(700, 712))
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        for i in ids:
            conn.execute("insert into accounts (user_id, balance) values (%s, 10)", (i,))
        cur = conn.execute("update accounts set balance = balance + %s where user_id between %s and %s",
                           (5, 700, 711))
        assert (cur.rowcount, cur.statusmessage) == (len(ids), f"UPDATE {len(ids)}")
        assert cur.description is None  # NoData: the client's Describe of the portal is answered
        cur = conn.execute("update accounts set balance = %s where user_id between %s and %s returning user_id, "
                           "balance", (1, 700, 705))
        assert [d.name for d in cur.description or ()] == ["user_id", "balance"]
        assert sorted(cur.fetchall()) == [(i, 1) for i in ids[:6]]
        assert conn.execute("select 1").fetchone() == (1,)  # the next statement uses one backend again
    assert sum(counts(clusters, "select count(*) from accounts where user_id between 706 and 711 "
                                "and balance = 15").values()) == 6
    placed = rows_on(clusters, "select user_id from accounts where user_id between 700 and 711")
    assert all(placed[name] for name in SHARDS), "the test needs rows on both shards"

    async def run() -> tuple[str, list[int], list[str]]:
        conn = await asyncpg.connect(sharded.dsn())
        try:
            status = await conn.execute("update accounts set balance = $1 where user_id between $2 and $3",
                                        7, 700, 711)
            stmt = await conn.prepare("delete from accounts where user_id between $1 and $2 returning user_id")
            deleted = [r["user_id"] for r in await stmt.fetch(700, 705)]
            deleted += [r["user_id"] for r in await stmt.fetch(706, 711)]  # the same statement again
            return status, sorted(deleted), [await conn.fetchval("select 'still here'")]
        finally:
            await conn.close()

    import asyncio
    assert asyncio.run(run()) == (f"UPDATE {len(ids)}", ids, ["still here"])
    assert counts(clusters, "select count(*) from accounts where user_id between 700 and 711") == \
        {name: 0 for name in SHARDS}


def test_extended_reference_writes_and_ddl_reach_every_shard_once_counted(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        cur = conn.execute("insert into currencies (code, name) values (%s, %s)", ("CHF", "Swiss franc"))
        assert cur.rowcount == 1
        cur = conn.execute("update currencies set name = %s where code = %s returning code", ("Franc", "CHF"))
        assert cur.fetchall() == [("CHF",)]  # one copy's rows, not one per shard
    assert rows_on(clusters, "select name from currencies where code = 'CHF'") == \
        {name: [("Franc",)] for name in SHARDS}

    async def run() -> str:
        conn = await asyncpg.connect(sharded.dsn())
        try:
            return await conn.execute("delete from currencies where code = $1", "CHF")
        finally:
            await conn.close()

    import asyncio
    assert asyncio.run(run()) == "DELETE 1"
    assert counts(clusters, "select count(*) from currencies where code = 'CHF'") == {name: 0 for name in SHARDS}


def test_extended_write_failing_on_one_shard_changes_no_shard(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    with direct(clusters, "secondary") as conn:
        conn.execute("insert into currencies values ('XAU', 'gold') on conflict do nothing")
    try:
        with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("insert into currencies (code, name) values (%s, %s)", ("XAU", "Gold"))
            assert conn.execute("select %s::int", (3,)).fetchone() == (3,)  # skipped to Sync, then on
        assert counts(clusters, "select count(*) from currencies where code = 'XAU'") == \
            {"primary": 0, "secondary": 1}
    finally:
        with direct(clusters, "secondary") as conn:
            conn.execute("delete from currencies where code = 'XAU'")


def test_extended_whole_fleet_writes_outside_transactions_and_multi_row_inserts(sharded: Fleet) -> None:
    one = next(i for i in range(800, 900) if owner(i) == "primary")
    two = next(i for i in range(800, 900) if owner(i) == "secondary")
    with psycopg.connect(sharded.dsn()) as conn:
        conn.execute("select * from users where user_id = %s", (100,))
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("update accounts set balance = %s", (0,))
        assert "transaction block" in str(err.value)
        conn.rollback()
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:  # rows on two shards, parameters split
        got = conn.execute("insert into users (user_id, name) values (%s, 'a'), (%s, 'b') returning user_id",
                           (two, one)).fetchall()
        assert got == [(two,), (one,)]
        assert conn.execute("select count(*) from users where user_id in (%s, %s)", (one, two)).fetchone() == (2,)
        conn.execute("delete from users where user_id in (%s, %s)", (one, two))


def test_extended_portal_for_every_shard_raw_protocol(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    """What no driver above sends: Describe without Execute, a row limit, a pipeline that mixes."""
    from proxy.wire import messages as m

    from .rawclient import Raw, errors
    update = "update accounts set balance = balance + 1 where user_id >= 950 returning id"  # every shard
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        conn.execute("insert into accounts (user_id, balance) values (%s, 0)", (950,))
    with Raw(sharded.port) as raw:
        raw.login("pf_server", KEYS["pf_server"][0])
        m_parse = m.parse("", update)
        bind = m.bind("", "", b"\0\0\0\0\0\0")
        # Describe of the portal, then Sync without Execute: its RowDescription, nothing run.
        raw.send(m_parse + bind + m.describe(0x50, "") + m.SYNC_MSG)
        got = raw.until("Z")
        assert [x.kind for x in got] == ["1", "2", "T", "Z"]
        assert counts(clusters, "select count(*) from accounts where user_id >= 950 and balance = 0")[owner(950)] == 1
        # Execute with a row limit is refused before anything runs; the session goes on.
        raw.send(m_parse + bind + m.execute("", 5) + m.SYNC_MSG)
        got = raw.until("Z")
        assert [x.kind for x in got] == ["1", "2", "E", "Z"] and errors(got)[0]["C"] == "0A000"
        # A pipeline that would use one database's backend while the portal is open.
        raw.send(m_parse + bind + m.parse("", "select 1") + m.SYNC_MSG)
        got = raw.until("Z")
        assert errors(got)[0]["C"] == "0A000" and got[-1].kind == "Z"
        # Execute then Sync: the whole answer, once.
        raw.send(m_parse + bind + m.describe(0x50, "") + m.execute("") + m.SYNC_MSG)
        got = raw.until("Z")
        assert [x.kind for x in got] == ["1", "2", "T", "D", "C", "Z"]
        assert got[4].body == b"UPDATE 1\0"
        assert [x.kind for x in raw.query("select 1")] == ["T", "D", "C", "Z"]
    assert rows_on(clusters, "select balance from accounts where user_id >= 950")[owner(950)] == [(1,)]


def test_fan_out_reads_in_the_extended_protocol(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    values = ", ".join(f"({i}, 'x{i % 4}')" for i in range(1000, 1020))
    sharded.psql(f"insert into users (user_id, name) values {values} on conflict do nothing")
    everything = sorted(r for rows in rows_on(clusters, "select user_id, name from users").values() for r in rows)
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        cur = conn.execute("select user_id, name from users where user_id > %s order by user_id desc limit %s",
                           (0, 5))  # LIMIT as a parameter: refused until planned per Bind
        assert cur.fetchall() == sorted(everything, reverse=True)[:5]
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        cur = conn.execute("select count(*), avg(user_id) from users where user_id >= %s", (0,))
        with direct(clusters, "secondary") as one:  # one database's own avg of the same values
            expected = one.execute("select avg(v) from unnest(%s::bigint[]) v", ([r[0] for r in everything],))
            assert cur.fetchone() == (len(everything), expected.fetchone()[0])  # type: ignore[index]

    async def run() -> tuple[list[Any], list[Any]]:
        conn = await asyncpg.connect(sharded.dsn())
        try:
            rows = await conn.fetch("select user_id, name from users where name <> $1 order by name, user_id", "")
            agg = await conn.fetch("select name, count(*), max(user_id) from users group by name order by 1")
            return [tuple(r) for r in rows], [tuple(r) for r in agg]
        finally:
            await conn.close()

    import asyncio
    rows, agg = asyncio.run(run())
    assert rows == sorted(everything, key=lambda r: (r[1], r[0]))
    names: dict[str, list[int]] = {}
    for user_id, name in everything:
        names.setdefault(name, []).append(user_id)
    assert agg == [(name, len(ids), max(ids)) for name, ids in sorted(names.items())]
    sharded.psql("delete from users where user_id between 1000 and 1019")


def test_fan_out_portal_with_a_row_limit_raw_protocol(sharded: Fleet) -> None:
    """Execute with max rows on a merged portal: PortalSuspended until the last rows, as PostgreSQL."""
    from proxy.wire import messages as m

    from .rawclient import Raw, rows
    values = ", ".join(f"({i}, 'r{i}')" for i in range(2000, 2007))
    sharded.psql(f"insert into users (user_id, name) values {values} on conflict do nothing")
    with Raw(sharded.port) as raw:
        raw.login("pf_server", KEYS["pf_server"][0])
        parse = m.parse("", "select user_id from users where user_id >= 2000 order by user_id desc")
        bind = m.bind("", "", b"\0\0\0\0\0\0")
        raw.send(parse + bind + m.describe(0x50, "") + m.execute("", 3) + m.execute("", 3) + m.execute("", 3)
                 + m.SYNC_MSG)
        got = raw.until("Z")
        assert [x.kind for x in got] == ["1", "2", "T", "D", "D", "D", "s", "D", "D", "D", "s", "D", "C", "Z"]
        assert [int(r[0]) for r in rows(got)] == list(range(2006, 1999, -1))
        assert got[-2].body == b"SELECT 1\0"
        raw.send(m.execute("", 0) + m.SYNC_MSG)  # the portal ended with the implicit transaction
        got = raw.until("Z")
        assert got[0].kind == "E" and got[0].fields["C"] == "34000"
    sharded.psql("delete from users where user_id between 2000 and 2006")


def test_fan_out_reads_in_a_transaction_that_has_not_reached_a_database(sharded: Fleet) -> None:
    with psycopg.connect(sharded.dsn()) as conn:  # not autocommit: psycopg sends BEGIN first
        total = conn.execute("select count(*) from users").fetchone()
        assert total is not None and conn.execute("select count(*) from users where user_id >= %s", (0,)
                                                  ).fetchone() == total
        conn.execute("select name from users where user_id = 100")  # now on one shard's backend
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("select count(*) from users")
        assert "transaction block" in str(err.value)
        conn.rollback()
    with psycopg.connect(sharded.dsn()) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(psycopg.errors.FeatureNotSupported):  # one snapshot across shards: not possible
            conn.execute("select count(*) from users")
        conn.rollback()


def test_a_fan_out_with_an_unreachable_shard_fails_whole_naming_it(refusing_port: int, make_fleet: Any,
                                                                    pg: Cluster) -> None:
    pg.create_database("lonely_a")
    pg.psql(SCHEMA, dbname="lonely_a")
    fleet: Fleet = make_fleet(
        databases={"primary": {"dsn": pg.dsn("lonely_a")},
                   "gone": {"dsn": f"postgresql://postgres@127.0.0.1:{refusing_port}/nowhere"}},
        default_database="primary",
        sharding={"shards": ["primary", "gone"], "tables": {"users": "user_id"}, "types": {"users": "bigint"}},
        pool={"size": 2, "connect_timeout": "2s", "acquire_timeout": "3s"})
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ConnectionFailure) as err:
            conn.execute("select count(*) from users")
        assert "gone" in str(err.value)
        on_primary = next(i for i in range(100, 140) if owner(i) == "primary")  # shard 0 of 2
        assert conn.execute("select count(*) from users where user_id = %s", (on_primary,)).fetchone() == (0,)


def test_fan_out_reads_in_an_asyncpg_transaction(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    """asyncpg describes every statement before it runs it; in a transaction that has not reached a
    database that Describe must not pin it to the first shard."""
    everything = sorted(r[0] for rows in rows_on(clusters, "select user_id from users").values() for r in rows)
    on_secondary = next(i for i in everything if owner(i) == "secondary")

    async def run() -> tuple[int, str | None]:
        conn = await asyncpg.connect(sharded.dsn())
        try:
            async with conn.transaction():
                total = await conn.fetchval("select count(*) from users where user_id >= $1", -1)
                name = await conn.fetchval("select name from users where user_id = $1", on_secondary)
            return total, name
        finally:
            await conn.close()

    import asyncio
    total, name = asyncio.run(run())
    assert total == len(everything) and name is not None


def test_a_slow_client_of_a_large_fan_out_gets_every_row_and_leaves_the_pool_healthy(sharded: Fleet) -> None:
    """Back-pressure: a client that stops reading pauses every shard; when it reads again it
    gets every row in order, and the backends go back to the pool reading (a backend paused
    by the client after its last answer used to be pooled deaf, hanging its next statement)."""
    import time

    from proxy.wire import messages as m

    from .rawclient import Raw
    values = ", ".join(f"({i}, 'slow {i}')" for i in range(7000, 9000))
    sharded.psql(f"insert into users (user_id, name) values {values} on conflict do nothing")
    try:
        for attempt in range(3):
            with Raw(sharded.port) as raw:
                raw.login("pf_server", KEYS["pf_server"][0])
                raw.send(m.query("select user_id, repeat(name, 500) as wide from users "
                                 "where user_id between 7000 and 8999 order by user_id"))
                time.sleep(0.5)  # pgfleet's buffer to the client fills: it pauses the shards
                data = bytearray()
                raw.sock.settimeout(10)
                while not data.endswith(m.ready_for_query(ord("I"))):
                    chunk = raw.sock.recv(16384)
                    assert chunk, "pgfleet closed the connection"
                    data += chunk
                    if len(data) < 2_000_000:
                        time.sleep(0.001)  # slowly at first: pause and resume many times
                answer = m.split(bytes(data))
                got = [m.row_values(body) for kind, body in answer if kind == m.DATA_ROW]
                assert [int(r[0]) for r in got] == list(range(7000, 9000)), attempt  # type: ignore[arg-type]
                assert all(r[1] == f"slow {int(r[0])}".encode() * 500 for r in got)  # type: ignore[arg-type]
                assert answer[-2] == (m.COMMAND_COMPLETE, b"SELECT 2000\0")
        # Every pooled backend of every shard still answers (more statements than the pool has).
        with Raw(sharded.port) as raw:
            raw.login("pf_server", KEYS["pf_server"][0])
            for _ in range(12):
                raw.send(m.query("select count(*) from users where user_id between 7000 and 8999"))
                got = raw.until("Z", timeout=5)
                assert [x.kind for x in got] == ["T", "D", "C", "Z"]
    finally:
        sharded.psql("delete from users where user_id between 7000 and 8999")


def test_a_failed_fan_out_fails_the_transaction_it_ran_in_as_one_database_would(sharded: Fleet) -> None:
    """A fan-out read inside BEGIN (before any statement reached a database) that fails on one
    shard leaves the client in a failed transaction: 25P02 until ROLLBACK; COMMIT answers ROLLBACK."""
    from proxy.wire import messages as m

    from .rawclient import Raw, errors
    victim = next(i for i in range(3000, 4000) if owner(i) == "secondary")
    sharded.psql(f"insert into users (user_id, name) values ({victim}, 'zero') on conflict do nothing")
    try:
        with psycopg.connect(sharded.dsn()) as conn:  # not autocommit: BEGIN first
            with pytest.raises(psycopg.errors.DivisionByZero) as failed:
                conn.execute(f"select 1 / (user_id - {victim}) from users")
            assert "(on shard secondary)" in str(failed.value)
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("select 1")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):  # the extended protocol too
                conn.execute("select %s::int", (1,))
            conn.rollback()
            assert conn.execute("select count(*) from users where user_id = %s", (victim,)).fetchone() == (1,)
        with Raw(sharded.port) as raw:
            raw.login("pf_server", KEYS["pf_server"][0])
            assert raw.query("begin")[-1].body == b"T"
            got = raw.query(f"select 1 / (user_id - {victim}) from users")
            assert errors(got)[0]["C"] == "22012" and got[-1].body == b"E"
            got = raw.query("select 2")
            assert errors(got)[0]["C"] == "25P02" and got[-1].body == b"E"
            got = raw.query("commit")
            assert [x.kind for x in got] == ["C", "Z"] and got[0].body == b"ROLLBACK\0" and got[-1].body == b"I"
            raw.send(m.query("select 3"))
            assert raw.until("Z")[-1].body == b"I"
    finally:
        sharded.psql(f"delete from users where user_id = {victim}")


@pytest.mark.parametrize("where", ["where user_id = 5", ""])  # one shard by key; every shard
def test_cancel_from_psycopg_stops_a_sleep_within_a_second(sharded: Fleet, where: str) -> None:
    import threading
    import time
    sharded.psql("insert into users (user_id, name) values (5, 'five') on conflict do nothing")
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute(f"select pg_sleep(30) from users {where}")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 1.3
        assert conn.execute("select 1").fetchone() == (1,)  # the session goes on


def test_copy_to_stdout_of_a_fan_out_streams_the_merged_rows(sharded: Fleet) -> None:
    values = ", ".join(f"({i}, 'out {i}')" for i in range(8000, 8010)) + ", (8010, E'tab\\there, \"q\"')"
    sharded.psql(f"insert into users (user_id, name) values {values} on conflict do nothing")
    try:
        with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
            cur = conn.cursor()
            with cur.copy("copy (select user_id, name from users where user_id >= 8000 order by user_id desc) "
                          "to stdout") as copy:
                text = b"".join(bytes(chunk) for chunk in copy)
            assert cur.rowcount == 11
            assert text.splitlines()[0] == b'8010\ttab\\there, "q"'
            assert text.splitlines()[1:] == [f"{i}\tout {i}".encode() for i in range(8009, 7999, -1)]
            with cur.copy("copy users (user_id, name) to stdout with (format csv, header)") as copy:
                lines = b"".join(bytes(chunk) for chunk in copy).splitlines()
            assert lines[0] == b"user_id,name"
            assert b'8010,"tab\there, ""q"""' in lines and b"8003,out 8003" in lines
            for statement in ("copy users to stdout (format binary)", "copy users to stdout (force_quote *)"):
                with pytest.raises(psycopg.errors.FeatureNotSupported), cur.copy(statement):
                    pass
            with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:  # extended protocol: refused
                conn.execute("copy users to stdout", prepare=True)
            assert "COPY of a table on several databases (primary, secondary) is not supported" in str(refused.value)
            assert conn.execute("select 1").fetchone() == (1,)
        out = sharded.psql("\\copy (select user_id from users where user_id between 8000 and 8004 order by 1) to stdout")
        assert out.stdout.split() == ["8000", "8001", "8002", "8003", "8004"]
    finally:
        sharded.psql("delete from users where user_id between 8000 and 8010")


def _copy_in(dsn: str, statement: str, data: bytes, chunk: int = 7) -> int:
    """COPY ``data`` in small, row-cutting chunks; the rowcount pgfleet answered."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy(statement) as copy:
            for i in range(0, len(data), chunk):
                copy.write(data[i:i + chunk])
        return cur.rowcount


@pytest.mark.parametrize(("statement", "data"), [
    ("copy users from stdin", b"".join(f"{i}\tname {i}\\twith tab\n".encode() for i in range(5000, 5040))),
    ("copy users (name, user_id) from stdin with (format csv)",
     b"".join(f'"name, {i}\n""quoted"" line",{i}\n'.encode() for i in range(5000, 5040))),
    ("copy users (user_id, name) from stdin with (format csv, header true, delimiter ';')",
     b"user_id;name\n" + b"".join(f"{i};n{i}\n".encode() for i in range(5000, 5039)) + b"5039;last without newline"),
])
def test_copy_into_a_sharded_table_splits_rows_by_shard_key(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]], statement: str, data: bytes) -> None:
    try:
        assert _copy_in(sharded.dsn(), statement, data) == 40
        found = rows_on(clusters, "select user_id, name from users where user_id between 5000 and 5039 order by 1")
        assert sum(len(rows) for rows in found.values()) == 40
        for shard, rows in found.items():
            assert rows and all(owner(user_id) == shard for user_id, _ in rows)
        with psycopg.connect(sharded.dsn(), autocommit=True) as conn:
            names = dict(conn.execute("select user_id, name from users where user_id between 5000 and 5039").fetchall())
        if "csv" not in statement:
            assert names[5001] == "name 5001\twith tab"
        elif "header" not in statement:
            assert names[5001] == 'name, 5001\n"quoted" line'
        else:
            assert names[5039] == "last without newline"
    finally:
        sharded.psql("delete from users where user_id between 5000 and 5039")


@pytest.mark.parametrize(("statement", "data", "sqlstate"), [
    ("copy users from stdin", b"6000\tok\n\\N\tno key\n", "23502"),                 # a NULL key
    ("copy users from stdin", b"6000\tok\nabc\tbad key\n", "22P02"),                # not a bigint
    ("copy users (name) from stdin", b"x\n", "0A000"),                             # no key column
    ("copy users from stdin", b"6000\tok\n6001\n", "22P04"),                        # a short row (pgfleet or the shard)
    ("copy users from stdin", b"6000\tok\n6000\tdup\n", "23505"),                   # a shard refuses a row
    ("copy users from stdin (format binary)", b"PGCOPY-not-binary-copy", "22P04"),   # not binary COPY data
])
def test_a_failed_copy_into_a_sharded_table_loads_nothing_on_any_shard(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]], statement: str, data: bytes, sqlstate: str) -> None:
    with pytest.raises(psycopg.Error) as failed:
        _copy_in(sharded.dsn(), statement, data)
    assert failed.value.sqlstate == sqlstate
    assert all(not rows for rows in rows_on(clusters, "select * from users where user_id between 6000 and 6001").values())
    with psycopg.connect(sharded.dsn(), autocommit=True) as conn:  # the session and the pools are fine
        assert conn.execute("select count(*) from users where user_id = 6000").fetchone() == (0,)


def test_psql_copy_into_a_sharded_table(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]],
                                         tmp_path: Any) -> None:
    source = tmp_path / "users.csv"
    source.write_text("".join(f"{i},psql {i}\n" for i in range(7000, 7100)))
    try:
        out = sharded.psql(f"\\copy users (user_id, name) from '{source}' with (format csv)")
        assert out.stdout.strip() == "COPY 100"
        assert sum(len(r) for r in rows_on(clusters, "select 1 from users where user_id between 7000 and 7099").values()) == 100
    finally:
        sharded.psql("delete from users where user_id between 7000 and 7099")


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_transactions_in_the_extended_protocol_go_to_the_shard_of_their_first_statement(
        sharded: Fleet, clusters: dict[str, tuple[Cluster, str]], tmp_path: Any, mode: str) -> None:
    """pgbench -M extended/prepared sends BEGIN and END as Parse/Bind/Execute: BEGIN waits for
    the first statement, which picks the shard, and END ends the transaction there."""
    from .test_clients import pgbench
    script = tmp_path / "tx.sql"
    script.write_text("\\set uid random(9000, 9019)\n"
                      "BEGIN;\n"
                      "INSERT INTO users (user_id, name) VALUES (:uid, 'pgbench') ON CONFLICT (user_id) DO UPDATE "
                      "SET name = users.name || '+';\n"
                      "SELECT name FROM users WHERE user_id = :uid;\n"
                      "END;\n")
    try:
        out = pgbench(sharded, "-n", "-M", mode, "-f", str(script), "-c", "2", "-t", "40")
        assert out.returncode == 0, out.stderr
        assert "number of failed transactions: 0" in out.stdout
        found = rows_on(clusters, "select user_id, length(name) from users where user_id between 9000 and 9019")
        assert all(owner(user_id) == shard for shard, rows in found.items() for user_id, _ in rows)
        # 80 transactions: each inserted its row or appended one "+" to it
        assert sum(1 + (size - len("pgbench")) for rows in found.values() for _, size in rows) == 80
    finally:
        sharded.psql("delete from users where user_id between 9000 and 9019")


def test_begin_and_commit_in_the_extended_protocol_raw(sharded: Fleet, clusters: dict[str, tuple[Cluster, str]]) -> None:
    from proxy.wire import messages as m

    from .rawclient import Raw
    uid = next(i for i in range(9100, 9200) if owner(i) == "secondary")

    def run(sql: str, name: str = "") -> list[Any]:
        raw.send(m.parse(name, sql) + m.bind("", name, b"\0\0\0\0\0\0") + m.describe(0x50, "") + m.execute("")
                 + m.SYNC_MSG)
        return raw.until("Z")

    try:
        with Raw(sharded.port) as raw:
            raw.login("pf_server", KEYS["pf_server"][0])
            got = run("begin")
            assert [x.kind for x in got] == ["1", "2", "n", "C", "Z"] and got[3].body == b"BEGIN\0"
            assert got[-1].body == b"T"
            got = run(f"insert into users (user_id, name) values ({uid}, 'raw')")
            assert got[-2].kind == "C" and got[-1].body == b"T"
            got = run("commit", "pf_commit")
            assert [x.kind for x in got] == ["1", "2", "n", "C", "Z"] and got[-1].body == b"I"
            assert rows_on(clusters, "select name from users where user_id = %s", uid)["secondary"] == [("raw",)]
            # BEGIN then COMMIT with nothing between: answered by pgfleet, no database touched
            assert run("begin")[-1].body == b"T"
            got = run("end")
            assert got[-2].body == b"COMMIT\0" and got[-1].body == b"I"
            # a failed fan-out in such a transaction: 25P02 until a ROLLBACK, in the extended protocol too
            victim = uid
            assert run("start transaction")[-1].body == b"T"
            got = run(f"select 1 / (user_id - {victim}) from users")
            assert any(x.kind == "E" for x in got) and got[-1].body == b"E"
            got = run("select 1")
            assert got[0].kind == "E" and got[0].fields["C"] == "25P02"
            got = run("rollback")
            assert got[-2].body == b"ROLLBACK\0" and got[-1].body == b"I"
    finally:
        sharded.psql(f"delete from users where user_id = {uid}")
