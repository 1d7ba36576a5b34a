"""node-postgres (npm ``pg``) through pgfleet on a sharded fleet that starts empty.

``node/pg_app.mjs`` is what a Node application does: the schema through pgfleet, a multi-row
INSERT with parameters and RETURNING, a transfer between two shards in one transaction, a
named prepared statement, reads merged from both shards, an error's SQLSTATE, and a pool of
connections in parallel. It prints what it got as JSON; this test checks it, and checks every
row on the shard PostgreSQL's own PARTITION BY HASH gives it. ``make test`` installs the npm
packages (Makefile, ``NODE_STAMP``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from proxy.embedded import Cluster
from proxy.router.shard import shard_of
from tests.integration.conftest import KEYS, Fleet, rows_on, sharded_on

NODE_APPS = Path(__file__).resolve().parent / "node"


def run_node(script: str, url: str) -> dict[str, Any]:
    assert (NODE_APPS / "node_modules" / "pg").is_dir(), "npm packages missing: run make test (it installs them)"
    done = subprocess.run(["node", script], cwd=NODE_APPS, env={**os.environ, "PGFLEET_URL": url},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_node_pg(pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"accounts": "id"}, two_phase_commit=True))
    got = run_node("pg_app.mjs", f"postgresql://pf_server:{KEYS['pf_server'][0]}@127.0.0.1:{fleet.port}/app")
    # bigint comes back as a string in node-postgres, as it does from PostgreSQL directly.
    assert got["returning"] == [str(50 - i) for i in range(50)]  # the client's row order
    assert got["one"] == [{"id": "1", "owner": "o1", "balance": 90}]
    assert got["three"] == [{"id": "3", "owner": "o3", "balance": 110}]
    assert got["total"] == {"total": "5000", "n": "50"}
    assert got["top"] == ["50", "49", "48"]
    assert got["duplicate"] == "23505"
    assert got["after"] == 1
    assert got["pooled"] == [f"o{i}" for i in range(1, 21)]
    found = []
    for index, dbname in enumerate(empty_shards):
        for account_id, balance in rows_on(pg, dbname, "SELECT id, balance FROM accounts"):
            assert shard_of(account_id, "bigint", 2, "hash") == index
            found.append((account_id, balance))
    assert sorted(found) == [(i, 90 if i == 1 else 110 if i == 3 else 100) for i in range(1, 51)]
    assert {shard_of(i, "bigint", 2, "hash") for i in (1, 3)} == {0, 1}, "the transfer must span both shards"
    assert "Traceback" not in fleet.log()


def test_neon_serverless_driver_over_http(pg: Cluster, make_fleet: Any) -> None:
    """@neondatabase/serverless 1.x in HTTP mode, unchanged but for neonConfig.fetchEndpoint."""
    from proxy.embedded import free_port
    port = free_port()
    fleet: Fleet = make_fleet(http={"host": "127.0.0.1", "port": port})
    assert (NODE_APPS / "node_modules" / "@neondatabase" / "serverless").is_dir(), "run make test"
    done = subprocess.run(["node", "neon_app.mjs"], cwd=NODE_APPS, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "PGFLEET_SQL_ENDPOINT": f"http://127.0.0.1:{port}/sql",
                                            "PGFLEET_URL": f"postgresql://pf_server:{KEYS['pf_server'][0]}"
                                                           f"@127.0.0.1/app"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["tagged"] == [{"answer": 42, "quoted": "it's", "ok": True}]  # the driver parsed the types
    assert got["arrays"] == [[7, "x"]]
    assert got["transaction"] == [[{"id": 1}], [{"id": 2}], [{"n": 2}]]
    assert got["duplicate"] == "23505"
    assert got["after"] == [{"id": 1}, {"id": 2}]  # the failed transaction left nothing
    assert got["division"] == {"code": "22012", "message": "division by zero"}
    assert "Traceback" not in fleet.log()
