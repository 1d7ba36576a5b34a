#!/usr/bin/env python3
"""Replication jobs' copy against the physical limit of this machine, in one alternating run.

Two throw-away clusters (proxy/embedded.py), the source and the target. The source gets a table
of ROWS rows (bigint key, text, numeric, a 60-byte text, timestamptz). Then, for ROUNDS rounds,
each target starts empty:

* **limit**: ``psql -c "COPY t TO STDOUT (FORMAT binary)" | psql -c "COPY t FROM STDIN (FORMAT binary)"``
  into the empty target table with its primary key, the fastest a copy between the two
  databases can go here;
* **first copy**: watermark mode's ``copy_table`` (proxy/replication/watermark.py, the code a
  job runs), which creates the table and copies every row;
* **incremental**: 1% of the source rows updated (``updated_at = now()``), and ``copy_table``
  again. The source has an index on (updated_at, id), as docs/replication.md asks; without
  one, each incremental run reads the whole table (0.55-0.63 s of 1 M rows here, 12.5% of the
  first copy's time).

Targets: the first copy at least 0.5x the limit's rows/s, the incremental run under 10% of the
first copy's time (issue 19). The medians go to ``benchmarks/results/replication-<stamp>.md``.

    .venv/bin/python benchmarks/replication_bench.py              # 1,000,000 rows, 3 rounds
    .venv/bin/python benchmarks/replication_bench.py --rows 100000 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.embedded import Cluster
from proxy.replication.watermark import Progress, copy_table, shape_of

TABLE = """
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    balance numeric(14,2) NOT NULL,
    note text,
    updated_at timestamptz NOT NULL
)"""


def psql_pipe(source: Cluster, target: Cluster, db: str) -> float:
    env = {**os.environ, "PGPASSWORD": source.password}
    out = [str(source.bindir / "psql"), "-X", "-q", "-h", source.host, "-p", str(source.port), "-U", "postgres",
           "-d", db, "-c", "COPY accounts TO STDOUT (FORMAT binary)"]
    into = [str(target.bindir / "psql"), "-X", "-q", "-h", target.host, "-p", str(target.port), "-U", "postgres",
            "-d", db, "-c", "COPY accounts FROM STDIN (FORMAT binary)"]
    started = time.perf_counter()
    producer = subprocess.Popen(out, stdout=subprocess.PIPE, env=env)
    consumer = subprocess.run(into, stdin=producer.stdout, env=env, capture_output=True, check=False)
    assert producer.stdout is not None
    producer.stdout.close()
    producer.wait()
    seconds = time.perf_counter() - started
    if consumer.returncode != 0 or producer.returncode != 0:
        raise SystemExit(f"the psql COPY pipe failed: {consumer.stderr.decode()[-300:]}")
    return seconds


async def copy(source: Cluster, target: Cluster, db: str, batch: int) -> tuple[float, int]:
    src = await asyncpg.connect(source.dsn(db))
    dst = await asyncpg.connect(target.dsn(db))
    try:
        shape = await shape_of(src, "accounts", "updated_at")
        progress = Progress("accounts", "target")
        started = time.perf_counter()
        await copy_table(src, dst, "bench", "source", shape, progress, batch)
        return time.perf_counter() - started, progress.rows
    finally:
        await src.close()
        await dst.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgfleet-replbench-"))
    source = Cluster("repl-source", work / "source").start()
    target = Cluster("repl-target", work / "target").start()
    db = "bench"
    limit, first, incremental = [], [], []
    try:
        source.create_database(db)
        target.create_database(db)
        # The index docs/replication.md asks for (pgfleet logs a warning without it): an
        # incremental run finds the changed rows by it instead of reading the whole table.
        source.psql(TABLE + "; CREATE INDEX ON accounts (updated_at, id)", db)
        source.psql(f"INSERT INTO accounts SELECT g, 'name ' || g, g * 0.01, repeat('x', 60), "
                    f"now() - interval '1 day' + g * interval '1 ms' FROM generate_series(1, {args.rows}) g; "
                    "VACUUM ANALYZE accounts", db)
        for rnd in range(args.rounds):
            target.psql("DROP TABLE IF EXISTS accounts; DROP SCHEMA IF EXISTS pgfleet CASCADE; " + TABLE, db)
            limit.append(psql_pipe(source, target, db))
            target.psql("DROP TABLE accounts; DROP SCHEMA IF EXISTS pgfleet CASCADE", db)
            seconds, rows = asyncio.run(copy(source, target, db, args.batch))
            assert rows == args.rows, rows
            first.append(seconds)
            source.psql(f"UPDATE accounts SET updated_at = now(), balance = balance + 1 WHERE id % 100 = {rnd}", db)
            seconds, rows = asyncio.run(copy(source, target, db, args.batch))
            assert rows >= args.rows // 100, rows
            incremental.append(seconds)
            print(f"round {rnd + 1}: limit {limit[-1]:.2f}s, first copy {first[-1]:.2f}s, "
                  f"incremental ({rows} rows) {incremental[-1]:.3f}s", flush=True)
        check = target.psql("SELECT count(*), sum(hashtext(a::text)::bigint) FROM accounts a", db)
        assert check == source.psql("SELECT count(*), sum(hashtext(a::text)::bigint) FROM accounts a", db), check
    finally:
        source.stop()
        target.stop()
    lim, fst, inc = statistics.median(limit), statistics.median(first), statistics.median(incremental)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    lines = [
        f"# Replication copy vs the COPY pipe ({stamp})", "",
        (f"{args.rows:,} rows (bigint key, text, numeric, 60-byte text, timestamptz), two clusters on this machine, "
        f"batch {args.batch:,}, {args.rounds} alternating rounds, medians; the source has an index on (updated_at, id). "
        "Target data checked equal to the source (count and checksum)."), "",
        "| run | seconds | rows/s | vs the limit |", "|---|--:|--:|--:|",
        f"| limit: psql COPY binary pipe into the empty table | {lim:.2f} | {args.rows / lim:,.0f} | 1.00x |",
        f"| first copy (watermark mode, table created) | {fst:.2f} | {args.rows / fst:,.0f} | {lim / fst:.2f}x |",
        f"| incremental, 1% of rows changed | {inc:.3f} | | {inc / fst * 100:.1f}% of the first copy's time |",
        "", (f"Rounds: limit {', '.join(f'{x:.2f}' for x in limit)}; first {', '.join(f'{x:.2f}' for x in first)}; "
            f"incremental {', '.join(f'{x:.3f}' for x in incremental)}."),
    ]
    out = ROOT / "benchmarks" / "results" / f"replication-{stamp}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
