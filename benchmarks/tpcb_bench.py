#!/usr/bin/env python3
"""pgbench's TPC-B-like transaction: one database vs pgfleet over 2 shards, in one run.

One run starts everything it measures and stops it again:

* a throw-away PostgreSQL cluster (proxy/embedded.py) with three databases: ``single``
  (``pgbench -i -s SCALE``, every row) and ``s0``/``s1``, the same four pgbench tables
  holding the rows whose ``bid`` pgfleet's ``hash`` shard function
  (``proxy.router.shard.shard_of(bid, "int4", 2)``) gives that shard, copied from
  ``single``; row counts and the placement are checked before anything is measured;
* pgfleet (``python -m proxy run``), transaction pooling, with ``s0``/``s1`` as the shards
  of the fleet database (all four tables sharded by ``bid``) and ``single`` as a database
  of its own (a server key that connects to ``/single`` measures the proxy without sharding);
* PgBouncer (transaction pooling, in front of ``single``) when a PgBouncer >= 1.21 is already
  there (on PATH, or the build that benchmarks/pgbench_compare.py caches under
  ``.pgfleet/build``); ``--build-pgbouncer`` builds it when missing, ``--no-pgbouncer`` skips.

pgbench's built-in tpcb-like script updates ``pgbench_accounts`` by ``aid`` alone, which
through pgfleet is a write on every shard inside a transaction (refused without two-phase
commit, which this fleet leaves off). The script here picks the branch first and names ``bid``
in every statement, so each transaction stays on one shard (``SCRIPT`` below). pgbench runs it
with ``-n -M PROTOCOL -c CLIENTS -j 2 -T DURATION -D scale=SCALE`` against every target, the
order rotating from round to round. Afterwards the TPC-B invariant (sum of account, teller
and branch balances = sum of history deltas) is checked in every database directly, and the
history rows are counted against the transactions pgbench reported.

Results: ``benchmarks/results/tpcb-<YYYYMMDD-HHMM>.md`` (also printed).

``--two-phase`` is the other variant: pgfleet runs with ``two_phase_commit: true`` and every
transaction is a transfer between two branches on different shards (``transfer_script``): the
TPC-B statements for a branch of ``s0`` with ``-delta``, then for a branch of ``s1`` with
``+delta``, in one BEGIN ... END, which pgfleet commits with PREPARE TRANSACTION on both
shards, its decision row in ``pgfleet.twophase`` of ``s0`` and COMMIT PREPARED. The same
script runs directly on ``single``, through pgfleet on ``single`` (one database: an ordinary
commit) and through PgBouncer. Besides the invariant in every database, the check asks that
the shards' history deltas cancel out (and pair up, one row on each shard per transaction) and
that no prepared transaction or decision row is left. Results:
``benchmarks/results/tpcb2pc-<YYYYMMDD-HHMM>.md``.

    .venv/bin/python benchmarks/tpcb_bench.py                       # scale 4, -c 10, 3 x 10 s
    .venv/bin/python benchmarks/tpcb_bench.py --protocol prepared
    .venv/bin/python benchmarks/tpcb_bench.py --two-phase           # transfers across shards
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pgbench_compare as pc  # the shared helpers: targets, pgfleet/PgBouncer lifecycle, parsing
import psycopg
from pgbench_compare import (
    BenchError,
    Run,
    Target,
    fmt_ratio,
    fmt_tps,
    last_line,
    machine_info,
    pgfleet_log_problems,
    say,
    stop_process,
    wait_ready,
    warn,
)

from proxy.embedded import DEFAULT_SETTINGS, Cluster, EmbeddedError, free_port
from proxy.router.shard import shard_of

HOST = pc.HOST
PG_PASSWORD = pc.PG_PASSWORD
KEY_ID, KEY_SECRET = pc.KEY_ID, pc.KEY_SECRET
FLEET_DB = "app"
SINGLE = "single"
SHARDS = ("s0", "s1")
KEY_TYPE = "int4"  # pgbench_*.bid is integer
TABLES = ("pgbench_branches", "pgbench_tellers", "pgbench_accounts", "pgbench_history")
PROTOCOLS = ("simple", "extended", "prepared")

SCRIPT = """\
\\set bid random(1, :scale)
\\set aid (:bid - 1) * 100000 + random(1, 100000)
\\set tid (:bid - 1) * 10 + random(1, 10)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid AND bid = :bid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid AND bid = :bid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid AND bid = :bid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, \
CURRENT_TIMESTAMP);
END;
"""

# target key -> how the report names it
LABEL = {
    "direct": "direct, database `single`",
    "fleet_single": "pgfleet → `single` (no sharding)",
    "fleet_sharded": "pgfleet, fleet over 2 shards",
    "fleet_2pc": "pgfleet, 2 shards, two-phase commit",
    "pgbouncer": "PgBouncer → `single`",
}
# When pgbench reports pgfleet's refusal of a statement for another database inside a
# transaction (proxy/frontend/session.py, Session._join's caller): without
# two_phase_commit a transaction stays on the database its first statement picked.
JOIN_REFUSAL = (
    "**Why:** without `two_phase_commit: true` a transaction through pgfleet stays on the "
    "database its first routed statement picked (BEGIN is held until then, in the simple and "
    "the extended protocol alike); a later statement routed to another database is refused "
    "with `0A000` (\"this transaction runs on database s0; a statement for database s1 cannot "
    "join it\") and pgbench aborts that client. Each transaction of this script names one "
    "`bid`, so this means a statement was routed to another shard than the transaction's "
    "first one.")
# --two-phase with -M extended / prepared, when pgbench reports `portal "" cannot be run` at the
# END (read from proxy/frontend/session.py at fc410fd).
END_PORTAL = (
    "**Why (pgfleet, not the script):** `END` of a transaction on several databases is held "
    "at Bind (`Session._bind` answers BindComplete itself and keeps the portal for "
    "`_end_across`), but the backend of the last statement (`s1`) stays attached, so the "
    "hot path of `Session._messages` forwards the following Describe (portal) and "
    "Execute to it verbatim. There the unnamed portal is the previous statement's, already "
    "run: PostgreSQL answers `portal \"\" cannot be run`, the two-phase commit never starts, "
    "and pgbench aborts the client. Nothing is committed (no history rows on the shards, "
    "nothing left prepared). The simple protocol's END takes the other path and commits. "
    "pgfleet was not changed.")
PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


@dataclass
class TpcbRun(Run):
    processed: int = 0
    pooler_cpu: float | None = None  # % of one core used by the pooler in between, if any


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Data


def owned_branches(scale: int) -> dict[str, list[int]]:
    """shard -> the branches (bid 1..scale) that pgfleet's ``hash`` shard function places there."""
    owned: dict[str, list[int]] = {s: [] for s in SHARDS}
    for bid in range(1, scale + 1):
        owned[SHARDS[shard_of(bid, KEY_TYPE, len(SHARDS))]].append(bid)
    return owned


def pick(var: str, bids: list[int]) -> str:
    """pgbench lines that set ``:var`` to one of ``bids``, uniformly."""
    if len(bids) == 1:
        return f"\\set {var} {bids[0]}\n"
    cases = " ".join(f"WHEN :{var}_i = {i} THEN {b}" for i, b in enumerate(bids[:-1]))
    return (f"\\set {var}_i random(0, {len(bids) - 1})\n"
            f"\\set {var} CASE {cases} ELSE {bids[-1]} END\n")


def transfer_script(owned: dict[str, list[int]]) -> str:
    """--two-phase: move :delta from a branch of s0 (bid0) to a branch of s1 (bid1), TPC-B's
    statements for each, in one transaction. ``d0``/``d1`` carry the signs: in the simple
    protocol pgbench pastes a value into the text, and ``-:delta`` of a negative delta would
    read ``--42``, a comment."""
    empty = [s for s in SHARDS if not owned[s]]
    if empty:
        raise BenchError(f"--two-phase needs a branch on every shard, and {', '.join(empty)} owns "
                         f"none at this scale (branches: {owned}); use a larger --scale")
    out = [pick("bid0", owned[SHARDS[0]]), pick("bid1", owned[SHARDS[1]])]
    for n in ("0", "1"):
        out.append(f"\\set aid{n} (:bid{n} - 1) * 100000 + random(1, 100000)\n"
                   f"\\set tid{n} (:bid{n} - 1) * 10 + random(1, 10)\n")
    out.append("\\set delta random(-5000, 5000)\n\\set d0 -:delta\n\\set d1 :delta\nBEGIN;\n")
    for n in ("0", "1"):
        out.append(
            f"UPDATE pgbench_accounts SET abalance = abalance + :d{n} "
            f"WHERE aid = :aid{n} AND bid = :bid{n};\n"
            f"SELECT abalance FROM pgbench_accounts WHERE aid = :aid{n} AND bid = :bid{n};\n"
            f"UPDATE pgbench_tellers SET tbalance = tbalance + :d{n} "
            f"WHERE tid = :tid{n} AND bid = :bid{n};\n"
            f"UPDATE pgbench_branches SET bbalance = bbalance + :d{n} WHERE bid = :bid{n};\n"
            f"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            f"VALUES (:tid{n}, :bid{n}, :aid{n}, :d{n}, CURRENT_TIMESTAMP);\n")
    out.append("END;\n")
    return "".join(out)


def load(cluster: Cluster, scale: int, direct: Target) -> dict[str, list[int]]:
    """pgbench -i into ``single``; the same tables on the shards, each row where shard_of says."""
    say(f"pgbench -i -s {scale} into {SINGLE} ...")
    owned = owned_branches(scale)
    for db in (SINGLE, *SHARDS):
        cluster.create_database(db)
    steps = {SINGLE: "dtgvp"}  # drop, tables, generate (client side), vacuum, primary keys
    steps.update({s: "dt" for s in SHARDS})  # the shards: empty tables, filled below
    for db, step in steps.items():
        r = subprocess.run(["pgbench", "-i", "-q", "-I", step, "-s", str(scale),
                            *direct.conn_args(), db], env=direct.env(), capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise BenchError(f"pgbench -i -I {step} on {db} failed: {last_line(r.stderr)}")
    with psycopg.connect(cluster.dsn(SINGLE), autocommit=True) as src:
        for shard, bids in owned.items():
            say(f"  {shard}: bid {', '.join(map(str, bids)) or '(none)'}")
            if not bids:
                continue
            with psycopg.connect(cluster.dsn(shard), autocommit=True) as dst:
                in_list = ",".join(map(str, bids))
                for table in TABLES:  # the same columns in the same order: pgbench made both
                    with (src.cursor().copy(f"COPY (SELECT * FROM {table} WHERE bid IN "
                                            f"({in_list})) TO STDOUT") as out,
                          dst.cursor().copy(f"COPY {table} FROM STDIN") as into):
                        for block in out:
                            into.write(block)
    for shard in SHARDS:
        r = subprocess.run(["pgbench", "-i", "-q", "-I", "vp", *direct.conn_args(), shard],
                           env=direct.env(), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise BenchError(f"pgbench -i -I vp on {shard} failed: {last_line(r.stderr)}")
    check_layout(cluster, owned)
    return owned


def counts_and_bids(cluster: Cluster, db: str) -> dict[str, tuple[int, list[int]]]:
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        return {t: (conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0],  # type: ignore[index]
                    [r[0] for r in conn.execute(f"SELECT DISTINCT bid FROM {t} ORDER BY 1")])
                for t in TABLES}


def check_layout(cluster: Cluster, owned: dict[str, list[int]]) -> None:
    single = counts_and_bids(cluster, SINGLE)
    shards = {s: counts_and_bids(cluster, s) for s in SHARDS}
    for table in TABLES:
        total = sum(shards[s][table][0] for s in SHARDS)
        if total != single[table][0]:
            raise BenchError(f"{table}: the shards hold {total} rows, {SINGLE} {single[table][0]}")
        for s in SHARDS:
            stray = [b for b in shards[s][table][1] if b not in owned[s]]
            if stray:
                raise BenchError(f"{s}.{table} holds bid {stray}, which shard_of places elsewhere")
    say("  row counts: " + ", ".join(
        f"{t} {single[t][0]:,} = " + " + ".join(f"{shards[s][t][0]:,}" for s in SHARDS)
        for t in TABLES))


@dataclass
class Sums:
    db: str
    accounts: int
    tellers: int
    branches: int
    history: int
    history_rows: int
    misplaced: str = ""  # rows on a shard that shard_of places elsewhere

    @property
    def consistent(self) -> bool:
        return self.accounts == self.tellers == self.branches == self.history


def sums(cluster: Cluster, db: str, owned: list[int] | None) -> Sums:
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        def one(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]

        s = Sums(db, one("SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts"),
                 one("SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers"),
                 one("SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches"),
                 one("SELECT coalesce(sum(delta), 0) FROM pgbench_history"),
                 one("SELECT count(*) FROM pgbench_history"))
        if owned is not None:
            bids = [r[0] for r in conn.execute("SELECT DISTINCT bid FROM pgbench_history")]
            stray = sorted(b for b in bids if b not in owned)
            if stray:
                s.misplaced = f"history rows with bid {stray}"
    return s


def delta_counts(cluster: Cluster, db: str, bids: list[int] | None = None) -> Counter[int]:
    """delta -> how many history rows of ``db`` (of branches ``bids``, else all) carry it."""
    where = f" WHERE bid IN ({','.join(map(str, bids))})" if bids is not None else ""
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        return Counter({int(d): int(n) for d, n in conn.execute(
            f"SELECT delta, count(*) FROM pgbench_history{where} GROUP BY delta")})


def unpaired(out: Counter[int], into: Counter[int]) -> int:
    """History rows left over when each ``-delta`` row of ``out`` is matched with a ``+delta``
    row of ``into`` (0: every transfer left one row on each side)."""
    negated = Counter({-d: n for d, n in out.items()})
    return sum(((negated - into) + (into - negated)).values())


@dataclass
class Leftovers:
    prepared: list[str]  # "gid (database)" still in pg_prepared_xacts
    decisions: int | None  # rows in pgfleet.twophase; None: the table could not be read
    error: str
    waited: float  # seconds after the last run until both were empty (or the limit)


def twophase_leftovers(cluster: Cluster, limit: float = 5.0) -> Leftovers:
    """Poll pg_prepared_xacts (the whole cluster) and pgfleet.twophase (in the default database)
    until both are empty or ``limit`` s have passed: pgfleet deletes a finished decision about
    a second after its COMMIT PREPARED (twophase.FORGET_INTERVAL)."""
    t0 = time.monotonic()
    while True:
        found = Leftovers([], None, "", 0.0)
        with psycopg.connect(cluster.dsn(SHARDS[0]), autocommit=True) as conn:
            found.prepared = [f"{gid} ({db})" for gid, db in conn.execute(
                "SELECT gid, database FROM pg_prepared_xacts ORDER BY prepared")]
            try:
                found.decisions = int(conn.execute(
                    "SELECT count(*) FROM pgfleet.twophase").fetchone()[0])  # type: ignore[index]
            except psycopg.Error as exc:
                found.error = str(exc).strip().splitlines()[0]
        found.waited = time.monotonic() - t0
        if (not found.prepared and found.decisions == 0) or found.waited >= limit:
            return found
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------
# pgfleet


def start_pgfleet(workdir: Path, cluster: Cluster, pool_size: int, python: str,
                  two_phase: bool = False) -> tuple[subprocess.Popen[bytes], Path, int]:
    port = free_port()

    def dsn(db: str) -> str:
        return cluster.dsn(db) + "?sslmode=disable"  # loopback: no TLS on the backends

    config = {
        "listen": {"host": HOST, "port": port, "database": FLEET_DB},
        "pool": {"mode": "transaction", "size": pool_size},
        "databases": {db: {"dsn": dsn(db)} for db in (*SHARDS, SINGLE)},
        "default_database": SHARDS[0],
        "sharding": {"shards": list(SHARDS), "function": "hash",
                     "tables": {t: "bid" for t in TABLES}},
        "keys": [{"id": KEY_ID, "secret": KEY_SECRET, "role": "server"}],
    }
    if two_phase:
        config["two_phase_commit"] = True  # its log, pgfleet.twophase, goes into s0
    cfg = workdir / "pgfleet.yaml"
    cfg.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    log = workdir / "pgfleet.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, "-m", "proxy", "run", "--config", str(cfg)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # pc.LABEL names this target "pgfleet" in wait_ready's messages.
        wait_ready(Target("pgfleet", port, KEY_ID, KEY_SECRET, FLEET_DB), proc, log)
    except BaseException:
        stop_process(proc, "pgfleet")
        raise
    return proc, log, port


def find_pgbouncer(build: bool) -> tuple[str, str, tuple[int, ...]] | str:
    """A PgBouncer >= 1.21 (prepared statements in transaction pooling), or why there is none."""
    found = pc.pgbouncer_version()
    if found and found[2] >= (1, 21):
        return found
    cached = pc.cached_pgbouncer()
    if cached and cached[2] >= pc.PGB_MIN_VERSION:
        return cached
    if not build:
        have = f"only {found[1]} on PATH" if found else "none on PATH"
        return (f"no PgBouncer >= 1.21 ({have}, no build under .pgfleet/build); "
                "--build-pgbouncer builds one (a few minutes)")
    try:
        return pc.build_pgbouncer()
    except BenchError as exc:
        return f"building PgBouncer failed: {exc}"


# ---------------------------------------------------------------------------------------------
# pgbench


def pgbench(target: Target, key: str, script: Path, args: argparse.Namespace, duration: int,
            rnd: int, pooler_pid: int | None = None) -> TpcbRun:
    run = TpcbRun(key, args.protocol, args.clients, rnd)
    cpu0, t0 = cpu_seconds(pooler_pid), time.monotonic()
    argv = ["pgbench", "-n", "-f", str(script), "-D", f"scale={args.scale}",
            "-M", args.protocol, "-c", str(args.clients), "-j", str(min(2, args.clients)),
            "-T", str(duration), *target.conn_args(), target.dbname]
    try:
        r = subprocess.run(argv, env=target.env(), capture_output=True, text=True, check=False,
                           timeout=duration + 60)
    except subprocess.TimeoutExpired:
        run.rc = -1
        run.errors.append(f"pgbench did not finish within {duration + 60}s (hung)")
        return run
    cpu1 = cpu_seconds(pooler_pid)
    if cpu0 is not None and cpu1 is not None:
        run.pooler_cpu = 100 * (cpu1 - cpu0) / (time.monotonic() - t0)
    pc.read_pgbench(run, r)
    m = PROCESSED_RE.search(r.stdout)
    run.processed = int(m.group(1)) if m else 0
    return run


# ---------------------------------------------------------------------------------------------
# Report


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians(runs: list[TpcbRun], keys: list[str]) -> tuple[dict[str, float | None],
                                                           dict[str, float | None]]:
    """target -> median TPS, target -> median latency (ms), over the measured rounds' good runs."""
    measured = [r for r in runs if r.round >= 0 and r.ok]
    tps = {k: median([r.tps for r in measured if r.target == k and r.tps is not None])
           for k in keys}
    lat = {k: median([r.latency_ms for r in measured
                      if r.target == k and r.latency_ms is not None]) for k in keys}
    return tps, lat


def results_table(keys: list[str], runs: list[TpcbRun], skipped: dict[str, str]) -> list[str]:
    tps, lat = medians(runs, keys)
    measured = [r for r in runs if r.round >= 0]
    out = [("Median over the rounds of pgbench's TPS (without initial connection time) and of "
            "its average latency. A `!` marks a target with at least one failed run (see "
            "Errors); its median is over the runs that succeeded. *pooler CPU*: the median "
            "CPU time of the pgfleet (or PgBouncer) process during a run, in % of one core "
            "(one Python process: 100% is its limit)."), "",
           ("| target | median TPS | median latency ms | TPS per round | vs direct | "
            "pooler CPU |"),
           "|---|--:|--:|---|--:|--:|"]
    for k in keys:
        rs = sorted((r for r in measured if r.target == k), key=lambda r: r.round)
        if k in skipped and not rs:
            out.append(f"| {LABEL[k]} | n/a | n/a | {skipped[k]} | n/a | |")
            continue
        mark = "!" if any(not r.ok for r in rs) else ""
        per = ", ".join(fmt_tps(r.tps) if r.ok else f"err ({r.processed:,} tx)" for r in rs)
        cpu = median([r.pooler_cpu for r in rs if r.pooler_cpu is not None])
        out.append(f"| {LABEL[k]} | {fmt_tps(tps[k])}{mark} | "
                   f"{f'{lat[k]:.3f}' if lat[k] is not None else 'n/a'} | {per} | "
                   f"{fmt_ratio(tps[k], tps['direct'])} | "
                   f"{f'{cpu:.0f}%' if cpu is not None else ''} |")
    return out


def errors_section(runs: list[TpcbRun], log_lines: list[str], join_note: str,
                   portal_note: str = "") -> list[str]:
    errors = [r for r in runs if r.errors]
    out = ["## Errors", ""]
    if not errors:
        out.append("Every pgbench run finished without an error or failed transaction.")
    for r in errors:
        # One line per distinct message, "client N" for the client's number.
        lines: dict[str, int] = {}
        for line in r.errors:
            key = re.sub(r"\bclient \d+", "client N", line)
            lines[key] = lines.get(key, 0) + 1
        which = "warm-up" if r.round < 0 else f"round {r.round + 1}"
        out.append(f"- {LABEL[r.target]}, {which} (pgbench exit {r.rc}; {r.processed:,} "
                   "transactions processed before that):")
        out += [f"  - `{line}`" + (f" ({n}×)" if n > 1 else "") for line, n in lines.items()]
    if join_note and any("cannot join it" in line for r in errors for line in r.errors):
        out += ["", join_note]
    if portal_note and any('portal "" cannot be run' in line for r in errors for line in r.errors):
        out += ["", portal_note]
    out.append("")
    if log_lines:
        out += ["pgfleet's log (warnings and errors, distinct, with counts):", "", "```",
                *log_lines, "```"]
    else:
        out.append("pgfleet's log has no warning or error.")
    return out


def invariant_table(checks: list[tuple[str, Sums]], processed: dict[str, int]) -> list[str]:
    """One row per database: the four sums, history rows against the rows pgbench's processed
    transactions should have written (``processed``: database -> rows), and a verdict."""
    out = [("| database | written by | Σ abalance | Σ tbalance | Σ bbalance | Σ delta | "
            "history rows | expected rows | verdict |"),
           "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for writers, s in checks:
        expect = processed.get(s.db)
        verdict = "consistent" if s.consistent else "**INCONSISTENT**"
        if s.misplaced:
            verdict += f"; **misplaced**: {s.misplaced}"
        if expect is not None and expect != s.history_rows:
            verdict += f"; history rows differ from pgbench's count by {s.history_rows - expect:+,}"
        out.append(f"| {s.db} | {writers} | {s.accounts:,} | {s.tellers:,} | {s.branches:,} | "
                   f"{s.history:,} | {s.history_rows:,} | "
                   f"{f'{expect:,}' if expect is not None else ''} | {verdict} |")
    return out


def build_report(info: dict[str, str], args: argparse.Namespace, keys: list[str],
                 runs: list[TpcbRun], skipped: dict[str, str], checks: list[tuple[str, Sums]],
                 processed: dict[str, int], log_lines: list[str]) -> str:
    tps, _ = medians(runs, keys)
    out = [f"# TPC-B-like through pgfleet: 2 shards vs one database ({info['date']})", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    out += ["", "## Method", "",
            (f"One PostgreSQL cluster (fsync off) holds database `{SINGLE}` "
             f"(`pgbench -i -s {args.scale}`: {args.scale} branches, {args.scale * 10} tellers, "
             f"{args.scale * 100_000:,} accounts) and the shards `s0`, `s1`: the same four "
             "tables, each row on the shard that pgfleet's `hash` shard function "
             f"(`shard_of(bid, \"{KEY_TYPE}\", 2)`, = `PARTITION BY HASH (bid)`) gives its `bid`, "
             f"copied from `{SINGLE}` and checked (row counts add up, no row on the wrong shard). "
             "pgfleet: `pool: {mode: transaction, size: "
             f"{args.pool_size}}}`, `sharding: {{shards: [s0, s1], tables: {{pgbench_branches: bid, "
             "pgbench_tellers: bid, pgbench_accounts: bid, pgbench_history: bid}}`, "
             f"`{SINGLE}` also in `databases`, backend dsns with `sslmode=disable`; clients log in "
             "with a server key."),
            "",
            ("Targets: **direct** = pgbench connects to the cluster, database `single`; "
             "**pgfleet → single** = pgbench connects to pgfleet's database `single` (no "
             "sharding: the proxy's own cost); **pgfleet, 2 shards** = pgbench connects to the "
             "fleet database, every statement is routed by its `bid`; **PgBouncer → single** "
             f"(transaction pooling, pool size {args.pool_size}) where available. "
             "Direct, pgfleet → single and PgBouncer share database `single`; pgfleet, 2 shards "
             "writes `s0` + `s1`."),
            "",
            (f"`pgbench -n -f tpcb-sharded.sql -D scale={args.scale} -M {args.protocol} "
             f"-c {args.clients} -j {min(2, args.clients)} -T {args.duration}` per target and "
             f"round, {args.rounds} rounds, the target order rotating every round, "
             + (f"after a {args.warmup} s warm-up run per target (not counted, but its rows are "
                "in the consistency check). " if args.warmup else "no warm-up run. ")
             + "The built-in tpcb-like script updates accounts by `aid` alone, "
             "which through pgfleet would be a write on every shard inside a transaction "
             "(refused unless `two_phase_commit` is on; this run leaves it off); this script "
             "picks the branch first and names "
             "`bid` in every statement, so each transaction stays on one shard. "
             + (f"With {args.scale} branches and {args.clients} clients, transactions on the "
                "same branch wait for each other's branch-row lock on every target (TPC-B's "
                "usual contention at a small scale), so a pooler's added latency per statement "
                "also lengthens the time each lock is held. " if args.clients > 1 else "")
             + "The CPU is shared by pgbench, PostgreSQL and the pooler: read "
             "the ratios, not the TPS. `-D scale` is needed: with a custom script (`-f`) "
             "pgbench sets `:scale` to 1, not to the count of pgbench_branches (it counts them "
             "only for its built-in scripts)."),
            "",
            "```", SCRIPT.replace("\\\n", "").rstrip(), "```", ""]

    out += ["## Results", "", *results_table(keys, runs, skipped)]
    out += ["", "| ratio of median TPS | value |", "|---|--:|",
            (f"| pgfleet, 2 shards / direct single database | "
            f"{fmt_ratio(tps['fleet_sharded'], tps['direct'])} |"),
            (f"| pgfleet → single / direct single database | "
            f"{fmt_ratio(tps['fleet_single'], tps['direct'])} |"),
            (f"| pgfleet, 2 shards / pgfleet → single (the cost of sharding in the proxy) | "
            f"{fmt_ratio(tps['fleet_sharded'], tps['fleet_single'])} |")]
    if "pgbouncer" in keys:
        out += [(f"| pgfleet → single / PgBouncer → single | "
                f"{fmt_ratio(tps['fleet_single'], tps.get('pgbouncer'))} |"),
                (f"| PgBouncer → single / direct single database | "
                f"{fmt_ratio(tps.get('pgbouncer'), tps['direct'])} |")]
    out += ["", ("The 2PC variant (every transaction a transfer between branches of both "
                 "shards, pgfleet with `two_phase_commit: true`) is measured by "
                 "`tpcb_bench.py --two-phase`, results in `tpcb2pc-*.md`."), ""]

    out += ["## Consistency (TPC-B invariant)", "",
            ("After the runs, read directly from each database: sum(abalance) of "
             "pgbench_accounts = sum(tbalance) of pgbench_tellers = sum(bbalance) of "
             "pgbench_branches = sum(delta) of pgbench_history, each shard on its own (every "
             "transaction stays on one shard) and the two shards together. *history rows* is "
             "compared with the transactions pgbench reported as processed by the targets that "
             "wrote that database (warm-up included; *expected rows*)."), "",
            *invariant_table(checks, processed), ""]

    out += errors_section(runs, log_lines, JOIN_REFUSAL)
    return "\n".join(out) + "\n"


def build_report_2pc(info: dict[str, str], args: argparse.Namespace, keys: list[str],
                     runs: list[TpcbRun], skipped: dict[str, str], script: str,
                     checks: list[tuple[str, Sums]], processed: dict[str, int],
                     cross: list[tuple[str, str, bool]], log_lines: list[str]) -> str:
    tps, lat = medians(runs, keys)
    out = [f"# TPC-B-like transfers across 2 shards with two-phase commit ({info['date']})", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    out += ["", "## Method", "",
            (f"The data as in `tpcb_bench.py` without `--two-phase`: database `{SINGLE}` "
             f"(`pgbench -i -s {args.scale}`) and the shards `s0`, `s1` holding the same rows, "
             f"each on the shard that `shard_of(bid, \"{KEY_TYPE}\", 2)` gives its branch "
             "(checked). pgfleet: the same config (`pool: {mode: transaction, size: "
             f"{args.pool_size}}}`, all four tables sharded by `bid` over `s0`, `s1`, `{SINGLE}` a "
             "database of its own, default database `s0`) plus `two_phase_commit: true`. "
             f"The cluster runs with `max_prepared_transactions = {args.max_prepared}`."),
            "",
            ("Every transaction is a transfer of `:delta` from a branch `bid0` of `s0` to a "
             "branch `bid1` of `s1` (each drawn uniformly from the branches the shard owns): "
             "TPC-B's statements (account update, account read, teller update, branch update, "
             "history insert, each naming `bid`) for `bid0` with `-delta`, then the same for "
             "`bid1` with `+delta`, in one `BEGIN ... END`. Through pgfleet's fleet database the "
             "first half runs on `s0`, the second on `s1` (the transaction joins a backend of "
             "`s1`), and `END` commits in two phases: `PREPARE TRANSACTION` on both, the "
             "decision row into `pgfleet.twophase` of `s0`, `COMMIT PREPARED` on both (the row "
             "is deleted about a second later). Every transaction locks `bid0`'s rows before "
             "`bid1`'s, so transfers cannot deadlock each other."),
            "",
            ("Targets: **direct** = the same script on database `single` (one database, an "
             "ordinary commit); **pgfleet → single** = through pgfleet to its database `single` "
             "(no sharding, an ordinary commit: the proxy's own cost); **pgfleet, 2 shards, "
             "two-phase commit** = through pgfleet to the fleet database; **PgBouncer → single** "
             f"(transaction pooling, pool size {args.pool_size}) where available."),
            "",
            (f"`pgbench -n -f tpcb-2pc.sql -M {args.protocol} -c {args.clients} "
             f"-j {min(2, args.clients)} -T {args.duration}` per target and round, "
             f"{args.rounds} rounds, the target order rotating every round, "
             + (f"after a {args.warmup} s warm-up run per target (not counted, but its rows are "
                "in the consistency check). " if args.warmup else "no warm-up run. ")
             + (f"With {len(SHARDS)} shards owning few branches at scale {args.scale}, "
                f"{args.clients} clients contend for the branch rows on both sides of every "
                "transfer, on every target; a prepared transaction keeps its locks until its "
                "COMMIT PREPARED. " if args.clients > 1 else "")
             + "The CPU is shared by pgbench, PostgreSQL and the pooler: read the ratios, not "
             "the TPS. `d0`/`d1` carry the signs because in the simple protocol pgbench pastes "
             "values into the text, where `-:delta` of a negative delta would read `--42`, "
             "a comment."),
            "",
            "```", script.rstrip(), "```", ""]

    out += ["## Results", "", *results_table(keys, runs, skipped)]
    out += ["", "| ratio of median TPS | value |", "|---|--:|",
            (f"| pgfleet, 2 shards with 2PC / direct single database | "
             f"{fmt_ratio(tps['fleet_2pc'], tps['direct'])} |"),
            (f"| pgfleet → single / direct single database | "
             f"{fmt_ratio(tps['fleet_single'], tps['direct'])} |"),
            (f"| pgfleet, 2 shards with 2PC / pgfleet → single (the cost of the second database "
             f"and the two-phase commit) | {fmt_ratio(tps['fleet_2pc'], tps['fleet_single'])} |")]
    if "pgbouncer" in keys:
        out += [(f"| pgfleet → single / PgBouncer → single | "
                 f"{fmt_ratio(tps['fleet_single'], tps.get('pgbouncer'))} |"),
                (f"| PgBouncer → single / direct single database | "
                 f"{fmt_ratio(tps.get('pgbouncer'), tps['direct'])} |")]
    l2, l1, l0 = lat.get("fleet_2pc"), lat.get("fleet_single"), lat.get("direct")
    if l2 is not None and l1 is not None and l0 is not None:
        out += ["", (f"**Per transaction** (pgbench's average latency, {args.clients} clients): "
                     f"{l0:.3f} ms direct, {l1:.3f} ms through pgfleet → single, {l2:.3f} ms "
                     f"through pgfleet with 2PC: two-phase commit over 2 shards costs "
                     f"{l2 - l1:+.3f} ms ({l2 / l1:.2f}×) over pgfleet on one database, "
                     f"{l2 - l0:+.3f} ms ({l2 / l0:.2f}×) over direct. Under this contention "
                     "the latency includes the waits for the branch rows' locks, which a "
                     "prepared transaction holds until its COMMIT PREPARED, so the difference "
                     "is more than the extra round trips alone (PREPARE TRANSACTION on 2 "
                     "databases, the decision row's INSERT and commit, COMMIT PREPARED on 2).")]
    out.append("")

    out += ["## Consistency", "",
            ("Read directly from each database after the runs (pgfleet still running). "
             "Per database, TPC-B's invariant: sum(abalance) = sum(tbalance) = sum(bbalance) = "
             "sum(delta) of pgbench_history. *expected rows*: each transaction pgbench reported "
             f"as processed (warm-up included) wrote 2 history rows in `{SINGLE}` and one in "
             "each shard."), "",
            *invariant_table(checks, processed), "",
            "Across the shards (the two-phase commit's atomicity) and leftovers:", "",
            "| check | value | verdict |", "|---|---|---|"]
    out += [f"| {what} | {value} | {'ok' if ok else '**FAILED**'} |" for what, value, ok in cross]
    out.append("")

    out += errors_section(runs, log_lines, JOIN_REFUSAL, END_PORTAL)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=4, help="pgbench -i -s (default 4)")
    p.add_argument("--clients", type=int, default=10, help="pgbench -c (default 10)")
    p.add_argument("--duration", type=int, default=10, help="pgbench -T per run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up run per target, s (default 2)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simple",
                   help="pgbench -M (default simple)")
    p.add_argument("--pool-size", type=int, default=20, help="pgfleet and PgBouncer pool size")
    p.add_argument("--no-pgbouncer", action="store_true", help="do not measure PgBouncer")
    p.add_argument("--build-pgbouncer", action="store_true",
                   help="build PgBouncer from Debian's source package (apt-get source, as "
                        "pgbench_compare.py does) when none >= 1.21 is found; without it "
                        "PgBouncer is skipped then")
    p.add_argument("--two-phase", action="store_true",
                   help="the 2PC variant: pgfleet with two_phase_commit: true, every transaction "
                        "a transfer between a branch of s0 and one of s1 (results in "
                        "tpcb2pc-*.md)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if min(args.scale, args.clients, args.duration, args.rounds) < 1 or args.warmup < 0:
        p.error("--scale, --clients, --duration and --rounds must be >= 1")
    # Each client has at most 2 prepared transactions at a time (one per shard) in --two-phase.
    args.max_prepared = max(int(DEFAULT_SETTINGS["max_prepared_transactions"]),
                            2 * args.clients + 10)
    return args


def git_commit() -> str:
    def git(*a: str) -> str:
        r = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *a],
                           capture_output=True, text=True, check=False)
        return r.stdout.strip()

    try:
        rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "proxy")
    except OSError:
        return "?"
    return (rev or "?") + (" + uncommitted changes under proxy/" if dirty else "")


def say_sums(s: Sums) -> None:
    say(f"consistency {s.db}: accounts {s.accounts:,} tellers {s.tellers:,} branches "
        f"{s.branches:,} history {s.history:,} ({s.history_rows:,} rows) -> "
        f"{'consistent' if s.consistent else 'INCONSISTENT'}"
        + (f", misplaced {s.misplaced}" if s.misplaced else ""))


def write_report(args: argparse.Namespace, name: str, started: dt.datetime, report: str) -> Path:
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"{name}-{started.strftime('%Y%m%d-%H%M')}.md"
    path.write_text(report)
    return path


def check_and_report(cluster: Cluster, owned: dict[str, list[int]], info: dict[str, str],
                     args: argparse.Namespace, keys: list[str], live: list[str],
                     runs: list[TpcbRun], skipped: dict[str, str],
                     fleet_proc: subprocess.Popen[bytes], fleet_log: Path,
                     started: dt.datetime) -> tuple[Path, str]:
    processed: dict[str, int] = {SINGLE: 0, "s0+s1": 0}
    for r in runs:
        processed[SINGLE if r.target != "fleet_sharded" else "s0+s1"] += r.processed
    single_writers = ", ".join(LABEL[k].split(" →")[0].split(",")[0]
                               for k in live if k != "fleet_sharded")
    checks: list[tuple[str, Sums]] = [(single_writers, sums(cluster, SINGLE, None))]
    shard_sums = [sums(cluster, s, owned[s]) for s in SHARDS]
    checks += [("pgfleet, 2 shards", s) for s in shard_sums]
    both = Sums("s0+s1", **{f: sum(getattr(s, f) for s in shard_sums)
                            for f in ("accounts", "tellers", "branches", "history",
                                      "history_rows")},
                misplaced="; ".join(f"{s.db}: {s.misplaced}" for s in shard_sums
                                    if s.misplaced))
    checks.append(("pgfleet, 2 shards", both))
    for _, s in checks:
        say_sums(s)
    stop_process(fleet_proc, "pgfleet")  # flush its log before reading it
    report = build_report(info, args, keys, runs, skipped, checks, processed,
                          pgfleet_log_problems(fleet_log))
    return write_report(args, "tpcb", started, report), report


def check_and_report_2pc(cluster: Cluster, owned: dict[str, list[int]], info: dict[str, str],
                         args: argparse.Namespace, keys: list[str], live: list[str],
                         runs: list[TpcbRun], skipped: dict[str, str], script: str,
                         left: Leftovers, fleet_proc: subprocess.Popen[bytes], fleet_log: Path,
                         started: dt.datetime) -> tuple[Path, str]:
    on_single = sum(r.processed for r in runs if r.target != "fleet_2pc")
    on_fleet = sum(r.processed for r in runs if r.target == "fleet_2pc")
    processed = {SINGLE: 2 * on_single, **{s: on_fleet for s in SHARDS}}
    single_writers = ", ".join(LABEL[k].split(" →")[0].split(",")[0]
                               for k in live if k != "fleet_2pc")
    checks: list[tuple[str, Sums]] = [(single_writers, sums(cluster, SINGLE, None))]
    shard_sums = [sums(cluster, s, owned[s]) for s in SHARDS]
    checks += [("pgfleet, 2 shards, 2PC", s) for s in shard_sums]
    for _, s in checks:
        say_sums(s)

    s0, s1 = shard_sums
    pairs_fleet = unpaired(delta_counts(cluster, SHARDS[0]), delta_counts(cluster, SHARDS[1]))
    pairs_single = unpaired(delta_counts(cluster, SINGLE, owned[SHARDS[0]]),
                            delta_counts(cluster, SINGLE, owned[SHARDS[1]]))
    if left.decisions is None:
        decisions = (f"not readable: {left.error}", False)
    else:
        decisions = (f"{left.decisions} row(s)", left.decisions == 0)
    waited = f"after {left.waited:.1f} s"
    cross: list[tuple[str, str, bool]] = [
        ("Σ delta of history, s0 + s1 (every transfer -delta on s0, +delta on s1)",
         f"{s0.history:,} + {s1.history:,} = {s0.history + s1.history:,}",
         s0.history + s1.history == 0),
        ("Σ balances, s0 + s1 (accounts, tellers, branches)",
         (f"{s0.accounts + s1.accounts:,}, {s0.tellers + s1.tellers:,}, "
          f"{s0.branches + s1.branches:,}"),
         s0.accounts + s1.accounts == s0.tellers + s1.tellers == s0.branches + s1.branches == 0),
        ("history rows on s0 = on s1 (one on each per committed transaction)",
         f"{s0.history_rows:,} / {s1.history_rows:,}", s0.history_rows == s1.history_rows),
        ("history rows on each shard = transactions pgbench processed through the fleet",
         f"{on_fleet:,}", s0.history_rows == s1.history_rows == on_fleet),
        ("deltas pair up: s0's history deltas negated = s1's, as multisets (rows unmatched)",
         f"{pairs_fleet:,}", pairs_fleet == 0),
        (f"the same in `{SINGLE}`: deltas of s0's branches negated = those of s1's branches",
         f"{pairs_single:,} unmatched", pairs_single == 0),
        ("`pg_prepared_xacts` (whole cluster) empty", f"{len(left.prepared)} {waited}"
         + (f": {', '.join(left.prepared[:5])}" if left.prepared else ""), not left.prepared),
        ("`pgfleet.twophase` in s0 empty", f"{decisions[0]} {waited}", decisions[1]),
    ]
    for what, value, ok in cross:
        say(f"check: {what}: {value} -> {'ok' if ok else 'FAILED'}")
    stop_process(fleet_proc, "pgfleet")  # flush its log before reading it
    report = build_report_2pc(info, args, keys, runs, skipped, script, checks, processed, cross,
                              pgfleet_log_problems(fleet_log))
    return write_report(args, "tpcb2pc", started, report), report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    for tool in ("pgbench", "psql"):
        if shutil.which(tool) is None:
            warn(f"{tool} not found: apt-get install postgresql-client")
            return 1
    started = dt.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="pgfleet-tpcb-"))
    cluster: Cluster | None = None
    fleet_proc = bouncer_proc = None
    fleet_log: Path | None = None
    runs: list[TpcbRun] = []
    skipped: dict[str, str] = {}
    try:
        say(f"work directory {workdir}")
        cluster = Cluster("tpcb", workdir / "pg", password=PG_PASSWORD,
                          settings={"max_connections": "300",
                                    "max_prepared_transactions": str(args.max_prepared)})
        cluster.start()
        pgb_version: str | None = None
        pgb = None if args.no_pgbouncer else find_pgbouncer(args.build_pgbouncer)
        if isinstance(pgb, tuple):
            pgb_version = pgb[1]
        info = machine_info(cluster, pgb_version, python)
        info["pgfleet"] += f" at {git_commit()}"
        direct = Target("direct", cluster.port, "postgres", PG_PASSWORD, SINGLE)
        two_phase = args.two_phase
        fleet_key = "fleet_2pc" if two_phase else "fleet_sharded"
        # --two-phase: the script needs a branch on each shard; fail before loading if not.
        script_text = transfer_script(owned_branches(args.scale)) if two_phase else SCRIPT
        t0 = time.monotonic()
        owned = load(cluster, args.scale, direct)
        say(f"loaded and checked in {time.monotonic() - t0:.0f} s")
        script = workdir / ("tpcb-2pc.sql" if two_phase else "tpcb-sharded.sql")
        script.write_text(script_text)

        targets: dict[str, Target] = {"direct": direct}
        fleet_proc, fleet_log, fleet_port = start_pgfleet(workdir, cluster, args.pool_size,
                                                          python, two_phase)
        targets["fleet_single"] = Target("pgfleet", fleet_port, KEY_ID, KEY_SECRET, SINGLE)
        targets[fleet_key] = Target("pgfleet", fleet_port, KEY_ID, KEY_SECRET, FLEET_DB)
        say(f"pgfleet on {HOST}:{fleet_port} (pid {fleet_proc.pid})"
            + (", two_phase_commit: true" if two_phase else ""))
        keys = ["direct", "fleet_single", fleet_key]
        if args.no_pgbouncer:
            skipped["pgbouncer"] = "--no-pgbouncer"
        elif isinstance(pgb, str):
            skipped["pgbouncer"] = pgb
        else:
            assert pgb is not None
            pc.BENCH_DB = SINGLE  # start_pgbouncer's [databases] entry and target database
            try:
                bouncer_proc, targets["pgbouncer"], _ = pc.start_pgbouncer(
                    workdir, cluster.port, args.pool_size, pgb[0], pgb[2])
                say(f"PgBouncer {pgb[1]} on {HOST}:{targets['pgbouncer'].port}")
            except BenchError as exc:
                skipped["pgbouncer"] = f"PgBouncer did not start: {exc}"
        if "pgbouncer" in skipped:
            say(f"PgBouncer not measured: {skipped['pgbouncer']}")
        keys.append("pgbouncer")

        info.update({
            "date": started.strftime("%Y-%m-%d %H:%M"),
            "command": "benchmarks/tpcb_bench.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "scale": str(args.scale),
            "clients": f"{args.clients} (pgbench -j {min(2, args.clients)})",
            "protocol": f"-M {args.protocol}",
            "duration": f"{args.duration} s per run",
            "rounds": str(args.rounds),
        })
        if two_phase:
            info["variant"] = ("--two-phase: transfers between a branch of s0 and one of s1; "
                               "pgfleet with two_phase_commit: true")

        live = [k for k in keys if k in targets]
        pid = {"fleet_single": fleet_proc.pid, fleet_key: fleet_proc.pid,
               "pgbouncer": bouncer_proc.pid if bouncer_proc is not None else None}
        for k in live:
            if args.warmup:
                run = pgbench(targets[k], k, script, args, args.warmup, -1, pid.get(k))
                runs.append(run)
                flag = f"  ERROR: {run.errors[0]}" if run.errors else ""
                say(f"warm-up {LABEL[k]:<34} {fmt_tps(run.tps):>8} tps{flag}")
        total, done = args.rounds * len(live), 0
        for rnd in range(args.rounds):
            k0 = rnd % len(live)
            for k in live[k0:] + live[:k0]:
                run = pgbench(targets[k], k, script, args, args.duration, rnd, pid.get(k))
                runs.append(run)
                done += 1
                flag = f"  ERROR: {run.errors[0]}" if run.errors else ""
                cpu = f" pooler {run.pooler_cpu:3.0f}% CPU" if run.pooler_cpu is not None else ""
                say(f"[{done:>2}/{total}] round {rnd + 1} {LABEL[k]:<34} "
                    f"{fmt_tps(run.tps):>8} tps {run.latency_ms or 0:8.3f} ms{cpu}{flag}")
                if fleet_proc.poll() is not None:
                    raise BenchError(f"pgfleet exited with code {fleet_proc.returncode}: "
                                     f"{last_line(fleet_log.read_text(errors='replace'))}")
        info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        busy = float(info["load average at start"].split()[0])
        if busy > 1.0:
            info["note"] = (f"the machine was not idle before the run (1-min load {busy:.2f} on "
                            f"{os.cpu_count()} cores): other processes shared the CPU")
        info["finished"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")

        # -- consistency, read directly from the databases -----------------------------------
        if two_phase:
            # pgfleet still runs: it deletes a finished decision row about a second later.
            left = twophase_leftovers(cluster)
            path, report = check_and_report_2pc(cluster, owned, info, args, keys, live, runs,
                                                skipped, script_text, left, fleet_proc,
                                                fleet_log, started)
        else:
            path, report = check_and_report(cluster, owned, info, args, keys, live, runs,
                                            skipped, fleet_proc, fleet_log, started)
        say("")
        say(report)
        say(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return 0
    except (BenchError, EmbeddedError, psycopg.Error) as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        warn("interrupted")
        return 130
    finally:
        stop_process(fleet_proc, "pgfleet")
        stop_process(bouncer_proc, "pgbouncer")
        pc.end_cluster(cluster, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
