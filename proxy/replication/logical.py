"""``mode: logical``: a job that PostgreSQL's own logical replication carries.

Enabling the job creates, when missing:
- on the source, a publication ``pgfleet_<job>`` for its tables;
- on each target, the tables (from the source's definition, as watermark mode does) and a
  subscription ``pgfleet_<job>_<target>`` to that publication, with its initial copy.

From then on PostgreSQL carries inserts, updates and deletes as they commit. Disabling or
removing the job drops the subscriptions (and with them their slots on the source) and the
publication. The status and lag come from ``pg_stat_subscription`` on each target and from the
slot on the source (``pg_current_wal_lsn() - confirmed_flush_lsn``, in bytes).

The source needs ``wal_level = logical``; the dsn users need the rights PostgreSQL asks for
(on PostgreSQL 15: a superuser to create a subscription, the table's owner to publish it).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from ..backend.catalog import connect
from ..config import Config, Dsn
from .watermark import ReplicationError, Shape, prepare_target, shape_of


class Job(Protocol):
    """What this module needs of a job (jobs.Job)."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def targets(self) -> tuple[str, ...]: ...
    @property
    def tables(self) -> tuple[str, ...]: ...

APPLICATION_NAME = "pgfleet replication"


def name_of(job_id: str, target: str | None = None) -> str:
    """A PostgreSQL name for the job's publication (or its subscription on ``target``): readable,
    and unique through a hash of the job id."""
    raw = job_id if target is None else f"{job_id}/{target}"
    clean = re.sub(r"[^a-z0-9_]", "_", raw.lower())[:40]
    return f"pgfleet_{clean}_{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def conninfo(dsn: Dsn) -> str:
    def value(v: str) -> str:
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    parts = [f"host={value(dsn.host)}", f"port={dsn.port}", f"dbname={value(dsn.dbname)}", f"user={value(dsn.user)}"]
    if dsn.password:
        parts.append(f"password={value(dsn.password)}")
    return " ".join(parts)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def enable(config: Config, job: Job) -> None:
    """Create what the job needs (idempotent); ReplicationError naming what is missing."""
    timeout = config.pool.connect_timeout
    source = await connect(config.dsn(job.source), timeout, APPLICATION_NAME)
    try:
        level = await source.fetchval("SHOW wal_level")
        if level != "logical":
            raise ReplicationError(f"job {job.id}: the source database {job.source} has wal_level={level}; "
                                   "logical replication needs wal_level=logical in its postgresql.conf "
                                   "(and a restart of that server)")
        shapes = [await _shape(source, table) for table in job.tables]
        publication = name_of(job.id)
        tables = ", ".join(shape.table for shape in shapes)
        if not await source.fetchval("SELECT true FROM pg_publication WHERE pubname = $1", publication):
            await source.execute(f"CREATE PUBLICATION {publication} FOR TABLE {tables}")
        else:  # the job's tables as they are now (one added, one removed)
            await source.execute(f"ALTER PUBLICATION {publication} SET TABLE {tables}")
    finally:
        await source.close()
    for target in job.targets:
        conn = await connect(config.dsn(target), timeout, APPLICATION_NAME)
        try:
            for shape in shapes:
                await prepare_target(conn, shape)
            subscription = name_of(job.id, target)
            if not await conn.fetchval("SELECT true FROM pg_subscription WHERE subname = $1", subscription):
                await conn.execute(f"CREATE SUBSCRIPTION {subscription} CONNECTION "
                                   f"{_literal(conninfo(config.dsn(job.source)))} PUBLICATION {publication}")
            else:
                await conn.execute(f"ALTER SUBSCRIPTION {subscription} REFRESH PUBLICATION")
        finally:
            await conn.close()


async def _shape(source: asyncpg.Connection, table: str) -> Shape:
    """The table's shape with its first primary-key column standing in for the sync key (a
    logical job has none)."""
    pk = await source.fetchval(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND "
        "a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass($1) AND i.indisprimary", table)
    if pk is None:
        exists = await source.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
        raise ReplicationError(f"table {table} does not exist on the source" if not exists else
                               f"table {table} has no primary key: logical replication of updates and deletes "
                               "needs one (or REPLICA IDENTITY FULL, which pgfleet does not set up)")
    return await shape_of(source, table, pk)


async def disable(config: Config, job: Job) -> list[str]:
    """Drop the subscriptions and the publication; what could not be dropped, in words."""
    problems = []
    timeout = config.pool.connect_timeout
    for target in job.targets:
        try:
            conn = await connect(config.dsn(target), timeout, APPLICATION_NAME)
            try:
                subscription = name_of(job.id, target)
                if await conn.fetchval("SELECT true FROM pg_subscription WHERE subname = $1", subscription):
                    await conn.execute(f"DROP SUBSCRIPTION {subscription}")
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            problems.append(f"{target}: {exc}")
    try:
        source = await connect(config.dsn(job.source), timeout, APPLICATION_NAME)
        try:
            await source.execute(f"DROP PUBLICATION IF EXISTS {name_of(job.id)}")
        finally:
            await source.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        problems.append(f"{job.source}: {exc}")
    return problems


@dataclass(frozen=True)
class TargetState:
    target: str
    state: str                 # streaming, copying, disabled, missing, unreachable
    lag_bytes: int | None      # WAL the subscription has not confirmed yet
    last_message: str | None   # pg_stat_subscription.last_msg_receipt_time


async def status(config: Config, job: Job) -> list[TargetState]:
    timeout = config.pool.connect_timeout
    lags: dict[str, int | None] = {}
    try:
        source = await connect(config.dsn(job.source), timeout, APPLICATION_NAME)
        try:
            for row in await source.fetch(
                    "SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
                    "FROM pg_replication_slots WHERE slot_name LIKE 'pgfleet\\_%'"):
                lags[row[0]] = row[1]
        finally:
            await source.close()
    except (OSError, TimeoutError, asyncpg.PostgresError):
        pass
    out = []
    for target in job.targets:
        subscription = name_of(job.id, target)
        try:
            conn = await connect(config.dsn(target), timeout, APPLICATION_NAME)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            out.append(TargetState(target, "unreachable", lags.get(subscription), None))
            continue
        try:
            row = await conn.fetchrow(
                "SELECT s.subenabled, st.pid IS NOT NULL AS running, st.last_msg_receipt_time::text, "
                "(SELECT count(*) FROM pg_subscription_rel r WHERE r.srsubid = s.oid AND r.srsubstate <> 'r') "
                "FROM pg_subscription s LEFT JOIN pg_stat_subscription st ON st.subid = s.oid AND st.relid IS NULL "
                "WHERE s.subname = $1", subscription)
        finally:
            await conn.close()
        if row is None:
            state = "missing"
        elif not row[0]:
            state = "disabled"
        elif row[3]:
            state = "copying"
        else:
            state = "streaming" if row[1] else "starting"
        out.append(TargetState(target, state, lags.get(subscription), row[2] if row is not None else None))
    return out
