"""Pools through a running pgfleet: acquire timeout (53300), session and transaction modes,
reset on return, and a backend count that never exceeds the pool size.

Backends are counted in pg_stat_activity over a direct connection to the cluster. pgfleet
passes the client's application_name on with SET, so these tests give their fleet's primary
a backend role of the test's own (``own_role``: no other fleet, no earlier test, uses it) and
count by user name, leaving out pgfleet's control-plane connections (its health checks log in
as the same user): ``conftest.pooled_backends``. Nothing is asserted of a moment that could
look otherwise a few milliseconds later; what changes over time is waited for, with a deadline.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster

from .conftest import OWN_ROLE_PASSWORD, Fleet, pooled_backends, wait_until


def backends(pg: Cluster, user: str, dbname: str = "bank") -> int:
    """The fleet's pooled backends of ``user`` (its own role) on ``dbname``."""
    return pooled_backends(pg, user, dbname)


def own_primary(pg: Cluster, role: str) -> dict[str, Any]:
    return {"primary": {"dsn": pg.dsn("bank", user=role, password=OWN_ROLE_PASSWORD)}}


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    return wait_until(predicate, timeout, 0.05)


def alive(pg: Cluster, pid: int) -> bool:
    """Whether the server process ``pid`` is still there."""
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        return conn.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone() == (1,)


# ---------------------------------------------------------------------------------------------
# acquire timeout


def test_acquire_timeout_is_53300_naming_database_and_pool_size(make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "500ms"})
    with psycopg.connect(fleet.dsn()) as holder, psycopg.connect(fleet.dsn(), autocommit=True) as waiter:
        holder.execute("select 1")  # BEGIN + select: the only backend is now in a transaction
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as err:
            waiter.execute("select 2")
        waited = time.monotonic() - started
        assert err.value.sqlstate == "53300"
        message = err.value.diag.message_primary or ""
        assert "primary" in message and "pool size 1" in message
        assert 0.4 <= waited < 5, waited
        # the waiter's session survives the refusal; once the holder commits it gets the backend
        holder.commit()
        assert waiter.execute("select 3").fetchone() == (3,)
        # and the holder can still work too
        assert holder.execute("select 4").fetchone() == (4,)
        holder.commit()


def test_acquire_timeout_in_the_extended_protocol(make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "300ms"})
    with psycopg.connect(fleet.dsn()) as holder, \
            psycopg.connect(fleet.dsn(), autocommit=True, prepare_threshold=0) as waiter:
        holder.execute("select 1")
        with pytest.raises(psycopg.Error) as err:
            waiter.execute("select %s::int", (2,))
        assert err.value.sqlstate == "53300"
        holder.rollback()
        assert waiter.execute("select %s::int", (3,)).fetchone() == (3,)


def test_a_waiting_client_gets_the_backend_as_soon_as_it_is_free(make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "10s"})
    with psycopg.connect(fleet.dsn()) as holder, psycopg.connect(fleet.dsn(), autocommit=True) as waiter:
        holder.execute("select 1")
        timer = threading.Timer(0.5, holder.commit)
        started = time.monotonic()  # before the timer: the commit comes 0.5 s after this at the soonest
        timer.start()
        try:
            assert waiter.execute("select 5").fetchone() == (5,)
            assert 0.4 <= time.monotonic() - started < 5
        finally:
            timer.join()


# ---------------------------------------------------------------------------------------------
# session mode


def test_session_mode_keeps_session_state_and_resets_it_for_the_next_client(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"mode": "session", "size": 1}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn()) as first:
        first.execute("create temp table session_tmp (a int)")
        first.execute("insert into session_tmp values (1)")
        first.commit()
        first.execute("set statement_timeout = '12345ms'")
        first.commit()
        first.execute("insert into session_tmp values (2)")
        first.commit()
        assert first.execute("select count(*) from session_tmp").fetchone() == (2,)
        assert first.execute("show statement_timeout").fetchone() == ("12345ms",)
        pid = first.execute("select pg_backend_pid()").fetchone()
        first.commit()
    with psycopg.connect(fleet.dsn(), autocommit=True) as second:
        # the same backend (pool size 1), reset with DISCARD ALL
        assert second.execute("select pg_backend_pid()").fetchone() == pid
        with pytest.raises(pgerrors.UndefinedTable):
            second.execute("select * from session_tmp")
        assert second.execute("show statement_timeout").fetchone() == ("0",)
    assert backends(pg, own_role) <= 1


def test_session_mode_keeps_one_backend_per_client(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"mode": "session", "size": 3, "acquire_timeout": "500ms"},
                              databases=own_primary(pg, own_role))
    conns = [psycopg.connect(fleet.dsn(), autocommit=True) for _ in range(3)]
    try:
        pids = {c.execute("select pg_backend_pid()").fetchone()[0] for c in conns}  # type: ignore[index]
        assert len(pids) == 3
        for c in conns:  # each client keeps its own backend across statements
            first = c.execute("select pg_backend_pid()").fetchone()
            assert c.execute("select pg_backend_pid()").fetchone() == first
        # a fourth client cannot get a backend while the three are connected
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(fleet.dsn(), autocommit=True).close()
        assert "53300" in str(err.value) or "pool size 3" in str(err.value)
    finally:
        for c in conns:
            c.close()
    with psycopg.connect(fleet.dsn(), autocommit=True) as again:
        assert again.execute("select 1").fetchone() == (1,)


# ---------------------------------------------------------------------------------------------
# transaction mode


def test_transaction_mode_two_clients_alternate_on_one_backend(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn()) as a, psycopg.connect(fleet.dsn()) as b:
        pids = set()
        for i in range(5):
            for conn, name in ((a, "a"), (b, "b")):
                with conn.transaction():
                    row = conn.execute("select pg_backend_pid(), %s::text, txid_current()", (f"{name}{i}",)
                                       ).fetchone()
                    assert row is not None and row[1] == f"{name}{i}"
                    pids.add(row[0])
        assert len(pids) == 1
    assert backends(pg, own_role) <= 1


def test_transaction_mode_settings_do_not_leak_to_other_clients(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """A client's SET stays the client's: the next client on the same backend does not see it."""
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        default = b.execute("show statement_timeout").fetchone()
        a.execute("set statement_timeout = '1234ms'")
        assert b.execute("show statement_timeout").fetchone() == default
        assert a.execute("show statement_timeout").fetchone() == ("1234ms",)
        a.execute("reset statement_timeout")
        assert a.execute("show statement_timeout").fetchone() == default


def test_transaction_mode_keeps_a_transaction_on_one_backend(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 4}, databases=own_primary(pg, own_role))
    conns = [psycopg.connect(fleet.dsn()) for _ in range(4)]
    try:
        for c in conns:
            c.execute("select 1")  # all four in a transaction: four backends pinned
        for c in conns:
            txid = c.execute("select txid_current(), pg_backend_pid()").fetchone()
            for _ in range(3):
                assert c.execute("select txid_current(), pg_backend_pid()").fetchone() == txid
        for c in conns:
            c.commit()
    finally:
        for c in conns:
            c.close()


def test_backend_count_never_exceeds_the_pool_size(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    size = 3
    fleet: Fleet = make_fleet(pool={"size": size, "acquire_timeout": "30s"},
                              databases=own_primary(pg, own_role))
    # No client yet, so no pooled backend: own_role is this test's alone, and the fleet's health
    # checks (which log in as it too) are not counted, whether or not one is running now.
    assert backends(pg, own_role) == 0
    seen: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def sample() -> None:
        try:
            while not stop.is_set():
                seen.append(backends(pg, own_role))
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def client(n: int) -> None:
        try:
            with psycopg.connect(fleet.dsn(), autocommit=n % 2 == 0) as conn:
                for i in range(6):
                    assert conn.execute("select %s::int from pg_sleep(0.01)", (i,)).fetchone() == (i,)
                    if not conn.autocommit:
                        conn.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join()
    assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
    # Backends stay open after the load (idle_timeout is 60 s): one last sample sees every
    # backend the load made the pool open, however the sampler's timing fell.
    seen.append(backends(pg, own_role))
    assert not errors, errors[:3]
    assert max(seen) <= size, seen
    assert max(seen) == size, f"the load never used the whole pool: {seen}"


def test_idle_timeout_closes_idle_backends(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 3, "idle_timeout": "1s"}, databases=own_primary(pg, own_role))
    conns = [psycopg.connect(fleet.dsn()) for _ in range(3)]
    try:
        for c in conns:
            c.execute("select 1")
        assert backends(pg, own_role) == 3
        for c in conns:
            c.commit()
    finally:
        for c in conns:
            c.close()
    assert wait_for(lambda: backends(pg, own_role) == 0, 8), backends(pg, own_role)
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:  # and new ones open on demand
        assert conn.execute("select 1").fetchone() == (1,)


def test_lifetime_replaces_old_backends(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 1, "lifetime": "1s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()
        assert first is not None
        # Past its lifetime the reaper (every second) takes the backend back from conn, which is
        # between transactions, and closes it: wait for that, rather than for a guessed time.
        assert wait_for(lambda: not alive(pg, first[0]), 10), f"backend {first[0]} outlived its 1s lifetime"
        second = conn.execute("select pg_backend_pid()").fetchone()
        assert first != second
    assert wait_for(lambda: backends(pg, own_role) <= 1, 5)


def test_clients_disconnecting_in_a_transaction_give_their_backend_back(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 2, "acquire_timeout": "3s"}, databases=own_primary(pg, own_role))
    for _ in range(6):
        conn = psycopg.connect(fleet.dsn())
        conn.execute("select txid_current()")  # in a transaction
        conn.close()  # gone without COMMIT: the backend is rolled back and reused (or replaced)
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert wait_for(lambda: backends(pg, own_role) <= 2, 5), backends(pg, own_role)


# ---------------------------------------------------------------------------------------------
# affinity: a backend stays with its client between transactions while nobody else needs it


def test_a_client_keeps_its_backend_between_transactions_while_the_pool_has_room(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 3}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        pid_a = {a.execute("select pg_backend_pid()").fetchone() for _ in range(5)}
        pid_b = {b.execute("select pg_backend_pid()").fetchone() for _ in range(5)}
        assert len(pid_a) == 1 and len(pid_b) == 1 and pid_a != pid_b
        assert backends(pg, own_role) == 2


def test_a_parked_backend_is_taken_back_for_a_client_that_needs_it(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """Pool size 1: the idle client's backend serves the other client at once, and comes back."""
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "1s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        a.execute("set statement_timeout = '4321ms'")
        first = a.execute("select pg_backend_pid()").fetchone()
        started = time.monotonic()
        assert b.execute("select pg_backend_pid()").fetchone() == first  # taken from a, no waiting
        assert b.execute("show statement_timeout").fetchone() != ("4321ms",)  # without a's settings
        assert time.monotonic() - started < 0.9  # well inside acquire_timeout: nobody waited for it
        assert a.execute("show statement_timeout").fetchone() == ("4321ms",)
        assert backends(pg, own_role) == 1


def test_a_client_in_a_transaction_keeps_its_backend_from_others(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "300ms"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn()) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        a.execute("select 1")  # a transaction is open: the backend is not a's to give
        with pytest.raises(psycopg.Error) as err:
            b.execute("select 2")
        assert err.value.sqlstate == "53300"
        a.commit()
        assert b.execute("select 2").fetchone() == (2,)


def test_a_parked_backend_that_dies_costs_its_idle_client_nothing(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 2}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", row)
        assert wait_for(lambda: backends(pg, own_role) == 0, 5)
        # pgfleet has read the termination (a statement sent before would race it: see
        # test_faults.test_a_reset_read_before_an_idle_clients_statement_costs_it_nothing)
        fleet.wait_logged("its idle backend went away")
        again = conn.execute("select pg_backend_pid()").fetchone()
        assert again is not None and again != row


def test_idle_timeout_retires_backends_parked_with_idle_clients(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 3, "idle_timeout": "1s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        assert backends(pg, own_role) == 1
        assert wait_for(lambda: backends(pg, own_role) == 0, 8), backends(pg, own_role)
        assert conn.execute("select 2").fetchone() == (2,)  # the client goes on with a new one


def test_session_mode_gives_the_client_its_backends_pid(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """In session mode pgfleet is close to invisible: the client is told its backend's own
    process id, so pg_backend_pid(), its NotificationResponses and pg_terminate_backend agree
    with what the driver knows; a cancel still goes through pgfleet (issue 17, psycopg's suite)."""
    fleet: Fleet = make_fleet(pool={"mode": "session", "size": 2}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn, \
            psycopg.connect(fleet.dsn(), autocommit=True) as other:
        assert conn.execute("select pg_backend_pid()").fetchone() == (conn.info.backend_pid,)
        conn.execute("listen pf_pid_channel")
        conn.execute("notify pf_pid_channel, 'x'")
        notice = next(conn.notifies(timeout=5, stop_after=1))
        assert notice.pid == conn.info.backend_pid
        other.execute("select pg_sleep(0)")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            threading.Timer(0.3, conn.cancel).start()
            conn.execute("select pg_sleep(10)")
        assert time.monotonic() - started < 5
        assert conn.execute("select 1").fetchone() == (1,)
        victim = other.info.backend_pid
        # pg_terminate_backend only signals: wait until that backend is gone (a query that
        # reaches it first would still be answered, directly as through pgfleet).
        conn.execute("select pg_terminate_backend(%s)", (victim,))
        deadline = time.monotonic() + 10
        while conn.execute("select count(*) from pg_stat_activity where pid = %s", (victim,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the terminated backend did not go away"
            time.sleep(0.02)
        with pytest.raises(psycopg.OperationalError):
            other.execute("select 1")


def test_session_mode_keeps_the_clients_statement_names(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """In session mode a protocol-level statement has the client's own name on its backend:
    SQL EXECUTE finds it, and after the client closes it the same name prepares a new text
    (issue 17, psycopg's suite)."""
    from proxy.wire import messages as m

    from .rawclient import Raw

    fleet: Fleet = make_fleet(pool={"mode": "session", "size": 2}, databases=own_primary(pg, own_role))
    with Raw(fleet.port) as raw:
        raw.login("pf_server", "server-secret")
        raw.send(m.parse("foobar", "select $1::int * 2") + m.SYNC_MSG)
        assert [msg.kind for msg in raw.until("Z")] == ["1", "Z"]
        rows = [msg for msg in raw.query("execute foobar(21)") if msg.kind == "D"]
        assert rows and rows[0].body.endswith(b"42")
        raw.send(m.close(m.TARGET_STATEMENT, "foobar") + m.parse("foobar", "select $1::int + 1")
                 + m.bind("", "foobar", b"\0\0\0\x01\0\0\0\x0221\0\0") + m.execute("") + m.SYNC_MSG)
        answer = raw.until("Z")
        assert [msg.kind for msg in answer] == ["3", "1", "2", "D", "C", "Z"], answer
        assert answer[3].body.endswith(b"22")
