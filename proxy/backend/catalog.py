"""Control-plane reads of a backend's catalog (asyncpg; never on the statement path).

Today: the type of each sharded table's shard-key column, read off the first shard, which
decides how a key value hashes (DESIGN "Shard functions").
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ..config import Dsn

log = logging.getLogger("pgfleet.catalog")

_KEY_TYPES = """
select t.table_name, format_type(a.atttypid, null)
from unnest($1::text[], $2::text[]) as t(table_name, column_name)
join pg_attribute a on a.attrelid = to_regclass(t.table_name) and a.attname = t.column_name
where not a.attisdropped
"""


async def shard_key_types(dsn: Dsn, columns: dict[str, str], timeout: float) -> dict[str, str]:
    """``{table: type}`` for the ``{table: key column}`` that exist on the database at ``dsn``."""
    conn = await asyncio.wait_for(asyncpg.connect(
        host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, database=dsn.dbname,
        timeout=timeout, server_settings={"application_name": "pgfleet catalog"}), timeout)
    try:
        tables = list(columns)
        rows = await conn.fetch(_KEY_TYPES, tables, [columns[t] for t in tables], timeout=timeout)
    finally:
        await conn.close()
    return {row[0]: row[1] for row in rows}
