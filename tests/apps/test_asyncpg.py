"""asyncpg through pgfleet on a sharded fleet that starts empty: executemany (one pipeline of
many rows, atomic, as asyncpg makes it, in and outside a transaction) and copy_records_to_table (binary COPY), every row
checked on the shard PostgreSQL's own PARTITION BY HASH would give it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from proxy.embedded import Cluster
from proxy.router.shard import shard_of
from tests.integration.conftest import KEYS, Fleet, rows_on, sharded_on

ROWS = [(user_id, user_id * 10) for user_id in range(1, 201)]


def placed(pg: Cluster, shards: tuple[str, str]) -> list[tuple[int, int]]:
    """Every ledger row, after checking it is on its shard."""
    found = []
    for index, dbname in enumerate(shards):
        for user_id, amount in rows_on(pg, dbname, "SELECT user_id, amount FROM ledger"):
            assert shard_of(user_id, "bigint", 2, "hash") == index
            found.append((user_id, amount))
    return sorted(found)


def test_executemany_and_copy_records(pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(**sharded_on(pg, empty_shards, {"ledger": "user_id"}, two_phase_commit=True))

    async def run() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=fleet.port, user="pf_server",
                                     password=KEYS["pf_server"][0], database="app")
        try:
            await conn.execute("CREATE TABLE ledger (user_id bigint NOT NULL, amount int NOT NULL)")
            insert = "INSERT INTO ledger (user_id, amount) VALUES ($1, $2)"
            # asyncpg's executemany is atomic: one pipeline, one implicit transaction. Over two
            # shards pgfleet makes it one transaction on both, committed in two phases.
            await conn.executemany(insert, ROWS)
            assert await conn.fetchval("SELECT count(*) FROM ledger") == len(ROWS)
            await conn.execute("DELETE FROM ledger")
            # A row that fails in the middle: nothing is written on either shard.
            with pytest.raises(asyncpg.NotNullViolationError):
                await conn.executemany(insert, [*ROWS[:100], (1000, None), *ROWS[100:]])
            assert await conn.fetchval("SELECT count(*) FROM ledger") == 0
            async with conn.transaction():
                await conn.executemany(insert, ROWS)
            assert await conn.fetchval("SELECT count(*) FROM ledger") == len(ROWS)
            await conn.execute("DELETE FROM ledger")
            assert await conn.copy_records_to_table("ledger", records=ROWS, columns=["user_id", "amount"]) \
                == f"COPY {len(ROWS)}"
        finally:
            await conn.close()

    asyncio.run(run())
    assert placed(pg, empty_shards) == sorted(ROWS)
    assert "Traceback" not in fleet.log()
