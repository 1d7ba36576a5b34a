"""Replication jobs between two real clusters: the source on the session cluster, the targets on
a second one. Every test compares the data of source and target, never pgfleet's own counters
alone.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster, free_port
from proxy.replication.watermark import HELD_BACK, SAFETY_LAG

from .conftest import KEYS, Fleet, wait_until

_names = itertools.count(1)

ACCOUNTS = """
CREATE TABLE accounts (
    id int PRIMARY KEY,
    name text NOT NULL,
    balance numeric(12,2),
    updated_at timestamptz NOT NULL DEFAULT now()
)"""


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The targets' cluster."""
    cluster = Cluster("replication-targets", tmp_path_factory.mktemp("repl") / "data").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def dbs(pg: Cluster, other: Cluster) -> dict[str, tuple[Cluster, str]]:
    """A fresh source database (session cluster) and two fresh targets (the other cluster)."""
    n = next(_names)
    out = {"src": (pg, f"repl_src_{n}"), "a": (other, f"repl_a_{n}"), "b": (other, f"repl_b_{n}")}
    for cluster, name in out.values():
        cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cluster.create_database(name)
    return out


def config(dbs: dict[str, tuple[Cluster, str]], jobs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port(), "database": "app"},
        "pool": {"size": 4, "acquire_timeout": "3s"},
        "databases": {name: {"dsn": cluster.dsn(db)} for name, (cluster, db) in dbs.items()},
        "default_database": "src",
        "shutdown_timeout": "3s",
        "keys": [{"id": key, "secret": secret, "role": role} for key, (secret, role) in KEYS.items()
                 if role != "database"],
        "replication": {"jobs": jobs},
        **extra,
    }


def job(**fields: Any) -> dict[str, Any]:
    return {"id": "accounts", "source": "src", "targets": ["a", "b"], "tables": ["accounts"],
            "sync_key": "updated_at", "interval": "1h", "enabled": False, **fields}


def sql(dbs: dict[str, tuple[Cluster, str]], name: str, text: str, *params: Any) -> list[tuple[Any, ...]]:
    cluster, db = dbs[name]
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        cur = conn.execute(text, params or None)
        return cur.fetchall() if cur.description else []


def data(dbs: dict[str, tuple[Cluster, str]], name: str, table: str = "accounts") -> list[tuple[Any, ...]]:
    return sql(dbs, name, f"SELECT * FROM {table} ORDER BY 1")


def console(fleet: Fleet, text: str) -> list[dict[str, Any]]:
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as conn:
        cur = conn.execute(text)
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def start(dbs: dict[str, tuple[Cluster, str]], tmp_path: Path, jobs: list[dict[str, Any]], **extra: Any) -> Fleet:
    path = tmp_path / f"fleet{next(_names)}"
    path.mkdir()
    return Fleet(config(dbs, jobs, **extra), path).start()


def test_first_copy_creates_the_table_then_updates_arrive_and_verify_finds_a_changed_row(
        dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "INSERT INTO accounts SELECT g, 'n' || g, g * 1.5, now() - interval '1 hour' + g * interval '1 ms' "
                    "FROM generate_series(1, 1000) g")
    fleet = start(dbs, tmp_path, [job()])
    try:
        rows = console(fleet, "RUN JOB accounts")
        assert sorted((r["target"], r["rows"], r["status"]) for r in rows) == [("a", 1000, "ok"), ("b", 1000, "ok")]
        for target in ("a", "b"):
            assert data(dbs, target) == data(dbs, "src")
            assert sql(dbs, target, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'accounts'::regclass "
                                    "AND i.indisprimary") == [("id",)]
            assert sql(dbs, target, "SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = 'accounts'::regclass "
                                    "AND attnum > 0 ORDER BY attnum") == \
                [("id", True), ("name", True), ("balance", False), ("updated_at", True)]
        sql(dbs, "src", "UPDATE accounts SET balance = balance + 1, updated_at = now() WHERE id <= 10")
        time.sleep(SAFETY_LAG + 0.2)  # the horizon is held this far back
        rows = console(fleet, "RUN JOB accounts")
        assert sorted((r["target"], r["rows"]) for r in rows) == [("a", 10), ("b", 10)]
        assert data(dbs, "a") == data(dbs, "b") == data(dbs, "src")
        checks = console(fleet, "VERIFY JOB accounts")
        assert checks and all(c["status"] == "ok" for c in checks)
        assert {c["target"] for c in checks} == {"a", "b"}
        sql(dbs, "a", "UPDATE accounts SET name = 'changed behind pgfleet' WHERE id = 500")
        differs = [c for c in console(fleet, "VERIFY JOB accounts") if c["status"] == "differs"]
        assert len(differs) == 1 and differs[0]["target"] == "a"
        low, high = differs[0]["range_from"], differs[0]["range_to"]
        assert (low is None or int(low) <= 500) and (high is None or 500 < int(high))
        jobs = console(fleet, "SHOW JOBS")
        assert jobs[0]["id"] == "accounts" and jobs[0]["last_status"] == "ok" and jobs[0]["rows_copied"] == 20
    finally:
        fleet.stop()


def test_a_row_committed_late_with_an_older_sync_key_arrives_with_the_next_run(
        dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    fleet = start(dbs, tmp_path, [job(targets=["a"])])
    cluster, db = dbs["src"]
    try:
        with psycopg.connect(cluster.dsn(db)) as late:  # a transaction: its now() is its start
            late.execute("INSERT INTO accounts (id, name) VALUES (1, 'committed late')")
            time.sleep(0.05)
            sql(dbs, "src", "INSERT INTO accounts (id, name) VALUES (2, 'committed first')")  # a newer updated_at
            rows = console(fleet, "RUN JOB accounts")
            assert data(dbs, "a") == []  # row 2 is past the horizon (row 1's transaction start): next run
            # Once that transaction has been open a while, rows past it are copied anyway, but
            # the watermark stays below it.
            time.sleep(HELD_BACK + 0.5)
            rows = console(fleet, "RUN JOB accounts")
            assert [r[0] for r in data(dbs, "a")] == [2]
            assert rows[0]["held_at_horizon"] is True
            late.commit()
        rows = console(fleet, "RUN JOB accounts")
        assert data(dbs, "a") == data(dbs, "src")  # row 1 came, though its updated_at is older than row 2's
        assert rows[0]["rows"] == 2  # both read again: the watermark had not passed row 1's transaction
    finally:
        fleet.stop()


def test_rows_tied_on_the_sync_key_across_batches_arrive_exactly_once(
        dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "INSERT INTO accounts SELECT g, 'tie', 0, timestamptz '2026-01-01 00:00:00+00' "
                    "FROM generate_series(1, 5000) g")
    fleet = start(dbs, tmp_path, [job(targets=["a"], batch_size=1000, verify=True)])
    try:
        rows = console(fleet, "RUN JOB accounts")
        assert rows[0]["rows"] == 5000
        assert data(dbs, "a") == data(dbs, "src")
        assert console(fleet, "SHOW JOBS")[0]["last_status"] == "ok"  # verify: true found them equal
        assert console(fleet, "RUN JOB accounts")[0]["rows"] == 0  # the watermark is (sync key, id): nothing again
        sql(dbs, "src", "INSERT INTO accounts VALUES (5001, 'tie too', 0, timestamptz '2026-01-01 00:00:00+00')")
        assert console(fleet, "RUN JOB accounts")[0]["rows"] == 1  # the same sync key, a later id: found
        assert data(dbs, "a") == data(dbs, "src")
    finally:
        fleet.stop()


def checksum(dbs: dict[str, tuple[Cluster, str]], name: str) -> tuple[Any, ...]:
    return sql(dbs, name, "SELECT count(*), sum(hashtext(a::text)::bigint) FROM accounts a")[0]


def test_sigkill_in_the_middle_of_a_run_loses_and_duplicates_nothing(
        dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "INSERT INTO accounts SELECT g, 'row ' || g, g, now() - interval '1 day' + g * interval '1 ms' "
                    "FROM generate_series(1, 300000) g")
    fleet = start(dbs, tmp_path, [job(targets=["a"], batch_size=5000)])
    try:
        console(fleet, "RUN JOB accounts NOWAIT")

        def copied() -> int:
            try:
                return int(sql(dbs, "a", "SELECT count(*) FROM accounts")[0][0])
            except psycopg.errors.UndefinedTable:
                return 0
        assert wait_until(lambda: copied() >= 20000, 30, 0.005)
        assert fleet.proc is not None
        fleet.proc.kill()
        fleet.proc.wait()
        assert 0 < copied() < 300000  # killed in the middle
        fleet.start()
        console(fleet, "RUN JOB accounts")
        assert checksum(dbs, "a") == checksum(dbs, "src")
        assert sql(dbs, "a", "SELECT count(*) FROM pgfleet.replication_state") == [(1,)]
        assert [r["last_status"] for r in console(fleet, "SHOW JOBS")] == ["ok"]
    finally:
        fleet.stop()


def test_the_scheduler_copies_a_new_row_without_being_asked(dbs: dict[str, tuple[Cluster, str]],
                                                            tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    fleet = start(dbs, tmp_path, [job(targets=["a"], enabled=True, interval="1s")],
                  http={"host": "127.0.0.1", "port": free_port()})
    try:
        sql(dbs, "src", "INSERT INTO accounts (id, name) VALUES (7, 'scheduled')")

        def arrived() -> bool:
            try:
                return data(dbs, "a") == data(dbs, "src")
            except psycopg.errors.UndefinedTable:
                return False
        assert wait_until(arrived, 20, 0.1), fleet.log()[-2000:]
        # /metrics has every replication metric the Grafana dashboard asks for.
        port = fleet.config["http"]["port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
        wanted = {name for panel in dashboard["panels"] for target in panel["targets"]
                  for name in re.findall(r"pgfleet_replication_[a-z_]+", target["expr"])}
        assert len(wanted) >= 5
        for name in wanted - {"pgfleet_replication_verified"}:  # (verified: once a job verified)
            assert f'{name}{{job="accounts"}}' in text, name
        assert 'pgfleet_replication_last_run_rows{job="accounts"}' in text
    finally:
        fleet.stop()


def test_two_pgfleet_processes_never_run_one_job_at_once(dbs: dict[str, tuple[Cluster, str]],
                                                         tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "INSERT INTO accounts SELECT g, 'n', g, now() - interval '1 hour' FROM generate_series(1, 50000) g")
    jobs = [job(targets=["a"], enabled=True, interval="1s", batch_size=5000)]
    first, second = start(dbs, tmp_path, jobs), start(dbs, tmp_path, jobs)
    try:
        def runs() -> list[tuple[Any, ...]]:
            try:
                return sql(dbs, "src", "SELECT started, finished FROM pgfleet.replication_runs "
                                       "WHERE job = 'accounts' AND status = 'ok' ORDER BY started")
            except psycopg.errors.UndefinedTable:  # (no run yet)
                return []
        assert wait_until(lambda: len(runs()) >= 3, 30, 0.2)
        done = runs()
        for (_, finished), (started, _) in itertools.pairwise(done):
            assert finished <= started, done  # one after the other, never side by side
        assert data(dbs, "a") == data(dbs, "src")
    finally:
        first.stop()
        second.stop()


def test_logical_mode_carries_inserts_updates_and_deletes_and_is_taken_down(
        dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "INSERT INTO accounts (id, name) SELECT g, 'n' || g FROM generate_series(1, 100) g")
    fleet = start(dbs, tmp_path, [job(id="live", mode="logical", targets=["a"], enabled=True)])
    try:
        def same() -> bool:
            try:
                return data(dbs, "a") == data(dbs, "src")
            except psycopg.errors.UndefinedTable:
                return False
        assert wait_until(same, 30, 0.2)  # the initial copy
        sql(dbs, "src", "INSERT INTO accounts (id, name) VALUES (101, 'new')")
        sql(dbs, "src", "UPDATE accounts SET name = 'updated' WHERE id = 5")
        sql(dbs, "src", "DELETE FROM accounts WHERE id = 6")
        assert wait_until(same, 30, 0.2)
        assert 6 not in [r[0] for r in data(dbs, "a")]
        assert wait_until(lambda: console(fleet, "SHOW JOBS")[0]["last_status"] == "streaming", 20, 0.2)
        # The config loses the job: RELOAD takes its subscription and publication down.
        fleet.config["replication"]["jobs"] = []
        fleet.config_path.write_text(__import__("yaml").safe_dump(fleet.config))
        console(fleet, "RELOAD")
        assert sql(dbs, "a", "SELECT count(*) FROM pg_subscription") == [(0,)]
        assert sql(dbs, "src", "SELECT count(*) FROM pg_publication") == [(0,)]
    finally:
        fleet.stop()


def http(fleet: Fleet, method: str, path: str, body: Any = None, key: str = "pf_admin",
         secret: str | None = None) -> tuple[int, Any]:
    port = fleet.config["http"]["port"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"X-API-Key": key, "X-API-Secret": secret or KEYS[key][0],
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_seeds_http_endpoints(dbs: dict[str, tuple[Cluster, str]], tmp_path: Path, other: Cluster) -> None:
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "CREATE TABLE transactions (id bigint PRIMARY KEY, amount int, created_at timestamptz DEFAULT now())")
    sql(dbs, "src", "INSERT INTO accounts (id, name) VALUES (1, 'one'), (2, 'two')")
    sql(dbs, "src", "INSERT INTO transactions (id, amount) VALUES (1, 10), (2, 20), (3, 30)")
    time.sleep(SAFETY_LAG + 0.2)  # the horizon is held this far back
    fleet = start(dbs, tmp_path, [], http={"host": "127.0.0.1", "port": free_port()})
    try:
        assert http(fleet, "GET", "/api/database/replication/jobs", secret="wrong")[0] == 401
        assert http(fleet, "GET", "/api/database/replication/jobs", key="nobody", secret="x")[0] == 401
        assert http(fleet, "GET", "/api/database/replication/jobs", key="pf_server")[0] == 403
        status, made = http(fleet, "POST", "/api/database/replication/jobs", {
            "id": "nightly", "sourceDatabase": "src", "targetDatabases": ["a", "b"], "tables": ["accounts"],
            "syncKey": "updated_at", "intervalMinutes": 15, "enabled": False})
        assert status == 201 and made["targetDatabases"] == ["a", "b"]
        assert http(fleet, "POST", "/api/database/replication/jobs", {"id": "nightly", "sourceDatabase": "src",
                                                                      "targetDatabases": ["a"],
                                                                      "tables": ["accounts"]})[0] == 409
        assert http(fleet, "POST", "/api/database/replication/jobs", {"sourceDatabase": "src"})[0] == 400
        status, listed = http(fleet, "GET", "/api/database/replication/jobs")
        assert status == 200 and [j["id"] for j in listed["jobs"]] == ["nightly"]
        status, run = http(fleet, "POST", "/api/database/replication/jobs/nightly/run")
        assert status == 200 and run["status"] == "ok" and run["rows"] == 4
        assert data(dbs, "a") == data(dbs, "b") == data(dbs, "src")
        assert http(fleet, "POST", "/api/database/replication/jobs/nope/run")[0] == 404
        status, run = http(fleet, "POST", "/api/database/replication/table", {
            "sourceDatabase": "src", "targetDatabases": ["b"], "table": "transactions", "syncKey": "created_at"})
        assert status == 200 and run["rows"] == 3
        assert data(dbs, "b", "transactions") == data(dbs, "src", "transactions")
        # The stored job survives a restart, and the console can disable it.
        fleet.stop()
        fleet.start()
        assert [j["id"] for j in console(fleet, "SHOW JOBS")] == ["nightly"]
        console(fleet, "ENABLE JOB nightly")
        assert console(fleet, "SHOW JOBS")[0]["enabled"] is True
        with pytest.raises(psycopg.errors.UndefinedObject):
            console(fleet, "ENABLE JOB missing")
    finally:
        fleet.stop()


def test_a_logical_job_on_a_source_without_wal_level_logical_is_refused_by_name(
        tmp_path: Path, dbs: dict[str, tuple[Cluster, str]]) -> None:
    plain = Cluster("replication-plain", tmp_path / "plain", settings={"wal_level": "replica"}).start()
    try:
        plain.create_database("plainsrc")
        plain.psql("CREATE TABLE t (id int PRIMARY KEY)", dbname="plainsrc")
        conf = config(dbs, [], http={"host": "127.0.0.1", "port": free_port()})
        conf["databases"]["plain"] = {"dsn": plain.dsn("plainsrc")}
        path = tmp_path / "f"
        path.mkdir()
        fleet = Fleet(conf, path).start()
        try:
            status, answer = http(fleet, "POST", "/api/database/replication/jobs", {
                "id": "live", "mode": "logical", "sourceDatabase": "plain", "targetDatabases": ["a"],
                "tables": ["t"]})
            assert status == 400 and "wal_level=logical" in answer["error"] and "plain" in answer["error"]
            assert http(fleet, "GET", "/api/database/replication/jobs")[1]["jobs"] == []
        finally:
            fleet.stop()
    finally:
        plain.stop()


def test_console_errors_say_what_to_do(dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", "CREATE TABLE nopk (a int, updated_at timestamptz)")
    fleet = start(dbs, tmp_path, [job(tables=["nopk"], targets=["a"])])
    try:
        rows = console(fleet, "RUN JOB accounts")
        assert rows[0]["status"].startswith("table nopk has no primary key")
        with pytest.raises(psycopg.errors.UndefinedObject):
            console(fleet, "RUN JOB nosuch")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
            console(fleet, "DISABLE JOB accounts")
        assert "config" in str(caught.value)
        with pytest.raises(psycopg.errors.SyntaxError):
            console(fleet, "REPLICATE TABLE accounts FROM src")
        assert "Traceback" not in fleet.log()
    finally:
        fleet.stop()




def test_a_target_that_is_down_fails_alone_and_is_tried_again(dbs: dict[str, tuple[Cluster, str]],
                                                              tmp_path: Path) -> None:
    from .conftest import closed_port
    sql(dbs, "src", ACCOUNTS)
    sql(dbs, "src", "INSERT INTO accounts (id, name) VALUES (1, 'one')")
    with closed_port() as port:
        conf = config(dbs, [job(targets=["down", "a"], enabled=True, interval="1h")])
        conf["databases"]["down"] = {"dsn": f"postgresql://postgres@127.0.0.1:{port}/nowhere", "optional": True}
        path = tmp_path / "down"
        path.mkdir()
        fleet = Fleet(conf, path).start()
        try:
            def copied() -> bool:
                try:
                    return data(dbs, "a") == data(dbs, "src")
                except psycopg.errors.UndefinedTable:
                    return False
            assert wait_until(copied, 20, 0.1)  # the scheduled run: the other target went on
            jobs = console(fleet, "SHOW JOBS")
            assert jobs[0]["last_status"] == "partial" and "down" in jobs[0]["last_error"]
            fleet.wait_logged("tried again in 5s")
            sql(dbs, "src", "INSERT INTO accounts (id, name) VALUES (2, 'two')")
            assert wait_until(copied, 20, 0.1)  # tried again after the backoff, not an hour later
        finally:
            fleet.stop()


def test_a_number_sync_key_and_a_standby_source_are_refused_by_name(
        dbs: dict[str, tuple[Cluster, str]], tmp_path: Path) -> None:
    sql(dbs, "src", "CREATE TABLE versions (id int PRIMARY KEY, version bigint NOT NULL)")
    sql(dbs, "src", "CREATE TABLE stamped (id int PRIMARY KEY, at timestamp(3) without time zone NOT NULL)")
    sql(dbs, "src", "INSERT INTO stamped VALUES (1, '2026-01-01 00:00:00')")
    fleet = start(dbs, tmp_path, [job(id="v", tables=["versions"], targets=["a"], sync_key="version"),
                                  job(id="s", tables=["stamped"], targets=["a"], sync_key="at")])
    try:
        rows = console(fleet, "RUN JOB v")
        assert "is a bigint" in rows[0]["status"] and "timestamp" in rows[0]["status"]
        rows = console(fleet, "RUN JOB s")  # timestamp(3): a time, by its base type
        assert rows[0]["status"] == "ok" and data(dbs, "a", "stamped") == data(dbs, "src", "stamped")
    finally:
        fleet.stop()
