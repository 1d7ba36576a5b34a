"""What every client session shares: the config snapshot, the router, the pools, the keys.

Owns the registry of live sessions (for CancelRequest) and the backend-side names of
prepared statements, which are shared by all clients so that a statement prepared once on a
backend serves every client that prepares the same text (as PgBouncer 1.21+ does).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

import asyncpg

from ..auth.keys import ApiKey, load_keys
from ..backend.catalog import byte_order, table_columns
from ..backend.pool import DisconnectReason, Pool
from ..backend.twophase import Coordinator
from ..config import Config, server_tls
from ..errors import BackendError
from ..router.router import Router

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("pgfleet.fleet")


class Fleet:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.router = Router(config)
        self.keys: dict[str, ApiKey] = load_keys(config)
        self.pools: dict[str, Pool] = {}
        for name in config.databases:
            db = config.databases[name]
            self.pools[name] = Pool(
                name, config.dsn(name),
                size=db.pool_size or config.pool.size,
                acquire_timeout=config.pool.acquire_timeout,
                idle_timeout=config.pool.idle_timeout,
                lifetime=config.pool.lifetime,
                connect_timeout=config.pool.connect_timeout,
                startup={"application_name": "pgfleet"},
            )
        self.sessions: dict[int, Session] = {}  # logged-in clients, by their BackendKeyData pid
        self.clients = 0  # client connections open, logged in or not (listen.max_client_connections)
        self.key_clients: dict[str, int] = {}  # logged-in clients per key (keys[].max_connections)
        self.shutting_down = False
        # two_phase_commit: the commit log and recovery (started by the server).
        self.coordinator = Coordinator(config) if config.two_phase_commit else None
        self.tls = server_tls(config.listen.tls) if config.listen.tls is not None else None
        # Whether each database sorts text in byte order (read from its catalog when a
        # federated query first needs it).
        self.byte_order: dict[str, bool] = {}
        self._statement_names: dict[tuple[str, bytes], str] = {}
        self._tokens = 0

    async def learn_byte_order(self, databases: tuple[str, ...]) -> None:
        """Read the collation of those of ``databases`` not known yet; one that does not
        answer stays unknown (its text sort keys are refused) and is asked again next time."""
        missing = [db for db in databases if db not in self.byte_order]
        if not missing:
            return
        timeout = self.config.pool.connect_timeout
        found = await asyncio.gather(*(byte_order(self.config.dsn(db), timeout) for db in missing),
                                     return_exceptions=True)
        for db, result in zip(missing, found, strict=True):
            if isinstance(result, bool):
                self.byte_order[db] = result
            else:
                log.warning("could not read the collation of database %s: %s; federated queries that "
                            "sort text there are refused until it answers", db, result)

    def close_idle_connections(self, dbname: str) -> None:
        """Before DROP DATABASE (or a rename) of ``dbname``: pgfleet's own idle connections
        to it would block it, so they go."""
        for pool in self.pools.values():
            if pool.dsn.dbname == dbname:
                closed = pool.close_idle(DisconnectReason.DATABASE_GOING)
                log.info("closed %d idle connection(s) of database %s to %s before it is dropped or renamed",
                         closed, pool.name, dbname)

    async def columns_of(self, database: str, table: str) -> list[str]:
        """A table's columns in order, read from ``database``'s catalog (COPY without a list)."""
        try:
            return await table_columns(self.config.dsn(database), table, self.config.pool.connect_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise BackendError("08006", f"database {database}: cannot read the columns of {table} ({exc})",
                               hint="name the columns in the COPY, or check the database") from None

    def pinned(self) -> int:
        """Clients that keep their backend for session state (LISTEN, temp tables, ...)."""
        return sum(1 for session in self.sessions.values() if session.pins)

    def statement_name(self, query: str, param_types: bytes) -> str:
        key = (query, param_types)
        name = self._statement_names.get(key)
        if name is None:
            name = f"pgfleet_{len(self._statement_names) + 1}"
            self._statement_names[key] = name
        return name

    def next_token(self) -> int:
        self._tokens += 1
        return self._tokens

    def new_backend_key(self) -> tuple[int, int]:
        while True:
            pid = secrets.randbelow(2**31 - 1) + 1
            if pid not in self.sessions:
                return pid, secrets.randbits(31)
