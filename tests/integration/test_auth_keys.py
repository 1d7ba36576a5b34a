"""Keys and roles through a running pgfleet: authentication, roles, allow-lists, read-only keys,
client auth methods, and the backends' own auth methods (trust, md5, SCRAM).

SQLSTATEs at connect time are read with asyncpg (which reports the server's ErrorResponse) and
with the raw client (tests/integration/rawclient.py), which shows every field.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster

from .conftest import KEYS, Fleet
from .rawclient import LoginError, Raw


def login_error(fleet: Fleet, user: str, secret: str, database: str = "app") -> dict[str, str]:
    with Raw(fleet.port) as raw:
        with pytest.raises(LoginError) as err:
            raw.login(user, secret, database)
        assert raw.closed_soon(), "pgfleet kept the connection open after a failed login"
    return err.value.fields


def standard_keys(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    keys = [{"id": key, "secret": secret, "role": role, **({"user_id": 42} if role == "database" else {})}
            for key, (secret, role) in KEYS.items()]
    return keys + list(extra)


def dsn(fleet: Fleet, key: str, secret: str, database: str = "app") -> str:
    return f"postgresql://{key}:{secret}@127.0.0.1:{fleet.port}/{database}"


@pytest.fixture
def table(pg: Cluster) -> Iterator[str]:
    """A table with three rows in bank (the default database)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int primary key, label text)")
        conn.execute(f"insert into {name} values (1, 'a'), (2, 'b'), (3, 'c')")
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
            conn.execute(f"drop table if exists {name}")


def count(pg: Cluster, table: str) -> int:
    with psycopg.connect(pg.dsn("bank")) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Authentication


async def test_wrong_secret_is_28P01(fleet: Fleet) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as err:
        await asyncpg.connect(fleet.dsn(secret="not-the-secret"))
    assert err.value.sqlstate == "28P01"
    fields = login_error(fleet, "pf_server", "not-the-secret")
    assert fields["C"] == "28P01"
    assert fields["S"] == "FATAL"
    assert fields["M"] == 'password authentication failed for user "pf_server"'


def test_wrong_secret_with_psycopg_and_psql(fleet: Fleet) -> None:
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(fleet.dsn(secret="nope"))
    assert 'password authentication failed for user "pf_server"' in str(err.value)
    out = subprocess.run(["psql", "-X", "-c", "select 1", fleet.dsn(secret="nope")], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode != 0
    assert 'password authentication failed for user "pf_server"' in out.stderr


async def test_unknown_key_is_28P01_with_the_same_message(fleet: Fleet) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as err:
        await asyncpg.connect(dsn(fleet, "pf_nobody", "server-secret"))
    assert err.value.sqlstate == "28P01"
    wrong = login_error(fleet, "pf_server", "not-the-secret")
    unknown = login_error(fleet, "pf_nobody", "not-the-secret")
    assert unknown["C"] == wrong["C"] == "28P01"
    assert unknown["M"].replace("pf_nobody", "USER") == wrong["M"].replace("pf_server", "USER")
    assert unknown.get("H") == wrong.get("H")
    assert unknown["S"] == wrong["S"]


def test_unknown_key_gets_the_same_kind_of_scram_challenge(fleet: Fleet) -> None:
    """No key enumeration: server-first for an unknown id has a salt like a real key's."""
    import base64

    import scramp

    from proxy.wire import messages as m

    def salt_and_iterations(user: str) -> tuple[int, str]:
        with Raw(fleet.port) as raw:
            raw.startup(user=user, database="app")
            raw.recv()
            client = scramp.ScramClient(["SCRAM-SHA-256"], user, "x")
            raw.send(m.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode()))
            attrs = dict(p.split("=", 1) for p in m.decode_auth(raw.recv().body)[1].decode().split(","))
            return len(base64.b64decode(attrs["s"])), attrs["i"]

    assert salt_and_iterations("pf_nobody") == salt_and_iterations("pf_server")


async def test_unknown_database_is_3D000(fleet: Fleet) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError) as err:
        await asyncpg.connect(fleet.dsn(database="no_such_db"))
    assert err.value.sqlstate == "3D000"
    fields = login_error(fleet, "pf_server", "server-secret", "no_such_db")
    assert fields["C"] == "3D000"
    assert 'database "no_such_db" does not exist' in fields["M"]


async def test_unknown_database_with_a_wrong_secret_is_still_28P01(fleet: Fleet) -> None:
    """The secret is checked first: a wrong one tells nothing about which databases exist."""
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(fleet.dsn(database="no_such_db", secret="bad"))


def test_libpq_scram_with_the_empty_user_name(fleet: Fleet) -> None:
    """libpq (psql, psycopg) sends ``n=,`` in client-first; the key comes from the startup packet."""
    assert fleet.psql("select 'scram ok'").stdout.strip() == "scram ok"
    with psycopg.connect(fleet.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.info.user == "pf_server"


# ---------------------------------------------------------------------------------------------
# Roles


def test_client_key_always_reaches_the_default_database(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn("pf_client"), autocommit=True) as conn:
        assert conn.execute("select current_database()").fetchone() == ("bank",)
        assert conn.execute("select email from users where id = 7").fetchone() == ("user7@vaelix.example",)
        # the table map does not apply to client keys: events is not in bank
        with pytest.raises(pgerrors.UndefinedTable) as err:
            conn.execute("select * from events")
        assert err.value.sqlstate == "42P01"
        assert conn.execute("select 1").fetchone() == (1,)


async def test_client_key_cannot_connect_to_a_database_by_name(fleet: Fleet) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as err:
        await asyncpg.connect(fleet.dsn("pf_client", "analytics"))
    assert err.value.sqlstate == "42501"
    fields = login_error(fleet, "pf_client", "client-secret", "analytics")
    assert fields["C"] == "42501"


def test_database_key_reaches_the_default_database_and_not_others(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn("pf_tenant"), autocommit=True) as conn:
        assert conn.execute("select current_database()").fetchone() == ("bank",)
    assert login_error(fleet, "pf_tenant", "tenant-secret", "analytics")["C"] == "42501"


def test_server_key_connects_to_each_database_by_name(fleet: Fleet) -> None:
    for database, dbname in (("primary", "bank"), ("secondary", "secondary"), ("analytics", "analytics")):
        with psycopg.connect(fleet.dsn(database=database), autocommit=True) as conn:
            assert conn.execute("select current_database()").fetchone() == (dbname,)


def test_admin_database_is_refused_for_non_admin_keys(fleet: Fleet) -> None:
    assert login_error(fleet, "pf_server", "server-secret", "pgfleet")["C"] == "42501"


@pytest.fixture
def policy_fleet(make_fleet: Any) -> Fleet:
    return make_fleet(keys=standard_keys(
        {"id": "pf_ana", "secret": "ana-secret", "role": "server", "databases": ["analytics"]},
        {"id": "pf_ro", "secret": "ro-secret", "role": "server", "read_only": True},
        {"id": "pf_cro", "secret": "cro-secret", "role": "client", "read_only": True},
    ))


def test_allow_list_refuses_routes_outside_it_with_42501(policy_fleet: Fleet) -> None:
    with psycopg.connect(dsn(policy_fleet, "pf_ana", "ana-secret"), autocommit=True) as conn:
        assert conn.execute("select current_database(), count(*) > 0 from events").fetchone() == \
            ("analytics", True)
        with pytest.raises(pgerrors.InsufficientPrivilege) as err:
            conn.execute("select * from users")
        assert err.value.sqlstate == "42501"
        assert "primary" in str(err.value)
        # the session goes on
        assert conn.execute("select count(*) > 0 from user_activity").fetchone() == (True,)


def test_allow_list_applies_to_databases_named_at_connect(policy_fleet: Fleet) -> None:
    fields = login_error(policy_fleet, "pf_ana", "ana-secret", "primary")
    assert fields["C"] == "42501"
    with psycopg.connect(dsn(policy_fleet, "pf_ana", "ana-secret", "analytics"), autocommit=True) as conn:
        assert conn.execute("select current_database()").fetchone() == ("analytics",)


def test_read_only_key_refuses_writes_with_25006_and_still_reads(policy_fleet: Fleet, pg: Cluster,
                                                                  table: str) -> None:
    with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret"), autocommit=True) as conn:
        with pytest.raises(pgerrors.ReadOnlySqlTransaction) as err:
            conn.execute(f"insert into {table} values (10, 'x')")
        assert err.value.sqlstate == "25006"
        for sql in (f"update {table} set label = 'y'", f"delete from {table}", f"truncate {table}",
                    "create table ro_should_not_exist (a int)", "set default_transaction_read_only = off",
                    "insert into events (kind) values ('ro')"):
            with pytest.raises(pgerrors.ReadOnlySqlTransaction):
                conn.execute(sql)
        assert conn.execute(f"select count(*) from {table}").fetchone() == (3,)
        assert conn.execute("select current_database() from events limit 1").fetchone() == ("analytics",)
    assert count(pg, table) == 3


def test_read_only_key_in_a_transaction(policy_fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret")) as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone() == (3,)
        with pytest.raises(pgerrors.ReadOnlySqlTransaction):
            conn.execute(f"delete from {table}")
        conn.rollback()
    assert count(pg, table) == 3


@pytest.mark.parametrize("sql", [
    "set transaction read write; with d as (delete from {t} returning *) select count(*) from d",
    ("set session characteristics as transaction read write; "
     "with d as (delete from {t} returning *) select count(*) from d"),
    "begin read write; delete from {t}; commit",
    ("select set_config('default_transaction_read_only', 'off', false); "
     "with d as (delete from {t} returning *) select count(*) from d"),
])
def test_read_only_key_cannot_switch_read_only_off(policy_fleet: Fleet, pg: Cluster, table: str,
                                                  sql: str) -> None:
    with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret"), autocommit=True) as conn:
        with pytest.raises(pgerrors.ReadOnlySqlTransaction):
            conn.execute(sql.format(t=table))
        # and nothing it ran before left the session able to write
        with pytest.raises(pgerrors.ReadOnlySqlTransaction):
            conn.execute(f"with d as (delete from {table} returning *) select count(*) from d")
    assert count(pg, table) == 3


def test_read_only_key_cannot_write_through_functions_after_set_config(policy_fleet: Fleet, pg: Cluster) -> None:
    """Writes done by functions (nextval) are stopped too, even after set_config() tried to lift it."""
    seq = f"s_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        conn.execute(f"create sequence {seq}")
    try:
        with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret"), autocommit=True) as conn:
            with pytest.raises(pgerrors.ReadOnlySqlTransaction):
                conn.execute(f"select nextval('{seq}')")
            try:
                conn.execute("select set_config('default_transaction_read_only', 'off', false)")
            except pgerrors.ReadOnlySqlTransaction:
                pass  # refusing it is fine too
            for _ in range(3):  # whichever backend serves the next statements
                with pytest.raises(pgerrors.ReadOnlySqlTransaction):
                    conn.execute(f"select nextval('{seq}')")
        with psycopg.connect(pg.dsn("bank")) as conn:
            assert conn.execute(f"select last_value, is_called from {seq}").fetchone() == (1, False)
    finally:
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
            conn.execute(f"drop sequence if exists {seq}")


@pytest.mark.parametrize("sql", ["reset all", "discard all", "reset default_transaction_read_only",
                                 "select set_config(name, 'off', false) from pg_settings where name like 'default_tr%only'"])
def test_read_only_key_cannot_reset_its_settings(policy_fleet: Fleet, sql: str) -> None:
    """RESET ALL and DISCARD ALL would lift read-only mode on the backend: refused with 25006."""
    with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret"), autocommit=True) as conn:
        with pytest.raises(pgerrors.ReadOnlySqlTransaction) as err:
            conn.execute(sql)
        assert "read-only" in str(err.value)
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)


def test_read_only_key_is_closed_when_a_function_lifts_read_only(policy_fleet: Fleet, pg: Cluster) -> None:
    """A server-side function pgfleet cannot see into: the backend's report gives it away."""
    seq = f"s_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        conn.execute(f"create sequence {seq}")
        conn.execute(f"create function {seq}_lift() returns text language sql as "
                     "$$ select set_config('default_transaction_read_only', 'off', false) $$")
    try:
        with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret"), autocommit=True) as conn:
            with pytest.raises(psycopg.Error) as err:
                conn.execute(f"select {seq}_lift()")
                conn.execute(f"select nextval('{seq}')")
            assert err.value.sqlstate == "25006", err.value
            assert conn.closed or conn.broken
        with psycopg.connect(dsn(policy_fleet, "pf_ro", "ro-secret"), autocommit=True) as conn:
            for _ in range(3):  # whichever backend serves it, read-only holds
                with pytest.raises(pgerrors.ReadOnlySqlTransaction):
                    conn.execute(f"select nextval('{seq}')")
        with psycopg.connect(pg.dsn("bank")) as conn:
            assert conn.execute(f"select last_value, is_called from {seq}").fetchone() == (1, False)
    finally:
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
            conn.execute(f"drop function if exists {seq}_lift(); drop sequence if exists {seq}")


def test_read_only_client_key(policy_fleet: Fleet, pg: Cluster, table: str) -> None:
    with psycopg.connect(dsn(policy_fleet, "pf_cro", "cro-secret"), autocommit=True) as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone() == (3,)
        with pytest.raises(pgerrors.ReadOnlySqlTransaction):
            conn.execute(f"delete from {table}")
    assert count(pg, table) == 3


# ---------------------------------------------------------------------------------------------
# Client auth methods other than SCRAM


@pytest.mark.parametrize("method", ["md5"])  # cleartext ("password") needs TLS: test_tls.py
async def test_md5_and_cleartext_client_auth(make_fleet: Any, method: str) -> None:
    proc = make_fleet(listen={"auth": method})
    with psycopg.connect(proc.dsn()) as conn:
        assert conn.execute("select current_database()").fetchone() == ("bank",)
    conn2 = await asyncpg.connect(proc.dsn("pf_client"))
    try:
        assert await conn2.fetchval("select 2") == 2
    finally:
        await conn2.close()
    with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
        await asyncpg.connect(proc.dsn(secret="wrong"))
    with pytest.raises(asyncpg.InvalidPasswordError) as unknown:
        await asyncpg.connect(dsn(proc, "pf_nobody", "wrong"))
    assert wrong.value.sqlstate == unknown.value.sqlstate == "28P01"
    assert str(wrong.value).replace("pf_server", "U") == str(unknown.value).replace("pf_nobody", "U")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proc.dsn(secret="wrong"))


# ---------------------------------------------------------------------------------------------
# Backends reached with the DSN's own credentials


@pytest.mark.parametrize("database,user", [("primary", "pf_scram"), ("secondary", "pf_md5"),
                                           ("analytics", "pf_trust")])
def test_backends_with_scram_md5_and_trust(fleet: Fleet, pg: Cluster, database: str, user: str) -> None:
    with psycopg.connect(fleet.dsn(database=database), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    # and the cluster really asks that role for that method (pg_hba), so the login was real
    with psycopg.connect(pg.dsn("postgres")) as conn:
        stored = conn.execute("select rolpassword from pg_authid where rolname = %s", (user,)).fetchone()[0]
    if user == "pf_scram":
        assert stored.startswith("SCRAM-SHA-256$")
    elif user == "pf_md5":
        assert stored.startswith("md5")


def test_routed_statements_use_each_backend_credentials(fleet: Fleet) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        assert conn.execute("select current_user from users limit 1").fetchone() == ("pf_scram",)
        assert conn.execute("select current_user from events limit 1").fetchone() == ("pf_trust",)


def test_a_backend_that_refuses_pgfleets_login_gives_08006(make_fleet: Any, pg: Cluster) -> None:
    proc = make_fleet(databases={"secondary": {"dsn": pg.dsn("secondary", user="pf_md5", password="wrong")}})
    with psycopg.connect(proc.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as err, psycopg.connect(proc.dsn(database="secondary")) as conn:
        conn.execute("select 1")
    assert "secondary" in str(err.value)
    fields = login_error(proc, "pf_server", "server-secret", "secondary")
    assert fields["C"] == "08006"
    assert "wrong" not in fields["M"]  # the backend password never reaches a client
