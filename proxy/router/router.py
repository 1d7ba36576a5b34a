"""Routing decisions: ``Router.route(sql, ctx, hints, params) -> Route``, in DESIGN's order.

Owns the routing order (direct database, key binding, hints, tables, default database), the
allow-list and read-only checks, the shard of each bound shard-key value, and the
statement-analysis cache keyed by exact statement text. It returns values or raises
``ClientError``; it never does I/O. The analysis of a text is cached; the route is then a
cheap function of it, the Bind values, the key and the session's hints.
"""

from __future__ import annotations

import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..auth.keys import ApiKey, Role
from ..config import Config
from ..errors import (
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    INVALID_BINARY_REPRESENTATION,
    INVALID_CATALOG_NAME,
    INVALID_PARAMETER_VALUE,
    INVALID_SQL_STATEMENT_NAME,
    INVALID_TEXT_REPRESENTATION,
    NOT_NULL_VIOLATION,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    PROTOCOL_VIOLATION,
    READ_ONLY_SQL_TRANSACTION,
    SYNTAX_ERROR,
    ClientError,
)
from ..wire.messages import counted_values
from .fanout import FanoutPlan, Unmergeable
from .keybind import InsertKeys, KeyValue
from .parse import analyze, fanout_plan, is_catalog
from .policy import check as check_policy
from .route import All, Analysis, Direct, Hints, Kind, Multi, Params, Route, Statement, Target
from .shard import binary_key_value, int_shard_of, key_value, shard_of


class UnknownTypes(ClientError):
    """A statement needs the shard-key type of ``tables``, not known yet: the session reads
    them from the catalog (``Fleet.learn_types``) and routes the statement again, or refuses
    it with this error when that was tried moments ago."""

    def __init__(self, tables: list[str], message: str, hint: str) -> None:
        super().__init__(OBJECT_NOT_IN_PREREQUISITE_STATE, message, hint=hint)
        self.tables = tables


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What the router knows about the client: its key and the database it connected to."""

    key: ApiKey
    database: str | None  # a database named in the connection string, or None for the fleet


class Router:
    def __init__(self, config: Config, cache_size: int | None = None) -> None:
        self.config = config
        self.default = config.default
        # The tenant directory's registry (unless it is the default database, which every key
        # uses): reached by admin keys and by keys whose databases name it, no others.
        directory = config.directory
        self.registry = directory.registry if directory is not None and directory.registry != config.default else None
        self.tables = dict(config.tables)
        sharding = config.sharding
        self.shards: tuple[str, ...] = tuple(sharding.shards)
        self.function = sharding.function
        self.sharded: dict[str, str] = dict(sharding.tables) if self.shards else {}
        self.reference = frozenset(sharding.reference_tables) if self.shards else frozenset()
        # The shard key's type per sharded table: pinned in config, else learned from the catalog.
        self.key_types: dict[str, str] = {t: _type_name(v) for t, v in sharding.types.items()}
        self.pinned_types = frozenset(self.key_types)
        # Where each sharded table's key sits among its columns (INSERT without a column list).
        self.key_positions: dict[str, int] = {}
        # Why a type is still unknown after the catalog was last read (the shard's answer, or
        # that the table is not there), and when: a short negative cache (Fleet.learn_types).
        self.types_tried: dict[str, tuple[float, str]] = {}
        self.cache: OrderedDict[str, Analysis] = OrderedDict()
        # Routes (or key plans) by (text, key id, database, hints), in insertion order.
        self.routes: dict[tuple[object, ...], Route | _KeyPlan] = {}
        self.plans: OrderedDict[str, FanoutPlan | Unmergeable] = OrderedDict()  # federated SELECTs
        self.cache_size = cache_size if cache_size is not None else config.router.plan_cache_size
        self.hits = 0
        self.misses = 0

    def learn_types(self, types: dict[str, str]) -> list[str]:
        """Shard-key types read off the first shard's catalog; config's sharding.types win.

        Returns the problems (a type that cannot be a shard key), one line each.
        """
        problems = []
        for table, type_name in types.items():
            try:
                self.key_types.setdefault(table, _type_name(type_name))
            except ValueError as exc:
                problems.append(f"{table}.{self.sharded.get(table, '?')}: {exc}")
        return problems

    def forget_types(self, tables: list[str]) -> None:
        """DDL on these sharded tables goes through pgfleet: what it knows of them is read again
        when a statement next needs it (config's sharding.types stay)."""
        for table in tables:
            if table not in self.pinned_types:
                self.key_types.pop(table, None)
            self.key_positions.pop(table, None)
            self.types_tried.pop(table, None)

    @property
    def unknown_types(self) -> list[str]:
        return [table for table in self.sharded if table not in self.key_types]

    # -- the fixed part of a session's routing, decided once at connect time

    def fixed_database(self, ctx: SessionContext) -> str | None:
        """The one database every statement of this session goes to, if that is decided.

        When it is, statements need no parsing unless the key is read-only.
        """
        if ctx.database is not None:
            return ctx.database
        if ctx.key.role is Role.CLIENT:
            return self.default
        if ctx.key.role is Role.DATABASE:
            return None if self.shards else self.default
        if len(self.config.databases) == 1:
            return self.default  # hints could name no other database
        return None

    def home_database(self, ctx: SessionContext) -> str:
        """Where a session's first backend comes from (to check its startup settings)."""
        fixed = self.fixed_database(ctx)
        if fixed is not None:
            return fixed
        if ctx.key.role is Role.DATABASE and ctx.key.binding is not None:
            try:
                return self.shards[self._tenant_shard(ctx.key)]
            except ClientError:  # the key type is not known yet: its statements will say so
                return self.shards[0]
        if ctx.key.may_use(self.default):
            return self.default
        allowed = [name for name in self.config.databases if ctx.key.may_use(name)]
        return min(allowed) if allowed else self.default

    def check_database(self, ctx: SessionContext, database: str) -> None:
        if database == self.registry and ctx.key.role is not Role.ADMIN and database not in (ctx.key.databases or ()):
            # It holds every tenant's address and credentials: only keys that name it reach it.
            raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {ctx.key.id} may not use database {database}: it is the "
                              "tenant directory's registry", hint="name it in the key's databases: to allow that key")
        if not ctx.key.may_use(database):
            raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {ctx.key.id} may not use database {database}",
                              hint=f"the key's databases: {', '.join(sorted(ctx.key.databases or ()))}")

    # -- per statement

    def analysis(self, sql: str) -> Analysis:
        cache = self.cache
        found = cache.get(sql)
        if found is not None:
            self.hits += 1
            cache.move_to_end(sql)
            return found
        self.misses += 1
        found = analyze(sql, self.sharded)
        cache[sql] = found
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return found

    def fanout_plan(self, sql: str, analysis: Analysis) -> FanoutPlan:
        """How a SELECT read from several databases is merged; 0A000 for shapes that cannot be."""
        plans = self.plans
        found = plans.get(sql)
        if found is None:
            keys = {r.name: self.sharded[r.name] for stmt in analysis.statements for r in stmt.relations
                    if r.name in self.sharded}
            shape = next((stmt.shape for stmt in analysis.statements if stmt.shape), "SELECT")
            try:
                found = fanout_plan(sql, keys, shape)
            except Unmergeable as exc:
                found = exc
            plans[sql] = found
            if len(plans) > self.cache_size:
                plans.popitem(last=False)
        if isinstance(found, Unmergeable):
            raise ClientError(FEATURE_NOT_SUPPORTED, f"{found.shape} is not supported: pgfleet cannot merge it exactly",
                              hint=found.hint)
        return found

    def route(self, sql: str, ctx: SessionContext, hints: Hints | None = None,
              params: Params | None = None) -> Route:
        """The route of ``sql`` for this client; a repeated statement costs a dict lookup.

        Routes that depend only on the text, the key and the hints are kept as they are;
        those that depend on one shard-key parameter keep a plan that hashes it.
        """
        cache_key = (sql, ctx.key.id, ctx.database, hints)
        found = self.routes.get(cache_key)
        if found is not None:  # (the plan cache's hits and misses are the analysis's: not counted here)
            if type(found) is Route:
                return found
            assert isinstance(found, _KeyPlan)
            if params is None:
                return found.unbound
            return found.route(params)
        fixed = self.fixed_database(ctx)
        if fixed is not None and not ctx.key.read_only and ctx.key.policy is None:
            route = Route(Direct(fixed), write=True, reason=_why_fixed(ctx, fixed))
            self._remember(cache_key, route)
            return route
        # The session has looked the text up already for this statement: a hit is not counted
        # twice (a text never seen is parsed, and counted a miss, here).
        analysis = self.cache.get(sql) or self.analysis(sql)
        route = self.route_analysis(analysis, ctx, hints, None)
        if not route.needs_params:
            if not any(stmt.kind is Kind.DDL for stmt in analysis.statements):  # DDL: forget_types each time
                self._remember(cache_key, route)
            return route
        plan = self._key_plan(analysis, ctx, hints, route)
        if plan is None:
            return route if params is None else self.route_analysis(analysis, ctx, hints, params)
        self._remember(cache_key, plan)
        return route if params is None else plan.route(params)

    def _remember(self, cache_key: tuple[object, ...], value: Route | _KeyPlan) -> None:
        routes = self.routes
        routes[cache_key] = value
        if len(routes) > self.cache_size:
            routes.pop(next(iter(routes)))

    def _key_plan(self, analysis: Analysis, ctx: SessionContext, hints: Hints | None,
                  unbound: Route) -> _KeyPlan | None:
        """A plan for a statement whose only shard-key parameter is one ``$n``.

        Its route then depends on the shard that value hashes to and on nothing else (the
        words of a route name shards, never values), so the plan keeps one route per shard,
        each found once by the full router. Tenant keys are left out: their check compares
        the value itself.
        """
        if ctx.key.role not in (Role.SERVER, Role.ADMIN) or hints or analysis.hints:
            return None
        if len(analysis.statements) != 1:
            return None
        stmt = analysis.statements[0]
        bound: list[tuple[str, KeyValue]] = []
        if stmt.insert is not None and stmt.insert.rows is not None:
            bound = [(stmt.insert.table, row) for row in self._insert_rows(stmt.insert) or () if row is not None]
        elif stmt.insert is None and stmt.placement is not None:
            bound = [(o.table, v) for o in stmt.placement.occurrences for v in o.values or ()]
        params = {value.param for _, value in bound if value.param is not None}
        types = {self.key_types.get(table) for table, value in bound if value.param is not None}
        if len(params) != 1 or len(types) != 1 or None in types or any(value.array for _, value in bound):
            return None
        (param,), (type_name,) = params, types
        assert param is not None and type_name is not None
        return _KeyPlan(param - 1, type_name, self.shards, self.function, unbound,
                        lambda given: self.route_analysis(analysis, ctx, hints, given))

    def route_analysis(self, analysis: Analysis, ctx: SessionContext, hints: Hints | None = None,
                       params: Params | None = None) -> Route:
        fixed = self.fixed_database(ctx)
        if analysis.hint_error is not None and fixed is None:
            raise ClientError(SYNTAX_ERROR, analysis.hint_error,
                              hint="e.g. /* pgfleet: shard_key=42 */ or /* pgfleet: database=analytics */")
        if ctx.key.read_only:
            self._check_read_only(analysis, ctx)
        if ctx.key.policy is not None:
            check_policy(ctx.key.policy, analysis, ctx.key.id, ctx.key.role.value)
        for stmt in analysis.statements:
            if "pgfleet_statement" in stmt.acts:
                raise _pgfleet_statement(stmt)
        write = analysis.writes is not None
        if fixed is not None:
            route = Route(Direct(fixed), write, _why_fixed(ctx, fixed))
        elif ctx.key.role is Role.DATABASE:
            route = self._tenant(analysis, ctx, hints, params, write)
        elif analysis.hints or hints:
            route = self._hinted(analysis, analysis.hints or hints, write)  # type: ignore[arg-type]
        else:
            route = self._by_tables(analysis, write, params)
        for database in _databases(route.target):
            self.check_database(ctx, database)
        return route

    def _check_read_only(self, analysis: Analysis, ctx: SessionContext) -> None:
        stmt = analysis.writes
        if stmt is not None:
            raise ClientError(READ_ONLY_SQL_TRANSACTION, f"key {ctx.key.id} is read-only: {stmt.command} is refused",
                              hint="use a key without read_only: true for writes")

    # -- hints (server and admin keys)

    def _hinted(self, analysis: Analysis, hints: Hints, write: bool) -> Route:
        how = f"hint {hints.describe()}"
        if hints.database is not None:
            if hints.database not in self.config.databases:
                raise ClientError(INVALID_CATALOG_NAME, f'{how}: database "{hints.database}" does not exist',
                                  hint=f"databases: {', '.join(self.config.databases)}")
            return Route(Direct(hints.database), write, how)
        if hints.databases is not None:
            unknown = [d for d in hints.databases if d not in self.config.databases]
            if unknown or not hints.databases:
                raise ClientError(INVALID_CATALOG_NAME, f"{how}: no such database {', '.join(unknown) or '(none)'}",
                                  hint=f"databases: {', '.join(self.config.databases)}")
            databases = tuple(dict.fromkeys(hints.databases))
            target: Target = Direct(databases[0]) if len(databases) == 1 else Multi(databases)
            return Route(target, write, how, fanout=len(databases) > 1 and not write)
        self._need_shards(how)
        if hints.shard is not None:
            if not 0 <= hints.shard < len(self.shards):
                raise ClientError(INVALID_PARAMETER_VALUE, f"{how}: there are {len(self.shards)} shards, numbered "
                                  f"0 to {len(self.shards) - 1}", hint=f"shards: {', '.join(self.shards)}")
            return Route(Direct(self.shards[hints.shard]), write, how)
        assert hints.shard_key is not None
        tables = [o.table for stmt in analysis.statements if stmt.placement is not None
                  for o in stmt.placement.occurrences]
        type_name = self._type_of(tables[0]) if tables else self._common_type()
        value = key_value(hints.shard_key, type_name)
        shard = self.shards[shard_of(value, type_name, len(self.shards), self.function)]
        return Route(Direct(shard), write, f"{how} is on shard {shard}")

    # -- database keys: one tenant, one shard

    def _tenant_shard(self, key: ApiKey) -> int:
        type_name = self._common_type()
        return shard_of(key_value(str(key.binding), type_name), type_name, len(self.shards), self.function)

    def _tenant(self, analysis: Analysis, ctx: SessionContext, hints: Hints | None,
                params: Params | None, write: bool) -> Route:
        key = ctx.key
        if key.binding is None:
            raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} (database) is bound to no shard-key value",
                              hint="give the key user_id: or shard_key: in the config")
        own = self.shards[self._tenant_shard(key)]
        bound = f"key {key.id} is bound to {self._key_name()} {key.binding}"
        if analysis.hints or hints:
            raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: pgfleet hints are not allowed for it",
                              hint="remove the /* pgfleet: ... */ comment or SET pgfleet.*")
        needs_params = False
        for stmt in analysis.statements:
            if stmt.kind is Kind.TRANSACTION or stmt.kind is Kind.SESSION:
                continue
            for relation in stmt.relations:
                if is_catalog(relation) or relation.name in self.sharded:
                    continue
                if relation.name in self.reference:
                    if stmt.kind is not Kind.READ:
                        raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: {stmt.command} on reference table "
                                          f"{relation.name} would change every shard",
                                          hint="write reference tables with a server key")
                    continue
                database = self._mapped(relation.qualified, relation.name)
                if database is None:
                    raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: {relation.qualified} is not one of the "
                                      "fleet's tables (sharded, reference or mapped); a view or table the router "
                                      "does not know could show other tenants' rows",
                                      hint="list it in sharding.reference_tables or tables:, or use a server key")
                if database != own:
                    raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: table {relation.qualified} is on database "
                                      f"{database}, not on its shard {own}",
                                      hint="a database key reaches only its own shard")
            if stmt.placement is None:
                continue
            if stmt.kind is Kind.DDL:
                raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: {stmt.command} on a sharded table would change "
                                  "every shard", hint="run DDL with a server key")
            if stmt.moves_rows:
                raise _moves_rows(stmt, self.sharded)
            mine = key_value(str(key.binding), self._common_type())
            keys: list[tuple[str, KeyValue | None]] = [(o.table, v) for o in stmt.placement.occurrences
                                                       for v in (o.values or (None,))]
            if stmt.insert is not None:
                keys.extend((stmt.insert.table, v) for v in (self._insert_rows(stmt.insert) or (None,)))
            for table, value in keys:
                if value is None:
                    raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: this {stmt.command} on {table} does not "
                                      f"name {self.sharded[table]}, so it would reach other tenants' rows",
                                      hint=f"add WHERE {self.sharded[table]} = {key.binding}")
                if value.param is not None and params is None:
                    needs_params = True
                    continue
                for given in self._values(table, value, params):
                    if given != mine:
                        raise ClientError(INSUFFICIENT_PRIVILEGE, f"{bound}: {stmt.command} on {table} names "
                                          f"{self.sharded[table]} {given}", hint="a database key reaches "
                                          "only its own rows")
        return Route(Direct(own), write, f"{bound}, on shard {own}", needs_params=needs_params)

    # -- tables

    def _mapped(self, qualified: str, name: str) -> str | None:
        return self.tables.get(qualified) or self.tables.get(name)

    def _by_tables(self, analysis: Analysis, write: bool, params: Params | None) -> Route:
        places: list[tuple[tuple[str, ...], str]] = []
        needs_params = False
        row_shards: tuple[str, ...] | None = None
        fanout_read = False
        for stmt in analysis.statements:
            if stmt.kind is Kind.TRANSACTION or stmt.kind is Kind.SESSION:
                continue
            placed = self._statement(stmt, params)
            if placed is None:
                continue
            databases, reason, pending, rows = placed
            needs_params = needs_params or pending
            row_shards = rows if rows is not None else row_shards
            fanout_read = fanout_read or (len(databases) > 1 and stmt.kind is Kind.READ)
            places.append((databases, reason))
        if not places:
            return Route(Direct(self.default), write, _NO_TABLE, anywhere=True)
        first = places[0][0]
        for databases, reason in places[1:]:
            if databases != first:
                raise ClientError(FEATURE_NOT_SUPPORTED, "the statements of one query string go to different places "
                                  f"({places[0][1]}; {reason})",
                                  hint="send them as separate queries")
        reason = places[0][1]
        target: Target
        if len(first) == 1:
            target = Direct(first[0])
        elif self.shards and first == self.shards:
            target = All(self.shards)
        else:
            target = Multi(first)
        replicated = all(r.endswith(_REPLICATED) for _, r in places)
        return Route(target, write, reason, needs_params=needs_params and len(places) >= 1,
                     fanout=fanout_read and not isinstance(target, Direct), row_shards=row_shards,
                     replicated=replicated and not isinstance(target, Direct))

    def _statement(self, stmt: Statement, params: Params | None
                   ) -> tuple[tuple[str, ...], str, bool, tuple[str, ...] | None] | None:
        """(databases, reason, needs params, row shards) of one statement; None: no table."""
        mapped: dict[str, list[str]] = {}
        reference: list[str] = []
        sharded_names: list[str] = []
        for relation in stmt.relations:
            if is_catalog(relation):
                continue
            if relation.name in self.sharded:
                sharded_names.append(relation.name)
            elif relation.name in self.reference:
                reference.append(relation.name)
            else:
                database = self._mapped(relation.qualified, relation.name) or self.default
                mapped.setdefault(database, []).append(relation.qualified)
        if not (mapped or reference or sharded_names):
            return None
        shards: tuple[str, ...] | None = None  # None: any shard will do
        reason = ""
        pending = False
        rows: tuple[str, ...] | None = None
        if sharded_names:
            if stmt.kind is Kind.DDL:  # needs no key type: every shard, and what pgfleet knows is read again
                self.forget_types(sharded_names)
                shards, reason = self.shards, f"DDL on sharded table {_names(sharded_names)} runs on every shard"
            else:
                self._need_types(sharded_names)
                if stmt.moves_rows:
                    raise _moves_rows(stmt, self.sharded)
                shards, reason, pending, rows = self._sharded(stmt, params)
        if reference and stmt.kind is not Kind.READ and sharded_names and stmt.target in self.reference:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"{stmt.command} on reference table {stmt.target} that reads sharded table "
                              f"{_names(sharded_names)} is not supported: each shard would write its copy from "
                              "its own rows only, and the copies would differ",
                              hint="read the sharded rows first, then write the reference table with constants")
        if reference and stmt.kind is not Kind.READ:
            shards = self.shards
            reason = (f"{stmt.command} on reference table {_names(reference)} runs on every shard"
                      + ("" if sharded_names else _REPLICATED))
        elif reference and shards is None:
            reason = f"reference table {_names(reference)} is read from one shard"
        if mapped:
            database = next(iter(mapped))
            together = not (sharded_names or reference) or (
                database in self.shards and (shards is None or set(shards) == {database}))
            if len(mapped) > 1 or not together:
                parts = [f"{', '.join(sorted(set(t)))} on {db}" for db, t in sorted(mapped.items())]
                if sharded_names or reference:
                    parts.append(f"{_names(sharded_names + reference)} on the shards")
                raise ClientError(FEATURE_NOT_SUPPORTED, f"one statement cannot touch tables of two databases "
                                  f"({'; '.join(parts)})",
                                  hint="split it into one statement per database; pgfleet does not join "
                                       "across databases")
            tables = mapped[database]
            return (database,), f"tables {', '.join(sorted(set(tables)))} are on {database}", pending, rows
        if shards is None:
            shards = self.shards[:1]
        return shards, reason, pending, rows

    def _sharded(self, stmt: Statement, params: Params | None
                 ) -> tuple[tuple[str, ...], str, bool, tuple[str, ...] | None]:
        """The shards a statement on sharded tables must run on."""
        if stmt.insert is not None:
            insert = stmt.insert
            column = self.sharded[insert.table]
            rows = self._insert_rows(insert)
            if rows is None:
                raise ClientError(FEATURE_NOT_SUPPORTED, f"INSERT ... SELECT into sharded table {insert.table} is not "
                                  "supported: pgfleet cannot tell which shard each row belongs to",
                                  hint=f"insert VALUES rows, or add /* pgfleet: shard_key=... */ when "
                                       f"every row has the same {column}")
            if any(row is None for row in rows):
                raise ClientError(FEATURE_NOT_SUPPORTED, f"INSERT into sharded table {insert.table} must give its shard "
                                  f"key {column} in every row (as a constant or a parameter)",
                                  hint=f"give {column} a value in each VALUES row (not DEFAULT or an expression)"
                                  if insert.positional is not None
                                  else f"add {column} to the column list and to each VALUES row")
            if params is None and any(row is not None and row.param is not None for row in rows):
                return self.shards[:1], f"INSERT into {insert.table}: shards by parameter", True, None
            row_shards = tuple(self._one_shard(insert.table, row, params) for row in rows if row)
            shards = tuple(s for s in self.shards if s in row_shards)
            reason = (f"INSERT into {insert.table}: {column} of its rows on "
                      f"{'shard ' if len(shards) == 1 else 'shards '}{', '.join(shards)}")
            return shards, reason, False, row_shards
        placement = stmt.placement
        assert placement is not None
        tables = [o.table for o in placement.occurrences]
        if not tables:  # named where keybind does not look (TABLESAMPLE, ...): no key is bound
            names = _names([r.name for r in stmt.relations if r.name in self.sharded])
            return self.shards, f"{names} with no shard key bound: every shard", False, None
        bound = [o for o in placement.occurrences if o.values is not None]
        if params is None and any(v.param is not None for o in bound for v in o.values or ()):
            return self.shards[:1], f"{_names(tables)}: shard by parameter", True, None
        sets = [(o, self._shards_of(o.table, o.values or (), params)) for o in bound]
        if len(placement.occurrences) > 1:
            if placement.colocated:
                if sets:  # joined on their keys: any one binding pins them all
                    occurrence, found = min(sets, key=lambda item: len(item[1]))
                    return (found, (f"{_names(tables)} joined on the shard key, "
                                    f"{self.sharded[occurrence.table]} on {', '.join(found)}"), False, None)
                return (self.shards, f"{_names(tables)} joined on the shard key, no key bound: every shard",
                        False, None)
            places = {s for _, found in sets for s in found}
            if len(bound) == len(placement.occurrences) and len(places) == 1:
                return (tuple(places), f"{_names(tables)} all bound to shard {next(iter(places))}", False, None)
            if len(set(tables)) == 1:
                raise ClientError(FEATURE_NOT_SUPPORTED, f"a statement that reads sharded table {tables[0]} more than once "
                                  "(a self-join not on the shard key, a subquery or a UNION) is not supported "
                                  "across shards", hint=f"bind {self.sharded[tables[0]]} in every part, or "
                                  "send each part on its own")
            first, second = sorted(set(tables))[:2]
            raise ClientError(FEATURE_NOT_SUPPORTED, f"cross-shard join of {first} and {second} is not supported: join on "
                              f"the shard key {self.sharded[first]}, or add a pgfleet hint",
                              hint=f"e.g. ... ON {first}.{self.sharded[first]} = {second}.{self.sharded[second]}, "
                                   f"or /* pgfleet: shard_key=... */")
        if not sets:
            verb = "reads" if stmt.kind is Kind.READ else "runs on"
            return (self.shards, f"{tables[0]} with no {self.sharded[tables[0]]} bound {verb} every shard",
                    False, None)
        (occurrence, found), = sets
        return (found, (f"{occurrence.table}.{self.sharded[occurrence.table]} is on "
                        f"{'shard ' if len(found) == 1 else 'shards '}{', '.join(found)}"), False, None)

    # -- shard-key values

    def _need_shards(self, how: str) -> None:
        if not self.shards:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"{how}: this fleet has no shards", hint="configure sharding.shards")

    def _insert_rows(self, insert: InsertKeys) -> tuple[KeyValue | None, ...] | None:
        """Each VALUES row's shard-key value; for an INSERT without a column list, at the
        key's position among the table's columns (read from the catalog when first needed)."""
        positional = insert.positional
        if positional is None:
            return insert.rows
        table = insert.table
        position = self.key_positions.get(table)
        if position is None:
            tried = self.types_tried.get(table)
            raise UnknownTypes([table], f"the column order of sharded table {table} is not known"
                               f"{': ' + tried[1] if tried is not None else ' yet'}",
                               hint=f"name the columns of the INSERT, or create table {table} through pgfleet")
        return tuple(row[position] if position < len(row) else None for row in positional)

    def _need_types(self, tables: list[str]) -> None:
        missing = [table for table in tables if table not in self.key_types]
        if not missing:
            return
        table = missing[0]
        tried = self.types_tried.get(table)
        why = f": {tried[1]}" if tried is not None else ""
        raise UnknownTypes(missing, f"the type of shard key {table}.{self.sharded[table]} is not known"
                           f"{why or ' yet'}", hint=f"create table {table} through pgfleet, or set "
                           f"sharding.types.{table} in the config" if tried is not None and "does not" in tried[1]
                           else f"pgfleet reads it from shard {self.shards[0]}'s catalog; or set "
                           f"sharding.types.{table} in the config")

    def _type_of(self, table: str) -> str:
        self._need_types([table])
        return self.key_types[table]

    def _common_type(self) -> str:
        types = {self.key_types[t] for t in self.sharded if t in self.key_types}
        if len(types) == 1:
            return types.pop()
        if not types:
            self._need_types(list(self.sharded))
        return self.key_types[next(t for t in self.sharded if t in self.key_types)]

    def _key_name(self) -> str:
        return next(iter(self.sharded.values()), "shard key")

    def _values(self, table: str, value: KeyValue, params: Params | None) -> list[int | str | uuid.UUID]:
        """The shard-key values one KeyValue stands for (NULLs match no row, so none)."""
        type_name = self._type_of(table)
        if value.text is not None:
            return [key_value(value.text, type_name)]
        assert value.param is not None
        index = value.param - 1
        if params is None or not 0 <= index < len(params.values):
            raise ClientError(PROTOCOL_VIOLATION, f"bind message supplies {len(params.values) if params else 0} "
                              f"parameters, but the shard key of {table} is ${value.param}")
        data = params.values[index]
        if data is None:
            return []
        binary = params.format_of(index) == 1
        if value.array:
            items = _binary_array(data) if binary else _text_array(data)
            return [binary_key_value(i, type_name) if binary else key_value(i.decode(), type_name)
                    for i in items if i is not None]
        if binary:
            return [binary_key_value(data, type_name)]
        return [key_value(data.decode(errors="replace"), type_name)]

    def _shards_of(self, table: str, values: tuple[KeyValue, ...], params: Params | None) -> tuple[str, ...]:
        type_name = self._type_of(table)
        found = set()
        for value in values:
            for item in self._values(table, value, params):
                found.add(shard_of(item, type_name, len(self.shards), self.function))
        if not found:  # only NULLs: no row matches, one shard answers that correctly
            found.add(0)
        return tuple(self.shards[i] for i in sorted(found))

    def copy_shard(self, table: str, text: str | bytes) -> str:
        """The shard of a COPY row whose shard key reads ``text`` (bytes: binary COPY's field)."""
        type_name = self._type_of(table)
        value = binary_key_value(text, type_name) if isinstance(text, bytes) else key_value(text, type_name)
        return self.shards[shard_of(value, type_name, len(self.shards), self.function)]

    def _one_shard(self, table: str, value: KeyValue, params: Params | None) -> str:
        items = self._values(table, value, params)
        if not items:
            raise ClientError(NOT_NULL_VIOLATION, f'null value in column "{self.sharded[table]}" of sharded table '
                              f'"{table}": a row without its shard key has no shard',
                              hint=f"give every row a {self.sharded[table]}")
        return self.shards[shard_of(items[0], self.key_types[table], len(self.shards), self.function)]


class _KeyPlan:
    """A cached route that waits for one parameter: hash it, take that shard's route."""

    __slots__ = ("fast_int", "function", "index", "resolve", "routes", "shards", "type_name", "unbound")

    def __init__(self, index: int, type_name: str, shards: tuple[str, ...], function: str, unbound: Route,
                 resolve: Callable[[Params], Route]) -> None:
        self.index = index
        self.type_name = type_name
        self.shards = shards
        self.function = function
        self.unbound = unbound
        self.resolve = resolve  # the full router, for a shard's first route and for every refusal
        self.routes: list[Route | None] = [None] * len(shards)
        self.fast_int = function == "hash" and type_name in ("int2", "int4", "int8")

    def route(self, params: Params) -> Route:
        """The route for these Bind values."""
        if self.index >= len(params.values):
            return self.resolve(params)
        data = params.values[self.index]
        if data is None:
            return self.resolve(params)
        if self.fast_int and not params.formats and data.isdigit() and len(data) < 10:
            shard = int_shard_of(int(data), len(self.shards))  # plain digits: always in range
        else:
            if params.format_of(self.index) == 1:
                value = binary_key_value(data, self.type_name)
            else:
                value = key_value(data.decode(errors="replace"), self.type_name)
            shard = shard_of(value, self.type_name, len(self.shards), self.function)
        found = self.routes[shard]
        if found is None:
            found = self.resolve(params)
            if found.target == Direct(self.shards[shard]):
                self.routes[shard] = found
        return found


_NO_TABLE = "no mapped table: default database"
_REPLICATED = " (one copy each)"


def _why_fixed(ctx: SessionContext, database: str) -> str:
    if ctx.database is not None:
        return f"connected to database {database}"
    if ctx.key.role is Role.CLIENT:
        return "client keys use the default database"
    return f"{database} is the default database"


def _databases(target: Target) -> tuple[str, ...]:
    if isinstance(target, Direct):
        return (target.database,)
    return target.databases


def _names(tables: list[str]) -> str:
    return ", ".join(sorted(set(tables)))


def _moves_rows(stmt: Statement, sharded: dict[str, str]) -> ClientError:
    table = next(o.table for o in stmt.placement.occurrences) if stmt.placement else "?"
    return ClientError(FEATURE_NOT_SUPPORTED, f"UPDATE of {table}.{sharded.get(table, '?')} is not supported: changing "
                       "the shard key would move the row to another shard",
                       hint="DELETE the row and INSERT it with the new key")


_TYPE_NAMES = {"smallint": "int2", "integer": "int4", "int": "int4", "bigint": "int8",
               "character varying": "varchar", "text": "text", "uuid": "uuid", "int2": "int2",
               "int4": "int4", "int8": "int8", "varchar": "varchar", "serial": "int4", "bigserial": "int8"}


def _type_name(name: str) -> str:
    """A type as the catalog (format_type) or a config spells it -> the shard functions' name."""
    base = name.strip().lower().split("(")[0].strip()
    found = _TYPE_NAMES.get(base)
    if found is None:
        raise ValueError(f"shard keys of type {name} are not supported (int2, int4, int8, text, "
                         "varchar, uuid)")
    return found


def _text_array(data: bytes) -> list[bytes | None]:
    """A one-dimensional array in text form ({1,2,"x y"}) -> its elements."""
    text = data.decode(errors="replace").strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise ClientError(INVALID_TEXT_REPRESENTATION, f'malformed array literal: "{text[:40]}"',
                          hint='an array parameter looks like {1,2,3}')
    items: list[bytes | None] = []
    body = text[1:-1]
    pos = 0
    while pos < len(body):
        if body[pos] == '"':
            end = pos + 1
            out = []
            while end < len(body) and body[end] != '"':
                if body[end] == "\\" and end + 1 < len(body):
                    end += 1
                out.append(body[end])
                end += 1
            items.append("".join(out).encode())
            pos = end + 2  # past the quote and the comma
        else:
            end = body.find(",", pos)
            end = len(body) if end < 0 else end
            item = body[pos:end].strip()
            items.append(None if item.upper() == "NULL" else item.encode())
            pos = end + 1
    return items


_I32 = struct.Struct("!i")


def _binary_array(data: bytes) -> list[bytes | None]:
    """A one-dimensional array in binary form (array_send) -> its elements."""
    try:
        ndim = _I32.unpack_from(data, 0)[0]
        if ndim == 0:
            return []
        if ndim != 1:
            raise ClientError(FEATURE_NOT_SUPPORTED, "a shard-key array parameter must have one dimension")
        return counted_values(data, 20, _I32.unpack_from(data, 12)[0])[0]
    except struct.error:
        raise ClientError(INVALID_BINARY_REPRESENTATION, "incorrect binary data format in a shard-key array parameter") from None


def _pgfleet_statement(stmt: Statement) -> ClientError:
    """PREPARE / EXECUTE / DEALLOCATE of a pgfleet_* name: those are the backend-side names of
    the statements pgfleet shares between its clients, not the client's."""
    if stmt.command == "PREPARE":
        return ClientError(INVALID_SQL_STATEMENT_NAME, "prepared statement names starting with pgfleet_ are "
                           "pgfleet's own", hint="give the statement another name")
    return ClientError(INVALID_SQL_STATEMENT_NAME, "prepared statements named pgfleet_* are pgfleet's own: "
                       "this connection has no such statement", hint="name a statement this connection prepared")
