#!/usr/bin/env python3
"""pgbench direct vs pgfleet vs PgBouncer, side by side in one alternating run.

One run starts everything it measures and stops it again:

* a throw-away PostgreSQL cluster (proxy/embedded.py) with database ``bench`` filled by
  ``pgbench -i -s SCALE``;
* PgBouncer (installed from Debian's packages when missing), transaction pooling, the same
  pool size as pgfleet, run as the unprivileged server user because it refuses root;
* pgfleet (``python -m proxy run``), transaction pooling, pool size 20.

Then ``pgbench -S -n -M MODE -c CLIENTS -j 2 -T SECS`` runs against each target. Within a
round every (mode, clients) cell runs each target once, in an order that rotates from round
to round (so no target always goes first or last on a shared, noisy CPU). The median TPS
and median average latency over the rounds go into a markdown table, written to
``benchmarks/results/pgbench-<YYYYMMDD-HHMM>.md`` and ``benchmarks/results/latest.md``, and
printed.

Expected failures (no pgbench, PgBouncer cannot be installed, pgfleet does not start, a
pgbench run that errors) are one line each; a target that cannot run is marked ``n/a`` and
the others are still measured. Everything started here is stopped in ``finally``.

    .venv/bin/python benchmarks/pgbench_compare.py            # 3 rounds, -T 5, c = 1,10,50
    .venv/bin/python benchmarks/pgbench_compare.py --quick    # 1 round, -T 2, c = 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks import route_bench  # noqa: E402
from proxy.embedded import Cluster, EmbeddedError, free_port, server_user

HOST = "127.0.0.1"
PG_PASSWORD = "postgres"
KEY_ID, KEY_SECRET = "bench", "benchpw"
FLEET_DB = "app"
BENCH_DB = "bench"
TARGETS = ("direct", "pgfleet", "pgbouncer")
LABEL = {"direct": "direct", "pgfleet": "pgfleet", "pgbouncer": "PgBouncer"}
PGBOUNCER = "/usr/sbin/pgbouncer"
# Debian trixie's PgBouncer source (pool/main/p/pgbouncer); MD5 from dists/trixie/main/source/Sources.
PGB_SOURCE_VERSION = "1.24.1"
PGB_SOURCE_URL = "http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_1.24.1.orig.tar.gz"
PGB_SOURCE_MD5 = "434cbb2db9034d358dddf525e0e5a3dd"
BUILD_DIR = Path(__file__).resolve().parent.parent / ".pgfleet" / "build"
ALL_MODES = ("simple", "extended", "prepared")


class BenchError(Exception):
    """An expected failure: reported as one line, never a traceback."""


def say(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"pgbench_compare: {msg}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    name: str
    port: int
    user: str
    password: str
    dbname: str
    skip_modes: dict[str, str] = field(default_factory=dict)  # mode -> why it is n/a
    skip_cells: dict[tuple[str, int], str] = field(default_factory=dict)  # (mode, clients) -> why
    mode_ports: dict[str, int] = field(default_factory=dict)  # a mode measured on another port

    def skips(self, mode: str, clients: int) -> bool:
        return mode in self.skip_modes or (mode, clients) in self.skip_cells

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PG") or k in ("PGTZ",)}
        env["PGPASSWORD"] = self.password
        env["PGCONNECT_TIMEOUT"] = "10"
        return env

    def conn_args(self, mode: str = "") -> list[str]:
        return ["-h", HOST, "-p", str(self.mode_ports.get(mode, self.port)), "-U", self.user]


def as_user(user: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    """The same approach as proxy/embedded.py: setpriv, else runuser; nothing when not root."""
    if user is None:
        return argv
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                "--", *argv]
    if shutil.which("runuser"):
        return ["runuser", "-u", user.pw_name, "--", *argv]
    raise BenchError("running as root needs setpriv or runuser to start PgBouncer as an "
                     "unprivileged user")


def wait_ready(target: Target, proc: subprocess.Popen[bytes] | None, log: Path | None,
               timeout: float = 30) -> None:
    """Poll ``SELECT 1`` through the target until it answers (or its process dies)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = last_line(log.read_text(errors="replace")) if log and log.exists() else ""
            raise BenchError(f"{LABEL[target.name]} exited with code {proc.returncode}: {tail}")
        r = subprocess.run(["psql", "-X", "-A", "-t", *target.conn_args(), "-d", target.dbname,
                            "-c", "SELECT 1"], env=target.env(), capture_output=True, text=True,
                           check=False, timeout=30)
        if r.returncode == 0 and r.stdout.strip() == "1":
            return
        last = last_line(r.stderr)
        time.sleep(0.3)
    raise BenchError(f"{LABEL[target.name]} did not answer SELECT 1 within {timeout:g}s: {last}")


def stop_process(proc: subprocess.Popen[bytes] | None, name: str) -> None:
    """SIGTERM to the process group we started, then SIGKILL if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    warn(f"{name} (pid {proc.pid}) did not stop")


def pgbouncer_version(exe: str | None = None) -> tuple[str, str, tuple[int, ...]] | None:
    """(path, version text, version tuple) of ``exe``, or of the pgbouncer on PATH."""
    if exe is None:
        exe = shutil.which("pgbouncer") or (PGBOUNCER if Path(PGBOUNCER).exists() else None)
    if exe is None or not Path(exe).exists():
        return None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"PgBouncer\s+(\d+(?:\.\d+)+)", r.stdout + r.stderr)
    if not m:
        return None
    return exe, m.group(1), tuple(int(x) for x in m.group(1).split("."))


def apt_install(packages: str) -> None:
    if os.geteuid() != 0:
        raise BenchError(f"{packages} not installed and we are not root to apt-get install it")
    say(f"installing {packages} (apt-get install) ...")
    r = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                       f"apt-get install -y -qq {packages}", shell=True, capture_output=True,
                       text=True, check=False, timeout=600)
    if r.returncode != 0:
        raise BenchError(f"could not install {packages}: {last_line(r.stderr or r.stdout)}")


def build_pgbouncer() -> tuple[str, str, tuple[int, ...]]:
    """PgBouncer from Debian's own source package of the next release (trixie), built once.

    bookworm's 1.18 cannot pool -M prepared in transaction mode (that came in 1.21). The
    tarball is checked against the MD5 that Debian's Sources index lists for it.
    """
    prefix = BUILD_DIR / f"pgbouncer-{PGB_SOURCE_VERSION}"
    exe = prefix / "pgbouncer"
    found = pgbouncer_version(str(exe))
    if found:
        return found
    if not Path("/usr/include/event2/event.h").exists():
        apt_install("libevent-dev libssl-dev pkg-config")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tarball = BUILD_DIR / PGB_SOURCE_URL.rsplit("/", 1)[1]
    say(f"building PgBouncer {PGB_SOURCE_VERSION} from {PGB_SOURCE_URL} ...")
    try:
        with urllib.request.urlopen(PGB_SOURCE_URL, timeout=60) as resp:
            body = resp.read()
    except OSError as exc:
        raise BenchError(f"could not download {PGB_SOURCE_URL}: {exc}") from None
    if hashlib.md5(body).hexdigest() != PGB_SOURCE_MD5:
        raise BenchError(f"{PGB_SOURCE_URL}: checksum differs from Debian's Sources index")
    tarball.write_bytes(body)
    src = BUILD_DIR / f"pgbouncer-{PGB_SOURCE_VERSION}-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    steps = [["tar", "xzf", str(tarball), "-C", str(src), "--strip-components=1"],
             ["./configure", "--without-cares", "--without-systemd", "--without-pam",
              "--without-ldap"],
             ["make", "-j2"]]
    for step in steps:
        r = subprocess.run(step, cwd=src, capture_output=True, text=True, check=False, timeout=900)
        if r.returncode != 0:
            raise BenchError(f"building PgBouncer: {' '.join(step[:2])} failed: "
                             f"{last_line(r.stderr or r.stdout)}")
    prefix.mkdir(exist_ok=True)
    shutil.copy2(src / "pgbouncer", exe)
    shutil.rmtree(src, ignore_errors=True)
    found = pgbouncer_version(str(exe))
    if not found:
        raise BenchError(f"built {exe} but it does not run")
    return found


def ensure_pgbouncer(install: bool) -> tuple[str, str, tuple[int, ...]]:
    found = pgbouncer_version()
    if found and found[2] >= (1, 21):
        return found
    if install:
        try:
            return build_pgbouncer()
        except BenchError as exc:
            warn(f"PgBouncer >= 1.21 not available ({exc}); using {found[1] if found else 'apt'}")
    if found:
        return found
    if not install:
        raise BenchError("pgbouncer is not installed (and --no-install was given)")
    apt_install("pgbouncer")
    found = pgbouncer_version()
    if not found:
        raise BenchError("pgbouncer was installed but does not run")
    return found


def start_pgbouncer(workdir: Path, pg_port: int, pool_size: int, exe: str, version: tuple[int, ...],
                    pool_mode: str = "transaction") -> tuple[subprocess.Popen[bytes], Target, Path]:
    user = server_user()
    d = workdir / f"pgbouncer-{pool_mode}"
    d.mkdir(mode=0o700)
    port = free_port()
    supports_prepared = version >= (1, 21)
    (d / "userlist.txt").write_text(f'"postgres" "{PG_PASSWORD}"\n')
    log = d / "pgbouncer.log"
    ini = [
        "[databases]",
        (f"{BENCH_DB} = host={HOST} port={pg_port} dbname={BENCH_DB} user=postgres "
         f"password={PG_PASSWORD}"),
        "",
        "[pgbouncer]",
        f"listen_addr = {HOST}",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = scram-sha-256",
        f"auth_file = {d / 'userlist.txt'}",
        f"pool_mode = {pool_mode}",
        f"default_pool_size = {pool_size}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        "max_client_conn = 1000",
        "ignore_startup_parameters = extra_float_digits",
        f"logfile = {log}",
        f"pidfile = {d / 'pgbouncer.pid'}",
        "log_connections = 0",
        "log_disconnections = 0",
        "admin_users = postgres",
    ]
    if supports_prepared:
        ini.append("max_prepared_statements = 200")
    (d / "pgbouncer.ini").write_text("\n".join(ini) + "\n")
    if not exe.startswith("/usr/"):
        # A build of our own: a copy beside its config, where the server user can reach it.
        shutil.copy2(exe, d / "pgbouncer")
        exe = str(d / "pgbouncer")
    if user is not None:
        for p in (d, *d.iterdir()):
            os.chown(p, user.pw_uid, user.pw_gid)
        for parent in (d.parent, *d.parent.parents):  # search bit only, as embedded.py does
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
    with open(d / "stderr.log", "wb") as err:
        proc = subprocess.Popen(as_user(user, [exe, str(d / "pgbouncer.ini")]), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    target = Target("pgbouncer", port, "postgres", PG_PASSWORD, BENCH_DB)
    if not supports_prepared and pool_mode == "transaction":
        target.skip_modes["prepared"] = ("PgBouncer < 1.21 has no prepared-statement support "
                                         "in transaction pooling")
    try:
        wait_ready(target, proc, log if log.exists() else d / "stderr.log")
    except BaseException:
        stop_process(proc, "pgbouncer")
        raise
    return proc, target, log


def start_pgfleet(workdir: Path, pg_dsn: str, pool_size: int,
                  python: str) -> tuple[subprocess.Popen[bytes], Target, Path]:
    port = free_port()
    cfg = workdir / "pgfleet.yaml"
    cfg.write_text(
        f"listen: {{host: {HOST}, port: {port}, database: {FLEET_DB}}}\n"
        f"pool: {{mode: transaction, size: {pool_size}}}\n"
        f"databases:\n  primary: {{dsn: \"{pg_dsn}\"}}\n"
        f"keys:\n  - {{id: {KEY_ID}, secret: {KEY_SECRET}, role: server}}\n")
    log = workdir / "pgfleet.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, "-m", "proxy", "run", "--config", str(cfg)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    target = Target("pgfleet", port, KEY_ID, KEY_SECRET, FLEET_DB)
    try:
        wait_ready(target, proc, log)
    except BaseException:
        stop_process(proc, "pgfleet")
        raise
    return proc, target, log


# ---------------------------------------------------------------------------------------------
# pgbench


@dataclass
class Run:
    target: str
    mode: str
    clients: int
    round: int
    tps: float | None = None
    latency_ms: float | None = None
    failed_tx: int = 0
    rc: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.tps is not None and self.rc == 0 and not self.errors


TPS_RE = re.compile(r"^tps = ([\d.]+) \((?:without|excluding) initial connection", re.MULTILINE)
TPS_ANY_RE = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
LAT_RE = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def pgbench(target: Target, mode: str, clients: int, duration: int, rnd: int) -> Run:
    run = Run(target.name, mode, clients, rnd)
    argv = ["pgbench", "-S", "-n", "-M", mode, "-c", str(clients), "-j", str(min(2, clients)),
            "-T", str(duration), *target.conn_args(mode), target.dbname]
    try:
        r = subprocess.run(argv, env=target.env(), capture_output=True, text=True, check=False,
                           timeout=duration + 60)
    except subprocess.TimeoutExpired:
        run.rc = -1
        run.errors.append(f"pgbench did not finish within {duration + 60}s (hung)")
        return run
    read_pgbench(run, r)
    return run


def read_pgbench(run: Any, r: subprocess.CompletedProcess[str]) -> None:
    """TPS, latency, failed transactions and error lines of one pgbench run, into ``run``."""
    run.rc = r.returncode
    out = r.stdout
    m = TPS_RE.search(out) or TPS_ANY_RE.search(out)
    run.tps = float(m.group(1)) if m else None
    m = LAT_RE.search(out)
    run.latency_ms = float(m.group(1)) if m else None
    m = FAILED_RE.search(out)
    run.failed_tx = int(m.group(1)) if m else 0
    for line in (r.stderr + "\n" + out).splitlines():
        line = line.strip()
        if line and ("error" in line.lower() or "aborted" in line.lower() or "fatal" in line.lower()) \
                and "number of failed" not in line:
            run.errors.append(line)
    if run.failed_tx:
        run.errors.append(f"number of failed transactions: {run.failed_tx}")
    if r.returncode != 0 and not run.errors:
        run.errors.append(f"pgbench exited {r.returncode}: {last_line(r.stderr or out)}")


def end_cluster(cluster: Any, workdir: Path, keep: bool) -> None:
    """Stop the benchmark's cluster, and keep or remove its work directory."""
    if cluster is not None:
        try:
            cluster.stop()
        except EmbeddedError as exc:
            warn(str(exc))
    if keep:
        say(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# Report


def fmt_tps(v: float | None) -> str:
    return f"{v:,.0f}" if v is not None else "n/a"


def fmt_ms(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "n/a"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "n/a"


def cell_value(runs: list[Run], attr: str) -> float | None:
    return median([getattr(r, attr) for r in runs if r.ok and getattr(r, attr) is not None])


def build_report(info: dict[str, str], modes: list[str], clients: list[int],
                 runs: list[Run], skipped: dict[tuple[str, ...], str],
                 pgfleet_log_lines: list[str]) -> str:
    by: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs:
        by.setdefault((r.mode, r.clients, r.target), []).append(r)

    out = [f"# pgbench: direct vs pgfleet vs PgBouncer ({info['date']})", ""]
    for k, v in info.items():
        out.append(f"- **{k}**: {v}")
    out += ["", ("Median over the rounds of each run's TPS (excluding connection time) and "
                 "of its average latency. Ratios are of median TPS: above 1.00× the numerator "
                 "is faster. A cell with `!` had at least one failed run (see Errors); its "
                 "median is over the runs that succeeded."), ""]
    out.append("| mode | clients | direct TPS | pgfleet TPS | PgBouncer TPS | "
               "direct lat ms | pgfleet lat ms | PgBouncer lat ms | pgfleet/direct | "
               "pgfleet/PgBouncer | PgBouncer/direct |")
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    notes: dict[str, int] = {}
    for mode in modes:
        for c in clients:
            tps: dict[str, float | None] = {}
            lat: dict[str, float | None] = {}
            mark: dict[str, str] = {}
            for t in TARGETS:
                rs = by.get((mode, c, t), [])
                tps[t] = cell_value(rs, "tps")
                lat[t] = cell_value(rs, "latency_ms")
                mark[t] = "!" if any(not r.ok for r in rs) else ""
                why = skipped.get((t, mode, c)) or skipped.get((t, mode))
                if why and not rs:
                    n = notes.setdefault(why, len(notes) + 1)
                    mark[t] = f" [{n}]"
            out.append(
                f"| {mode} | {c} | {fmt_tps(tps['direct'])}{mark['direct']} | "
                f"{fmt_tps(tps['pgfleet'])}{mark['pgfleet']} | "
                f"{fmt_tps(tps['pgbouncer'])}{mark['pgbouncer']} | "
                f"{fmt_ms(lat['direct'])} | {fmt_ms(lat['pgfleet'])} | "
                f"{fmt_ms(lat['pgbouncer'])} | "
                f"{fmt_ratio(tps['pgfleet'], tps['direct'])} | "
                f"{fmt_ratio(tps['pgfleet'], tps['pgbouncer'])} | "
                f"{fmt_ratio(tps['pgbouncer'], tps['direct'])} |")
    if notes:
        out.append("")
        for why, n in notes.items():
            out.append(f"[{n}] n/a: {why}.")

    # Per-round TPS, to show the noise behind each median.
    out += ["", "## Per-round TPS", "",
            "| mode | clients | direct | pgfleet | PgBouncer |", "|---|--:|---|---|---|"]
    for mode in modes:
        for c in clients:
            row = []
            for t in TARGETS:
                rs = sorted(by.get((mode, c, t), []), key=lambda r: r.round)
                row.append(", ".join((fmt_tps(r.tps) if r.ok else "err") for r in rs) or "n/a")
            out.append(f"| {mode} | {c} | " + " | ".join(row) + " |")

    errors = [r for r in runs if r.errors]
    out += ["", "## Errors", ""]
    if not errors and not pgfleet_log_lines:
        out.append("None: every pgbench run finished without an error, and pgfleet logged no "
                   "warning or error.")
    for r in errors:
        shown = list(dict.fromkeys(r.errors))
        out.append(f"- {LABEL[r.target]}, -M {r.mode} -c {r.clients}, round {r.round + 1} "
                   f"(exit {r.rc}):")
        for line in shown[:8]:
            out.append(f"  - `{line}`")
        if len(shown) > 8:
            out.append(f"  - … {len(shown) - 8} more distinct lines")
    if pgfleet_log_lines:
        out += ["", "pgfleet's log (warnings and errors, distinct, with counts):", "", "```"]
        out += pgfleet_log_lines
        out.append("```")
    return "\n".join(out) + "\n"


def pgfleet_log_problems(log: Path | None, limit: int = 40) -> list[str]:
    if log is None or not log.exists():
        return []
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception|Error:", line):
            continue
        # Drop the timestamp and the peer's port so repeats of one error count as one.
        key = re.sub(r"^\S+ \S+ ", "", line)
        key = re.sub(r"(127\.0\.0\.1|\[?::1\]?):\d+", r"\1:*", key)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, line)
    lines = [f"{counts[k]:>6}× {first[k]}" for k in counts]
    if len(lines) > limit:
        lines = lines[:limit] + [f"… {len(lines) - limit} more distinct lines"]
    return lines


def machine_info(cluster: Cluster, pgb: str | None, python: str) -> dict[str, str]:
    def cmd(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        except OSError:
            return "?"
        return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"

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
    except EmbeddedError:
        server = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "pgbench": cmd(["pgbench", "--version"]),
        "PostgreSQL": server,
        "PgBouncer": pgb or "n/a",
        "pgfleet": cmd([python, "-m", "proxy", "--version"]),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--duration", type=int, default=5, help="pgbench -T seconds (default 5)")
    p.add_argument("--clients", default="1,10,50", help="pgbench -c values (default 1,10,50)")
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help="pgbench -M values (default simple,extended,prepared)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    p.add_argument("--pool-size", type=int, default=20, help="pgfleet and PgBouncer pool size")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, -T 2, -c 10")
    p.add_argument("--no-pgbouncer", action="store_true", help="measure direct and pgfleet only")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install pgbouncer")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (cluster, logs) and print its path")
    p.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.clients = 1, 2, "10"
    try:
        args.client_list = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients: not a comma-separated list of integers: {args.clients}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in ALL_MODES]
    if bad:
        p.error(f"--modes: unknown {', '.join(bad)} (choose from {', '.join(ALL_MODES)})")
    if (args.rounds < 1 or args.duration < 1 or not args.client_list
            or min(args.client_list) < 1 or not args.mode_list):
        p.error("--rounds, --duration and every --clients value must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    for tool in ("pgbench", "psql"):
        if shutil.which(tool) is None:
            warn(f"{tool} not found: apt-get install postgresql-client")
            return 1
    started = dt.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="pgfleet-bench-"))
    cluster: Cluster | None = None
    fleet_proc = bouncer_proc = None
    fleet_log: Path | None = None
    runs: list[Run] = []
    skipped: dict[tuple[str, ...], str] = {}
    extra_procs: list[subprocess.Popen[bytes]] = []
    info_notes: list[str] = []
    try:
        # -- the cluster and its data --------------------------------------------------------
        say(f"work directory {workdir}")
        cluster = Cluster("bench", workdir / "pg", password=PG_PASSWORD,
                          settings={"max_connections": "300"})
        cluster.start()
        cluster.create_database(BENCH_DB)
        direct = Target("direct", cluster.port, "postgres", PG_PASSWORD, BENCH_DB)
        say(f"PostgreSQL on {HOST}:{cluster.port}; pgbench -i -s {args.scale} ...")
        r = subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), *direct.conn_args(),
                            BENCH_DB], env=direct.env(), capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            raise BenchError(f"pgbench -i failed: {last_line(r.stderr)}")
        cluster.psql("VACUUM ANALYZE", BENCH_DB)
        targets: list[Target] = [direct]

        # -- pgfleet -------------------------------------------------------------------------
        try:
            fleet_proc, fleet_target, fleet_log = start_pgfleet(
                workdir, cluster.dsn(BENCH_DB), args.pool_size, python)
            targets.append(fleet_target)
            say(f"pgfleet on {HOST}:{fleet_target.port} (pool {args.pool_size}, transaction)")
        except BenchError as exc:
            warn(f"pgfleet not measured: {exc}")
            fleet_log = workdir / "pgfleet.log"
            for m in args.mode_list:
                skipped[("pgfleet", m)] = f"pgfleet did not start: {exc}"

        # -- PgBouncer -----------------------------------------------------------------------
        pgb_version: str | None = None
        if args.no_pgbouncer:
            for m in args.mode_list:
                skipped[("pgbouncer", m)] = "--no-pgbouncer"
        else:
            try:
                pgb_exe, pgb_version, pgb_tuple = ensure_pgbouncer(not args.no_install)
                bouncer_proc, bouncer_target, _ = start_pgbouncer(
                    workdir, cluster.port, args.pool_size, pgb_exe, pgb_tuple)
                targets.append(bouncer_target)
                if "prepared" in bouncer_target.skip_modes and "prepared" in args.mode_list:
                    # The nearest fair comparison: PgBouncer in session mode, where prepared
                    # statements work, while every client still gets a server of the pool.
                    session_proc, session_target, _ = start_pgbouncer(
                        workdir, cluster.port, args.pool_size, pgb_exe, pgb_tuple, "session")
                    extra_procs.append(session_proc)
                    del bouncer_target.skip_modes["prepared"]
                    bouncer_target.mode_ports["prepared"] = session_target.port
                    prepared_note = (f"PgBouncer's -M prepared cells are session pooling: {pgb_version} "
                                     "has no prepared-statement support in transaction pooling")
                    info_notes.append(prepared_note)
                    for c in args.client_list:
                        if c > args.pool_size:
                            why = (f"session pooling cannot serve {c} clients with pool size "
                                   f"{args.pool_size}, and {pgb_version} has no prepared-statement "
                                   "support in transaction pooling")
                            bouncer_target.skip_cells[("prepared", c)] = why
                            skipped[("pgbouncer", "prepared", c)] = why
                for m, why in bouncer_target.skip_modes.items():
                    skipped[("pgbouncer", m)] = f"{why} (this is {pgb_version})"
                say(f"PgBouncer {pgb_version} on {HOST}:{bouncer_target.port} "
                    f"(pool {args.pool_size}, transaction)")
            except BenchError as exc:
                warn(f"PgBouncer not measured: {exc}")
                for m in args.mode_list:
                    skipped[("pgbouncer", m)] = f"PgBouncer unavailable: {exc}"

        info = machine_info(cluster, pgb_version, python)
        cells = [(m, c) for m in args.mode_list for c in args.client_list]
        info.update({
            "date": started.strftime("%Y-%m-%d %H:%M"),
            "workload": f"pgbench -S -n -M MODE -c CLIENTS -j min(2,CLIENTS) -T {args.duration}"
                        f", scale {args.scale}",
            "rounds": str(args.rounds),
            "duration": f"{args.duration} s per run",
            "pools": f"pgfleet and PgBouncer: transaction mode, pool size {args.pool_size}",
            "order": "targets alternate within each cell; the order rotates every round and cell",
        })
        if info_notes:
            info["note"] = "; ".join(info_notes)

        # -- warm-up: open the pools' backends and fill caches --------------------------------
        warm_c = max(args.client_list)
        for t in targets:
            pgbench(t, "simple", warm_c, 1 if args.quick else 2, -1)

        # -- the rounds ----------------------------------------------------------------------
        total = args.rounds * sum(
            1 for m, c in cells for t in targets if not t.skips(m, c))
        done = 0
        for rnd in range(args.rounds):
            for i, (mode, c) in enumerate(cells):
                k = (rnd + i) % len(targets)
                order = targets[k:] + targets[:k]
                for t in order:
                    if t.skips(mode, c):
                        continue
                    run = pgbench(t, mode, c, args.duration, rnd)
                    runs.append(run)
                    done += 1
                    status = (f"{run.tps:>9,.0f} tps {run.latency_ms or 0:7.3f} ms"
                              if run.tps is not None else "      n/a")
                    flag = f"  ERROR: {run.errors[0]}" if run.errors else ""
                    say(f"[{done:>3}/{total}] round {rnd + 1} -M {mode:<8} -c {c:<3} "
                        f"{LABEL[t.name]:<9} {status}{flag}")
                    if fleet_proc is not None and fleet_proc.poll() is not None:
                        raise BenchError(f"pgfleet exited with code {fleet_proc.returncode} "
                                         f"during the run: "
                                         f"{last_line(fleet_log.read_text(errors='replace'))}")
        info["finished"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

        report = build_report(info, args.mode_list, args.client_list, runs, skipped,
                              pgfleet_log_problems(fleet_log))
        say("measuring the router (benchmarks/route_bench.py) ...")
        report += ("\n## Router cost per statement (benchmarks/route_bench.py)\n\n"
                   "Parse on a plan-cache miss and route on a hit, best of 7, on a fleet where "
                   "pgbench_accounts is sharded by aid (the hit hashes the Bind value).\n\n"
                   + route_bench.markdown(route_bench.measure()) + "\n")
        args.output.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%d-%H%M")
        path = args.output / f"pgbench-{stamp}.md"
        path.write_text(report)
        (args.output / "latest.md").write_text(report)
        (args.output / f"pgbench-{stamp}.json").write_text(json.dumps(
            {"info": info, "runs": [r.__dict__ for r in runs]}, indent=1) + "\n")
        say("")
        say(report)
        say(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
            f"and latest.md")
        return 0
    except (BenchError, EmbeddedError) as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        warn("interrupted")
        return 130
    finally:
        stop_process(fleet_proc, "pgfleet")
        stop_process(bouncer_proc, "pgbouncer")
        for proc in extra_procs:
            stop_process(proc, "pgbouncer (session)")
        end_cluster(cluster, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
