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
   A sync key that is not a time (a version number, a sequence) has no horizon: the watermark
   moves only in a run that started while no other transaction was open on the source.
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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

BATCH = 20_000
# The sync key types that are times: a run's horizon bounds them.
TIME_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")

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

    @property
    def timed(self) -> bool:
        return self.sync_type in TIME_TYPES

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
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = $1::oid"""

# The horizon, read before the snapshot: the start of the oldest transaction open on this
# database (another session's), else the clock.
_HORIZON = """
SELECT least(clock_timestamp(), min(xact_start)), count(xact_start),
       count(*) FILTER (WHERE state IS NULL AND backend_type = 'client backend'), current_user
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()"""


async def shape_of(conn: asyncpg.Connection, table: str, sync_key: str) -> Shape:
    """The source table ``table`` as the copy needs it; ReplicationError when it cannot be copied."""
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    if oid is None:
        raise ReplicationError(f"table {table} does not exist on the source")
    qualified = await conn.fetchval(_QUALIFIED, oid)
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
    return Shape(qualified, columns, pk, sync_key, sync_type)


async def prepare_target(conn: asyncpg.Connection, shape: Shape) -> None:
    """The target table (from the source's definition, when missing) and the watermark table."""
    schema = shape.table.split(".", 1)[0]
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    await conn.execute(shape.create())
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
                     shape: Shape, progress: Progress, batch: int = BATCH, binary: bool = True) -> Progress:
    """Copy the rows of ``shape.table`` past the target's watermark, batch by batch, each batch
    committed on the target together with its watermark. ``source`` must be outside a
    transaction: this opens the run's REPEATABLE READ snapshot itself."""
    progress.started = time.monotonic()
    await prepare_target(target, shape)
    horizon, open_transactions, hidden, user = await source.fetchrow(_HORIZON)
    if hidden:
        raise ReplicationError(f"the source's user {user} cannot see the transactions of other roles' sessions "
                               f"(pg_stat_activity hides {hidden}), so a late commit could be missed: GRANT "
                               f"pg_read_all_stats TO {user} on the source")
    # The watermark may move only below the horizon (a time), or not at all while another
    # transaction is open and the sync key is not a time.
    frozen = not shape.timed and open_transactions > 0
    stage = "pgfleet_stage"
    await target.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {shape.table}) ON COMMIT DELETE ROWS")
    await source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        position = await watermark(target, job, shape)  # where the last committed batch left off
        while True:
            where, args = _after(shape, position)
            query = (f"SELECT {shape.column_list()} FROM {shape.table}{where} "
                     f"ORDER BY {shape.order()} LIMIT {int(batch)}")
            async with target.transaction():
                try:
                    copied = await _pipe(source, target, query, args, stage, shape, binary)
                except (asyncpg.DataError, asyncpg.FeatureNotSupportedError, asyncpg.InvalidBinaryRepresentationError):
                    if not binary:
                        raise
                    raise _Retry() from None  # the target's types differ from the source's: text it is
                if copied == 0:
                    break
                last = await target.fetchrow(
                    f"SELECT {_as_text(shape)} FROM {stage} ORDER BY {shape.order(descending=True)} LIMIT 1")
                below = None if frozen else await _last_below(target, stage, shape, horizon)
                await _upsert(target, stage, shape)
                if below is not None:
                    await target.execute(
                        "INSERT INTO pgfleet.replication_state AS s (job, table_name, source, sync_value, pk_values, "
                        "rows_copied) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job, table_name) DO UPDATE SET "
                        "sync_value = EXCLUDED.sync_value, pk_values = EXCLUDED.pk_values, "
                        "rows_copied = s.rows_copied + EXCLUDED.rows_copied, updated_at = now()",
                        job, shape.table, source_name, below[0], list(below[1:]), copied)
                    progress.watermark = below[0]
                if below is None or tuple(below) != tuple(last):
                    progress.held = True
            progress.rows += copied
            progress.batches += 1
            position = (last[0], list(last[1:]))
            if copied < batch:
                break
    except _Retry:
        await source.execute("ROLLBACK")
        return await copy_table(source, target, job, source_name, shape, progress, batch, binary=False)
    finally:
        if source.is_in_transaction():
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await source.execute("ROLLBACK")
    progress.seconds = time.monotonic() - progress.started
    return progress


class _Retry(Exception):
    """The batch goes again in text format."""


def _after(shape: Shape, position: tuple[str, list[str]] | None) -> tuple[str, list[str]]:
    if position is None:
        return "", []
    names = (shape.sync_key, *shape.pk)
    values = [position[0], *position[1]]
    params = ", ".join(f"${i + 1}::text::{shape.type_of(name)}" for i, name in enumerate(names))
    return f" WHERE {shape.position()} > ({params})", values


def _as_text(shape: Shape) -> str:
    # Named w0, w1, ...: an output column named like a table column would be what ORDER BY sorts
    # (as text: '999' after '1000').
    return ", ".join(f"{quote(name)}::text AS w{i}" for i, name in enumerate((shape.sync_key, *shape.pk)))


async def _last_below(target: asyncpg.Connection, stage: str, shape: Shape, horizon: object) -> asyncpg.Record | None:
    """The last staged row whose sync key is below the horizon: the new watermark (None: none)."""
    if shape.timed:
        return await target.fetchrow(
            f"SELECT {_as_text(shape)} FROM {stage} WHERE {quote(shape.sync_key)} < $1::timestamptz::{shape.sync_type} "
            f"ORDER BY {shape.order(descending=True)} LIMIT 1", horizon)
    return await target.fetchrow(f"SELECT {_as_text(shape)} FROM {stage} ORDER BY {shape.order(descending=True)} LIMIT 1")


async def _upsert(target: asyncpg.Connection, stage: str, shape: Shape) -> None:
    columns = shape.column_list()
    others = [c.name for c in shape.columns if c.name not in shape.pk]
    action = ("DO UPDATE SET " + ", ".join(f"{quote(n)} = EXCLUDED.{quote(n)}" for n in others)) if others \
        else "DO NOTHING"
    await target.execute(f"INSERT INTO {shape.table} ({columns}) SELECT {columns} FROM {stage} "
                         f"ON CONFLICT ({', '.join(quote(p) for p in shape.pk)}) {action}")


async def _pipe(source: asyncpg.Connection, target: asyncpg.Connection, query: str, args: list[str],
                stage: str, shape: Shape, binary: bool) -> int:
    """COPY the query's rows from the source straight into the staging table; how many."""
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
    form = "binary" if binary else "text"

    async def output(data: bytes) -> None:
        await chunks.put(bytes(data))

    async def produce() -> None:
        try:
            await source.copy_from_query(query, *args, output=output, format=form)
        finally:
            await chunks.put(None)

    async def rows() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    producer = asyncio.get_running_loop().create_task(produce())
    try:
        status = await target.copy_to_table(stage, source=rows(), columns=[c.name for c in shape.columns],
                                            format=form)
    except BaseException:
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer
        raise
    await producer
    return int(status.split()[-1])
