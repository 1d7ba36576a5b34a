"""The admin console: ``psql postgresql://ADMIN_KEY@host:6432/pgfleet``, admin keys only.

Every command is one row of ``COMMANDS``: its words, whether it takes an argument, the
function that answers it and its line of ``SHOW HELP``. A function gets the ``Admin`` (what
the console can see and do) and the argument, and returns a ``Table`` (columns and rows) or
a command tag; async ones (they ask a database, or reload) return an awaitable of one.
Column names are PgBouncer's where the concept is the same (``cl_active``, ``sv_idle``,
``total_xact_count``, ...), so dashboards and scripts written for it read them.

``Console`` speaks the wire protocol for one client: simple queries, and the extended
protocol (Parse/Bind/Describe/Execute/Sync) that asyncpg and JDBC use. What a command is
(``Command``, ``Admin``, ``Table`` and their messages) is command.py; the replication job
commands are jobcommands.py; how a process group answers one is here (``answer``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg
import msgspec

from .. import __version__
from ..backend.catalog import connect
from ..config import Config
from ..errors import (
    ADMIN_SHUTDOWN,
    CONNECTION_FAILURE,
    FEATURE_NOT_SUPPORTED,
    INVALID_CATALOG_NAME,
    INVALID_CURSOR_NAME,
    INVALID_PARAMETER_VALUE,
    INVALID_SQL_STATEMENT_NAME,
    SYNTAX_ERROR,
    UNDEFINED_OBJECT,
    ClientError,
    ProxyError,
)
from ..router.route import All, Direct
from ..router.router import SessionContext
from ..wire import messages as m
from .command import (
    Admin,
    Command,
    Result,
    Spread,
    Table,
    Tag,
    _description,
    _int,
    _messages,
    _time,
)
from .group import Group, PeerError, unreachable, worker_of
from .jobcommands import JOB_COMMANDS
from .sequences import read as read_sequences
from .tenantcommands import TENANT_COMMANDS, health_rows, pool_rows

# ---------------------------------------------------------------------------------------------
# The commands


def _help(admin: Admin, _: str) -> Table:
    return Table(("command", "description"),
                 [(" ".join(c.words) + (f" <{c.argument}>" if c.argument else ""), c.help) for c in COMMANDS])


def _databases(admin: Admin, _: str) -> Table:
    fleet = admin.fleet
    config = fleet.config
    rows = []
    for name, db in config.databases.items():
        pool = fleet.pools[name]
        dsn = pool.dsn
        rows.append((name, dsn.host, dsn.port, dsn.dbname, dsn.user, pool.size, config.pool.mode,
                     pool.total + sum(sibling.total for sibling in pool.siblings), pool.paused, fleet.health.status(name).circuit == "open", _role(config, name),
                     len(db.replicas)))
    return Table(("name", "host", "port", "database", "force_user", "pool_size", "pool_mode",
                  "current_connections", "paused", "disabled", "role", "replicas"), rows)


def _pools(admin: Admin, _: str) -> Table:
    fleet = admin.fleet
    rows = []
    for pool in fleet.all_pools():
        name = pool.name
        clients = [s for s in fleet.sessions.values() if _database_of(s) == name
                   and (s.key.backend_role if s.key is not None else None) == pool.role]
        active = sum(1 for s in clients if s.backend is not None and s.backend.pool is pool)
        parked = len(pool.between)
        rows.append((name, pool.dsn.user, active, pool.waiting, len(pool.active) - parked, len(pool.idle), parked,
                     pool.opening, sum(1 for s in clients if s.pins), fleet.config.pool.mode))
    rows.extend(pool_rows(admin, fleet.config.pool.mode))  # the tenant directory's: per host, then the busiest
    return Table(("database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_parked",
                  "sv_login", "cl_pinned", "pool_mode"), rows)


def _clients(admin: Admin, _: str) -> Table:
    rows = []
    for session in list(admin.fleet.sessions.values()):
        addr, _, port = session.peer.rpartition(":")
        backend = session.backend
        rows.append(("C", session.user, session.database, _client_state(session), addr, _int(port),
                     _time(session.connected), session.pid, chr(session.tx_status),
                     backend.database if backend is not None else None,
                     backend.pid if backend is not None else None, session.tls, ",".join(sorted(session.pins)),
                     admin.worker))
    return Table(("type", "user", "database", "state", "addr", "port", "connect_time", "pid", "tx",
                  "server_database", "server_pid", "tls", "pinned", "worker"), rows)


def _servers(admin: Admin, _: str) -> Table:
    fleet = admin.fleet
    clients = {id(s.backend): s for s in fleet.sessions.values() if s.backend is not None}
    now_wall, now = time.time(), time.monotonic()
    rows = []
    for pool in [*fleet.all_pools(), *fleet.tenant_pools.values()]:
        name = pool.name
        between = set(pool.between)
        listed = [(s, "idle") for s in pool.idle] + [(s, "parked" if s in between else "active") for s in pool.active]
        for server, state in listed:
            client = clients.get(id(server))
            rows.append(("S", server.dsn.user, name, state, server.dsn.host, server.dsn.port,
                         _time(now_wall - (now - server.created)), server.pid, chr(server.tx_status),
                         client.pid if client is not None else None, server.generation, admin.worker))
    return Table(("type", "user", "database", "state", "addr", "port", "connect_time", "pid", "tx",
                  "client_pid", "generation", "worker"), rows)


def _workers(admin: Admin, _: str) -> Table:
    fleet = admin.fleet
    backends = sum(len(pool.active) + len(pool.idle) for pool in fleet.all_pools())
    role = "leader" if admin.worker == 0 else "worker"
    return Table(("worker", "pid", "role", "started", "clients", "backends"),
                 [(admin.worker, os.getpid(), role, _time(admin.started), fleet.clients, backends)])


def _stats(admin: Admin, _: str) -> Table:
    rows = []
    for name, pool in admin.fleet.pools.items():
        s = pool.stats
        rows.append((name, s.transactions, s.queries, s.received, s.sent, s.errors,
                     sum(sum(p.disconnects.values()) for p in (pool, *pool.siblings))))
    return Table(("database", "total_xact_count", "total_query_count", "total_received", "total_sent",
                  "total_errors", "total_server_disconnects"), rows)


def _health_table(admin: Admin, _: str) -> Table:
    rows = []
    for name in admin.fleet.config.databases:
        h = admin.fleet.health.status(name)
        rows.append((name, str(h.status), _time(h.last_check), h.response_ms, h.consecutive_failures,
                     str(h.circuit), h.last_error))
    rows.extend(health_rows(admin))  # the tenant directory's, per host
    return Table(("database", "status", "last_check", "response_ms", "failures", "circuit", "last_error"), rows)


def _keys(admin: Admin, _: str) -> Table:
    fleet = admin.fleet
    rows = []
    for key in fleet.keys.values():
        rows.append((key.id, key.role.value, ",".join(sorted(key.databases)) if key.databases is not None else "*",
                     str(key.binding) if key.binding is not None else None, key.read_only, key.max_connections,
                     key.statement_timeout, fleet.key_clients.get(key.id, 0)
                     if key.max_connections is not None else
                     sum(1 for s in fleet.sessions.values() if s.user == key.id),
                     key.backend_role or f"{fleet.config.dsn(fleet.config.default).user} (dsn)",
                     key.policy.describe() if key.policy is not None else "none"))
    return Table(("id", "role", "databases", "binding", "read_only", "max_connections", "statement_timeout",
                  "clients", "backend_role", "policy"), rows)


def _tables(admin: Admin, _: str) -> Table:
    router = admin.fleet.router
    rows: list[tuple[Any, ...]] = []
    for table, key in router.sharded.items():
        rows.append((table, "sharded", ",".join(router.shards), key, router.key_types.get(table)))
    for table in sorted(router.reference):
        rows.append((table, "reference", ",".join(router.shards), None, None))
    for table, database in router.tables.items():
        rows.append((table, "mapped", database, None, None))
    return Table(("table", "kind", "databases", "shard_key", "key_type"), rows)


def _config(admin: Admin, _: str) -> Table:
    config = admin.configured() if admin.configured is not None else admin.fleet.config
    return Table(("key", "value"), list(_flatten(_redacted(config))))


def _version(admin: Admin, _: str) -> Table:
    return Table(("version",), [(f"pgfleet {__version__}",)])


def _plan(admin: Admin, sql: str) -> Table:
    if not sql.strip():
        raise ClientError(SYNTAX_ERROR, "SHOW PLAN needs a statement", hint="SHOW PLAN SELECT ... ")
    fleet = admin.fleet
    key = next(iter(k for k in fleet.keys.values() if k.role.value == "server"), None) or next(iter(fleet.keys.values()))
    route = fleet.router.route(sql, SessionContext(key, None))
    target = route.target
    kind = "direct" if isinstance(target, Direct) else "fan-out" if route.fanout else \
        "all shards" if isinstance(target, All) else "several"
    databases = (target.database,) if isinstance(target, Direct) else target.databases
    plan = None
    if route.fanout:
        plan = fleet.router.fanout_plan(sql, fleet.router.analysis(sql)).sql
    return Table(("kind", "databases", "write", "reason", "shard_query", "as_key"),
                 [(kind, ",".join(databases), route.write, route.reason, plan, key.id)])


async def _schema(admin: Admin, database: str) -> Table:
    name = _known(admin, database)
    rows = await _ask(admin, name, """
        SELECT c.table_schema, c.table_name, c.column_name, c.data_type, c.is_nullable = 'YES'
        FROM information_schema.columns c
        WHERE c.table_schema NOT IN ('pg_catalog', 'information_schema', 'pgfleet')
        ORDER BY 1, 2, c.ordinal_position""")
    return Table(("schema", "table", "column", "type", "nullable"), [tuple(r) for r in rows])


async def _sequences(admin: Admin, _: str) -> Table:
    found, problems = await read_sequences(admin.fleet.config)
    rows = [(seq.table, seq.sequence, seq.database, seq.increment, seq.start, seq.last_value,
             "overlaps" if seq.fix else "interleaved", seq.fix) for seq in found]
    rows += [(None, None, database, None, None, None, f"unavailable: {why}", None) for database, why in problems]
    return Table(("table", "sequence", "database", "increment", "start", "last_value", "status", "fix"), rows)


async def _sizes(admin: Admin, _: str) -> Table:
    names = list(admin.fleet.config.databases)
    found = await asyncio.gather(*(_ask(admin, name, """
        SELECT (SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')),
               pg_database_size(current_database()), pg_size_pretty(pg_database_size(current_database()))""")
                                   for name in names), return_exceptions=True)
    rows = []
    for name, result in zip(names, found, strict=True):
        if isinstance(result, BaseException):
            rows.append((name, None, None, None, "unavailable"))
        else:
            count, size, pretty = result[0]
            rows.append((name, count, size, pretty, "available"))
    return Table(("database", "table_count", "size_bytes", "size", "status"), rows)


async def _reload(admin: Admin, _: str) -> str:
    if admin.reload is None:
        raise ClientError(FEATURE_NOT_SUPPORTED, "RELOAD is not available here", hint="send SIGHUP to the pgfleet process")
    tag = Tag("RELOAD")
    tag.notices = tuple(await admin.reload())  # (workers of a group that did not take it)
    return tag


def _pause(admin: Admin, database: str) -> str:
    pool = admin.fleet.pools[_known(admin, database)]
    pool.pause()
    return "PAUSE"


def _resume(admin: Admin, database: str) -> str:
    pool = admin.fleet.pools[_known(admin, database)]
    pool.resume()
    return "RESUME"


def _kill(admin: Admin, client: str) -> str:
    try:
        pid = int(client)
    except ValueError:
        raise ClientError(INVALID_PARAMETER_VALUE, f"KILL needs a client's pid (SHOW CLIENTS), not {client!r}") from None
    session = admin.fleet.sessions.get(pid)
    if session is None:
        raise ClientError(UNDEFINED_OBJECT, f"no client with pid {pid}", hint="SHOW CLIENTS lists them")
    session.close(ProxyError(ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
    return "KILL"


COMMANDS: tuple[Command, ...] = (
    Command(("SHOW", "HELP"), None, _help, "this list"),
    Command(("SHOW", "DATABASES"), None, _databases, "each database: address, pool size, connections, paused",
            Spread.SUM, ("pool_size", "current_connections"), ("name",)),
    Command(("SHOW", "POOLS"), None, _pools, "each pool: clients active and waiting, servers active, idle, parked",
            Spread.SUM, ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_parked", "sv_login", "cl_pinned"),
            ("database", "user")),
    Command(("SHOW", "CLIENTS"), None, _clients, "each client connection: key, state, backend, pid (for KILL)",
            Spread.EACH),
    Command(("SHOW", "SERVERS"), None, _servers, "each backend connection: database, state, its client",
            Spread.EACH),
    Command(("SHOW", "STATS"), None, _stats, "per database: transactions, queries, bytes, errors since start",
            Spread.SUM, ("total_xact_count", "total_query_count", "total_received", "total_sent", "total_errors",
                         "total_server_disconnects"), ("database",)),
    Command(("SHOW", "HEALTH"), None, _health_table, "per database: status, last check, response time, circuit"),
    Command(("SHOW", "KEYS"), None, _keys, "API keys: role, databases, limits, clients (never secrets)",
            Spread.SUM, ("max_connections", "clients"), ("id",)),
    Command(("SHOW", "WORKERS"), None, _workers, "each worker process (pgfleet run --workers N): pid, clients, "
            "backends", Spread.EACH),
    Command(("SHOW", "TABLES"), None, _tables, "the routing map: sharded, reference and mapped tables"),
    Command(("SHOW", "CONFIG"), None, _config, "the running configuration (secrets hidden)"),
    Command(("SHOW", "VERSION"), None, _version, "pgfleet's version"),
    Command(("SHOW", "SCHEMA"), "database", _schema, "a database's tables and columns"),
    Command(("SHOW", "SIZES"), None, _sizes, "per database: table count and size"),
    Command(("SHOW", "SEQUENCES"), None, _sequences, "the sharded tables' sequences on each shard: whether "
            "they interleave (ids unique across shards), else the ALTER SEQUENCE that fixes them"),
    Command(("SHOW", "PLAN"), "statement", _plan, "the route the router picks for a statement, and why"),
    # RELOAD is LOCAL: in a group, the worker asked reads the file and hands its text to the
    # others (server.py), so that they all take the same config.
    Command(("RELOAD",), None, _reload, "read the config file again; an invalid one is refused", acts=True),
    Command(("PAUSE",), "database", _pause, "new statements for a database wait; running ones finish",
            Spread.EVERY, acts=True),
    Command(("RESUME",), "database", _resume, "end a PAUSE", Spread.EVERY, acts=True),
    Command(("KILL",), "client pid", _kill, "close a client connection (pid from SHOW CLIENTS)", Spread.OWNER,
            acts=True),
    *JOB_COMMANDS,
    *TENANT_COMMANDS,
)


# ---------------------------------------------------------------------------------------------
# A process group (pgfleet run --workers N): one answer from every worker


def answer(admin: Admin, command: Command, argument: str) -> Result | Awaitable[Result]:
    """The console's answer to a command: this process's, or the whole group's."""
    if admin.group is None or command.spread is Spread.LOCAL:
        return command.run(admin, argument)
    return _across(admin, admin.group, command, argument)


async def local_answer(admin: Admin, text: str) -> dict[str, Any]:
    """Another worker's console asks this one (op "console"): this worker's own answer."""
    command, argument = find(text)
    result = command.run(admin, argument)
    if not isinstance(result, Table | str):
        result = await result
    if isinstance(result, str):
        return {"tag": str(result)}
    return {"columns": result.columns, "rows": result.rows, "tag": result.tag}


async def _across(admin: Admin, group: Group, command: Command, argument: str) -> Result:
    request = {"op": "console", "text": " ".join((*command.words, argument)).strip()}
    if command.spread is Spread.OWNER:
        pid = _int(argument)
        worker = worker_of(pid) if pid is not None else group.worker
        if worker >= group.workers:  # not a pid pgfleet gave out: this worker's own answer says so
            worker = group.worker
        try:
            return _result(await group.ask(worker, request))
        except PeerError as exc:
            raise unreachable(worker, exc) from None
    answers = await group.ask_all(request)
    notices = tuple(f"worker {w} did not answer, so it is not counted here: {a}"
                    for w, a in answers.items() if isinstance(a, PeerError))
    for value in answers.values():
        if isinstance(value, ClientError):
            raise value  # the same for every worker (they run the same config), or a real refusal
    results = [_result(value) for value in answers.values() if not isinstance(value, PeerError)]
    if not results:
        raise unreachable(group.worker, PeerError("no worker answered"))
    first = results[0]
    if isinstance(first, str):
        tag = Tag(first)
        tag.notices = notices
        return tag
    tables = [r for r in results if isinstance(r, Table)]
    if command.spread is Spread.EACH:
        rows = [row for table in tables for row in table.rows]
    else:
        rows = _summed(tables, [first.columns.index(c) for c in command.sums],
                       [first.columns.index(c) for c in command.key])
    return Table(first.columns, rows, first.tag, notices)


def _result(answer: dict[str, Any]) -> Result:
    if "columns" not in answer:
        return str(answer["tag"])
    return Table(tuple(answer["columns"]), [tuple(row) for row in answer["rows"]], answer["tag"])


def _summed(tables: list[Table], added: list[int], key: list[int]) -> list[tuple[Any, ...]]:
    """Rows with the same ``key`` columns become one: the ``added`` columns added up (None, no
    limit, stays None), a flag true if it is true in any (PAUSE missed by a worker shows as
    paused), any other column as the first worker has it."""
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for table in tables:
        for row in table.rows:
            have = merged.get(tuple(row[i] for i in key))
            if have is None:
                merged[tuple(row[i] for i in key)] = list(row)
                continue
            for i, value in enumerate(row):
                if i in added:
                    if have[i] is not None and value is not None:
                        have[i] += value
                    elif value is not None:
                        have[i] = value
                elif value is True:
                    have[i] = True
    return [tuple(row) for row in merged.values()]


def find(text: str) -> tuple[Command, str]:
    """The command a query's text names, and its argument."""
    body = text.strip().rstrip(";").strip()
    words = body.split()
    upper = [w.upper() for w in words]
    for command in COMMANDS:
        n = len(command.words)
        if tuple(upper[:n]) != command.words:
            continue
        rest = body
        for _ in range(n):  # the argument as written (SHOW PLAN keeps its statement's case)
            rest = rest.lstrip()[len(rest.lstrip().split(None, 1)[0]):]
        rest = rest.strip()
        if command.argument is None and rest:
            continue
        if command.argument is not None and not rest:
            raise ClientError(SYNTAX_ERROR, f"{' '.join(command.words)} needs a {command.argument}",
                              hint=f"{' '.join(command.words)} <{command.argument}>")
        return command, rest
    raise ClientError(SYNTAX_ERROR, f"unknown admin console command: {body[:80]!r}",
                      hint="SHOW HELP lists the commands")


# ---------------------------------------------------------------------------------------------
# The wire side


class Console:
    """One admin client's conversation: each message in, the bytes to answer out."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.statements: dict[str, str] = {}
        # portal -> (text, its result once Described, the result formats its Bind asked for)
        self.portals: dict[str, tuple[str, Result | None, tuple[int, ...]]] = {}
        self.skipping = False

    def handle(self, kind: int, raw: bytes) -> bytes | Awaitable[bytes]:
        """The answer to one message (an awaitable when the command must wait for something)."""
        if self.skipping and kind != m.SYNC:
            return b""
        try:
            if kind == m.QUERY:
                text = m.decode_query(raw[5:])
                if not text.strip().rstrip(";").strip():
                    return m.message(m.EMPTY_QUERY) + m.ready_for_query(m.TX_IDLE)
                return self._answer(text, lambda r: _messages(r) + m.ready_for_query(m.TX_IDLE), simple=True)
            if kind == m.PARSE:
                parse = m.decode_parse(raw[5:])
                find(parse.query) if parse.query.strip() else None
                self.statements[parse.name] = parse.query
                return m.PARSE_COMPLETE_MSG
            if kind == m.BIND:
                portal_end = raw.index(0, 5)
                name = raw[portal_end + 1:raw.index(0, portal_end + 1)].decode()
                if name not in self.statements:
                    raise ClientError(INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name}" does not exist')
                _, formats = m.bind_results(raw[raw.index(0, portal_end + 1) + 1:])
                self.portals[raw[5:portal_end].decode()] = (self.statements[name], None, formats)
                return m.BIND_COMPLETE_MSG
            if kind == m.DESCRIBE:
                which, name = raw[5], raw[6:raw.index(0, 6)].decode()
                if which == m.TARGET_STATEMENT:
                    if name not in self.statements:
                        raise ClientError(INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name}" does not exist')
                    text = self.statements[name]
                    if find(text)[0].acts:  # (Execute does it; describing it must not)
                        return b"\x74\0\0\0\x06\0\0" + m.NO_DATA_MSG
                    return self._answer(text, lambda r: b"\x74\0\0\0\x06\0\0" + _description(r))
                portal = self.portals.get(name)
                if portal is None:
                    raise ClientError(INVALID_CURSOR_NAME, f'portal "{name}" does not exist')

                def keep(result: Result, name: str = name, text: str = portal[0],
                         formats: tuple[int, ...] = portal[2]) -> bytes:
                    self.portals[name] = (text, result, formats)
                    return _description(result, formats)
                return self._answer(portal[0], keep)
            if kind == m.EXECUTE:
                name = raw[5:raw.index(0, 5)].decode()
                portal = self.portals.get(name)
                if portal is None:
                    raise ClientError(INVALID_CURSOR_NAME, f'portal "{name}" does not exist')
                text, result, formats = portal
                if result is not None:  # described: run once, rows now
                    return _messages(result, describe=False, formats=formats)
                return self._answer(text, lambda r: _messages(r, describe=False, formats=formats))
            if kind == m.CLOSE:
                which, name = raw[5], raw[6:raw.index(0, 6)].decode()
                (self.statements if which == m.TARGET_STATEMENT else self.portals).pop(name, None)
                return m.CLOSE_COMPLETE_MSG
            if kind == m.SYNC:
                self.skipping = False
                self.portals.pop("", None)
                return m.ready_for_query(m.TX_IDLE)
            if kind == m.FLUSH:
                return b""
            raise ClientError(FEATURE_NOT_SUPPORTED, f"the admin console does not take message type {chr(kind)!r}",
                              hint="use simple queries (psql) or the extended protocol")
        except ProxyError as exc:
            return self._error(exc, simple=kind == m.QUERY)

    def _answer(self, text: str, wrap: Callable[[Result], bytes], simple: bool = False) -> bytes | Awaitable[bytes]:
        command, argument = find(text)
        result = answer(self.admin, command, argument)
        if isinstance(result, (Table, str)):
            return wrap(result)

        async def later(pending: Awaitable[Result]) -> bytes:
            try:
                return wrap(await pending)
            except ProxyError as exc:
                return self._error(exc, simple)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                return self._error(ProxyError(CONNECTION_FAILURE, f"{' '.join(command.words)}: {exc}",
                                              hint="check that database (SHOW HEALTH)"), simple)
        return later(result)

    def _error(self, exc: ProxyError, simple: bool) -> bytes:
        error = m.error_response(exc.sqlstate, exc.message, hint=exc.hint)
        if simple:
            return error + m.ready_for_query(m.TX_IDLE)
        self.skipping = True
        return error


# ---------------------------------------------------------------------------------------------
# Helpers


def _known(admin: Admin, database: str) -> str:
    name = database.strip().strip('"')
    if name not in admin.fleet.config.databases:
        raise ClientError(INVALID_CATALOG_NAME, f'database "{name}" does not exist',
                          hint=f"the databases: {', '.join(admin.fleet.config.databases)}")
    return name


async def _ask(admin: Admin, database: str, sql: str) -> list[asyncpg.Record]:
    config = admin.fleet.config
    conn = await connect(config.dsn(database), config.pool.connect_timeout, "pgfleet admin")
    try:
        return list(await conn.fetch(sql, timeout=config.pool.connect_timeout))
    finally:
        conn.terminate()


def _role(config: Config, name: str) -> str:
    roles = []
    if name == config.default_database:
        roles.append("default")
    if name in config.sharding.shards:
        roles.append(f"shard {config.sharding.shards.index(name)}")
    if name in config.tables.values():
        roles.append("mapped tables")
    return ", ".join(roles) or "by name"


def _database_of(session: Any) -> str | None:
    backend = session.backend
    return backend.database if backend is not None else None


def _client_state(session: Any) -> str:
    if session.waiting:
        return "waiting"
    backend = session.backend
    if backend is not None and (backend.expects or backend.tx_status != m.TX_IDLE):
        return "active"
    return "idle"


def _redacted(config: Config) -> dict[str, Any]:
    data = msgspec.to_builtins(config, enc_hook=lambda o: f"{float(o):g}s" if isinstance(o, float) else str(o))
    for db in data.get("databases", {}).values():
        db["dsn"] = _mask_dsn(db["dsn"])
        db["replicas"] = [_mask_dsn(r) for r in db.get("replicas", [])]
    for key in data.get("keys", []):
        key["secret"] = "(hidden)"
    tls = (data.get("listen") or {}).get("tls")
    if tls:
        tls["key"] = "(hidden)"
    directory = data.get("directory")
    if directory:
        directory["hosts"] = {name: _mask_dsn(dsn) for name, dsn in directory.get("hosts", {}).items()}
        if directory.get("encryption_key"):
            directory["encryption_key"] = "(hidden)"
    return data


def _mask_dsn(dsn: str) -> str:
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


def _flatten(data: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, msgspec.json.encode(data).decode() if not isinstance(data, str) else data
