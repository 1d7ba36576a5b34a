"""VERIFY JOB: compare a table on its source and a target, range by range of the primary key.

The source's rows are cut into ``RANGES`` ranges of about equal row counts by their primary key
(the lower bounds are every n-th key in key order). The first range is open below and the last
open above, so a target row outside the source's keys is still counted. For each range both
sides give a row count and a checksum, the sum of the first 64 bits of ``md5`` of each row's
text, which does not depend on the order of the rows. A range whose two figures differ is
reported ``differs``, with its bounds, so an operator can copy exactly that range again.

A row's text is ``ROW(columns...)::text``, in the source's column order. Two equal rows
therefore give the same text only when the columns have the same types on both sides, which is
the case for a table the job created.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from .watermark import Shape, quote

RANGES = 16


@dataclass(frozen=True)
class RangeCheck:
    table: str
    target: str
    low: str | None    # the range's first primary key, as text (None: open below)
    high: str | None   # the next range's first key (None: open above)
    source_rows: int
    target_rows: int
    source_sum: str
    target_sum: str

    @property
    def status(self) -> str:
        same = (self.source_rows, self.source_sum) == (self.target_rows, self.target_sum)
        return "ok" if same else "differs"


def _pk(shape: Shape) -> str:
    return f"({', '.join(quote(p) for p in shape.pk)})"


def _bound(shape: Shape, first: int) -> str:
    types = [shape.type_of(p) for p in shape.pk]
    return "(" + ", ".join(f"${first + i}::text::{t}" for i, t in enumerate(types)) + ")"


async def bounds(source: asyncpg.Connection, shape: Shape, ranges: int = RANGES) -> list[list[str]]:
    """The lower bounds of the ranges after the first (each a primary key, as text values)."""
    total = await source.fetchval(f"SELECT count(*) FROM {shape.table}")
    step = max(1, -(-total // ranges))
    keys = ", ".join(f"{quote(p)}::text" for p in shape.pk)
    rows = await source.fetch(
        f"SELECT {keys} FROM (SELECT {', '.join(quote(p) for p in shape.pk)}, "
        f"row_number() OVER (ORDER BY {', '.join(quote(p) for p in shape.pk)}) AS n FROM {shape.table}) x "
        f"WHERE n > 1 AND (n - 1) % $1 = 0 ORDER BY n", step)
    return [list(row) for row in rows]


async def _measure(conn: asyncpg.Connection, shape: Shape, low: list[str] | None,
                   high: list[str] | None) -> tuple[int, str]:
    where, args = [], []
    if low is not None:
        where.append(f"{_pk(shape)} >= {_bound(shape, len(args) + 1)}")
        args += low
    if high is not None:
        where.append(f"{_pk(shape)} < {_bound(shape, len(args) + 1)}")
        args += high
    row_text = "ROW(" + ", ".join(f"t.{quote(c.name)}" for c in shape.columns) + ")::text"
    count, checksum = await conn.fetchrow(
        f"SELECT count(*), coalesce(sum(('x' || substr(md5({row_text}), 1, 16))::bit(64)::bigint), 0)::text "
        f"FROM {shape.table} t" + (" WHERE " + " AND ".join(where) if where else ""), *args)
    return int(count), str(checksum)


async def verify_table(source: asyncpg.Connection, target: asyncpg.Connection, target_name: str,
                       shape: Shape, ranges: int = RANGES) -> list[RangeCheck]:
    """One row per range of the primary key: the counts and checksums of both sides."""
    exists = await target.fetchval("SELECT to_regclass($1) IS NOT NULL", shape.table)
    lows: list[list[str] | None] = [None, *await bounds(source, shape, ranges)]
    out = []
    for i, low in enumerate(lows):
        high = lows[i + 1] if i + 1 < len(lows) else None
        source_rows, source_sum = await _measure(source, shape, low, high)
        target_rows, target_sum = await _measure(target, shape, low, high) if exists else (0, "no table")
        out.append(RangeCheck(shape.table, target_name, _text(low), _text(high), source_rows, target_rows,
                              source_sum, target_sum))
    return out


def _text(key: list[str] | None) -> str | None:
    if key is None:
        return None
    return key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"
