"""The process-wide registry: the config snapshot, the router, the pools, the keys, health,
replicas and the two-phase coordinator — what every client session shares.

Owns the registry of live sessions (for CancelRequest, RELOAD and the console) and the
backend-side names of prepared statements, which are shared by all clients so that a
statement prepared once on a backend serves every client that prepares the same text (as
PgBouncer 1.21+ does). It sits below the frontend and the admin layer: it knows sessions only
through the ``ClientSession`` protocol below, never by importing them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg
import msgspec

from .auth.keys import ApiKey, load_keys
from .backend.catalog import byte_order, shard_key_types, table_columns
from .backend.connection import Connector, ServerConnection, tcp_connect
from .backend.health import HealthChecker
from .backend.pool import DisconnectReason, Pool
from .backend.replicas import Replicas
from .backend.twophase import Coordinator
from .config import Config, Dsn, server_tls
from .errors import ADMIN_SHUTDOWN, CONNECTION_FAILURE, BackendError, ProxyError
from .router.router import Router


class TenantDirectory(Protocol):
    """What a session needs of the tenant directory (directory/): the pool of a tenant's
    database, looked up and opened on first use, and to let go of it."""

    async def enter(self, name: str, session: ClientSession) -> Pool: ...
    def leave(self, name: str, session: ClientSession) -> None: ...


class ClientSession(Protocol):
    """What the fleet, the server, the console and /metrics need of a logged-in client session."""

    user: str            # the key id it logged in with
    database: str | None  # the database name it connected to
    peer: str            # "host:port"
    pid: int             # pgfleet's BackendKeyData for it
    secret: int
    connected: float     # time.time() at connect
    tls: bool
    key: ApiKey | None

    @property
    def backend(self) -> ServerConnection | None: ...  # the backend it holds now, if any
    @property
    def tx_status(self) -> int: ...  # ReadyForQuery status byte as the client last saw it
    @property
    def pins(self) -> set[str]: ...  # session state keeping its backend (LISTEN, temp tables, ...)
    @property
    def waiting(self) -> bool: ...  # reading stopped until a backend or a fan-out answers
    def close(self, error: ProxyError) -> None: ...
    def rekey(self, key: ApiKey) -> None: ...
    def cancel_running(self) -> int: ...
    def busy(self, statement_only: bool = False) -> bool: ...


log = logging.getLogger("pgfleet.fleet")

# How long a shard-key type that the catalog did not have is not asked for again.
TYPES_NEGATIVE_TTL = 1.0
# Backend-side names kept for clients' prepared statements (distinct texts), least recently
# used out first: a client that prepares ever new texts does not grow pgfleet without bound.
STATEMENT_NAMES = 10_000
# A client's pid carries its worker's number from this bit up (admin/group.py reads it back).
WORKER_SHIFT = 24


class _RolePools(dict[str, Pool]):
    """A backend role's pools by database (or replica) name, for scatter, gather and COPY:
    looked up in the fleet at each use, so a reload's new pools are found."""

    def __init__(self, fleet: Fleet, role: str | None) -> None:
        super().__init__()
        self.fleet = fleet
        self.role = role

    def __missing__(self, name: str) -> Pool:
        return self.fleet.pool_of(name, self.role)


class Fleet:
    def __init__(self, config: Config, connect: Connector = tcp_connect, worker: int = 0) -> None:
        self.config = config
        # pgfleet run --workers N: this worker's number, carried in every client's pid from
        # WORKER_SHIFT up, and how a cancel for another worker's client reaches it (set by the
        # server); None: a single process.
        self.worker = worker
        self.forward_cancel: Callable[[int, int], None] | None = None
        self.connect = connect  # how pools reach their servers (the protocol tests script them)
        self.router = Router(config)
        self.keys: dict[str, ApiKey] = load_keys(config)
        self.pools: dict[str, Pool] = {name: self._pool(config, name) for name in config.databases}
        # Pools of the backend roles keys run as (config backend_roles), by role then database
        # or replica name; made on first use, siblings of the dsn's pools above.
        self.role_pools: dict[str, dict[str, Pool]] = {}
        # Statements that ran on several databases, by kind (fan-out, scatter, copy, two-phase).
        self.route_counts: dict[str, int] = dict.fromkeys(("fanout", "scatter", "copy", "cross_database_transaction"), 0)
        self.replicas = self.new_replicas(config)  # checks started and stopped by the server
        self.retired: dict[str, Pool] = {}  # pools of databases a reload removed, until their clients leave
        self.health = HealthChecker(config, self.pools)  # started and stopped by the server
        # The admin console's conversation for one client (set by the server: admin/console.py);
        # None: no console in this process.
        self.console: Callable[[], Any] | None = None
        self.audit: Any = None  # the audit log (admin/audit.py), set by the server when configured
        self.replicator: Any = None  # the replication jobs (replication/jobs.py), set by the server
        self.http_stats: Any = None  # the HTTP listener's request counts (admin/http.py), set by it
        # The tenant directory (directory/), set by the server when configured; its open pools
        # by tenant name, found by pool_of like the configured databases'.
        self.directory: TenantDirectory | None = None
        self.tenant_pools: dict[str, Pool] = {}
        self.sessions: dict[int, ClientSession] = {}  # logged-in clients, by their BackendKeyData pid
        self.clients = 0  # client connections open, logged in or not (listen.max_client_connections)
        self.key_clients: dict[str, int] = {}  # logged-in clients per key (keys[].max_connections)
        self.shutting_down = False
        # two_phase_commit: the commit log and recovery (started by the server).
        self.coordinator = Coordinator(config, leader=worker == 0) if config.two_phase_commit else None
        self.tls = server_tls(config.listen.tls) if config.listen.tls is not None else None
        # Whether each database sorts text in byte order (read from its catalog when a
        # federated query first needs it).
        self.byte_order: dict[str, bool] = {}
        self._statement_names: dict[tuple[str, bytes], str] = {}  # least recently used first
        self._named = 0
        # Transaction mode: the backends clients had, by (host, port, pid): a NotificationResponse
        # names its notifier by the pgfleet pid of the client that last had it.
        self.backend_owner: dict[tuple[str, int, int], ServerConnection] = {}
        self._tokens = 0

    def _pool(self, config: Config, name: str, dsn: Dsn | None = None, size: int | None = None) -> Pool:
        """The pool of database ``name`` (or of a replica: ``dsn`` and ``size`` given)."""
        return Pool(name, dsn or config.dsn(name), size=size or config.databases[name].pool_size or config.pool.size,
                    acquire_timeout=config.pool.acquire_timeout, idle_timeout=config.pool.idle_timeout,
                    lifetime=config.pool.lifetime, connect_timeout=config.pool.connect_timeout,
                    startup={"application_name": "pgfleet"}, connect=self.connect)

    def new_replicas(self, config: Config) -> Replicas:
        return Replicas(config, lambda name, dsn, size: self._pool(config, name, dsn, size))

    def apply(self, config: Config) -> list[str]:
        """RELOAD: a new, valid config snapshot takes over; what changed, in words.

        Routing and keys change for the next statement. A pool whose dsn changed gets a new
        generation: its connections close as they come back, new ones go to the new address.
        A removed database's pool stops taking clients and closes once its last one leaves.
        Clients of a removed key are disconnected; the others get their key's new settings.
        """
        old = self.config
        changes: list[str] = []
        keys = load_keys(config)
        router = Router(config)
        router.learn_types({t: k for t, k in self.router.key_types.items() if t in router.sharded})
        for name in config.databases:
            pool = self.pools.get(name)
            if pool is None:
                self.pools[name] = self._pool(config, name)
                changes.append(f"database {name} added")
                continue
            fresh = self._pool(config, name)
            if fresh.dsn != pool.dsn:
                pool.dsn = fresh.dsn
                pool.generation += 1
                pool.close_idle(DisconnectReason.GENERATION)  # parked ones too: taken back from their clients
                changes.append(f"database {name}: new dsn (connections move over as they come back)")
            for attr in ("size", "acquire_timeout", "idle_timeout", "lifetime", "connect_timeout"):
                if getattr(pool, attr) != getattr(fresh, attr):
                    setattr(pool, attr, getattr(fresh, attr))
                    changes.append(f"database {name}: {attr} {getattr(fresh, attr)}")
            self._follow(pool, config)
        for name in [n for n in self.pools if n not in config.databases]:
            pool = self.retired[name] = self.pools.pop(name)
            pool.close_idle(DisconnectReason.GENERATION)
            changes.append(f"database {name} removed")
        for session in list(self.sessions.values()):
            key = keys.get(session.user) if session.key is not None else None
            if session.key is not None and key is None:
                session.close(ProxyError(ADMIN_SHUTDOWN, f"terminating connection: key {session.user} was removed "
                                         "from the configuration by a reload"))
            elif key is not None:
                session.rekey(key)
        if set(keys) != set(self.keys) or any(keys[k] != self.keys[k] for k in keys if k in self.keys):
            changes.append("keys changed")
        if (config.tables, config.sharding) != (old.tables, old.sharding):
            changes.append("routing changed")
        for what in ("listen", "two_phase_commit", "default_database"):
            if getattr(config, what) != getattr(old, what):
                changes.append(f"{what} changed: takes effect at the next restart")
        before, after = old.http, config.http
        if (before is None) != (after is None) or (before is not None and after is not None and
                                                    (before.host, before.port, before.tls) != (after.host, after.port,
                                                                                               after.tls)):
            changes.append("http listener changed: takes effect at the next restart")
        elif before != after:
            changes.append("http limits changed")  # (read by each request: in force now)
        router.hits, router.misses = self.router.hits, self.router.misses
        self.config, self.router, self.keys = config, router, keys
        return changes

    def counted(self, kind: str) -> None:
        self.route_counts[kind] = self.route_counts.get(kind, 0) + 1

    def pool_of(self, name: str, role: str | None = None) -> Pool:
        """The pool of database (or replica) ``name`` whose connections log in as backend role
        ``role`` (None: the dsn's own user), also after a reload removed its database."""
        if role is not None:
            family = self.role_pools.get(role)
            pool = family.get(name) if family is not None else None
            return pool if pool is not None else self._role_pool(name, role)
        pool = self.pools.get(name)
        if pool is not None:
            return pool
        pool = self.tenant_pools.get(name)
        if pool is not None:
            return pool
        pool = self.replicas.pools.get(name)
        return pool if pool is not None else self.retired[name]

    def pools_for(self, role: str | None) -> dict[str, Pool]:
        """The pools a client of backend role ``role`` takes backends from, by database name."""
        return _RolePools(self, role)

    def _role_pool(self, name: str, role: str) -> Pool:
        """A pool of ``name`` for backend role ``role``, made on first use: the dsn's address
        with that role's user and password, its size, its circuit and PAUSE (a sibling)."""
        base = self.pool_of(name)
        password = self.config.backend_roles[role].password
        pool = Pool(name, msgspec.structs.replace(base.dsn, user=role, password=password), size=base.size,
                    acquire_timeout=base.acquire_timeout, idle_timeout=base.idle_timeout, lifetime=base.lifetime,
                    connect_timeout=base.connect_timeout, startup=base.startup, connect=self.connect)
        pool.role, pool.credentials = role, f"backend_roles.{role}"
        pool.stats = base.stats  # SHOW STATS and /metrics count a database's traffic whoever runs it
        pool.outage, pool.paused = base.outage, base.paused
        base.siblings.append(pool)
        self.role_pools.setdefault(role, {})[name] = pool
        return pool

    def _follow(self, base: Pool, config: Config) -> None:
        """After a reload: the backend-role pools of ``base``'s database take its address and
        sizes with their role's password; those of a role the config no longer has retire."""
        for sibling in list(base.siblings):
            assert sibling.role is not None
            role = config.backend_roles.get(sibling.role)
            dsn = msgspec.structs.replace(base.dsn, user=sibling.role, password=role.password) if role else None
            if dsn != sibling.dsn:
                sibling.generation += 1  # its connections close as they come back
                sibling.close_idle(DisconnectReason.GENERATION)
                if dsn is None:
                    base.siblings.remove(sibling)
                    del self.role_pools[sibling.role][base.name]
                    continue
                sibling.dsn = dsn
            for attr in ("size", "acquire_timeout", "idle_timeout", "lifetime", "connect_timeout"):
                setattr(sibling, attr, getattr(base, attr))

    def forget_pools(self, names: list[str]) -> None:
        """Replica pools a reload replaced: their backend-role pools go too (their connections
        close as they come back; new ones are made from the new replicas on first use)."""
        for family in self.role_pools.values():
            for name in names:
                pool = family.pop(name, None)
                if pool is not None:
                    pool.generation += 1
                    pool.close_idle(DisconnectReason.GENERATION)

    def all_pools(self) -> list[Pool]:
        """Every pool: each database's, then those of its backend roles (SHOW POOLS, /metrics)."""
        out = []
        for pool in self.pools.values():
            out.append(pool)
            out.extend(pool.siblings)
        return out

    def may_learn_types(self, tables: list[str]) -> bool:
        """Whether the catalog may be read for these tables now: not if it was, for each of
        them, within TYPES_NEGATIVE_TTL (a table that is not there is not asked for at every
        statement)."""
        now = time.monotonic()
        tried = self.router.types_tried
        return any(table not in tried or now - tried[table][0] > TYPES_NEGATIVE_TTL for table in tables)

    async def learn_types(self, tables: list[str]) -> None:
        """Read the shard-key types of ``tables`` off the first shard's catalog (config's
        sharding.types win); what stays unknown is remembered with why (Router.types_tried)."""
        router = self.router
        tables = [table for table in tables if table not in router.key_types or table not in router.key_positions]
        if not tables or not router.shards:
            return
        first = router.shards[0]
        now = time.monotonic()
        try:
            found = await shard_key_types(self.config.dsn(first), {t: router.sharded[t] for t in tables},
                                          self.config.pool.connect_timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            why = f"shard {first} did not answer pgfleet's catalog read ({exc or type(exc).__name__})"
            log.warning("could not read shard-key types of %s from database %s: %s; statements on them are "
                        "refused until it answers (or set sharding.types)", ", ".join(tables), first, exc)
            for table in tables:
                router.types_tried[table] = (now, why)
            return
        for problem in router.learn_types({table: type_name for table, (type_name, _) in found.items()}):
            log.warning("shard key %s; statements on that table are refused", problem)
        router.key_positions.update((table, position) for table, (_, position) in found.items())
        for table in tables:
            if table not in router.key_types or table not in router.key_positions:
                why = f"table {table} with column {router.sharded[table]} does not exist on shard {first}"
                router.types_tried[table] = (now, why)

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
            raise BackendError(CONNECTION_FAILURE, f"database {database}: cannot read the columns of {table} ({exc})",
                               hint="name the columns in the COPY, or check the database") from None

    def pinned(self) -> int:
        """Clients that keep their backend for session state (LISTEN, temp tables, ...)."""
        return sum(1 for session in self.sessions.values() if session.pins)

    def statement_name(self, query: str, param_types: bytes) -> str:
        """The backend-side name of a client's prepared statement: one per (text, parameter
        types), kept for the last ``STATEMENT_NAMES`` of them. A name is never given to
        another text (the count goes on), so a backend that prepared it keeps it right."""
        key = (query, param_types)
        names = self._statement_names
        name = names.pop(key, None)
        if name is None:
            self._named += 1
            name = f"pgfleet_{self._named}"
            if len(names) >= STATEMENT_NAMES:
                del names[next(iter(names))]  # the least recently used
        names[key] = name  # (last: the most recently used)
        return name

    def next_token(self) -> int:
        self._tokens += 1
        return self._tokens

    def new_backend_key(self) -> tuple[int, int]:
        """A new client's BackendKeyData: a pid that names this worker (random below that) and
        a random secret."""
        while True:
            pid = (self.worker << WORKER_SHIFT) | (secrets.randbelow((1 << WORKER_SHIFT) - 1) + 1)
            if pid not in self.sessions:
                return pid, secrets.randbits(31)

    def cancel(self, pid: int, secret: int) -> bool:
        """A CancelRequest for client ``pid``: its running statement is cancelled when the secret
        is right. A pid of another worker's client goes to that worker. Whether it was sent on."""
        target = self.sessions.get(pid)
        if target is None:
            if self.forward_cancel is not None and pid >> WORKER_SHIFT != self.worker:
                self.forward_cancel(pid, secret)
                return True
            return False
        if secrets.compare_digest(target.secret.to_bytes(4, "big"), secret.to_bytes(4, "big", signed=True)):
            target.cancel_running()
            return True
        return False
