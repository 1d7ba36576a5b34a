"""``pgfleet run --workers 2``: a supervisor and two workers on one port (SO_REUSEPORT).

The kernel hands each new connection to one worker; which one is up to its hash of the
connection's addresses, so a test that needs a client on a given worker opens connections
until one lands there (it reads the worker from the pid pgfleet gave the client). Each such
loop is bounded and asserts that it got there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.admin.group import worker_of
from proxy.embedded import Cluster, free_port

from .conftest import ROOT, Fleet, closed_port, fleet_config, wait_until

WORKERS = 2


@pytest.fixture(scope="module")
def group(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    config = fleet_config(pg, pool={"mode": "transaction", "size": 10, "acquire_timeout": "3s"},
                          http={"host": "127.0.0.1", "port": free_port()})
    proc = Fleet(config, tmp_path_factory.mktemp("workers"), workers=WORKERS).start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def console(fleet: Fleet, sql: str) -> str:
    """A console command's tag."""
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as conn:
        return conn.execute(sql).statusmessage or ""


def columns(fleet: Fleet, sql: str) -> list[dict[str, Any]]:
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as conn:
        cur = conn.execute(sql)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def client_on(fleet: Fleet, worker: int, key: str = "pf_server", tries: int = 60) -> psycopg.Connection[Any]:
    """A client connection that landed on ``worker`` (others opened on the way are closed)."""
    for _ in range(tries):
        conn = psycopg.connect(fleet.dsn(key), autocommit=True)
        if worker_of(conn.info.backend_pid) == worker:
            return conn
        conn.close()
    raise AssertionError(f"no connection landed on worker {worker} in {tries} tries")


def workers(fleet: Fleet) -> dict[int, dict[str, Any]]:
    return {row["worker"]: row for row in columns(fleet, "SHOW WORKERS")}


def test_every_worker_serves_and_the_console_shows_the_group(group: Fleet) -> None:
    shown = workers(group)
    assert sorted(shown) == [0, 1]
    assert shown[0]["role"] == "leader" and shown[1]["role"] == "worker"
    assert shown[0]["pid"] != shown[1]["pid"]
    # Clients on both workers, each seen once in SHOW CLIENTS with its worker.
    conns = [client_on(group, 0), client_on(group, 1), client_on(group, 0), client_on(group, 1)]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        rows = columns(group, "SHOW CLIENTS")
        by_pid = {row["pid"]: row for row in rows}
        for conn in conns:
            pid = conn.info.backend_pid
            assert by_pid[pid]["worker"] == worker_of(pid)
        # Each worker runs half of each pool; SHOW DATABASES adds the halves up to the config's size.
        databases = {row["name"]: row for row in columns(group, "SHOW DATABASES")}
        assert databases["primary"]["pool_size"] == 10
        assert len([row for row in columns(group, "SHOW DATABASES") if row["name"] == "primary"]) == 1
    finally:
        for conn in conns:
            conn.close()


def test_show_pools_and_stats_add_up_over_workers(group: Fleet) -> None:
    def xacts() -> int:
        return {row["database"]: row for row in columns(group, "SHOW STATS")}["primary"]["total_xact_count"]
    before = xacts()
    held = [client_on(group, 0), client_on(group, 1)]
    try:
        for conn in held:
            for _ in range(5):
                conn.execute("SELECT 1")
            conn.execute("BEGIN")
            conn.execute("SELECT 1")  # each holds a backend of primary in a transaction
        pools = [row for row in columns(group, "SHOW POOLS") if row["database"] == "primary"
                 and row["user"] == "pf_scram"]
        assert len(pools) == 1
        assert pools[0]["cl_active"] == 2  # one on each worker, added up
        assert pools[0]["sv_active"] >= 2
        for conn in held:
            conn.execute("COMMIT")
        assert xacts() - before == 12  # 2 x (5 + the transaction), counted by two workers
    finally:
        for conn in held:
            conn.close()


def test_a_cancel_landing_on_the_other_worker_still_cancels(group: Fleet) -> None:
    """The cancel connection goes wherever the kernel sends it; whichever worker gets it, the
    statement is cancelled, and at least one of them was passed between workers."""
    forwarded = group.log().count("passed on to worker")
    for attempt in range(30):
        with client_on(group, attempt % 2) as conn:
            with conn.cursor() as cur:
                start = time.monotonic()
                timer = threading.Timer(0.3, conn.cancel)  # a new connection: any worker may get it
                timer.start()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    cur.execute("SELECT pg_sleep(20)")
                timer.join()
                assert time.monotonic() - start < 15
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on
        if group.log().count("passed on to worker") > forwarded:
            return
    raise AssertionError("30 cancels, none landed on the other worker: " + group.log()[-2000:])


def test_metrics_carry_every_worker(group: Fleet) -> None:
    port = group.config["http"]["port"]
    for _ in range(4):  # whichever worker answers the scrape, it has both
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'pgfleet_worker_up{worker="0"} 1.0' in text
        assert 'pgfleet_worker_up{worker="1"} 1.0' in text
        assert 'pgfleet_transactions_total{database="primary",worker="0"}' in text
        assert 'pgfleet_transactions_total{database="primary",worker="1"}' in text
    info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/databases", timeout=10).read())
    assert info["primary"]["connections"]["size"] == 10  # both halves


def test_health_is_checked_by_the_leader_alone_and_every_worker_obeys(pg: Cluster, tmp_path: Path) -> None:
    with closed_port() as port:
        config = fleet_config(pg, health={"interval": "0.3s", "timeout": "1s", "failures_to_down": 1})
        config["databases"]["gone"] = {"dsn": f"postgresql://nobody@127.0.0.1:{port}/gone", "optional": True}
        config["tables"] = {**config["tables"], "gone_things": "gone"}
        fleet = Fleet(config, tmp_path, workers=WORKERS).start()
        try:
            fleet.wait_logged("database gone is down")
            time.sleep(1.0)  # several more rounds
            log = fleet.log()
            leader = [line for line in log.splitlines() if "pgfleet.health[worker 0]" in line]
            follower = [line for line in log.splitlines() if "pgfleet.health[worker 1]" in line]
            assert any("WARNING" in line and "database gone is down" in line for line in leader)
            assert not [line for line in follower if "WARNING" in line or " INFO " in line]
            for worker in (0, 1):  # the circuit is open in both: refused at once with 08006
                with client_on(fleet, worker) as conn:
                    with pytest.raises(psycopg.OperationalError) as caught:
                        conn.execute("SELECT * FROM gone_things")
                    assert caught.value.sqlstate == "08006"
                    assert "database gone is unavailable" in str(caught.value)
        finally:
            assert fleet.stop() == 0


def test_twophase_recovery_runs_in_the_leader_only(pg: Cluster, tmp_path: Path) -> None:
    """A transaction a dead pgfleet left prepared is rolled back once, by worker 0."""
    gid = "pgfleet_0badcafe_7_0"
    with psycopg.connect(pg.dsn("secondary", user="pf_trust"), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT txid_current()")
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
    # pf_trust, as tests/integration/test_twophase.py: it owns the pgfleet schema of the commit log.
    fleet = Fleet(fleet_config(pg, two_phase_commit=True, tables={},
                               databases={"primary": {"dsn": pg.dsn("bank", user="pf_trust")},
                                          "secondary": {"dsn": pg.dsn("secondary", user="pf_trust")}}),
                  tmp_path, workers=WORKERS)
    try:
        fleet.start()
        with psycopg.connect(pg.dsn("secondary"), autocommit=True) as conn:
            assert wait_until(lambda: not conn.execute(
                "SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchall(), 10)
        lines = [line for line in fleet.log().splitlines() if f"ROLLBACK PREPARED {gid}" in line]
        assert len(lines) == 1 and "[worker 0]" in lines[0], lines
    finally:
        with psycopg.connect(pg.dsn("secondary"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchall():
                conn.execute(f"ROLLBACK PREPARED '{gid}'")
        assert fleet.stop() == 0


def test_a_killed_worker_is_replaced_and_only_its_clients_notice(pg: Cluster, tmp_path: Path) -> None:
    fleet = Fleet(fleet_config(pg), tmp_path, workers=WORKERS).start()
    try:
        victim, survivor = client_on(fleet, 1), client_on(fleet, 0)
        old = workers(fleet)[1]["pid"]
        os.kill(old, signal.SIGKILL)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert survivor.execute("SELECT 2").fetchone() == (2,)  # the other worker's client goes on
        fleet.wait_logged(f"worker 1 (pid {old}) ended with signal 9")
        assert wait_until(lambda: workers(fleet).get(1, {}).get("pid") not in (None, old), 15)
        with client_on(fleet, 1) as conn:  # the new worker 1 serves
            assert conn.execute("SELECT 3").fetchone() == (3,)
        survivor.close()
        victim.close()
    finally:
        assert fleet.stop() == 0


def test_reload_and_sighup_reach_every_worker(pg: Cluster, tmp_path: Path) -> None:
    fleet = Fleet(fleet_config(pg), tmp_path, workers=WORKERS).start()
    try:
        def pool_size() -> int:
            return {r["name"]: r for r in columns(fleet, "SHOW DATABASES")}["primary"]["pool_size"]
        assert pool_size() == 10
        config = yaml.safe_load(fleet.config_path.read_text())
        config["pool"]["size"] = 6
        fleet.config_path.write_text(yaml.safe_dump(config))
        assert console(fleet, "RELOAD") == "RELOAD"
        assert pool_size() == 6  # 3 + 3: both workers took it (one alone would make 5 + 3)
        config["pool"]["size"] = 4
        fleet.config_path.write_text(yaml.safe_dump(config))
        assert fleet.proc is not None
        fleet.proc.send_signal(signal.SIGHUP)  # the supervisor passes it on
        assert wait_until(lambda: pool_size() == 4, 10)
    finally:
        assert fleet.stop() == 0


def test_a_port_in_use_stops_the_group_with_one_line(pg: Cluster, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = fleet_config(pg)
        config["listen"]["port"] = port
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(tmp_path / "c.yaml"),
                               "--workers", "2"], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_dead_supervisor_takes_its_workers_with_it(pg: Cluster, tmp_path: Path) -> None:
    fleet = Fleet(fleet_config(pg), tmp_path, workers=WORKERS).start()
    pids = [row["pid"] for row in workers(fleet).values()]
    assert fleet.proc is not None
    fleet.proc.kill()
    fleet.proc.wait()

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True
    assert wait_until(gone, 15), fleet.log()[-2000:]
    assert "the supervisor process is gone" in fleet.log()


def test_a_restarted_worker_runs_what_the_group_runs(pg: Cluster, tmp_path: Path) -> None:
    """Paused stays paused, and an edit of the file nobody reloaded is not taken by the worker
    that starts again (it runs the config the others run)."""
    fleet = Fleet(fleet_config(pg), tmp_path, workers=WORKERS).start()
    try:
        assert console(fleet, "PAUSE analytics") == "PAUSE"
        config = yaml.safe_load(fleet.config_path.read_text())
        config["pool"]["size"] = 4  # edited, not reloaded
        fleet.config_path.write_text(yaml.safe_dump(config))
        old = workers(fleet)[1]["pid"]
        os.kill(old, signal.SIGKILL)
        fleet.wait_logged("worker 1: paused like the rest of the group: analytics")
        assert wait_until(lambda: workers(fleet).get(1, {}).get("pid") not in (None, old), 15)
        pools = {r["name"]: r for r in columns(fleet, "SHOW DATABASES")}
        assert pools["primary"]["pool_size"] == 10  # 5 + 5: the new worker 1 did not take the edit
        assert pools["analytics"]["paused"] is True
        assert console(fleet, "RESUME analytics") == "RESUME"
        assert not any(r["paused"] for r in columns(fleet, "SHOW DATABASES"))
        with client_on(fleet, 1) as conn:  # resumed on the new worker too
            assert conn.execute("SELECT count(*) >= 0 FROM events").fetchone() == (True,)
        assert console(fleet, "RELOAD") == "RELOAD"  # now the edit is taken, by both
        assert {r["name"]: r for r in columns(fleet, "SHOW DATABASES")}["primary"]["pool_size"] == 4
    finally:
        assert fleet.stop() == 0


def test_limits_smaller_than_the_workers_are_refused_at_start(pg: Cluster, tmp_path: Path) -> None:
    config = fleet_config(pg)
    config["databases"]["primary"]["pool_size"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(tmp_path / "c.yaml"),
                           "--workers", "3"], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2
    assert "databases.primary.pool_size 2" in done.stderr and "run fewer workers" in done.stderr
    assert "Traceback" not in done.stderr


def test_session_mode_pids_name_their_worker_and_cancel(pg: Cluster, tmp_path: Path) -> None:
    fleet = Fleet(fleet_config(pg, pool={"mode": "session", "size": 10}), tmp_path, workers=WORKERS).start()
    try:
        for worker in (0, 1):
            with client_on(fleet, worker) as conn:  # (client_on reads the worker from the pid)
                timer = threading.Timer(0.3, conn.cancel)
                timer.start()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("SELECT pg_sleep(20)")
                timer.join()
                with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as admin:
                    assert admin.execute(f"KILL {conn.info.backend_pid}").statusmessage == "KILL"
                with pytest.raises(psycopg.OperationalError):
                    conn.execute("SELECT 1")
    finally:
        assert fleet.stop() == 0
