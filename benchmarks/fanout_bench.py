#!/usr/bin/env python3
"""Federated SELECT through pgfleet (2 and 3 shards) vs one database holding all the rows.

One run starts everything it measures and stops it again:

* a throw-away PostgreSQL cluster (proxy/embedded.py) with one database per layout:
  ``single`` (all rows), ``s2_0``/``s2_1`` (2 shards), ``s3_0``..``s3_2`` (3 shards). Each
  holds ``t(id bigint primary key, grp int, v numeric(12,2), score float8, name text)``
  with ``--rows`` rows, an index on ``(score, id)``, and ``t_small``, the same with
  ``rows / 5`` rows (the second table size of the memory measurement). Every column is a
  deterministic function of ``id``. A shard database generates all ids and keeps those it
  owns: ``satisfies_hash_partition`` against an empty ``PARTITION BY HASH (id)`` table in
  that database, which is exactly pgfleet's ``hash`` shard function (checked on a sample
  with ``proxy.router.shard.shard_of``);
* one pgfleet (``python -m proxy run``) per shard count, ``t`` and ``t_small`` sharded by
  ``id``; the single database is also in each fleet, so "pgfleet, no fan-out" (a server key
  connected to ``/single``) separates the proxy's cost from the fan-out's.

Latency shapes (ORDER BY + LIMIT on the index, ORDER BY + LIMIT needing a top-N sort of every
row, GROUP BY with aggregates): warm-up runs, then ``--runs`` measured runs with psycopg 3,
the targets alternating in an order that rotates every run; medians in ms and the ratio to
the single database. Every answer is compared with the single database's answer (exact
``repr`` of every value, in order): a wrong answer or a refusal is reported in its cell.

Streamed shapes (``select * from t``, ``select * from t order by score, id``) at two table
sizes: pgfleet's peak RSS (``VmHWM`` of its process, reset through ``/proc/PID/clear_refs``
before each measurement, read before and after) shows whether its memory grows with the
table. Results: ``benchmarks/results/fanout-<YYYYMMDD-HHMM>.md`` (also printed).

    .venv/bin/python benchmarks/fanout_bench.py            # 1,000,000 rows, 15 runs (~6-8 min)
    .venv/bin/python benchmarks/fanout_bench.py --quick    # 200,000 rows, 5 runs (~1-2 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import psycopg
from pgbench_compare import (  # the shared helpers
    BenchError,
    end_cluster,
    last_line,
    say,
    stop_process,
    warn,
)
from psycopg.types.string import TextLoader

from proxy.embedded import Cluster, EmbeddedError, free_port
from proxy.router.shard import shard_of

HOST = "127.0.0.1"
PG_PASSWORD = "postgres"
KEY_ID, KEY_SECRET = "bench", "benchpw"
FLEET_DB = "app"
SINGLE = "single"
TABLES = ("t", "t_small")
# A fresh, fast cluster; everything fits in shared_buffers so that no run reads the disk.
PG_SETTINGS = {"shared_buffers": "1GB", "max_connections": "100"}

TABLE_SQL = """
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (id bigint PRIMARY KEY, grp int NOT NULL, v numeric(12,2) NOT NULL,
                      score float8 NOT NULL, name text NOT NULL);
INSERT INTO {table}
SELECT g, (g * 7919) % 1000, ((g * 104729) % 1000000) / 100.0,
       (hashint8(g) & 2147483647)::float8 / 2147483647, 'name-' || md5(g::text)
  FROM generate_series(1::bigint, {rows}::bigint) AS g
 {where};
CREATE INDEX {table}_score_id ON {table} (score, id);
"""

# (key, title, sql, what it exercises)
LATENCY_SHAPES: list[tuple[str, str, str, str]] = [
    ("order_limit", "ORDER BY + LIMIT 100 on an index",
     "select id, grp, v, score, name from t order by score, id limit 100",
     "each database reads 100 rows off the (score, id) index; pgfleet merges 100 per shard"),
    ("topn_limit", "ORDER BY + LIMIT 100 without an index (top-N sort of every row)",
     "select id, grp, v, score, name from t order by v desc, id limit 100",
     "each database scans and top-N sorts all its rows; pgfleet merges 100 per shard"),
    ("group_by", "GROUP BY with aggregates (1000 groups)",
     "select grp, count(*), sum(v), avg(v), min(score), max(score) from t group by grp order by grp",
     ("each database aggregates its rows (avg as sum and count); pgfleet combines 1000 groups "
     "per shard and sorts them")),
    ("star_order_limit", "SELECT * with ORDER BY two columns + LIMIT 100",
     "select * from t order by score, id limit 100",
     ("the same rows as the first shape, but with `*` every sort key is a hidden column that "
     "pgfleet adds to the shard query")),
]

STREAM_SHAPES: list[tuple[str, str, str, bool]] = [
    ("select_all", "plain fan-out", "select * from {table}", False),
    ("order_all", "ORDER BY without LIMIT",
     "select id, grp, v, score, name from {table} order by score, id", True),
]


def one_line(exc: BaseException) -> str:
    sqlstate = getattr(getattr(exc, "diag", None), "sqlstate", None)
    text = " ".join(str(exc).split())
    return f"{sqlstate}: {text}" if sqlstate else f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# Data


def layouts(shard_counts: Sequence[int]) -> dict[str, tuple[int, int] | None]:
    """database -> (modulus, remainder) of the rows it holds; None = all rows."""
    out: dict[str, tuple[int, int] | None] = {SINGLE: None}
    for n in shard_counts:
        for i in range(n):
            out[f"s{n}_{i}"] = (n, i)
    return out


def load_database(cluster: Cluster, db: str, part: tuple[int, int] | None,
                  sizes: dict[str, int]) -> float:
    started = time.perf_counter()
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        where = ""
        if part is not None:
            # satisfies_hash_partition needs a hash-partitioned table for the key's type and
            # hash function; an empty one is enough. This is PostgreSQL's own hash
            # partitioning, which pgfleet's `hash` shard function reproduces bit for bit.
            conn.execute("DROP TABLE IF EXISTS shard_of_id; "
                         "CREATE TABLE shard_of_id (id bigint) PARTITION BY HASH (id)")
            where = (f"WHERE satisfies_hash_partition('shard_of_id'::regclass, "
                     f"{part[0]}, {part[1]}, g)")
        for table, rows in sizes.items():
            conn.execute(TABLE_SQL.format(table=table, rows=rows, where=where))
        conn.execute(f"VACUUM (ANALYZE) {', '.join(sizes)}")
    return time.perf_counter() - started


def check_layout(cluster: Cluster, dbs: dict[str, tuple[int, int] | None],
                 sizes: dict[str, int], shard_counts: Sequence[int]) -> None:
    """Row counts add up, and a sample of every shard belongs to it by pgfleet's shard_of."""
    for table, rows in sizes.items():
        counts: dict[str, int] = {}
        for db, part in dbs.items():
            with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
                counts[db] = conn.execute(f"select count(*) from {table}").fetchone()[0]  # type: ignore[index]
                if part is not None and table == "t":
                    ids = [r[0] for r in conn.execute(
                        f"select id from {table} order by hashint8(id) limit 2000")]
                    wrong = [i for i in ids if shard_of(i, "int8", part[0]) != part[1]]
                    if wrong:
                        raise BenchError(f"{db} holds ids that shard_of places elsewhere "
                                         f"(e.g. {wrong[:5]}): the hash layout is not pgfleet's")
        if counts[SINGLE] != rows:
            raise BenchError(f"{SINGLE}.{table} has {counts[SINGLE]} rows, not {rows}")
        for n in shard_counts:
            total = sum(counts[f"s{n}_{i}"] for i in range(n))
            if total != rows:
                raise BenchError(f"{n} shards of {table} hold {total} rows, not {rows}")


# ---------------------------------------------------------------------------------------------
# pgfleet


@dataclass
class Fleet:
    shards: int
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def dsn(self, dbname: str = FLEET_DB) -> str:
        return f"postgresql://{KEY_ID}:{KEY_SECRET}@{HOST}:{self.port}/{dbname}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> dict[str, int]:
        """VmRSS / VmHWM (kB) of the pgfleet process."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: clear_refs 5); False if not allowed."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


def start_fleet(workdir: Path, cluster: Cluster, n: int, pool_size: int, python: str) -> Fleet:
    port = free_port()
    shards = [f"s{n}_{i}" for i in range(n)]
    config = {
        "listen": {"host": HOST, "port": port, "database": FLEET_DB},
        "pool": {"mode": "transaction", "size": pool_size},
        "databases": {db: {"dsn": cluster.dsn(db)} for db in [*shards, SINGLE]},
        "default_database": shards[0],
        "sharding": {"shards": shards, "function": "hash",
                     "tables": {t: "id" for t in TABLES},
                     "types": {t: "bigint" for t in TABLES}},
        "keys": [{"id": KEY_ID, "secret": KEY_SECRET, "role": "server"}],
    }
    cfg = workdir / f"pgfleet-{n}.yaml"
    cfg.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    log = workdir / f"pgfleet-{n}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, "-m", "proxy", "run", "--config", str(cfg)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    fleet = Fleet(n, port, proc, log)
    deadline = time.monotonic() + 30
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"pgfleet ({n} shards) exited with code {proc.returncode}: "
                             f"{last_line(log.read_text(errors='replace'))}")
        try:
            with psycopg.connect(fleet.dsn(), connect_timeout=5, autocommit=True) as conn:
                conn.execute("select 1")
            return fleet
        except psycopg.Error as exc:
            last = one_line(exc)
            time.sleep(0.3)
    stop_process(proc, "pgfleet")
    raise BenchError(f"pgfleet ({n} shards) did not answer within 30 s: {last}")


def log_problems(log: Path, limit: int = 30) -> list[str]:
    if not log.exists():
        return []
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception|Error:", line):
            continue
        key = re.sub(r"^\S+ \S+ ", "", line)
        key = re.sub(r"(127\.0\.0\.1|\[?::1\]?):\d+", r"\1:*", key)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, line)
    lines = [f"{counts[k]:>6}× {first[k]}" for k in counts]
    return lines[:limit] + ([f"… {len(lines) - limit} more distinct lines"] if len(lines) > limit else [])


# ---------------------------------------------------------------------------------------------
# Targets and measurement


@dataclass
class Target:
    key: str            # "single", "via", "2", "3"
    label: str
    dsn: str
    fleet: Fleet | None = None
    conn: psycopg.Connection[Any] | None = None
    stream_conn: psycopg.Connection[Any] | None = None

    def connect(self, prepare: bool) -> None:
        self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        self.conn.prepare_threshold = 0 if prepare else None
        # Streamed shapes: values as text, so that checking a million rows costs little.
        self.stream_conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        self.stream_conn.prepare_threshold = 0 if prepare else None
        for name in ("int2", "int4", "int8", "numeric", "float4", "float8"):
            self.stream_conn.adapters.register_loader(name, TextLoader)

    def close(self) -> None:
        for c in (self.conn, self.stream_conn):
            if c is not None:
                try:
                    c.close()
                except psycopg.Error:
                    pass


@dataclass
class Cell:
    times: list[float] = field(default_factory=list)  # seconds
    error: str = ""      # refused / failed: the error line
    wrong: str = ""      # answered, but not the single database's answer
    server_ms: float | None = None
    plan: str = ""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1000 if self.times else None


def run_rows(conn: psycopg.Connection[Any], sql: str) -> tuple[float, list[tuple[Any, ...]]]:
    t0 = time.perf_counter()
    cur = conn.execute(sql)
    rows = cur.fetchall()
    return time.perf_counter() - t0, rows


def canon(rows: list[tuple[Any, ...]]) -> list[tuple[str, ...]]:
    """Exact: repr tells Decimal('1.50') from Decimal('1.5') and float digits apart."""
    return [tuple(repr(v) for v in r) for r in rows]


def first_difference(want: list[tuple[str, ...]], got: list[tuple[str, ...]]) -> str:
    def show(row: tuple[str, ...]) -> str:
        text = f"({', '.join(row)})"
        return text if len(text) <= 120 else text[:117] + "…"

    if len(want) != len(got):
        return f"{len(got)} rows instead of {len(want)}"
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            return f"row {i + 1} is {show(b)}, the single database's is {show(a)}"
    return ""


def measure_latency(targets: list[Target], sql: str, runs: int, warmup: int,
                    progress: Callable[[str], None]) -> dict[str, Cell]:
    cells = {t.key: Cell() for t in targets}
    want: list[tuple[str, ...]] | None = None
    live: list[Target] = []
    for t in targets:  # the single database first: its answer is the reference
        cell = cells[t.key]
        try:
            for _ in range(max(1, warmup)):
                _, rows = run_rows(t.conn, sql)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            cell.error = one_line(exc)
            progress(f"  {t.label}: {cell.error}")
            if t.key == "single":
                raise BenchError(f"the single database fails `{sql}`: {cell.error}") from None
            continue
        got = canon(rows)
        if want is None:
            want = got
        elif got != want:
            cell.wrong = first_difference(want, got)
            progress(f"  {t.label}: WRONG ANSWER: {cell.wrong}")
        live.append(t)
    for rnd in range(runs):
        k = rnd % len(live)
        for t in live[k:] + live[:k]:
            cell = cells[t.key]
            if cell.error:
                continue
            try:
                secs, rows = run_rows(t.conn, sql)  # type: ignore[arg-type]
            except psycopg.Error as exc:
                cell.error = f"failed in run {rnd + 1}: {one_line(exc)}"
                progress(f"  {t.label}: {cell.error}")
                continue
            cell.times.append(secs)
            if not cell.wrong and canon(rows) != want:
                cell.wrong = f"run {rnd + 1}: {first_difference(want, canon(rows))}"  # type: ignore[arg-type]
    return cells


def explain(cluster: Cluster, db: str, sql: str) -> tuple[float, str]:
    """Execution time (ms) of ``sql`` on one database alone, and its plan's top nodes."""
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        conn.execute(sql).fetchall()
        docs = [conn.execute(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}").fetchone()[0][0]  # type: ignore[index]
                for _ in range(3)]
    top = min(docs, key=lambda d: float(d["Execution Time"]))  # best of 3: the machine is shared
    nodes: list[str] = []
    node = top["Plan"]
    while node is not None and len(nodes) < 4:
        name = node["Node Type"]
        if node.get("Workers Planned"):
            name += f" ({node['Workers Planned']} workers)"
        nodes.append(name)
        plans = [p for p in node.get("Plans", []) if p.get("Parent Relationship") != "InitPlan"]
        node = plans[0] if plans else None
    return float(top["Execution Time"]), " → ".join(nodes)


@dataclass
class StreamResult:
    target: str
    shape: str
    table: str
    rows: int = 0
    times: list[float] = field(default_factory=list)
    error: str = ""
    wrong: str = ""
    mem: dict[str, int] = field(default_factory=dict)  # kB: rss_before, hwm_before, hwm_after, rss_after
    reset: bool = False

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1000 if self.times else None


def digest(rows: list[tuple[str, ...]], ordered: bool) -> tuple[int, str]:
    if ordered:
        h = hashlib.sha256()
        for r in rows:
            h.update("\x1f".join(r).encode())
            h.update(b"\x1e")
        return len(rows), h.hexdigest()
    # Order-free: the sum of the rows' hashes (one process, so str hashing is stable).
    return len(rows), format(sum(hash(r) for r in rows) & 0xFFFFFFFFFFFFFFFF, "x")


def measure_stream(t: Target, sql: str, ordered: bool, runs: int,
                   want: tuple[int, str] | None) -> tuple[StreamResult, tuple[int, str] | None]:
    res = StreamResult(t.key, "", "")
    conn = t.stream_conn
    assert conn is not None
    got: tuple[int, str] | None = None
    if t.fleet is not None:
        res.mem["hwm_since_start"] = t.fleet.status()["VmHWM"]
        res.reset = t.fleet.reset_peak()
        st = t.fleet.status()
        res.mem["rss_before"], res.mem["hwm_before"] = st["VmRSS"], st["VmHWM"]
    for i in range(runs):
        try:
            t0 = time.perf_counter()
            cur = conn.execute(sql)  # libpq has every row when this returns
            secs = time.perf_counter() - t0
            rows = cur.fetchall()
            cur.close()
        except psycopg.Error as exc:
            res.error = one_line(exc)
            break
        res.times.append(secs)
        res.rows = len(rows)
        if i == 0:
            got = digest(rows, ordered)
            if want is not None and got != want:
                res.wrong = (f"{got[0]} rows instead of {want[0]}" if got[0] != want[0]
                             else "different rows" + (" or order" if ordered else ""))
        del rows
    if t.fleet is not None and t.fleet.alive():
        st = t.fleet.status()
        res.mem["hwm_after"], res.mem["rss_after"] = st["VmHWM"], st["VmRSS"]
    return res, got


# ---------------------------------------------------------------------------------------------
# Report


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def fmt_mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f}"


def machine_info(cluster: Cluster, python: str) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        server = cluster.psql("SHOW server_version")
        workers = cluster.psql("SHOW max_parallel_workers_per_gather")
    except EmbeddedError:
        server = workers = "?"
    r = subprocess.run([python, "-m", "proxy", "--version"], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "proxy"],
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        rev, dirty = "?", ""
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "PostgreSQL": f"{server} (one cluster for every database; shared_buffers "
                      f"{PG_SETTINGS['shared_buffers']}, max_parallel_workers_per_gather {workers})",
        "pgfleet": f"{(r.stdout or r.stderr).strip()} at {rev or '?'}"
                   + (" + uncommitted changes under proxy/" if dirty else ""),
        "python / psycopg": f"{platform.python_version()} / psycopg {psycopg.__version__} "
                            f"({psycopg.pq.__impl__})",
    }


def build_report(info: dict[str, str], args: argparse.Namespace, targets: list[Target],
                 latency: dict[str, dict[str, Cell]], streams: list[StreamResult],
                 idle_mem: dict[int, dict[str, int]], latency_mem: dict[int, dict[str, int]],
                 problems: dict[int, list[str]]) -> str:
    label = {t.key: t.label for t in targets}
    out = ["# Fan-out: federated SELECT through pgfleet vs one database", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    out += ["", "## Method", "",
            (f"`t(id bigint primary key, grp int, v numeric(12,2), score float8, name text)`, "
            f"index on `(score, id)`, **{args.rows:,} rows** (and `t_small`, {args.small_rows:,} rows, "
            "for the memory table), every column a deterministic function of `id`. "
            "*single database*: one database holds every row and psycopg connects to it directly. "
            "*N shards*: N databases on the same cluster, each holding the rows whose `id` "
            "PostgreSQL's hash partitioning (= pgfleet's `hash`) gives it, behind one pgfleet "
            "(`sharding: {tables: {t: id}}`, transaction pooling, pool size "
            f"{args.pool_size}), which fans the statement out and merges. *pgfleet, no fan-out*: "
            "the same pgfleet, but the client connects to the fleet database `single`, so every "
            "statement goes to the single database unchanged: the proxy's own cost."),
            "",
            (f"Per shape: {args.warmup} warm-up run(s) per target, then {args.runs} measured runs, "
            "the targets alternating in an order that rotates every run; the time is "
            "`cursor.execute()` + `fetchall()` in psycopg 3 "
            f"({'prepared statements (extended protocol)' if args.protocol == 'prepared' else 'simple query protocol, no prepared statements'}), "
            "client, pgfleet and PostgreSQL on the same cores. Ratio = median / the single "
            "database's median. *server ms*: `EXPLAIN ANALYZE` execution time of the statement "
            "on that database alone (for shards: the slowest shard), run after the measurement. "
            "Every answer is compared with the single database's, value by value (`repr`), in order."),
            ""]

    for key, title, sql, what in LATENCY_SHAPES:
        cells = latency.get(key)
        if cells is None:
            continue
        base = cells["single"].median_ms
        out += [f"## {title}", "", f"```sql\n{sql}\n```", "", what + ".", "",
                "| target | median ms | ratio | min – max ms | server ms | plan (single / first shard) | answer |",
                "|---|--:|--:|--:|--:|---|---|"]
        for t in targets:
            c = cells[t.key]
            med = c.median_ms
            ratio = "1.00×" if t.key == "single" else (
                f"{med / base:.2f}×" if med is not None and base else "n/a")
            spread = (f"{fmt_ms(min(c.times) * 1000)} – {fmt_ms(max(c.times) * 1000)}"
                      if c.times else "n/a")
            answer = ("reference" if t.key == "single" else
                      f"**refused/failed**: `{c.error}`" if c.error else
                      f"**WRONG**: {c.wrong}" if c.wrong else "equal")
            server = fmt_ms(c.server_ms) if c.server_ms is not None else ""
            out.append(f"| {t.label} | {fmt_ms(med)} | {ratio} | {spread} | {server} | "
                       f"{c.plan} | {answer} |")
        out.append("")

    # Verdict on the latency target.
    ol = latency.get("order_limit")
    if ol is not None and ol["single"].median_ms:
        parts = []
        for t in targets:
            if t.key in ("single", "via"):
                continue
            c = ol[t.key]
            if c.median_ms is None or c.error or c.wrong:
                parts.append(f"{t.label}: not measured ({c.error or c.wrong or 'no runs'})")
            else:
                r = c.median_ms / ol["single"].median_ms
                parts.append(f"{t.label} {r:.2f}× ({'met' if r <= 1.5 else 'not met'})")
        out += ["**Target: ORDER BY + LIMIT fan-out within 1.5× of the single database** — "
                + "; ".join(parts) + ".", ""]

    # Streamed shapes and memory.
    out += ["## Streamed shapes: time and pgfleet's peak memory", "",
            ("Each statement returns every row of the table. pgfleet's memory is read from "
            "`/proc/PID/status` of its process: *RSS before* just before the first run, "
            "*peak* = `VmHWM` after the runs, the high-water mark having been reset to the "
            "current RSS (`echo 5 > /proc/PID/clear_refs`) before them, so *peak* is the "
            f"highest RSS while these {args.stream_runs} run(s) streamed. Time: "
            "`cursor.execute()` only (libpq has received every row when it returns; "
            "the rows are then checked against the single database's, order-free for the plain "
            "fan-out, in order for ORDER BY)."), "",
            "| shape | rows | target | median ms | ratio | pgfleet RSS before MB | peak MB | peak − before MB | answer |",
            "|---|--:|---|--:|--:|--:|--:|--:|---|"]
    shape_sql = {k: sql for k, _, sql, _ in STREAM_SHAPES}
    base_ms = {(s.shape, s.table): s.median_ms for s in streams if s.target == "single"}
    for s in streams:
        b = base_ms.get((s.shape, s.table))
        med = s.median_ms
        ratio = "1.00×" if s.target == "single" else (
            f"{med / b:.2f}×" if med is not None and b else "n/a")
        before = s.mem.get("rss_before")
        peak = s.mem.get("hwm_after")
        growth = f"{(peak - before) / 1024:+.1f}" if peak is not None and before is not None else ""
        if s.target != "single" and not s.reset:
            growth += " (peak not reset)"
        answer = ("reference" if s.target == "single" else
                  f"**refused/failed**: `{s.error}`" if s.error else
                  f"**WRONG**: {s.wrong}" if s.wrong else "equal")
        mem_cols = ("", "", "") if s.target == "single" else (fmt_mb(before), fmt_mb(peak), growth)
        out.append(f"| `{shape_sql[s.shape].format(table=s.table)}` | {s.rows:,} | {label[s.target]} | {fmt_ms(med)} | "
                   f"{ratio} | {mem_cols[0]} | {mem_cols[1]} | {mem_cols[2]} | {answer} |")
    out.append("")

    # Verdict on memory: the peak at the large table vs the small one, per fleet and shape.
    verdict = []
    for n in args.shard_list:
        for key, name, _, _ in STREAM_SHAPES:
            small = next((s for s in streams if s.target == str(n) and s.shape == key
                          and s.table == "t_small"), None)
            big = next((s for s in streams if s.target == str(n) and s.shape == key
                        and s.table == "t"), None)
            if not small or not big or "hwm_after" not in small.mem or "hwm_after" not in big.mem:
                continue
            ps, pb = small.mem["hwm_after"] / 1024, big.mem["hwm_after"] / 1024
            grows = pb - ps > max(2.0, 0.05 * ps)
            verdict.append(f"{n} shards, {name}: peak {ps:.1f} MB at {small.rows:,} rows, "
                           f"{pb:.1f} MB at {big.rows:,} rows "
                           f"({'grows' if grows else 'does not grow'}: {pb - ps:+.1f} MB)")
    if verdict:
        out += ["**Target: pgfleet's memory independent of the table size for streamed shapes** — "
                + "; ".join(verdict) + ". (\"Does not grow\": the peak at the large table is within "
                "2 MB or 5 % of the peak at the small one; the small table runs first, so the "
                "memory a merge's first run leaves allocated shows as growth there, not at the "
                "large table.)", ""]

    out += ["### pgfleet's memory at other moments", "",
            "| fleet | RSS after start MB | peak since start, after the latency shapes MB |",
            "|---|--:|--:|"]
    for n in args.shard_list:
        idle = idle_mem.get(n, {})
        lat = latency_mem.get(n, {})
        out.append(f"| {n} shards | {fmt_mb(idle.get('VmRSS'))} | {fmt_mb(lat.get('VmHWM'))} |")
    out += ["", "## pgfleet's log", ""]
    if not any(problems.values()):
        out.append("No warning or error in pgfleet's logs.")
    for n, lines in problems.items():
        if lines:
            out += [f"{n} shards (warnings and errors, distinct, with counts):", "", "```", *lines,
                    "```", ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="rows of t (default 1,000,000)")
    p.add_argument("--small-rows", type=int, default=None,
                   help="rows of t_small, the memory table's second size (default rows / 5)")
    p.add_argument("--runs", type=int, default=None, help="measured runs per shape (default 15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per target (default 3)")
    p.add_argument("--stream-runs", type=int, default=None,
                   help="runs of each streamed shape per target (default 3)")
    p.add_argument("--shards", default="2,3", help="shard counts (default 2,3)")
    p.add_argument("--protocol", choices=("simple", "prepared"), default="simple",
                   help="simple: psycopg's simple query protocol, no prepared statements "
                        "(default); prepared: every statement prepared (extended protocol)")
    p.add_argument("--pool-size", type=int, default=8, help="pgfleet's pool size (default 8)")
    p.add_argument("--no-stream", action="store_true", help="skip the streamed shapes and memory")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200,000 rows, 5 runs, 1 warm-up, 1 streamed run")
    p.add_argument("--keep", action="store_true", help="keep the work directory and print it")
    p.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    a = p.parse_args(argv)
    quick = a.quick
    a.rows = a.rows or (200_000 if quick else 1_000_000)
    a.small_rows = a.small_rows or max(1, a.rows // 5)
    a.runs = a.runs or (5 if quick else 15)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 3)
    a.stream_runs = a.stream_runs or (1 if quick else 3)
    try:
        a.shard_list = sorted({int(x) for x in a.shards.split(",") if x.strip()})
    except ValueError:
        p.error(f"--shards: not a comma-separated list of integers: {a.shards}")
    if not a.shard_list or min(a.shard_list) < 2 or a.rows < 1 or a.runs < 1:
        p.error("--shards values must be >= 2, --rows and --runs >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    started = dt.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="pgfleet-fanout-"))
    cluster: Cluster | None = None
    fleets: dict[int, Fleet] = {}
    targets: list[Target] = []
    try:
        say(f"work directory {workdir}")
        cluster = Cluster("fanout", workdir / "pg", password=PG_PASSWORD, settings=PG_SETTINGS)
        cluster.start()
        dbs = layouts(args.shard_list)
        for db in dbs:
            cluster.create_database(db)
        sizes = {"t": args.rows, "t_small": args.small_rows}
        say(f"PostgreSQL on {HOST}:{cluster.port}; loading {args.rows:,} + {args.small_rows:,} rows "
            f"into {len(dbs)} databases ...")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {db: pool.submit(load_database, cluster, db, part, sizes)
                       for db, part in dbs.items()}
            for db, fut in futures.items():
                say(f"  {db}: {fut.result():.1f} s")
        check_layout(cluster, dbs, sizes, args.shard_list)
        load_secs = time.perf_counter() - t0
        say(f"loaded and checked in {load_secs:.0f} s")

        for n in args.shard_list:
            fleets[n] = start_fleet(workdir, cluster, n, args.pool_size, python)
            say(f"pgfleet for {n} shards on {HOST}:{fleets[n].port} (pid {fleets[n].proc.pid})")
        idle_mem = {n: f.status() for n, f in fleets.items()}

        first = fleets[args.shard_list[0]]
        targets = [Target("single", "single database", cluster.dsn(SINGLE)),
                   Target("via", "pgfleet, no fan-out (single database)", first.dsn(SINGLE), first)]
        targets += [Target(str(n), f"{n} shards via pgfleet", f.dsn(), f) for n, f in fleets.items()]
        for t in targets:
            t.connect(args.protocol == "prepared")

        info = machine_info(cluster, python)
        info["date"] = started.strftime("%Y-%m-%d %H:%M")
        info["data"] = f"{load_secs:.0f} s to create and check every database"

        # -- latency shapes ------------------------------------------------------------------
        latency: dict[str, dict[str, Cell]] = {}
        for key, title, sql, _ in LATENCY_SHAPES:
            say(f"{title}: {args.warmup} warm-up + {args.runs} runs per target ...")
            cells = measure_latency(targets, sql, args.runs, args.warmup, say)
            for t in targets:
                if t.key == "via":
                    continue
                names = [SINGLE] if t.key == "single" else [f"s{t.key}_{i}" for i in range(int(t.key))]
                plans = [explain(cluster, db, sql) for db in names]
                cells[t.key].server_ms = max(ms for ms, _ in plans)
                cells[t.key].plan = plans[0][1]
            latency[key] = cells
            base = cells["single"].median_ms or 0
            for t in targets:
                c = cells[t.key]
                note = f"  {c.error}" if c.error else f"  WRONG: {c.wrong}" if c.wrong else ""
                ratio = f"{c.median_ms / base:5.2f}x" if c.median_ms and base else "  n/a"
                say(f"  {t.label:<40} {fmt_ms(c.median_ms):>8} ms {ratio}{note}")
            for n, f in fleets.items():
                if not f.alive():
                    raise BenchError(f"pgfleet ({n} shards) exited with code {f.proc.returncode}: "
                                     f"{last_line(f.log.read_text(errors='replace'))}")
        latency_mem = {n: f.status() for n, f in fleets.items()}

        # -- streamed shapes and memory ------------------------------------------------------
        streams: list[StreamResult] = []
        if not args.no_stream:
            stream_targets = targets
            for key, name, sql_t, ordered in STREAM_SHAPES:
                for table in ("t_small", "t"):
                    sql = sql_t.format(table=table)
                    say(f"{name}, {sizes[table]:,} rows: `{sql}`, {args.stream_runs} run(s) per target ...")
                    want: tuple[int, str] | None = None
                    for t in stream_targets:
                        res, got = measure_stream(t, sql, ordered, args.stream_runs, want)
                        res.shape, res.table = key, table
                        if t.key == "single":
                            if res.error:
                                raise BenchError(f"the single database fails `{sql}`: {res.error}")
                            want = got
                        streams.append(res)
                        mem = (f"  pgfleet RSS {fmt_mb(res.mem.get('rss_before'))} MB, peak "
                               f"{fmt_mb(res.mem.get('hwm_after'))} MB" if t.fleet else "")
                        note = (f"  {res.error}" if res.error else
                                f"  WRONG: {res.wrong}" if res.wrong else "")
                        say(f"  {t.label:<40} {fmt_ms(res.median_ms):>8} ms{mem}{note}")
                        if t.fleet is not None and not t.fleet.alive():
                            raise BenchError(f"pgfleet exited with code {t.fleet.proc.returncode}")
        info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        info["finished"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        info["command"] = "benchmarks/fanout_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])

        report = build_report(info, args, targets, latency, streams, idle_mem, latency_mem,
                              {n: log_problems(f.log) for n, f in fleets.items()})
        args.output.mkdir(parents=True, exist_ok=True)
        path = args.output / f"fanout-{started.strftime('%Y%m%d-%H%M')}.md"
        path.write_text(report)
        say("")
        say(report)
        say(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return 0
    except (BenchError, EmbeddedError) as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        warn("interrupted")
        return 130
    finally:
        for t in targets:
            t.close()
        for n, f in fleets.items():
            stop_process(f.proc, f"pgfleet ({n} shards)")
        end_cluster(cluster, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
