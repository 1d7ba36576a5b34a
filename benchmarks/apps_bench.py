#!/usr/bin/env python3
"""What applications send, through pgfleet on 2 shards vs one database directly (issue 17).

One run starts everything it measures and stops it again: a throw-away PostgreSQL cluster
(proxy/embedded.py) with a database ``single`` and two shards ``s0``/``s1``, and pgfleet
(``python -m proxy run``, transaction pooling, ``two_phase_commit: true``: the workloads write
on both shards inside one transaction). Each round runs every workload against ``single``
directly and against the fleet, the order alternating; the report gives medians and ratios.

Workloads:

* ``executemany``: psycopg's ``executemany`` of N single-row INSERTs in one transaction (one
  pipeline), keys alternating between the shards: pgfleet cuts the pipeline at every change of
  database (docs/decisions.md "Pipelines over several databases");
* ``insert-values``: one multi-row INSERT of the same N rows with parameters (what
  SQLAlchemy's insertmanyvalues sends), split by shard;
* ``orm-add-all``: SQLAlchemy 2's ORM ``add_all`` of M objects with explicit keys, committed.

    .venv/bin/python benchmarks/apps_bench.py                  # N=1000, M=10000, 3 rounds
    .venv/bin/python benchmarks/apps_bench.py --rows 200 --objects 2000 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

import psycopg
from sqlalchemy import BigInteger, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from proxy.embedded import Cluster, free_port

SHARDS = ("s0", "s1")
KEY, SECRET = "pf_bench", "bench-secret"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(40))


def start_pgfleet(workdir: Path, cluster: Cluster) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "database": "app"},
        "pool": {"mode": "transaction", "size": 10},
        "databases": {db: {"dsn": cluster.dsn(db) + "?sslmode=disable"} for db in (*SHARDS, "single")},
        "default_database": SHARDS[0],
        "two_phase_commit": True,
        "sharding": {"shards": list(SHARDS), "tables": {"items": "id"}},
        "keys": [{"id": KEY, "secret": SECRET, "role": "server"}],
    }
    path = workdir / "pgfleet.yaml"
    path.write_text(json.dumps(config))
    log = open(workdir / "pgfleet.log", "wb")  # noqa: SIM115 - kept open for the process's life
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            psycopg.connect(f"postgresql://{KEY}:{SECRET}@127.0.0.1:{port}/app", connect_timeout=2).close()
            return proc, port
        except psycopg.OperationalError:
            if proc.poll() is not None:
                raise SystemExit(f"pgfleet exited: {(workdir / 'pgfleet.log').read_text()[-2000:]}") from None
            time.sleep(0.1)
    raise SystemExit("pgfleet did not start")


def workloads(rows: int, objects: int) -> dict[str, Callable[[str], None]]:
    def executemany(url: str) -> None:
        with psycopg.connect(url) as conn:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO items (id, note) VALUES (%s, %s)", [(i, "n") for i in range(1, rows + 1)])
            conn.commit()

    def insert_values(url: str) -> None:
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO items (id, note) VALUES " + ", ".join(["(%s, %s)"] * rows),
                         [x for i in range(1, rows + 1) for x in (i, "n")])
            conn.commit()

    def orm_add_all(url: str) -> None:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with Session(engine) as session:
                session.add_all([Item(id=i, note="n") for i in range(1, objects + 1)])
                session.commit()
        finally:
            engine.dispose()

    return {"executemany": executemany, "insert-values": insert_values, "orm-add-all": orm_add_all}


def clear(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM items")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = dt.datetime.now()
    with tempfile.TemporaryDirectory(prefix="pgfleet-apps-") as tmp:
        work = Path(tmp)
        cluster = Cluster("bench", work / "pg")
        cluster.start()
        proc = None
        try:
            for db in (*SHARDS, "single"):
                cluster.create_database(db)
                cluster.psql("CREATE TABLE items (id bigint PRIMARY KEY, note varchar(40))", dbname=db)
            proc, port = start_pgfleet(work, cluster)
            targets = {"direct": cluster.dsn("single") + "?sslmode=disable",
                       "pgfleet": f"postgresql://{KEY}:{SECRET}@127.0.0.1:{port}/app"}
            times: dict[tuple[str, str], list[float]] = {}
            for round_ in range(args.rounds):
                order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                for name, work_fn in workloads(args.rows, args.objects).items():
                    for target in order:
                        clear(targets[target])
                        begun = time.perf_counter()
                        work_fn(targets[target])
                        times.setdefault((name, target), []).append(time.perf_counter() - begun)
                        print(f"round {round_ + 1} {name:14} {target:8} {times[(name, target)][-1] * 1000:9.1f} ms",
                              flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(15)
            cluster.stop()
    lines = [f"# Applications' writes: pgfleet (2 shards, two-phase commit) vs one database ({started:%Y-%m-%d %H:%M})",
             "", (f"`benchmarks/apps_bench.py --rows {args.rows} --objects {args.objects} --rounds {args.rounds}`; "
                  "median wall time of each workload, direct and through pgfleet alternating."), "",
             "| workload | direct | pgfleet | ratio |", "|---|---|---|---|"]
    for name in workloads(args.rows, args.objects):
        direct = statistics.median(times[(name, "direct")])
        fleet = statistics.median(times[(name, "pgfleet")])
        lines.append(f"| {name} | {direct * 1000:.1f} ms | {fleet * 1000:.1f} ms | {fleet / direct:.2f}x |")
    report = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"apps-{started:%Y%m%d-%H%M}.md"
    out.write_text(report)
    print(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
