"""The audit log through a running pgfleet: one JSON line per statement of a known workload
(simple and extended protocol, an error, a refusal, a fan-out), and no literal in any line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.embedded import Cluster

from .conftest import Fleet


def lines(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_every_statement_gets_one_line_without_its_literals(make_fleet: Any, tmp_path: Path, pg: Cluster) -> None:
    path = tmp_path / "audit.jsonl"
    fleet: Fleet = make_fleet(audit={"path": str(path)},
                              sharding={"shards": ["primary", "secondary"], "function": "hash",
                                        "tables": {"users": "id"}})
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        conn.execute("select count(*) from events where kind = 'bob@example.com' and id > 4242")  # simple
        conn.execute("select count(*) from events where id > %s", (4243,))                          # extended
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("select nonsense from events where kind = 'carol@example.com'")
        with pytest.raises(psycopg.errors.FeatureNotSupported):                                      # refused
            conn.execute("select * from events, users where events.id = 4244")
        conn.execute("select count(*) from users where name <> 'dave@example.com'")                 # fan-out
        conn.execute("insert into events (kind) values ('eve@example.com')")
    with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as console:
        console.execute("SHOW VERSION")                                                             # admin
    found = lines(path, 7)
    assert len(found) == 7, found
    simple, extended, failed, refused, fanout, insert, admin = found
    assert admin["key"] == "pf_admin" and admin["route"] == "console" and admin["statement"] == "SHOW VERSION"
    assert simple["key"] == "pf_server" and simple["databases"] == ["analytics"] and simple["route"] == "direct"
    assert simple["rows"] == 1 and simple["sqlstate"] is None and simple["duration_ms"] >= 0
    assert simple["client"].startswith("127.0.0.1:") and simple["time"].endswith("Z")
    assert "$1" in simple["statement"] and simple["fingerprint"]
    assert extended["databases"] == ["analytics"] and extended["rows"] == 1 and "$1" in extended["statement"]
    assert failed["sqlstate"] == "42703" and failed["rows"] is None
    assert refused["sqlstate"] == "0A000" and refused["route"] == "refused"
    assert fanout["route"] == "fanout" and fanout["databases"] == ["primary", "secondary"] and fanout["rows"] == 1
    assert insert["rows"] == 1 and insert["sqlstate"] is None
    text = path.read_text()
    for literal in ("bob@example.com", "4242", "4243", "carol@", "4244", "dave@", "eve@"):
        assert literal not in text, literal
    assert "Traceback" not in fleet.log()
    with psycopg.connect(pg.dsn("analytics"), autocommit=True) as direct:  # the shared demo data stays as it was
        direct.execute("delete from events where kind = 'eve@example.com'")


def test_a_refusal_in_a_transaction_no_backend_has_keeps_the_next_lines_right(
        make_fleet: Any, tmp_path: Path) -> None:
    """BEGIN is held back until the first statement picks a database; a statement refused
    before that fails the transaction in pgfleet, and nothing is sent to the backend the client
    keeps parked. The audit log must not wait for that backend's answer to it: the statements
    after the ROLLBACK get their own lines, with their own rows."""
    path = tmp_path / "audit.jsonl"
    fleet: Fleet = make_fleet(audit={"path": str(path)},
                              sharding={"shards": ["primary", "secondary"], "function": "hash",
                                        "tables": {"users": "id"}})
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        conn.execute("select 1")  # the client now keeps a backend of primary between transactions
        conn.execute("begin")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("select * from events, users where events.id = 1")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 2")
        conn.execute("rollback")
        assert conn.execute("select count(*) from events where id < 0").fetchone() == (0,)
        assert conn.execute("select 3").fetchone() == (3,)
    found = lines(path, 5)
    statements = [(line["route"], line["rows"], line["sqlstate"]) for line in found]
    assert statements == [("direct", 1, None), ("refused", None, "0A000"), ("refused", None, "25P02"),
                          ("direct", 1, None), ("direct", 1, None)], found
    assert found[3]["databases"] == ["analytics"] and found[4]["databases"] == ["primary"]
