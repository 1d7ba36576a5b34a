"""The router (proxy/router/): one table of (sql, key, direct database) -> database or refusal.

Keys: ``srv`` (server, the full router), ``cli`` (client: always the default database),
``ana`` (server with an allow-list of analytics only), ``ro`` / ``cro`` (read-only server /
client), ``ten`` (a database key). Tables: ``events`` and ``user_activity`` live on
analytics, ``audit.log`` on secondary, everything else on the default database (primary).
"""

from __future__ import annotations

import pytest

from proxy.auth.keys import ApiKey, load_keys
from proxy.config import load_text
from proxy.errors import ClientError
from proxy.router.parse import analyze
from proxy.router.route import Direct, Kind
from proxy.router.router import Router, SessionContext

CONFIG = """
databases:
  primary: {dsn: 'postgresql://u@h/p'}
  secondary: {dsn: 'postgresql://u@h/s'}
  analytics: {dsn: 'postgresql://u@h/a'}
tables: {events: analytics, user_activity: analytics, "audit.log": secondary}
keys:
  - {id: srv, secret: x, role: server}
  - {id: adm, secret: x, role: admin}
  - {id: cli, secret: x, role: client}
  - {id: ana, secret: x, role: server, databases: [analytics]}
  - {id: ro, secret: x, role: server, read_only: true}
  - {id: cro, secret: x, role: client, read_only: true}
  - {id: ten, secret: x, role: database, user_id: 42}
"""

CONFIG_OBJ = load_text(CONFIG, env={})
KEYS: dict[str, ApiKey] = load_keys(CONFIG_OBJ)

P, S, A = "primary", "secondary", "analytics"

# (sql, key, direct database or None, expected database or SQLSTATE)
TABLE = [
    # -- server key: table map, default database for the rest
    ("select 1", "srv", None, P),
    ("select * from users", "srv", None, P),
    ("select * from events", "srv", None, A),
    ("SELECT * FROM EVENTS e WHERE e.id = 1", "srv", None, A),
    ("select * from public.events", "srv", None, A),
    ('select * from "Events"', "srv", None, P),              # quoted: another table than events
    ("select * from audit.log", "srv", None, S),             # a schema-qualified mapping
    ("select * from log", "srv", None, P),                   # ... matches only with its schema
    ("insert into user_activity values (1, now(), 1)", "srv", None, A),
    ("update events set kind = 'x' where id = 1", "srv", None, A),
    ("delete from events where id = $1", "srv", None, A),
    ("select count(*) from events join user_activity using (user_id)", "srv", None, A),
    ("select * from users", "adm", None, P),
    ("select * from events", "adm", None, A),
    ("copy events to stdout", "srv", None, A),
    ("copy (select * from events) to stdout", "srv", None, A),
    ("explain select * from events", "srv", None, A),
    ("create table events_copy as select * from events", "srv", None, "0A000"),  # new table: default db
    ("create table user_activity_copy (like user_activity)", "srv", None, "0A000"),
    ("create index on events (kind)", "srv", None, A),
    ("drop table events", "srv", None, A),
    ("begin; select * from events; commit", "srv", None, A),  # transaction words never decide
    ("select * from", "srv", None, P),                       # syntax errors: the backend says why
    ("show search_path", "srv", None, P),
    ("set search_path to public", "srv", None, P),
    ("select * from nosuchtable", "srv", None, P),          # unknown tables: default database
    # -- CTE names are not tables
    ("with events as (select 1 as id) select * from events", "srv", None, P),
    ("with x as (select * from events) select * from x", "srv", None, A),
    ("with recursive t(n) as (select 1 union all select n + 1 from t where n < 3) select * from t",
     "srv", None, P),
    ("with users as (select * from events) select * from users", "srv", None, A),
    # -- catalogs never decide
    ("select * from pg_class, events", "srv", None, A),
    ("select * from pg_catalog.pg_tables", "srv", None, P),
    ("select * from information_schema.tables t join events e on true", "srv", None, A),
    ("select e.* from events e where e.kind in (select relname from pg_catalog.pg_class)", "srv", None, A),
    ("select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace", "srv", None, P),
    # -- two databases in one statement or one query string: 0A000
    ("select * from users join events using (id)", "srv", None, "0A000"),
    ("select * from users where id in (select user_id from events)", "srv", None, "0A000"),
    ("select * from users; select * from events", "srv", None, "0A000"),
    ("with x as (select * from events) select * from users, x", "srv", None, "0A000"),
    ("select * from audit.log, events", "srv", None, "0A000"),
    ("insert into users select * from events", "srv", None, "0A000"),
    # -- direct database: everything goes there
    ("select * from users", "srv", A, A),
    ("select * from events", "srv", P, P),
    ("select * from users join events using (id)", "srv", S, S),
    # -- client and database keys: always the default database, table map ignored
    ("select * from events", "cli", None, P),
    ("select * from users join events using (id)", "cli", None, P),
    ("select * from events", "ten", None, P),
    # -- allow-list: a route outside it is 42501
    ("select * from users", "ana", None, "42501"),
    ("select * from audit.log", "ana", None, "42501"),
    ("select * from events", "ana", None, A),
    ("select * from events", "ana", A, A),
    # -- read-only keys: writes are 25006, reads still routed
    ("select * from users", "ro", None, P),
    ("select * from events", "ro", None, A),
    ("explain select * from events", "ro", None, A),
    ("copy users to stdout", "ro", None, P),
    ("begin read only", "ro", None, P),
    ("insert into users values (1)", "ro", None, "25006"),
    ("insert into events (kind) values ('x')", "ro", None, "25006"),
    ("update users set name = 'x'", "ro", None, "25006"),
    ("delete from events", "ro", None, "25006"),
    ("merge into users u using users v on u.id = v.id when matched then do nothing", "ro", None, "25006"),
    ("create table t (a int)", "ro", None, "25006"),
    ("drop table users", "ro", None, "25006"),
    ("truncate users", "ro", None, "25006"),
    ("select * from users for update", "ro", None, "25006"),
    ("select * into t2 from users", "ro", None, "25006"),
    ("explain analyze delete from users", "ro", None, "25006"),
    ("copy users from stdin", "ro", None, "25006"),
    ("do $$ begin end $$", "ro", None, "25006"),
    ("select 1; delete from users", "ro", None, "25006"),
    ("set default_transaction_read_only=off", "ro", None, "25006"),
    ("SET default_transaction_read_only TO off", "ro", None, "25006"),
    ("set transaction_read_only = off", "ro", None, "25006"),
    ("begin read write", "ro", None, "25006"),
    ("start transaction isolation level serializable, read write", "ro", None, "25006"),
    ("set transaction read write", "ro", None, "25006"),
    ("set session characteristics as transaction read write", "ro", None, "25006"),
    ("with d as (delete from users returning *) select * from d", "ro", None, "25006"),
    ("insert into users values (1)", "cro", None, "25006"),
    ("set default_transaction_read_only=off", "cro", None, "25006"),
    ("select * from events", "cro", None, P),
    ("insert into users values (1)", "ro", A, "25006"),      # a direct database too
]


def _id(row: tuple[str, str, str | None, str]) -> str:
    sql, key, direct, expected = row
    return f"{key}{'@' + direct if direct else ''}:{sql[:50]}->{expected}"


@pytest.mark.parametrize("sql,key,direct,expected", TABLE, ids=[_id(r) for r in TABLE])
def test_route(sql: str, key: str, direct: str | None, expected: str) -> None:
    router = Router(CONFIG_OBJ)
    ctx = SessionContext(KEYS[key], direct)
    if expected in (P, S, A):
        route = router.route(sql, ctx)
        assert route.target == Direct(expected)
        assert route.reason
    else:
        with pytest.raises(ClientError) as err:
            router.route(sql, ctx)
        assert err.value.sqlstate == expected
        assert err.value.message


def test_two_database_refusal_names_both_tables_and_databases() -> None:
    with pytest.raises(ClientError) as err:
        Router(CONFIG_OBJ).route("select * from users join events using (id)", SessionContext(KEYS["srv"], None))
    assert "events on analytics" in err.value.message and "users on primary" in err.value.message
    assert err.value.hint


def test_allow_list_refusal_names_key_and_database() -> None:
    with pytest.raises(ClientError) as err:
        Router(CONFIG_OBJ).route("select * from users", SessionContext(KEYS["ana"], None))
    assert err.value.message == "key ana may not use database primary"
    assert "analytics" in (err.value.hint or "")


def test_allow_list_applies_to_a_direct_database_at_connect() -> None:
    """A session's fixed database is checked once, when the client connects to it."""
    router = Router(CONFIG_OBJ)
    ctx = SessionContext(KEYS["ana"], P)
    assert router.fixed_database(ctx) == P
    with pytest.raises(ClientError) as err:
        router.check_database(ctx, P)
    assert err.value.sqlstate == "42501"
    router.check_database(SessionContext(KEYS["ana"], A), A)
    router.check_database(SessionContext(KEYS["srv"], P), P)


@pytest.mark.parametrize("key,direct,fixed", [
    ("cli", None, P), ("cro", None, P), ("ten", None, P), ("srv", A, A), ("srv", None, None),
    ("ana", None, None), ("ro", None, None),
])
def test_fixed_database(key: str, direct: str | None, fixed: str | None) -> None:
    assert Router(CONFIG_OBJ).fixed_database(SessionContext(KEYS[key], direct)) == fixed


def test_read_only_refusal_names_key_and_command() -> None:
    with pytest.raises(ClientError) as err:
        Router(CONFIG_OBJ).route("update users set name = 'x'", SessionContext(KEYS["ro"], None))
    assert err.value.message == "key ro is read-only: UPDATE is refused"


@pytest.mark.parametrize("sql,write", [
    ("select * from events", False),
    ("insert into events (kind) values ('x')", True),
    ("select * from users for share", True),
    ("create table t (a int)", True),
    ("vacuum users", True),
])
def test_route_says_whether_it_writes(sql: str, write: bool) -> None:
    assert Router(CONFIG_OBJ).route(sql, SessionContext(KEYS["srv"], None)).write is write


def test_a_cached_statement_still_obeys_the_key() -> None:
    router = Router(CONFIG_OBJ)
    sql = "select * from events where id = $1"
    assert router.route(sql, SessionContext(KEYS["srv"], None)).target == Direct(A)
    assert router.route(sql, SessionContext(KEYS["ro"], None)).target == Direct(A)
    assert router.route(sql, SessionContext(KEYS["cli"], None)).target == Direct(P)
    assert router.route(sql, SessionContext(KEYS["srv"], P)).target == Direct(P)
    with pytest.raises(ClientError):
        router.route("delete from events", SessionContext(KEYS["srv"], None))  # fills the cache...
        router.route("delete from events", SessionContext(KEYS["ro"], None))   # ...read-only still refused
    assert router.misses == 2  # each text parsed once, whatever the key


def test_analysis_cache_is_by_exact_text_and_bounded() -> None:
    router = Router(CONFIG_OBJ, cache_size=3)
    ctx = SessionContext(KEYS["srv"], None)
    router.route("select * from events", ctx)
    router.route("select * from events", ctx)  # a route-cache hit: the analysis is not looked up
    assert (router.misses, router.hits) == (1, 0)
    assert router.analysis("select * from events") is not None  # the session's lookup of a statement
    assert (router.misses, router.hits) == (1, 1)
    router.route("SELECT * FROM events", ctx)  # other text, other entry (no fingerprinting)
    assert router.misses == 2
    for i in range(10):
        router.route(f"select {i} from events", ctx)
    assert len(router.cache) <= 3


@pytest.mark.parametrize("sql,kind,command", [
    ("select 1", Kind.READ, "SELECT"),
    ("values (1)", Kind.READ, "SELECT"),
    ("table users", Kind.READ, "SELECT"),
    ("show all", Kind.READ, "SHOW"),
    ("insert into t values (1)", Kind.WRITE, "INSERT"),
    ("copy t from stdin", Kind.WRITE, "COPY"),
    ("copy t to stdout", Kind.READ, "COPY"),
    ("begin", Kind.TRANSACTION, "TRANSACTION"),
    ("commit", Kind.TRANSACTION, "TRANSACTION"),
    ("set x.y = 1", Kind.SESSION, "SET"),
    ("listen ch", Kind.SESSION, "LISTEN"),
    ("prepare p as select 1", Kind.SESSION, "PREPARE"),
    ("create table t (a int)", Kind.DDL, "CREATE"),
    ("alter table t add column b int", Kind.DDL, "ALTERTABLE"),
])
def test_statement_kinds(sql: str, kind: Kind, command: str) -> None:
    (stmt,) = analyze(sql).statements
    assert stmt.kind is kind
    assert stmt.command == command


def test_relations_are_collected_with_schemas_and_without_ctes() -> None:
    (stmt,) = analyze("with c as (select * from a.t1) select * from c, t2, pg_catalog.pg_class").statements
    assert {r.qualified for r in stmt.relations} == {"a.t1", "t2", "pg_catalog.pg_class"}


def test_syntax_error_is_an_analysis_not_an_exception() -> None:
    analysis = analyze("selec 1")
    assert analysis.statements == ()
    assert analysis.syntax_error and "syntax error" in analysis.syntax_error
