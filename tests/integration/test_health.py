"""Health checks and circuit breaking, through a real pgfleet and PostgreSQL.

The fleet's ``secondary`` database is reached through ``FaultProxy`` (tests/integration/
faultproxy.py) and checked every 0.2 s (timeout 0.5 s, down after 2 failures in a row);
``accounts`` is sharded by ``user_id`` over primary and secondary, so a read without a key
fans out to both. What pgfleet promises (docs/decisions.md, "Health checks and circuit
breaking"): when the checks fail, the database is down and its circuit opens — a statement
routed there fails at once with ``08006 database secondary is unavailable``, a fan-out or a
whole-fleet write that needs it fails as a whole, clients queued for one of its connections
get that error at once, and its idle connections are closed; statements for the other
databases go on, in the same session and in others. The first check that answers closes the
circuit. Connections are counted on the cluster (``pg_stat_activity``), never through pgfleet.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster
from proxy.router.shard import shard_of

from .conftest import Fleet
from .faultproxy import FaultProxy

ON_SECONDARY = "/* pgfleet: database=secondary */ select current_database()"
FAN_OUT = "select count(*) from accounts"  # sharded, no key: every shard, merged
DOWN = "database secondary is down"
BACK = "database secondary is back"


@pytest.fixture
def proxy(pg: Cluster) -> Iterator[FaultProxy]:
    with FaultProxy(pg.host, pg.port) as fault:
        yield fault


@pytest.fixture
def watched(pg: Cluster, proxy: FaultProxy, make_fleet: Any) -> Fleet:
    """A pgfleet whose secondary is behind the fault proxy, checked every 0.2 s."""
    # pooled_on_secondary counts every pgfleet's backends of secondary: those of the fleets
    # that earlier tests stopped are gone first (their server processes end a moment after).
    assert wait_for(lambda: pooled_on_secondary(pg) == 0, 10), \
        f"{pooled_on_secondary(pg)} backend(s) of another pgfleet still on secondary"
    fleet: Fleet = make_fleet(
        health={"interval": "0.2s", "timeout": "0.5s", "failures_to_down": 2},
        pool={"size": 4, "acquire_timeout": "3s", "connect_timeout": "1s"},
        databases={"secondary": {"dsn": f"postgresql://pf_md5:md5pass@127.0.0.1:{proxy.port}/secondary",
                                 "pool_size": 2}},
        sharding={"shards": ["primary", "secondary"], "tables": {"accounts": "user_id"},
                  "types": {"accounts": "bigint"}})
    return fleet


def one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def pooled_on_secondary(pg: Cluster) -> int:
    """pgfleet's pooled backends of the secondary database (its health checks not counted)."""
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        return int(one(conn, "select count(*) from pg_stat_activity "
                             "where datname = 'secondary' and application_name = 'pgfleet'"))


def accounts_everywhere(pg: Cluster) -> int:
    """What the fan-out must answer: the rows of both shards, read directly."""
    total = 0
    for dbname in ("bank", "secondary"):
        with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
            total += int(one(conn, FAN_OUT))
    return total


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_logged(fleet: Fleet, text: str, count: int = 1, timeout: float = 5.0) -> None:
    assert wait_for(lambda: fleet.log().count(text) >= count, timeout), fleet.log()[-3000:]


def assert_unavailable(err: psycopg.Error) -> None:
    assert err.sqlstate == "08006", (err.sqlstate, str(err))
    assert err.diag.message_primary == "database secondary is unavailable", str(err)
    assert "SHOW HEALTH" in (err.diag.message_hint or "")


def refused_in(conn: psycopg.Connection[Any], sql: str) -> float:
    """Seconds until ``sql`` fails with the open circuit's 08006."""
    started = time.perf_counter()
    with pytest.raises(psycopg.OperationalError) as err:
        conn.execute(sql)
    took = time.perf_counter() - started
    assert_unavailable(err.value)
    return took


def assert_no_traceback(fleet: Fleet) -> None:
    log = fleet.log()
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 2000):][:6000]


@pytest.mark.parametrize("fault", ["refuse", "stall"])
def test_a_down_database_fails_fast_and_comes_back(pg: Cluster, proxy: FaultProxy, watched: Fleet,
                                                   fault: str) -> None:
    with psycopg.connect(watched.dsn(), autocommit=True) as conn, \
            psycopg.connect(watched.dsn(), autocommit=True) as other:
        assert one(conn, ON_SECONDARY) == "secondary"
        assert one(other, ON_SECONDARY) == "secondary"
        assert one(conn, FAN_OUT) == accounts_everywhere(pg)
        assert wait_for(lambda: pooled_on_secondary(pg) >= 2)  # ours, idle or parked

        # New connections to secondary are refused (or never answered): the checks fail.
        if fault == "refuse":
            proxy.refuse(True)
        else:
            proxy.stall(True)
        wait_logged(watched, DOWN)
        # Its idle backends are closed (their connections through the proxy still lived).
        assert wait_for(lambda: pooled_on_secondary(pg) == 0), pooled_on_secondary(pg)

        times = [refused_in(conn, ON_SECONDARY) for _ in range(20)]
        assert max(times) < 0.5, times
        print(f"\nopen circuit ({fault}): a statement for secondary failed in median "
              f"{statistics.median(times) * 1000:.2f} ms, max {max(times) * 1000:.2f} ms (client round trip)")
        # The session goes on, on the other databases; and so do other clients.
        assert one(conn, "select 40 + 2") == 42
        assert one(other, "select 40 + 2") == 42
        refused_in(other, ON_SECONDARY)
        # A fan-out that needs it fails as a whole: no partial answer from primary alone.
        refused_in(conn, FAN_OUT)
        refused_in(conn, f"/* pgfleet: databases=primary,secondary */ {FAN_OUT}")
        # So does a whole-fleet write, and nothing is written anywhere.
        refused_in(conn, "update accounts set balance = balance where id < 0")
        # A key-bound statement on the other shard still runs.
        on_primary = next(i for i in range(-1000, 0) if shard_of(i, "int8", 2) == 0)
        assert one(conn, f"select count(*) from accounts where user_id = {on_primary}") == 0
        # Logging in to it directly fails the same way.
        with pytest.raises(psycopg.OperationalError) as login:
            psycopg.connect(watched.dsn(database="secondary"), connect_timeout=10)
        assert "database secondary is unavailable" in str(login.value)
        with psycopg.connect(watched.dsn(), autocommit=True) as fresh:
            assert one(fresh, "select 1") == 1

        if fault == "refuse":
            proxy.refuse(False)
        else:
            proxy.stall(False)
            proxy.cut()  # the swallowed connections
        wait_logged(watched, BACK)
        assert one(conn, ON_SECONDARY) == "secondary"
        assert one(other, FAN_OUT) == accounts_everywhere(pg)
        with psycopg.connect(watched.dsn(database="secondary"), autocommit=True) as direct:
            assert one(direct, "select current_database()") == "secondary"

    log = watched.log()
    assert log.count(DOWN) == 1 and log.count(BACK) == 1, log[-3000:]
    down = next(line for line in log.splitlines() if DOWN in line)
    assert "health checks in a row failed" in down and "Check that the server at 127.0.0.1:" in down, down
    assert_no_traceback(watched)


def test_waiters_fail_at_once_and_busy_backends_are_closed_when_they_come_back(
        pg: Cluster, proxy: FaultProxy, watched: Fleet) -> None:
    """secondary's pool has 2 connections, both in transactions; a third client waits for one.
    When the database goes down the waiter gets 08006 at once (not 53300 after acquire_timeout);
    the transactions go on on their backends, which are closed when their clients finish."""
    with psycopg.connect(watched.dsn()) as first, psycopg.connect(watched.dsn()) as second, \
            psycopg.connect(watched.dsn(), autocommit=True) as waiting:
        for conn in (first, second):
            assert one(conn, ON_SECONDARY) == "secondary"  # BEGIN; the transaction is on secondary
        answer: list[Any] = []

        def wait() -> None:
            started = time.monotonic()
            try:
                answer.append(one(waiting, ON_SECONDARY))
            except psycopg.Error as exc:
                answer.append(exc)
            answer.append(time.monotonic() - started)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(0.3)
        assert not answer  # queued for a connection
        proxy.refuse(True)
        thread.join(5)
        assert len(answer) == 2, answer
        error, waited = answer
        assert isinstance(error, psycopg.OperationalError), error
        assert_unavailable(error)
        assert waited < 2.5, waited  # acquire_timeout is 3 s
        assert pooled_on_secondary(pg) == 2  # in use: left to their clients

        assert one(first, "select 1") == 1  # still its own backend, still in its transaction
        first.commit()
        second.rollback()
        assert wait_for(lambda: pooled_on_secondary(pg) == 0), pooled_on_secondary(pg)
        refused_in(first, ON_SECONDARY)
        first.rollback()

        proxy.refuse(False)
        wait_logged(watched, BACK)
        assert one(waiting, ON_SECONDARY) == "secondary"
    assert_no_traceback(watched)


def test_one_failed_check_is_not_down(pg: Cluster, proxy: FaultProxy, watched: Fleet) -> None:
    """Fewer failures in a row than failures_to_down leave the circuit closed."""
    with psycopg.connect(watched.dsn(), autocommit=True) as conn:
        assert one(conn, ON_SECONDARY) == "secondary"
        # Exactly one connection fails: the next check's (nothing else connects to secondary
        # now). Refusing for a while instead would fail a second check too, 0.2 s later, if
        # the test were slower than that to take the refusal back.
        proxy.reset_next(1)
        wait_logged(watched, "health check of database secondary failed (1 of 2 in a row")
        assert proxy.resets_left() == 0
        time.sleep(1.0)  # several checks, all answered
        assert DOWN not in watched.log()
        assert one(conn, ON_SECONDARY) == "secondary"
    assert_no_traceback(watched)


def test_a_database_back_takes_statements_within_seconds_whatever_the_interval(
        pg: Cluster, proxy: FaultProxy, make_fleet: Any) -> None:
    """The half-open circuit: with a 30 s health interval, a database that was down answers
    again and a fan-out over it succeeds within 5 s (it is probed every second while down)."""
    proxy.refuse(True)  # down from the start: the first check opens the circuit
    fleet: Fleet = make_fleet(
        health={"interval": "30s", "timeout": "0.5s", "failures_to_down": 1},
        pool={"size": 4, "acquire_timeout": "3s", "connect_timeout": "1s"},
        databases={"secondary": {"dsn": f"postgresql://pf_md5:md5pass@127.0.0.1:{proxy.port}/secondary"}},
        sharding={"shards": ["primary", "secondary"], "tables": {"accounts": "user_id"},
                  "types": {"accounts": "bigint"}})
    wait_logged(fleet, DOWN)
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        refused_in(conn, FAN_OUT)
        proxy.refuse(False)
        back = time.monotonic()
        assert wait_for(lambda: _answers(conn, FAN_OUT), 5.0), fleet.log()[-2000:]
        took = time.monotonic() - back
        assert one(conn, FAN_OUT) == accounts_everywhere(pg)
    print(f"\nhalf-open circuit: a fan-out over the database succeeded {took:.2f}s after it answered again "
          "(health interval 30s)")
    assert_no_traceback(fleet)


def _answers(conn: psycopg.Connection[Any], sql: str) -> bool:
    try:
        conn.execute(sql)
    except psycopg.OperationalError:
        return False
    return True


def test_a_configured_database_created_through_pgfleet_is_usable_within_a_second(
        pg: Cluster, make_fleet: Any) -> None:
    dbname = f"created_{os.getpid()}"
    pg.psql(f"DROP DATABASE IF EXISTS {dbname}")
    fleet: Fleet = make_fleet(
        health={"interval": "30s", "timeout": "0.5s", "failures_to_down": 1},
        databases={"later": {"dsn": pg.dsn(dbname)}, "primary": {"dsn": pg.dsn("bank")}})  # may CREATE DATABASE
    try:
        wait_logged(fleet, "database later is down")
        with psycopg.connect(fleet.dsn("pf_admin"), autocommit=True) as conn:
            conn.execute(f"/* pgfleet: database=primary */ CREATE DATABASE {dbname}")
            created = time.monotonic()
            assert wait_for(lambda: _answers(conn, "/* pgfleet: database=later */ select 1"), 5.0), \
                fleet.log()[-2000:]
            took = time.monotonic() - created
            assert one(conn, "/* pgfleet: database=later */ select current_database()") == dbname
        assert took < 1.5, took
    finally:
        fleet.stop()
        pg.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
