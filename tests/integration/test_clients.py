"""Real clients through pgfleet to real PostgreSQL: psql, psycopg 3, asyncpg and pgbench.

Each test uses the driver the way an application does, unchanged, against the standard
three-database fleet (primary=bank, secondary, analytics; events and user_activity mapped to
analytics). Tables a test creates have a unique name and are dropped at its end.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster

from .conftest import KEYS, Fleet, fleet_config

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def table(pg: Cluster) -> Iterator[str]:
    """A fresh table ``name (id int primary key, label text)`` in bank (the default database)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int primary key, label text)")
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
            conn.execute(f"drop table if exists {name}")


def direct_rows(pg: Cluster, dbname: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(pg.dsn(dbname)) as conn:
        return conn.execute(sql).fetchall()


# ---------------------------------------------------------------------------------------------
# psql


def test_psql_multi_statement_string(fleet: Fleet) -> None:
    result = fleet.psql("select 1; select 'two'; select current_database()")
    assert result.stdout.splitlines() == ["1", "two", "bank"]


def test_psql_multi_statement_string_is_one_implicit_transaction(fleet: Fleet, table: str) -> None:
    result = fleet.psql(f"insert into {table} values (1, 'a'); insert into {table} values (1, 'dup')",
                        "pf_server", "app", "-v", "VERBOSITY=verbose", check=False)
    assert result.returncode != 0
    assert "23505" in result.stderr
    assert fleet.psql(f"select count(*) from {table}").stdout.strip() == "0"


def test_psql_describe_table(fleet: Fleet) -> None:
    result = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", fleet.dsn(), "-c", r"\d users"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert 'Table "public.users"' in result.stdout
    for column in ("id", "email", "name", "created_at", "updated_at"):
        assert re.search(rf"^\s*{column}\s*\|", result.stdout, re.MULTILINE), column
    assert "users_pkey" in result.stdout


def test_psql_list_tables(fleet: Fleet) -> None:
    result = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", fleet.dsn(), "-c", r"\dt"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    names = {line.split("|")[1] for line in result.stdout.splitlines()}
    assert {"users", "accounts", "transactions", "currencies"} <= names
    # catalog queries go to the default database, so analytics' tables are not listed
    assert "events" not in names


def test_psql_list_tables_on_a_direct_database(fleet: Fleet) -> None:
    result = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", fleet.dsn(database="analytics"),
                             "-c", r"\dt"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    names = {line.split("|")[1] for line in result.stdout.splitlines()}
    assert {"events", "user_activity"} <= names
    assert "users" not in names


@pytest.mark.parametrize("sql,sqlstate,text", [
    ("select * from no_such_table", "42P01", 'relation "no_such_table" does not exist'),
    ("select 1/0", "22012", "division by zero"),
    ("selec 1", "42601", 'syntax error at or near "selec"'),
    ("select no_such_column from users", "42703", 'column "no_such_column" does not exist'),
])
def test_psql_errors_show_the_backend_sqlstate(fleet: Fleet, sql: str, sqlstate: str, text: str) -> None:
    result = fleet.psql(sql, "pf_server", "app", "-v", "VERBOSITY=verbose", check=False)
    assert result.returncode != 0
    assert f"ERROR:  {sqlstate}: {text}" in result.stderr


def test_psql_session_goes_on_after_an_error(fleet: Fleet) -> None:
    result = subprocess.run(["psql", "-X", "-At", fleet.dsn()], input="select 1/0;\nselect 42;\n",
                            capture_output=True, text=True, timeout=60, check=False)
    assert "division by zero" in result.stderr
    assert result.stdout.strip() == "42"


def test_psql_copy_from_and_to_a_table_on_the_default_database(
        fleet: Fleet, pg: Cluster, table: str, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},label {i}\n" for i in range(1, 501)))
    result = fleet.psql(rf"\copy {table} from '{source}' csv")
    assert result.stdout.strip() == "COPY 500"
    assert direct_rows(pg, "bank", f"select count(*), sum(id) from {table}") == [(500, 125250)]
    target = tmp_path / "out.csv"
    result = fleet.psql(rf"\copy (select * from {table} order by id) to '{target}' csv")
    assert result.stdout.strip() == "COPY 500"
    assert target.read_text() == source.read_text()
    # and the session is usable after COPY
    assert fleet.psql(f"select count(*) from {table}").stdout.strip() == "500"


def test_psql_copy_error_reports_sqlstate_and_loads_nothing(fleet: Fleet, pg: Cluster, table: str,
                                                           tmp_path: Path) -> None:
    source = tmp_path / "bad.csv"
    source.write_text("1,ok\n2,ok\nnot-a-number,bad\n")
    result = fleet.psql(rf"\copy {table} from '{source}' csv", "pf_server", "app", "-v", "VERBOSITY=verbose",
                        check=False)
    assert result.returncode != 0
    assert "22P02" in result.stderr
    assert direct_rows(pg, "bank", f"select count(*) from {table}") == [(0,)]


def test_psql_copy_to_stdout_from_a_mapped_table(fleet: Fleet, pg: Cluster) -> None:
    result = fleet.psql("copy (select id, kind from events order by id limit 3) to stdout with csv")
    expected = direct_rows(pg, "analytics", "select id, kind from events order by id limit 3")
    assert result.stdout.splitlines() == [f"{i},{k}" for i, k in expected]


def test_psql_direct_database_analytics(fleet: Fleet) -> None:
    assert fleet.psql("select current_database(), current_user", database="analytics").stdout.strip() == \
        "analytics|pf_trust"
    # on a direct database the table map does not matter: users is not there
    result = fleet.psql("select count(*) from users", "pf_server", "analytics", "-v", "VERBOSITY=verbose",
                        check=False)
    assert "42P01" in result.stderr


def test_table_mapped_routing(fleet: Fleet, pg: Cluster) -> None:
    expected = direct_rows(pg, "analytics", "select count(*) from events")[0][0]
    out = fleet.psql("select current_database(), count(*) from events").stdout.strip()
    assert out == f"analytics|{expected}"
    out = fleet.psql("select current_database(), count(*) from user_activity").stdout.strip()
    assert out.startswith("analytics|")
    users = direct_rows(pg, "bank", "select count(*) from users")[0][0]
    assert fleet.psql("select current_database(), count(*) from users").stdout.strip() == f"bank|{users}"


def test_psql_two_database_statement_is_refused_with_0A000(fleet: Fleet) -> None:
    result = fleet.psql("select * from users join events on events.user_id = users.id", "pf_server", "app",
                        "-v", "VERBOSITY=verbose", check=False)
    assert result.returncode != 0
    assert "ERROR:  0A000:" in result.stderr
    assert "events" in result.stderr and "users" in result.stderr


# ---------------------------------------------------------------------------------------------
# psycopg 3


def test_psycopg_parameters_of_many_types(fleet: Fleet) -> None:
    import datetime
    import decimal

    with psycopg.connect(fleet.dsn()) as conn:
        row = conn.execute(
            "select %s::int, %s::text, %s::numeric, %s::date, %s::bool, %s::text is null, %s::jsonb",
            (7, "é ' \" \\", decimal.Decimal("12.34"), datetime.date(2025, 3, 1), True, None,
             psycopg.types.json.Jsonb({"a": [1, 2]}))).fetchone()
    assert row == (7, "é ' \" \\", decimal.Decimal("12.34"), datetime.date(2025, 3, 1), True, True, {"a": [1, 2]})


def test_psycopg_select_from_default_and_mapped_tables(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        assert conn.execute("select email from users where id = %s", (42,)).fetchone() == \
            ("user42@vaelix.example",)
        assert conn.execute("select current_database() from events where user_id = %s limit 1",
                            (8,)).fetchone() == ("analytics",)


def test_psycopg_prepare_true_across_transactions(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        for i in range(1, 21):
            row = conn.execute("select id, email from users where id = %s", (i,), prepare=True).fetchone()
            assert row == (i, f"user{i}@vaelix.example")


def test_psycopg_prepare_threshold_zero_prepares_everything(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn(), prepare_threshold=0) as conn:
        for i in range(1, 11):
            with conn.transaction():
                assert conn.execute("select %s::int * 2", (i,)).fetchone() == (i * 2,)
                assert conn.execute("select count(*) from accounts where user_id = %s", (i,)).fetchone()[0] >= 1
    # mapped tables use their own backends; the statement is prepared there too
    with psycopg.connect(fleet.dsn(), prepare_threshold=0, autocommit=True) as conn:
        for i in range(1, 6):
            assert conn.execute("select current_database() from events where id = %s", (i,)).fetchone() == \
                ("analytics",)


def test_psycopg_transaction_goes_to_the_database_of_its_first_statement(fleet: Fleet) -> None:
    """psycopg sends BEGIN on its own; the database is chosen by the first routed statement."""
    with psycopg.connect(fleet.dsn()) as conn:  # autocommit off: BEGIN, then the statement
        assert conn.execute("select current_database(), count(*) > 0 from events").fetchone() == \
            ("analytics", True)
        assert conn.execute("select count(*) > 0 from user_activity").fetchone() == (True,)
        conn.commit()
        assert conn.execute("select current_database() from users limit 1").fetchone() == ("bank",)
        with pytest.raises(pgerrors.FeatureNotSupported):  # a second database in one transaction
            conn.execute("select count(*) from events")
        conn.rollback()


def test_psycopg_two_connections_share_statement_text_on_a_small_pool(fleet: Fleet) -> None:
    """Prepared statements of the same text from several clients, each re-prepared where it lands."""
    conns = [psycopg.connect(fleet.dsn(), prepare_threshold=0, autocommit=True) for _ in range(3)]
    try:
        for i in range(30):
            conn = conns[i % 3]
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
    finally:
        for conn in conns:
            conn.close()


def test_psycopg_executemany(fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(fleet.dsn()) as conn:
        with conn.cursor() as cur:
            cur.executemany(f"insert into {table} (id, label) values (%s, %s)",
                            [(i, f"row {i}") for i in range(100)])
        conn.commit()
        with conn.cursor() as cur:
            cur.executemany(f"update {table} set label = %s where id = %s",
                            [(f"upd {i}", i) for i in range(0, 100, 2)], returning=False)
        conn.commit()
    assert direct_rows(pg, "bank", f"select count(*), count(*) filter (where label like 'upd%%') from {table}") \
        == [(100, 50)]


def test_psycopg_executemany_returning(fleet: Fleet, table: str) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(f"insert into {table} values (%s, %s) returning id * 10", [(1, "a"), (2, "b"), (3, "c")],
                        returning=True)
        got = []
        while True:
            got.append(cur.fetchone()[0])  # type: ignore[index]
            if not cur.nextset():
                break
        assert got == [10, 20, 30]


def test_psycopg_transaction_rollback(fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(fleet.dsn()) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute(f"insert into {table} values (1, 'gone')")
            assert conn.execute(f"select count(*) from {table}").fetchone() == (1,)
            raise RuntimeError("roll back")
        with conn.transaction():
            conn.execute(f"insert into {table} values (2, 'kept')")
    assert direct_rows(pg, "bank", f"select id, label from {table}") == [(2, "kept")]


def test_psycopg_savepoints(fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(fleet.dsn()) as conn, conn.transaction():
        conn.execute(f"insert into {table} values (1, 'outer')")
        with pytest.raises(pgerrors.UniqueViolation), conn.transaction():
            conn.execute(f"insert into {table} values (1, 'dup')")
        conn.execute(f"insert into {table} values (2, 'after')")
    assert direct_rows(pg, "bank", f"select id from {table} order by id") == [(1,), (2,)]


def test_psycopg_server_errors_carry_the_backend_sqlstate(fleet: Fleet, table: str) -> None:
    with psycopg.connect(fleet.dsn()) as conn:
        with pytest.raises(pgerrors.UniqueViolation) as err:
            conn.execute("insert into users (id, email) values (1, 'dup@example')")
        assert err.value.sqlstate == "23505"
        assert err.value.diag.constraint_name == "users_pkey"
        conn.rollback()
        with pytest.raises(pgerrors.UndefinedTable) as err2:
            conn.execute("select * from no_such_table_here")
        assert err2.value.sqlstate == "42P01"
        conn.rollback()
        # an error inside a transaction puts it in the failed state, as PostgreSQL does
        conn.execute(f"insert into {table} values (1, 'x')")
        with pytest.raises(pgerrors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(pgerrors.InFailedSqlTransaction) as err3:
            conn.execute("select 1")
        assert err3.value.sqlstate == "25P02"
        conn.rollback()
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)


def test_psycopg_pipeline_mode(fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            cursors = [conn.execute(f"insert into {table} values (%s, %s) returning id", (i, f"p{i}"))
                       for i in range(20)]
            sel = conn.execute(f"select count(*) from {table}")
            mapped = conn.execute("select count(*) > 0 from users where id = %s", (1,))
        assert [c.fetchone()[0] for c in cursors] == list(range(20))  # type: ignore[index]
        assert sel.fetchone() == (20,)
        assert mapped.fetchone() == (True,)
    assert direct_rows(pg, "bank", f"select count(*) from {table}") == [(20,)]


def test_psycopg_pipeline_error_aborts_the_rest_of_the_batch(fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(fleet.dsn()) as conn:
        with pytest.raises(pgerrors.UniqueViolation), conn.pipeline():
            conn.execute(f"insert into {table} values (1, 'a')")
            conn.execute(f"insert into {table} values (1, 'dup')")
            conn.execute(f"insert into {table} values (2, 'b')")
        conn.rollback()
        assert conn.execute("select 41 + 1").fetchone() == (42,)
    assert direct_rows(pg, "bank", f"select count(*) from {table}") == [(0,)]


def test_psycopg_server_side_cursor(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn()) as conn:
        with conn.cursor(name="c1") as cur:
            cur.itersize = 7
            cur.execute("select id from transactions order by id")
            ids = [row[0] for row in cur]
        conn.commit()
    assert ids == list(range(1, 201))


def test_psycopg_binary_results_and_large_rows(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn()) as conn, conn.cursor(binary=True) as cur:
        cur.execute("select repeat('x', 300000), g from generate_series(1, 50) g")
        rows = cur.fetchall()
    assert len(rows) == 50 and all(len(r[0]) == 300000 for r in rows)


# ---------------------------------------------------------------------------------------------
# asyncpg


async def test_asyncpg_fetch(fleet: Fleet) -> None:
    conn = await asyncpg.connect(fleet.dsn())
    try:
        rows = await conn.fetch("select id, email from users where id <= $1 order by id", 3)
        assert [tuple(r) for r in rows] == [(i, f"user{i}@vaelix.example") for i in (1, 2, 3)]
        assert await conn.fetchval("select current_database() from events limit 1") == "analytics"
        assert await conn.fetchval("select $1::text || $2::text", "a", "b") == "ab"
    finally:
        await conn.close()


async def test_asyncpg_transaction_on_a_mapped_table(fleet: Fleet) -> None:
    conn = await asyncpg.connect(fleet.dsn())
    try:
        async with conn.transaction():  # BEGIN is sent on its own, before the statement
            assert await conn.fetchval("select current_database() from events limit 1") == "analytics"
    finally:
        await conn.close()


async def test_asyncpg_prepare_and_executemany(fleet: Fleet, pg: Cluster, table: str) -> None:
    conn = await asyncpg.connect(fleet.dsn())
    try:
        await conn.executemany(f"insert into {table} values ($1, $2)", [(i, f"r{i}") for i in range(50)])
        stmt = await conn.prepare(f"select label from {table} where id = $1")
        for i in range(50):
            assert await stmt.fetchval(i) == f"r{i}"
        assert [a.name for a in stmt.get_attributes()] == ["label"]
    finally:
        await conn.close()
    assert direct_rows(pg, "bank", f"select count(*) from {table}") == [(50,)]


async def test_asyncpg_transaction(fleet: Fleet, pg: Cluster, table: str) -> None:
    conn = await asyncpg.connect(fleet.dsn())
    try:
        async with conn.transaction():
            await conn.execute(f"insert into {table} values (1, 'kept')")
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute(f"insert into {table} values (2, 'gone')")
                raise RuntimeError("roll back")
        assert await conn.fetchval(f"select count(*) from {table}") == 1
    finally:
        await conn.close()
    assert direct_rows(pg, "bank", f"select id from {table}") == [(1,)]


async def test_asyncpg_error_sqlstate(fleet: Fleet) -> None:
    conn = await asyncpg.connect(fleet.dsn())
    try:
        with pytest.raises(asyncpg.UniqueViolationError) as err:
            await conn.execute("insert into users (id) values (1)")
        assert err.value.sqlstate == "23505"
        with pytest.raises(asyncpg.UndefinedTableError) as err2:
            await conn.fetch("select * from no_such_table_x")
        assert err2.value.sqlstate == "42P01"
        with pytest.raises(asyncpg.DataError):
            await conn.fetchval("select $1::int", "not an int")
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_asyncpg_twenty_connections_with_prepared_statements(fleet: Fleet) -> None:
    """20 clients on a pool of 10 backends: statements are re-prepared on whichever backend serves."""
    pool_size = fleet.config["pool"]["size"]
    assert pool_size == 10

    async def client(n: int) -> set[int]:
        conn = await asyncpg.connect(fleet.dsn())
        pids: set[int] = set()
        try:
            stmt = await conn.prepare("select $1::int * 2, pg_backend_pid()")
            other = await conn.prepare("select email from users where id = $1")
            for i in range(25):
                doubled, pid = await stmt.fetchrow(n * 1000 + i)
                assert doubled == 2 * (n * 1000 + i)
                pids.add(pid)
                assert await other.fetchval(i % 50 + 1) == f"user{i % 50 + 1}@vaelix.example"
                async with conn.transaction():
                    assert await conn.fetchval("select $1::text", f"c{n}") == f"c{n}"
                    await asyncio.sleep(0)
        finally:
            await conn.close()
        return pids

    results = await asyncio.gather(*(client(n) for n in range(20)))
    every = set().union(*results)
    assert 1 < len(every) <= pool_size
    assert any(len(p) > 1 for p in results), "no client moved between backends: nothing was re-prepared"


# ---------------------------------------------------------------------------------------------
# pgbench


@pytest.fixture(scope="module")
def bench(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A fleet with pool size 20 and a patient acquire timeout, with pgbench tables in bank."""
    proc = Fleet(fleet_config(pg, pool={"size": 20, "acquire_timeout": "30s"}),
                 tmp_path_factory.mktemp("bench")).start()
    try:
        result = pgbench(proc, "-i", "-s", "1", "-q")
        assert result.returncode == 0, result.stderr
        yield proc
        pgbench(proc, "-i", "-I", "d")
    finally:
        proc.stop()


def pgbench(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD="server-secret")
    return subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(fleet.port), "-U", "pf_server", *args, "app"],
                          capture_output=True, text=True, env=env, timeout=100, check=False)


def test_pgbench_init_created_the_tables_in_the_default_database(bench: Fleet, pg: Cluster) -> None:
    assert direct_rows(pg, "bank", "select count(*) from pgbench_accounts") == [(100000,)]
    assert direct_rows(pg, "bank", "select count(*) from pgbench_branches") == [(1,)]


@pytest.mark.parametrize("script", ["-S", "tpcb"])
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(bench: Fleet, script: str, mode: str) -> None:
    args = ["-n", "-M", mode, "-c", "50", "-j", "2", "-T", "3"]
    if script != "tpcb":
        args.append(script)
    result = pgbench(bench, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "number of failed transactions: 0" in result.stdout, result.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    assert processed and int(processed.group(1)) > 50, result.stdout
    assert "ERROR" not in result.stderr.upper().replace("ERRORS", ""), result.stderr[-2000:]


def test_asyncpg_recovers_when_a_cached_plan_must_change_its_result_type(make_fleet: Any, pg: Cluster) -> None:
    """After DDL changes a prepared SELECT's columns PostgreSQL refuses the old plan ("cached
    plan must not change result type"); asyncpg prepares the statement again, and pgfleet must
    prepare its shared name again too (issue 17, asyncpg's suite)."""
    fleet: Fleet = make_fleet(databases={"primary": {"dsn": pg.dsn("bank")}})

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(host="127.0.0.1", port=fleet.port, user="pf_server",
                                     password=KEYS["pf_server"][0], database="primary")
        try:
            await conn.execute("create table pf_plan (a int)")
            await conn.execute("insert into pf_plan values (1)")
            assert [tuple(r) for r in await conn.fetch("select * from pf_plan")] == [(1,)]
            await conn.execute("alter table pf_plan add column b int")
            return [tuple(r) for r in await conn.fetch("select * from pf_plan")]
        finally:
            await conn.execute("drop table if exists pf_plan")
            await conn.close()

    assert asyncio.run(run()) == [(1, None)]
