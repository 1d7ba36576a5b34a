"""Limits and shutdown through a running pgfleet: listen.max_client_connections and a key's
max_connections (53300), SIGTERM letting open transactions finish up to shutdown_timeout,
SIGINT letting only running statements finish, and no backend left open afterwards."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster

from .conftest import KEYS, Fleet
from .rawclient import Raw, rows
from .test_pool import backends, own_primary, wait_for


def test_max_client_connections_refuses_with_53300_and_frees_on_close(make_fleet: Any, pg: Cluster) -> None:
    fleet: Fleet = make_fleet(listen={"max_client_connections": 2})
    first = psycopg.connect(fleet.dsn(), autocommit=True)
    with psycopg.connect(fleet.dsn(), autocommit=True):
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(fleet.dsn(), autocommit=True)
        text = str(refused.value)
        assert "sorry, too many clients already" in text and "listen.max_client_connections" in text
        first.close()
        assert wait_for(lambda: _connects(fleet.dsn()))


def _connects(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_a_keys_max_connections_counts_only_that_key(make_fleet: Any, pg: Cluster) -> None:
    keys = [{"id": key, "secret": secret, "role": role, **({"max_connections": 1} if key == "pf_client" else {}),
             **({"user_id": 42} if role == "database" else {})} for key, (secret, role) in KEYS.items()]
    fleet: Fleet = make_fleet(keys=keys)
    with psycopg.connect(fleet.dsn("pf_client"), autocommit=True) as one:
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(fleet.dsn("pf_client"), autocommit=True)
        assert 'too many connections for key "pf_client"' in str(refused.value)
        with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as other:  # other keys are not counted
            assert other.execute("select 1").fetchone() == (1,)
        assert one.execute("select 1").fetchone() == (1,)
    assert wait_for(lambda: _connects(fleet.dsn("pf_client")))
    # A refused login (wrong secret) does not use up the key's one connection.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(fleet.dsn("pf_client", secret="wrong"))
    assert _connects(fleet.dsn("pf_client"))


def _fleet_with_table(make_fleet: Any, pg: Cluster, role: str, table: str, shutdown_timeout: str
                      ) -> tuple[Fleet, subprocess.Popen[bytes]]:
    pg.psql(f"drop table if exists {table}; create table {table} (a int); grant all on {table} to public",
            dbname="bank")
    fleet: Fleet = make_fleet(databases=own_primary(pg, role), shutdown_timeout=shutdown_timeout)
    assert fleet.proc is not None
    return fleet, fleet.proc


def _count(pg: Cluster, table: str) -> int:
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]  # type: ignore[index]


def _running(pg: Cluster, role: str, query: str) -> bool:
    """Whether a statement starting with ``query`` is running on a backend of ``role``."""
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where usename = %s and state = 'active' "
                           "and starts_with(query, %s)", (role, query)).fetchone()
    return row is not None and row[0] > 0


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return False
    except OSError:
        return True


def test_sigterm_lets_an_open_transaction_finish_and_closes_idle_clients(make_fleet: Any, pg: Cluster,
                                                                        own_role: str) -> None:
    fleet, proc = _fleet_with_table(make_fleet, pg, own_role, "pf_shutdown_a", "20s")
    with psycopg.connect(fleet.dsn()) as busy, Raw(fleet.port) as idle:
        idle.login("pf_server", KEYS["pf_server"][0])
        assert rows(idle.query("select 1")) == [["1"]]
        busy.execute("insert into pf_shutdown_a values (1)")  # a transaction left open
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: _refuses_connections(fleet.port), timeout=5)  # stopped accepting
        # The idle client is told why, then closed (read off the wire: a driver that writes to
        # the closed socket first may report only that it is closed).
        closed = idle.error_then_close()
        assert closed["C"] == "57P01" and "pgfleet is shutting down" in closed["M"], closed
        busy.execute("insert into pf_shutdown_a values (2)")  # the transaction goes on
        busy.commit()
        with pytest.raises(psycopg.OperationalError):  # and its client is closed once it ended
            busy.execute("select 1")
    assert proc.wait(10) == 0
    assert _count(pg, "pf_shutdown_a") == 2
    assert wait_for(lambda: backends(pg, own_role) == 0, timeout=5)


def test_sigterm_disconnects_a_transaction_that_outlives_shutdown_timeout(make_fleet: Any, pg: Cluster,
                                                                          own_role: str) -> None:
    fleet, proc = _fleet_with_table(make_fleet, pg, own_role, "pf_shutdown_b", "1s")
    with psycopg.connect(fleet.dsn()) as conn:
        conn.execute("insert into pf_shutdown_b values (1)")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 5
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    assert _count(pg, "pf_shutdown_b") == 0  # rolled back
    assert wait_for(lambda: backends(pg, own_role) == 0, timeout=5)
    assert "still in a transaction after 1s" in fleet.log()


def test_sigint_lets_a_running_statement_finish_but_not_an_idle_transaction(make_fleet: Any, pg: Cluster,
                                                                            own_role: str) -> None:
    fleet, proc = _fleet_with_table(make_fleet, pg, own_role, "pf_shutdown_c", "20s")
    with psycopg.connect(fleet.dsn()) as idle_tx, psycopg.connect(fleet.dsn(), autocommit=True) as running:
        idle_tx.execute("insert into pf_shutdown_c values (1)")
        answer: list[Any] = []
        worker = threading.Thread(target=lambda: answer.append(
            running.execute("select pg_sleep(1.5), 'done'").fetchone()))
        worker.start()
        assert wait_for(lambda: _running(pg, own_role, "select pg_sleep(1.5)"), timeout=10), \
            "the statement never started"
        proc.send_signal(signal.SIGINT)  # while it runs
        worker.join(10)
        assert answer == [("", "done")]  # the running statement got its answer
        with pytest.raises(psycopg.OperationalError):
            idle_tx.execute("select 1")
    assert proc.wait(10) == 0
    assert _count(pg, "pf_shutdown_c") == 0
    assert wait_for(lambda: backends(pg, own_role) == 0, timeout=5)


def test_a_refused_client_past_the_limit_costs_no_backend(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(listen={"max_client_connections": 1}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        for _ in range(5):
            with pytest.raises(psycopg.OperationalError, match="too many clients"):
                psycopg.connect(fleet.dsn(), autocommit=True)
        assert backends(pg, own_role) <= 1


@pytest.mark.parametrize("statement", ["drop database pf_going", "alter database pf_going rename to pf_gone"])
def test_drop_or_rename_database_closes_pgfleets_idle_connections_to_it_first(
        make_fleet: Any, pg: Cluster, statement: str) -> None:
    """pgfleet's pooled connections to a database (idle in the pool, or parked with a client
    between transactions) would make PostgreSQL refuse DROP DATABASE (55006); pgfleet closes
    them before the statement runs."""
    for name in ("pf_going", "pf_gone"):
        pg.psql(f"drop database if exists {name}")
    pg.create_database("pf_going")
    try:
        fleet: Fleet = make_fleet(databases={"primary": {"dsn": pg.dsn("bank")}, "going": {"dsn": pg.dsn("pf_going")}})
        # The first health checks (started with pgfleet) are over: a check's connection to
        # pf_going, not pgfleet's to close, would make the DROP wait for it.
        fleet.health_checked()
        with psycopg.connect(fleet.dsn(database="going"), autocommit=True) as parked:
            parked.execute("select 1")  # its backend stays parked with it
            for _ in range(2):  # and one more goes back to the pool idle
                with psycopg.connect(fleet.dsn(database="going"), autocommit=True) as other:
                    other.execute("select 1")
            with psycopg.connect(fleet.dsn(), autocommit=True) as admin:
                started = time.monotonic()
                admin.execute(statement)
                assert time.monotonic() - started < 4  # PostgreSQL waits 5 s for others, then refuses
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            names = {r[0] for r in conn.execute("select datname from pg_database")}
        assert "pf_going" not in names
        assert "closed 2 idle connection(s) of database going to pf_going" in fleet.log()
    finally:
        for name in ("pf_going", "pf_gone"):
            pg.psql(f"drop database if exists {name} with (force)")


def test_a_keys_statement_timeout_cancels_its_long_statements_only(make_fleet: Any, pg: Cluster) -> None:
    keys = [{"id": key, "secret": secret, "role": role, **({"statement_timeout": "500ms"} if key == "pf_client" else {}),
             **({"user_id": 42} if role == "database" else {})} for key, (secret, role) in KEYS.items()]
    fleet: Fleet = make_fleet(keys=keys)
    with psycopg.connect(fleet.dsn("pf_client"), autocommit=True) as guarded:
        guarded.execute("set statement_timeout = 0")  # the client's own setting cannot lift pgfleet's guard
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            guarded.execute("select pg_sleep(5)")
        assert time.monotonic() - started < 2
        for _ in range(3):  # short statements, and the session, go on
            assert guarded.execute("select pg_sleep(0.05), 1").fetchone() == ("", 1)
        with guarded.transaction():  # an idle transaction is not a running statement
            guarded.execute("select 1")
            time.sleep(0.8)
            assert guarded.execute("select 2").fetchone() == (2,)
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as other:  # other keys: no guard
        assert other.execute("select pg_sleep(0.8), 3").fetchone() == ("", 3)
    assert "ran past the key's statement_timeout (0.5s): cancelled" in fleet.log()
