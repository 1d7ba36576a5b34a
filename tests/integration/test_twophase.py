"""Transactions on several databases with ``two_phase_commit: true``, on real clusters.

The fleet: primary = bank (direct), secondary = the `secondary` database reached through
``FaultProxy``, so a test can hold back the secondary's ``PREPARE TRANSACTION`` or ``COMMIT
PREPARED`` and SIGKILL pgfleet between the two phases. ``tpc_a`` lives on primary, ``tpc_b``
on secondary (the table map); ``tpc_s`` is sharded by id over both. Every check reads the
databases directly: rows, ``pg_prepared_xacts`` and the decision log ``pgfleet.twophase``.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster
from proxy.router.shard import shard_of

from .conftest import Fleet, fleet_config
from .faultproxy import FaultProxy

SHARDS = ("primary", "secondary")


def direct(pg: Cluster, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn(dbname), autocommit=True)


def prepared(pg: Cluster) -> list[str]:
    """pgfleet's prepared transactions anywhere on the cluster."""
    with direct(pg, "postgres") as conn:
        return [r[0] for r in conn.execute("select gid from pg_prepared_xacts where gid like 'pgfleet%'")]


def decisions(pg: Cluster) -> list[str]:
    with direct(pg, "bank") as conn:
        found = conn.execute("select to_regclass('pgfleet.twophase')").fetchone()
        if found is None or found[0] is None:
            return []
        return [r[0] for r in conn.execute("select gid from pgfleet.twophase")]


def ids(pg: Cluster, dbname: str, table: str) -> list[int]:
    with direct(pg, dbname) as conn:
        return [r[0] for r in conn.execute(f"select id from {table} order by id")]


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def key_on(shard: str, start: int = 1) -> int:
    return next(i for i in range(start, start + 1000) if SHARDS[shard_of(i, "int8", 2)] == shard)


@pytest.fixture
def tables(pg: Cluster) -> Iterator[None]:
    for db in ("bank", "secondary"):
        with direct(pg, db) as conn:
            conn.execute("drop table if exists tpc_a, tpc_b, tpc_s")
            conn.execute("create table tpc_s (id bigint primary key, v int,"
                         " u int unique deferrable initially deferred)")
            conn.execute("grant all on tpc_s to pf_fleet")
    with direct(pg, "bank") as conn:
        conn.execute("create table tpc_a (id int primary key, v text)")
        conn.execute("grant all on tpc_a to pf_fleet")
    with direct(pg, "secondary") as conn:
        conn.execute("create table tpc_b (id int primary key, v text, u int unique deferrable initially deferred)")
        conn.execute("grant all on tpc_b to pf_fleet")
    yield
    with direct(pg, "postgres") as conn:  # a failed test must not leave locks for the next ones
        left = conn.execute("select gid, database from pg_prepared_xacts where gid like 'pgfleet%'").fetchall()
    for gid, db in left:
        with direct(pg, db) as conn:
            conn.execute(f"rollback prepared '{gid}'")
    for db in ("bank", "secondary"):
        with direct(pg, db) as conn:
            conn.execute("drop table if exists tpc_a, tpc_b, tpc_s")


@pytest.fixture
def proxy(pg: Cluster) -> Iterator[FaultProxy]:
    with FaultProxy(pg.host, pg.port) as fault:
        yield fault


def twophase_config(pg: Cluster, proxy: FaultProxy, **overrides: Any) -> dict[str, Any]:
    overrides.setdefault("two_phase_commit", True)
    return fleet_config(
        pg,
        pool={"size": 4, "acquire_timeout": "3s", "connect_timeout": "2s"},
        databases={"primary": {"dsn": pg.dsn("bank", user="pf_trust")},
                   "secondary": {"dsn": f"postgresql://pf_trust@127.0.0.1:{proxy.port}/secondary"}},
        tables={"tpc_a": "primary", "tpc_b": "secondary"},
        sharding={"shards": list(SHARDS), "function": "hash", "tables": {"tpc_s": "id"}},
        **overrides)


@pytest.fixture
def twophase(pg: Cluster, proxy: FaultProxy, tables: None, tmp_path: Any) -> Iterator[Fleet]:
    fleet = Fleet(twophase_config(pg, proxy), tmp_path).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def no_traceback(fleet: Fleet) -> None:
    assert "Traceback" not in fleet.log(), fleet.log()[-3000:]


# -- commits and rollbacks


def test_a_transaction_on_two_databases_commits_on_both_in_two_phases(twophase: Fleet, pg: Cluster) -> None:
    with psycopg.connect(twophase.dsn()) as conn:  # psycopg: the extended protocol
        conn.execute("insert into tpc_a values (%s, %s)", (1, "a"))
        conn.execute("insert into tpc_b values (%s, %s)", (1, "b"))
        conn.execute("insert into tpc_a values (%s, %s)", (2, "a again"))  # back to the first database
        assert conn.execute("select count(*) from tpc_b").fetchone() == (1,)  # sees its own write
        conn.commit()
    # psql: the simple protocol, one query per statement
    out = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", twophase.dsn(), "-c", "begin",
                          "-c", "insert into tpc_b values (3, 'b')", "-c", "insert into tpc_a values (3, 'a')",
                          "-c", "commit"], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["BEGIN", "INSERT", "0", "1", "INSERT", "0", "1", "COMMIT"]
    assert ids(pg, "bank", "tpc_a") == [1, 2, 3]
    assert ids(pg, "secondary", "tpc_b") == [1, 3]
    assert prepared(pg) == []
    assert eventually(lambda: decisions(pg) == [])  # finished decisions are deleted
    no_traceback(twophase)


def test_rollback_on_two_databases_leaves_nothing(twophase: Fleet, pg: Cluster) -> None:
    with psycopg.connect(twophase.dsn()) as conn:
        conn.execute("insert into tpc_a values (1, 'a')")
        conn.execute("insert into tpc_b values (1, 'b')")
        conn.rollback()
        conn.execute("insert into tpc_b values (2, 'b')")
        conn.execute("insert into tpc_a values (2, 'a')")
        conn.commit()
    assert ids(pg, "bank", "tpc_a") == [2]
    assert ids(pg, "secondary", "tpc_b") == [2]
    assert prepared(pg) == []


def test_an_error_fails_the_whole_transaction_and_commit_answers_rollback(twophase: Fleet, pg: Cluster) -> None:
    with psycopg.connect(twophase.dsn()) as conn:
        conn.execute("insert into tpc_a values (1, 'a')")
        conn.execute("insert into tpc_b values (1, 'b')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("insert into tpc_b values (1, 'again')")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):  # 25P02, on the other database too
            conn.execute("select count(*) from tpc_a")
        cur = conn.execute("commit")
        assert cur.statusmessage == "ROLLBACK"
    assert ids(pg, "bank", "tpc_a") == []
    assert ids(pg, "secondary", "tpc_b") == []
    assert prepared(pg) == []


def test_a_failure_at_prepare_rolls_back_the_databases_already_prepared(twophase: Fleet, pg: Cluster) -> None:
    with psycopg.connect(twophase.dsn()) as conn:
        conn.execute("insert into tpc_a values (1, 'a')")
        conn.execute("insert into tpc_b values (1, 'b', 7)")
        conn.execute("insert into tpc_b values (2, 'b', 7)")  # deferred: fails at PREPARE TRANSACTION
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.commit()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select count(*) from tpc_a").fetchone() == (0,)  # the connection goes on
    assert ids(pg, "bank", "tpc_a") == []
    assert ids(pg, "secondary", "tpc_b") == []
    assert prepared(pg) == [] and decisions(pg) == []


def test_a_fleet_wide_write_commits_on_all_shards_or_none(twophase: Fleet, pg: Cluster) -> None:
    a, b = key_on("primary"), key_on("secondary")
    with psycopg.connect(twophase.dsn(), autocommit=True) as conn:
        conn.execute(f"insert into tpc_s (id, v, u) values ({a}, 1, 1), ({b}, 1, 1)")
        conn.execute(f"insert into tpc_s (id, v, u) values ({key_on('secondary', b + 1)}, 1, 2)")
        # Each shard's u is unique only at commit: the secondary's PREPARE fails, so the
        # primary, which could commit, must not.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("update tpc_s set u = 2, v = v + 1")
        assert conn.execute("select sum(v) from tpc_s").fetchone() == (3,)
        assert conn.execute("update tpc_s set v = v + 1").statusmessage == "UPDATE 3"
    with direct(pg, "bank") as conn:
        assert conn.execute("select v from tpc_s").fetchall() == [(2,)]
    assert prepared(pg) == []


# -- what cannot span databases


def test_savepoints_and_settings_are_refused_across_databases(twophase: Fleet, pg: Cluster) -> None:
    with psycopg.connect(twophase.dsn()) as conn:
        conn.execute("insert into tpc_a values (1, 'a')")
        conn.execute("insert into tpc_b values (1, 'b')")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="SAVEPOINT is not supported in a "
                           "transaction on several databases"):
            conn.execute("savepoint s1")
        conn.rollback()
        conn.execute("set local statement_timeout = '5s'")
        conn.execute("insert into tpc_a values (2, 'a')")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="changed settings on database primary"):
            conn.execute("insert into tpc_b values (2, 'b')")
        conn.rollback()
        # One database: savepoints work as on PostgreSQL.
        conn.execute("insert into tpc_a values (3, 'a')")
        conn.execute("savepoint s1")
        conn.execute("insert into tpc_a values (4, 'a')")
        conn.execute("rollback to savepoint s1")
        conn.commit()
    assert ids(pg, "bank", "tpc_a") == [3]
    assert ids(pg, "secondary", "tpc_b") == []


def test_without_two_phase_commit_a_second_database_is_refused(pg: Cluster, proxy: FaultProxy, tables: None,
                                                               make_fleet: Any) -> None:
    config = twophase_config(pg, proxy)
    config.pop("two_phase_commit")
    fleet = make_fleet(**{k: v for k, v in config.items() if k in ("databases", "tables", "sharding")})
    with psycopg.connect(fleet.dsn()) as conn:
        conn.execute("insert into tpc_a values (1, 'a')")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="runs on database primary; a statement "
                           "for database secondary cannot join it"):
            conn.execute("insert into tpc_b values (1, 'b')")


# -- failures: a participant that dies, a client that leaves, pgfleet killed between phases


def test_a_participant_that_dies_fails_the_transaction_everywhere(twophase: Fleet, pg: Cluster,
                                                                  proxy: FaultProxy) -> None:
    conn = psycopg.connect(twophase.dsn())
    conn.execute("insert into tpc_b values (1, 'b')")
    conn.execute("insert into tpc_a values (1, 'a')")  # secondary waits, idle in the transaction
    proxy.cut()
    with pytest.raises(psycopg.OperationalError, match="secondary"):
        conn.execute("insert into tpc_a values (2, 'a')")
        conn.commit()
    conn.close()
    assert eventually(lambda: ids(pg, "bank", "tpc_a") == [] and prepared(pg) == [])
    with psycopg.connect(twophase.dsn()) as again:  # the fleet goes on
        again.execute("insert into tpc_a values (3, 'a')")
        again.execute("insert into tpc_b values (3, 'b')")
        again.commit()
    assert ids(pg, "secondary", "tpc_b") == [3]
    no_traceback(twophase)


def test_a_client_that_leaves_mid_transaction_rolls_back_everywhere(twophase: Fleet, pg: Cluster) -> None:
    conn = psycopg.connect(twophase.dsn())
    conn.execute("insert into tpc_a values (1, 'a')")
    conn.execute("insert into tpc_b values (1, 'b')")
    conn.close()

    def idle_in_transaction() -> int:
        with direct(pg, "postgres") as c:
            return c.execute("select count(*) from pg_stat_activity where application_name = 'pgfleet' "
                             "and state like 'idle in transaction%'").fetchone()[0]  # type: ignore[index]
    assert eventually(lambda: idle_in_transaction() == 0)
    assert ids(pg, "bank", "tpc_a") == [] and ids(pg, "secondary", "tpc_b") == []


def _commit_in_background(fleet: Fleet) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []
    conn = psycopg.connect(fleet.dsn())
    conn.execute("insert into tpc_a values (1, 'a')")
    conn.execute("insert into tpc_b values (1, 'b')")

    def commit() -> None:
        try:
            conn.commit()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)
        finally:
            conn.close()
    thread = threading.Thread(target=commit, daemon=True)
    thread.start()
    return thread, errors


def test_pgfleet_killed_after_the_decision_commits_everywhere_on_restart(
        twophase: Fleet, pg: Cluster, proxy: FaultProxy) -> None:
    proxy.hold(b"COMMIT PREPARED")  # the secondary never hears phase two
    thread, errors = _commit_in_background(twophase)
    assert eventually(lambda: ids(pg, "bank", "tpc_a") == [1]), "the primary's COMMIT PREPARED did not run"
    assert len(decisions(pg)) == 1
    assert len(prepared(pg)) == 1  # the secondary's part, in doubt
    assert twophase.proc is not None
    twophase.proc.kill()
    twophase.proc.wait()
    thread.join(10)
    assert errors, "the client must not be told COMMIT by a pgfleet that died"
    assert ids(pg, "secondary", "tpc_b") == []
    proxy.hold(None)
    twophase.start()  # recovery: the decision says commit
    assert eventually(lambda: prepared(pg) == [])
    assert ids(pg, "bank", "tpc_a") == [1] and ids(pg, "secondary", "tpc_b") == [1]
    assert eventually(lambda: decisions(pg) == [])
    assert "COMMIT PREPARED" in twophase.log() and "left in doubt" in twophase.log()


def test_pgfleet_killed_before_the_decision_rolls_back_everywhere_on_restart(
        twophase: Fleet, pg: Cluster, proxy: FaultProxy) -> None:
    proxy.hold(b"PREPARE TRANSACTION")  # the primary prepares, the secondary never hears it
    thread, errors = _commit_in_background(twophase)
    assert eventually(lambda: len(prepared(pg)) == 1)
    assert decisions(pg) == []
    assert twophase.proc is not None
    twophase.proc.kill()
    twophase.proc.wait()
    thread.join(10)
    assert errors
    proxy.hold(None)
    twophase.start()
    assert eventually(lambda: prepared(pg) == [])
    assert ids(pg, "bank", "tpc_a") == [] and ids(pg, "secondary", "tpc_b") == []
    assert "ROLLBACK PREPARED" in twophase.log()


def test_a_starting_pgfleet_leaves_a_live_pgfleets_transaction_alone(
        twophase: Fleet, pg: Cluster, proxy: FaultProxy, tmp_path: Any) -> None:
    proxy.hold(b"COMMIT PREPARED")
    thread, errors = _commit_in_background(twophase)
    assert eventually(lambda: ids(pg, "bank", "tpc_a") == [1] and len(prepared(pg)) == 1)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Fleet(twophase_config(pg, proxy, listen={"host": "127.0.0.1", "port": _port(), "database": "app"}),
                  other_dir).start()
    try:
        time.sleep(0.5)
        assert len(prepared(pg)) == 1, "the second pgfleet finished the first one's live transaction"
        assert "left in doubt" not in other.log()
        proxy.hold(None)  # the first pgfleet finishes its own
        thread.join(10)
        assert not thread.is_alive() and errors == []
    finally:
        other.stop()
    assert prepared(pg) == []
    assert ids(pg, "secondary", "tpc_b") == [1]


def _port() -> int:
    from proxy.embedded import free_port
    return free_port()


@pytest.mark.parametrize("protocol", ["extended", "prepared"])
def test_pgbench_transactions_across_databases_in_the_extended_protocol(
        twophase: Fleet, pg: Cluster, tmp_path: Any, protocol: str) -> None:
    script = tmp_path / "across.sql"
    script.write_text("\\set id :client_id * 1000000 + random(1, 999999)\n"
                      "BEGIN;\n"
                      "INSERT INTO tpc_a VALUES (:id, 'a') ON CONFLICT (id) DO NOTHING;\n"
                      "INSERT INTO tpc_b VALUES (:id, 'b') ON CONFLICT (id) DO NOTHING;\n"
                      "END;\n")
    out = subprocess.run(["pgbench", "-n", "-f", str(script), "-M", protocol, "-c", "2", "-t", "25",
                          twophase.dsn()], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "number of transactions actually processed: 50/50" in out.stdout, out.stdout
    a, b = ids(pg, "bank", "tpc_a"), ids(pg, "secondary", "tpc_b")
    assert a == b and 0 < len(a) <= 50
    assert prepared(pg) == []
    no_traceback(twophase)


# -- statements on several databases inside a transaction (issue 17, point 3)


def test_writes_on_several_shards_join_the_transaction_and_commit_in_two_phases(twophase: Fleet,
                                                                                  pg: Cluster) -> None:
    a, b = key_on("primary"), key_on("secondary")
    with psycopg.connect(twophase.dsn()) as conn:  # psycopg's default: every statement in a transaction
        conn.execute(f"insert into tpc_s (id, v) values ({a}, 1), ({b}, 1)")  # rows on both shards
        conn.execute("insert into tpc_a (id, v) values (1, 'a')")  # and a mapped table
        assert conn.execute("update tpc_s set v = v + 10").statusmessage == "UPDATE 2"  # every shard
        # Its own writes, read back by key inside the transaction.
        assert conn.execute("select v from tpc_s where id = %s", (b,)).fetchone() == (11,)
        # In the extended protocol with a parameter, a write with no key bound: every shard.
        assert conn.execute("update tpc_s set v = v + %s", (100,)).statusmessage == "UPDATE 2"
        assert ids(pg, "bank", "tpc_s") == []  # nothing visible before COMMIT
        conn.commit()
    assert ids(pg, "bank", "tpc_s") == [a] and ids(pg, "secondary", "tpc_s") == [b]
    with direct(pg, "secondary") as d:
        assert d.execute("select v from tpc_s").fetchone() == (111,)
    assert ids(pg, "bank", "tpc_a") == [1]
    assert prepared(pg) == []
    no_traceback(twophase)


def test_a_joined_write_rolls_back_everywhere(twophase: Fleet, pg: Cluster) -> None:
    a, b = key_on("primary"), key_on("secondary")
    with psycopg.connect(twophase.dsn()) as conn:
        conn.execute(f"insert into tpc_s (id, v) values ({a}, 1), ({b}, 1)")
        conn.rollback()
        conn.execute(f"insert into tpc_s (id, v) values ({a}, 1)")
        with pytest.raises(psycopg.errors.UniqueViolation):  # fails on one shard: the whole transaction fails
            conn.execute(f"insert into tpc_s (id, v) values ({a}, 2), ({b}, 2)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
    assert ids(pg, "bank", "tpc_s") == [] and ids(pg, "secondary", "tpc_s") == []
    assert prepared(pg) == []
    no_traceback(twophase)


def test_ddl_on_a_sharded_table_in_a_transaction_commits_on_every_shard(twophase: Fleet, pg: Cluster) -> None:
    for db in ("bank", "secondary"):
        with direct(pg, db) as d:
            d.execute("alter table tpc_s owner to pf_trust")  # the dsn's user, as after a create through pgfleet
    with psycopg.connect(twophase.dsn()) as conn:  # what an ORM's create_all / a migration does
        conn.execute("alter table tpc_s add column note text")
        conn.execute("create index tpc_s_note on tpc_s (note)")
        conn.commit()
    for db in ("bank", "secondary"):
        with direct(pg, db) as d:
            assert d.execute("select count(*) from pg_indexes where indexname = 'tpc_s_note'").fetchone() == (1,)
    assert prepared(pg) == []


def test_without_two_phase_commit_a_write_on_several_shards_in_a_transaction_says_how(
        pg: Cluster, proxy: FaultProxy, tables: None, tmp_path: Any) -> None:
    fleet = Fleet(twophase_config(pg, proxy, two_phase_commit=False), tmp_path).start()
    try:
        with psycopg.connect(fleet.dsn()) as conn:
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                conn.execute("update tpc_s set v = 1")
            assert "without two-phase commit" in str(err.value)
            assert "two_phase_commit: true" in (err.value.diag.message_hint or "")
    finally:
        fleet.stop()


def test_a_multi_row_insert_with_parameters_in_a_transaction_returns_rows_in_order(twophase: Fleet,
                                                                                  pg: Cluster) -> None:
    """What SQLAlchemy's ORM sends for add_all(): one INSERT of many rows with parameters, in a
    transaction, RETURNING in the order of its rows."""
    keys = [key_on("secondary"), key_on("primary"), key_on("secondary", 100), key_on("primary", 100)]
    with psycopg.connect(twophase.dsn()) as conn:
        got = conn.execute("insert into tpc_s (id, v) values (%s, %s), (%s, %s), (%s, %s), (%s, %s) returning id, v",
                           [x for i, k in enumerate(keys) for x in (k, i)]).fetchall()
        assert got == [(k, i) for i, k in enumerate(keys)]
        conn.commit()
    assert sorted(ids(pg, "bank", "tpc_s") + ids(pg, "secondary", "tpc_s")) == sorted(keys)
    assert prepared(pg) == []
    no_traceback(twophase)


def test_sqlalchemy_insertmanyvalues_form_is_split_by_shard(twophase: Fleet, pg: Cluster) -> None:
    """SQLAlchemy 2's insertmanyvalues with sort_by_parameter_order: INSERT ... SELECT of a
    VALUES list with a sentinel counter, ORDER BY it, RETURNING in that order."""
    keys = [key_on("secondary"), key_on("primary"), key_on("secondary", 100), key_on("primary", 100),
            key_on("primary", 200)]
    rows = ", ".join(f"(%s, %s, {n})" for n in range(len(keys)))
    sql = (f"INSERT INTO tpc_s (id, v) SELECT p0::BIGINT, p1::INTEGER FROM (VALUES {rows}) "
           "AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING tpc_s.id, tpc_s.id AS id__1")
    with psycopg.connect(twophase.dsn()) as conn:
        got = conn.execute(sql, [x for i, k in enumerate(keys) for x in (k, i)]).fetchall()
        assert got == [(k, k) for k in keys]
        conn.commit()
    for db, shard in (("bank", "primary"), ("secondary", "secondary")):
        assert ids(pg, db, "tpc_s") == sorted(k for k in keys if SHARDS[shard_of(k, "int8", 2)] == shard)
    no_traceback(twophase)
