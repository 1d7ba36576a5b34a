"""Replication jobs (DESIGN "Replication jobs"): what to copy, when, and who runs it.

A job copies tables from a source database to target databases, every ``interval`` while
enabled, or when asked (``RUN JOB``, the seeds' ``POST .../jobs/{id}/run``). Jobs come from
the config (read-only) or are created at run time (HTTP ``POST /api/database/replication/jobs``)
and then stored in ``pgfleet.replication_jobs`` of the default database, so they survive a
restart and every pgfleet process (every worker, every host) sees them.

One process runs a job at a time: a run holds the advisory lock (JOB_LOCK, hashtext(job id)) on
the default database. Each run is written to ``pgfleet.replication_runs`` there; the scheduler
of every process reads the last run from it before starting one, so a job runs once per
interval across all processes, not once per process.

A target that fails (it is down) fails only its own part of the run: the others go on, the
run is ``partial``, and the job is tried again after a backoff (5 s, doubling up to its
interval) rather than a whole interval later.

Watermark mode is ``watermark.py``, verification ``verify.py``, logical mode ``logical.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ..config import Config, Dsn
from . import logical
from .verify import RangeCheck, verify_table
from .watermark import Progress, ReplicationError, copy_table, replication_connect, shape_of

log = logging.getLogger("pgfleet.replication")

JOB_LOCK = 0x70676A62  # "pgjb": the advisory lock's first key; hashtext(job id) the second
TICK = 1.0
LOAD_RETRY = 30  # ticks between tries to read the stored jobs while the default database does not answer
REFRESH = 15  # ticks between reads of the stored jobs and the run history (other processes' changes)
REFRESH_IDLE = 60  # ... while there is no job at all
RETRY_FIRST = 5.0
APPLICATION_NAME = "pgfleet replication"

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS pgfleet;
CREATE TABLE IF NOT EXISTS pgfleet.replication_jobs (
    id text PRIMARY KEY,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pgfleet.replication_runs (
    id bigserial PRIMARY KEY,
    job text NOT NULL,
    started timestamptz NOT NULL,
    finished timestamptz,
    status text NOT NULL,
    rows bigint NOT NULL DEFAULT 0,
    error text,
    details jsonb
);
CREATE INDEX IF NOT EXISTS replication_runs_job ON pgfleet.replication_runs (job, id DESC)
"""


class JobError(Exception):
    """A request about a job that cannot be done (unknown, read-only, running elsewhere)."""

    def __init__(self, message: str, hint: str | None = None, missing: bool = False) -> None:
        super().__init__(message)
        self.hint = hint
        self.missing = missing


@dataclass(frozen=True)
class Job:
    id: str
    source: str
    targets: tuple[str, ...]
    tables: tuple[str, ...]
    sync_key: str = "updated_at"
    interval: float = 900.0
    enabled: bool = True
    mode: str = "watermark"
    verify: bool = False
    batch_size: int = 20_000
    stored: bool = False  # created at run time (pgfleet.replication_jobs), not by the config

    def spec(self) -> dict[str, Any]:
        """The seeds' JSON field names."""
        return {"id": self.id, "sourceDatabase": self.source, "targetDatabases": list(self.targets),
                "tables": list(self.tables), "syncKey": self.sync_key, "intervalMinutes": self.interval / 60,
                "enabled": self.enabled, "mode": self.mode, "verify": self.verify, "batchSize": self.batch_size,
                "source": "api" if self.stored else "config"}


@dataclass
class Run:
    """One run of a job: one Progress per (table, target)."""

    job: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    parts: list[Progress] = field(default_factory=list)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)  # (table, target) -> why
    checks: list[RangeCheck] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def status(self) -> str:
        if self.finished is None:
            return "running"
        if not self.errors:
            return "differs" if any(c.status == "differs" for c in self.checks) else "ok"
        return "failed" if ("*", "*") in self.errors or len(self.errors) >= len(self.parts) else "partial"


class Replicator:
    """This process's jobs: the scheduler, runs, verification, and the stored jobs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stored: dict[str, Job] = {}
        self.running: dict[str, Run] = {}
        self.last: dict[str, dict[str, Any]] = {}  # job -> its last finished run (this process's view)
        self.retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[Run]] = set()
        self.ready = False
        self.copied: dict[str, int] = {}  # job -> rows this process's runs copied since it started
        self.verified: dict[str, bool] = {}  # job -> whether its last verification found no difference
        self._loaded = asyncio.Event()
        self.scheduling = False
        self._starting: set[str] = set()  # started in the background, not running yet
        self._unindexed: set[tuple[str, str]] = set()  # (job, table) warned about: no index on the sync key

    # -- the jobs

    def jobs(self) -> dict[str, Job]:
        out = {job.id: Job(job.id, job.source, tuple(job.targets), tuple(job.tables), job.sync_key,
                           float(job.interval), job.enabled, "watermark" if job.mode == "batch" else job.mode,
                           job.verify, job.batch_size)
               for job in self.config.replication.jobs}
        for job_id, job in self.stored.items():
            out.setdefault(job_id, job)
        return out

    def job(self, job_id: str) -> Job:
        job = self.jobs().get(job_id)
        if job is None and not self.ready:
            raise JobError(f"no replication job {job_id!r} in the config, and the stored jobs are not read yet "
                           f"(database {self.config.default} did not answer)", hint="SHOW JOBS, then try again")
        if job is None:
            raise JobError(f"no replication job {job_id!r}", hint="SHOW JOBS lists them", missing=True)
        return job

    def _dsn(self, database: str) -> Dsn:
        return self.config.dsn(database)

    async def _control(self) -> asyncpg.Connection:
        return await replication_connect(self._dsn(self.config.default), self.config.pool.connect_timeout)

    # -- lifecycle

    async def start(self, schedule: bool = True) -> None:
        """Create pgfleet's tables in the default database, read the stored jobs, and start the
        scheduler (which keeps trying when the default database is not reachable yet).
        ``schedule`` False: runs only when asked (a worker of a group that is not its leader)."""
        self._task = asyncio.get_running_loop().create_task(self._begin(schedule), name="pgfleet replication")

    async def _begin(self, schedule: bool) -> None:
        """In the background (the default database may be slow to answer): the stored jobs,
        then, for the process that schedules, the logical jobs and the schedule."""
        try:
            await self.load()
        finally:
            self._loaded.set()
        if schedule:
            await self.follow_logical()
            await self._schedule()

    async def wait_loaded(self) -> None:
        """Until the stored jobs have been read once (or the default database did not answer)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.pool.connect_timeout * 2):
                await self._loaded.wait()
        if self._loaded.is_set():  # the stored jobs as they are now (another process may have changed them)
            await self.load()

    async def follow_logical(self) -> None:
        """Logical jobs: what each needs exists while it is enabled, and not once it is disabled
        (each step is idempotent; a failure is logged and SHOW JOBS shows the state)."""
        for job in self.jobs().values():
            if job.mode != "logical":
                continue
            try:
                if job.enabled:
                    await logical.enable(self.config, job)
                else:
                    for problem in await logical.disable(self.config, job):
                        log.warning("replication job %s: could not drop its logical replication on %s", job.id,
                                    problem)
            except (ReplicationError, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    KeyError) as exc:
                log.error("replication job %s (logical): %s", job.id, exc)

    async def load(self) -> None:
        try:
            conn = await self._control()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("replication: cannot read the stored jobs from database %s (%s); config jobs run, "
                        "stored ones once it answers", self.config.default, exc)
            return
        try:
            # Nothing is created here: pgfleet's tables appear with the first run or stored job.
            if await conn.fetchval("SELECT to_regclass('pgfleet.replication_jobs') IS NOT NULL"):
                rows = await conn.fetch("SELECT id, spec FROM pgfleet.replication_jobs ORDER BY created_at")
                stored = {}
                for row in rows:
                    try:
                        stored[row["id"]] = _from_spec(json.loads(row["spec"]), stored=True)
                    except (JobError, ValueError) as exc:
                        log.warning("replication: stored job %s cannot be read (%s); it is skipped", row["id"], exc)
                self.stored = stored
                for row in await conn.fetch(_LAST_RUNS):
                    self.last[row["job"]] = dict(row)
            self.ready = True
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("replication: cannot read the stored jobs in database %s (%s); config jobs run",
                        self.config.default, exc)
        finally:
            await conn.close()

    async def last_runs(self) -> dict[str, dict[str, Any]]:
        """Each job's last run as the default database has it (any process's), with the runs
        going on now; this process's own view when the database does not answer."""
        try:
            conn = await self._control()
        except (OSError, TimeoutError, asyncpg.PostgresError):
            return dict(self.last)
        try:
            rows = await conn.fetch(_LAST_RUNS_ANY)
        except asyncpg.PostgresError:  # (no run yet: no table)
            return dict(self.last)
        finally:
            await conn.close()
        return {row["job"]: dict(row) for row in rows}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._runs):
            task.cancel()
        if self._runs:
            await asyncio.wait(self._runs, timeout=5)

    # -- scheduling

    async def _schedule(self) -> None:
        self.scheduling = True
        ticks = 0
        while True:
            await asyncio.sleep(TICK)
            ticks += 1
            try:
                if not self.ready and ticks % LOAD_RETRY == 0:
                    await self.load()
                elif self.ready and ticks % (REFRESH if self.jobs() else REFRESH_IDLE) == 0:
                    # Jobs stored, enabled or disabled by another process (another worker, another
                    # host), and their runs there.
                    await self.load()
                    self.last.update((job, run) for job, run in (await self.last_runs()).items()
                                     if run.get("status") != "running")
                self._due()
            except Exception:  # our bug: logged, and the schedule goes on
                log.exception("replication: internal error in the scheduler")

    def _due(self) -> None:
        """Start the enabled watermark jobs whose time has come."""
        now = time.time()
        for job in self.jobs().values():
            if not job.enabled or job.id in self.running or job.mode == "logical" or \
                    not all(name in self.config.databases for name in (job.source, *job.targets)):
                continue  # (a stored job naming a database the config no longer has: SHOW JOBS shows it)
            due = self.retry_at.get(job.id)
            if due is None:
                last = self.last.get(job.id)
                due = (last["started"].timestamp() + job.interval) if last else now
            if now >= due:
                self.retry_at.pop(job.id, None)
                self.start_run(job, scheduled=True)

    def start_run(self, job: Job, scheduled: bool = False) -> asyncio.Task[Run]:
        """Run ``job`` in the background (RUN JOB NOWAIT, the scheduler); JobError if it runs here already."""
        if job.id in self.running or job.id in self._starting:
            raise JobError(f"job {job.id} is running already", hint="SHOW JOBS shows its progress")
        self._starting.add(job.id)

        async def go() -> Run:
            self._starting.discard(job.id)
            return await self.run(job, scheduled=scheduled)
        task = asyncio.get_running_loop().create_task(go())
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        task.add_done_callback(_quiet)
        return task

    # -- running

    async def run(self, job: Job, scheduled: bool = False) -> Run:
        """Run ``job`` now, holding its lock; JobError when another process runs it, or when the
        default database (the lock and the history) does not answer. Whatever else goes wrong
        is the run's error: written to its history row, and the job tried again after a backoff."""
        if job.mode == "logical":
            raise JobError(f"job {job.id} is a logical replication: PostgreSQL carries its changes all the time",
                           hint="SHOW JOBS shows its state and lag; DISABLE JOB stops it")
        if job.id in self.running:
            raise JobError(f"job {job.id} is running already", hint="SHOW JOBS shows its progress")
        run = self.running[job.id] = Run(job.id)
        control: asyncpg.Connection | None = None
        run_id: int | None = None
        try:
            try:
                control = await self._control()
                await _ensure_schema(control)
                if not await control.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", JOB_LOCK, job.id):
                    self.retry_at[job.id] = time.time() + max(RETRY_FIRST, min(job.interval, 60.0))
                    raise JobError(f"job {job.id} is running in another pgfleet process",
                                   hint="SHOW JOBS there shows its progress; it finishes before another run starts")
                # Holding the lock, no other process runs it: a run left "running" died with its process.
                await control.execute("UPDATE pgfleet.replication_runs SET status = 'interrupted', "
                                      "finished = now() WHERE job = $1 AND status = 'running'", job.id)
                if scheduled:  # another process may have run it since this one looked
                    last = await control.fetchrow(_LAST_RUN, job.id)
                    if last is not None and last["started"].timestamp() + job.interval > time.time() and \
                            last["status"] in ("ok", "differs"):
                        self.last[job.id] = dict(last)
                        run.finished = time.time()
                        return run
                run_id = await control.fetchval(
                    "INSERT INTO pgfleet.replication_runs (job, started, status) VALUES ($1, to_timestamp($2), "
                    "'running') RETURNING id", job.id, run.started)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.retry_at[job.id] = time.time() + RETRY_FIRST * 2
                raise JobError(f"job {job.id}: the default database {self.config.default} (which holds the job "
                               f"lock and run history) did not answer: {exc}",
                               hint="check it (SHOW HEALTH)") from None
            try:
                await self._copy(job, run)
                self.copied[job.id] = self.copied.get(job.id, 0) + run.rows
                if job.verify:
                    await self._verify(job, run)
                    self.verified[job.id] = all(c.status == "ok" for c in run.checks)
            except Exception as exc:  # the run's error: recorded below, never lost
                run.errors[("*", "*")] = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, (JobError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                    log.exception("replication job %s: internal error", job.id)
            run.finished = time.time()
            await self._record(job, run, control, run_id)
            return run
        finally:
            run.finished = run.finished or time.time()
            self.running.pop(job.id, None)
            if control is not None:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await control.close()

    async def _record(self, job: Job, run: Run, control: asyncpg.Connection | None, run_id: int | None) -> None:
        """A finished run: its history row, this process's view, the log and the backoff."""
        assert run.finished is not None
        errors = "; ".join(f"{t} -> {d}: {e}" if t != "*" else e for (t, d), e in run.errors.items()) or None
        details = {"parts": [{"table": p.table, "target": p.target, "rows": p.rows,
                              "seconds": round(p.seconds, 3), "held": p.held} for p in run.parts],
                   "errors": [{"table": t, "target": d, "error": e} for (t, d), e in run.errors.items()]}
        if control is not None and run_id is not None:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await control.execute(
                    "UPDATE pgfleet.replication_runs SET finished = to_timestamp($2), status = $3, rows = $4, "
                    "error = $5, details = $6 WHERE id = $1", run_id, run.finished, run.status, run.rows, errors,
                    json.dumps(details))
        self.last[job.id] = {"job": job.id, "started": _ts(run.started), "finished": _ts(run.finished),
                             "status": run.status, "rows": run.rows, "error": errors, "details": details}
        if run.errors:
            backoff = min(self._backoff.get(job.id, RETRY_FIRST / 2) * 2, job.interval)
            self._backoff[job.id] = backoff
            self.retry_at[job.id] = time.time() + backoff
            log.warning("replication job %s: %s; tried again in %gs", job.id, errors, backoff)
        else:
            self._backoff.pop(job.id, None)
            log.info("replication job %s: %d rows in %.2fs (%s)", job.id, run.rows, run.finished - run.started,
                     run.status)

    async def _copy(self, job: Job, run: Run) -> None:
        timeout = self.config.pool.connect_timeout
        try:
            source = await replication_connect(self._dsn(job.source), timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            for table in job.tables:
                for target in job.targets:
                    run.parts.append(Progress(table, target))
                    run.errors[(table, target)] = f"source {job.source} unreachable: {exc}"
            return
        try:
            for table in job.tables:
                try:
                    shape = await shape_of(source, table, job.sync_key)
                except (ReplicationError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    for target in job.targets:
                        run.parts.append(Progress(table, target))
                        run.errors[(table, target)] = str(exc) if isinstance(exc, ReplicationError) else \
                            f"reading table {table} on the source {job.source}: {exc}"
                    if source.is_closed():
                        source = await replication_connect(self._dsn(job.source), timeout)
                    continue
                if not shape.indexed and (job.id, table) not in self._unindexed:
                    self._unindexed.add((job.id, table))
                    log.warning("replication job %s: table %s has no index that starts with its sync key %s on "
                                "the source %s, so every run reads the whole table to find what changed: "
                                "CREATE INDEX ON %s (%s, %s) there", job.id, shape.table, job.sync_key, job.source,
                                shape.table, job.sync_key, ", ".join(shape.pk))
                for target in job.targets:
                    progress = Progress(table, target)
                    run.parts.append(progress)
                    conn = await self._target(run, table, target)
                    if conn is None:
                        continue
                    try:
                        await copy_table(source, conn, job.id, job.source, shape, progress, job.batch_size)
                    except ReplicationError as exc:
                        run.errors[(table, target)] = str(exc)
                    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        run.errors[(table, target)] = f"{type(exc).__name__}: {exc}"
                        if source.is_closed():
                            source = await replication_connect(self._dsn(job.source), timeout)
                    finally:
                        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                            await conn.close()
        finally:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await source.close()

    async def _target(self, run: Run, table: str, target: str) -> asyncpg.Connection | None:
        """A connection to ``target``; None, and the run's error for (table, target), if it is down."""
        try:
            return await replication_connect(self._dsn(target), self.config.pool.connect_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            run.errors[(table, target)] = f"target unreachable: {exc}"
            return None

    # -- verification

    async def verify(self, job_id: str) -> Run:
        job = self.job(job_id)
        run = Run(job.id)
        await self._verify(job, run)
        run.finished = time.time()
        self.verified[job.id] = not run.errors and all(c.status == "ok" for c in run.checks)
        return run

    def metrics(self) -> list[tuple[str, float | None, float | None, bool | None, bool]]:
        """Per job, for /metrics: (id, last good run's start (epoch), rows of the last run, whether
        the last verification matched, running now)."""
        out = []
        for job in self.jobs().values():
            last = self.last.get(job.id, {})
            started = last.get("started")
            good = last.get("status") in ("ok", "differs") and started is not None
            out.append((job.id, started.timestamp() if good else None,
                        float(last["rows"]) if last.get("rows") is not None else None,
                        self.verified.get(job.id), job.id in self.running))
        return out

    async def _verify(self, job: Job, run: Run) -> None:
        """Every (table, target) of the job, checked; a target that fails is an error of its own,
        a source that fails a JobError."""
        timeout = self.config.pool.connect_timeout
        try:
            source = await replication_connect(self._dsn(job.source), timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise JobError(f"job {job.id}: the source {job.source} did not answer: {exc}") from None
        try:
            await source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            for table in job.tables:
                shape = await shape_of(source, table, job.sync_key if job.mode != "logical" else
                                       await _first_key(source, table))
                for target in job.targets:
                    conn = await self._target(run, table, target)
                    if conn is None:
                        continue
                    try:
                        run.checks += await verify_table(source, conn, target, shape)
                    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                        run.errors[(table, target)] = f"{type(exc).__name__}: {exc}"
                    finally:
                        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                            await conn.close()
        except ReplicationError as exc:
            raise JobError(f"job {job.id}: {exc}") from None
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise JobError(f"job {job.id}: reading the source {job.source} failed: {exc}") from None
        finally:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await source.close()

    # -- jobs made at run time

    async def create(self, spec: dict[str, Any]) -> Job:
        job = _from_spec(spec, stored=True)
        _check(job, self.config)
        if job.id in self.jobs():
            raise JobError(f"a replication job {job.id!r} exists already", hint="pick another id")
        conn = await self._control()
        try:
            await _ensure_schema(conn)
            await conn.execute("INSERT INTO pgfleet.replication_jobs (id, spec) VALUES ($1, $2)", job.id,
                               json.dumps(job.spec()))
            if job.mode == "logical" and job.enabled:  # a source without wal_level=logical refuses it
                try:
                    await logical.enable(self.config, job)
                except BaseException:
                    await conn.execute("DELETE FROM pgfleet.replication_jobs WHERE id = $1", job.id)
                    await logical.disable(self.config, job)  # whatever was made before the refusal
                    raise
        except asyncpg.UniqueViolationError:
            raise JobError(f"a replication job {job.id!r} exists already", hint="pick another id") from None
        finally:
            await conn.close()
        self.stored[job.id] = job
        return job

    async def set_enabled(self, job_id: str, enabled: bool) -> Job:
        job = self.job(job_id)
        if not job.stored:
            raise JobError(f"job {job_id} comes from the config file, which pgfleet does not write",
                           hint="set its enabled: in the config and RELOAD")
        changed = Job(**{**job.__dict__, "enabled": enabled})
        conn = await self._control()
        try:
            await conn.execute("UPDATE pgfleet.replication_jobs SET spec = $2 WHERE id = $1", job_id,
                               json.dumps(changed.spec()))
        finally:
            await conn.close()
        self.stored[job_id] = changed
        if changed.mode == "logical":
            if enabled:
                await logical.enable(self.config, changed)
            else:
                problems = await logical.disable(self.config, changed)
                if problems:
                    raise JobError(f"job {job_id} is disabled, but its logical replication is not all gone: "
                                   f"{'; '.join(problems)}", hint="DISABLE JOB again once those databases answer")
        return changed

    async def reload(self, config: Config) -> None:
        before = {job.id: job for job in self.jobs().values() if job.mode == "logical"}
        self.config = config
        await self.load()
        if self.scheduling:  # (the leader) logical jobs the config removed are taken down
            for job_id, job in before.items():
                if job_id not in self.jobs():
                    await logical.disable(config, job)
            await self.follow_logical()


_LAST_RUN = """
SELECT job, started, finished, status, rows, error, details FROM pgfleet.replication_runs
WHERE job = $1 AND status <> 'running' ORDER BY id DESC LIMIT 1"""

_LAST_RUNS = """
SELECT DISTINCT ON (job) job, started, finished, status, rows, error, details FROM pgfleet.replication_runs
WHERE status <> 'running' ORDER BY job, id DESC"""


# The last run of each job, a running one included (SHOW JOBS).
_LAST_RUNS_ANY = """
SELECT DISTINCT ON (job) job, started, finished, status, rows, error FROM pgfleet.replication_runs
ORDER BY job, id DESC"""


async def _first_key(source: asyncpg.Connection, table: str) -> str:
    """A logical job has no sync key: its table's first primary-key column stands in."""
    found = await source.fetchval(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = to_regclass($1) AND i.indisprimary", table)
    return str(found) if found is not None else ""


async def _ensure_schema(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute(_SCHEMA)
    except asyncpg.UniqueViolationError:  # another process made them at the same moment
        await conn.execute(_SCHEMA)


def _ts(wall: float) -> Any:
    import datetime as dt
    return dt.datetime.fromtimestamp(wall, dt.UTC)


def _quiet(task: asyncio.Task[Run]) -> None:
    """A scheduled run's JobError is its log line; the task ends quietly."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, JobError):
        if not exc.args[0].endswith("another pgfleet process"):
            log.warning("replication: %s", exc)
    elif exc is not None:
        log.error("replication: internal error in a run", exc_info=exc)


def _from_spec(spec: dict[str, Any], stored: bool) -> Job:
    """A job from the seeds' JSON (``sourceDatabase``, ``targetDatabases``, ``tables``,
    ``syncKey``, ``intervalMinutes``, ``enabled``); JobError naming a bad field."""
    def need(name: str, kind: type) -> Any:
        value = spec.get(name)
        if not isinstance(value, kind) or (isinstance(value, str | list) and not value):
            raise JobError(f"field {name} is missing or not a {'list' if kind is list else kind.__name__}",
                           hint="e.g. {\"id\": \"nightly\", \"sourceDatabase\": \"primary\", \"targetDatabases\": "
                                "[\"secondary\"], \"tables\": [\"users\"], \"syncKey\": \"updated_at\", "
                                "\"intervalMinutes\": 15, \"enabled\": true}")
        return value
    targets, tables = need("targetDatabases", list), need("tables", list)
    if not all(isinstance(t, str) and t for t in (*targets, *tables)):
        raise JobError("targetDatabases and tables must be lists of names")
    minutes = spec.get("intervalMinutes", 15)
    if not isinstance(minutes, int | float) or isinstance(minutes, bool) or minutes <= 0:
        raise JobError("field intervalMinutes must be a number of minutes above 0")
    mode = spec.get("mode", "watermark")
    if mode not in ("watermark", "logical"):
        raise JobError(f"field mode must be watermark or logical, not {mode!r}")
    job_id = spec.get("id") or f"{spec.get('sourceDatabase')}-{'-'.join(tables)}"
    if not isinstance(job_id, str):
        raise JobError("field id must be a string")
    enabled, verify, batch = spec.get("enabled", True), spec.get("verify", False), spec.get("batchSize", 20_000)
    if not isinstance(enabled, bool) or not isinstance(verify, bool):
        raise JobError("fields enabled and verify must be true or false")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise JobError("field batchSize must be a whole number of rows above 0")
    return Job(job_id, need("sourceDatabase", str), tuple(targets), tuple(tables),
               str(spec.get("syncKey", "updated_at")), float(minutes) * 60, enabled, mode, verify, batch, stored)


def _check(job: Job, config: Config) -> None:
    for database in (job.source, *job.targets):
        if database not in config.databases:
            raise JobError(f"{database!r} is not one of the databases", hint=f"the databases: "
                           f"{', '.join(config.databases)}")
    if job.source in job.targets:
        raise JobError(f"job {job.id}: the source {job.source} is also a target")


def ad_hoc(table: str, source: str, targets: list[str], sync_key: str, config: Config) -> Job:
    """``REPLICATE TABLE t FROM a TO b BY col``: a job that runs once. Its id names the table and
    source, so a second call goes on from the first one's watermark."""
    job = Job(f"table:{table}:{source}", source, tuple(targets), (table,), sync_key, enabled=False)
    _check(job, config)
    return job

