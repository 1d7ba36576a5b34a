"""Control-plane reads of a backend's catalog (asyncpg; never on the statement path).

Today: the type of each sharded table's shard-key column, read off the first shard, which
decides how a key value hashes (DESIGN "Shard functions"); and each database's collation,
which decides whether pgfleet may merge text sort keys by their bytes.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ..config import Dsn

log = logging.getLogger("pgfleet.catalog")

_KEY_TYPES = """
select t.table_name, format_type(a.atttypid, null),
       (select count(*) from pg_attribute b where b.attrelid = a.attrelid and b.attnum > 0
        and b.attnum < a.attnum and not b.attisdropped)::int
from unnest($1::text[], $2::text[]) as t(table_name, column_name)
join pg_attribute a on a.attrelid = to_regclass(t.table_name) and a.attname = t.column_name
where not a.attisdropped
"""


_COLLATION = """
select d.datcollate, coalesce(to_jsonb(d) ->> 'datlocprovider', 'c'), coalesce(to_jsonb(d) ->> 'datlocale', '')
from pg_database d where d.datname = current_database()
"""
# Collations whose order is the order of the UTF-8 bytes (code points).
BYTE_ORDER = frozenset({"c", "posix", "c.utf-8", "c.utf8", "ucs_basic"})


async def connect(dsn: Dsn, timeout: float, application_name: str = "pgfleet catalog") -> asyncpg.Connection:
    """A control-plane connection to the database at ``dsn``."""
    return await asyncio.wait_for(asyncpg.connect(
        host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, database=dsn.dbname,
        timeout=timeout, server_settings={"application_name": application_name}), timeout)


async def byte_order(dsn: Dsn, timeout: float) -> bool:
    """Whether the database at ``dsn`` sorts text in byte order (a C collation)."""
    conn = await connect(dsn, timeout)
    try:
        collate, provider, locale = await conn.fetchrow(_COLLATION, timeout=timeout)
    finally:
        await conn.close()
    if provider == "b":  # PostgreSQL 17's builtin provider: C and C.UTF-8 are code-point order
        return locale.lower() in BYTE_ORDER
    return provider == "c" and collate.lower() in BYTE_ORDER


async def shard_key_types(dsn: Dsn, columns: dict[str, str], timeout: float) -> dict[str, tuple[str, int]]:
    """``{table: (type, position)}`` for the ``{table: key column}`` that exist on the database
    at ``dsn``; position: the key's place among the table's columns (0-based), where an INSERT
    without a column list puts it."""
    conn = await connect(dsn, timeout)
    try:
        tables = list(columns)
        rows = await conn.fetch(_KEY_TYPES, tables, [columns[t] for t in tables], timeout=timeout)
    finally:
        await conn.close()
    return {row[0]: (row[1], row[2]) for row in rows}


_COLUMNS = """
SELECT attname FROM pg_attribute
WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
ORDER BY attnum
"""


async def table_columns(dsn: Dsn, table: str, timeout: float) -> list[str]:
    """The columns a COPY without a column list fills, in order (none: no such table)."""
    conn = await connect(dsn, timeout)
    try:
        rows = await conn.fetch(_COLUMNS, table, timeout=timeout)
    finally:
        await conn.close()
    return [row[0] for row in rows]
