"""The tenant directory: thousands of tenant databases, each found by its name in a registry
at run time (DESIGN "Tenant directory").

Theory of operation. A client that connects to a name that is not a configured database
``enter``-s the directory: the tenant's row is looked up (kept ``cache_ttl``; a miss always
asks the registry, so a tenant added there is reachable at once), and its pool is opened if
it is not. The pool is an ordinary ``Pool`` whose connections log in with the row's user and
password, sharing the ``HostGate`` of its server, which keeps pgfleet's connections to one
host under ``max_backends_per_host`` over all its tenants. One task (``_run``) does the rest
every half second:

- a pool whose last client left ``idle_timeout`` ago is closed (connections and all);
- every ``cache_ttl`` the rows of the tenants with a pool are read again: a removed tenant's
  clients are closed with 3D000 and its pool with them; a changed row (a moved database, a new
  password) moves the pool over as a RELOAD would (new connections go to the new place);
- a tenant with a pool is health-checked as the configured databases are (``SELECT 1`` on a
  fresh connection every ``health.interval``, half-open probes while down), one probe at a
  time per host; tenants without a pool are never checked.

The registry answering nothing does not stop known tenants: their rows stay in use (logged),
and only a tenant never looked up is refused (08006). A row that cannot be used (a password
that does not decrypt) is one error naming the tenant, for that tenant's clients only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from ..backend.catalog import connect
from ..backend.health import HALF_OPEN_FIRST, HALF_OPEN_MAX, DatabaseHealth, Status, probe
from ..backend.pool import DisconnectReason, HostGate, Pool
from ..config import ADMIN_DATABASE, Config, parse_dsn
from ..errors import (
    ADMIN_SHUTDOWN,
    CONFIG_FILE_ERROR,
    CONNECTION_FAILURE,
    DUPLICATE_DATABASE,
    FEATURE_NOT_SUPPORTED,
    INVALID_CATALOG_NAME,
    INVALID_NAME,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    UNDEFINED_OBJECT,
    UNIQUE_VIOLATION,
    BackendError,
    ClientError,
    ConfigError,
    ProxyError,
)
from ..fleet import ClientSession, Fleet
from .registry import (
    APPLICATION_NAME,
    TABLE_COLUMNS,
    TENANT_NAME,
    Crypto,
    Registry,
    Tenant,
    tenant_of,
)

log = logging.getLogger("pgfleet.directory")

TICK = 0.5  # seconds between the directory's rounds
REFRESH_BATCH = 1000  # tenants' rows read again per query
REGISTRY_AWAY = 1.0  # seconds a registry that did not answer is not asked again
REAP_EVERY = 4  # rounds between reaps of the tenant pools' idle connections


@dataclass
class Known:
    tenant: Tenant
    fetched: float  # time.monotonic() of the registry's answer


class Directory:
    def __init__(self, fleet: Fleet, config: Config) -> None:
        assert config.directory is not None
        self.fleet = fleet
        self.config = config
        self.settings = config.directory
        self.crypto = Crypto(self.settings.encryption_key)
        self.registry = Registry(self.settings, config.dsn(self.settings.registry), config.pool.connect_timeout)
        self.known: dict[str, Known] = {}
        self.pools: dict[str, Pool] = fleet.tenant_pools
        self.sessions: dict[str, set[ClientSession]] = {}  # the clients of each tenant
        self.idle_since: dict[str, float] = {}  # open pools without clients, since when
        self.gates: dict[tuple[str, int], HostGate] = {}
        self.health: dict[str, DatabaseHealth] = {}  # tenants with a pool
        self.lookups = dict.fromkeys(("hit", "miss", "unknown", "error"), 0)
        self._next_check: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._probing: dict[tuple[str, int], asyncio.Lock] = {}
        self._finding: dict[str, asyncio.Future[Tenant]] = {}
        self._warned: dict[str, float] = {}  # tenant -> when its unusable row was last logged
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed = time.monotonic()
        self._away_until = 0.0  # the registry did not answer: until then it is not asked again
        self._checks: set[asyncio.Task[None]] = set()
        self._rounds = 0
        self._dropping: set[str] = set()  # DROP TENANT running: not looked up meanwhile

    # -- a client's way in and out (fleet.TenantDirectory)

    async def enter(self, name: str, session: ClientSession) -> Pool:
        """The pool of tenant ``name``'s database, opened if it is not; ``session`` counts as
        one of its clients until it ``leave``-s (which its end does whatever happens here)."""
        self.sessions.setdefault(name, set()).add(session)
        self.idle_since.pop(name, None)
        if name in self._dropping:
            raise ClientError(INVALID_CATALOG_NAME, f'database "{name}" does not exist',
                              hint="its tenant is being dropped")
        tenant = await self.find(name)
        if name in self._dropping:
            raise ClientError(INVALID_CATALOG_NAME, f'database "{name}" does not exist',
                              hint="its tenant is being dropped")
        pool = self.pools.get(name)
        if pool is None:
            pool = self._open_pool(tenant)
        return pool

    def leave(self, name: str, session: ClientSession) -> None:
        group = self.sessions.get(name)
        if group is None:
            return
        group.discard(session)
        if not group:
            del self.sessions[name]
            if name in self.pools:
                self.idle_since[name] = time.monotonic()

    async def find(self, name: str) -> Tenant:
        """Tenant ``name``'s row: the cached one while fresh, else the registry's (one
        question at a time per name however many clients ask)."""
        known = self.known.get(name)
        now = time.monotonic()
        if known is not None and (now - known.fetched < self.settings.cache_ttl or now < self._away_until):
            self.lookups["hit"] += 1  # fresh; or the registry is away, and the last row holds
            return known.tenant
        if now < self._away_until:  # it did not answer a moment ago: not asked again at once
            self.lookups["error"] += 1
            raise BackendError(CONNECTION_FAILURE, f"the tenant directory's registry (database "
                               f"{self.settings.registry}) did not answer; tenant {name} was never looked up",
                               hint="check the registry database; pgfleet asks it again within a second")
        finding = self._finding.get(name)
        if finding is None:
            finding = self._finding[name] = asyncio.get_running_loop().create_task(self._lookup(name, known))
            finding.add_done_callback(functools.partial(self._found, name))
        return await asyncio.shield(finding)  # (a client that leaves does not cancel the others' lookup)

    def _found(self, name: str, task: asyncio.Task[Tenant]) -> None:
        if self._finding.get(name) is task:
            del self._finding[name]
        if not task.cancelled():
            task.exception()  # retrieved here too: every client that left before the answer is gone

    async def _lookup(self, name: str, stale: Known | None) -> Tenant:
        self.lookups["miss"] += 1
        try:
            row = await self.registry.row(name)
        except BackendError as exc:
            self._away_until = time.monotonic() + REGISTRY_AWAY
            if stale is not None:  # the registry is away: what it said last still holds
                self._warn(name, f"the registry did not answer ({exc}); tenant {name} keeps its last known row")
                return stale.tenant
            self.lookups["error"] += 1
            raise
        if row is None:
            self.lookups["unknown"] += 1
            if name in self.known or name in self.pools:
                self._removed(name)
            raise ClientError(INVALID_CATALOG_NAME, f'database "{name}" does not exist',
                              hint="it is neither a configured database nor a tenant in the directory's registry")
        try:
            tenant = tenant_of(row, self.crypto)
        except ProxyError as exc:
            self.lookups["error"] += 1
            self._warn(name, f"{exc}; {exc.hint}")
            raise
        self._learned(tenant)
        return tenant

    def _warn(self, name: str, text: str) -> None:
        """Logged once per cache_ttl per tenant: a client retrying does not flood the log."""
        now = time.monotonic()
        if now - self._warned.get(name, -1e9) >= self.settings.cache_ttl:
            self._warned[name] = now
            log.warning("tenant directory: %s", text)

    def _learned(self, tenant: Tenant) -> None:
        name = tenant.name
        self.known[name] = Known(tenant, time.monotonic())
        pool = self.pools.get(name)
        if pool is not None and pool.dsn != tenant.dsn:
            self._moved(pool, tenant)

    def _moved(self, pool: Pool, tenant: Tenant) -> None:
        """Its row changed: new connections go to the new place (or log in with the new
        password); those in use close as they come back."""
        before = pool.dsn
        pool.dsn = tenant.dsn
        pool.generation += 1
        pool.close_idle(DisconnectReason.GENERATION)
        if (before.host, before.port) != tenant.host:
            # Its old connections count at the old host until they are gone (HostGate.freed
            # lets go of it then); the pool counts at the new one from now on.
            pool.gate = self._gate(tenant.host)
            pool.gate.pools.add(pool)
        log.info("tenant %s: its registry row changed (now %s); connections move over as they come back",
                 tenant.name, tenant.dsn.safe())

    def _gate(self, host: tuple[str, int]) -> HostGate:
        gate = self.gates.get(host)
        if gate is None:
            gate = self.gates[host] = HostGate(host[0], host[1], self.settings.max_backends_per_host)
        return gate

    def _open_pool(self, tenant: Tenant) -> Pool:
        config, name = self.config, tenant.name
        pool = Pool(name, tenant.dsn, size=self.settings.pool_size, acquire_timeout=config.pool.acquire_timeout,
                    idle_timeout=config.pool.idle_timeout, lifetime=config.pool.lifetime,
                    connect_timeout=config.pool.connect_timeout, startup={"application_name": "pgfleet"},
                    connect=self.fleet.connect, gate=self._gate(tenant.host))
        pool.credentials = f"the directory's row of tenant {name}"
        self.pools[name] = pool
        now = time.monotonic()
        self.health[name] = DatabaseHealth(name)
        self._next_check[name] = now + self.config.health.interval  # (its first connection tells already)
        if not self.sessions.get(name):
            self.idle_since[name] = now
        log.debug("tenant %s: pool opened (%s)", name, tenant.dsn.safe())
        return pool

    def _close_pool(self, name: str, why: str) -> None:
        """Close a tenant's pool (statements its connections still run are cancelled: a host
        capped pool's retired backends are, backend/pool.py)."""
        pool = self.pools.pop(name, None)
        self.idle_since.pop(name, None)
        self.health.pop(name, None)
        self._next_check.pop(name, None)
        self._backoff.pop(name, None)
        if pool is not None:
            pool.close()
            log.debug("tenant %s: pool closed (%s)", name, why)

    def _removed(self, name: str) -> None:
        """Its row is gone from the registry: its clients are told so and its pool goes."""
        self.known.pop(name, None)
        sessions = self.sessions.pop(name, set())
        for session in list(sessions):
            session.close(ProxyError(INVALID_CATALOG_NAME, f'terminating connection: database "{name}" was '
                                     "removed from the tenant directory", hint="it no longer exists"))
        self._close_pool(name, "removed from the registry")
        log.info("tenant %s was removed from the registry: %d client(s) disconnected, its pool closed",
                 name, len(sessions))

    def apply(self, config: Config) -> list[str]:
        """RELOAD: the directory's new settings, in force for the next lookup and connection;
        what changed, in words."""
        new = config.directory
        assert new is not None
        old, changes = self.settings, []
        self.config, self.settings = config, new
        if (new.registry, new.table, new.query) != (old.registry, old.table, old.query) or \
                config.dsn(new.registry) != self.registry.dsn:
            registry, self.registry = self.registry, Registry(new, config.dsn(new.registry),
                                                              config.pool.connect_timeout)
            asyncio.get_running_loop().create_task(registry.close())
            self.known.clear()  # asked again, from the new registry
            changes.append("directory: new registry (tenants are looked up again)")
        if new.encryption_key != old.encryption_key:
            self.crypto = Crypto(new.encryption_key)
            self.known.clear()
            changes.append("directory: new encryption key")
        for gate in self.gates.values():
            gate.limit = new.max_backends_per_host
            gate.freed()
        for pool in self.pools.values():
            pool.size = new.pool_size
            for attr in ("acquire_timeout", "idle_timeout", "lifetime", "connect_timeout"):
                setattr(pool, attr, getattr(config.pool, attr))
        if new != old and not changes:
            changes.append("directory settings changed")
        return changes

    # -- the directory's rounds

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pgfleet directory")

    async def stop(self) -> None:
        for task in [self._task, self._refreshing, *self._checks]:
            if task is not None:
                task.cancel()
        for task in [self._task, self._refreshing, *self._checks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._refreshing = None
        for name in list(self.pools):
            self._close_pool(name, "pgfleet stops")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0  # their servers close their ends (backend/connection.py LINGER)
        while any(gate.closing for gate in self.gates.values()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self.registry.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self._round(time.monotonic())
            except Exception:  # our bug: logged with its traceback, and the rounds go on
                log.exception("internal error in the tenant directory's round")

    def _round(self, now: float) -> None:
        idle_timeout = self.settings.idle_timeout
        for name, since in list(self.idle_since.items()):
            if now - since >= idle_timeout and not self.sessions.get(name):
                self._close_pool(name, f"no client for {idle_timeout:g}s")
        self._rounds += 1
        if self._rounds % REAP_EVERY == 0:
            for pool in self.pools.values():
                pool.reap()  # idle_timeout and lifetime of their connections, as the server's reaper does
        ttl = self.settings.cache_ttl
        if now - self._refreshed >= ttl and self._refreshing is None:
            self._refreshed = now
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            self._refreshing.add_done_callback(self._refresh_done)
            for name, known in list(self.known.items()):  # (find never trusts an expired row anyway)
                if name not in self.pools and now - known.fetched >= ttl:
                    del self.known[name]  # asked again at its next client
        for name, due in list(self._next_check.items()):
            if due <= now:
                self._next_check[name] = float("inf")  # until this check has ended
                task = asyncio.get_running_loop().create_task(self._check(name))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error reading the tenant directory again", exc_info=task.exception())

    async def _refresh(self) -> None:
        """The rows of every tenant with a pool, read again: removed and changed ones follow."""
        names = list(self.pools)
        for start in range(0, len(names), REFRESH_BATCH):
            part = names[start:start + REFRESH_BATCH]
            try:
                rows = await self.registry.rows(part)
            except BackendError as exc:
                log.warning("tenant directory: %s; the %d open tenant(s) keep their last known rows", exc, len(names))
                return
            for name in part:
                if name not in self.pools:
                    continue  # closed meanwhile
                row = rows.get(name)
                if row is None:
                    self._removed(name)
                    continue
                try:
                    self._learned(tenant_of(row, self.crypto))
                except ProxyError as exc:
                    self._warn(name, f"{exc}; its pool keeps the last usable row")

    async def _check(self, name: str) -> None:
        try:
            await self._check_one(name)
        except Exception:  # our bug: logged, and the tenant is checked again later
            log.exception("internal error in the health check of tenant %s", name)
            if name in self._next_check:
                self._next_check[name] = time.monotonic() + self.config.health.interval

    async def _check_one(self, name: str) -> None:
        pool = self.pools.get(name)
        if pool is None:
            return
        policy = self.config.health
        host = (pool.dsn.host, pool.dsn.port)
        lock = self._probing.setdefault(host, asyncio.Lock())
        async with lock:  # one probe at a time per host: checks stay outside the cap by one at most
            if self.pools.get(name) is not pool:
                return
            result = await probe(pool.dsn, policy.timeout)
        health = self.health.get(name)
        if health is None or self.pools.get(name) is not pool:
            return
        was = health.status
        health.record(result, time.time(), policy)
        now = time.monotonic()
        if health.status is Status.DOWN:
            pool.open_circuit(f"its health checks failed ({health.last_error}); statements go through again as "
                              "soon as one answers (SHOW HEALTH in the admin console)")
            if was is not Status.DOWN:
                log.warning("tenant %s is down: %d health checks in a row failed (last: %s); its clients get "
                            "08006 until a probe answers", name, health.consecutive_failures, health.last_error)
            backoff = self._backoff.get(name, HALF_OPEN_FIRST)
            self._backoff[name] = min(backoff * 2, HALF_OPEN_MAX)
            self._next_check[name] = now + min(backoff, policy.interval)
            return
        self._backoff.pop(name, None)
        if pool.outage is not None:
            pool.close_circuit()
            log.info("tenant %s is back (health check answered in %.0f ms)", name, health.response_ms or 0.0)
        self._next_check[name] = now + policy.interval

    # -- what the console, /metrics and /databases read

    def host_of(self, name: str) -> str:
        pool = self.pools.get(name)
        dsn = pool.dsn if pool is not None else self.known[name].tenant.dsn
        return f"{dsn.host}:{dsn.port}"

    def clients(self, name: str) -> tuple[int, int]:
        """Clients of the tenant: (with a backend now, all)."""
        group = self.sessions.get(name, ())
        return sum(1 for s in group if s.backend is not None), len(group)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per host ("host:port"): tenants known and open, clients, servers, the cap, health."""
        out: dict[str, dict[str, Any]] = {}

        def entry(host: str, port: int) -> dict[str, Any]:
            key = f"{host}:{port}"
            found = out.get(key)
            if found is None:
                gate = self.gates.get((host, port))
                found = out[key] = {
                    "host": host, "port": port, "tenants_known": 0, "pools_open": 0, "cl_active": 0,
                    "cl_waiting": 0, "sv_active": 0, "sv_idle": 0, "sv_login": 0, "sv_closing": 0,
                    "limit": self.settings.max_backends_per_host, "transactions": 0,
                    "healthy": 0, "degraded": 0, "down": 0, "unwell": [], "last_check": None,
                    "closing": gate.closing if gate is not None else 0}
            return found

        for known in self.known.values():
            entry(known.tenant.dsn.host, known.tenant.dsn.port)["tenants_known"] += 1
        for name, pool in self.pools.items():
            row = entry(pool.dsn.host, pool.dsn.port)
            active, _ = self.clients(name)
            row["pools_open"] += 1
            row["cl_active"] += active
            row["cl_waiting"] += pool.waiting
            row["sv_active"] += len(pool.active)
            row["sv_idle"] += len(pool.idle)
            row["sv_login"] += pool.opening
            row["transactions"] += pool.stats.transactions
            health = self.health.get(name)
            if health is not None:
                row[str(health.status)] += 1
                if health.status is not Status.HEALTHY:
                    row["unwell"].append(f"{name} {health.status}: {health.last_error}")
                if health.last_check is not None and (row["last_check"] is None or
                                                      health.last_check > row["last_check"]):
                    row["last_check"] = health.last_check
        for row in out.values():
            row["status"] = "down" if row["down"] else "degraded" if row["degraded"] else "healthy"
        return out

    def top(self, measure: str) -> list[tuple[str, Pool, int]]:
        """The ``top`` busiest open tenant pools by ``measure`` (servers, clients, waiting,
        transactions), busiest first; pools at 0 are left out."""
        values = []
        for name, pool in self.pools.items():
            if measure == "servers":
                value = pool.total
            elif measure == "clients":
                value = len(self.sessions.get(name, ()))
            elif measure == "waiting":
                value = pool.waiting
            else:
                value = pool.stats.transactions
            if value:
                values.append((name, pool, value))
        values.sort(key=lambda item: (-item[2], item[0]))
        return values[:self.settings.top]

    # -- CREATE TENANT and DROP TENANT

    def _writable(self, what: str) -> None:
        if self.settings.table is None:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"{what} writes the registry table, and this directory "
                              "reads its tenants with directory.query", hint="give directory.table instead, or "
                              "write the registry row (and the database) yourself")
        if not self.settings.hosts:
            raise ClientError(OBJECT_NOT_IN_PREREQUISITE_STATE, f"{what} needs directory.hosts (the servers "
                              "where tenants' databases are made, each with an admin dsn)",
                              hint="add directory.hosts to the config and RELOAD")

    async def create(self, name: str, template: str | None = None, host: str | None = None) -> dict[str, Any]:
        """CREATE TENANT: a login role of its own (named after it, a random password, no other
        right), its database made from ``template`` on ``host`` (the server with the fewest
        tenants by default) and owned by that role with everything in its public schema, then
        its registry row (the password encrypted). The host's admin credentials are never a
        tenant's."""
        self._writable("CREATE TENANT")
        if not TENANT_NAME.match(name):
            raise ClientError(INVALID_NAME, f"invalid tenant name {name!r}",
                              hint="a tenant name is lower-case letters, digits and _, at most 63, not "
                                   "starting with a digit")
        config = self.config
        if name in config.databases or name in (config.listen.database, ADMIN_DATABASE) or \
                name in ("postgres", "template0", "template1"):
            raise ClientError(DUPLICATE_DATABASE, f'"{name}" is the name of a configured or system database',
                              hint="pick another name for the tenant")
        hosts = self.settings.hosts
        if host is not None and host not in hosts:
            raise ClientError(UNDEFINED_OBJECT, f'host "{host}" is not one of directory.hosts',
                              hint=f"directory.hosts: {', '.join(hosts)}")
        template = template or self.settings.template
        if template is not None and not TENANT_NAME.match(template):
            raise ClientError(INVALID_NAME, f"invalid template name {template!r}",
                              hint="name a database of that server to copy")
        if self.crypto.fernet is None:
            raise ClientError(OBJECT_NOT_IN_PREREQUISITE_STATE, "CREATE TENANT stores the new tenant's password "
                              "encrypted, and directory.encryption_key is not set",
                              hint="set directory.encryption_key (`pgfleet tenants key` makes one)")
        await self._registry_write(f"CREATE TABLE IF NOT EXISTS {self.registry.source} ({TABLE_COLUMNS})")
        if await self.registry.row(name) is not None:
            raise ClientError(DUPLICATE_DATABASE, f'tenant "{name}" already exists',
                              hint="pick another name, or DROP TENANT it first")
        chosen = host if host is not None else await self._least_loaded()
        admin = parse_dsn(hosts[chosen], f"directory.hosts.{chosen}")
        password = secrets.token_urlsafe(24)  # (letters, digits, - and _: safe in a literal)
        role = ident(name)
        await self._on_host(chosen, f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                    f"NOREPLICATION PASSWORD '{password}'")
        try:
            await self._on_host(chosen, f"CREATE DATABASE {role} OWNER {role}"
                                        + (f" TEMPLATE {ident(template)}" if template else ""))
            try:
                await self._on_host(chosen, f"REVOKE ALL ON DATABASE {role} FROM PUBLIC")
                await self._on_host(chosen, _OWN_PUBLIC.replace("{role}", name.replace("'", "''")), dbname=name)
            except ProxyError:
                with contextlib.suppress(ProxyError):
                    await self._on_host(chosen, f"DROP DATABASE IF EXISTS {role} WITH (FORCE)")
                raise
        except ProxyError:
            with contextlib.suppress(ProxyError):
                await self._on_host(chosen, f"DROP ROLE IF EXISTS {role}")
            raise
        options = "&".join(f"{k}={v}" for k, v in admin.options)
        try:
            await self._registry_write(
                f'INSERT INTO {self.registry.source} (name, host, port, dbname, "user", password, dsn) '
                "VALUES ($1, $2, $3, $4, $5, $6, $7)", name, admin.host, admin.port, name, name,
                self.crypto.encrypt(password),
                # the host's connection options (sslmode, ...) hold for the tenant's connections too
                f"postgresql://{name}@{admin.host}:{admin.port}/{name}?{options}" if options else None)
        except ProxyError as exc:
            with contextlib.suppress(ProxyError):  # no database without its row
                await self._on_host(chosen, f"DROP DATABASE IF EXISTS {role} WITH (FORCE)")
                await self._on_host(chosen, f"DROP ROLE IF EXISTS {role}")
            if exc.sqlstate == UNIQUE_VIOLATION:  # made meanwhile by someone else
                raise ClientError(DUPLICATE_DATABASE, f'tenant "{name}" already exists',
                                  hint="pick another name, or DROP TENANT it first") from None
            raise
        log.info("CREATE TENANT %s: database and role made on %s (%s:%d)%s and registered", name, chosen,
                 admin.host, admin.port, f" from template {template}" if template else "")
        return {"name": name, "host": admin.host, "port": admin.port, "dbname": name, "server": chosen}

    async def drop(self, name: str) -> dict[str, Any]:
        """DROP TENANT: its clients and pool closed, its registry row deleted, its database (and
        its role, when CREATE TENANT made it) dropped."""
        self._writable("DROP TENANT")
        row = await self.registry.row(name)
        if row is None:
            raise ClientError(INVALID_CATALOG_NAME, f'tenant "{name}" does not exist',
                              hint="SHOW TENANTS lists the tenants pgfleet knows")
        try:
            if row.get("dsn"):
                dsn = parse_dsn(str(row["dsn"]), f'tenant "{name}": dsn')
                where, dbname, user = (dsn.host, dsn.port), dsn.dbname, dsn.user
            else:
                where, dbname = (str(row.get("host")), int(row.get("port") or 5432)), str(row.get("dbname"))
                user = str(row.get("user"))
        except (ConfigError, ValueError) as exc:
            raise ClientError(CONFIG_FILE_ERROR, f'tenant "{name}": its row in the directory is not usable ({exc})',
                              hint="fix the row, or drop the database and delete the row yourself") from None
        chosen = next((h for h, text in self.settings.hosts.items() if _address(text, h) == where), None)
        if chosen is None:
            raise ClientError(OBJECT_NOT_IN_PREREQUISITE_STATE, f'tenant "{name}" is on {where[0]}:{where[1]}, '
                              "which is not one of directory.hosts: pgfleet cannot drop its database",
                              hint="add that server to directory.hosts, or drop the database there and delete "
                                   "the registry row yourself")
        ours = {self.config.dsn(db).dbname for db in self.config.databases
                if (self.config.dsn(db).host, self.config.dsn(db).port) == where}
        if dbname in ours or dbname in ("postgres", "template0", "template1", self.settings.template):
            raise ClientError(OBJECT_NOT_IN_PREREQUISITE_STATE, f'tenant "{name}"\'s row names database {dbname}, '
                              "which pgfleet serves as a configured, system or template database: not dropped",
                              hint="fix the registry row")
        self._dropping.add(name)
        try:
            sessions = self.sessions.pop(name, set())
            for session in list(sessions):
                session.close(ProxyError(ADMIN_SHUTDOWN, f'terminating connection: tenant "{name}" was dropped',
                                         hint="its database no longer exists"))
            self.known.pop(name, None)
            self._close_pool(name, "DROP TENANT")
            await self._registry_write(f"DELETE FROM {self.registry.source} WHERE name = $1", name)
            await self._on_host(chosen, f"DROP DATABASE IF EXISTS {ident(dbname)} WITH (FORCE)")
            if user == name:  # the role CREATE TENANT made for it
                await self._on_host(chosen, f"DROP ROLE IF EXISTS {ident(user)}")
        finally:
            self._dropping.discard(name)
        log.info("DROP TENANT %s: %d client(s) disconnected, registry row deleted, database %s dropped on %s",
                 name, len(sessions), dbname, chosen)
        return {"dropped": name}

    async def _registry_write(self, sql: str, *args: Any) -> None:
        try:
            await self.registry.execute(sql, *args)
        except asyncpg.PostgresError as exc:
            raise ClientError(exc.sqlstate or OBJECT_NOT_IN_PREREQUISITE_STATE,
                              f"the registry (database {self.settings.registry}) refused: {exc}",
                              hint="check directory.table and the registry user's rights") from None
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise BackendError(CONNECTION_FAILURE, f"the registry (database {self.settings.registry}) did not answer: {exc}",
                               hint="check the registry database") from None

    async def _on_host(self, host: str, sql: str, dbname: str | None = None) -> None:
        dsn = parse_dsn(self.settings.hosts[host], f"directory.hosts.{host}")
        if dbname is not None:
            dsn = msgspec.structs.replace(dsn, dbname=dbname)
        timeout = self.config.pool.connect_timeout
        try:
            conn = await connect(dsn, timeout, APPLICATION_NAME)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise BackendError(CONNECTION_FAILURE, f"directory host {host} ({dsn.host}:{dsn.port}) did not answer: {exc}",
                               hint="check that server and directory.hosts") from None
        try:
            await conn.execute(sql, timeout=max(timeout, 60.0))
        except asyncpg.PostgresError as exc:
            raise ClientError(exc.sqlstate or OBJECT_NOT_IN_PREREQUISITE_STATE,
                              f"directory host {host} refused {sql.split(' PASSWORD')[0].split(' (')[0][:120]}: "
                              f"{exc}", hint="see the server's message") from None
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)

    async def _least_loaded(self) -> str:
        """The host of directory.hosts with the fewest registry rows (the first on a tie)."""
        counts: dict[tuple[str, int], int] = {}
        for row in await self.registry.everything():
            if row.get("dsn"):
                try:
                    dsn = parse_dsn(str(row["dsn"]), "dsn")
                except ConfigError:  # a broken row is no load
                    continue
                where = (dsn.host, dsn.port)
            else:
                where = (str(row.get("host")), int(row.get("port") or 5432))
            counts[where] = counts.get(where, 0) + 1
        hosts = self.settings.hosts

        return min(hosts, key=lambda name: counts.get(_address(hosts[name], name), 0))


def ident(name: str) -> str:
    """A SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


# Run in a new tenant's database as the host's admin: its role owns the public schema and
# what the template put there (tables with their sequences and indexes, views, functions).
_OWN_PUBLIC = """
DO $own$
DECLARE
    r record;
BEGIN
    EXECUTE format('ALTER SCHEMA public OWNER TO %I', '{role}');
    FOR r IN SELECT c.oid::regclass AS what, c.relkind FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                               AND d.objid = c.oid AND d.deptype IN ('a', 'i')) LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I',
                       CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.what, '{role}');
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS what FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'public' LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.what, '{role}');
    END LOOP;
END
$own$
"""


def _address(dsn: str, name: str) -> tuple[str, int]:
    parsed = parse_dsn(dsn, f"directory.hosts.{name}")
    return parsed.host, parsed.port
