"""Session settings in transaction pooling: a client's SETs are its own, as on one server.

Every test runs the same steps on a direct connection and through pgfleet, where a pool of
one backend is shared with a noisy neighbour that changes its own settings between the
steps, and compares what each SHOW answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster

from .conftest import Fleet, fleet_config

PROBES = ("search_path", "statement_timeout", "timezone", "application_name", "work_mem", "app.tenant")


@pytest.fixture(scope="module")
def shared(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One backend for everybody: whatever a client leaves on it, the next client would see."""
    config = fleet_config(pg, pool={"size": 1, "acquire_timeout": "5s"}, tables={},
                          databases={"primary": {"dsn": pg.dsn("bank", user="pf_trust")}})
    proc = Fleet(config, tmp_path_factory.mktemp("settings")).start()
    try:
        yield proc
    finally:
        proc.stop()


def show(conn: psycopg.Connection[Any]) -> dict[str, str]:
    row = conn.execute("select " + ", ".join(f"current_setting('{p}', true)" for p in PROBES)).fetchone()
    assert row is not None
    # A custom setting (app.tenant) that another client created on a shared backend exists
    # there from then on: reset, it reads '' rather than NULL (docs/decisions.md).
    return {name: value or "" for name, value in zip(PROBES, row, strict=True)}


def noise(conn: psycopg.Connection[Any]) -> None:
    conn.execute("set search_path = pg_catalog")
    conn.execute("set statement_timeout = '7s'")
    conn.execute("select set_config('app.tenant', 'noise', false)")


def replay(steps: list[str], direct: psycopg.Connection[Any], fleet: psycopg.Connection[Any],
           neighbour: psycopg.Connection[Any]) -> None:
    """Run each step on both, then compare every setting; the neighbour meddles in between."""
    for step in steps:
        outcomes = []
        for conn in (direct, fleet):
            try:
                conn.execute(step)
                outcomes.append("ok")
            except psycopg.Error as exc:
                outcomes.append(exc.sqlstate or "?")
        assert outcomes[0] == outcomes[1], (step, outcomes)
        noise(neighbour)
        assert show(fleet) == show(direct), step
        noise(neighbour)


SCENARIOS = {
    "set and reset": ["set statement_timeout = '1234ms'", "set search_path = public, pg_catalog",
                      "set timezone = 'Asia/Tokyo'", "reset statement_timeout", "set work_mem to default"],
    "set_config": ["select set_config('app.tenant', '42', false)", "select set_config('work_mem', '9MB', false)",
                   "select set_config('app.tenant', 'local', true)"],
    "reset all": ["set statement_timeout = 5000", "set application_name = 'mine'", "reset all"],
    "quoted list": ['set search_path = "$user", "Odd Name", public'],
    "discard all": ["set work_mem = '3MB'", "discard all"],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_settings_follow_the_client_in_autocommit(shared: Fleet, pg: Cluster, name: str) -> None:
    # Both name the application: one that names none sees pgfleet's name (docs/decisions.md).
    start = {"options": "-c statement_timeout=3s -c search_path=public", "application_name": "tester"}
    with psycopg.connect(pg.dsn("bank", user="pf_trust"), autocommit=True, **start) as direct, \
            psycopg.connect(shared.dsn(), autocommit=True, **start) as fleet, \
            psycopg.connect(shared.dsn(), autocommit=True) as neighbour:
        assert show(fleet) == show(direct)
        replay(SCENARIOS[name], direct, fleet, neighbour)


def test_sets_in_a_rolled_back_or_failed_transaction_do_not_hold(shared: Fleet, pg: Cluster) -> None:
    with psycopg.connect(pg.dsn("bank", user="pf_trust"), application_name="t") as direct, \
            psycopg.connect(shared.dsn(), application_name="t") as fleet, \
            psycopg.connect(shared.dsn(), autocommit=True) as neighbour:
        for conn in (direct, fleet):
            conn.execute("set statement_timeout = '2s'")
            conn.commit()
            conn.execute("set statement_timeout = '9s'")
            conn.execute("set local work_mem = '7MB'")
            conn.rollback()
        noise(neighbour)
        assert show(fleet) == show(direct)
        assert show(fleet)["statement_timeout"] == "2s"
        for conn in (direct, fleet):
            conn.rollback()
            conn.execute("set statement_timeout = '11s'")
            with pytest.raises(pgerrors.DivisionByZero):
                conn.execute("select 1/0")
            conn.rollback()
        noise(neighbour)
        assert show(fleet) == show(direct)
        assert show(fleet)["statement_timeout"] == "2s"


def test_sets_in_one_simple_query_that_fails_do_not_hold(shared: Fleet) -> None:
    with psycopg.connect(shared.dsn(), autocommit=True) as fleet, \
            psycopg.connect(shared.dsn(), autocommit=True) as neighbour:
        before = show(fleet)["statement_timeout"]
        with fleet.cursor() as cur, pytest.raises(pgerrors.DivisionByZero):
            cur.execute(b"set statement_timeout = '13s'; select 1/0", prepare=False)  # one Query message
        noise(neighbour)
        assert show(fleet)["statement_timeout"] == before


def test_simple_protocol_sets_are_followed(shared: Fleet) -> None:
    """psql sends simple Query messages; a SET there is the client's too."""
    out = shared.psql("set statement_timeout = '4321ms'; select 1", "pf_server", "app",
                      check=True)
    assert out.stdout.split() == ["SET", "1"]
    with psycopg.connect(shared.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        got = shared.psql("show statement_timeout").stdout.strip()
        assert got != "4321ms"  # a new client starts from its own startup settings
    with psycopg.connect(shared.dsn(), autocommit=True) as fleet, \
            psycopg.connect(shared.dsn(), autocommit=True) as neighbour:
        fleet.execute(b"set statement_timeout = '4321ms'", prepare=False)
        fleet.cursor().execute(b"set search_path = pg_catalog, public; set work_mem = '6MB'", prepare=False)
        noise(neighbour)
        got = show(fleet)
        assert (got["statement_timeout"], got["search_path"], got["work_mem"]) == ("4321ms", "pg_catalog, public",
                                                                                    "6MB")
