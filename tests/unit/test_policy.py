"""Key statement policies (proxy/router/policy.py): what a key's SQL may do, beyond routing.

``database`` and ``client`` keys get default denials (DDL, DO, COPY to/from programs and server
files, identity changes, ..., the server's file/process/large-object functions, and catalogs
that show other roles' secrets or other sessions); ``server`` keys get none, ``admin`` keys are
never checked. A key's own ``policy:`` widens (allow) or narrows (deny) its defaults. Every
refusal is a 42501 that names the key and the rule. The parser (``Statement.acts`` and
``functions``) sees statements nested in EXPLAIN, PREPARE, DECLARE, COPY (query) and CTEs.

Keys of the config: ``pf_adm`` (admin), ``pf_srv`` (server), ``pf_cli`` (client), ``pf_t42``
(database), ``pf_ops`` (server with a narrowing policy), ``pf_wide`` (client, widened),
``pf_narrow`` (database, narrowed), ``pf_both`` (client whose deny and allow name the same).
"""

from __future__ import annotations

import pytest

from proxy.auth.keys import ApiKey, load_keys
from proxy.config import Policy, Rules, load_text
from proxy.errors import ClientError, ConfigError
from proxy.router.parse import analyze
from proxy.router.policy import TENANT_DENIED_STATEMENTS, KeyPolicy, check, compile_policy
from proxy.router.route import Analysis, Direct
from proxy.router.router import Router, SessionContext

CONFIG = """
databases:
  primary: {dsn: 'postgresql://owner@h/p'}
  analytics: {dsn: 'postgresql://owner@h/a'}
tables: {events: analytics}
backend_roles:
  pgfleet_tenant: {password: t, default_for: [database]}
  pgfleet_app: {default_for: [client, server]}
  pgfleet_ops: {}
keys:
  - {id: pf_adm, secret: x, role: admin}
  - {id: pf_srv, secret: x, role: server}
  - {id: pf_cli, secret: x, role: client}
  - {id: pf_t42, secret: x, role: database, user_id: 42}
  - {id: pf_ops, secret: x, role: server, backend_role: pgfleet_ops,
     policy: {statements: {deny: [delete]}, functions: {deny: [md5]}, tables: {deny: [currencies]}}}
  - {id: pf_wide, secret: x, role: client,
     policy: {statements: {allow: [do]}, functions: {allow: [pg_read_file]}, tables: {allow: [users, accounts]}}}
  - {id: pf_narrow, secret: x, role: database, user_id: 7,
     policy: {statements: {deny: [delete]}, functions: {deny: [md5, 'my_*']}, tables: {deny: [currencies]}}}
  - {id: pf_both, secret: x, role: client,
     policy: {statements: {allow: [do, ddl], deny: [do]}, functions: {allow: [md5, pg_read_file], deny: [md5]},
              tables: {allow: [currencies, users], deny: [currencies]}}}
"""

CONFIG_OBJ = load_text(CONFIG, env={})
KEYS: dict[str, ApiKey] = load_keys(CONFIG_OBJ)

TENANT_ROLES = ("database", "client")
TENANT_KEY = {"database": "pf_t42", "client": "pf_cli"}
DB = "databases: {primary: {dsn: 'postgresql://u@h/d'}}\n"


def policy_of(key: str) -> KeyPolicy:
    policy = KEYS[key].policy
    assert policy is not None
    return policy


def refusal(sql: str, key: str) -> ClientError:
    """The 42501 that ``key``'s policy gives ``sql``; its message names the key and its role."""
    api = KEYS[key]
    analysis = analyze(sql)
    assert analysis.syntax_error is None, analysis.syntax_error
    with pytest.raises(ClientError) as err:
        check(policy_of(key), analysis, api.id, api.role.value)
    assert err.value.sqlstate == "42501"
    assert err.value.message.startswith(f"key {api.id} ({api.role.value}) may not "), err.value.message
    assert "refused by its policy (" in err.value.message
    return err.value


def passes(sql: str, key: str) -> None:
    api = KEYS[key]
    analysis = analyze(sql)
    assert analysis.syntax_error is None, analysis.syntax_error
    if api.policy is not None:
        check(api.policy, analysis, api.id, api.role.value)


# ---------------------------------------------------------------------------------------------
# The default rules of database and client keys: statement kinds

# (sql, the rule that refuses it)
DENIED_STATEMENTS = [
    ("create table t (a int)", "ddl"),
    ("create table t2 as select * from t", "ddl"),
    ("create view v as select 1", "ddl"),
    ("create materialized view v as select 1", "ddl"),
    ("alter table t add column b int", "ddl"),
    ("alter table t disable row level security", "ddl"),
    ("drop policy pgfleet_tenant on t", "ddl"),
    ("drop table t", "ddl"),
    ("truncate t", "ddl"),
    ("grant select on t to someone", "ddl"),
    ("revoke select on t from someone", "ddl"),
    ("create extension dblink", "ddl"),
    ("select * into t2 from t", "ddl"),
    ("create function f() returns int language sql as 'select 1'", "create_function"),
    ("create or replace function f() returns int language sql as 'select 1'", "create_function"),
    ("create procedure p() language sql as 'select 1'", "create_function"),
    ("do $$ begin end $$", "do"),
    ("DO LANGUAGE plpgsql $$ begin perform 1; end $$", "do"),
    ("alter system set work_mem = '1MB'", "alter_system"),
    ("load 'auto_explain'", "load"),
    ("copy t to program 'cat > /tmp/x'", "copy_program"),
    ("copy t from program 'cat /etc/passwd'", "copy_program"),
    ("copy (select 1) to program 'cat'", "copy_program"),
    ("copy t to '/x'", "copy_file"),
    ("copy t from '/x'", "copy_file"),
    ("copy (select 1) to '/tmp/x'", "copy_file"),
    ("set role other", "set_role"),
    ("set session role other", "set_role"),
    ("set role none", "set_role"),
    ("set session authorization other", "set_role"),
    ("reset role", "set_role"),
    ("reset session authorization", "set_role"),
    ("set local role other", "set_role"),
    ("SET LOCAL pgfleet.tenant = '1'", "set_role"),
    ("set standard_conforming_strings = off", "set_parser"),
    ("set local standard_conforming_strings to false", "set_parser"),
    ("set client_encoding = 'SJIS'", "set_parser"),
    ("set names 'GBK'", "set_parser"),
    ("set client_encoding to big5", "set_parser"),
    ("select set_config('standard_conforming_strings', 'off', false)", "set_parser"),
    ("select set_config('client_encoding', 'win932', false)", "set_parser"),
    ("set local pgfleet.tenant to default", "set_role"),
    ("select set_config('role', 'other', false)", "set_role"),
    ("select set_config('ROLE', 'other', true)", "set_role"),
    ("select pg_catalog.set_config('session_authorization', 'other', false)", "set_role"),
    ("select set_config('pgfleet.tenant', '7', true)", "set_role"),
    ("select set_config('pgfleet.tenant', '7', false)", "set_role"),
    ("select set_config(name, '7', true) from settings_to_use", "set_role"),
    ("select set_config('pgfleet.' || 'tenant', '7', true)", "set_role"),
    ("select set_config($1, '7', true)", "set_role"),
    ("select * from set_config('role', 'other', false)", "set_role"),
    ("lock table t", "lock"),
    ("lock t in access exclusive mode nowait", "lock"),
    ("vacuum", "maintenance"),
    ("vacuum full t", "maintenance"),
    ("analyze t", "maintenance"),
    ("cluster t using t_pkey", "maintenance"),
    ("reindex table t", "maintenance"),
    ("checkpoint", "maintenance"),
    # nested in another statement, or one of several in the query string
    ("explain analyze create table t2 as select 1", "ddl"),
    ("explain select * into t2 from t", "ddl"),
    ("begin; create table t (a int); commit", "ddl"),
    ("select 1; do $$ begin end $$", "do"),
    ("explain analyze select set_config('role', 'other', false)", "set_role"),
    ("prepare p as select set_config('role', 'other', false)", "set_role"),
    ("declare c cursor for select set_config('pgfleet.tenant', '7', true)", "set_role"),
    ("copy (select set_config('role', 'other', false)) to stdout", "set_role"),
    ("with s as (select set_config('role', 'other', false)) select * from s", "set_role"),
    ("select * from t where a = (select set_config('pgfleet.tenant', '7', true))", "set_role"),
    ("select 1 union all select 1 from t where set_config('role', 'x', true) is null", "set_role"),
]


def test_the_table_covers_every_default_statement_rule() -> None:
    assert TENANT_DENIED_STATEMENTS == {"ddl", "create_function", "do", "alter_system", "load", "copy_program",
                                        "copy_file", "set_role", "set_parser", "lock", "maintenance"}
    assert {rule for _, rule in DENIED_STATEMENTS} == TENANT_DENIED_STATEMENTS


@pytest.mark.parametrize("role", TENANT_ROLES)
@pytest.mark.parametrize("sql,rule", DENIED_STATEMENTS, ids=[f"{sql[:60]}->{rule}" for sql, rule in DENIED_STATEMENTS])
def test_default_policy_refuses_statement_kinds(role: str, sql: str, rule: str) -> None:
    err = refusal(sql, TENANT_KEY[role])
    assert err.message.endswith(f"refused by its policy (statements: {rule})"), err.message
    assert err.hint is not None and f"allow: [{rule}]" in err.hint


def test_a_statement_refusal_says_what_was_refused() -> None:
    assert refusal("do $$ begin end $$", "pf_t42").message == \
        "key pf_t42 (database) may not run DO blocks: refused by its policy (statements: do)"
    assert refusal("truncate t", "pf_cli").message == \
        "key pf_cli (client) may not run DDL (TRUNCATE): refused by its policy (statements: ddl)"


# ---------------------------------------------------------------------------------------------
# ... functions

DENIED_CALLS = [
    "pg_read_file('/etc/passwd')", "pg_read_binary_file('/etc/passwd')", "pg_ls_dir('.')", "pg_stat_file('x')",
    "lo_import('/etc/passwd')", "lo_export(1, '/tmp/x')", "lo_get(1)", "lo_unlink(1)", "loread(0, 1)",
    "pg_terminate_backend(1)", "pg_cancel_backend(1)", "dblink('conn', 'select 1')",
    "dblink_exec('conn', 'drop table t')", "dblink_connect('host=x')", "query_to_xml('select 1', true, true, '')",
    "table_to_xml('t', true, true, '')", "cursor_to_xml('c', 1, true, true, '')",
    "pg_logical_slot_get_changes('s', null, null)", "pg_create_logical_replication_slot('s', 'pgoutput')",
    "pg_drop_replication_slot('s')", "pg_ls_waldir()", "pg_ls_logdir()", "pg_file_write('x', 'y', false)",
    "pg_reload_conf()", "pg_rotate_logfile()", "pg_promote()", "pg_switch_wal()", "pg_current_logfile()",
    "pg_stat_get_activity(null)", "pg_stat_reset()", "pg_stat_statements_reset()",
    "pg_log_backend_memory_contexts(1)", "pg_replication_origin_create('x')", "pg_backup_start('x')",
]

# How a call is written: schema-qualified, in FROM, in a subquery, a CTE, WHERE, nested statements.
CALL_FORMS = [
    "select {call}",
    "SELECT pg_catalog.{call}",
    "select * from {call}",
    "select * from t where a in (select {call})",
    "with c as (select {call}) select * from c",
    "select a from t where {call} is not null",
    "select 1; select {call}",
    "explain analyze select {call}",
    "prepare p as select {call}",
    "declare c cursor for select {call}",
    "copy (select {call}) to stdout",
    "insert into t select {call}",
]


@pytest.mark.parametrize("role", TENANT_ROLES)
@pytest.mark.parametrize("form", CALL_FORMS)
@pytest.mark.parametrize("call", DENIED_CALLS)
def test_default_policy_refuses_the_servers_functions(role: str, form: str, call: str) -> None:
    name = call.partition("(")[0]
    err = refusal(form.format(call=call), TENANT_KEY[role])
    assert f"may not call {name}(): refused by its policy (functions: {name})" in err.message, err.message
    assert err.hint == "the server's file, program, process and large-object functions are for admin keys"


def test_a_function_in_another_schema_with_a_denied_name_is_refused_too() -> None:
    err = refusal("select public.pg_read_file('x')", "pf_cli")
    assert err.message.endswith("may not call public.pg_read_file(): refused by its policy (functions: pg_read_file)")


# ---------------------------------------------------------------------------------------------
# ... catalog tables

DENIED_TABLES = ["pg_authid", "pg_shadow", "pg_stat_activity", "pg_catalog.pg_authid", "pg_catalog.pg_stat_activity",
                 "pg_stat_statements", "pg_user_mappings", "pg_file_settings", "pg_hba_file_rules",
                 "pg_largeobject", "pg_replication_slots", "pg_stat_replication"]

TABLE_FORMS = [
    "select * from {table}",
    "table {table}",
    "select count(*) from t join {table} a on true",
    "select * from t where a in (select 1 from {table})",
    "with x as (select * from {table}) select * from x",
    "copy {table} to stdout",
    "explain analyze select * from {table}",
]


@pytest.mark.parametrize("role", TENANT_ROLES)
@pytest.mark.parametrize("form", TABLE_FORMS)
@pytest.mark.parametrize("table", DENIED_TABLES)
def test_default_policy_refuses_catalogs_of_secrets_and_sessions(role: str, form: str, table: str) -> None:
    err = refusal(form.format(table=table), TENANT_KEY[role])
    name = table.rpartition(".")[2]
    assert f"may not use table {table}: refused by its policy (tables: {name})" in err.message, err.message


# ---------------------------------------------------------------------------------------------
# ... and what they may still do

ALLOWED = [
    "select * from users where id = 1",
    "select * from users for update",
    "insert into users (id, name) values (1, 'a')",
    "insert into users values (1) on conflict (id) do update set name = excluded.name returning *",
    "update users set name = 'b' where id = 1",
    "delete from users where id = 1",
    "merge into users u using staged s on u.id = s.id when matched then update set name = s.name",
    "with d as (delete from users where id = 1 returning *) select * from d",
    "call my_proc(1)",
    "copy users from stdin",
    "copy users (id, name) from stdin with (format csv)",
    "copy users to stdout",
    "copy (select * from users) to stdout with (format binary)",
    "set search_path to public",
    "set client_encoding to 'UTF8'",  # what drivers send: the parser's own encoding
    "set names 'utf-8'",
    "set standard_conforming_strings = on",
    "reset client_encoding",
    "set local search_path to public",
    "reset search_path",
    "set statement_timeout = '5s'",
    "set constraints all deferred",
    "show search_path",
    "select set_config('search_path', 'public', false)",
    "select set_config('statement_timeout', '5s', true)",
    "select current_setting('pgfleet.tenant')",
    "select current_setting('pgfleet.tenant', true)",
    "begin", "commit", "rollback", "start transaction isolation level serializable",
    "savepoint s", "release savepoint s", "rollback to savepoint s",
    "begin; select 1; commit",
    "select pg_advisory_lock(1)", "select pg_advisory_unlock(1)", "select pg_advisory_xact_lock(1)",
    "select pg_try_advisory_lock(1)", "select pg_advisory_unlock_all()",
    "select t.oid, typarray from pg_type t join pg_namespace ns on typnamespace = ns.oid where typname = 'hstore'",
    "select * from information_schema.columns where table_name = 'users'",
    "select c.relname from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace",
    "select rolname from pg_roles",
    "select name, setting from pg_settings",
    "select * from pg_stat_user_tables",
    "select version()", "select pg_catalog.version()", "select current_schema()", "select pg_backend_pid()",
    "select pg_is_in_recovery()", "select now()",
    "select lower(name), lpad(name, 3), length(name), md5(name), log(2.0) from users",
    "select 1", "values (1), (2)",
    "explain select * from users", "explain analyze select * from users",
    "prepare p as select * from users where id = $1", "execute p(1)", "deallocate p",
    "declare c cursor for select * from users", "fetch 10 from c", "close c",
    "listen ch", "notify ch", "unlisten ch", "discard all",
]


@pytest.mark.parametrize("role", TENANT_ROLES)
@pytest.mark.parametrize("sql", ALLOWED)
def test_default_policy_lets_applications_and_drivers_work(role: str, sql: str) -> None:
    passes(sql, TENANT_KEY[role])


# ---------------------------------------------------------------------------------------------
# Server and admin keys


def test_server_keys_without_a_policy_and_admin_keys_check_nothing() -> None:
    assert compile_policy("server", None) is None
    assert compile_policy("admin", None) is None
    assert compile_policy("admin", Policy(statements=Rules(deny=("delete",)))) is None
    assert KEYS["pf_srv"].policy is None and KEYS["pf_adm"].policy is None


def test_database_and_client_keys_get_the_defaults() -> None:
    for role in TENANT_ROLES:
        policy = compile_policy(role, None)
        assert policy is not None
        assert policy.denied_statements == TENANT_DENIED_STATEMENTS
        assert "pg_read_file" in policy.denied_functions and "lo_import" in policy.denied_functions
        assert "pg_authid" in policy.denied_tables and policy.allowed_tables is None
    assert policy_of("pf_cli") == compile_policy("client", None)
    assert policy_of("pf_t42") == compile_policy("database", None)


def test_an_admin_key_with_a_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_text(DB + "keys: [{id: a, secret: b, role: admin, policy: {statements: {deny: [delete]}}}]", env={})
    assert str(err.value).startswith("keys[0].policy: admin keys may do everything")


@pytest.mark.parametrize("sql", [
    "do $$ begin end $$", "create table t (a int)", "select pg_read_file('x')", "select * from pg_authid",
    "set role other", "copy t to program 'cat'", "vacuum", "select md5x('x')", "select * from currencies_old",
])
def test_a_server_key_with_a_policy_gets_only_its_own_denies(sql: str) -> None:
    passes(sql, "pf_ops")


def test_a_server_key_with_a_policy_is_refused_what_it_denies() -> None:
    assert refusal("delete from t", "pf_ops").message.endswith("(statements: delete)")
    assert refusal("select md5('x')", "pf_ops").message.endswith("(functions: md5)")
    assert refusal("select * from public.currencies", "pf_ops").message.endswith("(tables: currencies)")
    empty = compile_policy("server", Policy())
    assert empty is not None and not empty.denied_statements and not empty.denied_functions \
        and not empty.denied_tables and empty.allowed_tables is None


# ---------------------------------------------------------------------------------------------
# A key's own policy: widening and narrowing


def test_allow_widens_the_defaults() -> None:
    passes("do $$ begin end $$", "pf_wide")
    passes("select pg_read_file('x')", "pf_wide")
    passes("select pg_catalog.pg_read_file('x')", "pf_wide")
    assert refusal("create table t (a int)", "pf_wide").message.endswith("(statements: ddl)")
    assert refusal("select pg_ls_dir('.')", "pf_wide").message.endswith("(functions: pg_ls_dir)")


def test_a_prefix_in_functions_allow_widens_every_match() -> None:
    policy = compile_policy("client", Policy(functions=Rules(allow=("lo_*",))))
    assert policy is not None
    check(policy, analyze("select lo_import('/x'), lo_export(1, '/y')"), "k", "client")
    with pytest.raises(ClientError):
        check(policy, analyze("select pg_read_file('x')"), "k", "client")


def test_tables_allow_is_an_allow_list_of_non_catalog_tables() -> None:
    for sql in ("select * from users", "select * from public.users u join accounts a on a.id = u.id",
                "select * from pg_class", "select * from information_schema.columns",
                "select * from pg_catalog.pg_type", "with orders as (select 1) select * from orders, users"):
        passes(sql, "pf_wide")
    err = refusal("select * from users join orders using (id)", "pf_wide")
    assert err.message == ("key pf_wide (client) may not use table orders: refused by its policy "
                           "(tables: only accounts, users)")
    refusal("insert into orders select * from users", "pf_wide")
    refusal("delete from public.orders", "pf_wide")
    # the catalogs denied by default stay denied
    assert refusal("select * from pg_authid", "pf_wide").message.endswith("(tables: pg_authid)")


def test_tables_allow_may_widen_a_catalog_denied_by_default() -> None:
    policy = compile_policy("client", Policy(tables=Rules(allow=("pg_stat_activity",))))
    assert policy is not None
    check(policy, analyze("select * from pg_stat_activity"), "k", "client")
    with pytest.raises(ClientError):
        check(policy, analyze("select * from pg_shadow"), "k", "client")


# (sql, the rule in the message) for pf_narrow: database key, deny delete, md5, my_*, currencies
NARROWED = [
    ("delete from t", "statements: delete"),
    ("explain analyze delete from t", "statements: delete"),
    ("prepare p as delete from t where id = $1", "statements: delete"),
    ("with d as (delete from t returning *) select * from d", "statements: delete"),
    ("with d as (delete from t returning *) insert into archive select * from d", "statements: delete"),
    ("copy (delete from t returning *) to stdout", "statements: delete"),
    ("select 1; delete from t", "statements: delete"),
    ("select md5('x')", "functions: md5"),
    ("select pg_catalog.md5('x')", "functions: md5"),
    ("select * from t where md5(a) = 'x'", "functions: md5"),
    ("select my_thing(1)", "functions: my_thing"),
    ("select s.my_thing(1)", "functions: my_thing"),
    ("select * from my_srf()", "functions: my_srf"),
    ("select * from currencies", "tables: currencies"),
    ("select * from public.currencies", "tables: currencies"),
    ("update currencies set rate = 1", "tables: currencies"),
    ("select * from t where code in (select code from currencies)", "tables: currencies"),
    ("do $$ begin end $$", "statements: do"),  # the defaults still apply
]


@pytest.mark.parametrize("sql,rule", NARROWED)
def test_deny_narrows_the_defaults(sql: str, rule: str) -> None:
    err = refusal(sql, "pf_narrow")
    assert err.message.endswith(f"refused by its policy ({rule})"), err.message


@pytest.mark.parametrize("sql", [
    "select * from t", "update t set a = 1", "insert into t values (1)", "select mything(1)", "select md5x('a')",
    "select * from currencies_old", "with currencies as (select 1) select * from currencies",
])
def test_deny_narrows_nothing_else(sql: str) -> None:
    passes(sql, "pf_narrow")


@pytest.mark.parametrize("kind,sql", [
    ("update", "explain analyze update t set a = 1"),
    ("update", "with u as (update t set a = 1 returning *) select * from u"),
    ("insert", "copy (insert into t values (1) returning *) to stdout"),
    ("select", "declare c cursor for select * from t"),
    ("select", "insert into t select * from u"),
    ("select", "select 1 union select 2"),
    ("select", "create table t2 as select 1"),
    ("copy", "copy t from stdin"),
    ("merge", "explain merge into t using u on t.id = u.id when matched then delete"),
    ("call", "call my_proc()"),
])
def test_a_denied_kind_is_seen_nested(kind: str, sql: str) -> None:
    policy = compile_policy("server", Policy(statements=Rules(deny=(kind,))))
    assert policy is not None
    with pytest.raises(ClientError) as err:
        check(policy, analyze(sql), "pf_x", "server")
    assert err.value.message.endswith(f"refused by its policy (statements: {kind})")


def test_own_deny_wins_over_own_allow() -> None:
    assert refusal("do $$ begin end $$", "pf_both").message.endswith("(statements: do)")
    passes("alter table users add column b int", "pf_both")  # ddl: allowed and not denied
    assert refusal("select md5('x')", "pf_both").message.endswith("(functions: md5)")
    passes("select pg_read_file('x')", "pf_both")
    assert refusal("select * from currencies", "pf_both").message.endswith("(tables: currencies)")
    passes("select * from users", "pf_both")
    policy = compile_policy("client", Policy(functions=Rules(allow=("pg_read_file",), deny=("pg_read_file",))))
    assert policy is not None
    with pytest.raises(ClientError):
        check(policy, analyze("select pg_read_file('x')"), "k", "client")


def test_describe_shows_what_is_denied() -> None:
    assert policy_of("pf_ops").describe() == "statements -delete; functions -md5; tables -currencies"
    assert "statements -" in policy_of("pf_cli").describe()
    assert "tables only accounts,users" in policy_of("pf_wide").describe()


# ---------------------------------------------------------------------------------------------
# Config: backend roles and policies


@pytest.mark.parametrize("text,expected", [
    (DB + "keys: [{id: a, secret: b, role: client, policy: {statements: {deny: [drop]}}}]",
     "keys[0].policy.statements.deny: unknown statement kind 'drop'"),
    (DB + "keys: [{id: a, secret: b, role: server}, {id: c, secret: b, role: client, "
     "policy: {statements: {allow: [dml]}}}]",
     "keys[1].policy.statements.allow: unknown statement kind 'dml'"),
    (DB + "keys: [{id: a, secret: b, role: client, policy: {functions: {deny: ['pg read file']}}}]",
     "keys[0].policy.functions.deny: 'pg read file' is not a function name"),
    (DB + "keys: [{id: a, secret: b, role: database, user_id: 1, policy: {functions: {allow: ['f()']}}}]",
     "keys[0].policy.functions.allow: 'f()' is not a function name"),
    (DB + "keys: [{id: a, secret: b, role: client, policy: {tables: {allow: ['a.b.c']}}}]",
     "keys[0].policy.tables.allow: 'a.b.c' is not a table name"),
    (DB + "keys: [{id: a, secret: b, role: client, policy: {statement: {deny: [do]}}}]",
     "keys[0].policy.statement: unknown key"),
    (DB + "keys: [{id: a, secret: b, role: client, backend_role: nope}]",
     "keys[0].backend_role: 'nope' is not one of backend_roles: (none configured)"),
    (DB + "backend_roles: {app: {}, ops: {}}\nkeys: [{id: a, secret: b, role: client, backend_role: nope}]",
     "keys[0].backend_role: 'nope' is not one of backend_roles: app, ops"),
    (DB + "backend_roles: {a: {default_for: [client]}, b: {default_for: [server, client]}}",
     "backend_roles.b.default_for: client keys already default to a"),
    (DB + "backend_roles: {'bad name': {}}", "backend_roles.bad name: a PostgreSQL role name"),
])
def test_config_errors_name_the_path(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(text, env={})
    assert str(err.value).startswith(expected), str(err.value)


def test_backend_role_of_a_key() -> None:
    expected = {"pf_adm": None, "pf_srv": "pgfleet_app", "pf_cli": "pgfleet_app", "pf_t42": "pgfleet_tenant",
                "pf_ops": "pgfleet_ops", "pf_narrow": "pgfleet_tenant"}
    for key in CONFIG_OBJ.keys:
        if key.id in expected:
            assert CONFIG_OBJ.backend_role_of(key) == expected[key.id], key.id
            assert KEYS[key.id].backend_role == expected[key.id], key.id
    plain = load_text(DB + "keys: [{id: a, secret: b, role: database, user_id: 1}]", env={})
    assert plain.backend_role_of(plain.keys[0]) is None
    assert load_keys(plain)["a"].backend_role is None


# ---------------------------------------------------------------------------------------------
# Through the router


def test_router_refuses_a_client_key_on_its_fixed_database() -> None:
    router = Router(CONFIG_OBJ)
    ctx = SessionContext(KEYS["pf_cli"], None)
    assert router.fixed_database(ctx) == "primary"
    with pytest.raises(ClientError) as err:
        router.route("DO $$ begin end $$", ctx)
    assert err.value.sqlstate == "42501"
    assert err.value.message == "key pf_cli (client) may not run DO blocks: refused by its policy (statements: do)"
    with pytest.raises(ClientError):  # a refusal is not remembered as a route
        router.route("DO $$ begin end $$", ctx)


@pytest.mark.parametrize("key,direct", [("pf_t42", None), ("pf_cli", "analytics"), ("pf_ops", "primary")])
def test_router_parses_a_key_with_a_policy_even_on_a_direct_database(key: str, direct: str | None) -> None:
    router = Router(CONFIG_OBJ)
    sql = "delete from t" if key == "pf_ops" else "select pg_read_file('/etc/passwd')"
    with pytest.raises(ClientError) as err:
        router.route(sql, SessionContext(KEYS[key], direct))
    assert err.value.sqlstate == "42501" and f"key {key} " in err.value.message


def test_router_lets_a_server_key_without_a_policy_through() -> None:
    router = Router(CONFIG_OBJ)
    for direct in (None, "primary"):
        route = router.route("DO $$ begin end $$", SessionContext(KEYS["pf_srv"], direct))
        assert route.target == Direct("primary")
    assert router.route("select pg_read_file('x')", SessionContext(KEYS["pf_adm"], None)).target == Direct("primary")


def test_a_route_another_key_cached_does_not_let_a_tenant_through() -> None:
    router = Router(CONFIG_OBJ)
    sql = "DO $$ begin end $$"
    router.route(sql, SessionContext(KEYS["pf_srv"], None))
    with pytest.raises(ClientError):
        router.route(sql, SessionContext(KEYS["pf_cli"], None))


def test_the_policy_costs_nothing_on_a_cache_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []

    def counting(policy: KeyPolicy, analysis: Analysis, key_id: str, role: str) -> None:
        checked.append(key_id)
        check(policy, analysis, key_id, role)

    monkeypatch.setattr("proxy.router.router.check_policy", counting)
    router = Router(CONFIG_OBJ)
    ctx = SessionContext(KEYS["pf_cli"], None)
    sql = "select * from users where id = 1"
    first = router.route(sql, ctx)
    assert first.target == Direct("primary")
    assert (router.hits, router.misses, checked) == (0, 1, ["pf_cli"])
    assert router.route(sql, ctx) is first  # the route cache: neither parsed nor analysed again
    assert (router.hits, router.misses, checked) == (0, 1, ["pf_cli"])


@pytest.mark.parametrize("sql", ["EXECUTE pgfleet_3(43)", "DEALLOCATE pgfleet_3", "DEALLOCATE PREPARE pgfleet_1",
                                 "PREPARE pgfleet_9 AS SELECT 1"])
@pytest.mark.parametrize("key", ["pf_srv", "pf_cli", "pf_t42"])
def test_pgfleets_shared_statement_names_are_not_the_clients(sql: str, key: str) -> None:
    """Another client's statement, prepared on a shared backend under pgfleet's name, cannot be
    run, dropped or shadowed by SQL EXECUTE / DEALLOCATE / PREPARE (as PostgreSQL would say of a
    statement that connection never prepared)."""
    with pytest.raises(ClientError) as err:
        Router(CONFIG_OBJ).route(sql, SessionContext(KEYS[key], None))
    assert err.value.sqlstate == "26000", err.value.message
    assert "pgfleet" in err.value.message


def test_a_clients_own_prepared_statement_names_are_its_own() -> None:
    router = Router(CONFIG_OBJ)
    for sql in ("PREPARE mine AS SELECT 1", "EXECUTE mine", "DEALLOCATE mine", "DEALLOCATE ALL"):
        assert router.route(sql, SessionContext(KEYS["pf_cli"], None)).target == Direct("primary")
