"""The two-phase commit log and its recovery (DESIGN "Transactions": ``two_phase_commit``).

A transaction that wrote on several databases commits in two phases (``Scatter.commit_prepared``):

1. ``PREPARE TRANSACTION '<gid>_<n>'`` on each participant;
2. once all are prepared, a row for ``<gid>`` goes into ``pgfleet.twophase`` in the default
   database, in its own transaction: that row *is* the decision to commit;
3. ``COMMIT PREPARED`` on each participant; then the row is deleted (in the background).

A failure before the row is written rolls the prepared parts back, and so does recovery
(presumed abort: no row means roll back). After it, the client is told COMMIT and whatever a
participant still holds prepared is committed by recovery.

Global ids are ``pgfleet_<owner>_<seq>_<n>``: ``owner`` names this process (8 hex digits),
``seq`` its transaction, ``n`` the participant (two databases of one cluster need two ids).
While the process lives it holds the advisory lock (LOCK_CLASS, owner) on the default database,
so recovery can tell a live pgfleet's transactions, which it leaves alone, from a dead one's.
Recovery runs at start and every RECOVERY_INTERVAL: it reads each database's
``pg_prepared_xacts`` and finishes every ``pgfleet_`` id whose owner is dead (or is this
process, when the transaction is no longer in flight here), as its row says.

In a process group (``pgfleet run --workers N``) each worker is an owner of its own, and only
the leader (worker 0) recovers what dead owners left, once for the group. Another worker
scans only when a transaction of its own ended with a participant unfinished, and then only
for its own ids.

The control plane speaks through asyncpg, like ``catalog``; the participants' PREPARE and
COMMIT PREPARED run on the clients' own backends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets

import asyncpg

from ..config import Config
from .catalog import connect

log = logging.getLogger("pgfleet.twophase")

LOCK_CLASS = 0x7067666C  # "pgfl": the advisory lock's first key; the owner is the second
RECOVERY_INTERVAL = 30.0
FORGET_INTERVAL = 1.0
GID = re.compile(r"^(pgfleet_([0-9a-f]{8})_\d+)_\d+$")

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS pgfleet;
CREATE TABLE IF NOT EXISTS pgfleet.twophase (
    gid text PRIMARY KEY,
    owner text NOT NULL,
    databases text[] NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now()
)
"""
_PREPARED = r"SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'pgfleet\_%'"

_CONTROL_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class NotDecided(Exception):
    """The decision row was refused: the transaction did not commit anywhere."""


class Unknown(Exception):
    """The decision row may or may not have been written (the connection broke)."""


def _lock_key(owner: str) -> int:
    return int(owner, 16) - (1 << 31)  # a signed int4


class Coordinator:
    """This process's side of two-phase commit: ids, the decision log, recovery."""

    def __init__(self, config: Config, leader: bool = True) -> None:
        self.config = config
        self.leader = leader  # recovers dead owners' transactions (else only this process's own)
        self.left = 0  # transactions of this process that ended with a participant unfinished
        self.scanned_all = False  # the last recovery read every database (and cleaned the log)
        self.owner = ""
        self.inflight: set[str] = set()  # gids of this process between PREPARE and the end
        self._seq = 0
        self._lock: asyncpg.Connection | None = None  # holds the owner's advisory lock
        self._log: asyncpg.Pool | None = None
        self._finished: list[str] = []  # gids whose row can go
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._log is not None and self._lock is not None and not self._lock.is_closed()

    # -- lifecycle

    async def start(self) -> None:
        """Take an owner id and recover what dead pgfleets left prepared; then keep doing it."""
        await self._connect()
        if self.ready and self.leader:
            await self.recover()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._log is not None:
            await self._forget()
            self._log.terminate()
            self._log = None
        if self._lock is not None:
            self._lock.terminate()
            self._lock = None

    async def _connect(self) -> None:
        database = self.config.default
        dsn = self.config.dsn(database)
        timeout = self.config.pool.connect_timeout
        try:
            if self._lock is None or self._lock.is_closed():
                conn = await connect(dsn, timeout, "pgfleet two-phase commit")
                try:
                    try:
                        await conn.execute(_SCHEMA)
                    except asyncpg.UniqueViolationError:  # another pgfleet created it at the same time
                        await conn.execute(_SCHEMA)
                    owner = self.owner or secrets.token_hex(4)
                    while not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, _lock_key(owner)):
                        owner = secrets.token_hex(4)
                except BaseException:
                    conn.terminate()
                    raise
                self._lock, self.owner = conn, owner
            if self._log is None:
                self._log = await asyncpg.create_pool(
                    host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, database=dsn.dbname,
                    min_size=1, max_size=4, timeout=timeout,
                    server_settings={"application_name": "pgfleet two-phase commit"})
            log.info("two-phase commit: this pgfleet is owner %s; its decisions go to pgfleet.twophase in "
                     "database %s", self.owner, database)
        except _CONTROL_ERRORS as exc:
            log.error("two-phase commit: cannot reach the commit log in database %s (%s); transactions on "
                      "several databases are refused until it answers", database, exc)

    async def _run(self) -> None:
        ticks = 0
        every = max(1, round(RECOVERY_INTERVAL / FORGET_INTERVAL))
        while True:
            await asyncio.sleep(FORGET_INTERVAL)
            ticks += 1
            if not self.ready:
                if ticks % 5 == 0:
                    await self._connect()
                continue
            await self._forget()
            if ticks % every == 0 and (self.leader or self.left):
                left = self.left
                await self.recover()
                if self.scanned_all:  # else the next round tries again
                    self.left -= left

    # -- the commit path

    def begin(self) -> str:
        """A new global id, in flight until ``end``."""
        self._seq += 1
        gid = f"pgfleet_{self.owner}_{self._seq}"
        self.inflight.add(gid)
        return gid

    def end(self, gid: str, finished: bool) -> None:
        """``gid`` is no longer in flight; ``finished``: every participant is done, its row can go."""
        self.inflight.discard(gid)
        if finished:
            self._finished.append(gid)
        else:
            self.left += 1

    async def decide(self, gid: str, databases: list[str]) -> None:
        """Write the commit decision. Raises NotDecided or Unknown."""
        if self._log is None:
            raise NotDecided(f"the commit log in database {self.config.default} is not reachable")
        try:
            await self._log.execute("INSERT INTO pgfleet.twophase (gid, owner, databases) VALUES ($1, $2, $3)",
                                    gid, self.owner, databases, timeout=self.config.pool.connect_timeout)
        except asyncpg.PostgresError as exc:
            raise NotDecided(f"database {self.config.default} refused the commit decision: {exc}") from None
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise Unknown(f"the commit decision's write to database {self.config.default} broke off: {exc}") from None

    async def _forget(self) -> None:
        if not self._finished or self._log is None:
            return
        gids, self._finished = self._finished, []
        try:
            await self._log.execute("DELETE FROM pgfleet.twophase WHERE gid = ANY($1)", gids)
        except _CONTROL_ERRORS as exc:
            self.left += 1  # (a worker that is not the leader recovers only when it has something left)
            log.warning("two-phase commit: could not delete %d finished decision(s) (%s); recovery will", len(gids), exc)

    # -- recovery

    async def recover(self) -> int:
        """Finish the prepared transactions that nobody alive is finishing; how many."""
        if not self.ready:
            return 0
        assert self._log is not None
        alive: dict[str, bool] = {}
        seen: set[str] = set()  # decisions that some live pgfleet still needs
        scanned = 0
        finished = 0
        self.scanned_all = False
        for database in self.config.databases:
            try:
                finished += await self._recover_database(database, alive, seen)
                scanned += 1
            except _CONTROL_ERRORS as exc:
                log.warning("two-phase commit recovery: cannot read prepared transactions of database %s (%s); "
                            "trying again in %gs", database, exc, RECOVERY_INTERVAL)
        if scanned == len(self.config.databases):
            # Decisions whose participants are all finished: nothing can need them any more.
            try:
                rows = await self._log.fetch("SELECT gid, owner FROM pgfleet.twophase")
                done = [row["gid"] for row in rows if row["gid"] not in seen and row["gid"] not in self.inflight
                        and (row["owner"] == self.owner
                             or (self.leader and not await self._alive(row["owner"], alive)))]
                if done:
                    await self._log.execute("DELETE FROM pgfleet.twophase WHERE gid = ANY($1)", done)
                self.scanned_all = True
            except _CONTROL_ERRORS as exc:
                log.warning("two-phase commit recovery: could not clean pgfleet.twophase (%s)", exc)
        return finished

    async def _recover_database(self, database: str, alive: dict[str, bool], seen: set[str]) -> int:
        assert self._log is not None
        finished = 0
        conn = await connect(self.config.dsn(database), self.config.pool.connect_timeout, "pgfleet recovery")
        try:
            for (gid,) in await conn.fetch(_PREPARED):
                found = GID.match(gid)
                if found is None:
                    continue
                base, owner = found.group(1), found.group(2)
                if base in self.inflight or (owner != self.owner and (not self.leader or await self._alive(owner, alive))):
                    seen.add(base)  # this process is finishing it, or another live pgfleet is
                    continue
                decided = await self._log.fetchval("SELECT true FROM pgfleet.twophase WHERE gid = $1", base)
                action = "COMMIT PREPARED" if decided else "ROLLBACK PREPARED"
                await conn.execute(f"{action} '{gid}'")
                finished += 1
                log.warning("two-phase commit recovery: %s %s on database %s (left in doubt by pgfleet %s)",
                            action, gid, database, owner)
        finally:
            conn.terminate()
        return finished

    async def _alive(self, owner: str, alive: dict[str, bool]) -> bool:
        """Whether another pgfleet, ``owner``, still runs (it holds its advisory lock)."""
        if owner not in alive:
            assert self._lock is not None
            key = _lock_key(owner) if re.fullmatch(r"[0-9a-f]{8}", owner) else None
            if key is None:
                alive[owner] = False
            else:
                free = await self._lock.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, key)
                if free:
                    await self._lock.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, key)
                alive[owner] = not free
        return alive[owner]
