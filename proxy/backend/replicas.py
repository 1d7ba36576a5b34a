"""Read replicas (``databases.NAME.replicas: [dsn, ...]``): their pools, checks and the pick.

A replica takes a database's plain SELECTs outside transactions (the session decides which:
``Analysis.replica_safe``), round-robin over the replicas that are usable: the last check
answered, the server is in recovery (a standby, not a promoted or misconfigured primary),
and its replay lag is at most ``max_replica_lag``. With none usable the primary answers.

Checks run every ``health.interval`` (and once at start) over an asyncpg control-plane
connection: lag is 0 while the standby has replayed all it received, else (replay behind,
or not streaming) the age of the last transaction it replayed (an idle primary sends
nothing, so a replay timestamp alone would grow while the replica is perfectly current). A
replica that fails a connection between checks is skipped at once (``failed``) and its read
goes to the primary. A replica pool is named
``DATABASE~replicaN``; its connections carry that name, which is how they find their pool
again (``Fleet.pool_of``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import asyncpg

from ..config import Config, Dsn, parse_dsn
from .catalog import connect
from .pool import DisconnectReason, Pool

log = logging.getLogger("pgfleet.replicas")

_LAG = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END::float8
"""


class Replica:
    def __init__(self, database: str, index: int, dsn: Dsn, pool: Pool, max_lag: float) -> None:
        self.database = database
        self.index = index
        self.dsn = dsn
        self.pool = pool
        self.max_lag = max_lag
        self.answered = False  # the last check answered (False until the first one)
        self.standby = False
        self.lag: float | None = None
        self.last_check: float | None = None
        self.last_error: str | None = "not checked yet"

    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def usable(self) -> bool:
        return self.answered and self.standby and self.lag is not None and self.lag <= self.max_lag \
            and self.pool.outage is None


class Replicas:
    """Every database's replicas, and which one takes the next read."""

    def __init__(self, config: Config, make_pool: Callable[[str, Dsn, int], Pool]) -> None:
        self.interval = config.health.interval
        self.timeout = config.health.timeout
        self.sets: dict[str, list[Replica]] = {}
        self.pools: dict[str, Pool] = {}
        for name, db in config.databases.items():
            for i, text in enumerate(db.replicas):
                dsn = parse_dsn(text, f"databases.{name}.replicas[{i}]")
                pool = make_pool(f"{name}~replica{i}", dsn, db.pool_size or config.pool.size)
                self.pools[pool.name] = pool
                self.sets.setdefault(name, []).append(Replica(name, i, dsn, pool, db.max_replica_lag))
        self._next: dict[str, int] = {name: 0 for name in self.sets}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def __iter__(self) -> Iterator[Replica]:
        for replicas in self.sets.values():
            yield from replicas

    def pick(self, database: str) -> Pool | None:
        """The next usable replica of ``database`` (round-robin), or None: the primary answers."""
        replicas = self.sets.get(database)
        if not replicas:
            return None
        n = len(replicas)
        start = self._next[database]
        for step in range(n):
            replica = replicas[(start + step) % n]
            if replica.usable:
                self._next[database] = (start + step + 1) % n
                return replica.pool
        return None

    def failed(self, name: str, why: str) -> str | None:
        """A replica pool could not give a connection: skip it until a check says otherwise;
        the database whose primary takes the read instead (None: not a replica)."""
        for replica in self:
            if replica.name == name:
                if replica.answered:
                    log.warning("replica %s of database %s is skipped: %s; its reads go to the other "
                                "replicas or the primary", name, replica.database, why)
                replica.answered, replica.lag, replica.last_error = False, None, why
                return replica.database
        return None

    # -- checks

    def start(self) -> None:
        if self.sets:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pgfleet replicas")

    async def stop(self, close: bool = True) -> None:
        """Stop checking; ``close``: close the pools too (at shutdown, not at a reload).

        Python 3.11 can lose a cancel (``wait_for`` racing the result it waits for, as in
        ``catalog.connect``), so the task is cancelled again until it has ended, and a check
        round that finishes anyway ends it (see HealthChecker.stop)."""
        self._stopping = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        if close:
            for pool in self.pools.values():
                pool.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:  # our bug: logged with its traceback, and the checks go on
                log.exception("internal error in the replica checks")
            if self._stopping:
                return
            await asyncio.sleep(self.interval)

    async def check_now(self) -> None:
        await asyncio.gather(*(self._check(replica) for replica in self))

    async def _check(self, replica: Replica) -> None:
        was = replica.usable
        try:
            conn = await connect(replica.dsn, self.timeout, "pgfleet replica check")
            try:
                standby, lag = await conn.fetchrow(_LAG, timeout=self.timeout)
            finally:
                conn.terminate()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            replica.answered, replica.lag = False, None
            replica.last_error = str(exc) or type(exc).__name__
        else:
            replica.answered, replica.standby, replica.lag = True, bool(standby), float(lag)
            replica.last_error = None if standby else "not in recovery (a primary, not a standby)"
            if standby and lag > replica.max_lag:
                replica.last_error = f"replay lag {lag:.1f}s is over max_replica_lag {replica.max_lag:g}s"
        replica.last_check = time.time()
        if was and not replica.usable:
            closed = replica.pool.close_idle(DisconnectReason.DOWN)
            log.warning("replica %s of database %s is skipped: %s; its reads go to the other replicas or "
                        "the primary (%d idle connection(s) closed)", replica.name, replica.database,
                        replica.last_error, closed)
        elif replica.usable and not was:
            log.info("replica %s of database %s takes reads (lag %.1fs)", replica.name, replica.database,
                     replica.lag or 0.0)
