#!/usr/bin/env python3
"""SQL over HTTP against the same query over the wire, through one pgfleet, in one alternating run.

A throw-away cluster (proxy/embedded.py) with a table of 10,000 rows, and pgfleet in front of
it (``python -m proxy run``, with ``http:``). For ROUNDS rounds, alternating:

* **wire**: asyncpg, one connection, ``SELECT id, name FROM items WHERE id = $1``, N times in a row;
* **http**: aiohttp, one keep-alive session, ``POST /api/database/query`` with the same
  statement and parameter, N times in a row;
* **neon**: the same over ``POST /sql`` (Neon's protocol, raw text, array mode);

and then requests per second at 32 concurrent clients for wire (32 connections) and http.

The medians and p99s go to ``benchmarks/results/http-<stamp>.md``. Target (issue 20): HTTP adds
under 1 ms at the median. Both clients are Python on the same 2 cores as pgfleet and
PostgreSQL, so the figures include each client's own cost.

    .venv/bin/python benchmarks/http_bench.py                 # N = 2000, 3 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.embedded import Cluster, free_port

KEY, SECRET = "bench", "bench-secret"
SQL = "SELECT id, name FROM items WHERE id = $1"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def wire_latency(port: int, n: int) -> list[float]:
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user=KEY, password=SECRET, database="app")
    try:
        out = []
        for i in range(n):
            started = time.perf_counter()
            await conn.fetchrow(SQL, i % 10_000 + 1)
            out.append(time.perf_counter() - started)
        return out
    finally:
        await conn.close()


async def http_latency(port: int, n: int, neon: bool) -> list[float]:
    headers = {"X-API-Key": KEY, "X-API-Secret": SECRET}
    path = "/api/database/query"
    if neon:
        headers = {"Neon-Connection-String": f"postgresql://{KEY}:{SECRET}@127.0.0.1/app",
                   "Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"}
        path = "/sql"
    async with aiohttp.ClientSession() as client:
        out = []
        for i in range(n):
            started = time.perf_counter()
            async with client.post(f"http://127.0.0.1:{port}{path}", headers=headers,
                                   json={"query": SQL, "params": [i % 10_000 + 1]}) as answer:
                body = await answer.json()
                assert answer.status == 200, body
            out.append(time.perf_counter() - started)
        return out


async def wire_rate(port: int, clients: int, seconds: float) -> float:
    conns = [await asyncpg.connect(host="127.0.0.1", port=port, user=KEY, password=SECRET, database="app")
             for _ in range(clients)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(conn: asyncpg.Connection) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            await conn.fetchrow(SQL, i % 10_000 + 1)
            i += 1
            done += 1
    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return done / elapsed


async def http_rate(port: int, clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as client:
        async def loop() -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                async with client.post(f"http://127.0.0.1:{port}/api/database/query",
                                       headers={"X-API-Key": KEY, "X-API-Secret": SECRET},
                                       json={"query": SQL, "params": [i % 10_000 + 1]}) as answer:
                    await answer.read()
                    assert answer.status == 200
                i += 1
                done += 1
        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return done / (time.perf_counter() - started)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def stream_memory(port: int, pid: int, rows: int) -> tuple[int, int, int, float]:
    """Stream ``rows`` rows of 200 bytes as JSON lines; pgfleet's RSS before and at its peak (KiB),
    the bytes received, and the seconds it took."""
    before = peak = rss_kib(pid)
    received = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession() as client, client.post(
            f"http://127.0.0.1:{port}/api/database/query",
            headers={"X-API-Key": KEY, "X-API-Secret": SECRET, "Accept": "application/x-ndjson"},
            json={"query": f"SELECT g AS n, repeat('x', 200) AS pad FROM generate_series(1, {rows}) g"}) as answer:
        assert answer.status == 200
        async for chunk in answer.content.iter_chunked(1 << 16):
            received += len(chunk)
            if received % (8 << 20) < (1 << 16):
                peak = max(peak, rss_kib(pid))
    return before, peak, received, time.perf_counter() - started


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("pgfleet exited early")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit("pgfleet did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--stream-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgfleet-httpbench-"))
    cluster = Cluster("http-bench", work / "pg").start()
    proc = None
    try:
        cluster.create_database("bench")
        cluster.psql("CREATE TABLE items (id int PRIMARY KEY, name text); "
                     "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10000) g", "bench")
        port, http_port = free_port(), free_port()
        config = work / "pgfleet.yaml"
        config.write_text(
            f"listen: {{host: 127.0.0.1, port: {port}, database: app}}\n"
            f"http: {{host: 127.0.0.1, port: {http_port}, statement_timeout: 600s}}\n"
            "pool: {mode: transaction, size: 10}\n"
            f"databases:\n  primary: {{dsn: \"{cluster.dsn('bench')}\"}}\n"
            f"keys:\n  - {{id: {KEY}, secret: {SECRET}, role: server}}\n")
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(config), "--log-level",
                                 "warning"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_port(http_port, proc)
        wait_port(port, proc)
        results: dict[str, list[float]] = {"wire": [], "http": [], "neon": []}
        rates: dict[str, list[float]] = {"wire": [], "http": []}
        for rnd in range(args.rounds):
            results["wire"] += asyncio.run(wire_latency(port, args.n))
            results["http"] += asyncio.run(http_latency(http_port, args.n, neon=False))
            results["neon"] += asyncio.run(http_latency(http_port, args.n, neon=True))
            rates["wire"].append(asyncio.run(wire_rate(port, args.clients, args.seconds)))
            rates["http"].append(asyncio.run(http_rate(http_port, args.clients, args.seconds)))
            print(f"round {rnd + 1}: " + ", ".join(f"{k} p50 {statistics.median(v) * 1000:.3f} ms"
                                                   for k, v in results.items()), flush=True)
        memory = asyncio.run(stream_memory(http_port, proc.pid, args.stream_rows))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        cluster.stop()
    wire50 = statistics.median(results["wire"]) * 1000
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    lines = [f"# SQL over HTTP vs the wire ({stamp})", "",
             (f"One pgfleet (pool 10) on one cluster, `{SQL}`, {args.n} requests in a row per round, "
             f"{args.rounds} alternating rounds; clients in Python (asyncpg, aiohttp) on the same 2 cores. "
             "The server's statement_timeout for HTTP is raised for the streaming run."), "",
             "| path | p50 ms | p99 ms | p50 over the wire |", "|---|--:|--:|--:|"]
    for name, values in results.items():
        p50, p99 = statistics.median(values) * 1000, pct(values, 0.99) * 1000
        lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | +{p50 - wire50:.3f} ms |")
    lines += ["", (f"Requests per second at {args.clients} concurrent clients ({args.seconds:g} s, median of rounds): "
              f"wire {statistics.median(rates['wire']):,.0f}, http {statistics.median(rates['http']):,.0f}.")]
    before, peak, received, seconds = memory
    lines += ["", (f"Streaming {args.stream_rows:,} rows as JSON lines (`Accept: application/x-ndjson`, "
              f"{received / 1e6:,.0f} MB received in {seconds:.1f} s): pgfleet's RSS {before / 1024:.0f} MB before, "
              f"{peak / 1024:.0f} MB at its peak (+{(peak - before) / 1024:.1f} MB).")]
    out = ROOT / "benchmarks" / "results" / f"http-{stamp}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
