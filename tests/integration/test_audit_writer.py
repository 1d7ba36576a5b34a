"""The audit log's table sink on the real cluster: rows in ``pgfleet.audit``, and a database
that cannot be reached (the queue stays bounded, drops are counted, one line per outage)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.admin.audit import AuditLog
from proxy.config import Audit, Dsn, parse_dsn
from proxy.embedded import Cluster

DB = "audit_sink"
STARTED = 1700000000.123


@pytest.fixture
def sink(pg: Cluster) -> str:
    """A database with no ``pgfleet.audit`` yet."""
    pg.create_database(DB)
    pg.psql("DROP SCHEMA IF EXISTS pgfleet CASCADE", dbname=DB)
    return DB


def dsn_of(pg: Cluster, dbname: str = DB, port: int | None = None) -> Callable[[str], Dsn]:
    dsn = parse_dsn(pg.dsn(dbname), "test")
    if port is not None:
        dsn = Dsn(host=dsn.host, port=port, user=dsn.user, password=dsn.password, dbname=dsn.dbname)
    return lambda name: dsn


def rows(pg: Cluster, sql: str = "SELECT * FROM pgfleet.audit ORDER BY time, key") -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(DB), autocommit=True) as conn:
        return list(conn.execute(sql))


def record(log: AuditLog, i: int = 0, **kw: Any) -> None:
    args: dict[str, Any] = {"key": f"k{i}", "client": "127.0.0.1:50000", "databases": ("primary",),
                            "route": "direct", "started": STARTED + i, "duration": 0.0015, "rows": 1,
                            "sqlstate": None,
                            "statement": f"select * from t where email = 'bob{i}@example.com'"}
    args.update(kw)
    log.record(**args)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_rows_land_in_pgfleet_audit(pg: Cluster, sink: str) -> None:
    log = AuditLog(Audit(table=sink), dsn_of(pg))
    await log.start()
    record(log, 0)
    record(log, 1, databases=("primary", "secondary"), route="all", rows=None, sqlstate="42P01",
           duration=0.25, key="pf_admin")
    await log.stop()
    assert (log.written, log.dropped) == (2, 0)
    columns = rows(pg, "SELECT column_name, data_type FROM information_schema.columns "
                       "WHERE table_schema = 'pgfleet' AND table_name = 'audit' ORDER BY ordinal_position")
    assert columns == [("time", "timestamp with time zone"), ("key", "text"), ("client", "text"),
                       ("databases", "ARRAY"), ("route", "text"), ("duration_ms", "double precision"),
                       ("rows", "bigint"), ("sqlstate", "text"), ("statement", "text"),
                       ("fingerprint", "text")]
    first, second = rows(pg)
    assert first[0] == dt.datetime.fromtimestamp(STARTED, dt.UTC)
    assert first[1:9] == ("k0", "127.0.0.1:50000", ["primary"], "direct", 1.5, 1, None,
                          "select * from t where email = $1")
    assert isinstance(first[9], str) and first[9]
    assert second[1:9] == ("pf_admin", "127.0.0.1:50000", ["primary", "secondary"], "all", 250.0, None,
                           "42P01", "select * from t where email = $1")


async def test_a_file_and_a_table_get_the_same_statements(pg: Cluster, sink: str, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(table=sink, path=str(path), statements="full"), dsn_of(pg))
    await log.start()
    for i in range(30):
        record(log, i)
    await log.stop()
    assert (log.written, log.dropped) == (30, 0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    table = rows(pg)
    assert [line["statement"] for line in lines] == [row[8] for row in table]
    assert [line["fingerprint"] for line in lines] == [row[9] for row in table]
    assert table[3][8] == "select * from t where email = 'bob3@example.com'"


async def test_an_unreachable_database_drops_and_counts(pg: Cluster, refusing_port: int,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(Audit(table=DB, queue_size=5, retry_interval=0.2), dsn_of(pg, port=refusing_port))
    with caplog.at_level(logging.WARNING, "pgfleet.audit"):
        await log.start()
        for i in range(20):
            record(log, i)  # never raises, never waits
        assert log.queued <= 5 and log.dropped >= 15
        await wait_for(lambda: log.queued == 0)  # the writer tried, failed: its batch is dropped too
        for round_ in range(3):  # more statements over several retries: still one line for the outage
            for i in range(10):
                record(log, 100 + 10 * round_ + i)
            await asyncio.sleep(0.25)
        await log.stop()
    assert log.written == 0
    assert log.dropped == 50
    errors = [r.getMessage() for r in caplog.records if r.name == "pgfleet.audit" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"audit log: cannot write to table pgfleet.audit in database {DB} (")


async def test_the_table_comes_back_after_an_outage(pg: Cluster, sink: str, refusing_port: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    address = {"dsn": dsn_of(pg, port=refusing_port)(DB)}
    log = AuditLog(Audit(table=sink, queue_size=100, retry_interval=0.1), lambda name: address["dsn"])
    with caplog.at_level(logging.WARNING, "pgfleet.audit"):
        await log.start()
        record(log, 0)
        await wait_for(lambda: log.dropped == 1)
        address["dsn"] = dsn_of(pg)(DB)  # the database answers again
        record(log, 1)
        record(log, 2)
        await wait_for(lambda: log.written == 2)
        await log.stop()
    assert [row[1] for row in rows(pg)] == ["k1", "k2"]
    messages = [r.getMessage() for r in caplog.records if r.name == "pgfleet.audit"]
    assert len(messages) == 2, messages
    assert messages[1] == (f"audit log: writing to table pgfleet.audit in database {DB} again; "
                           "1 statement(s) were dropped meanwhile")
