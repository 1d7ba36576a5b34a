"""The router's whole decision table on a sharded fleet: (SQL, params, key, hints) -> Route.

Fleet: shards primary (0) and secondary (1), hash function; users, accounts and transactions
sharded by user_id (bigint), devices by device_id (uuid), sessions by token (text);
currencies a reference table; events on analytics; audit.log on secondary.

Which shard owns a value is PostgreSQL's PARTITION BY HASH (proven against the server in
tests/integration/test_shard_hash.py): user_id 1, 2, 42 -> primary; 3, 4, 5 -> secondary;
token 'bob' -> primary, 'alice' -> secondary; uuid ...3dde -> primary, ...1eef -> secondary.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from proxy.auth.keys import ApiKey, load_keys
from proxy.config import load_text
from proxy.errors import ClientError
from proxy.router.route import All, Direct, Hints, Multi, Params, Route
from proxy.router.router import Router, SessionContext
from proxy.router.shard import shard_of

CONFIG = """
databases:
  primary: {dsn: 'postgresql://u@h/p'}
  secondary: {dsn: 'postgresql://u@h/s'}
  analytics: {dsn: 'postgresql://u@h/a'}
tables: {events: analytics, "audit.log": secondary}
sharding:
  shards: [primary, secondary]
  function: hash
  tables: {users: user_id, accounts: user_id, transactions: user_id, devices: device_id, sessions: token}
  reference_tables: [currencies]
  types: {users: bigint, accounts: bigint, transactions: bigint, devices: uuid, sessions: text}
keys:
  - {id: srv, secret: x, role: server}
  - {id: adm, secret: x, role: admin}
  - {id: cli, secret: x, role: client}
  - {id: ten, secret: x, role: database, user_id: 42}
  - {id: ana, secret: x, role: server, databases: [analytics]}
  - {id: ro, secret: x, role: server, read_only: true}
"""

CONFIG_OBJ = load_text(CONFIG, env={})
KEYS: dict[str, ApiKey] = load_keys(CONFIG_OBJ)
P, S, A = "primary", "secondary", "analytics"
U_P = "00000000-0000-0000-0000-000000003dde"  # a uuid on primary
U_S = "00000000-0000-0000-0000-000000001eef"  # a uuid on secondary
BOTH = (P, S)


class Refused:
    def __init__(self, sqlstate: str, *words: str) -> None:
        self.sqlstate = sqlstate
        self.words = words

    def __repr__(self) -> str:
        return f"Refused({self.sqlstate})"


def text(*values: Any) -> Params:
    return Params(tuple(None if v is None else str(v).encode() for v in values))


def binary_int8(*values: int) -> Params:
    return Params(tuple(struct.pack("!q", v) for v in values), (1,))


def int8_array(values: list[int]) -> bytes:
    """array_send() of a one-dimensional int8[]."""
    head = struct.pack("!iiIii", 1, 0, 20, len(values), 1)
    return head + b"".join(struct.pack("!i", 8) + struct.pack("!q", v) for v in values)


# (sql, params, key, session hints, expected): expected is a database (Direct), a tuple
# (Multi, or All when it is every shard), or Refused(sqlstate, words the message must hold).
TABLE: list[tuple[str, Params | None, str, Hints | None, Any]] = [
    # -- shard key bound by a constant
    ("select * from users where user_id = 42", None, "srv", None, P),
    ("select * from users where user_id = 3", None, "srv", None, S),
    ("select * from users where 3 = user_id", None, "srv", None, S),
    ("select * from users where user_id = '3'", None, "srv", None, S),
    ("select * from users where user_id = 3::bigint", None, "srv", None, S),
    ("select * from users u where u.user_id = 42 and u.name = 'x'", None, "srv", None, P),
    ("select * from public.users where users.user_id = 4", None, "srv", None, S),
    ("SELECT * FROM Users WHERE User_Id = 42", None, "srv", None, P),
    ("select * from accounts where user_id = 42 or user_id = 3", None, "srv", None, BOTH),
    ("select * from accounts where not (user_id = 42)", None, "srv", None, BOTH),
    ("select * from users where user_id = 'abc'", None, "srv", None, Refused("22P02", "bigint")),
    ("select * from users where user_id = 99999999999999999999", None, "srv", None, Refused("22003")),
    # -- IN lists: exactly the shards of the values
    ("select * from users where user_id in (1, 2, 42)", None, "srv", None, P),
    ("select * from users where user_id in (3, 4)", None, "srv", None, S),
    ("select * from users where user_id in (1, 3)", None, "srv", None, BOTH),
    ("select * from users where user_id in ($1, $2)", text(3, 5), "srv", None, S),
    ("select * from users where user_id in ($1, $2)", text(3, 42), "srv", None, BOTH),
    # -- parameters, text and binary
    ("select * from users where user_id = $1", text(42), "srv", None, P),
    ("select * from users where user_id = $1", text(3), "srv", None, S),
    ("select * from users where user_id = $1", binary_int8(3), "srv", None, S),
    ("select * from users where user_id = $1", Params((struct.pack("!i", 3),), (1,)), "srv", None, S),
    ("select * from users where user_id = $2 and name = $1", text("x", 42), "srv", None, P),
    ("select * from users where user_id = $1", text("x"), "srv", None, Refused("22P02")),
    ("select * from users where user_id = $1", text(None), "srv", None, P),  # NULL: no row anywhere
    ("select * from users where user_id = any($1)", text("{1,2,42}"), "srv", None, P),
    ("select * from users where user_id = any($1)", text("{1,3}"), "srv", None, BOTH),
    ("select * from users where user_id = any($1)", Params((int8_array([3, 4]),), (1,)), "srv", None, S),
    ("select * from users where user_id = any($1)", text("1,3"), "srv", None, Refused("22P02")),
    # -- other key types
    ("select * from sessions where token = 'bob'", None, "srv", None, P),
    ("select * from sessions where token = 'alice'", None, "srv", None, S),
    ("select * from sessions where token = $1", text("alice"), "srv", None, S),
    (f"select * from devices where device_id = '{U_P}'", None, "srv", None, P),
    (f"select * from devices where device_id = '{U_S}'", None, "srv", None, S),
    ("select * from devices where device_id = $1", text(U_S.upper()), "srv", None, S),
    ("select * from devices where device_id = $1", text("{" + U_S + "}"), "srv", None, S),
    ("select * from devices where device_id = 'not-a-uuid'", None, "srv", None, Refused("22P02", "uuid")),
    # -- CTEs, subqueries, joins on the shard key
    ("with x as (select * from users where user_id = 3) select * from x", None, "srv", None, S),
    ("select * from (select * from accounts where user_id = 42) a", None, "srv", None, P),
    ("select * from users u join accounts a on a.user_id = u.user_id where u.user_id = 3",
     None, "srv", None, S),
    ("select * from users u join accounts a on a.user_id = u.user_id and a.user_id = 42",
     None, "srv", None, P),
    ("select * from users u, accounts a where a.user_id = u.user_id and u.user_id = 4", None, "srv", None, S),
    ("select * from users u join accounts a on a.user_id = u.user_id", None, "srv", None, BOTH),
    (("select * from users u join accounts a on a.user_id = u.user_id join transactions t "
      "on t.user_id = a.user_id where u.user_id = 42"), None, "srv", None, P),
    (("select * from users u join accounts a on a.user_id = u.user_id where a.user_id = 1 "
      "and u.user_id = 3"), None, "srv", None, P),  # contradictory: no row; one shard answers
    ("select * from users u left join accounts a on a.user_id = u.user_id and a.user_id = 42",
     None, "srv", None, BOTH),  # an outer join's ON binds nothing
    # -- cross-shard joins refused, teaching what to do
    ("select * from users u join accounts a on a.id = u.user_id", None, "srv", None,
     Refused("0A000", "cross-shard join", "accounts", "users", "user_id", "hint")),
    ("select * from users u join sessions s on s.token = u.name", None, "srv", None,
     Refused("0A000", "cross-shard join")),
    ("select * from users where user_id in (select user_id from accounts)", None, "srv", None,
     Refused("0A000", "cross-shard join")),
    ("select * from users u join accounts a on a.id = u.user_id where u.user_id = 42 and a.user_id = 42",
     None, "srv", None, P),  # both bound to one shard: fine
    ("select * from users u join accounts a on a.id = u.user_id where u.user_id = 42 and a.user_id = 3",
     None, "srv", None, Refused("0A000", "cross-shard join")),
    # -- reference tables
    ("select * from currencies", None, "srv", None, P),
    ("select * from users u join currencies c on c.code = u.currency where u.user_id = 3",
     None, "srv", None, S),
    ("select * from accounts a join currencies c on c.code = a.currency", None, "srv", None, BOTH),
    ("insert into currencies values ('EUR')", None, "srv", None, BOTH),
    ("update currencies set name = 'x'", None, "srv", None, BOTH),
    ("select * from currencies c join events e on e.kind = c.code", None, "srv", None,
     Refused("0A000", "two databases", "events", "currencies")),
    # -- whole-fleet writes and DDL
    ("update accounts set balance = 0", None, "srv", None, BOTH),
    ("delete from transactions where amount < 0", None, "srv", None, BOTH),
    ("update accounts set balance = 0 where user_id = 3", None, "srv", None, S),
    ("delete from accounts where user_id = $1", text(42), "srv", None, P),
    ("create index on users (name)", None, "srv", None, BOTH),
    ("alter table accounts add column note text", None, "srv", None, BOTH),
    ("drop table transactions", None, "srv", None, BOTH),
    ("truncate currencies", None, "srv", None, BOTH),
    ("update users set user_id = 3 where user_id = 42", None, "srv", None,
     Refused("0A000", "users.user_id", "move the row")),
    # -- INSERT: rows grouped by shard
    ("insert into users (user_id, name) values (42, 'a')", None, "srv", None, P),
    ("insert into users (user_id, name) values (3, 'a'), (4, 'b')", None, "srv", None, S),
    ("insert into users (user_id, name) values (1, 'a'), (3, 'b')", None, "srv", None, BOTH),
    ("insert into users (name, user_id) values ($1, $2)", text("a", 3), "srv", None, S),
    ("insert into users (user_id) values (42) on conflict (user_id) do nothing returning *",
     None, "srv", None, P),
    ("insert into users (name) values ('a')", None, "srv", None, Refused("0A000", "user_id", "every row")),
    ("insert into users select * from users", None, "srv", None, Refused("0A000", "INSERT ... SELECT")),
    ("insert into users (user_id) values ($1)", text(None), "srv", None, Refused("23502", "user_id")),
    # -- fan-out reads
    ("select * from users", None, "srv", None, BOTH),
    ("select count(*) from accounts", None, "srv", None, BOTH),
    ("select * from users where name = 'x'", None, "srv", None, BOTH),
    # -- tables of two databases, and multi-statement strings
    ("select * from users u join events e on e.user_id = u.user_id where u.user_id = 42", None, "srv",
     None, Refused("0A000", "two databases", "events")),
    ("select * from users where user_id = 42; select * from events", None, "srv", None,
     Refused("0A000", "different places")),
    ("select * from users where user_id = 42; select * from users where user_id = 1", None, "srv",
     None, P),
    ("select * from audit.log; select * from users where user_id = 3", None, "srv", None, S),
    ("select * from events", None, "srv", None, A),
    ("select 1", None, "srv", None, P),
    # -- hints: comments
    ("/* pgfleet: shard_key=3 */ select * from users", None, "srv", None, S),
    ("/* pgfleet: shard_key=42 */ select 1", None, "srv", None, P),
    ("/* pgfleet: shard=1 */ select count(*) from users", None, "srv", None, S),
    ("/* pgfleet: database=analytics */ select 1", None, "adm", None, A),
    ("/* pgfleet: databases=primary,secondary */ select 1", None, "srv", None, BOTH),
    ("/* pgfleet: shard=2 */ select 1", None, "srv", None, Refused("22023", "2 shards")),
    ("/* pgfleet: database=nope */ select 1", None, "srv", None, Refused("3D000", "nope")),
    ("/* pgfleet: colour=blue */ select 1", None, "srv", None, Refused("42601", "colour")),
    ("/* pgfleet: shard_key=x */ select * from users", None, "srv", None, Refused("22P02")),
    # -- hints: session settings (SET pgfleet.*)
    ("select * from users", None, "srv", Hints(shard_key="3"), S),
    ("select 1", None, "srv", Hints(database="analytics"), A),
    ("/* pgfleet: shard=0 */ select 1", None, "srv", Hints(database="analytics"), P),  # comment wins
    # -- client keys: the default database, always
    ("select * from users", None, "cli", None, P),
    ("/* pgfleet: database=analytics */ select * from events", None, "cli", None, P),
    # -- allow-lists and read-only
    ("select * from users where user_id = 3", None, "ana", None, Refused("42501", "ana", "secondary")),
    ("select * from events", None, "ana", None, A),
    ("update accounts set balance = 0 where user_id = 3", None, "ro", None, Refused("25006")),
    ("select * from accounts where user_id = 3", None, "ro", None, S),
    # -- database keys: their own shard and nothing else (user_id 42 -> primary)
    ("select * from accounts where user_id = 42", None, "ten", None, P),
    (("select * from accounts a join users u on u.user_id = a.user_id where a.user_id = 42 "
      "and u.user_id = 42"), None, "ten", None, P),
    ("select * from accounts where user_id = $1", text(42), "ten", None, P),
    ("insert into accounts (user_id, balance) values (42, 0)", None, "ten", None, P),
    ("select * from currencies", None, "ten", None, P),
    ("select 1", None, "ten", None, P),
    ("select * from accounts where user_id = 43", None, "ten", None, Refused("42501", "ten", "43")),
    ("select * from accounts where user_id = 1", None, "ten", None, Refused("42501")),  # same shard, not its rows
    ("select * from accounts where user_id = $1", text(1), "ten", None, Refused("42501")),
    ("select * from accounts where user_id in (42, 1)", None, "ten", None, Refused("42501")),
    ("select * from accounts", None, "ten", None, Refused("42501", "other tenants")),
    ("update accounts set balance = 0", None, "ten", None, Refused("42501")),
    ("insert into accounts (user_id) values (42), (1)", None, "ten", None, Refused("42501")),
    ("/* pgfleet: shard_key=42 */ select * from accounts", None, "ten", None, Refused("42501", "hint")),
    ("select * from accounts where user_id = 42", None, "ten", Hints(database="secondary"),
     Refused("42501", "hint")),
    ("select * from events", None, "ten", None, Refused("42501", "analytics")),
    ("update currencies set name = 'x'", None, "ten", None, Refused("42501", "reference")),
    ("create index on accounts (balance)", None, "ten", None, Refused("42501")),
]


def ctx(key: str, database: str | None = None) -> SessionContext:
    return SessionContext(KEYS[key], database)


def targets(route: Route) -> str | tuple[str, ...]:
    target = route.target
    if isinstance(target, Direct):
        return target.database
    assert isinstance(target, Multi | All)
    return target.databases


@pytest.mark.parametrize(("sql", "params", "key", "hints", "expected"), TABLE,
                         ids=[f"{row[2]}:{row[0][:60]}" for row in TABLE])
def test_route(sql: str, params: Params | None, key: str, hints: Hints | None, expected: Any) -> None:
    router = Router(CONFIG_OBJ)
    if isinstance(expected, Refused):
        with pytest.raises(ClientError) as err:
            route = router.route(sql, ctx(key), hints, params)
            if route.needs_params:
                router.route(sql, ctx(key), hints, params or Params(()))
        assert err.value.sqlstate == expected.sqlstate, err.value.message
        for word in expected.words:
            assert word in err.value.message + " " + (err.value.hint or "") or word == "hint", \
                (word, err.value.message)
        if "hint" in expected.words:
            assert err.value.hint or "hint" in err.value.message
        return
    route = router.route(sql, ctx(key), hints, params)
    assert not route.needs_params, "every parameter was given"
    assert targets(route) == expected, route.reason
    if expected == BOTH and "pgfleet:" not in sql:
        assert isinstance(route.target, All)
    assert route.reason


def test_the_table_is_big_enough() -> None:
    assert len(TABLE) >= 80


def test_without_parameters_the_route_waits_for_bind() -> None:
    router = Router(CONFIG_OBJ)
    route = router.route("select * from users where user_id = $1", ctx("srv"))
    assert route.needs_params and isinstance(route.target, Direct)  # somewhere to Parse/Describe
    route = router.route("select * from users where user_id = $1", ctx("srv"), None, text(3))
    assert route.target == Direct(S) and not route.needs_params


def test_insert_rows_are_assigned_their_shards_in_order() -> None:
    router = Router(CONFIG_OBJ)
    route = router.route("insert into users (user_id) values (1), (3), (42), (4)", ctx("srv"))
    assert route.row_shards == (P, S, P, S)
    assert route.write and isinstance(route.target, All)


def test_fan_out_reads_are_marked_and_writes_are_not() -> None:
    router = Router(CONFIG_OBJ)
    assert router.route("select * from users", ctx("srv")).fanout
    assert not router.route("update users set name = 'x'", ctx("srv")).fanout
    assert not router.route("select * from users where user_id = 3", ctx("srv")).fanout


def test_the_shard_function_agrees_with_the_values_in_this_table() -> None:
    # The oracle for the table above: PARTITION BY HASH placement (server-checked elsewhere).
    for value, shard in ((1, 0), (2, 0), (42, 0), (3, 1), (4, 1), (5, 1)):
        assert shard_of(value, "int8", 2) == shard
    assert shard_of("bob", "text", 2) == 0 and shard_of("alice", "text", 2) == 1


def test_a_cached_analysis_still_obeys_hints_and_the_key() -> None:
    router = Router(CONFIG_OBJ)
    sql = "select * from accounts"
    assert isinstance(router.route(sql, ctx("srv")).target, All)
    assert router.route(sql, ctx("srv"), Hints(shard_key="3")).target == Direct(S)
    with pytest.raises(ClientError):
        router.route(sql, ctx("ten"))
    assert router.misses == 1 and router.hits == 0  # the analysis is counted by the statement's own lookup


def test_plan_cache_is_lru_and_bounded_by_config() -> None:
    config = load_text(CONFIG + "router: {plan_cache_size: 2}\n", env={})
    router = Router(config)
    router.analysis("select 1")
    router.analysis("select 2")
    router.analysis("select 1")  # a hit: now the most recent
    router.analysis("select 3")  # evicts "select 2", the least recently used
    assert list(router.cache) == ["select 1", "select 3"]
    assert (router.hits, router.misses) == (1, 3)


def test_unknown_shard_key_type_is_refused_until_learned() -> None:
    config = load_text(CONFIG.replace(
        "  types: {users: bigint, accounts: bigint, transactions: bigint, devices: uuid, sessions: text}\n",
        ""), env={})
    router = Router(config)
    with pytest.raises(ClientError) as err:
        router.route("select * from users where user_id = 3", ctx("srv"))
    assert err.value.sqlstate == "55000" and "users.user_id" in err.value.message
    router.learn_types({"users": "bigint"})
    assert router.route("select * from users where user_id = 3", ctx("srv")).target == Direct(S)


def _outcome(router: Router, sql: str, params: Params | None, key: str, hints: Hints | None) -> object:
    try:
        route = router.route(sql, ctx(key), hints, params)
        if route.needs_params:
            route = router.route(sql, ctx(key), hints, params or Params(()))
        return route
    except ClientError as exc:
        return (exc.sqlstate, exc.message)


@pytest.mark.parametrize(("sql", "params", "key", "hints", "expected"), TABLE,
                         ids=[f"{row[2]}:{row[0][:60]}" for row in TABLE])
def test_a_cached_route_is_the_route_the_first_time(sql: str, params: Params | None, key: str,
                                                    hints: Hints | None, expected: Any) -> None:
    """The second time a statement comes, its route (or refusal) comes from the caches."""
    router = Router(CONFIG_OBJ)
    first = _outcome(router, sql, params, key, hints)
    misses = router.misses
    assert _outcome(router, sql, params, key, hints) == first
    assert router.misses == misses


@pytest.mark.parametrize("value", [1, 2, 3, 4, 5, 42, -7, 2**40])
def test_a_join_bound_by_one_parameter_is_planned_per_shard(value: int) -> None:
    router = Router(CONFIG_OBJ)
    sql = ("select * from users u join accounts a on a.user_id = u.user_id "
           "join currencies c on c.code = a.currency where u.user_id = $1")
    expected = Direct(P if shard_of(value, "int8", 2) == 0 else S)
    for other in (1, 3, value):  # both shards' routes are found, then reused
        router.route(sql, ctx("srv"), None, text(other))
    route = router.route(sql, ctx("srv"), None, text(value))
    assert route.target == expected and "joined on the shard key" in route.reason
    assert router.misses == 1
    with pytest.raises(ClientError) as err:  # a bad value is still read as the column's type
        router.route(sql, ctx("srv"), None, text("x"))
    assert err.value.sqlstate == "22P02"
