#!/usr/bin/env python3
"""pgbench direct vs pgfleet vs PgBouncer, side by side in one alternating run.

One run starts everything it measures and stops it again:

* a throw-away PostgreSQL cluster (proxy/embedded.py) with database ``bench`` filled by
  ``pgbench -i -s SCALE``;
* PgBouncer >= 1.21, transaction pooling, the same pool size as pgfleet, run as the
  unprivileged server user because it refuses root: the one on PATH, else one built before
  under ``.pgfleet/build``, else built from Debian's source package, fetched with
  ``apt-get source`` through deb-src entries made from the machine's own apt sources in a
  private apt directory (``build_pgbouncer``);
* pgfleet (``python -m proxy run``), transaction pooling, pool size 20;
* with ``--baseline DIR``, a second pgfleet run from the checkout DIR with DIR/.venv/bin/python
  (target ``baseline``): the code before a change, measured in the same alternating run.

Then ``pgbench -S -n -M MODE -c CLIENTS -j 2 -T SECS`` runs against each target. Within a
round every (mode, clients) cell runs each target once, in an order that rotates from round
to round (so no target always goes first or last on a shared, noisy CPU). The median TPS
and median average latency over the rounds, and each pooler's own CPU time per
transaction (utime + stime of its processes over a run / the transactions pgbench
processed), go into markdown tables, written to
``benchmarks/results/pgbench-<YYYYMMDD-HHMM>.md`` and ``benchmarks/results/latest.md``, and
printed.

Expected failures (no pgbench, PgBouncer cannot be installed, pgfleet does not start, a
pgbench run that errors) are one line each; a target that cannot run is marked ``n/a`` and
the others are still measured. Everything started here is stopped in ``finally``.

    .venv/bin/python benchmarks/pgbench_compare.py            # 3 rounds, -T 5, c = 1,10,50
    .venv/bin/python benchmarks/pgbench_compare.py --quick    # 1 round, -T 2, c = 10
    .venv/bin/python benchmarks/pgbench_compare.py --baseline /tmp/pgfleet-before \
        --clients 10 --rounds 5 --duration 10                  # before vs after a change
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from proxy.embedded import Cluster, EmbeddedError, free_port, server_user

HOST = "127.0.0.1"
PG_PASSWORD = "postgres"
KEY_ID, KEY_SECRET = "bench", "benchpw"
FLEET_DB = "app"
BENCH_DB = "bench"
# The targets in the order of the report's columns. "baseline" is a second pgfleet, run from
# another checkout (--baseline DIR), to compare a change with the code before it.
TARGETS = ("direct", "pgbouncer", "baseline", "pgfleet")
POOLERS = ("pgbouncer", "baseline", "pgfleet")
LABEL = {"direct": "direct", "pgfleet": "pgfleet", "pgbouncer": "PgBouncer",
         "baseline": "baseline"}
PGBOUNCER = "/usr/sbin/pgbouncer"
# PgBouncer pools -M prepared in transaction mode from 1.21 on. Debian 12 ships 1.18, Debian 13
# (trixie) 1.24: on an older Debian release the deb-src entries built from the machine's own
# apt sources also name this suite, on the same archive (see build_pgbouncer).
PGB_NEWER_SUITE = "trixie"
PGB_MIN_VERSION = (1, 21)
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
    cpu_sid: int | None = None  # session of the pooler's processes, whose CPU time is measured
    mode_cpu_sids: dict[str, int] = field(default_factory=dict)  # ... for a mode on another port

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

    def cpu_session(self, mode: str) -> int | None:
        return self.mode_cpu_sids.get(mode, self.cpu_sid)


def session_cpu_seconds(sid: int | None) -> float | None:
    """utime + stime of the live processes of session ``sid`` (Linux /proc), or None.

    A pooler is started with ``start_new_session``: its session holds the pooler itself and
    whatever wraps it (setpriv execs, runuser forks) or it forks (workers).
    """
    if sid is None:
        return None
    ticks = 0
    found = False
    for d in os.scandir("/proc"):
        if not d.name.isdigit():
            continue
        try:
            with open(f"/proc/{d.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # field 6, session; 14 and 15, utime and stime
            ticks += int(fields[11]) + int(fields[12])
            found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


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
            raise BenchError(f"{LABEL.get(target.name, target.name)} exited with code {proc.returncode}: {tail}")
        r = subprocess.run(["psql", "-X", "-A", "-t", *target.conn_args(), "-d", target.dbname,
                            "-c", "SELECT 1"], env=target.env(), capture_output=True, text=True,
                           check=False, timeout=30)
        if r.returncode == 0 and r.stdout.strip() == "1":
            return
        last = last_line(r.stderr)
        time.sleep(0.3)
    raise BenchError(f"{LABEL.get(target.name, target.name)} did not answer SELECT 1 within {timeout:g}s: {last}")


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


def cached_pgbouncer() -> tuple[str, str, tuple[int, ...]] | None:
    """The newest PgBouncer this script built before (``BUILD_DIR/pgbouncer-VERSION/``), if any."""
    best = None
    for exe in BUILD_DIR.glob("pgbouncer-*/pgbouncer"):
        found = pgbouncer_version(str(exe))
        if found and (best is None or found[2] > best[2]):
            best = found
    return best


def os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    return {k: v.strip().strip('"') for k, _, v in
            (ln.partition("=") for ln in text.splitlines()) if k}


def apt_source_files() -> list[Path]:
    """The machine's apt source files: Dir::Etc::SourceList and SourceParts (*.list, *.sources)."""
    paths = {"SL": "/etc/apt/sources.list", "SP": "/etc/apt/sources.list.d/"}
    r = subprocess.run(["apt-config", "shell", "SL", "Dir::Etc::SourceList/f",
                        "SP", "Dir::Etc::SourceParts/d"], capture_output=True, text=True,
                       check=False)
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        if key in paths and value:
            paths[key] = (shlex.split(value) or [paths[key]])[0]
    files = [Path(paths["SL"])]
    parts = Path(paths["SP"])
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    return [p for p in files if p.is_file()]


ONE_LINE_RE = re.compile(r"^deb(?:-src)?(?P<opts>\s+\[[^\]]*\])?\s+(?P<uri>\S+)\s+(?P<suite>\S+)(?P<rest>.*)$")


def deb_src_entries(files: list[Path], codename: str,
                    extra_suite: str) -> tuple[list[str], list[str]]:
    """The ``deb`` (and ``deb-src``) entries of ``files`` as ``deb-src`` ones: (one-line
    entries, deb822 stanzas).

    An entry for the machine's own release ``codename`` is also given ``extra_suite`` (same
    archive, components and key), unless that is empty or the machine's release itself.
    """
    add = extra_suite if extra_suite and extra_suite != codename else ""
    lines: list[str] = []
    stanzas: list[str] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                out: list[str] = []
                types: list[str] = []
                for line in stanza.splitlines():
                    name, colon, value = line.partition(":")
                    field_name = name.strip().lower() if colon and not line[:1].isspace() else ""
                    if field_name == "types":
                        types = value.split()
                        line = "Types: deb-src"
                    elif field_name == "suites" and add and codename in value.split():
                        line = f"Suites: {value.strip()} {add}"
                    out.append(line)
                if "deb" in types or "deb-src" in types:
                    stanzas.append("\n".join(out))
            continue
        for raw in text.splitlines():
            m = ONE_LINE_RE.match(raw.strip())
            if not m:
                continue
            suites = [m["suite"]] + ([add] if add and m["suite"] == codename else [])
            lines += [f"deb-src{m['opts'] or ''} {m['uri']} {s}{m['rest']}" for s in suites]
    return list(dict.fromkeys(lines)), stanzas


def sorted_debian_versions(versions: list[str]) -> list[str]:
    """``versions`` (Debian version strings) sorted oldest first, as dpkg compares them."""
    def cmp(a: str, b: str) -> int:
        if a == b:
            return 0
        r = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False)
        return -1 if r.returncode == 0 else 1
    return sorted(set(versions), key=functools.cmp_to_key(cmp))


def fetch_pgbouncer_source(work: Path, extra_suite: str) -> tuple[Path, str]:
    """``apt-get source pgbouncer`` through a private apt directory under ``work``.

    The deb-src entries are the machine's own apt sources (``deb_src_entries``); lists, caches
    and the source list live in ``work``, so the machine's apt configuration and state are not
    touched. apt verifies the download against the signed Sources index. Returns the unpacked
    source tree and the Debian version.
    """
    rel = os_release()
    lines, stanzas = deb_src_entries(apt_source_files(), rel.get("VERSION_CODENAME", ""),
                                     extra_suite if rel.get("ID") == "debian" else "")
    if not lines and not stanzas:
        raise BenchError("no deb entries in the machine's apt sources to make deb-src ones of")
    apt = work / "apt"
    parts = apt / "sources.list.d"
    lists, cache, src = apt / "lists", apt / "cache", work / "src"
    for d in (parts, lists / "partial", cache / "archives" / "partial", src):
        d.mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text("".join(f"{ln}\n" for ln in lines))
    (parts / "pgbench-compare.sources").write_text("".join(f"{s}\n\n" for s in stanzas))
    for d in (work, *work.rglob("*")):
        d.chmod(0o755 if d.is_dir() else 0o644)
    if os.geteuid() == 0:  # apt downloads as its sandbox user when it can write there
        try:
            sandbox = pwd.getpwnam("_apt")
            for d in (src, lists / "partial", cache / "archives" / "partial"):
                os.chown(d, sandbox.pw_uid, -1)
        except KeyError:
            pass
    opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={lists}",
            "-o", f"Dir::Cache={cache}"]
    say("PgBouncer source: apt-get update (deb-src of this machine's apt sources, private "
        f"lists in {apt}) ...")
    r = subprocess.run(["apt-get", "-q", *opts, "update"], capture_output=True, text=True,
                       check=False, timeout=600)
    if r.returncode != 0:  # e.g. a third-party repository without sources: go on without it
        warn(f"apt-get update (deb-src): {last_line(r.stderr or r.stdout)}")
    r = subprocess.run(["apt-cache", *opts, "showsrc", "pgbouncer"], capture_output=True,
                       text=True, check=False, timeout=120)
    versions = re.findall(r"^Version: (\S+)$", r.stdout, re.MULTILINE)
    if not versions:
        raise BenchError("no pgbouncer source package in this machine's apt sources: "
                         f"{last_line(r.stderr or r.stdout)}")
    version = sorted_debian_versions(versions)[-1]
    upstream = tuple(int(x) for x in re.findall(r"\d+", version.split(":")[-1].split("-")[0]))
    if upstream < PGB_MIN_VERSION:
        raise BenchError(f"the newest pgbouncer source in this machine's apt sources is {version}"
                         f", older than {'.'.join(map(str, PGB_MIN_VERSION))}")
    say(f"PgBouncer source: apt-get source pgbouncer={version} ...")
    r = subprocess.run(["apt-get", "-q", *opts, "source", f"pgbouncer={version}"], cwd=src,
                       capture_output=True, text=True, check=False, timeout=600)
    trees = [d for d in src.glob("pgbouncer-*") if d.is_dir()]
    if r.returncode != 0 or len(trees) != 1:
        raise BenchError(f"apt-get source pgbouncer={version} failed: "
                         f"{last_line(r.stderr or r.stdout)}")
    return trees[0], version


def build_pgbouncer(extra_suite: str = PGB_NEWER_SUITE) -> tuple[str, str, tuple[int, ...]]:
    """PgBouncer >= 1.21 from Debian's source package (``apt-get source``), built once.

    Debian 12's 1.18 cannot pool -M prepared in transaction mode (that came in 1.21), so on an
    older Debian the deb-src entries also name ``extra_suite`` (trixie: 1.24) on the same
    archive. The build is kept as ``BUILD_DIR/pgbouncer-VERSION/pgbouncer``; a build already
    there is used as it is (delete ``.pgfleet/build`` to build again).
    """
    found = cached_pgbouncer()
    if found:
        return found
    missing = [pkg for pkg, path in (("libevent-dev", "/usr/include/event2/event.h"),
                                     ("libssl-dev", "/usr/include/openssl/ssl.h"))
               if not Path(path).exists()]
    missing += [pkg for pkg, exe in (("pkg-config", "pkg-config"), ("dpkg-dev", "dpkg-source"),
                                     ("make", "make"), ("gcc", "cc")) if not shutil.which(exe)]
    if missing:
        apt_install(" ".join(missing))
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pgfleet-pgbouncer-src-"))
    try:
        src, version = fetch_pgbouncer_source(work, extra_suite)
        say(f"building PgBouncer {version} from Debian's source package ...")
        for step in (["./configure", "--without-cares", "--without-systemd", "--without-pam",
                      "--without-ldap"],
                     ["make", "-j2"]):
            r = subprocess.run(step, cwd=src, capture_output=True, text=True, check=False,
                               timeout=900)
            if r.returncode != 0:
                raise BenchError(f"building PgBouncer: {' '.join(step[:2])} failed: "
                                 f"{last_line(r.stderr or r.stdout)}")
        built = pgbouncer_version(str(src / "pgbouncer"))
        if not built:
            raise BenchError(f"built {src / 'pgbouncer'} but it does not run")
        prefix = BUILD_DIR / f"pgbouncer-{built[1]}"
        prefix.mkdir(exist_ok=True)
        shutil.copy2(src / "pgbouncer", prefix / "pgbouncer")
        (prefix / "SOURCE").write_text(f"Debian source package pgbouncer {version}, "
                                       "fetched with apt-get source, built with ./configure "
                                       "--without-cares --without-systemd --without-pam "
                                       "--without-ldap\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = pgbouncer_version(str(prefix / "pgbouncer"))
    if not found:
        raise BenchError(f"built {prefix / 'pgbouncer'} but it does not run")
    return found


def ensure_pgbouncer(install: bool,
                     extra_suite: str = PGB_NEWER_SUITE) -> tuple[str, str, tuple[int, ...]]:
    """A PgBouncer >= 1.21: on PATH, else built before, else built now; else whatever there is."""
    found = pgbouncer_version()
    if found and found[2] >= PGB_MIN_VERSION:
        return found
    cached = cached_pgbouncer()
    if cached and cached[2] >= PGB_MIN_VERSION:
        return cached
    if install:
        try:
            return build_pgbouncer(extra_suite)
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
    target = Target("pgbouncer", port, "postgres", PG_PASSWORD, BENCH_DB, cpu_sid=proc.pid)
    if not supports_prepared and pool_mode == "transaction":
        target.skip_modes["prepared"] = ("PgBouncer < 1.21 has no prepared-statement support "
                                         "in transaction pooling")
    try:
        wait_ready(target, proc, log if log.exists() else d / "stderr.log")
    except BaseException:
        stop_process(proc, "pgbouncer")
        raise
    return proc, target, log


def start_pgfleet(workdir: Path, pg_dsn: str, pool_size: int, python: str, name: str = "pgfleet",
                  tree: Path = ROOT, workers: int = 1) -> tuple[subprocess.Popen[bytes], Target, Path]:
    """``python -m proxy run`` in checkout ``tree`` (its own ``proxy`` package), as target ``name``;
    ``workers`` > 1: ``--workers N`` (the supervisor and its workers share one session, whose CPU
    time is counted)."""
    port = free_port()
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(
        f"listen: {{host: {HOST}, port: {port}, database: {FLEET_DB}}}\n"
        f"pool: {{mode: transaction, size: {pool_size}}}\n"
        f"databases:\n  primary: {{dsn: \"{pg_dsn}\"}}\n"
        f"keys:\n  - {{id: {KEY_ID}, secret: {KEY_SECRET}, role: server}}\n")
    log = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # proxy from cwd = tree
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, "-m", "proxy", "run", "--config", str(cfg),
                                 *(["--workers", str(workers)] if workers > 1 else [])], cwd=tree,
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    target = Target(name, port, KEY_ID, KEY_SECRET, FLEET_DB, cpu_sid=proc.pid)
    try:
        wait_ready(target, proc, log)
    except BaseException:
        stop_process(proc, name)
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
    processed: int = 0  # transactions pgbench reports as processed
    cpu_us: float | None = None  # the pooler's CPU time over the run, µs per transaction

    @property
    def ok(self) -> bool:
        return self.tps is not None and self.rc == 0 and not self.errors


TPS_RE = re.compile(r"^tps = ([\d.]+) \((?:without|excluding) initial connection", re.MULTILINE)
TPS_ANY_RE = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
LAT_RE = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


def pgbench(target: Target, mode: str, clients: int, duration: int, rnd: int) -> Run:
    run = Run(target.name, mode, clients, rnd)
    argv = ["pgbench", "-S", "-n", "-M", mode, "-c", str(clients), "-j", str(min(2, clients)),
            "-T", str(duration), *target.conn_args(mode), target.dbname]
    sid = target.cpu_session(mode)
    cpu0 = session_cpu_seconds(sid)
    try:
        r = subprocess.run(argv, env=target.env(), capture_output=True, text=True, check=False,
                           timeout=duration + 60)
    except subprocess.TimeoutExpired:
        run.rc = -1
        run.errors.append(f"pgbench did not finish within {duration + 60}s (hung)")
        return run
    cpu1 = session_cpu_seconds(sid)
    read_pgbench(run, r)
    m = PROCESSED_RE.search(r.stdout)
    run.processed = int(m.group(1)) if m else 0
    if cpu0 is not None and cpu1 is not None and run.processed:
        run.cpu_us = (cpu1 - cpu0) / run.processed * 1e6
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


def fmt_us(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "n/a"


def cell_value(runs: list[Run], attr: str) -> float | None:
    return median([getattr(r, attr) for r in runs if r.ok and getattr(r, attr) is not None])


def build_report(info: dict[str, str], modes: list[str], clients: list[int],
                 runs: list[Run], skipped: dict[tuple[str, ...], str],
                 log_lines: dict[str, list[str]] | list[str],
                 shown: tuple[str, ...] = ("direct", "pgbouncer", "pgfleet")) -> str:
    """The markdown report. ``shown``: the targets' columns, in order (see TARGETS);
    ``log_lines``: warnings and errors of each pgfleet's log (a list: pgfleet's)."""
    if isinstance(log_lines, list):
        log_lines = {"pgfleet": log_lines}
    by: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs:
        by.setdefault((r.mode, r.clients, r.target), []).append(r)
    poolers = [t for t in shown if t in POOLERS]
    baseline = "baseline" in shown
    if baseline:
        pairs = [("pgfleet", "baseline"), ("pgfleet", "pgbouncer"), ("baseline", "pgbouncer"),
                 ("pgfleet", "direct"), ("pgbouncer", "direct")]
        cpu_pairs = [("pgfleet", "baseline"), ("pgfleet", "pgbouncer"), ("baseline", "pgbouncer")]
    else:
        pairs = [("pgfleet", "direct"), ("pgfleet", "pgbouncer"), ("pgbouncer", "direct")]
        cpu_pairs = [("pgfleet", "pgbouncer")]
    pairs = [(a, b) for a, b in pairs if a in shown and b in shown]
    cpu_pairs = [(a, b) for a, b in cpu_pairs if a in shown and b in shown]

    def ratio_name(a: str, b: str) -> str:
        return f"{LABEL[a]}/{LABEL[b]}"

    title = " vs ".join(LABEL[t] for t in shown)
    out = [f"# pgbench: {title} ({info['date']})", ""]
    for k, v in info.items():
        out.append(f"- **{k}**: {v}")
    out += ["", ("Median over the rounds of each run's TPS (excluding connection time) and "
                 "of its average latency. Ratios are of median TPS: above 1.00× the numerator "
                 "is faster. A cell with `!` had at least one failed run (see Errors); its "
                 "median is over the runs that succeeded."), ""]
    out.append("| mode | clients | " + " | ".join(f"{LABEL[t]} TPS" for t in shown) + " | "
               + " | ".join(f"{LABEL[t]} lat ms" for t in shown) + " | "
               + " | ".join(ratio_name(a, b) for a, b in pairs) + " |")
    out.append("|---|--:|" + "--:|" * (2 * len(shown) + len(pairs)))
    cpu_rows: list[str] = []
    notes: dict[str, int] = {}
    for mode in modes:
        for c in clients:
            tps: dict[str, float | None] = {}
            lat: dict[str, float | None] = {}
            cpu: dict[str, float | None] = {}
            mark: dict[str, str] = {}
            for t in shown:
                rs = by.get((mode, c, t), [])
                tps[t] = cell_value(rs, "tps")
                lat[t] = cell_value(rs, "latency_ms")
                cpu[t] = cell_value(rs, "cpu_us")
                mark[t] = "!" if any(not r.ok for r in rs) else ""
                why = skipped.get((t, mode, c)) or skipped.get((t, mode))
                if why and not rs:
                    n = notes.setdefault(why, len(notes) + 1)
                    mark[t] = f" [{n}]"
            out.append(f"| {mode} | {c} | "
                       + " | ".join(f"{fmt_tps(tps[t])}{mark[t]}" for t in shown) + " | "
                       + " | ".join(fmt_ms(lat[t]) for t in shown) + " | "
                       + " | ".join(fmt_ratio(tps[a], tps[b]) for a, b in pairs) + " |")
            cpu_rows.append(f"| {mode} | {c} | "
                            + " | ".join(f"{fmt_us(cpu[t])}{mark[t]}" for t in poolers) + " | "
                            + " | ".join(fmt_ratio(cpu[a], cpu[b]) for a, b in cpu_pairs)
                            + " |")
    if notes:
        out.append("")
        for why, n in notes.items():
            out.append(f"[{n}] n/a: {why}.")

    if poolers:
        out += ["", "## Pooler CPU per transaction", "",
                ("Each pooler's own CPU time (utime + stime of its processes, from "
                 "`/proc/PID/stat`, over the pgbench run) divided by the transactions pgbench "
                 "processed in that run, in µs; the median over the rounds. Ratios of these "
                 "medians: below 1.00× the numerator spends less CPU per transaction."), "",
                "| mode | clients | " + " | ".join(f"{LABEL[t]} µs/tx" for t in poolers) + " | "
                + " | ".join(f"{ratio_name(a, b)} CPU" for a, b in cpu_pairs) + " |",
                "|---|--:|" + "--:|" * (len(poolers) + len(cpu_pairs))]
        out += cpu_rows

    # Per-round figures, to show the noise behind each median.
    def per_round(title: str, targets: list[str], cell: Callable[[Any], str]) -> list[str]:
        lines = ["", title, "", "| mode | clients | " + " | ".join(LABEL[t] for t in targets) + " |",
                 "|---|--:|" + "---|" * len(targets)]
        for mode in modes:
            for c in clients:
                row = []
                for t in targets:
                    rs = sorted(by.get((mode, c, t), []), key=lambda r: r.round)
                    row.append(", ".join((cell(r) if r.ok else "err") for r in rs) or "n/a")
                lines.append(f"| {mode} | {c} | " + " | ".join(row) + " |")
        return lines

    out += per_round("## Per-round TPS", list(shown), lambda r: fmt_tps(r.tps))
    if poolers:
        out += per_round("## Per-round pooler CPU, µs per transaction", list(poolers), lambda r: fmt_us(r.cpu_us))

    errors = [r for r in runs if r.errors]
    out += ["", "## Errors", ""]
    if not errors and not any(log_lines.values()):
        out.append("None: every pgbench run finished without an error, and "
                   + " and ".join(LABEL.get(n, n) for n in log_lines) + " logged no warning or "
                   "error.")
    for r in errors:
        shown_lines = list(dict.fromkeys(r.errors))
        out.append(f"- {LABEL.get(r.target, r.target)}, -M {r.mode} -c {r.clients}, "
                   f"round {r.round + 1} (exit {r.rc}):")
        for line in shown_lines[:8]:
            out.append(f"  - `{line}`")
        if len(shown_lines) > 8:
            out.append(f"  - … {len(shown_lines) - 8} more distinct lines")
    for name, lines in log_lines.items():
        if lines:
            out += ["", (f"{LABEL.get(name, name)}'s log (warnings and errors, distinct, "
                         "with counts):"), "", "```"]
            out += lines
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


def cmd_first_line(argv: list[str], cwd: Path | None = None) -> str:
    """The first line ``argv`` prints, or ``?``."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


def machine_info(cluster: Cluster, pgb: str | None, python: str) -> dict[str, str]:
    cmd = cmd_first_line
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
        "pgfleet": f"{cmd([python, '-m', 'proxy', '--version'])}, {tree_info(ROOT)}",
        "python": platform.python_version(),
    }


def tree_info(tree: Path) -> str:
    """``tree`` (a checkout), its commit and whether proxy/ has changes not committed."""
    def git(*argv: str) -> str:
        try:
            r = subprocess.run(["git", "-C", str(tree), *argv], capture_output=True, text=True,
                               check=False, timeout=30)
        except OSError:
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h %s")
    if not commit:
        return str(tree)
    if len(commit) > 80:
        commit = commit[:77] + "..."
    dirty = git("status", "--porcelain", "--", "proxy", "setup.py", "pyproject.toml")
    return (f"{tree} at {commit}"
            + (f" + uncommitted changes ({len(dirty.splitlines())} files)" if dirty else ""))


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
    p.add_argument("--no-install", action="store_true",
                   help="neither build PgBouncer (apt-get source) nor apt-get install anything")
    p.add_argument("--pgbouncer-suite", default=PGB_NEWER_SUITE, metavar="SUITE",
                   help="Debian suite also asked for PgBouncer's source on an older Debian "
                        f"(default {PGB_NEWER_SUITE}; '' = the machine's own suites only)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also measure the pgfleet of checkout DIR (run with DIR/.venv/bin/python)"
                        " as target 'baseline', alternating with the others: before vs after")
    p.add_argument("--workers", type=int, default=1, help="pgfleet run --workers N for target pgfleet")
    p.add_argument("--baseline-workers", type=int, default=1,
                   help="--workers for target baseline (with --baseline . and a different --workers: "
                        "this checkout with N workers against itself with M)")
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
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        args.baseline_python = args.baseline / ".venv" / "bin" / "python"
        if not (args.baseline / "proxy" / "__main__.py").exists():
            p.error(f"--baseline: {args.baseline} is not a pgfleet checkout (no proxy/__main__.py)")
        if not args.baseline_python.exists():
            p.error(f"--baseline: no {args.baseline_python}: cd {args.baseline} && python3 -m "
                    "venv .venv && .venv/bin/pip install -q -e '.[test]'")
        if args.baseline == ROOT and args.workers == args.baseline_workers:
            p.error("--baseline: that is this checkout (give it other --baseline-workers to compare those)")
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
    bouncer_proc = None
    fleet_procs: dict[str, subprocess.Popen[bytes]] = {}  # pgfleet and the baseline
    fleet_logs: dict[str, Path] = {}
    runs: list[Run] = []
    skipped: dict[tuple[str, ...], str] = {}
    extra_procs: list[subprocess.Popen[bytes]] = []
    info_notes: list[str] = []
    shown = ("direct", "pgbouncer", *(("baseline",) if args.baseline else ()), "pgfleet")
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

        # -- pgfleet, and the baseline's pgfleet ---------------------------------------------
        fleets = [("pgfleet", python, ROOT, args.workers)]
        if args.baseline:
            fleets.append(("baseline", str(args.baseline_python), args.baseline, args.baseline_workers))
        for name, py, tree, workers in fleets:
            fleet_logs[name] = workdir / f"{name}.log"
            try:
                proc, fleet_target, _ = start_pgfleet(
                    workdir, cluster.dsn(BENCH_DB), args.pool_size, py, name, tree, workers)
                fleet_procs[name] = proc
                targets.append(fleet_target)
                say(f"{LABEL[name]} ({tree}) on {HOST}:{fleet_target.port} "
                    f"(pool {args.pool_size}, transaction, {workers} worker(s))")
            except BenchError as exc:
                warn(f"{LABEL[name]} not measured: {exc}")
                for m in args.mode_list:
                    skipped[(name, m)] = f"{LABEL[name]} did not start: {exc}"

        # -- PgBouncer -----------------------------------------------------------------------
        pgb_version: str | None = None
        if args.no_pgbouncer:
            for m in args.mode_list:
                skipped[("pgbouncer", m)] = "--no-pgbouncer"
        else:
            try:
                pgb_exe, pgb_version, pgb_tuple = ensure_pgbouncer(not args.no_install,
                                                                   args.pgbouncer_suite)
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
                    bouncer_target.mode_cpu_sids["prepared"] = session_proc.pid
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
                say(f"PgBouncer {pgb_version} ({pgb_exe}) on {HOST}:{bouncer_target.port} "
                    f"(pool {args.pool_size}, transaction)")
            except BenchError as exc:
                warn(f"PgBouncer not measured: {exc}")
                for m in args.mode_list:
                    skipped[("pgbouncer", m)] = f"PgBouncer unavailable: {exc}"
        targets.sort(key=lambda t: TARGETS.index(t.name))

        info = machine_info(cluster, pgb_version, python)
        if args.baseline:
            base = cmd_first_line([str(args.baseline_python), "-m", "proxy", "--version"],
                                  args.baseline)
            keys = list(info)
            at = keys.index("pgfleet") + 1
            info = {k: info[k] for k in keys[:at]} | {
                "baseline": f"{base}, {tree_info(args.baseline)}"} | {k: info[k] for k in keys[at:]}
        if args.workers > 1 or args.baseline_workers > 1:
            info["workers"] = f"pgfleet: {args.workers}" + (f", baseline: {args.baseline_workers}"
                                                           if args.baseline else "")
        cells = [(m, c) for m in args.mode_list for c in args.client_list]
        info.update({
            "date": started.strftime("%Y-%m-%d %H:%M"),
            "workload": f"pgbench -S -n -M MODE -c CLIENTS -j min(2,CLIENTS) -T {args.duration}"
                        f", scale {args.scale}",
            "rounds": str(args.rounds),
            "duration": f"{args.duration} s per run",
            "pools": (f"{', '.join(LABEL[t] for t in shown if t in POOLERS)}: transaction mode, "
                      f"pool size {args.pool_size}"),
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
                    cpu = f" {run.cpu_us:6.1f} µs/tx CPU" if run.cpu_us is not None else ""
                    flag = f"  ERROR: {run.errors[0]}" if run.errors else ""
                    say(f"[{done:>3}/{total}] round {rnd + 1} -M {mode:<8} -c {c:<3} "
                        f"{LABEL[t.name]:<9} {status}{cpu}{flag}")
                    for name, proc in fleet_procs.items():
                        if proc.poll() is not None:
                            tail = last_line(fleet_logs[name].read_text(errors="replace"))
                            raise BenchError(f"{LABEL[name]} exited with code {proc.returncode}"
                                             f" during the run: {tail}")
        info["finished"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

        report = build_report(info, args.mode_list, args.client_list, runs, skipped,
                              {name: pgfleet_log_problems(log) for name, log in fleet_logs.items()},
                              shown)
        if args.baseline:
            say("measuring the hot path of both trees (benchmarks/hotpath.py --baseline) ...")
            report += "\n## Python per transaction, without sockets (benchmarks/hotpath.py)\n\n"
            r = subprocess.run([python, str(ROOT / "benchmarks" / "hotpath.py"), "--baseline",
                                str(args.baseline), "--markdown"], cwd=ROOT, capture_output=True,
                               text=True, check=False, timeout=900)
            report += (r.stdout if r.returncode == 0 else
                       f"hotpath.py failed (exit {r.returncode}): "
                       f"`{last_line(r.stderr or r.stdout)}`\n")
        say("measuring the router (benchmarks/route_bench.py) ...")
        report += ("\n## Router cost per statement (benchmarks/route_bench.py)\n\n"
                   "Parse on a plan-cache miss and route on a hit, best of 7, on a fleet where "
                   "pgbench_accounts is sharded by aid (the hit hashes the Bind value).\n\n")
        try:
            from benchmarks import route_bench
            report += route_bench.markdown(route_bench.measure()) + "\n"
        except Exception as exc:  # noqa: BLE001 -- a proxy/ that does not import: say so
            report += f"route_bench.py failed: `{type(exc).__name__}: {exc}`\n"
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
        for name, proc in fleet_procs.items():
            stop_process(proc, name)
        stop_process(bouncer_proc, "pgbouncer")
        for proc in extra_procs:
            stop_process(proc, "pgbouncer (session)")
        end_cluster(cluster, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
