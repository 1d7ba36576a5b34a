"""Whether the sequences of sharded tables hand out ids that no other shard hands out.

pgfleet interleaves them when it creates a sharded table (shard *i* of *n*: start *i + 1*,
increment *n*; ``router.shard.interleave_sequences``). Tables created before, or outside
pgfleet, may not be: this reads every shard's sequences owned by the sharded tables' columns
and, for each that overlaps, the ``ALTER SEQUENCE`` that fixes it (its next value past every
shard's last one, in its own residue class). The console's ``SHOW SEQUENCES`` and ``pgfleet
check`` show it. Control-plane connections (asyncpg), never pooled.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from ..backend.catalog import connect
from ..config import Config

_OWNED = """
SELECT t.relname, s.oid::regclass::text, q.seqincrement, q.seqstart, pg_catalog.pg_sequence_last_value(s.oid)
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid
JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
  AND d.deptype IN ('a', 'i') AND t.relname = ANY($1::text[])
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class ShardSequence:
    table: str
    sequence: str
    database: str
    index: int               # the shard's place in sharding.shards
    increment: int
    start: int
    last_value: int | None   # None: never used
    fix: str | None          # the ALTER SEQUENCE to run on that shard; None: it interleaves


def interleaves(index: int, count: int, increment: int, start: int) -> bool:
    """Whether a sequence of shard ``index`` of ``count`` hands out only its own residue class."""
    return increment == count and (start - (index + 1)) % count == 0


def next_value(index: int, count: int, past: int) -> int:
    """The smallest value above ``past`` that shard ``index`` of ``count`` may hand out."""
    value = past + 1
    return value + ((index + 1) - value) % count


async def read(config: Config) -> tuple[list[ShardSequence], list[tuple[str, str]]]:
    """Every shard's sequences of the sharded tables, with a fix for each that overlaps; and
    the shards that could not be read, with why."""
    shards = config.sharding.shards
    tables = sorted(config.sharding.tables)
    if not shards or not tables:
        return [], []

    async def one(database: str) -> list[asyncpg.Record]:
        conn = await connect(config.dsn(database), config.pool.connect_timeout, "pgfleet sequences")
        try:
            return list(await conn.fetch(_OWNED, tables, timeout=config.pool.connect_timeout))
        finally:
            conn.terminate()

    found = await asyncio.gather(*(one(db) for db in shards), return_exceptions=True)
    problems: list[tuple[str, str]] = []
    rows: list[tuple[str, int, asyncpg.Record]] = []
    for index, (database, result) in enumerate(zip(shards, found, strict=True)):
        if isinstance(result, BaseException):
            problems.append((database, str(result) or type(result).__name__))
            continue
        rows.extend((database, index, record) for record in result)
    # The last value handed out anywhere, per sequence name: the fix starts past it.
    past: dict[str, int] = {}
    for _, _, record in rows:
        last = record[4] if record[4] is not None else record[3] - 1
        past[record[1]] = max(past.get(record[1], last), last)
    out = []
    count = len(shards)
    for database, index, (table, sequence, increment, start, last_value) in rows:
        fix = None
        if not interleaves(index, count, increment, start):
            value = next_value(index, count, past[sequence])
            fix = f"ALTER SEQUENCE {sequence} INCREMENT BY {count} START WITH {value} RESTART WITH {value}"
        out.append(ShardSequence(table, sequence, database, index, increment, start, last_value, fix))
    return out, problems
