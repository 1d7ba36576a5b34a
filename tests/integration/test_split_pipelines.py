"""Pipelines over two shards, through pgfleet, with psycopg against real PostgreSQL.

pgfleet cuts a pipeline where the database changes and runs the parts on both shards at once
(proxy/frontend/split.py), giving the answers back in the client's order. With two-phase
commit, a pipeline outside a transaction is one transaction on both shards, committed at its
Sync, as PostgreSQL commits a pipeline. Every row is checked on the shard PostgreSQL's own
PARTITION BY HASH gives it (``shard_of`` is tested equal to it in test_sharding.py).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster
from proxy.router.shard import shard_of

from .conftest import KEYS, Fleet, rows_on, sharded_on

INSERT = "INSERT INTO notes (user_id, body) VALUES (%s, %s)"


def url(fleet: Fleet) -> str:
    return f"postgresql://pf_server:{KEYS['pf_server'][0]}@127.0.0.1:{fleet.port}/app"


def placed(pg: Cluster, shards: tuple[str, str]) -> list[tuple[int, str]]:
    found = []
    for index, dbname in enumerate(shards):
        for user_id, body in rows_on(pg, dbname, "SELECT user_id, body FROM notes"):
            assert shard_of(user_id, "bigint", 2, "hash") == index, (user_id, dbname)
            found.append((user_id, body))
    return sorted(found)


@pytest.fixture
def fleet(pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> Fleet:
    started: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"notes": "user_id"}, two_phase_commit=True))
    with psycopg.connect(url(started), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (user_id bigint NOT NULL, body text NOT NULL)")
    return started


def test_executemany_outside_a_transaction_is_atomic_on_both_shards(
        pg: Cluster, empty_shards: tuple[str, str], fleet: Fleet) -> None:
    rows = [(user_id, f"n{user_id}") for user_id in range(1, 301)]
    with psycopg.connect(url(fleet), autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(INSERT, rows)
        assert placed(pg, empty_shards) == rows
        conn.execute("DELETE FROM notes")
        # A row that fails in the middle: nothing is written on either shard, and the
        # connection goes on.
        with pytest.raises(pgerrors.NotNullViolation), conn.cursor() as cur:
            cur.executemany(INSERT, [*rows[:150], (1000, None), *rows[150:]])
        assert placed(pg, empty_shards) == []
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (0,)
    assert "Traceback" not in fleet.log()


def test_pipeline_in_a_transaction_answers_in_the_client_order(
        pg: Cluster, empty_shards: tuple[str, str], fleet: Fleet) -> None:
    with psycopg.connect(url(fleet)) as conn:
        with conn.pipeline():
            cursors = []
            for user_id in range(1, 41):
                conn.execute(INSERT, (user_id, f"n{user_id}"))
                # Each read goes to its shard, sees the transaction's own write there, and its
                # answer comes back in the order it was sent.
                cursors.append(conn.execute("SELECT user_id, body FROM notes WHERE user_id = %s", (user_id,)))
        assert [cur.fetchall() for cur in cursors] == [[(user_id, f"n{user_id}")] for user_id in range(1, 41)]
        conn.commit()
    assert placed(pg, empty_shards) == [(user_id, f"n{user_id}") for user_id in range(1, 41)]


def test_pipeline_with_an_error_in_a_transaction_commits_nothing(
        pg: Cluster, empty_shards: tuple[str, str], fleet: Fleet) -> None:
    with psycopg.connect(url(fleet)) as conn:
        with pytest.raises(pgerrors.NotNullViolation), conn.pipeline():
            for user_id in range(1, 21):
                conn.execute(INSERT, (user_id, None if user_id == 13 else f"n{user_id}"))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (0,)
        # And the same connection goes on: a clean pipeline commits on both.
        with conn.pipeline():
            for user_id in range(1, 21):
                conn.execute(INSERT, (user_id, f"n{user_id}"))
        conn.commit()
    assert placed(pg, empty_shards) == [(user_id, f"n{user_id}") for user_id in range(1, 21)]


def test_transaction_begun_and_committed_inside_the_pipeline(
        pg: Cluster, empty_shards: tuple[str, str], fleet: Fleet) -> None:
    # psycopg sends BEGIN, the rows and COMMIT in one pipeline: the COMMIT waits until both
    # shards answered their parts, then commits in two phases.
    with psycopg.connect(url(fleet), autocommit=True) as conn:
        with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
            cur.executemany(INSERT, [(user_id, "t") for user_id in range(1, 101)])
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (100,)
    assert placed(pg, empty_shards) == [(user_id, "t") for user_id in range(1, 101)]
    assert "Traceback" not in fleet.log()


def test_pipeline_without_two_phase_commit_is_refused_whole(
        pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> None:
    plain: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"notes": "user_id"}))
    with psycopg.connect(url(plain), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (user_id bigint NOT NULL, body text NOT NULL)")
        with pytest.raises(pgerrors.FeatureNotSupported, match="only with two-phase commit"), conn.cursor() as cur:
            cur.executemany(INSERT, [(user_id, "x") for user_id in range(1, 21)])
        assert placed(pg, empty_shards) == []
        conn.execute(INSERT, (1, "one"))  # the connection goes on
    assert placed(pg, empty_shards) == [(1, "one")]
