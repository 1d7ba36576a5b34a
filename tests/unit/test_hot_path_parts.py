"""Small parts of the hot path: which texts the fast path must analyse for session state, and
the bounded map of backend-side statement names."""

from __future__ import annotations

import pytest

from proxy import fleet as fleet_module
from proxy.config import load_text
from proxy.fleet import Fleet
from proxy.frontend.session import _may_set


@pytest.mark.parametrize("sql", [
    "set search_path = a", "reset all", "select set_config('x.y', '1', false)",
    "select pg_catalog.set_config('x.y', '1', false)", "discard all", "listen c", "create temp table t (a int)",
    "prepare p as select 1", "deallocate p", "select pg_advisory_lock(1)", "declare c cursor with hold for select 1",
    "close c", "alter database d set x = 1", "select 1; reset role", "update t set a = 1 -- offset",
])
def test_statements_that_may_change_session_state_are_analysed(sql: str) -> None:
    assert _may_set(sql.encode())


@pytest.mark.parametrize("sql", [
    "select abalance from pgbench_accounts where aid = $1",
    "select * from t order by a limit 10 offset 20",
    "select * from dataset where id = 1",
    "select * from upset, preset where x = 1 offset 2",
])
def test_offset_and_dataset_keep_the_fast_path(sql: str) -> None:
    assert not _may_set(sql.encode())


def test_statement_names_are_bounded_and_never_given_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_module, "STATEMENT_NAMES", 3)
    fleet = Fleet(load_text("databases: {primary: {dsn: 'postgresql://u:p@127.0.0.1:1/db'}}\n"
                       "keys: [{id: k, secret: s, role: server}]\n", env={}))
    a = fleet.statement_name("select 1", b"")
    assert fleet.statement_name("select 1", b"") == a
    assert fleet.statement_name("select 1", b"\0\0\0\x17") != a  # other parameter types: another name
    b = fleet.statement_name("select 2", b"")
    assert fleet.statement_name("select 1", b"") == a  # used again: now the most recent
    c = fleet.statement_name("select 3", b"")  # the map is full: the least recently used goes
    names = {a, b, c}
    assert fleet.statement_name("select 1", b"") == a
    again = fleet.statement_name("select 1", b"\0\0\0\x17")  # was dropped: a new name
    assert again not in names and len(names) == 3
    assert len(fleet._statement_names) == 3
