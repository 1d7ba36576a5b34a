#!/usr/bin/env python3
"""The tenant directory (docs/directory.md): a tenant's first connection against an open
tenant's, and pgfleet's memory per known tenant and per open tenant pool, in one run.

One throw-away cluster (proxy/embedded.py, max_connections 400): a template database with
``marker(name text)``, owned by a login role ``tenant_owner``; ``--tenants`` tenant databases
``tenant_NNNN`` made from it (``CREATE DATABASE ... TEMPLATE``, ``--threads`` at a time), each
with one marker row, its own name; a ``registry`` database whose ``tenants`` table has
``--known`` rows, the role's password Fernet-encrypted (cryptography.fernet) in each: one per
real database, and the rest (``tenant_0300`` on) distinct names whose ``dbname`` is one of the
real ones, round robin (a known tenant is a cached row; 1,000 real databases take 7.5 GB and,
on this machine's disk, over 3 minutes). Each tenant database is connected to once while it is
set up, so that PostgreSQL's first connection to a new database (its relation cache file) is
paid before anything is timed.

**Latency** (a pgfleet with ``directory: {idle_timeout: 10m, cache_ttl: 10m}``, the real
tenants, a ``server`` key with ``databases: ["tenant_*"]``): ``--warm`` tenants
are opened first; then, over ``--rounds`` rounds, each remaining tenant once, interleaved
(order rotating per step) with

* **(a) cold**: psycopg connects to a tenant never opened yet and runs ``select name from
  marker``: registry lookup, pool opened, backend login;
* **(b) open**: the same to one of the warm tenants, whose pool is open (its row cached, an
  idle backend in its pool);
* **(c) direct**: the same straight to PostgreSQL, SCRAM as ``tenant_owner``, for reference.

Connect and statement are timed apart. pgfleet takes a backend at the client's login (it
checks the startup settings and reports the server's ParameterStatus), so the whole cost of a
cold tenant is in the connect; the first statement then finds the pool open. The client's own
SCRAM login to pgfleet is in both (a) and (b), so (a) - (b) is what lookup + pool + backend
login cost.

**Memory** (a second pgfleet, ``idle_timeout: 1s``, every tenant): VmRSS at start, after
``--known`` tenants were connected to once each (rows cached, their pools closed again:
SHOW TENANTS says so before RSS is read), after a second pass over the same tenants (their
pools opened and closed again: a pool that leaves something behind would grow it), then with
50 clients on one tenant, then with 50 clients on 50 tenants (50 pools, one backend each).

    .venv/bin/python benchmarks/directory_bench.py      # 300 databases, 1,000 known tenants (~3 min)
    .venv/bin/python benchmarks/directory_bench.py --tenants 1000   # every known tenant a database of its own
    .venv/bin/python benchmarks/directory_bench.py --tenants 80 --known 200 --rounds 2   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cryptography
import psycopg
from cryptography.fernet import Fernet
from pgbench_compare import (  # the shared helpers
    BenchError,
    cmd_first_line,
    end_cluster,
    pgfleet_log_problems,
    say,
    stop_process,
    tree_info,
)

from proxy.embedded import Cluster, free_port

HOST = "127.0.0.1"
KEY, SECRET = "bench", "bench-secret"
ADMIN, ADMIN_SECRET = "benchadmin", "benchadmin-secret"
ROLE, ROLE_PASSWORD = "tenant_owner", "tenant-pw"
TEMPLATE = "tenant_template"
SQL = "select name from marker"
REGISTRY_TABLE = ('CREATE TABLE tenants (name text PRIMARY KEY, host text, port int, dbname text, '
                  '"user" text, password text, dsn text)')
PG_SETTINGS = {"max_connections": "400"}


def tenant_names(n: int) -> list[str]:
    return [f"tenant_{i:04d}" for i in range(n)]


def dbname_of(tenant: str, databases: int) -> str:
    """The database of a registry row: its own for the first ``databases``, else a real one's."""
    return f"tenant_{int(tenant.removeprefix('tenant_')) % databases:04d}"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# ---------------------------------------------------------------------------------------------
# Setup


def make_tenants(cluster: Cluster, names: list[str], threads: int) -> float:
    """The tenant databases from the template, each with its marker row; seconds taken."""
    def make(chunk: list[str]) -> None:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            for name in chunk:
                admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} OWNER {ROLE}")
                with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
                    conn.execute("INSERT INTO marker VALUES (%s)", (name,))

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(make, [names[i::threads] for i in range(threads)]))
    return time.perf_counter() - started


def write_registry(cluster: Cluster, names: list[str], databases: int, key: str) -> None:
    cluster.create_database("registry")
    cluster.psql(REGISTRY_TABLE, "registry")
    fernet = Fernet(key)
    with psycopg.connect(cluster.dsn("registry"), autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO tenants (name, host, port, dbname, \"user\", password) "
                        "VALUES (%s, %s, %s, %s, %s, %s)",
                        [(name, HOST, cluster.port, dbname_of(name, databases), ROLE,
                          fernet.encrypt(ROLE_PASSWORD.encode()).decode()) for name in names])


# ---------------------------------------------------------------------------------------------
# pgfleet


class Fleet:
    def __init__(self, work: Path, cluster: Cluster, name: str, key: str, idle_timeout: str) -> None:
        self.cluster = cluster
        self.port = free_port()
        config = {
            "listen": {"host": HOST, "port": self.port, "database": "app"},
            "databases": {"registry": {"dsn": cluster.dsn("registry")}},
            "directory": {"registry": "registry", "table": "tenants", "encryption_key": key,
                          "idle_timeout": idle_timeout, "cache_ttl": "10m"},
            "keys": [{"id": KEY, "secret": SECRET, "role": "server", "databases": ["tenant_*"]},
                     {"id": ADMIN, "secret": ADMIN_SECRET, "role": "admin"}],
        }
        cfg = work / f"{name}.yaml"
        cfg.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
        self.log = work / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(cfg),
                                          "--log-level", "warning"], cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"pgfleet exited early; see {self.log}")
            try:
                self.tenants()
                return
            except BenchError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.2)

    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def connect(self, tenant: str) -> psycopg.Connection[tuple[str]]:
        return psycopg.connect(host=HOST, port=self.port, user=KEY, password=SECRET, dbname=tenant,
                               autocommit=True, connect_timeout=10)

    def tenants(self) -> list[list[str]]:
        """SHOW TENANTS on the admin console (psql: the simple protocol it speaks)."""
        r = subprocess.run([str(self.cluster.bindir / "psql"), "-X", "-A", "-t", "-F", "|", "-h", HOST, "-p",
                            str(self.port), "-U", ADMIN, "-d", "pgfleet", "-c", "SHOW TENANTS"],
                           env={**os.environ, "PGPASSWORD": ADMIN_SECRET, "PGCONNECT_TIMEOUT": "5"},
                           capture_output=True, text=True, check=False, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"SHOW TENANTS failed: {r.stderr.strip()[-300:]}")
        return [line.split("|") for line in r.stdout.splitlines() if line]

    def counts(self) -> tuple[int, int, int]:
        """Tenants known, pools open, backends in them (SHOW TENANTS)."""
        rows = self.tenants()
        return (len(rows), sum(row[5] == "open" for row in rows),
                sum(int(row[8] or 0) + int(row[9] or 0) for row in rows))

    def wait_closed(self, timeout: float = 30) -> tuple[int, int, int]:
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if counts[1] == 0 or time.monotonic() > deadline:
                return counts
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc, "pgfleet")


def timed(connect: Callable[[str], psycopg.Connection[tuple[str]]], tenant: str,
          dbname: str | None = None) -> tuple[float, float]:
    """(connect seconds, statement seconds) of one new client on ``tenant``; its answer checked
    (the marker row names ``dbname``, the tenant's database)."""
    started = time.perf_counter()
    conn = connect(tenant)
    connected = time.perf_counter()
    try:
        row = conn.execute(SQL).fetchone()
        done = time.perf_counter()
    finally:
        conn.close()
    if row is None or row[0] != (dbname or tenant):
        raise BenchError(f"{tenant}: marker says {row!r}")
    return connected - started, done - connected


# ---------------------------------------------------------------------------------------------
# The two parts


def latency(args: argparse.Namespace, cluster: Cluster, work: Path, key: str) -> dict[str, object]:
    names = tenant_names(args.tenants)
    warm, cold = names[:args.warm], names[args.warm:]
    fleet = Fleet(work, cluster, "latency", key, "10m")
    try:
        rss_start = fleet.rss()

        def direct(tenant: str) -> psycopg.Connection[tuple[str]]:
            return psycopg.connect(cluster.dsn(tenant, ROLE, ROLE_PASSWORD), autocommit=True, connect_timeout=10)

        paths = {"a": fleet.connect, "b": fleet.connect, "c": direct}
        for tenant in warm:
            timed(fleet.connect, tenant)
            timed(direct, tenant)
        samples: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
        per_round = -(-len(cold) // args.rounds)
        step = 0
        for rnd in range(args.rounds):
            for tenant in cold[rnd * per_round:(rnd + 1) * per_round]:
                other = warm[step % len(warm)]
                order = ["a", "b", "c"]
                order = order[step % 3:] + order[:step % 3]
                for path in order:
                    samples[path].append(timed(paths[path], tenant if path == "a" else other))
                step += 1
            say(f"round {rnd + 1}: " + ", ".join(
                f"{p} p50 {statistics.median(c + q for c, q in v[-per_round:]) * 1000:.2f} ms"
                for p, v in samples.items()))
        known, open_, backends = fleet.counts()
        rss_open = fleet.rss()
    finally:
        fleet.stop()
    if (known, open_) != (len(names), len(names)):
        raise BenchError(f"SHOW TENANTS: {known} known, {open_} open; expected {len(names)} of each")
    return {"samples": samples, "rss_start": rss_start, "rss_open": rss_open, "open": open_,
            "backends": backends, "log": fleet.log}


def memory(args: argparse.Namespace, cluster: Cluster, work: Path, key: str) -> dict[str, object]:
    names = tenant_names(args.known)
    fleet = Fleet(work, cluster, "memory", key, "1s")
    steps: list[tuple[str, int, tuple[int, int, int]]] = []
    held: list[psycopg.Connection[tuple[str]]] = []

    def step(label: str, counts: tuple[int, int, int]) -> None:
        time.sleep(0.5)
        steps.append((label, fleet.rss(), counts))
        say(f"{label}: RSS {steps[-1][1] / 1024:.1f} MB; known/open/backends {counts}")

    try:
        time.sleep(1)
        step("start", fleet.counts())
        warmup = 20
        connects = []
        for tenant in names[:warmup]:
            connects.append(timed(fleet.connect, tenant, dbname_of(tenant, args.tenants))[0])
        step(f"{warmup} tenants known, pools closed", fleet.wait_closed())
        started = time.perf_counter()
        for tenant in names[warmup:]:
            connects.append(timed(fleet.connect, tenant, dbname_of(tenant, args.tenants))[0])
        loop_seconds = time.perf_counter() - started
        step(f"{len(names):,} tenants known, pools closed", fleet.wait_closed())
        again = []
        for tenant in names:
            again.append(timed(fleet.connect, tenant, dbname_of(tenant, args.tenants))[0])
        step(f"the same {len(names):,} again (rows cached, pools opened and closed)", fleet.wait_closed())
        held = [fleet.connect(names[0]) for _ in range(50)]
        for conn in held:
            conn.execute(SQL)
        step("+ 50 clients on 1 tenant (1 pool)", fleet.counts())
        for conn in held:
            conn.close()
        held = []
        fleet.wait_closed()
        held = [fleet.connect(tenant) for tenant in names[1:51]]
        for conn in held:
            conn.execute(SQL)
        step("+ 50 clients on 50 tenants (50 pools)", fleet.counts())
    finally:
        for conn in held:
            conn.close()
        fleet.stop()
    return {"steps": steps, "connects": connects, "again": again, "loop_seconds": loop_seconds, "warmup": warmup,
            "log": fleet.log}


# ---------------------------------------------------------------------------------------------
# Report


def machine(cluster: Cluster) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    info = {
        "machine": f"{os.cpu_count()} × {cpu}, {platform.system()} {platform.release()}, "
                   f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "PostgreSQL": f"{cluster.psql('SHOW server_version')} (one cluster, max_connections "
                      f"{PG_SETTINGS['max_connections']}, fsync off)",
        "pgfleet": f"{cmd_first_line([sys.executable, '-m', 'proxy', '--version'], ROOT)}, {tree_info(ROOT)}",
        "python / psycopg / cryptography": f"{platform.python_version()} / {psycopg.__version__} "
                                           f"({psycopg.pq.__impl__}) / {cryptography.__version__}",
    }
    return [f"- {k}: {v}" for k, v in info.items()]


def report(args: argparse.Namespace, info: list[str], setup_seconds: float, lat: dict[str, object],
           mem: dict[str, object], stamp: str) -> list[str]:
    samples: dict[str, list[tuple[float, float]]] = lat["samples"]  # type: ignore[assignment]
    label = {"a": "(a) first client of a tenant not open", "b": "(b) a tenant whose pool is open",
             "c": "(c) direct to PostgreSQL (reference)"}
    lines = [f"# Tenant directory: first connection and memory ({stamp})", "", *info, "",
             (f"Setup: {args.tenants:,} tenant databases from a template (`CREATE DATABASE ... TEMPLATE`, "
              f"{args.threads} connections in parallel, each with its marker row inserted) in {setup_seconds:.1f} s; "
              f"a `registry` database with a `tenants` table of {args.known:,} rows, the password Fernet-encrypted"
              + (f": {args.tenants:,} for the real databases and {args.known - args.tenants:,} more with distinct "
                 f"names (`tenant_{args.tenants:04d}` on) whose `dbname` is one of the real ones (round robin)."
                 if args.known > args.tenants else ", one per database.")), "",
             "## (a) a tenant's first connection vs (b) an open tenant", "",
             (f"pgfleet with `directory: {{idle_timeout: 10m, cache_ttl: 10m}}` (pool_size 5, health.interval 30s), "
              f"the {args.tenants} real tenants; {args.warm} opened first, then the other {len(samples['a'])} once each "
              f"as (a), each step interleaved with (b) on a warm tenant and (c), the order rotating, in "
              f"{args.rounds} rounds. A new psycopg connection per sample (SCRAM, TCP on 127.0.0.1), then "
              f"`{SQL}`, its answer checked. Milliseconds:"), "",
             "| path | n | connect p50 | connect p95 | statement p50 | statement p95 | total p50 | total p95 |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    med: dict[str, float] = {}
    for path, values in samples.items():
        conn = [c * 1000 for c, _ in values]
        stmt = [q * 1000 for _, q in values]
        total = [c + q for c, q in zip(conn, stmt, strict=True)]
        med[path] = statistics.median(total)
        lines.append(f"| {label[path]} | {len(values)} | {statistics.median(conn):.2f} | {pct(conn, 0.95):.2f} | "
                     f"{statistics.median(stmt):.2f} | {pct(stmt, 0.95):.2f} | {med[path]:.2f} | "
                     f"{pct(total, 0.95):.2f} |")
    stmt_med = {path: statistics.median(q for _, q in values) * 1000 for path, values in samples.items()}
    a_c = statistics.median(c for c, _ in samples["a"]) * 1000
    b_c = statistics.median(c for c, _ in samples["b"]) * 1000
    lines += ["", (f"**(a) − (b): {med['a'] - med['b']:.2f} ms at the median** (connect alone: "
                   f"{a_c - b_c:.2f} ms): the registry lookup, opening the pool and the backend's login "
                   f"(SCRAM as the tenant's role). The client's own SCRAM login to pgfleet is in both. "
                   f"(b) − (c): {med['b'] - med['c']:+.2f} ms (an open tenant's client gets a backend that is "
                   f"already logged in; a direct connection starts a PostgreSQL backend and logs it in)."), "",
              ("pgfleet takes a backend from the tenant's pool while the client logs in (it checks the "
               "startup settings and reports the server's parameters), so the connect returns only once "
               "the lookup, the pool and the backend's login are done: the cost of a cold tenant is in "
               "the connect column. The first statement on the connected client then runs on a backend "
               f"that is there already; it takes {stmt_med['a']:.2f} ms at the median for (a), "
               f"{stmt_med['b']:.2f} ms for (b) (a backend that has run it before) and {stmt_med['c']:.2f} ms "
               "for (c) (a new backend too: PostgreSQL fills its catalog caches at a backend's first "
               "statement)."), "",
              (f"pgfleet's RSS in this run: {lat['rss_start'] / 1024:.1f} MB at start, "  # type: ignore[operator]
               f"{lat['rss_open'] / 1024:.1f} MB with {lat['open']} tenant pools open and no clients "  # type: ignore[operator]
               f"({lat['backends']} backends in them, each tenant's row cached): "
               f"{(lat['rss_open'] - lat['rss_start']) / lat['open']:.1f} KB per open pool "  # type: ignore[operator]
               "with its backend and row, in a process that had not had pools before."), ""]
    steps: list[tuple[str, int, tuple[int, int, int]]] = mem["steps"]  # type: ignore[assignment]
    connects: list[float] = mem["connects"]  # type: ignore[assignment]
    again: list[float] = mem["again"]  # type: ignore[assignment]
    warmup: int = mem["warmup"]  # type: ignore[assignment]
    lines += ["## Memory per known tenant and per open pool", "",
              (f"A second pgfleet with `directory: {{idle_timeout: 1s, cache_ttl: 10m}}`; {args.known:,} known "
               f"tenants ({args.tenants:,} databases), each connected to once, one after the other "
               f"({statistics.median(connects) * 1000:.2f} ms median connect, {pct(connects, 0.95) * 1000:.2f} ms p95; "
               f"{len(connects) - warmup:,} in {mem['loop_seconds']:.1f} s), then SHOW TENANTS polled until every "  # type: ignore[str-format]
               f"pool was closed again before VmRSS was read; then the same again (rows cached: "
               f"{statistics.median(again) * 1000:.2f} ms median connect, {pct(again, 0.95) * 1000:.2f} ms p95). The clients held are psycopg connections that ran the marker query "
               "(transaction pooling: each pool keeps its one backend idle)."), "",
              "| step | VmRSS MB | known | pools open | backends |", "|---|--:|--:|--:|--:|"]
    for name, rss, (known, open_, backends) in steps:
        lines.append(f"| {name} | {rss / 1024:.1f} | {known:,} | {open_} | {backends} |")
    start, warm_rss = steps[0][1], steps[1][1]
    known_rss, second, one, fifty = steps[2][1], steps[3][1], steps[4][1], steps[5][1]
    lines += ["",
              (f"- per known tenant (a cached row, its pool closed): "
               f"{(known_rss - start) / args.known:.1f} KB from the start, "
               f"{(known_rss - warm_rss) / (args.known - warmup):.1f} KB between {warmup} and {args.known:,} known "
               "(the first connections also load code and open the registry's pool)."),
              (f"- the second pass over the same {args.known:,} tenants (every pool opened and closed again, no "
               f"lookup) changed RSS by {(second - known_rss) / 1024:+.2f} MB "
               f"({(second - known_rss) / args.known:+.1f} KB per tenant)."),
              (f"- per open pool with one backend (and its client): {(fifty - second) / 50:.1f} KB "
               f"(50 clients on 50 tenants over the second pass); per open pool alone "
               f"{(fifty - one) / 49:.1f} KB (50 clients on 50 tenants over 50 on 1 tenant); "
               f"50 clients on one tenant cost {(one - second) / 1024:.2f} MB. These pools and sessions "
               f"reuse memory that the {2 * args.known:,} pools opened and closed before them left to the "
               f"allocator, so these figures say little; the latency part's pgfleet, which never had a pool "
               f"before, gives {(lat['rss_open'] - lat['rss_start']) / lat['open']:.1f} KB per open pool "  # type: ignore[operator]
               "(with its backend and its row)."),
              ("- 50 clients on one tenant: its pool holds up to pool_size (5) backends, because a client "
               "keeps (parks) its backend between transactions while the pool has room."),
              ("- VmRSS is what CPython's allocator holds from the system: memory freed by closed pools and "
               "ended sessions is mostly kept for reuse, so these are upper bounds on what stays per tenant "
               "rather than exact object sizes.")]
    logs = [Path(str(lat["log"])), Path(str(mem["log"]))]
    problems = [line for log in logs for line in pgfleet_log_problems(log)]
    tracebacks = sum(log.read_text(errors="replace").count("Traceback") for log in logs)
    lines += ["", "## pgfleet's logs (--log-level warning)", "",
              f"{tracebacks} tracebacks; warnings and errors: "
              + ("none." if not problems else "")]
    lines += [f"    {line}" for line in problems]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=300, help="tenant databases made (all of the latency part)")
    parser.add_argument("--known", type=int, default=1000, help="registry rows (the memory part); beyond --tenants, names for the same databases")
    parser.add_argument("--warm", type=int, default=10, help="tenants opened before (a)/(b)/(c)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4, help="parallel CREATE DATABASE")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.known < args.tenants or args.tenants < max(51, args.warm + 1):
        parser.error("--known must be at least --tenants, --tenants at least 51 and more than --warm")
    work = Path(tempfile.mkdtemp(prefix="dirbench-"))
    cluster = None
    try:
        cluster = Cluster("dir-bench", work / "pg", settings=PG_SETTINGS).start()
        info = machine(cluster)
        cluster.create_role(ROLE, ROLE_PASSWORD)
        cluster.create_database(TEMPLATE, owner=ROLE)
        cluster.psql(f"CREATE TABLE marker (name text); ALTER TABLE marker OWNER TO {ROLE}", TEMPLATE)
        setup = make_tenants(cluster, tenant_names(args.tenants), args.threads)
        say(f"{args.tenants:,} tenant databases in {setup:.1f} s")
        key = Fernet.generate_key().decode("ascii")
        write_registry(cluster, tenant_names(args.known), args.tenants, key)
        lat = latency(args, cluster, work, key)
        mem = memory(args, cluster, work, key)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
        lines = report(args, info, setup, lat, mem, stamp)
    except BenchError as exc:
        say(f"directory_bench: {exc}")
        return 1
    finally:
        end_cluster(cluster, work, args.keep)
    out = ROOT / "benchmarks" / "results" / f"directory-{stamp}.md"
    out.write_text("\n".join(lines) + "\n")
    say("\n".join(lines))
    say(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
