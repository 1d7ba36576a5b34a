"""Shard-key bindings found in statements, from the real parser's tree."""

from __future__ import annotations

import json

import pytest
from pglast.parser import parse_sql_json

from proxy.router.keybind import KeyValue, Occurrence, occurrences

SHARDED = {"users": "user_id", "accounts": "user_id", "transactions": "user_id"}


def found(sql: str) -> list[Occurrence]:
    stmt = json.loads(parse_sql_json(sql))["stmts"][0]["stmt"]
    return sorted(occurrences(stmt, SHARDED), key=lambda o: (o.table, repr(o.values)))


def c(text: str) -> KeyValue:
    return KeyValue(text=text)


def p(n: int) -> KeyValue:
    return KeyValue(param=n)


CASES = [
    ("select * from users where user_id = 42", [Occurrence("users", (c("42"),))]),
    ("select * from users where 42 = user_id", [Occurrence("users", (c("42"),))]),
    ("select * from users where user_id = -5", [Occurrence("users", (c("-5"),))]),
    ("select * from users where user_id = '7'::int8", [Occurrence("users", (c("7"),))]),
    ("select * from users where user_id = 9223372036854775807", [Occurrence("users", (c("9223372036854775807"),))]),
    ("select * from users where user_id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
     [Occurrence("users", (c("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),))]),
    ("select * from users where user_id = $1", [Occurrence("users", (p(1),))]),
    ("select * from users u where u.user_id = $2 and u.name like 'a%'", [Occurrence("users", (p(2),))]),
    ("select * from public.users where public.users.user_id = 3", [Occurrence("users", (c("3"),))]),
    ("select * from users where users.user_id = 3", [Occurrence("users", (c("3"),))]),
    ("select * from users where user_id in (1, 2, $3)", [Occurrence("users", (c("1"), c("2"), p(3)))]),
    ("select * from users where user_id = any($1)", [Occurrence("users", (KeyValue(param=1, array=True),))]),
    ("select * from users where user_id = 1 or user_id = 2", [Occurrence("users", None)]),
    ("select * from users where not user_id = 1", [Occurrence("users", None)]),
    ("select * from users where user_id > 1", [Occurrence("users", None)]),
    ("select * from users where user_id = other_id", [Occurrence("users", None)]),
    ("select * from users where user_id = 1 + 1", [Occurrence("users", None)]),
    ("select * from users where user_id is null", [Occurrence("users", None)]),
    ("select * from users", [Occurrence("users", None)]),
    ("select * from users where (user_id = 5 and x) and y", [Occurrence("users", (c("5"),))]),
    ("update users set name = 'x' where user_id = 5", [Occurrence("users", (c("5"),))]),
    ("update users set user_id = 6 where user_id = 5", [Occurrence("users", (c("5"),))]),
    ("delete from users where user_id in (1, 2)", [Occurrence("users", (c("1"), c("2")))]),
    ("delete from users", [Occurrence("users", None)]),
    ("delete from accounts a using users u where u.user_id = 4 and a.user_id = u.user_id",
     [Occurrence("accounts", None), Occurrence("users", (c("4"),))]),
    ("with x as (select * from users where user_id = 8) select * from x", [Occurrence("users", (c("8"),))]),
    ("select * from (select * from users where user_id = 9) s", [Occurrence("users", (c("9"),))]),
    ("select * from (select * from users) s where s.user_id = 9", [Occurrence("users", None)]),
    ("select * from users u join accounts a on a.user_id = u.user_id where u.user_id = 1",
     [Occurrence("accounts", None), Occurrence("users", (c("1"),))]),
    ("select * from users u join accounts a on a.user_id = 2 where u.user_id = 1",
     [Occurrence("accounts", (c("2"),)), Occurrence("users", (c("1"),))]),
    ("select * from users u left join accounts a on a.user_id = 2",
     [Occurrence("accounts", None), Occurrence("users", None)]),
    ("select * from users u, accounts a where user_id = 1", [Occurrence("accounts", None), Occurrence("users", None)]),
    ("select * from events where user_id = 1", []),
    ("insert into users (user_id) values (1)", []),
    ("select * from users where user_id = (select 1)", [Occurrence("users", None)]),
]


@pytest.mark.parametrize(("sql", "expected"), CASES, ids=[sql for sql, _ in CASES])
def test_shard_key_bindings(sql: str, expected: list[Occurrence]) -> None:
    assert found(sql) == sorted(expected, key=lambda o: (o.table, repr(o.values)))
