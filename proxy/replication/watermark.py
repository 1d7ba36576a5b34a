"""Watermark mode: copy the rows changed since the last run, exactly once, whatever happens.

Theory of operation. A table is copied from its source database to one target in batches,
ordered by the pair (sync_key, primary key); that pair is the *watermark*. Cursor-based sync
tools lose rows in five known ways; each has its answer here:

1. **Ties on the sync key across a batch boundary.** The watermark is the pair (sync_key, pk)
   and a batch reads ``WHERE (sync_key, pk...) > (watermark)``, so the rows sharing one sync
   key value are split exactly, never skipped or read twice.
2. **The max and the rows read in different snapshots.** Every batch of a run reads one
   REPEATABLE READ snapshot of the source.
3. **A crash between writing rows and saving the watermark.** The watermark is stored in the
   target (``pgfleet.replication_state``), in the same transaction as the batch of rows it
   covers. A crash at any point leaves the target with both or neither.
4. **Late commits.** A transaction that started before the run and commits after it writes
   rows whose sync key (set from ``now()`` or the clock while it ran) is older than rows
   already copied. Before taking its snapshot, a run reads the start of the oldest transaction
   still open on the source database (``pg_stat_activity.xact_start``, and the clock). That
   is the *horizon*: every row that will ever carry a sync key below it is already committed,
   so it is visible in the snapshot taken just after. Rows at or past the horizon are copied
   too, but the watermark never moves past the horizon, so the next run reads them again
   (the upsert by primary key makes a re-read harmless) together with whatever committed late.
   The horizon is also held SAFETY_LAG seconds further back. A ``timestamp without time
   zone`` or ``date`` key was written in its writer's time zone, so its bound is the earliest
   local time on Earth at the horizon. A sync key that is not a time (a version number, a
   sequence) is refused: nothing can tell its late commits from rows that are not there. A
   source that is a standby is refused too, because its ``pg_stat_activity`` cannot show the
   primary's transactions.
5. **Deletes.** Watermark mode cannot see them (nothing is left to read). ``mode: logical``
   carries them; ``VERIFY JOB`` finds the ranges where they are missing.

What no watermark can see: a writer that sets the sync key by hand to a time before the
watermark, or leaves it NULL. ``VERIFY JOB`` (verify.py) finds those rows' ranges.

The rows move as COPY in binary from the source straight into a temporary staging table on the
target (text if the two sides' types differ), then one ``INSERT ... ON CONFLICT (pk) DO UPDATE``
takes them into the table. A missing target table is created from the source's definition:
columns, types, NOT NULL and the primary key.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..config import Dsn

BATCH = 20_000
# A horizon further back than this (a transaction open that long on the source) and a run also
# copies the rows past it, without moving the watermark: data keeps flowing past a transaction
# that stays open.
HELD_BACK = 5.0
# The sync key types that are times (by the base type's oid, domains resolved): a run's
# horizon bounds them.
TIME_KINDS = {1184: "timestamptz", 1114: "timestamp", 1082: "date"}
# The horizon is held this much further back: the report of a transaction's start lags its
# start a little, and a writer's clock may be a little behind the database's.
SAFETY_LAG = 2.0
# Session settings of every replication connection, so that values travel as text the same
# way whatever the databases' defaults (DateStyle, TimeZone, ...) are.
SETTINGS = {"DateStyle": "ISO, MDY", "TimeZone": "UTC", "IntervalStyle": "postgres", "extra_float_digits": "3",
            "lock_timeout": "60s"}

STATE_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS pgfleet;
CREATE TABLE IF NOT EXISTS pgfleet.replication_state (
    job text NOT NULL,
    table_name text NOT NULL,
    source text NOT NULL,
    sync_value text NOT NULL,     -- the watermark: the sync key ...
    pk_values text[] NOT NULL,    -- ... and the primary key of the last row it covers
    rows_copied bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, table_name)
)
"""


class ReplicationError(Exception):
    """A copy that cannot run as configured (a table without a primary key, a missing sync key
    column, ...): one line for the operator."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str       # format_type(): the type as CREATE TABLE spells it
    not_null: bool


@dataclass(frozen=True)
class Shape:
    """A source table as the copy needs it."""

    table: str                 # schema-qualified and quoted
    columns: tuple[Column, ...]
    pk: tuple[str, ...]
    sync_key: str
    sync_type: str
    indexed: bool = True       # an index on the source leads with the sync key (else each run scans the table)
    schema: str = "public"     # the table's schema and name, unquoted
    name: str = ""
    sync_kind: str | None = "timestamptz"  # the sync key's base type when it is a time: timestamptz, timestamp, date

    @property
    def timed(self) -> bool:
        return self.sync_kind is not None

    def column_list(self) -> str:
        return ", ".join(quote(c.name) for c in self.columns)

    def order(self, descending: bool = False) -> str:
        way = " DESC" if descending else ""
        return ", ".join(f"{quote(name)}{way}" for name in (self.sync_key, *self.pk))

    def position(self) -> str:
        return f"({', '.join(quote(name) for name in (self.sync_key, *self.pk))})"

    def create(self) -> str:
        cols = [f"{quote(c.name)} {c.type}{' NOT NULL' if c.not_null else ''}" for c in self.columns]
        cols.append(f"PRIMARY KEY ({', '.join(quote(p) for p in self.pk)})")
        return f"CREATE TABLE IF NOT EXISTS {self.table} (\n    " + ",\n    ".join(cols) + "\n)"

    def type_of(self, name: str) -> str:
        return next(c.type for c in self.columns if c.name == name)


@dataclass
class Progress:
    """One (table, target) copy: what a run did so far (SHOW JOBS reads it while it runs)."""

    table: str
    target: str
    rows: int = 0
    batches: int = 0
    started: float = 0.0
    seconds: float = 0.0
    watermark: str | None = None
    held: bool = False  # the watermark stopped at the horizon (a transaction was open on the source)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute a
WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum"""

_PRIMARY_KEY = """
SELECT a.attname
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1::oid AND i.indisprimary
ORDER BY k.n"""

_QUALIFIED = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = $1::oid"""

_SYNC_BASE = """
SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1::oid AND a.attname = $2"""

# The horizon, read before the snapshot: the start of the oldest transaction open on this
# database (another session's), else the clock.
# The statement's start, not the clock: a transaction that begins while the view is read is
# missed by it, and began after that start.
_HORIZON = f"""
SELECT least(statement_timestamp(), min(xact_start)) - interval '{SAFETY_LAG} seconds', statement_timestamp()
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()"""

_SEES_ALL = """
SELECT r.rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER'), current_user, pg_is_in_recovery()
FROM pg_roles r WHERE r.rolname = current_user"""

# The horizon (an instant) as a bound of the sync key's type. A timestamp without time zone or
# a date was written in its writer's time zone, which pgfleet cannot know: the bound is the
# earliest local time anywhere on Earth at that instant (UTC-12, an hour more for daylight
# saving).
_BOUNDS = {"timestamptz": "{p}::timestamptz",
           "timestamp": "({p}::timestamptz AT TIME ZONE 'UTC') - interval '13 hours'",
           "date": "(({p}::timestamptz AT TIME ZONE 'UTC') - interval '13 hours')::date"}


async def replication_connect(dsn: Dsn, timeout: float) -> asyncpg.Connection:
    """A connection for copying or verifying, with the session settings pinned (SETTINGS)."""
    return await asyncio.wait_for(asyncpg.connect(
        host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, database=dsn.dbname, timeout=timeout,
        server_settings={"application_name": "pgfleet replication", **SETTINGS}), timeout)


async def shape_of(conn: asyncpg.Connection, table: str, sync_key: str) -> Shape:
    """The source table ``table`` as the copy needs it; ReplicationError when it cannot be copied."""
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    if oid is None:
        raise ReplicationError(f"table {table} does not exist on the source")
    schema, name = await conn.fetchrow(_QUALIFIED, oid)
    columns = tuple(Column(*row) for row in await conn.fetch(_COLUMNS, oid))
    pk = tuple(row[0] for row in await conn.fetch(_PRIMARY_KEY, oid))
    if not pk:
        raise ReplicationError(f"table {table} has no primary key: rows are upserted by it; add one "
                               "(ALTER TABLE ... ADD PRIMARY KEY) or use mode: logical with REPLICA IDENTITY FULL")
    names = [c.name for c in columns]
    if sync_key not in names:
        raise ReplicationError(f"table {table} has no column {sync_key} (the job's sync_key); "
                               f"its columns: {', '.join(names)}")
    sync_type = next(c.type for c in columns if c.name == sync_key)
    indexed = bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND "
        "a.attnum = i.indkey[0] WHERE i.indrelid = $1::oid AND a.attname = $2)", oid, sync_key))
    kind = TIME_KINDS.get(await conn.fetchval(_SYNC_BASE, oid, sync_key))
    return Shape(f"{quote(schema)}.{quote(name)}", columns, pk, sync_key, sync_type, indexed, schema, name, kind)


async def prepare_target(conn: asyncpg.Connection, shape: Shape) -> None:
    """The target table (from the source's definition, when missing) and the watermark table;
    nothing is created that exists (so a user without CREATE on the database can run a job
    whose tables are there)."""
    if await conn.fetchval("SELECT to_regnamespace($1) IS NULL", quote(shape.schema)):
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(shape.schema)}")
    if await conn.fetchval("SELECT to_regclass($1) IS NULL", shape.table):
        await conn.execute(shape.create())
    if await conn.fetchval("SELECT to_regclass('pgfleet.replication_state') IS NULL"):
        await conn.execute(STATE_SCHEMA)
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", shape.table)
    pk = [tuple(row) for row in await conn.fetch(_PRIMARY_KEY, oid)]
    if [p[0] for p in pk] != list(shape.pk):
        raise ReplicationError(f"table {shape.table} on the target has primary key ({', '.join(p[0] for p in pk)}), "
                               f"the source ({', '.join(shape.pk)}): rows are upserted by the source's; make them "
                               "the same")


async def watermark(conn: asyncpg.Connection, job: str, shape: Shape) -> tuple[str, list[str]] | None:
    row = await conn.fetchrow("SELECT sync_value, pk_values FROM pgfleet.replication_state "
                              "WHERE job = $1 AND table_name = $2", job, shape.table)
    return (row[0], list(row[1])) if row is not None else None


async def copy_table(source: asyncpg.Connection, target: asyncpg.Connection, job: str, source_name: str,
                     shape: Shape, progress: Progress, batch: int = BATCH) -> Progress:
    """Copy the rows of ``shape.table`` past the target's watermark. ``source`` must be outside
    a transaction: this opens the run's REPEATABLE READ snapshot itself.

    The rows come in one ``COPY (SELECT ... ORDER BY sync_key, pk) TO STDOUT`` per part, cut
    into batches of about ``batch`` whole lines; each batch is one transaction on the target.
    The first part, the rows below the horizon, moves the watermark with each batch to its last
    row. The second, the rows at or past it, is copied without moving it (the next run reads
    them again), when the horizon is more than HELD_BACK seconds old. A target table that was empty, with no watermark, takes the rows by COPY
    straight in (nothing there to conflict with); else they go through a staging table and an
    upsert."""
    progress.started = time.monotonic()
    if not shape.timed:
        raise ReplicationError(f"the sync key {shape.sync_key} of table {shape.table} is a {shape.sync_type}: a "
                               "watermark on a number cannot tell a row committed late from one that is not there; "
                               "use a timestamp column set when a row is written (updated_at), or mode: logical")
    sees_all, user, standby = await source.fetchrow(_SEES_ALL)
    if standby:
        raise ReplicationError(f"the source of table {shape.table} is a standby: its sessions do not show the "
                               "primary's open transactions, so a late commit could be missed; give the job the "
                               "primary's database")
    if not sees_all:
        raise ReplicationError(f"the source's user {user} cannot see other roles' transactions in "
                               f"pg_stat_activity, so a late commit could be missed: GRANT pg_read_all_stats TO {user} "
                               "on the source")
    if not await target.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", TABLE_LOCK, f"{job}:{shape.table}"):
        raise ReplicationError(f"table {shape.table} of job {job} is being copied to this target by another "
                               "pgfleet process: it finishes first")
    try:
        await prepare_target(target, shape)
        horizon, clock = await source.fetchrow(_HORIZON)
        position = await watermark(target, job, shape)  # where the last committed batch left off
        direct = position is None and not await target.fetchval(f"SELECT EXISTS (SELECT 1 FROM {shape.table})")
        if not direct:
            await target.execute(f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (LIKE {shape.table}) "
                                 "ON COMMIT DELETE ROWS")
        writer = _Writer(target, job, source_name, shape, progress, direct)
        await source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            where, args = _after(shape, position)
            sync = quote(shape.sync_key)
            bound = _BOUNDS[shape.sync_kind or "timestamptz"].format(p=f"${len(args) + 1}")
            # Below the horizon: each batch moves the watermark. At or past it: copied, not
            # moved, and only when a transaction has been open for a while (else they are the
            # last instant's rows, which the next run copies anyway: a second scan saved).
            await _stream(source, shape, f"{where} AND {sync} < {bound}", [*args, horizon], writer, batch, True)
            if (clock - horizon).total_seconds() > SAFETY_LAG + HELD_BACK or shape.sync_kind != "timestamptz":
                await _stream(source, shape, f"{where} AND {sync} >= {bound}", [*args, horizon], writer, batch,
                              False)
        finally:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await source.execute("ROLLBACK")
    finally:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await target.execute("SELECT pg_advisory_unlock($1, hashtext($2))", TABLE_LOCK, f"{job}:{shape.table}")
    progress.seconds = time.monotonic() - progress.started
    return progress


TABLE_LOCK = 0x7067726C  # "pgrl": the target's lock of one (job, table) copy; hashtext(job:table) the second key
STAGE = "pgfleet_stage"


def _after(shape: Shape, position: tuple[str, list[str]] | None) -> tuple[str, list[str]]:
    """The WHERE clause of the rows after ``position`` (and with a sync key), and its arguments."""
    sync = f" WHERE {quote(shape.sync_key)} IS NOT NULL"
    if position is None:
        return sync, []
    names = (shape.sync_key, *shape.pk)
    values = [position[0], *position[1]]
    params = ", ".join(f"${i + 1}::text::{shape.type_of(name)}" for i, name in enumerate(names))
    return f"{sync} AND {shape.position()} > ({params})", values


async def _stream(source: asyncpg.Connection, shape: Shape, where: str, args: list[Any], writer: _Writer,
                  batch: int, advance: bool) -> None:
    """COPY the rows ``where`` says, in order, cutting them into batches for ``writer``."""
    pending = bytearray()
    lines = 0
    failed: BaseException | None = None

    async def output(chunk: bytes) -> None:
        # Nothing may be raised from here: asyncpg would cancel a COPY that has ended and wait
        # for that for good. A failed batch is kept, the rest read and dropped, and it is
        # raised once the COPY is over.
        nonlocal lines, failed
        if failed is not None:
            return
        pending.extend(chunk)
        lines += chunk.count(b"\n")
        if lines >= batch:
            cut = pending.rfind(b"\n") + 1
            try:
                await writer.write(bytes(pending[:cut]), advance)
            except Exception as exc:  # noqa: BLE001 (raised as it was once the COPY is over)
                failed = exc
                return
            del pending[:cut]
            lines = pending.count(b"\n")

    await source.copy_from_query(f"SELECT {shape.column_list()} FROM {shape.table}{where} ORDER BY {shape.order()}",
                                 *args, output=output, format="text")
    if failed is not None:
        raise failed
    if pending:
        await writer.write(bytes(pending), advance)


class _Writer:
    """Batches of COPY text lines into the target, each with its watermark in one transaction."""

    def __init__(self, target: asyncpg.Connection, job: str, source_name: str, shape: Shape, progress: Progress,
                 direct: bool) -> None:
        self.target, self.job, self.source_name, self.shape = target, job, source_name, shape
        self.progress, self.direct = progress, direct
        names = [c.name for c in shape.columns]
        self.key_at = [names.index(name) for name in (shape.sync_key, *shape.pk)]

    async def write(self, data: bytes, advance: bool) -> None:
        shape, target = self.shape, self.target
        rows = data.count(b"\n")
        columns = [c.name for c in shape.columns]
        async with target.transaction():
            if self.direct:
                await target.copy_to_table(shape.name, schema_name=shape.schema,
                                           source=io.BytesIO(data), columns=columns, format="text")
            else:
                await target.copy_to_table(STAGE, source=io.BytesIO(data), columns=columns, format="text")
                await _upsert(target, STAGE, shape)
            if advance:
                last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:-1].split(b"\t")
                values = [_unescape(last[i]) for i in self.key_at]
                await target.execute(
                    "INSERT INTO pgfleet.replication_state AS s (job, table_name, source, sync_value, pk_values, "
                    "rows_copied) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job, table_name) DO UPDATE SET "
                    "sync_value = EXCLUDED.sync_value, pk_values = EXCLUDED.pk_values, "
                    "rows_copied = s.rows_copied + EXCLUDED.rows_copied, updated_at = now()",
                    self.job, shape.table, self.source_name, values[0], values[1:], rows)
                self.progress.watermark = values[0]
            else:
                self.progress.held = True
        self.progress.rows += rows
        self.progress.batches += 1


_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t",
            ord("v"): b"\v", ord("\\"): b"\\"}


def _unescape(field: bytes) -> str:
    """A value of COPY's text format as text (its backslash escapes undone)."""
    if b"\\" not in field:
        return field.decode()
    out = bytearray()
    i = 0
    while i < len(field):
        byte = field[i]
        if byte == 0x5C and i + 1 < len(field):  # a backslash (\N, NULL, never reaches here: keys are not NULL)
            out += _ESCAPES.get(field[i + 1], bytes([field[i + 1]]))
            i += 2
        else:
            out.append(byte)
            i += 1
    return out.decode()


async def _upsert(target: asyncpg.Connection, stage: str, shape: Shape) -> None:
    columns = shape.column_list()
    others = [c.name for c in shape.columns if c.name not in shape.pk]
    action = ("DO UPDATE SET " + ", ".join(f"{quote(n)} = EXCLUDED.{quote(n)}" for n in others)) if others \
        else "DO NOTHING"
    await target.execute(f"INSERT INTO {shape.table} ({columns}) SELECT {columns} FROM {stage} "
                         f"ON CONFLICT ({', '.join(quote(p) for p in shape.pk)}) {action}")
