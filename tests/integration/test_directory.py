"""The tenant directory (issue 21): a thousand tenant databases on two real clusters, looked up by
name in a registry table, each reached through a pool that pgfleet opens at its first client.

The tenants (``tests/integration/tenants.py``): ``tenant_0000`` ... ``tenant_0999``, even ones on
one cluster of this module, odd ones on another (both in /dev/shm when there is room), each
made from the template ``tenant_template`` and holding one marker row with its own name, so
that every answer says which database gave it. The registry is a table on the even cluster whose
passwords are Fernet tokens (a few rows give a plain dsn). Each test starts its own pgfleet; what
it asserts is read from PostgreSQL itself (``pg_stat_activity``, ``pg_database``, the registry) as well as
from pgfleet's console, HTTP views and metrics.
"""

from __future__ import annotations

import json
import random
import select
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families

from proxy.embedded import Cluster, free_port
from proxy.wire import messages as m

from .conftest import KEYS, Fleet, fleet_config, wait_until
from .rawclient import Raw, rows
from .tenants import (
    OWNER,
    REGISTRY,
    TABLE,
    TEMPLATE,
    Sampler,
    Tenants,
    build,
    console,
    login_error,
    marker,
    rss_kb,
    scratch,
    tenant_backends,
    tenant_name,
)

COUNT = 1000

# The module's first test also pays for the 1,000 databases (7.6 MB each: about 8 GB written, to
# memory when there is room, else to a disk whose speed varies on a shared machine), hence more
# than the suite's 120 s per test.
pytestmark = pytest.mark.timeout(300)

# Keys of this module beyond conftest's KEYS: a server key limited by a pattern, and a database
# key bound to one tenant.
T00 = ("pf_t00", "t00-secret")
T5 = ("pf_t5", "t5-secret")
EXTRA_KEYS = [{"id": T00[0], "secret": T00[1], "role": "server", "databases": ["tenant_00*"]},
              {"id": T5[0], "secret": T5[1], "role": "database", "tenant": "tenant_0005"}]


@pytest.fixture(scope="module")
def even(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The even tenants' cluster, which holds the registry too (in memory when there is room:
    see ``scratch``). Not the session cluster: 500 more databases there would slow every test
    after this module that copies or scans it (a replica's base backup: 30 s instead of 2)."""
    with scratch(tmp_path_factory) as root:
        cluster = Cluster("tenants-even", root / "data").start()
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The odd tenants' cluster (in memory when there is room: see ``scratch``)."""
    with scratch(tmp_path_factory) as root:
        cluster = Cluster("tenants-odd", root / "data").start()
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def tenants(even: Cluster, other: Cluster) -> Tenants:
    """The thousand tenants and their registry (made once for the module, never dropped: the
    clusters are thrown away)."""
    made = build((even, other), COUNT)
    print(f"\n{COUNT} tenants made (seconds per step): {made.seconds}")
    return made


def secret(key: str) -> str:
    return {T00[0]: T00[1], T5[0]: T5[1]}.get(key) or KEYS[key][0]


def tenant_fleet(make_fleet: Callable[..., Fleet], even: Cluster, tenants: Tenants, *, http: bool = False,
                 pool: dict[str, Any] | None = None, **directory: Any) -> Fleet:
    """A pgfleet with the standard three databases, the registry, the tenant directory (its
    settings overridden by ``directory``) and the keys of KEYS and EXTRA_KEYS."""
    return make_fleet(**tenant_overrides(even, tenants, http=http, pool=pool, **directory))


def tenant_overrides(even: Cluster, tenants: Tenants, *, http: bool = False, pool: dict[str, Any] | None = None,
                     **directory: Any) -> dict[str, Any]:
    """The config of ``tenant_fleet``, as overrides of conftest's fleet_config."""
    overrides: dict[str, Any] = {
        "databases": {"registry": {"dsn": even.dsn(REGISTRY)}},
        "directory": {"registry": "registry", "table": TABLE, "encryption_key": tenants.key.decode(),
                      "cache_ttl": "30s", "idle_timeout": "60s", **directory},
        "keys": [{"id": key, "secret": s, "role": role, **({"user_id": 42} if role == "database" else {})}
                 for key, (s, role) in KEYS.items()] + EXTRA_KEYS,
    }
    if pool is not None:
        overrides["pool"] = pool
    if http:
        overrides["http"] = {"host": "127.0.0.1", "port": free_port()}
    return overrides


def tenant_dsn(fleet: Fleet, name: str, key: str = "pf_server") -> str:
    return f"postgresql://{key}:{secret(key)}@127.0.0.1:{fleet.port}/{name}"


def hosts(even: Cluster, other: Cluster) -> dict[int, str]:
    """port -> the ``tenants@HOST:PORT`` name of that cluster's row in SHOW POOLS / SHOW HEALTH."""
    return {c.port: f"tenants@{c.host}:{c.port}" for c in (even, other)}


def connect_each(fleet: Fleet, names: list[str], threads: int = 8) -> list[str]:
    """Each name connected to once (a client of its own, in a transaction) from ``threads``
    threads, its marker read; what went wrong, one line each (empty: every tenant answered with
    its own name)."""
    wrong: list[str] = []
    lock = threading.Lock()

    def work(share: list[str]) -> None:
        for name in share:
            try:
                with psycopg.connect(tenant_dsn(fleet, name)) as conn:
                    found = conn.execute("SELECT name, current_database() FROM marker").fetchall()
                if found != [(name, name)]:
                    with lock:
                        wrong.append(f"{name}: {found}")
            except psycopg.Error as exc:
                with lock:
                    wrong.append(f"{name}: {type(exc).__name__} {exc.sqlstate}: {exc}")
    workers = [threading.Thread(target=work, args=(names[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not any(worker.is_alive() for worker in workers), "a client thread never finished"
    return wrong


def held(fleet: Fleet, name: str, key: str = "pf_server") -> psycopg.Connection[Any]:
    """A client of ``name`` inside a transaction that has read its marker: it holds a backend."""
    conn = psycopg.connect(tenant_dsn(fleet, name, key))
    assert conn.execute("SELECT name FROM marker").fetchall() == [(name,)]
    return conn


def closed_by_server(conn: psycopg.Connection[Any], timeout: float = 10.0) -> psycopg.Error:
    """Waits until the server sends ``conn`` something unasked (its FATAL), then the error that
    the next query raises (the connection is then closed)."""
    readable, _, _ = select.select([conn.fileno()], [], [], timeout)
    assert readable, f"pgfleet sent the client nothing within {timeout:g}s"
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT name FROM marker")
    assert conn.closed
    conn.close()
    return err.value


def databases_on(cluster: Cluster, *names: str) -> set[str]:
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                                           (list(names),)).fetchall()}


def forget(tenants: Tenants, clusters: tuple[Cluster, ...], *names: str) -> None:
    """No registry row and no database for ``names`` (left by an earlier, failed run)."""
    tenants.unregister(*names)
    for cluster in clusters:
        for name in names:
            cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cluster.psql(f"DROP ROLE IF EXISTS {name}")


def http(fleet: Fleet, method: str, path: str, body: Any = None, key: str | None = "pf_admin",
         key_secret: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers |= {"X-API-Key": key, "X-API-Secret": key_secret or secret(key)}
    request = urllib.request.Request(f"http://127.0.0.1:{fleet.config['http']['port']}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, text = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


def metrics(fleet: Fleet) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics parsed with prometheus-client's parser: sample name -> [(labels, value)]."""
    url = f"http://127.0.0.1:{fleet.config['http']['port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        body = answer.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def metric(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` with exactly ``labels``; None when there is none."""
    values = [v for got, v in found.get(name, []) if got == labels]
    assert len(values) <= 1, (name, labels, values)
    return values[0] if values else None


# ---------------------------------------------------------------------------------------------


def test_a_thousand_tenants_on_two_clusters_answer_only_for_themselves_within_the_cap_per_host(
        make_fleet: Callable[..., Fleet], even: Cluster, other: Cluster, tenants: Tenants) -> None:
    """600 clients in 8 threads, each to a tenant picked at random among 1,000: every one reads
    the marker of the tenant it named, never another's. Meanwhile pg_stat_activity on both
    clusters never shows more of pgfleet's tenant backends than max_backends_per_host (4: fewer
    than the clients that want one at times, so clients wait and idle connections of other
    tenants are closed to make room). Once the clients are gone, every tenant pool closes after
    idle_timeout: no tenant backend left on either cluster, SHOW TENANTS says every known tenant's
    pool is closed, SHOW POOLS shows no tenant pool and its per-host rows hold nothing."""
    cap = 4
    fleet = tenant_fleet(make_fleet, even, tenants, pool={"acquire_timeout": "15s"}, pool_size=2,
                         max_backends_per_host=cap, idle_timeout="1s")
    clusters = (even, other)
    assert all(tenant_backends(c) == 0 for c in clusters), "tenant backends of another pgfleet are still open"
    rng = random.Random(21)
    names = [tenant_name(rng.randrange(COUNT)) for _ in range(600)]
    with Sampler(clusters) as sampler:
        wrong = connect_each(fleet, names)
    assert wrong == [], f"{len(wrong)} of {len(names)} clients: {wrong[:10]}"
    print(f"\nmost tenant backends seen per cluster (cap {cap}): {sampler.most} in {sampler.samples} samples")
    assert sampler.samples > 10
    assert sampler.most[even.port] <= cap and sampler.most[other.port] <= cap, sampler.most
    assert sampler.most[even.port] >= 1 and sampler.most[other.port] >= 1, sampler.most  # it did see them
    known = set(names)
    assert {r["name"] for r in console(fleet, "SHOW TENANTS")} == known

    def all_closed() -> bool:
        return all(tenant_backends(c) == 0 for c in clusters) and \
            all(r["pool"] == "closed" for r in console(fleet, "SHOW TENANTS"))
    assert wait_until(all_closed, 20, 0.1), ([tenant_backends(c) for c in clusters],
                                             [r for r in console(fleet, "SHOW TENANTS") if r["pool"] != "closed"][:5])
    tenant_rows = console(fleet, "SHOW TENANTS")
    assert {r["name"] for r in tenant_rows} == known  # closed, still known
    assert all(r["cl_active"] == r["sv_active"] == r["sv_idle"] == 0 for r in tenant_rows)
    pools = {r["database"]: r for r in console(fleet, "SHOW POOLS")}
    assert not known & set(pools), "SHOW POOLS lists a closed tenant pool"
    for name in hosts(even, other).values():  # a host whose tenants are all closed may be left out
        row = pools.get(name)
        assert row is None or row["cl_active"] == row["cl_waiting"] == row["sv_active"] == row["sv_idle"] == 0, row
    assert "Traceback" not in fleet.log()


def test_a_tenant_added_at_run_time_is_reachable_at_once_and_one_deleted_is_closed(
        make_fleet: Callable[..., Fleet], even: Cluster, other: Cluster, tenants: Tenants) -> None:
    """No negative cache: a name refused with 3D000 is reachable at the next connect once its
    database and registry row exist (no RELOAD). Its registry row deleted while clients are
    connected: they are closed with FATAL 3D000 (the contract: within cache_ttl, here 1 s, plus
    1 s; waited for up to 10 s), its backends leave pg_stat_activity, and new connects get 3D000;
    another tenant's client is untouched."""
    name = "tenant_late"
    forget(tenants, (even, other), name)
    fleet = tenant_fleet(make_fleet, even, tenants, cache_ttl="1s", idle_timeout="60s")
    refused = login_error(fleet, "pf_server", secret("pf_server"), name)
    assert refused["C"] == "3D000" and refused["M"] == f'database "{name}" does not exist', refused
    tenants.add_database(other, name)
    tenants.register(tenants.row(name, other))
    try:
        assert marker(fleet, "pf_server", secret("pf_server"), name) == name  # at once: nothing cached the refusal
        client = held(fleet, name)
        bystander = held(fleet, "tenant_0002")
        with Raw(fleet.port) as raw:
            raw.login("pf_server", secret("pf_server"), name)
            assert rows(raw.query("SELECT name FROM marker")) == [[name]]
            assert tenant_backends(other, name) >= 1
            tenants.unregister(name)
            closed = raw.error_then_close(timeout=10)
        assert closed["C"] == "3D000" and closed["S"] == "FATAL", closed
        assert closed_by_server(client).sqlstate == "3D000"
        assert wait_until(lambda: tenant_backends(other, name) == 0, 10), "the deleted tenant's backends stayed"
        gone = login_error(fleet, "pf_server", secret("pf_server"), name)
        assert gone["C"] == "3D000" and gone["M"] == f'database "{name}" does not exist', gone
        assert name not in {r["name"] for r in console(fleet, "SHOW TENANTS")}
        assert bystander.execute("SELECT name FROM marker").fetchall() == [("tenant_0002",)]
        bystander.close()
    finally:
        tenants.unregister(name)


def test_passwords_decrypt_with_any_configured_key_and_one_that_cannot_is_F0000_naming_its_tenant(
        make_fleet: Callable[..., Fleet], even: Cluster, other: Cluster, tenants: Tenants,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """encryption_key from the environment (${...}) with two keys: rows encrypted under either
    log in. A row encrypted under a third key and a row whose token is corrupt are each refused
    with FATAL F0000 whose message names that tenant (no traceback in the log), and the other
    tenants still work after them. A row with a dsn and a password: the decrypted password wins
    over the dsn's (wrong) one; a row with a dsn only logs in with the dsn's password."""
    new_key = Fernet.generate_key()
    monkeypatch.setenv("PGFLEET_TEST_TENANT_KEYS", f"{new_key.decode()},{tenants.key.decode()}")
    rotated, wrong_key, corrupt, both = "rotated_t", "wrongkey_t", "corrupt_t", "dsnpw_t"
    forget(tenants, (), rotated, wrong_key, corrupt, both)
    tenants.register(
        {**tenants.row(rotated, even, "tenant_0010"), "password": tenants.token(key=new_key)},
        {**tenants.row(wrong_key, even, "tenant_0012"), "password": tenants.token(key=Fernet.generate_key())},
        {**tenants.row(corrupt, other, "tenant_0013"), "password": "gAAAAABnot-a-fernet-token"},
        {"name": both, "host": None, "port": None, "dbname": None, "user": None, "password": tenants.token(),
         "dsn": other.dsn("tenant_0015", user=OWNER, password="not-the-password")})
    try:
        fleet = tenant_fleet(make_fleet, even, tenants, encryption_key="${PGFLEET_TEST_TENANT_KEYS}")
        server = ("pf_server", secret("pf_server"))
        assert marker(fleet, *server, "tenant_0002") == "tenant_0002"  # the second key decrypts
        assert marker(fleet, *server, rotated) == "tenant_0010"  # the first key decrypts
        assert marker(fleet, *server, both) == "tenant_0015"
        assert marker(fleet, *server, "tenant_0103") == "tenant_0103"  # a dsn row, no password column
        for name in (wrong_key, corrupt):
            fields = login_error(fleet, *server, name)
            assert fields["C"] == "F0000" and fields["S"] == "FATAL", fields
            assert f'tenant "{name}"' in fields["M"] and "decrypt" in fields["M"], fields
        assert marker(fleet, *server, "tenant_0021") == "tenant_0021"  # a new lookup after the failures
        assert marker(fleet, *server, "tenant_0002") == "tenant_0002"
        assert "Traceback" not in fleet.log()
    finally:
        tenants.unregister(rotated, wrong_key, corrupt, both)


def test_which_keys_reach_which_tenants(make_fleet: Callable[..., Fleet], even: Cluster, tenants: Tenants) -> None:
    """A server key whose allow-list is the pattern tenant_00* reaches tenant_0001 and gets 42501
    for tenant_0500, for a name outside the pattern that does not exist either (nothing learnt
    about it) and for TENANT_0001 (patterns are case-sensitive); a name that the pattern allows
    but the registry lacks is 3D000. A database key bound to tenant_0005 reads tenant_0005's
    marker by its name and through the fleet database, and gets 42501 elsewhere; a database key
    bound to a user id and a client key get 42501; keys without an allow-list reach any tenant."""
    fleet = tenant_fleet(make_fleet, even, tenants)

    def refused(key: str, database: str) -> dict[str, str]:
        return login_error(fleet, key, secret(key), database)
    assert marker(fleet, *T00, "tenant_0001") == "tenant_0001"
    for name in ("tenant_0500", "no_such_tenant", "TENANT_0001"):
        assert refused(T00[0], name)["C"] == "42501", name
    unknown = refused(T00[0], "tenant_00zz")
    assert unknown["C"] == "3D000" and unknown["M"] == 'database "tenant_00zz" does not exist', unknown
    assert marker(fleet, *T5, "tenant_0005") == "tenant_0005"
    assert marker(fleet, *T5, "app") == "tenant_0005"  # the fleet database: its tenant's
    for name in ("tenant_0006", "tenant_9999"):
        assert refused(T5[0], name)["C"] == "42501", name
    assert refused("pf_tenant", "tenant_0001")["C"] == "42501"
    assert refused("pf_client", "tenant_0001")["C"] == "42501"
    assert marker(fleet, "pf_server", secret("pf_server"), "tenant_0500") == "tenant_0500"
    assert marker(fleet, "pf_admin", secret("pf_admin"), "tenant_0777") == "tenant_0777"
    unknown = refused("pf_server", "tenant_9999")
    assert unknown["C"] == "3D000" and unknown["M"] == 'database "tenant_9999" does not exist', unknown


def test_create_and_drop_tenant_through_the_console_and_http(
        make_fleet: Callable[..., Fleet], even: Cluster, other: Cluster, tenants: Tenants) -> None:
    """CREATE TENANT ... ON pg2 makes, on the second cluster, a login role of the tenant's own
    (no superuser) and its database from the template, owned by that role with the template's
    tables, and the registry row (that role, its password encrypted; never the host's admin
    credentials); a client reaches it at once and may not run what only a superuser may.
    DROP TENANT closes that client (57P01), deletes the row and drops the database. Without ON,
    the host with fewer registry rows is chosen. Refusals: 42P04 for an existing tenant, 42602 for
    a bad name, 42704 for an unknown host, 3D000 to drop an unknown one; none of them makes a
    database or a row. Over HTTP: POST /api/tenants 201, 409 again, 400 for a bad name, 401
    without the right secret, 403 for a server key; DELETE 200, then 404."""
    made = ("t_new", "t_auto", "t_http", "t_nohost", "t_bad")
    forget(tenants, (even, other), *made)
    tenants.registry("DELETE FROM tenants WHERE name LIKE 'filler\\_%'")
    fleet = tenant_fleet(make_fleet, even, tenants, http=True, template=TEMPLATE,
                         hosts={"pg1": even.dsn("postgres"), "pg2": other.dsn("postgres")})
    try:
        assert console(fleet, f"CREATE TENANT t_new FROM TEMPLATE {TEMPLATE} ON pg2") == []  # a tag, no rows
        assert databases_on(other, "t_new") == {"t_new"} and databases_on(even, "t_new") == set()
        row = tenants.registry(f'SELECT host, port, dbname, "user", password, dsn FROM {TABLE} WHERE name = %s',
                               "t_new")
        assert len(row) == 1 and row[0][:4] == (other.host, other.port, "t_new", "t_new") and row[0][5] is None
        password = Fernet(tenants.key).decrypt(row[0][4].encode()).decode()
        assert password != other.password
        with psycopg.connect(other.dsn("t_new", user="t_new", password=password), autocommit=True) as direct:
            assert direct.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                                  "WHERE rolname = current_user").fetchall() == [(False, False, False)]
            assert direct.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 't_new'"
                                  ).fetchall() == [("t_new",)]
            assert direct.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'marker'").fetchall() == \
                [("t_new",)]
        client = psycopg.connect(tenant_dsn(fleet, "t_new"), autocommit=True)
        assert client.execute("SELECT count(*) FROM marker").fetchall() == [(0,)]  # the template's table
        client.execute("ALTER TABLE marker ADD COLUMN note text")  # its own table: its own migrations
        with pytest.raises(psycopg.Error) as err:
            client.execute("COPY (SELECT 1) TO PROGRAM 'id'")
        assert err.value.sqlstate == "42501"
        console(fleet, "DROP TENANT t_new")
        assert closed_by_server(client).sqlstate == "57P01"
        assert tenants.registry(f"SELECT name FROM {TABLE} WHERE name = 't_new'") == []
        assert databases_on(other, "t_new") == set()
        assert login_error(fleet, "pf_server", secret("pf_server"), "t_new")["C"] == "3D000"
        with pytest.raises(psycopg.Error) as err:
            console(fleet, "DROP TENANT t_new")
        assert err.value.sqlstate == "3D000"

        # Without ON: pg1 is given more rows than pg2 (however dsn rows are counted), pg2 is chosen.
        def rows_on(cluster: Cluster) -> int:
            found = tenants.registry(f"SELECT count(*) FROM {TABLE} WHERE port = %s OR dsn LIKE %s",
                                     cluster.port, f"%:{cluster.port}/%")
            return int(found[0][0])
        fillers = [f"filler_{i}" for i in range(1, rows_on(other) - rows_on(even) + 3)]
        tenants.register(*(tenants.row(name, even, "no_such_database") for name in fillers))
        assert console(fleet, "CREATE TENANT t_auto") == []
        assert databases_on(other, "t_auto") == {"t_auto"}
        with psycopg.connect(tenant_dsn(fleet, "t_auto"), autocommit=True) as conn:  # the default template
            assert conn.execute("SELECT count(*) FROM marker").fetchall() == [(0,)]
        tenants.unregister(*fillers)
        console(fleet, "DROP TENANT t_auto")
        assert databases_on(other, "t_auto") == set()

        for command, sqlstate in ((f"CREATE TENANT tenant_0001 FROM TEMPLATE {TEMPLATE} ON pg1", "42P04"),
                                  ("CREATE TENANT 9lives ON pg1", "42602"),
                                  (f"CREATE TENANT {'t' * 64} ON pg1", "42602"),
                                  ("CREATE TENANT t_nohost ON pg9", "42704")):
            with pytest.raises(psycopg.Error) as err:
                console(fleet, command)
            assert err.value.sqlstate == sqlstate, (command, err.value)
        assert databases_on(even, "t_nohost", "9lives", "t" * 64) == databases_on(other, "t_nohost", "9lives") == set()
        assert tenants.registry(f"SELECT count(*) FROM {TABLE} WHERE name = 't_nohost'") == [(0,)]
        assert marker(fleet, "pf_server", secret("pf_server"), "tenant_0001") == "tenant_0001"  # untouched

        body = {"name": "t_http", "host": "pg1"}
        status, created = http(fleet, "POST", "/api/tenants", body)
        assert status == 201, created
        assert where(created) == ("t_http", even.host, even.port, "t_http"), created
        assert databases_on(even, "t_http") == {"t_http"}
        assert marker_count(fleet, "t_http") == 0
        assert http(fleet, "POST", "/api/tenants", body)[0] == 409
        assert http(fleet, "POST", "/api/tenants", {"name": "t_bad", "host": "pg1"}, key="pf_server")[0] == 403
        assert http(fleet, "POST", "/api/tenants", {"name": "t_bad"}, key_secret="wrong")[0] == 401
        assert http(fleet, "POST", "/api/tenants", {"name": "t_bad"}, key=None)[0] == 401
        assert http(fleet, "POST", "/api/tenants", {"name": "Bad-Name"})[0] == 400
        assert databases_on(even, "t_bad") == databases_on(other, "t_bad") == set()
        assert http(fleet, "DELETE", "/api/tenants/t_http", key="pf_server")[0] == 403
        assert databases_on(even, "t_http") == {"t_http"}
        assert http(fleet, "DELETE", "/api/tenants/t_http") == (200, {"dropped": "t_http"})
        assert databases_on(even, "t_http") == set()
        assert tenants.registry(f"SELECT count(*) FROM {TABLE} WHERE name = 't_http'") == [(0,)]
        assert http(fleet, "DELETE", "/api/tenants/t_http")[0] == 404
        assert "Traceback" not in fleet.log()
    finally:
        tenants.registry("DELETE FROM tenants WHERE name LIKE 'filler\\_%'")
        forget(tenants, (even, other), *made)


def where(answer: dict[str, Any]) -> tuple[Any, ...]:
    """What CREATE TENANT and POST /api/tenants answer: name, host, port, dbname (more is allowed)."""
    return tuple(answer.get(field) for field in ("name", "host", "port", "dbname"))


def marker_count(fleet: Fleet, name: str) -> int:
    with psycopg.connect(tenant_dsn(fleet, name), autocommit=True) as conn:
        found = conn.execute("SELECT count(*) FROM marker").fetchone()
    assert found is not None
    return int(found[0])


def test_memory_with_a_thousand_known_tenants_and_fifty_open_pools(
        make_fleet: Callable[..., Fleet], even: Cluster, other: Cluster, tenants: Tenants) -> None:
    """pgfleet's resident memory (VmRSS) before any tenant, once all 1,000 tenants are known
    (each connected to once, its marker right, every pool closed again after idle_timeout) and
    with 50 clients holding 50 tenants: under 50 KB per known tenant, under 250 MB in all."""
    fleet = tenant_fleet(make_fleet, even, tenants, pool={"acquire_timeout": "15s"}, cache_ttl="10m",
                         idle_timeout="1s", pool_size=1, max_backends_per_host=30)
    assert fleet.proc is not None
    fleet.health_checked()
    before = rss_kb(fleet.proc.pid)
    wrong = connect_each(fleet, tenants.names)
    assert wrong == [], f"{len(wrong)} of {COUNT}: {wrong[:10]}"

    def every_pool_closed() -> bool:
        found = console(fleet, "SHOW TENANTS")
        return len(found) == COUNT and all(r["pool"] == "closed" for r in found)
    assert wait_until(every_pool_closed, 30, 0.2)
    assert wait_until(lambda: tenant_backends(even) == tenant_backends(other) == 0, 10)
    known = rss_kb(fleet.proc.pid)
    clients = [held(fleet, tenant_name(i)) for i in range(50)]
    try:
        assert sum(1 for r in console(fleet, "SHOW TENANTS") if r["pool"] == "open") == 50
        open_pools = rss_kb(fleet.proc.pid)
    finally:
        for client in clients:
            client.close()
    per_tenant = (known - before) / COUNT
    print(f"\npgfleet VmRSS: {before / 1024:.1f} MB before any tenant, {known / 1024:.1f} MB with {COUNT} known "
          f"({per_tenant:.1f} KB per known tenant), {open_pools / 1024:.1f} MB with 50 open pools "
          f"({(open_pools - known) / 50:.1f} KB per open pool)")
    assert per_tenant < 50, per_tenant
    assert open_pools < 250 * 1024, open_pools


def test_pools_health_databases_and_metrics_show_the_tenant_hosts(
        make_fleet: Callable[..., Fleet], even: Cluster, other: Cluster, tenants: Tenants) -> None:
    """With six clients holding five tenants in transactions (two on tenant_0000, which also ran
    the most transactions; tenant_0004 is a dsn row): SHOW POOLS has one tenants@HOST:PORT row per
    cluster with those clients' sums and at most `top` (3) tenant rows, the busiest among them;
    SHOW TENANTS has each tenant with its host, port, user and open pool; SHOW HEALTH has a
    healthy row per host; GET /databases has an entry per host with its counts and limit; and
    /metrics has the per-host families, the lookups by result and the top-3 families."""
    fleet = tenant_fleet(make_fleet, even, tenants, http=True, cache_ttl="10m", idle_timeout="60s", pool_size=2,
                         max_backends_per_host=10, top=3)
    busiest, on_pg, on_other = "tenant_0000", ("tenant_0002", "tenant_0004"), ("tenant_0001", "tenant_0005")
    with psycopg.connect(tenant_dsn(fleet, busiest), autocommit=True) as conn:
        for _ in range(5):
            assert conn.execute("SELECT name FROM marker").fetchall() == [(busiest,)]
    assert login_error(fleet, "pf_server", secret("pf_server"), "tenant_nope")["C"] == "3D000"
    names = {even.port: [busiest, busiest, *on_pg], other.port: list(on_other)}
    clients = [held(fleet, name) for port in names for name in names[port]]
    try:
        by_host = hosts(even, other)
        pools = {r["database"]: r for r in console(fleet, "SHOW POOLS")}
        for port, held_names in names.items():
            row = pools[by_host[port]]
            assert row["user"] == "*"
            assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (len(held_names), 0, len(held_names)), row
        shown = [r for name, r in pools.items() if name.startswith("tenant_")]
        assert 1 <= len(shown) <= 3, shown
        assert {r["database"] for r in shown} <= {busiest, *on_pg, *on_other}
        assert (pools[busiest]["cl_active"], pools[busiest]["sv_active"]) == (2, 2), pools.get(busiest)

        listed = {r["name"]: r for r in console(fleet, "SHOW TENANTS")}
        assert set(listed) == {busiest, *on_pg, *on_other}
        for port, held_names in names.items():
            for name in set(held_names):
                row = listed[name]
                count = held_names.count(name)
                assert (row["host"], row["port"], row["dbname"], row["user"], row["pool"]) == \
                    ("127.0.0.1", port, name, OWNER, "open"), row
                assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (count, 0, count), row

        def healthy() -> bool:
            found = {r["database"]: r["status"] for r in console(fleet, "SHOW HEALTH")}
            return all(found.get(name) == "healthy" for name in by_host.values())
        assert wait_until(healthy, 15, 0.1), console(fleet, "SHOW HEALTH")

        status, info = http(fleet, "GET", "/databases", key=None)
        assert status == 200, info
        for port, held_names in names.items():
            entry = info[by_host[port]]
            assert (entry["host"], entry["port"]) == ("127.0.0.1", port)
            assert entry["status"] in ("healthy", "degraded", "down")
            assert (entry["tenants_known"], entry["pools_open"]) == (len(set(held_names)), len(set(held_names)))
            connections = entry["connections"]
            assert (connections["active"], connections["waiting"], connections["limit"]) == \
                (len(held_names), 0, 10), entry

        found = metrics(fleet)
        for port, held_names in names.items():
            host = f"127.0.0.1:{port}"
            assert metric(found, "pgfleet_tenants_known", host=host) == len(set(held_names))
            assert metric(found, "pgfleet_tenant_pools_open", host=host) == len(set(held_names))
            assert metric(found, "pgfleet_tenant_servers", host=host, state="active") == len(held_names)
            assert metric(found, "pgfleet_tenant_clients", host=host) == len(held_names)
            assert metric(found, "pgfleet_tenant_clients_waiting", host=host) == 0
            assert metric(found, "pgfleet_tenant_backends_limit", host=host) == 10
        assert metric(found, "pgfleet_tenant_lookups_total", result="unknown") == 1
        assert (metric(found, "pgfleet_tenant_lookups_total", result="miss") or 0) >= 5
        assert (metric(found, "pgfleet_tenant_lookups_total", result="hit") or 0) >= 2  # tenant_0000 again, twice
        pg_host = f"127.0.0.1:{even.port}"
        for family, least in (("pgfleet_tenant_pool_clients", 2), ("pgfleet_tenant_pool_servers", 2),
                              ("pgfleet_tenant_pool_transactions_total", 5)):
            samples = found.get(family, [])
            assert 1 <= len(samples) <= 3, (family, samples)
            assert {labels["tenant"] for labels, _ in samples} <= {busiest, *on_pg, *on_other}
            value = metric(found, family, tenant=busiest, host=pg_host)
            assert value is not None and value >= least, (family, samples)
    finally:
        for client in clients:
            client.close()


def sleeping(cluster: Cluster) -> int:
    """Backends of the tenants' role on ``cluster`` running a pg_sleep now."""
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state = 'active' "
                           "AND query LIKE 'SELECT pg_sleep%%'", (OWNER,)).fetchone()
    assert row is not None
    return int(row[0])


def test_clients_that_vanish_mid_statement_never_put_a_host_over_its_cap(
        make_fleet: Callable[..., Fleet], even: Cluster, tenants: Tenants) -> None:
    """Two clients fill a host's cap of 2 with 30 s statements and vanish. Their backends are
    cancelled (PostgreSQL reads the Terminate only when a statement ends) and keep their places
    until the server has closed them, so the clients of two other tenants that come next get
    backends as soon as those are gone (well within their 20 s wait, long before the 30 s
    statements would have ended), and pg_stat_activity never shows more than 2."""
    fleet = tenant_fleet(make_fleet, even, tenants, pool={"acquire_timeout": "20s"}, max_backends_per_host=2,
                         pool_size=2)
    first, then = ["tenant_0020", "tenant_0022"], ["tenant_0024", "tenant_0026"]
    with Sampler((even,)) as sampler:
        raws = []
        for name in first:
            raw = Raw(fleet.port)
            raw.login("pf_server", secret("pf_server"), name)
            raw.send(m.query("SELECT pg_sleep(30)"))
            raws.append(raw)
        assert wait_until(lambda: sleeping(even) == 2, 10)
        for raw in raws:
            raw.close()  # gone in the middle of their statements
        for name in then:
            assert marker(fleet, "pf_server", secret("pf_server"), name) == name
        assert sleeping(even) == 0
    assert sampler.most[even.port] <= 2, sampler.most
    assert "Traceback" not in fleet.log()


def test_a_registry_that_does_not_answer_leaves_known_tenants_working(
        make_fleet: Callable[..., Fleet], even: Cluster, tenants: Tenants) -> None:
    """The registry's table gone (renamed) while pgfleet runs: a tenant it knew keeps being
    served on its last row past cache_ttl; one it never looked up is refused at once with 08006
    naming the registry; once the table is back, new tenants are found again. A row with a port
    out of range is F0000 naming its tenant."""
    fleet = tenant_fleet(make_fleet, even, tenants, cache_ttl="1s")
    assert marker(fleet, "pf_server", secret("pf_server"), "tenant_0030") == "tenant_0030"
    tenants.registry(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")
    try:
        time.sleep(1.5)  # past cache_ttl: the row would be asked for again
        assert marker(fleet, "pf_server", secret("pf_server"), "tenant_0030") == "tenant_0030"
        refused = login_error(fleet, "pf_server", secret("pf_server"), "tenant_0032")
        assert refused["C"] == "08006" and "registry" in refused["M"], refused
    finally:
        tenants.registry(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")
    assert wait_until(lambda: _answers(fleet, "tenant_0032"), 10)
    tenants.register({**tenants.row("t_badport", even, "tenant_0034"), "port": 70000})
    try:
        bad = login_error(fleet, "pf_server", secret("pf_server"), "t_badport")
        assert bad["C"] == "F0000" and 'tenant "t_badport"' in bad["M"], bad
    finally:
        tenants.unregister("t_badport")
    assert "Traceback" not in fleet.log()


def _answers(fleet: Fleet, name: str) -> bool:
    try:
        return marker(fleet, "pf_server", secret("pf_server"), name) == name
    except psycopg.Error:
        return False


def test_a_directory_added_by_a_reload_waits_for_a_restart_and_says_so(
        make_fleet: Callable[..., Fleet], even: Cluster, tenants: Tenants) -> None:
    """A RELOAD that adds directory: (with a key bound to a tenant) takes the keys at once but not
    the directory: that key's client is refused with 55000 saying to restart, never left hanging,
    and a tenant's name is still no database (3D000)."""
    fleet = make_fleet(databases={"registry": {"dsn": even.dsn(REGISTRY)}})
    config = dict(fleet.config)
    config["directory"] = {"registry": "registry", "table": TABLE, "encryption_key": tenants.key.decode()}
    config["keys"] = [*config["keys"], EXTRA_KEYS[1]]
    fleet.config_path.write_text(yaml.safe_dump(config))
    console(fleet, "RELOAD")
    refused = login_error(fleet, T5[0], T5[1], "app")
    assert refused["C"] == "55000" and "restart" in (refused.get("H", "") + refused["M"]), refused
    assert login_error(fleet, "pf_server", secret("pf_server"), "tenant_0005")["C"] == "3D000"
    assert "Traceback" not in fleet.log()


def test_sql_over_http_reaches_a_tenant_as_the_wire_does(
        make_fleet: Callable[..., Fleet], even: Cluster, tenants: Tenants) -> None:
    """Neon's /sql protocol with a tenant's name in Neon-Connection-String: the tenant's own rows;
    a key whose pattern does not allow it: 42501; an unknown tenant: 3D000 (each a 400 with the
    error's fields, as Neon answers)."""
    fleet = tenant_fleet(make_fleet, even, tenants, http=True)

    def neon(key: str, database: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{fleet.config['http']['port']}/sql", method="POST",
            data=json.dumps({"query": "SELECT name FROM marker", "params": []}).encode(),
            headers={"Content-Type": "application/json", "Neon-Array-Mode": "true",
                     "Neon-Connection-String": f"postgresql://{key}:{secret(key)}@127.0.0.1/{database}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = neon("pf_server", "tenant_0007")
    assert status == 200 and body["rows"] == [["tenant_0007"]], body
    status, body = neon(T00[0], "tenant_0500")  # (Neon's protocol: every error is a 400 with its fields)
    assert status == 400 and body["code"] == "42501", body
    status, body = neon("pf_server", "tenant_9999")
    assert status == 400 and body["code"] == "3D000", body


def test_two_workers_split_the_cap_and_each_serves_its_clients_tenants(
        pg: Cluster, even: Cluster, tenants: Tenants, tmp_path: Path) -> None:
    """pgfleet run --workers 2 with max_backends_per_host 2: each worker may have 1 backend on the
    host (the shares add up to the cap), so 40 tenants' clients spread over both workers by the
    kernel never put it over 2 in pg_stat_activity, and each reads its own tenant."""
    overrides = tenant_overrides(even, tenants, pool={"acquire_timeout": "20s"}, max_backends_per_host=2,
                                 pool_size=2)
    fleet = Fleet(fleet_config(pg, **overrides), tmp_path, workers=2).start()
    try:
        with Sampler((even,)) as sampler:
            wrong = connect_each(fleet, [tenant_name(i) for i in range(0, 80, 2)], threads=6)
        assert wrong == [], wrong[:10]
        assert 1 <= sampler.most[even.port] <= 2, sampler.most
        workers = console(fleet, "SHOW WORKERS")
        assert len(workers) == 2, workers
        assert "Traceback" not in fleet.log()
    finally:
        fleet.stop()
