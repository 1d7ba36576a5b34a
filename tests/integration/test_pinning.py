"""Pinning in transaction mode: statements that leave session state on their backend (LISTEN,
session advisory locks, temporary tables, SQL PREPARE, WITH HOLD cursors) keep the client on
that backend until it disconnects or drops the state (DISCARD ALL, UNLISTEN *, ...); the
backend is reset before another client gets it. Real clusters, psycopg."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster

from .conftest import Fleet
from .test_pool import own_primary, wait_for


def pid(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]


PINS = {
    "LISTEN": ("listen pf_channel", "select count(*) from pg_listening_channels()"),
    "advisory lock": ("select pg_advisory_lock(4242)",
                      "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"),
    "temporary table": ("create temp table pf_scratch (a int); insert into pf_scratch values (1)",
                        # (this backend's own temporary schema: pg_class shows every session's, and the
                        # pinned client's is dropped by its reset only a moment after it leaves)
                        ("select count(*) from pg_class where relname = 'pf_scratch' "
                         "and relnamespace = pg_my_temp_schema()")),
    "PREPARE": ("prepare pf_plan as select 41 + 1",
                "select count(*) from pg_prepared_statements where name = 'pf_plan'"),
    "WITH HOLD cursor": ("begin; declare pf_cur cursor with hold for select 1; commit",
                         "select count(*) from pg_cursors where name = 'pf_cur'"),
}


@pytest.mark.parametrize("state", sorted(PINS))
def test_session_state_pins_the_client_and_is_reset_before_the_next_client(
        make_fleet: Any, pg: Cluster, state: str, own_role: str) -> None:
    """Pool of two: the pinned client keeps its backend across transactions while another
    client alternates on the other; when it leaves, the next client of that backend sees none
    of its state."""
    create, count = PINS[state]
    fleet: Fleet = make_fleet(pool={"size": 2, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a:
        a.execute(create)
        mine = pid(a)
        assert a.execute(count).fetchone() == (1,)
        with psycopg.connect(fleet.dsn(), autocommit=True) as b:
            for _ in range(5):
                with b.transaction():
                    assert pid(b) != mine  # never the pinned backend
                assert pid(a) == mine
                assert a.execute(count).fetchone() == (1,)
    # Whoever comes next may get that backend, and finds it clean.
    with psycopg.connect(fleet.dsn(), autocommit=True) as c:
        for _ in range(4):
            assert c.execute(count).fetchone() == (0,)


def test_the_state_works_across_transactions_through_the_pin(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 2, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        a.execute("prepare pf_answer(int) as select $1 * 2")
        a.execute("create temp table pf_notes (n text)")
        a.execute("listen pf_wake")
        for i in range(3):
            with b.transaction():
                b.execute("select 1")
            assert a.execute(f"execute pf_answer({21 + i})").fetchone() == (42 + 2 * i,)
            a.execute("insert into pf_notes values (%s)", (f"n{i}",))
        assert a.execute("select count(*) from pf_notes").fetchone() == (3,)
        b.execute("notify pf_wake, 'hello'")
        assert wait_for(lambda: a.execute("select 1") is not None and any(  # polls for the notification
            n.channel == "pf_wake" and n.payload == "hello" for n in a.notifies(timeout=0.2, stop_after=1)),
            timeout=5)


def test_an_advisory_lock_is_held_until_unlocked_or_the_client_leaves(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    fleet: Fleet = make_fleet(pool={"size": 2, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as b:
        with psycopg.connect(fleet.dsn(), autocommit=True) as a:
            assert a.execute("select pg_try_advisory_lock(777)").fetchone() == (True,)
            for _ in range(3):  # a keeps it between its transactions
                assert b.execute("select pg_try_advisory_lock(777)").fetchone() == (False,)
                a.execute("select 1")
        # a left: its backend was reset (its session lock released) before anyone got it back
        assert wait_for(lambda: b.execute("select pg_try_advisory_lock(777)").fetchone() == (True,))
        b.execute("select pg_advisory_unlock_all()")


@pytest.mark.parametrize(("create", "release"), [
    ("listen pf_x", "unlisten *"),
    ("create temp table pf_t (a int)", "discard temp"),
    ("prepare pf_p as select 1", "deallocate all"),
    ("select pg_advisory_lock(99)", "select pg_advisory_unlock_all()"),
    ("listen pf_y; create temp table pf_u (a int)", "discard all"),
])
def test_dropping_the_state_releases_the_pin(
        make_fleet: Any, pg: Cluster, create: str, release: str, own_role: str) -> None:
    """Pool of one: a pinned client holds the only backend (the other waits and times out);
    once it drops its state, the other client gets the backend."""
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "1s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        a.execute(create)
        with pytest.raises(pgerrors.OperationalError) as waited:
            b.execute("select 1")
        assert waited.value.sqlstate == "53300"
        a.execute(release)
        assert b.execute("select 1").fetchone() == (1,)


def test_a_failed_release_keeps_the_pin(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """DISCARD ALL inside a transaction block fails: the state stays, and so does the pin."""
    fleet: Fleet = make_fleet(pool={"size": 1, "acquire_timeout": "1s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        a.execute("create temp table pf_keep (a int)")
        with pytest.raises(pgerrors.ActiveSqlTransaction), a.transaction():
            a.execute("discard all")
        assert a.execute("select count(*) from pf_keep").fetchone() == (0,)
        with pytest.raises(pgerrors.OperationalError):
            b.execute("select 1")


def test_a_pinned_client_is_refused_another_database_with_what_to_do(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    pg.create_database("pin_other")
    try:
        fleet: Fleet = make_fleet(databases={**own_primary(pg, own_role), "other": {"dsn": pg.dsn("pin_other")}},
                                  tables={"pf_elsewhere": "other"})
        pg.psql("create table pf_elsewhere (a int)", dbname="pin_other")
        with psycopg.connect(fleet.dsn(), autocommit=True) as a:
            a.execute("listen pf_z")
            with pytest.raises(pgerrors.FeatureNotSupported) as refused:
                a.execute("select * from pf_elsewhere")
            assert "keeps its backend of database primary" in str(refused.value)
            assert "LISTEN" in str(refused.value)
            a.execute("unlisten *")
            assert a.execute("select count(*) from pf_elsewhere").fetchone() == (0,)
    finally:
        pg.psql("drop database if exists pin_other with (force)")


def test_a_notification_names_the_notifying_pgfleet_client(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """Transaction mode: a NotificationResponse carries the pid the notifier knows itself by
    (pgfleet's BackendKeyData), not that of whichever pooled backend ran its NOTIFY; the
    listener's own notifications carry its own (issue 17, psycopg's suite)."""
    fleet: Fleet = make_fleet(pool={"size": 3, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a, psycopg.connect(fleet.dsn(), autocommit=True) as b:
        a.execute("listen pf_who")
        b.execute("notify pf_who, 'from b'")
        a.execute("notify pf_who, 'from a'")
        got: dict[str, int] = {}

        def heard() -> bool:
            a.execute("select 1")
            for n in a.notifies(timeout=0.2, stop_after=2):
                got[n.payload] = n.pid
            return len(got) == 2

        assert wait_for(heard, timeout=5), got
        assert got == {"from b": b.info.backend_pid, "from a": a.info.backend_pid}
        assert b.info.backend_pid != b.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]


def test_a_pinned_backend_that_dies_is_not_replaced_silently(make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """Its LISTEN (the session state that pinned it) went with it: the client is told, as
    PostgreSQL would tell it, rather than carrying on without its notifications."""
    fleet: Fleet = make_fleet(pool={"size": 2, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as a:
        a.execute("listen pf_lost")
        backend = a.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (backend,))
        with pytest.raises(psycopg.OperationalError):
            wait_for(lambda: a.execute("select 1") is None, timeout=5)


def test_deallocate_of_a_sql_statement_leaves_the_drivers_statements_working(
        make_fleet: Any, pg: Cluster, own_role: str) -> None:
    """SQL DEALLOCATE name does not say which statement went: pgfleet once forgot all it had
    prepared on that backend and prepared them again, and PostgreSQL answered 42P05 (already
    exists). Each is now closed first, then prepared again."""
    fleet: Fleet = make_fleet(pool={"size": 2, "acquire_timeout": "2s"}, databases=own_primary(pg, own_role))
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        conn.execute("prepare pf_mine as select 1")  # SQL PREPARE: the client keeps this backend
        assert conn.execute("select %s::int + 1", (1,), prepare=True).fetchone() == (2,)
        conn.execute("deallocate pf_mine")
        assert conn.execute("select %s::int + 1", (2,), prepare=True).fetchone() == (3,)
        assert conn.execute("select %s::int * 3", (2,), prepare=True).fetchone() == (6,)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("execute pf_mine")
