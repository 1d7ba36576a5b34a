"""The admin console (``psql .../pgfleet`` with an admin key), through psql, psycopg and asyncpg.

Each command is asserted on its content against what the test itself did to the fleet (its
own connections, keys, tables and databases), never only on its column names.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.admin.console import COMMANDS
from proxy.embedded import Cluster

from .conftest import KEYS, Fleet


@pytest.fixture(scope="module")
def console_fleet(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from .conftest import fleet_config
    config = fleet_config(pg, sharding={"shards": ["primary", "secondary"], "function": "hash",
                                        "tables": {"users": "id"}, "reference_tables": ["currencies"]})
    fleet = Fleet(config, tmp_path_factory.mktemp("console")).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def admin(fleet: Fleet) -> psycopg.Connection[Any]:
    return psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True)


def show(fleet: Fleet, command: str) -> list[dict[str, Any]]:
    with admin(fleet) as conn:
        cur = conn.execute(command)
        assert cur.description is not None
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_other_roles_get_42501(console_fleet: Fleet) -> None:
    for key in ("pf_server", "pf_client", "pf_tenant"):
        with pytest.raises(psycopg.OperationalError, match="may not use the admin console"):
            psycopg.connect(console_fleet.dsn(key, "pgfleet"))


def test_show_help_lists_every_command_from_the_table(console_fleet: Fleet) -> None:
    rows = show(console_fleet, "SHOW HELP")
    assert [r["command"].split(" <")[0] for r in rows] == [" ".join(c.words) for c in COMMANDS]
    out = subprocess.run(["psql", "-X", "-At", console_fleet.dsn("pf_admin", "pgfleet"), "-c", "show help"],
                         capture_output=True, text=True, timeout=30, check=True)
    assert "SHOW POOLS|" in out.stdout and "KILL <client pid>|" in out.stdout


def test_show_databases_pools_servers_and_clients_see_this_tests_connections(console_fleet: Fleet) -> None:
    with psycopg.connect(console_fleet.dsn()) as client:
        client.execute("select 1 from currencies limit 1")  # a transaction left open on a shard
        databases = {r["name"]: r for r in show(console_fleet, "show databases")}
        assert set(databases) == {"primary", "secondary", "analytics"}
        assert databases["primary"]["database"] == "bank" and databases["primary"]["pool_size"] == 10
        assert databases["primary"]["role"] == "default, shard 0"
        assert databases["primary"]["current_connections"] >= 1
        pools = {r["database"]: r for r in show(console_fleet, "SHOW POOLS")}
        in_tx = client.info.backend_pid  # pgfleet's own pid for the client, from BackendKeyData
        clients = {r["pid"]: r for r in show(console_fleet, "SHOW CLIENTS")}
        assert clients[in_tx]["user"] == "pf_server" and clients[in_tx]["database"] == "app"
        assert clients[in_tx]["tx"] == "T" and clients[in_tx]["state"] == "active"
        server_db = clients[in_tx]["server_database"]
        assert server_db in ("primary", "secondary")
        assert pools[server_db]["cl_active"] >= 1 and pools[server_db]["sv_active"] >= 1
        servers = show(console_fleet, "SHOW SERVERS")
        mine = [s for s in servers if s["client_pid"] == in_tx]
        assert len(mine) == 1 and mine[0]["database"] == server_db and mine[0]["tx"] == "T"
        assert mine[0]["pid"] == clients[in_tx]["server_pid"]
        client.rollback()


def test_show_keys_never_shows_secrets(console_fleet: Fleet) -> None:
    rows = {r["id"]: r for r in show(console_fleet, "SHOW KEYS")}
    assert set(rows) == set(KEYS)
    assert rows["pf_tenant"]["role"] == "database" and rows["pf_tenant"]["binding"] == "42"
    everything = repr(show(console_fleet, "SHOW KEYS")) + repr(show(console_fleet, "SHOW CONFIG"))
    for secret, _ in KEYS.values():
        assert secret not in everything
    assert "scrampass" not in everything and "md5pass" not in everything  # dsn passwords


def test_show_tables_config_version_and_plan(console_fleet: Fleet) -> None:
    tables = {r["table"]: r for r in show(console_fleet, "SHOW TABLES")}
    assert tables["users"]["kind"] == "sharded" and tables["users"]["shard_key"] == "id"
    assert tables["currencies"]["kind"] == "reference"
    assert tables["events"] == {"table": "events", "kind": "mapped", "databases": "analytics",
                                "shard_key": None, "key_type": None}
    config = {r["key"]: r["value"] for r in show(console_fleet, "SHOW CONFIG")}
    assert config["default_database"] == "primary" and config["pool.size"] == "10"
    assert show(console_fleet, "SHOW VERSION")[0]["version"].startswith("pgfleet ")
    plan = show(console_fleet, "SHOW PLAN select * from events where id = 1")[0]
    assert plan["kind"] == "direct" and plan["databases"] == "analytics" and "events" in plan["reason"]
    fanout = show(console_fleet, "show plan SELECT count(*) FROM users")[0]
    assert fanout["kind"] == "fan-out" and fanout["databases"] == "primary,secondary"
    assert fanout["shard_query"] is not None


def test_show_schema_sizes_and_health(console_fleet: Fleet, pg: Cluster) -> None:
    schema = show(console_fleet, "SHOW SCHEMA analytics")
    assert {(r["table"], r["column"]) for r in schema} >= {("events", "id")}
    sizes = {r["database"]: r for r in show(console_fleet, "SHOW SIZES")}
    with psycopg.connect(pg.dsn("bank")) as conn:
        size = conn.execute("select pg_database_size('bank')").fetchone()[0]  # type: ignore[index]
    assert sizes["primary"]["status"] == "available"
    assert abs(sizes["primary"]["size_bytes"] - size) < 1024 * 1024 and sizes["primary"]["table_count"] > 0
    with pytest.raises(psycopg.errors.InvalidCatalogName, match='database "nope" does not exist'):
        show(console_fleet, "SHOW SCHEMA nope")


def test_kill_closes_that_client_only(console_fleet: Fleet) -> None:
    with psycopg.connect(console_fleet.dsn()) as victim, psycopg.connect(console_fleet.dsn()) as other:
        with admin(console_fleet) as conn:
            assert conn.execute(f"KILL {victim.info.backend_pid}").statusmessage == "KILL"
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            victim.execute("select 1")
        assert other.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.errors.UndefinedObject, match="no client with pid"):
        show(console_fleet, "KILL 1")


def test_unknown_commands_and_bad_arguments_are_errors_not_disconnects(console_fleet: Fleet) -> None:
    with admin(console_fleet) as conn:
        with pytest.raises(psycopg.errors.SyntaxError, match="SHOW HELP lists"):
            conn.execute("SHOW NONSENSE")
        with pytest.raises(psycopg.errors.SyntaxError, match="needs a database"):
            conn.execute("SHOW SCHEMA")
        assert conn.execute("SHOW VERSION").fetchone() is not None


def test_asyncpg_speaks_the_extended_protocol_to_the_console(console_fleet: Fleet) -> None:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(console_fleet.dsn("pf_admin", "pgfleet"))
        try:
            return await conn.fetch("SHOW DATABASES")
        finally:
            await conn.close()
    rows = asyncio.run(run())
    assert {r["name"] for r in rows} == {"primary", "secondary", "analytics"}
    assert isinstance(rows[0]["pool_size"], int) and isinstance(rows[0]["paused"], bool)


# -- RELOAD and SIGHUP


def _rewrite(fleet: Fleet, **changes: Any) -> None:
    import yaml
    config = dict(fleet.config)
    config.update(changes)
    fleet.config = config
    fleet.config_path.write_text(yaml.safe_dump(config))


def test_reload_swaps_keys_routing_and_dsns_in(make_fleet: Any, pg: Cluster) -> None:
    fleet: Fleet = make_fleet()
    old_key = psycopg.connect(fleet.dsn("pf_client"), autocommit=True)
    keeper = psycopg.connect(fleet.dsn("pf_server"), autocommit=True)
    keeper.execute("select 1")
    with admin(fleet) as conn:
        assert {r[0] for r in conn.execute("SHOW SERVERS").fetchall()} == {"S"}
    keys = [k for k in fleet.config["keys"] if k["id"] != "pf_client"] + \
        [{"id": "pf_new", "secret": "new-secret", "role": "server"}]
    databases = dict(fleet.config["databases"])
    databases["primary"] = {"dsn": pg.dsn("bank", user="pf_md5", password="md5pass")}
    _rewrite(fleet, keys=keys, databases=databases, tables={**fleet.config["tables"], "ledger": "secondary"})
    with admin(fleet) as conn:
        assert conn.execute("RELOAD").statusmessage == "RELOAD"
        tables = {r[0]: r for r in conn.execute("SHOW TABLES").fetchall()}
        assert tables["ledger"][2] == "secondary"
        assert "pf_new" in {r[0] for r in conn.execute("SHOW KEYS").fetchall()}
    with psycopg.connect(fleet.dsn("pf_new", secret="new-secret"), autocommit=True) as new:
        assert new.execute("select current_user").fetchone() == ("pf_md5",)  # the new dsn's user
    with pytest.raises(psycopg.OperationalError):  # the removed key's client was closed
        old_key.execute("select 1")
    with pytest.raises(psycopg.OperationalError, match="pf_client"):
        psycopg.connect(fleet.dsn("pf_client"))
    assert keeper.execute("select current_user").fetchone() == ("pf_md5",)  # its parked backend moved over
    keeper.close()
    assert "Traceback" not in fleet.log()


def test_an_invalid_config_is_refused_and_the_running_one_stays(make_fleet: Any) -> None:
    fleet: Fleet = make_fleet()
    good = dict(fleet.config)
    _rewrite(fleet, databases={**fleet.config["databases"], "secondary": {"dsn": "nonsense"}})
    with admin(fleet) as conn:
        with pytest.raises(psycopg.errors.ConfigFileError, match="databases.secondary.dsn"):
            conn.execute("RELOAD")
        config = {r[0]: r[1] for r in conn.execute("SHOW CONFIG").fetchall()}
        assert config["databases.secondary.dsn"].startswith("postgresql://")
    with psycopg.connect(fleet.dsn(), autocommit=True) as client:
        assert client.execute("/* pgfleet: database=secondary */ select 1").fetchone() == (1,)
    assert "reload refused, the running config stays" in fleet.log()
    fleet.config = good


def test_sighup_reloads(make_fleet: Any) -> None:
    import signal
    import time
    fleet: Fleet = make_fleet()
    _rewrite(fleet, keys=[*fleet.config["keys"], {"id": "pf_hup", "secret": "hup-secret", "role": "client"}])
    assert fleet.proc is not None
    fleet.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "pf_hup" not in {r["id"] for r in show(fleet, "SHOW KEYS")}:
        assert time.monotonic() < deadline, fleet.log()[-2000:]
        time.sleep(0.05)
    with psycopg.connect(fleet.dsn("pf_hup", secret="hup-secret")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# -- PAUSE, RESUME and SHOW STATS


def test_pause_holds_new_transactions_until_resume_and_lets_running_ones_finish(console_fleet: Fleet) -> None:
    import threading
    import time
    running = psycopg.connect(console_fleet.dsn())
    running.execute("select count(*) from events")  # a transaction open on analytics
    done: list[float] = []
    with admin(console_fleet) as conn:
        assert conn.execute("PAUSE analytics").statusmessage == "PAUSE"
        assert {r[0]: r[8] for r in conn.execute("SHOW DATABASES").fetchall()}["analytics"] is True

        def later() -> None:
            with psycopg.connect(console_fleet.dsn(), autocommit=True) as other:
                other.execute("select count(*) from events")
                done.append(time.monotonic())
        thread = threading.Thread(target=later)
        thread.start()
        running.execute("select 1 from events limit 1")  # the running transaction goes on
        running.commit()
        time.sleep(0.5)
        assert done == [], "a new statement ran on a paused database"
        # Other databases are not paused.
        with psycopg.connect(console_fleet.dsn(), autocommit=True) as free:
            assert free.execute("/* pgfleet: database=secondary */ select 1").fetchone() == (1,)
        resumed = time.monotonic()
        assert conn.execute("RESUME analytics").statusmessage == "RESUME"
        thread.join(10)
        assert done and done[0] >= resumed
    running.close()


def test_show_stats_counts_statements_per_database(console_fleet: Fleet) -> None:
    def stats() -> dict[str, dict[str, Any]]:
        return {r["database"]: r for r in show(console_fleet, "SHOW STATS")}
    with psycopg.connect(console_fleet.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("select count(*) from events")
        before = stats()["analytics"]
        for _ in range(5):
            conn.execute("select count(*) from events")
        after = stats()["analytics"]
    assert after["total_query_count"] - before["total_query_count"] == 5
    assert after["total_xact_count"] - before["total_xact_count"] == 5
    assert after["total_received"] > before["total_received"] and after["total_sent"] > before["total_sent"]


def test_show_health_reads_the_checker(console_fleet: Fleet) -> None:
    import time
    deadline = time.monotonic() + 40
    rows = {r["database"]: r for r in show(console_fleet, "SHOW HEALTH")}
    while any(r["last_check"] is None for r in rows.values()):  # the first round runs at start
        assert time.monotonic() < deadline
        time.sleep(0.2)
        rows = {r["database"]: r for r in show(console_fleet, "SHOW HEALTH")}
    assert set(rows) == {"primary", "secondary", "analytics"}
    for row in rows.values():
        assert row["status"] == "healthy" and row["circuit"] == "closed" and row["failures"] == 0
        assert row["response_ms"] is not None and row["response_ms"] >= 0 and row["last_error"] is None


def test_reload_adds_a_database_with_its_health_checks(make_fleet: Any, pg: Cluster) -> None:
    import time
    fleet: Fleet = make_fleet(health={"interval": "0.2s"})
    _rewrite(fleet, databases={**fleet.config["databases"], "extra": {"dsn": pg.dsn("analytics", user="pf_trust")}})
    with admin(fleet) as conn:
        conn.execute("RELOAD")
        assert "extra" in {r[0] for r in conn.execute("SHOW DATABASES").fetchall()}
        deadline = time.monotonic() + 10
        while {r[0]: r[1] for r in conn.execute("SHOW HEALTH").fetchall()}.get("extra") is None or \
                {r[0]: r[2] for r in conn.execute("SHOW HEALTH").fetchall()}["extra"] is None:
            assert time.monotonic() < deadline, fleet.log()[-2000:]
            time.sleep(0.1)
    with psycopg.connect(fleet.dsn(), autocommit=True) as client:
        assert client.execute("/* pgfleet: database=extra */ select current_database()").fetchone() == ("analytics",)
    assert "Traceback" not in fleet.log()
