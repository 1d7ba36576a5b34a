"""Schema through pgfleet, from empty databases (issue 17, point 1): DDL on a configured
sharded table goes to every shard without its key's type; the type is read from the catalog
the first time a statement needs it, with a short negative cache; DDL through pgfleet makes it
read again; an error never advises what is already true.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster
from proxy.router.shard import shard_of

from .conftest import Fleet, sharded_on
from .conftest import rows_on as on


def test_a_sharded_schema_is_created_and_used_through_pgfleet(pg: Cluster, empty_shards: tuple[str, str],
                                                              make_fleet: Any) -> None:
    a, b = empty_shards
    fleet: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"users": "id", "notes": "user_id"}))
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:
        # Before the table exists: refused, and the message says why, once the catalog was read.
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            conn.execute("INSERT INTO users (id, name) VALUES (1, 'a')")
        assert "table users with column id does not exist on shard x0" in str(err.value)
        assert "create table users through pgfleet" in (err.value.diag.message_hint or "")
        conn.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        conn.execute("CREATE TABLE notes (user_id bigint NOT NULL, body text)")
        # At once after the DDL: the type is read again, not taken from the negative cache.
        for i in range(1, 41):
            conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (i, f"u{i}"))
            conn.execute("INSERT INTO notes (user_id, body) VALUES (%s, 'n')", (i,))
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (40,)
        # Without a column list: the key's position comes from the catalog.
        conn.execute("INSERT INTO users VALUES (41, 'v41'), (42, 'v42'), (43, 'v43'), (44, 'v44')")
        conn.execute("INSERT INTO users VALUES (%s, %s)", (45, "v45"))
        conn.execute("INSERT INTO notes VALUES (45, 'n'), (44, 'n'), (43, 'n'), (42, 'n'), (41, 'n')")
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (45,)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="give id a value in each VALUES row"):
            conn.execute("INSERT INTO users VALUES (DEFAULT, 'x')")
        conn.execute("ALTER TABLE users ADD COLUMN email text")
        conn.execute("UPDATE users SET email = 'e' WHERE id = 7")
        assert conn.execute("SELECT email FROM users WHERE id = 7").fetchone() == ("e",)
    for index, dbname in enumerate((a, b)):
        for (user_id,) in on(pg, dbname, "SELECT id FROM users"):
            assert shard_of(user_id, "bigint", 2, "hash") == index
        assert on(pg, dbname, "SELECT count(*) FROM users") == on(pg, dbname, "SELECT count(*) FROM notes")
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:
        conn.execute("DROP TABLE notes")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="does not exist on shard x0"):
            conn.execute("SELECT * FROM notes WHERE user_id = 1")
    assert "Traceback" not in fleet.log()


def test_a_shard_that_does_not_answer_is_named_in_the_refusal(pg: Cluster, empty_shards: tuple[str, str],
                                                              make_fleet: Any, refusing_port: int) -> None:
    a, _ = empty_shards
    fleet: Fleet = make_fleet(databases={"x0": {"dsn": f"postgresql://postgres:x@127.0.0.1:{refusing_port}/{a}"},
                                         "x1": {"dsn": pg.dsn(a)}},
                              default_database="x1", tables={},
                              sharding={"shards": ["x0", "x1"], "tables": {"users": "id"}})
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            conn.execute("SELECT * FROM users WHERE id = 1")
        assert "shard x0 did not answer pgfleet's catalog read" in str(err.value)


def test_serial_ids_interleave_across_shards_and_returning_keeps_the_clients_order(
        pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> None:
    a, b = empty_shards
    fleet: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"orders": "user_id", "items": "user_id"}))
    users = list(range(1, 21))  # on both shards
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL, note text)")
        conn.execute("CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY, user_id bigint NOT NULL)")
        # The simple protocol: rows split by shard, RETURNING in the order of the client's rows.
        values = ", ".join(f"({u}, 'n{u}')" for u in users)
        got = conn.execute(f"INSERT INTO orders (user_id, note) VALUES {values} RETURNING user_id, id").fetchall()
        assert [row[0] for row in got] == users
        # The extended protocol with parameters: the same, each shard its own renumbered ones.
        placeholders = ", ".join(["(%s, %s)"] * len(users))
        params = [x for u in users for x in (u, f"p{u}")]
        got = conn.execute(f"INSERT INTO orders (user_id, note) VALUES {placeholders} RETURNING user_id, note",
                           params).fetchall()
        assert got == [(u, f"p{u}") for u in users]
        binary = conn.cursor(binary=True).execute(
            f"INSERT INTO items (user_id) VALUES {', '.join(['(%s)'] * len(users))} RETURNING user_id",
            users).fetchall()
        assert [row[0] for row in binary] == users
        # CREATE TABLE IF NOT EXISTS of a table in use leaves its sequences alone.
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL)")
        conn.execute("INSERT INTO orders (user_id) VALUES (1), (2)")
    ids = {index: [row[0] for row in on(pg, dbname, "SELECT id FROM orders")] for index, dbname in enumerate((a, b))}
    everything = ids[0] + ids[1]
    assert len(everything) == len(set(everything)) == 2 * len(users) + 2  # unique across shards
    for index, found in ids.items():  # shard i of 2: i+1, i+3, ...
        assert found and all(i % 2 == (index + 1) % 2 for i in found), (index, found)
    item_ids = [row[0] for dbname in (a, b) for row in on(pg, dbname, "SELECT id FROM items")]
    assert len(item_ids) == len(set(item_ids)) == len(users)
    for index, dbname in enumerate((a, b)):
        for (user_id,) in on(pg, dbname, "SELECT user_id FROM orders"):
            assert shard_of(user_id, "bigint", 2, "hash") == index
    assert "Traceback" not in fleet.log()


def test_overlapping_sequences_are_found_and_the_fix_printed(pg: Cluster, empty_shards: tuple[str, str],
                                                             make_fleet: Any, tmp_path: Any) -> None:
    """A sharded table created on each shard directly (not through pgfleet): its ids overlap.
    SHOW SEQUENCES and pgfleet check say so and print the ALTER SEQUENCE; after it, none do."""
    import subprocess
    import sys

    import yaml

    from .conftest import ROOT

    a, b = empty_shards
    for dbname in (a, b):
        with psycopg.connect(pg.dsn(dbname), autocommit=True) as direct:
            direct.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint)")
            direct.execute("INSERT INTO orders (user_id) VALUES (1), (2), (3)")
    fleet: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"orders": "user_id"}))
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as admin:
        rows = admin.execute("SHOW SEQUENCES").fetchall()
    assert [(r[2], r[6]) for r in rows] == [("x0", "overlaps"), ("x1", "overlaps")]
    fixes = {r[2]: r[7] for r in rows}
    assert fixes["x0"] == "ALTER SEQUENCE orders_id_seq INCREMENT BY 2 START WITH 5 RESTART WITH 5"
    assert fixes["x1"] == "ALTER SEQUENCE orders_id_seq INCREMENT BY 2 START WITH 4 RESTART WITH 4"
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(fleet.config))
    check = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)], capture_output=True,
                           text=True, timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, check=False)
    assert "warning: sequence orders_id_seq of sharded table orders on x1 overlaps" in check.stdout, check.stdout
    for dbname, shard in ((a, "x0"), (b, "x1")):
        with psycopg.connect(pg.dsn(dbname), autocommit=True) as direct:
            direct.execute(fixes[shard])
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as admin:
        assert {r[6] for r in admin.execute("SHOW SEQUENCES").fetchall()} == {"interleaved"}
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:
        for user_id in range(1, 9):
            conn.execute("INSERT INTO orders (user_id) VALUES (%s)", (user_id,))
    ids = [row[0] for dbname in (a, b) for row in on(pg, dbname, "SELECT id FROM orders WHERE id > 3")]
    assert len(ids) == len(set(ids)) == 8
