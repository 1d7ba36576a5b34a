"""HTTP: /metrics parsed with prometheus-client's own parser after a known workload, and the
health and info views, from a running pgfleet on real clusters."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.embedded import Cluster, free_port

from .conftest import Fleet, fleet_config


@pytest.fixture(scope="module")
def http_fleet(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("http")
    config = fleet_config(pg, http={"host": "127.0.0.1", "port": free_port()},
                         health={"interval": "0.2s", "timeout": "1s", "failures_to_down": 2},
                         audit={"path": str(workdir / "audit.jsonl")})
    fleet = Fleet(config, workdir).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def get(fleet: Fleet, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{fleet.config['http']['port']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(fleet: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(fleet, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_known_workload(http_fleet: Fleet) -> None:
    # prepare_threshold=None: psycopg would prepare the statement on its 5th run (one more
    # round trip, which the counters would rightly count).
    with psycopg.connect(http_fleet.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("select count(*) from events")  # the backend is attached and set up
        before = samples(http_fleet)
        for _ in range(7):
            conn.execute("select count(*) from events")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("select nonsense from events")
        after = samples(http_fleet)
    db = {"database": "analytics"}
    assert value(after, "pgfleet_queries_total", **db) - value(before, "pgfleet_queries_total", **db) == 8
    assert value(after, "pgfleet_transactions_total", **db) - value(before, "pgfleet_transactions_total", **db) == 8
    assert value(after, "pgfleet_errors_total", database="analytics", **{"class": "42"}) - \
        value(before, "pgfleet_errors_total", database="analytics", **{"class": "42"}) == 1
    assert value(after, "pgfleet_received_bytes_total", **db) > value(before, "pgfleet_received_bytes_total", **db)
    assert value(after, "pgfleet_sent_bytes_total", **db) > value(before, "pgfleet_sent_bytes_total", **db)
    # Each of the 7 repeated statements is one plan-cache hit (not one per lookup of its text).
    assert value(after, "pgfleet_plan_cache_total", result="hit") == value(before, "pgfleet_plan_cache_total",
                                                                            result="hit") + 7
    assert value(after, "pgfleet_clients") >= 1
    assert value(after, "pgfleet_servers", database="analytics", state="parked") + \
        value(after, "pgfleet_servers", database="analytics", state="active") >= 1


def test_metrics_show_health_and_route_kinds(http_fleet: Fleet) -> None:
    with psycopg.connect(http_fleet.dsn(), autocommit=True) as conn:
        before = samples(http_fleet)
        conn.execute("select count(*) from (select 1) x")  # one database: not a route kind
        after = samples(http_fleet)
    assert value(after, "pgfleet_routes_total", kind="fanout") == value(before, "pgfleet_routes_total", kind="fanout")
    deadline = time.monotonic() + 10
    while value(samples(http_fleet), "pgfleet_database_up", database="secondary") != 2:
        assert time.monotonic() < deadline, "the health checker never marked secondary healthy"
        time.sleep(0.1)
    assert value(samples(http_fleet), "pgfleet_circuit_open", database="secondary") == 0


def test_health_views(http_fleet: Fleet) -> None:
    assert get(http_fleet, "/health/live")[0] == 200
    deadline = time.monotonic() + 10
    while get(http_fleet, "/health/ready")[0] != 200:
        assert time.monotonic() < deadline, get(http_fleet, "/health/ready")
        time.sleep(0.1)
    # A check answered in over half of health.timeout (1 s) says "degraded", rightly: on a
    # loaded machine one may; the next ones (every 0.2 s) say "healthy" again.
    deadline = time.monotonic() + 10
    while True:
        status, body = get(http_fleet, "/databases")
        info: dict[str, Any] = json.loads(body)
        overall, summary = get(http_fleet, "/health")
        if info["primary"]["status"] == "healthy" and json.loads(summary)["status"] == "healthy":
            break
        assert time.monotonic() < deadline, (info, summary)
        time.sleep(0.1)
    assert status == 200 and set(info) == {"primary", "secondary", "analytics"}
    assert info["primary"]["database_name"] == "bank" and info["primary"]["status"] == "healthy"
    assert info["primary"]["last_check"] is not None and info["primary"]["response_ms"] >= 0
    assert info["analytics"]["connections"]["size"] == 10
    assert overall == 200 and json.loads(summary)["status"] == "healthy"
    assert get(http_fleet, "/nope")[0] == 404


def test_the_wait_histogram_sees_a_client_that_waited(make_fleet: Any, pg: Cluster) -> None:
    import threading
    port = free_port()
    fleet: Fleet = make_fleet(http={"host": "127.0.0.1", "port": port},
                              databases={"analytics": {"dsn": pg.dsn("analytics", user="pf_trust"), "pool_size": 1}})
    holder = psycopg.connect(fleet.dsn())
    holder.execute("select count(*) from events")  # the only analytics connection, in a transaction
    waited: list[float] = []

    def waiter() -> None:
        with psycopg.connect(fleet.dsn(), autocommit=True) as other:
            started = time.monotonic()
            other.execute("select count(*) from events")
            waited.append(time.monotonic() - started)
    thread = threading.Thread(target=waiter)
    thread.start()
    # The waiter is queued for the pool's only connection (pgfleet says so), then waits 0.3 s more.
    deadline = time.monotonic() + 10
    while value(samples(fleet), "pgfleet_clients_waiting", database="analytics") < 1:
        assert time.monotonic() < deadline, "the second client never waited for a connection"
        time.sleep(0.02)
    time.sleep(0.3)
    holder.commit()
    thread.join(10)
    holder.close()
    found = samples(fleet)
    count = value(found, "pgfleet_pool_wait_seconds_count", database="analytics")
    total = value(found, "pgfleet_pool_wait_seconds_sum", database="analytics")
    assert count >= 1 and total >= 0.25 and waited and waited[0] >= 0.25
    assert value(found, "pgfleet_pool_wait_seconds_bucket", database="analytics", le="0.1") < count
    assert value(found, "pgfleet_pool_wait_seconds_bucket", database="analytics", le="+Inf") == count


def test_the_grafana_dashboard_asks_only_for_metrics_pgfleet_exports(http_fleet: Fleet) -> None:
    import re
    from pathlib import Path
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    wanted = {name for panel in dashboard["panels"] for target in panel["targets"]
              for name in re.findall(r"pgfleet_[a-z_]+", target["expr"])
              if not name.startswith("pgfleet_replication_")}  # (test_replication.py: they need a job)
    exported = {name for name, _ in samples(http_fleet)}
    assert wanted and wanted <= exported, wanted - exported


def test_ready_waits_for_every_database_that_is_not_optional(refusing_port: int, make_fleet: Any,
                                                           pg: Cluster) -> None:
    closed = refusing_port  # nothing listens there (nor can, while the test runs): that database is down
    base = {"primary": {"dsn": pg.dsn("bank", user="pf_trust")},
            "secondary": {"dsn": f"postgresql://pf_trust@127.0.0.1:{closed}/secondary"}}
    health = {"interval": "0.2s", "timeout": "0.5s", "failures_to_down": 1}
    strict: Fleet = make_fleet(http={"host": "127.0.0.1", "port": free_port()}, health=health, databases=base)
    deadline = time.monotonic() + 10
    while (status := get(strict, "/health/ready"))[0] != 503:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert json.loads(status[1])["unavailable"] == ["secondary"]
    assert json.loads(get(strict, "/databases")[1])["secondary"]["circuit"] == "open"
    lenient: Fleet = make_fleet(http={"host": "127.0.0.1", "port": free_port()}, health=health,
                                databases={**base, "secondary": {**base["secondary"], "optional": True}})
    deadline = time.monotonic() + 10  # a check round or so: secondary is down then
    while json.loads(get(lenient, "/databases")[1])["secondary"]["status"] != "down":
        assert time.monotonic() < deadline, get(lenient, "/databases")
        time.sleep(0.1)
    assert get(lenient, "/health/ready")[0] == 200
