"""The session cluster itself: reachable over TCP with each auth method, loaded with the demo."""

from __future__ import annotations

import psycopg
import pytest

from proxy.embedded import Cluster


@pytest.mark.parametrize(("user", "password"), [
    ("postgres", None),          # the superuser, SCRAM with the cluster's password
    ("pf_trust", None),
    ("pf_md5", "md5pass"),
    ("pf_scram", "scrampass"),
])
def test_select_1_over_tcp(pg: Cluster, user: str, password: str | None) -> None:
    with psycopg.connect(pg.dsn("bank", user=user, password=password), connect_timeout=5) as conn:
        assert conn.execute("select 1, current_user").fetchone() == (1, user)


def test_auth_methods_are_the_ones_asked_for(pg: Cluster) -> None:
    stored = pg.psql("select rolname || '=' || split_part(rolpassword, '$', 1) from pg_authid "
                     "where rolname in ('pf_md5', 'pf_scram') order by 1")
    assert stored.splitlines()[0].startswith("pf_md5=md5")
    assert stored.splitlines()[1] == "pf_scram=SCRAM-SHA-256"


@pytest.mark.parametrize("user", ["pf_md5", "pf_scram"])
def test_wrong_password_is_refused(pg: Cluster, user: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn("bank", user=user, password="wrong"), connect_timeout=5)


@pytest.mark.parametrize(("dbname", "table", "rows"), [
    ("bank", "users", 50), ("bank", "accounts", 60), ("bank", "transactions", 200),
    ("bank", "currencies", 5), ("secondary", "users", 50), ("secondary", "transactions", 200),
    ("analytics", "events", 300), ("analytics", "user_activity", 350),
])
def test_demo_tables_have_rows(pg: Cluster, dbname: str, table: str, rows: int) -> None:
    with psycopg.connect(pg.dsn(dbname, user="pf_scram", password="scrampass")) as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone() == (rows,)


def test_test_roles_share_what_they_create(pg: Cluster) -> None:
    md5 = pg.dsn("analytics", user="pf_md5", password="md5pass")
    with psycopg.connect(md5, autocommit=True) as conn:
        conn.execute("create table embedded_probe (id int)")
    try:
        with psycopg.connect(pg.dsn("analytics", user="pf_trust"), autocommit=True) as conn:
            conn.execute("insert into embedded_probe values (1)")
            conn.execute("insert into events (user_id, kind) values (1, 'probe') returning id")
            conn.execute("delete from events where kind = 'probe'")
    finally:
        with psycopg.connect(md5, autocommit=True) as conn:
            conn.execute("drop table embedded_probe")


def test_the_demo_sql_reloads_without_changes(pg: Cluster) -> None:
    from proxy.demo import BANK_SQL, load_sql

    before = pg.psql("select count(*), sum(amount) from transactions", dbname="bank")
    load_sql(pg, "bank", BANK_SQL)
    assert pg.psql("select count(*), sum(amount) from transactions", dbname="bank") == before


def test_primary_and_secondary_hold_identical_rows(pg: Cluster) -> None:
    digest = "select md5(string_agg(t::text, ',' order by id)) from transactions t"
    assert pg.psql(digest, dbname="bank") == pg.psql(digest, dbname="secondary")
