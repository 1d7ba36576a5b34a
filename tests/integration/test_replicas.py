"""Read replicas: a real streaming standby of the session cluster (pg_basebackup -R).

Which server answered is read from the server itself (``pg_is_in_recovery()``), never from
pgfleet's own account of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster

from .conftest import Fleet

INTERVAL = 0.2


@pytest.fixture(scope="module")
def standby(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    replica = pg.replica("standby", tmp_path_factory.mktemp("standby") / "data")
    try:
        yield replica
    finally:
        replica.stop()


def on_replica(conn: psycopg.Connection[Any], sql: str = "select pg_is_in_recovery()") -> bool:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return bool(row[0])


def eventually(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


@pytest.fixture
def replicated(standby: Cluster, pg: Cluster, make_fleet: Any) -> Fleet:
    fleet: Fleet = make_fleet(
        health={"interval": f"{INTERVAL}s", "timeout": "1s", "failures_to_down": 2},
        databases={"primary": {"dsn": pg.dsn("bank", user="pf_scram", password="scrampass"),
                               "replicas": [standby.dsn("bank", user="pf_scram", password="scrampass")],
                               "max_replica_lag": "1s"}})
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        assert eventually(lambda: on_replica(conn)), "the replica never took a read"
    return fleet


def test_reads_outside_transactions_go_to_the_replica_the_rest_to_the_primary(replicated: Fleet) -> None:
    with psycopg.connect(replicated.dsn(), autocommit=True) as conn:
        assert on_replica(conn)
        assert on_replica(conn, "select count(*) > 0, pg_is_in_recovery() from currencies") is True
        assert not on_replica(conn, "/* pgfleet: primary */ select pg_is_in_recovery()")
        assert not on_replica(conn, "select pg_is_in_recovery(), txid_current()")  # a function that may write
        assert not on_replica(conn, "select pg_is_in_recovery() from currencies for update")
        with conn.transaction():
            assert not on_replica(conn)  # a transaction stays on the primary
        for _ in range(8):  # the extended protocol, unnamed and then (psycopg prepares) named
            row = conn.execute("select pg_is_in_recovery() where %s", (True,)).fetchone()
            assert row == (True,)
    with psycopg.connect(replicated.dsn()) as tx:  # psycopg's BEGIN first
        assert not on_replica(tx)
        tx.rollback()


def test_a_stopped_replica_is_skipped_and_comes_back(replicated: Fleet, standby: Cluster) -> None:
    with psycopg.connect(replicated.dsn(), autocommit=True) as conn:
        standby.stop()
        try:
            assert eventually(lambda: not on_replica(conn)), "reads kept going to a stopped replica"
            for _ in range(5):  # every read answered, by the primary
                assert not on_replica(conn)
        finally:
            standby.start()
        assert eventually(lambda: on_replica(conn), timeout=20), "the replica never came back"
    assert "Traceback" not in replicated.log()


def test_a_lagging_replica_is_skipped(replicated: Fleet, standby: Cluster, pg: Cluster) -> None:
    with psycopg.connect(standby.dsn("bank"), autocommit=True) as replica_admin, \
            psycopg.connect(replicated.dsn(), autocommit=True) as conn:
        replica_admin.execute("select pg_wal_replay_pause()")
        try:
            with psycopg.connect(pg.dsn("bank"), autocommit=True) as primary:
                primary.execute("create table if not exists lag_probe (x int)")
                primary.execute("insert into lag_probe values (1)")
            time.sleep(1.5)  # past max_replica_lag: 1s, with replay paused
            with psycopg.connect(pg.dsn("bank"), autocommit=True) as primary:
                primary.execute("insert into lag_probe values (2)")
            assert eventually(lambda: not on_replica(conn)), "a replica 1.5 s behind still took reads"
        finally:
            replica_admin.execute("select pg_wal_replay_resume()")
        assert eventually(lambda: on_replica(conn)), "the replica did not take reads once it caught up"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as primary:
        primary.execute("drop table lag_probe")
