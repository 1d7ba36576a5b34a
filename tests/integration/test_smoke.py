"""The walking skeleton end to end: psql and psycopg through pgfleet to the right database."""

from __future__ import annotations

import psycopg

from .conftest import Fleet


def test_psql_reaches_default_and_mapped_databases(fleet: Fleet) -> None:
    assert fleet.psql("select current_database()").stdout.strip() == "bank"
    assert fleet.psql("select count(*) > 0 from events").stdout.strip() == "t"
    assert fleet.psql("select current_database()", "pf_server", "analytics").stdout.strip() == "analytics"


def test_psycopg_parameters_and_transactions(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn()) as conn:
        row = conn.execute("select %s::int + %s::int, current_database()", (2, 3)).fetchone()
        assert row == (5, "bank")
        with conn.transaction():
            conn.execute("create temp table if not exists t_smoke (a int)")
            conn.execute("insert into t_smoke values (%s)", (1,))
            assert conn.execute("select count(*) from t_smoke").fetchone() == (1,)
