"""The demo fleet's data: the bank split over two shards as the hash shard function says.

``proxy.demo.load_fleet`` runs here against databases of the session's embedded cluster (one
per demo database, plus ``demo_seed``: the unsharded bank, as the reference). The placement is
checked twice: with ``shard_of`` and with the server's own ``PARTITION BY HASH``.
"""

from __future__ import annotations

import os
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


def test_the_config_file_describes_what_the_demo_writes(tmp_path: Path) -> None:
    clusters = {db.name: Cluster(db.name, tmp_path / db.name, port=db.port) for db in demo.DATABASES}
    keys = {key_id: f"{key_id}-secret" for key_id, _, _ in demo.KEYS}
    written = pgconfig.load_text(demo.render_config(clusters, keys, 6432))
    env = {**os.environ, **{f"PGFLEET_DEMO_{name}_SECRET": "x"
                            for name in ("ADMIN", "SERVER", "CLIENT", "TENANT")}}
    documented = pgconfig.load(ROOT / "config" / "demo.yaml", env)
    assert written.sharding == documented.sharding
    assert written.sharding.tables == demo.SHARDED_TABLES
    assert written.tables == documented.tables == demo.MAPPED_TABLES
    assert [(k.id, k.role, k.user_id) for k in written.keys] == \
        [(k.id, k.role, k.user_id) for k in documented.keys]


def test_the_examples_name_the_tenants_shard() -> None:
    lines = demo.example_lines()
    tenant_shard = demo.SHARDS[shard_of(demo.TENANT_USER_ID, "bigint", 2, "hash")]
    assert any("WHERE user_id = 42" in line and f"({tenant_shard})" in line
               for line in lines["pf_server"])
    assert any("pgfleet: shard=1" in line for line in lines["pf_server"])
    assert all("user_id = 42" in line and f"({tenant_shard})" in line for line in lines["pf_tenant42"])
