"""SQL over HTTP (api/): the seeds' /api/database endpoints and Neon's /sql, through aiohttp's
client against a running pgfleet on the real cluster. Each answer is checked against the same
statement over the wire (psycopg)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest

from proxy.embedded import Cluster, free_port

from .conftest import KEYS, Fleet, fleet_config, rows_on, sharded_on, wait_until


@pytest.fixture(scope="module")
def api(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("sqlhttp")
    config = fleet_config(pg, http={"host": "127.0.0.1", "port": free_port(), "max_requests_per_key": 1000,
                                    "statement_timeout": "2s", "max_response": 200_000},
                          audit={"path": str(workdir / "audit.jsonl"), "statements": "full"})
    fleet = Fleet(config, workdir).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def url(fleet: Fleet, path: str) -> str:
    return f"http://127.0.0.1:{fleet.config['http']['port']}{path}"


def auth(key: str = "pf_server", secret: str | None = None) -> dict[str, str]:
    return {"X-API-Key": key, "X-API-Secret": KEYS[key][0] if secret is None else secret}


async def post(fleet: Fleet, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client, \
            client.post(url(fleet, path), json=body, headers=headers if headers is not None else auth()) as answer:
        return answer.status, await answer.json()


def wire(fleet: Fleet, sql: str, params: tuple[Any, ...] = (), key: str = "pf_server") -> list[tuple[Any, ...]]:
    with psycopg.connect(fleet.dsn(key), autocommit=True) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


async def test_a_routed_query_answers_rows_typed_as_json_keeps_exactly(api: Fleet) -> None:
    status, body = await post(api, "/api/database/query", {
        "query": "SELECT 1::int4 AS i, 9007199254740993::int8 AS big, 1.10::numeric AS n, 0.5::float8 AS f, "
                 "true AS b, '{\"a\": [1, 2]}'::jsonb AS j, NULL::text AS nothing, 'x'::text AS t"})
    assert status == 200, body
    assert body["rows"] == [{"i": 1, "big": "9007199254740993", "n": "1.10", "f": 0.5, "b": True,
                             "j": {"a": [1, 2]}, "nothing": None, "t": "x"}]
    assert body["rowCount"] == 1 and body["command"] == "SELECT" and body["duration"] >= 0
    assert [f["dataTypeID"] for f in body["fields"]] == [23, 20, 1700, 701, 16, 3802, 25, 25]
    status, body = await post(api, "/api/database/query", {"query": "SELECT 9007199254740993::int8 AS big",
                                                           "bigint": "number"})
    assert body["rows"] == [{"big": 9007199254740993}]


async def test_parameters_are_bound_never_pasted(api: Fleet) -> None:
    evil = "x'); DROP TABLE accounts; --"
    status, body = await post(api, "/api/database/query", {"query": "SELECT $1::text AS v, $2::int AS n",
                                                           "params": [evil, 7]})
    assert status == 200 and body["rows"] == [{"v": evil, "n": 7}]
    assert wire(api, "SELECT to_regclass('accounts') IS NOT NULL") == [(True,)]


async def test_answers_equal_the_wire_protocols(api: Fleet) -> None:
    corpus = ["SELECT id, user_id, currency, balance FROM accounts ORDER BY id LIMIT 5",
              "SELECT count(*)::int4 AS n, sum(balance) AS total FROM accounts",
              "SELECT currency, count(*)::int4 AS n FROM accounts GROUP BY currency ORDER BY currency",
              "SELECT current_database() AS db",
              "SELECT id, email FROM users WHERE id = $1",
              "SELECT e.id FROM events e ORDER BY e.id DESC LIMIT 3"]
    for sql in corpus:
        params = [1] if "$1" in sql else []
        status, body = await post(api, "/api/database/query", {"query": sql, "params": params})
        assert status == 200, (sql, body)
        with psycopg.connect(api.dsn(), autocommit=True) as conn:
            cur = conn.execute(sql.replace("$1", "%s"), tuple(params) or None)
            over_wire = [[str(v) if v is not None else None for v in row] for row in cur.fetchall()]
        over_http = [[str(v) if v is not None else None for v in row.values()] for row in body["rows"]]
        assert over_http == over_wire, sql
        assert body["rowCount"] == len(over_wire)


async def test_one_statement_per_query_and_a_transaction_is_all_or_nothing(api: Fleet) -> None:
    status, body = await post(api, "/api/database/query", {"query": "SELECT 1; SELECT 2"})
    assert status == 400 and body["error"]["code"] == "42601"
    wire(api, "CREATE TABLE IF NOT EXISTS http_tx (id int PRIMARY KEY)")
    wire(api, "DELETE FROM http_tx")
    status, body = await post(api, "/api/database/transaction", {"queries": [
        {"query": "INSERT INTO http_tx VALUES ($1)", "params": [1]},
        {"query": "INSERT INTO http_tx VALUES ($1)", "params": [1]}]})  # a duplicate: all rolled back
    assert status == 400 and body["error"]["code"] == "23505" and "detail" in body["error"]
    assert wire(api, "SELECT count(*) FROM http_tx") == [(0,)]
    status, body = await post(api, "/api/database/transaction", {"queries": [
        {"query": "INSERT INTO http_tx VALUES ($1)", "params": [1]},
        {"query": "INSERT INTO http_tx VALUES ($1) RETURNING id", "params": [2]}]})
    assert status == 200 and body["results"][1]["rows"] == [{"id": 2}]
    assert wire(api, "SELECT id FROM http_tx ORDER BY id") == [(1,), (2,)]


async def test_keys_are_checked_and_a_tenant_gets_only_what_it_gets_over_the_wire(api: Fleet) -> None:
    for headers in ({}, auth(secret="wrong"), {"X-API-Key": "nobody", "X-API-Secret": "x"}):
        status, body = await post(api, "/api/database/query", {"query": "SELECT 1"}, headers)
        assert status == 401 and "API key" in body["error"]
    status, body = await post(api, "/api/database/query", {"query": "SELECT 1 AS one"},
                              {"Authorization": f"Bearer pf_server:{KEYS['pf_server'][0]}"})
    assert status == 200 and body["rows"] == [{"one": 1}]
    refused_over_wire = []
    for sql in ("SELECT pg_read_file('/etc/passwd')", "SELECT * FROM pg_authid", "SET ROLE postgres",
                "CREATE TABLE tenant_made (a int)", "SELECT lo_import('/etc/passwd')"):
        with psycopg.connect(api.dsn("pf_tenant"), autocommit=True) as conn:
            try:
                conn.execute(sql)
            except psycopg.errors.InsufficientPrivilege:
                refused_over_wire.append(sql)
    assert refused_over_wire
    for sql in refused_over_wire:  # each refused over HTTP the same way
        status, body = await post(api, "/api/database/query", {"query": sql}, auth("pf_tenant"))
        assert status == 403 and body["error"]["code"] == "42501", (sql, body)


async def test_neon_sql_protocol(api: Fleet) -> None:
    conn = f"postgresql://pf_server:{KEYS['pf_server'][0]}@127.0.0.1/app"
    headers = {"Neon-Connection-String": conn, "Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"}
    status, body = await post(api, "/sql", {"query": "SELECT $1::int AS n, 'a'::text AS t", "params": ["42"]}, headers)
    assert status == 200, body
    assert body["rows"] == [["42", "a"]] and body["rowAsArray"] is True and body["command"] == "SELECT"
    assert body["rowCount"] == 1
    assert [(f["name"], f["dataTypeID"], f["format"]) for f in body["fields"]] == [("n", 23, "text"),
                                                                                 ("t", 25, "text")]
    assert set(body["fields"][0]) == {"name", "dataTypeID", "tableID", "columnID", "dataTypeSize",
                                      "dataTypeModifier", "format"}
    status, body = await post(api, "/sql", {"queries": [{"query": "SELECT 1 AS a", "params": []},
                                                        {"query": "SELECT 2 AS b", "params": []}]},
                              {**headers, "Neon-Array-Mode": "false", "Neon-Batch-Isolation-Level": "Serializable"})
    assert status == 200 and [r["rows"] for r in body["results"]] == [[{"a": "1"}], [{"b": "2"}]]
    status, body = await post(api, "/sql", {"query": "SELECT 1/0"}, headers)
    assert status == 400 and body["code"] == "22012" and body["message"] == "division by zero"
    bad = {**headers, "Neon-Connection-String": "postgresql://pf_server:wrong@127.0.0.1/app"}
    assert (await post(api, "/sql", {"query": "SELECT 1"}, bad))[0] == 401


async def test_four_hundred_concurrent_requests_each_get_their_own_rows(api: Fleet) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as client:
        async def one(i: int) -> tuple[int, Any]:
            async with client.post(url(api, "/api/database/query"), headers=auth(),
                                   json={"query": "SELECT $1::int AS n, pg_backend_pid() AS pid", "params": [i]}) as r:
                return r.status, await r.json()
        answers = await asyncio.gather(*(one(i) for i in range(400)))
    assert [status for status, _ in answers] == [200] * 400
    assert [body["rows"][0]["n"] for _, body in answers] == list(range(400))


async def test_limits_answer_with_what_to_do(api: Fleet) -> None:
    status, body = await post(api, "/api/database/query", {"query": "SELECT repeat('x', 1000) FROM generate_series(1, 1000)"})
    assert status == 507 and "http.max_response" in body["error"] and "LIMIT" in body["error"]
    status, body = await post(api, "/api/database/query", {"query": "SELECT pg_sleep(10)"})
    assert status == 504 and body["error"]["code"] == "57014"  # http.statement_timeout: 2s
    async with aiohttp.ClientSession() as client:
        big = json.dumps({"query": "SELECT '" + "x" * (2 * 1024 * 1024) + "'"}).encode()
        async with client.post(url(api, "/api/database/query"), data=io.BytesIO(big),
                               headers={**auth(), "Content-Type": "application/json"}) as r:
            assert r.status == 413  # http.max_body, 1 MiB by default


async def test_a_client_that_goes_away_cancels_its_statement(api: Fleet) -> None:
    marker = f"pgfleet-gone-{time.time()}"
    async with aiohttp.ClientSession() as client:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.5):
                await client.post(url(api, "/api/database/query"), headers=auth(),
                                  json={"query": f"SELECT pg_sleep(1.9), '{marker}'"})

    def running() -> bool:
        with psycopg.connect(api.dsn(), autocommit=True) as conn:
            return bool(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> "
                                     "pg_backend_pid()", (f"%{marker}%",)).fetchone()[0])
    assert wait_until(lambda: not running(), 1.2, 0.05)  # gone well before its 1.9 s


async def test_too_many_requests_of_one_key(pg: Cluster, tmp_path: Any) -> None:
    config = fleet_config(pg, http={"host": "127.0.0.1", "port": free_port(), "max_requests_per_key": 2})
    fleet = Fleet(config, tmp_path).start()
    try:
        answers = await asyncio.gather(*(post(fleet, "/api/database/query", {"query": "SELECT pg_sleep(0.5)"})
                                         for _ in range(5)))
        statuses = sorted(status for status, _ in answers)
        assert statuses.count(200) >= 2 and 429 in statuses
        refused = next(body for status, body in answers if status == 429)
        assert "http.max_requests_per_key" in refused["error"]
    finally:
        fleet.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_a_large_result_streams_as_json_lines_in_flat_memory(pg: Cluster, tmp_path: Any) -> None:
    """200,000 rows of 200 bytes (40 MB of values, over http.max_response) as JSON lines, read
    slowly: pgfleet's memory grows by far less than the result (the backend is paced)."""
    config = fleet_config(pg, http={"host": "127.0.0.1", "port": free_port(), "max_response": 200_000,
                                    "statement_timeout": "60s"})
    api = Fleet(config, tmp_path).start()
    try:
        await _stream_large(api)
    finally:
        api.stop()


async def _stream_large(api: Fleet) -> None:
    assert api.proc is not None
    before = rss_kib(api.proc.pid)
    peak = before
    rows = 0
    lines: list[Any] = []
    async with aiohttp.ClientSession() as client, client.post(
            url(api, "/api/database/query"), headers={**auth(), "Accept": "application/x-ndjson"},
            json={"query": "SELECT g AS n, repeat('x', 200) AS pad FROM generate_series(1, 200000) g"}) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/x-ndjson")
        async for line in answer.content:
            record = json.loads(line)
            if "n" in record:
                rows += 1
                assert record["n"] == rows
                if rows % 20000 == 0:
                    peak = max(peak, rss_kib(api.proc.pid))
                    await asyncio.sleep(0.05)  # a slow reader
            else:
                lines.append(record)
    assert rows == 200000, (rows, lines[-1])
    assert lines[0]["fields"][0] == {"name": "n", "dataTypeID": 23}
    assert lines[-1]["command"] == "SELECT" and lines[-1]["rowCount"] == 200000
    assert peak - before < 20 * 1024, (before, peak)  # under 20 MB for a 40 MB result


async def test_a_stream_that_fails_ends_with_the_error(api: Fleet) -> None:
    async with aiohttp.ClientSession() as client, client.post(
            url(api, "/api/database/query"), headers={**auth(), "Accept": "application/x-ndjson"},
            json={"query": "SELECT 1/(g - 3) FROM generate_series(1, 5) g"}) as answer:
        records = [json.loads(line) async for line in answer.content]
    assert records[-1]["error"]["code"] == "22012"


async def test_federated_query_takes_a_list_of_databases_as_the_wires_hint(api: Fleet) -> None:
    """``databases`` is the wire's ``/* pgfleet: databases=... */``: over HTTP the statement gets
    exactly the wire's answer (on this unsharded fleet, the same refusal), and the names cannot
    carry SQL."""
    sql = "SELECT count(*)::int4 AS n FROM accounts"
    with psycopg.connect(api.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as over_wire:
        conn.execute(f"/* pgfleet: databases=primary,secondary */ {sql}")
    status, body = await post(api, "/api/database/federated-query", {"query": sql, "databases": ["primary", "secondary"]})
    assert status == 400
    assert (body["error"]["code"], body["error"]["message"]) == (over_wire.value.sqlstate,
                                                                 over_wire.value.diag.message_primary)
    status, body = await post(api, "/api/database/federated-query",
                              {"query": "SELECT 1", "databases": ["primary */ DROP TABLE x; /*"]})
    assert status == 400 and "database names" in body["error"]


async def test_http_requests_are_counted_and_audited(api: Fleet) -> None:
    await post(api, "/api/database/query", {"query": "SELECT 42 AS audited_over_http"})
    await post(api, "/api/database/query", {"query": "SELECT 1"}, auth(secret="wrong"))
    async with aiohttp.ClientSession() as client, client.get(url(api, "/metrics")) as answer:
        text = await answer.text()
    assert 'pgfleet_http_requests_total{endpoint="/api/database/query",status="200"}' in text
    assert 'pgfleet_http_requests_total{endpoint="/api/database/query",status="401"}' in text
    assert 'pgfleet_http_request_seconds_bucket{endpoint="/api/database/query",le="+Inf"}' in text

    def audited() -> list[dict[str, Any]]:
        path = api.workdir / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if "audited_over_http" in line]
    assert wait_until(lambda: bool(audited()), 10, 0.1)
    entry = audited()[0]
    assert entry["route"] == "http" and entry["key"] == "pf_server" and entry["client"].startswith("http:")


async def test_https_with_a_certificate_of_its_own(pg: Cluster, tmp_path: Any) -> None:
    import ssl

    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "http.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "http.key"))
    port = free_port()
    config = fleet_config(pg, http={"host": "127.0.0.1", "port": port,
                                    "tls": {"cert": str(tmp_path / "http.crt"), "key": str(tmp_path / "http.key")}})
    fleet = Fleet(config, tmp_path).start()
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with aiohttp.ClientSession() as client, client.post(
                f"https://127.0.0.1:{port}/api/database/query", ssl=context, headers=auth(),
                json={"query": "SELECT 1 AS one"}) as answer:
            assert answer.status == 200 and (await answer.json())["rows"] == [{"one": 1}]
    finally:
        fleet.stop()


async def test_a_sharded_fleet_answers_over_http_as_over_the_wire(pg: Cluster, empty_shards: tuple[str, str],
                                                                  make_fleet: Any) -> None:
    """The differential corpus on two shards: fan-outs merged, ORDER BY/LIMIT, aggregates, a
    routed statement; the schema and rows made over HTTP itself."""
    port = free_port()
    fleet: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"orders": "customer"}, two_phase_commit=True),
                              http={"host": "127.0.0.1", "port": port})
    status, body = await post(fleet, "/api/database/query", {
        "query": "CREATE TABLE orders (id int, customer int, amount numeric(10,2), PRIMARY KEY (customer, id))"})
    assert status == 200, body
    status, body = await post(fleet, "/api/database/transaction", {"queries": [
        {"query": "INSERT INTO orders VALUES ($1, $2, $3)", "params": [i, i % 7, f"{i * 1.5:.2f}"]}
        for i in range(1, 41)]})
    assert status == 200, body
    assert {len(rows_on(pg, db, "SELECT * FROM orders")) for db in empty_shards} != {0}  # on both shards
    corpus = [
        ("SELECT id, customer, amount FROM orders ORDER BY amount DESC, id LIMIT 5", []),
        ("SELECT customer, count(*) AS n, sum(amount) AS total FROM orders GROUP BY customer ORDER BY customer", []),
        ("SELECT count(*) AS n, min(amount) AS lo, max(amount) AS hi, avg(amount) AS mean FROM orders", []),
        ("SELECT id, amount FROM orders WHERE customer = $1 ORDER BY id", [3]),
        ("SELECT DISTINCT customer FROM orders ORDER BY customer OFFSET 2 LIMIT 3", []),
    ]
    for sql, params in corpus:
        status, body = await post(fleet, "/api/database/query", {"query": sql, "params": params})
        assert status == 200, (sql, body)
        with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
            over_wire = [[str(v) for v in row] for row in conn.execute(sql.replace("$1", "%s"), params or None)]
        assert [[str(v) for v in row.values()] for row in body["rows"]] == over_wire, sql


async def test_info_health_and_schema(api: Fleet) -> None:
    async with aiohttp.ClientSession() as client:
        for path in ("/api/database/info", "/api/database/health", "/api/database/schema"):
            async with client.get(url(api, path), headers=auth("pf_server", "bad")) as r:
                assert r.status == 401, path
        async with client.get(url(api, "/api/database/health"), headers=auth()) as r:
            health = await r.json()
        assert r.status == 200 and health["status"] in ("healthy", "degraded")
        assert {d["database"] for d in health["databases"]} == {"primary", "secondary", "analytics"}
        assert set(health["databases"][0]) == {"database", "status", "lastChecked", "connectionCount", "responseTime"}
        async with client.get(url(api, "/api/database/info"), headers=auth("pf_tenant")) as r:
            info = await r.json()
        assert info["key"] == "pf_tenant" and info["role"] == "database"
        async with client.get(url(api, "/api/database/schema"), headers=auth()) as r:
            schema = await r.json()
        assert {"name": "balance", "type": "numeric", "nullable": True} in schema["tables"]["public.accounts"]


async def test_nothing_one_request_sets_reaches_the_next(api: Fleet) -> None:
    """Requests of one key may share a logged-in session, but only one that ended as it began."""
    status, body = await post(api, "/api/database/query", {"query": "SET search_path = pg_catalog"})
    assert status == 200
    status, body = await post(api, "/api/database/query", {"query": "SHOW search_path"})
    assert body["rows"] == [{"search_path": '"$user", public'}]
    status, body = await post(api, "/api/database/transaction", {"queries": [
        {"query": "SELECT set_config('application_name', 'leaked', false)"}]})
    status, body = await post(api, "/api/database/query", {"query": "SHOW application_name"})
    assert body["rows"] == [{"application_name": "pgfleet http"}]
    status, body = await post(api, "/api/database/query", {"query": "BEGIN"})  # left open: not reused
    assert status == 200
    status, body = await post(api, "/api/database/query", {"query": "LOCK TABLE accounts"})
    assert status == 400 and body["error"]["code"] == "25P01"  # outside a transaction block: a new session


async def test_the_core_database_services_endpoints(api: Fleet) -> None:
    status, body = await post(api, "/api/v1/query", {"query": "SELECT $1::int4 AS n", "params": [5]})
    assert status == 200 and body["rows"] == [{"n": 5}] and body["rowCount"] == 1 and "duration" in body
    status, body = await post(api, "/api/v1/query/batch", {"queries": [{"query": "SELECT 1 AS a"},
                                                                      {"query": "SELECT 2 AS b"}]})
    assert status == 200 and [r["rows"] for r in body["results"]] == [[{"a": 1}], [{"b": 2}]]


async def test_copy_and_the_admin_console_are_not_served_and_nothing_hangs(api: Fleet) -> None:
    wire(api, "CREATE TABLE IF NOT EXISTS http_copy (a int)")
    for sql in ("COPY http_copy FROM STDIN", "/* x */ copy http_copy TO STDOUT"):
        async with asyncio.timeout(10):
            status, body = await post(api, "/api/database/query", {"query": sql})
        assert status == 400 and "COPY is not served over HTTP" in body["error"], (sql, body)
    status, body = await post(api, "/api/database/query", {"query": "SHOW POOLS", "database": "pgfleet"},
                              auth("pf_admin"))
    assert status == 403 and "admin console" in body["error"], body
    status, body = await post(api, "/api/database/query", {"query": "SELECT 1", "params": [0] * 40000})
    assert status == 400 and "32767" in body["error"]
    status, body = await post(api, "/api/database/query", {"query": "SELECT 1\u0000"})
    assert status == 400 and body["error"]["code"] == "08P01"  # what the request sent, not pgfleet's state


async def test_a_secret_changed_by_reload_stops_working_at_once(pg: Cluster, tmp_path: Any) -> None:
    import yaml
    config = fleet_config(pg, http={"host": "127.0.0.1", "port": free_port()})
    fleet = Fleet(config, tmp_path).start()
    try:
        assert (await post(fleet, "/api/database/query", {"query": "SELECT 1"}))[0] == 200  # (remembered now)
        changed = yaml.safe_load(fleet.config_path.read_text())
        for key in changed["keys"]:
            if key["id"] == "pf_server":
                key["secret"] = "a-new-secret"
        fleet.config_path.write_text(yaml.safe_dump(changed))
        with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as conn:
            conn.execute("RELOAD")
        assert (await post(fleet, "/api/database/query", {"query": "SELECT 1"}))[0] == 401
        assert (await post(fleet, "/api/database/query", {"query": "SELECT 1"},
                           auth(secret="a-new-secret")))[0] == 200
    finally:
        fleet.stop()
