"""Routing decisions: ``Router.route(sql, session) -> Route``, in DESIGN's order.

Owns the routing order (direct database, key binding, table map, default database), the
allow-list and read-only checks, and the statement-analysis cache keyed by exact statement
text. It returns values or raises ``ClientError``; it never does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..auth.keys import ApiKey, Role
from ..config import Config
from ..errors import ClientError
from .parse import analyze, is_catalog
from .route import Analysis, Direct, Kind, Route


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What the router knows about the client: its key and the database it connected to."""

    key: ApiKey
    database: str | None  # a database named in the connection string, or None for the fleet


class Router:
    def __init__(self, config: Config, cache_size: int = 10000) -> None:
        self.config = config
        self.default = config.default
        self.tables = dict(config.tables)
        self.sharded = set(config.sharding.tables) | set(config.sharding.reference_tables)
        self.cache: dict[str, Analysis] = {}
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0

    # -- the fixed part of a session's routing, decided once at connect time

    def fixed_database(self, ctx: SessionContext) -> str | None:
        """The one database every statement of this session goes to, if that is decided.

        When it is, statements need no parsing unless the key is read-only.
        """
        if ctx.database is not None:
            return ctx.database
        if ctx.key.role is Role.CLIENT:
            return self.default
        if ctx.key.role is Role.DATABASE and not self.config.sharding.shards:
            return self.default
        if not self.tables and not self.sharded:
            return self.default
        return None

    def check_database(self, ctx: SessionContext, database: str) -> None:
        if not ctx.key.may_use(database):
            raise ClientError("42501", f"key {ctx.key.id} may not use database {database}",
                              hint=f"the key's databases: {', '.join(sorted(ctx.key.databases or ()))}")

    # -- per statement

    def analysis(self, sql: str) -> Analysis:
        found = self.cache.get(sql)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        found = analyze(sql)
        if len(self.cache) >= self.cache_size:
            self.cache.pop(next(iter(self.cache)))
        self.cache[sql] = found
        return found

    def route(self, sql: str, ctx: SessionContext) -> Route:
        fixed = self.fixed_database(ctx)
        if fixed is not None and not ctx.key.read_only:
            return Route(Direct(fixed), write=True, reason=_why_fixed(ctx, fixed))
        analysis = self.analysis(sql)
        if ctx.key.read_only:
            self._check_read_only(analysis, ctx)
        database, reason = (fixed, _why_fixed(ctx, fixed)) if fixed is not None else self._by_tables(analysis)
        self.check_database(ctx, database)
        return Route(Direct(database), write=analysis.writes is not None, reason=reason,
                     anywhere=reason is _NO_TABLE)

    def _check_read_only(self, analysis: Analysis, ctx: SessionContext) -> None:
        stmt = analysis.writes
        if stmt is not None:
            raise ClientError("25006", f"key {ctx.key.id} is read-only: {stmt.command} is refused",
                              hint="use a key without read_only: true for writes")

    def _by_tables(self, analysis: Analysis) -> tuple[str, str]:
        placed: dict[str, list[str]] = {}
        for stmt in analysis.statements:
            if stmt.kind is Kind.TRANSACTION or stmt.kind is Kind.SESSION:
                continue
            for relation in stmt.relations:
                if is_catalog(relation):
                    continue
                database = self.tables.get(relation.qualified) or self.tables.get(relation.name)
                if database is None and relation.name in self.sharded:
                    raise ClientError("0A000", f"table {relation.name} is sharded and sharded routing is "
                                      "not available in this version", hint="connect to a shard by name")
                placed.setdefault(database or self.default, []).append(relation.qualified)
        if not placed:
            return self.default, _NO_TABLE
        if len(placed) > 1:
            parts = "; ".join(f"{', '.join(sorted(set(t)))} on {db}" for db, t in sorted(placed.items()))
            raise ClientError("0A000", f"one statement cannot touch tables of two databases ({parts})",
                              hint="split it into one statement per database; pgfleet does not join "
                                   "across databases")
        (database, tables), = placed.items()
        return database, f"tables {', '.join(sorted(set(tables)))} are on {database}"


_NO_TABLE = "no mapped table: default database"


def _why_fixed(ctx: SessionContext, database: str) -> str:
    if ctx.database is not None:
        return f"connected to database {database}"
    if ctx.key.role is Role.CLIENT:
        return "client keys use the default database"
    return f"{database} is the default database"
