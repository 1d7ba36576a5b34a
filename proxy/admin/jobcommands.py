"""The admin console's replication job commands (replication/jobs.py): SHOW JOBS, RUN JOB,
VERIFY JOB, REPLICATE TABLE, ENABLE JOB, DISABLE JOB."""

from __future__ import annotations

import re
import time

from ..errors import (
    FEATURE_NOT_SUPPORTED,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    SYNTAX_ERROR,
    UNDEFINED_OBJECT,
    ClientError,
)
from ..replication import logical
from ..replication.jobs import JobError, Replicator, Run, ad_hoc
from ..replication.watermark import ReplicationError
from .command import Admin, Command, Result, Table, _time


async def _replicator(admin: Admin) -> Replicator:
    if admin.replicator is None:
        raise ClientError(FEATURE_NOT_SUPPORTED, "replication jobs do not run in this process",
                          hint="they run in pgfleet run (the admin console of a running pgfleet)")
    await admin.replicator.wait_loaded()
    return admin.replicator


def _job_error(exc: JobError | ReplicationError) -> ClientError:
    if isinstance(exc, JobError) and exc.missing:
        return ClientError(UNDEFINED_OBJECT, str(exc), hint=exc.hint)
    return ClientError(OBJECT_NOT_IN_PREREQUISITE_STATE, str(exc), hint=getattr(exc, "hint", None))


async def _jobs(admin: Admin, _: str) -> Table:
    replicator = await _replicator(admin)
    last = await replicator.last_runs()
    rows = []
    for job in replicator.jobs().values():
        run = replicator.running.get(job.id)
        done = last.get(job.id, {})
        lag: float | None = None
        progress = None
        if job.mode == "logical":
            states = await logical.status(replicator.config, job) if job.enabled else []
            lags = [s.lag_bytes for s in states if s.lag_bytes is not None]
            progress = ", ".join(f"{s.target}: {s.state}" for s in states) or None
            status = "streaming" if states and all(s.state == "streaming" for s in states) else \
                ("disabled" if not job.enabled else progress)
            lag = float(max(lags)) if lags else None
        else:
            status = done.get("status")
            if done.get("status") in ("ok", "differs", "partial") and done.get("started") is not None:
                lag = round(time.time() - done["started"].timestamp(), 1)
            if run is not None:
                progress = ", ".join(f"{p.table}->{p.target}: {p.rows} rows" for p in run.parts) or "starting"
            elif done.get("status") == "running":
                progress = "running in another pgfleet process"
        rows.append((job.id, job.mode, job.source, ",".join(job.targets), ",".join(job.tables),
                     job.sync_key if job.mode != "logical" else None, job.interval, job.enabled,
                     _time(done["started"].timestamp()) if done.get("started") else None, status,
                     done.get("rows"), lag, progress, done.get("error"), "api" if job.stored else "config"))
    return Table(("id", "mode", "source", "targets", "tables", "sync_key", "interval_s", "enabled", "last_run",
                  "last_status", "rows_copied", "lag", "running", "last_error", "defined_by"), rows)


def _parts(run: Run) -> Table:
    rows = [(p.table, p.target, p.rows, round(p.seconds, 3), run.errors.get((p.table, p.target), "ok"),
             p.watermark, p.held) for p in run.parts]
    return Table(("table", "target", "rows", "seconds", "status", "watermark", "held_at_horizon"), rows,
                 tag="RUN JOB")


async def _run_job(admin: Admin, argument: str) -> Result:
    replicator = await _replicator(admin)
    words = argument.split()
    nowait = len(words) == 2 and words[1].upper() == "NOWAIT"
    if len(words) != 1 and not nowait:
        raise ClientError(SYNTAX_ERROR, f"RUN JOB takes a job id and NOWAIT, not {argument!r}",
                          hint="RUN JOB <id> [NOWAIT]")
    try:
        job = replicator.job(words[0])
        if nowait:
            replicator.start_run(job)
            return "RUN JOB"
        return _parts(await replicator.run(job))
    except (JobError, ReplicationError) as exc:
        raise _job_error(exc) from None


async def _verify_job(admin: Admin, job_id: str) -> Table:
    try:
        run = await (await _replicator(admin)).verify(job_id.strip())
    except (JobError, ReplicationError) as exc:
        raise _job_error(exc) from None
    rows = [(c.table, c.target, c.low, c.high, c.source_rows, c.target_rows, c.status) for c in run.checks]
    rows += [(table, target, None, None, None, None, f"unavailable: {why}") for (table, target), why in run.errors.items()]
    return Table(("table", "target", "range_from", "range_to", "source_rows", "target_rows", "status"), rows,
                 tag="VERIFY JOB")


_REPLICATE = re.compile(r"^(\S+)\s+FROM\s+(\S+)\s+TO\s+(\S+(?:\s*,\s*\S+)*)\s+BY\s+(\S+)$", re.IGNORECASE)


async def _replicate(admin: Admin, argument: str) -> Table:
    found = _REPLICATE.match(argument.strip())
    if found is None:
        raise ClientError(SYNTAX_ERROR, f"cannot read REPLICATE TABLE {argument!r}",
                          hint="REPLICATE TABLE <table> FROM <database> TO <database>[,<database>] BY <sync key column>")
    table, source, targets, sync_key = found.groups()
    replicator = await _replicator(admin)
    try:
        job = ad_hoc(table, source, [t.strip() for t in targets.split(",")], sync_key, replicator.config)
        return _parts(await replicator.run(job))
    except (JobError, ReplicationError) as exc:
        raise _job_error(exc) from None


async def _enable(admin: Admin, job_id: str, enabled: bool) -> str:
    try:
        await (await _replicator(admin)).set_enabled(job_id.strip(), enabled)
    except (JobError, ReplicationError) as exc:
        raise _job_error(exc) from None
    return "ENABLE JOB" if enabled else "DISABLE JOB"


JOB_COMMANDS: tuple[Command, ...] = (
    Command(("SHOW", "JOBS"), None, _jobs, "replication jobs: mode, source, targets, last run and status, rows, "
            "lag (seconds since the last good run's snapshot; bytes for logical), progress"),
    Command(("RUN", "JOB"), "job id [NOWAIT]", _run_job, "run a replication job now and wait for it (one row per "
            "table and target); NOWAIT: start it and return", acts=True),
    Command(("VERIFY", "JOB"), "job id", _verify_job, "compare a job's tables on source and targets: counts and "
            "checksums per primary-key range, each ok or differs"),
    Command(("REPLICATE", "TABLE"), "table FROM db TO db[,db] BY column", _replicate,
            "copy a table's rows changed since the last such copy now (watermark mode)", acts=True),
    Command(("ENABLE", "JOB"), "job id", lambda admin, job: _enable(admin, job, True),
            "enable a job created over HTTP (config jobs: edit the config)", acts=True),
    Command(("DISABLE", "JOB"), "job id", lambda admin, job: _enable(admin, job, False),
            "disable a job created over HTTP (a logical one drops its subscriptions)", acts=True),
)
