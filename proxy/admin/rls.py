"""`pgfleet rls` and the role checks of `pgfleet check`: what PostgreSQL itself enforces.

Owns the row-level security policies of the sharded tables — a database key sees only the
rows of its shard-key value, read by the policy from ``pgfleet.tenant``, which pgfleet sets on
every backend that serves the key (frontend/settings.py) — as SQL to print, or to run on every
shard as the dsn's user; and the warnings about keys whose backend role would be a superuser
or bypass row-level security. Connections are the control plane's (asyncpg), never pooled.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from ..backend.catalog import connect
from ..config import Config

TENANT_POLICY = "pgfleet_tenant"  # the policy of the database keys' roles
TENANT_ROWS_POLICY = "pgfleet_tenant_rows"  # the permissive half of it
OPEN_POLICY = "pgfleet_open"      # every row, for the other keys' roles
TENANT_SETTING = "pgfleet.tenant"

_TABLES = """
select c.relname, format_type(a.atttypid, a.atttypmod), pg_get_userbyid(c.relowner)
from unnest($1::text[], $2::text[]) as t(table_name, column_name)
join pg_class c on c.oid = to_regclass(t.table_name)
join pg_attribute a on a.attrelid = c.oid and a.attname = t.column_name and not a.attisdropped
"""
_ROLES = "select rolname, rolsuper, rolbypassrls from pg_roles where rolname = any($1::text[])"


def quote_ident(name: str) -> str:
    plain = bool(name) and (name[0] == "_" or "a" <= name[0] <= "z") and all(
        ch == "_" or "a" <= ch <= "z" or "0" <= ch <= "9" for ch in name)
    return name if plain else '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Roles:
    tenant: tuple[str, ...]   # the backend roles of database keys: they get the tenant policy
    open: tuple[str, ...]     # the other keys' backend roles: every row
    unprotected: tuple[str, ...]  # database keys without a backend role: RLS cannot hold them


def roles(config: Config) -> Roles:
    tenant, other, unprotected = [], [], []
    for key in config.keys:
        role = config.backend_role_of(key)
        if key.role == "database":
            if role is None:
                unprotected.append(key.id)
            elif role not in tenant:
                tenant.append(role)
        elif role is not None and role not in other:
            other.append(role)
    return Roles(tuple(tenant), tuple(r for r in other if r not in tenant), tuple(unprotected))


def policy_sql(table: str, column: str, type_name: str, found: Roles) -> list[str]:
    """The statements that put ``table`` under row-level security (idempotent)."""
    t, c = quote_ident(table), quote_ident(column)
    mine = f"{c} = NULLIF(current_setting('{TENANT_SETTING}', true), '')::{type_name}"
    tenants = ", ".join(map(quote_ident, found.tenant))
    # Restrictive, so that no other (permissive) policy on the table can widen it; with a
    # permissive one of its own, since a role needs one to see any row at all.
    out = [f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;",
           f"DROP POLICY IF EXISTS {TENANT_POLICY} ON {t};",
           f"CREATE POLICY {TENANT_POLICY} ON {t} AS RESTRICTIVE TO {tenants} USING ({mine}) WITH CHECK ({mine});",
           f"DROP POLICY IF EXISTS {TENANT_ROWS_POLICY} ON {t};",
           f"CREATE POLICY {TENANT_ROWS_POLICY} ON {t} TO {tenants} USING (true) WITH CHECK (true);",
           f"DROP POLICY IF EXISTS {OPEN_POLICY} ON {t};"]
    if found.open:
        out.append(f"CREATE POLICY {OPEN_POLICY} ON {t} TO {', '.join(map(quote_ident, found.open))} "
                   "USING (true) WITH CHECK (true);")
    return out


class RlsError(Exception):
    """``pgfleet rls`` cannot do what it was asked: one line for the operator."""


async def tables_of(config: Config, shard: str) -> dict[str, tuple[str, str]]:
    """``{table: (shard-key type, owner)}`` of the sharded tables that exist on ``shard``."""
    tables = config.sharding.tables
    names = sorted(tables)
    try:
        conn = await connect(config.dsn(shard), config.pool.connect_timeout, "pgfleet rls")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise RlsError(f"cannot connect to database {shard} ({config.dsn(shard).safe()}): {exc}") from None
    try:
        rows = await conn.fetch(_TABLES, names, [tables[n] for n in names])
    finally:
        await conn.close()
    return {row[0]: (row[1], row[2]) for row in rows}


async def plan(config: Config) -> tuple[dict[str, list[str]], list[str]]:
    """Per shard, the statements to run there; and warnings (one line each)."""
    found = roles(config)
    if not config.sharding.tables:
        raise RlsError("no sharded tables (sharding.tables): row-level security by tenant has nothing to protect")
    if not found.tenant:
        raise RlsError("no database key runs as a backend role: give database keys a backend_role "
                       "(backend_roles: {name: {default_for: [database]}}); the dsn's user owns the tables "
                       "or is a superuser, and row-level security never applies to those")
    warnings = [f"key {key} (database) runs as the dsn's user: row-level security does not hold it; "
                "give it a backend_role" for key in found.unprotected]
    statements: dict[str, list[str]] = {}
    for shard in config.sharding.shards:
        tables = await tables_of(config, shard)
        out: list[str] = []
        for table in sorted(config.sharding.tables):
            if table not in tables:
                warnings.append(f"{shard}: table {table} does not exist yet: create it, then run pgfleet rls again")
                continue
            type_name, owner = tables[table]
            if owner in found.tenant:
                warnings.append(f"{shard}: table {table} is owned by {owner}, a database keys' role: owners are "
                                f"not subject to row-level security; ALTER TABLE {table} OWNER TO another role")
            out += policy_sql(table, config.sharding.tables[table], config.sharding.types.get(table, type_name), found)
        statements[shard] = out
    return statements, warnings


def bypass_sql(found: Roles) -> list[str]:
    """The other keys' roles bypass row-level security: they see every row anyway (the open
    policy), and PostgreSQL refuses COPY FROM to a role that row-level security applies to."""
    return [f"ALTER ROLE {quote_ident(role)} BYPASSRLS;" for role in found.open]


async def apply(config: Config, statements: dict[str, list[str]]) -> list[str]:
    """Run each shard's statements there in one transaction, as the dsn's user; warnings."""
    roles_sql = bypass_sql(roles(config))
    warnings: list[str] = []

    async def one(shard: str, sql: list[str]) -> None:
        try:
            conn = await connect(config.dsn(shard), config.pool.connect_timeout, "pgfleet rls")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RlsError(f"cannot connect to database {shard}: {exc}") from None
        try:
            for statement in roles_sql:
                try:
                    await conn.execute(statement)
                except asyncpg.PostgresError as exc:  # a dsn user that is not a superuser
                    warnings.append(f"{shard}: {statement} failed ({exc}): run it as a superuser, else COPY FROM "
                                    "into sharded tables fails for keys running as that role")
            if sql:
                async with conn.transaction():
                    await conn.execute("\n".join(sql))
        except asyncpg.PostgresError as exc:
            raise RlsError(f"database {shard}: {exc} (nothing changed there): the dsn's user must own "
                           "the sharded tables") from None
        finally:
            await conn.close()

    await asyncio.gather(*(one(shard, sql) for shard, sql in statements.items()))
    return warnings


async def role_warnings(config: Config) -> list[str]:
    """``pgfleet check``: database and client keys that would run as a superuser, or as a role
    that bypasses row-level security, on a database they reach; one line each."""
    reach: dict[str, set[str]] = {}
    for key in config.keys:
        if key.role not in ("database", "client"):
            continue
        databases = (config.sharding.shards or (config.default,)) if key.role == "database" else (config.default,)
        for database in databases:
            reach.setdefault(database, set()).add(key.id)
    lines: list[str] = []
    keys = {key.id: key for key in config.keys}
    for database, ids in sorted(reach.items()):
        dsn = config.dsn(database)
        users = {key_id: config.backend_role_of(keys[key_id]) or dsn.user for key_id in ids}
        try:
            conn = await connect(dsn, config.pool.connect_timeout, "pgfleet check")
            try:
                rows = await conn.fetch(_ROLES, sorted(set(users.values())))
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            lines.append(f"note: cannot check the roles of database {database} ({dsn.safe()}): {exc}")
            continue
        found = {row[0]: (row[1], row[2]) for row in rows}
        for key_id in sorted(ids):
            user = users[key_id]
            kind = keys[key_id].role
            if user not in found:
                lines.append(f"warning: key {key_id} ({kind}) runs as {user}, which does not exist on database "
                             f"{database}: create the role, or fix backend_roles")
            elif found[user][0]:
                lines.append(f"warning: key {key_id} ({kind}) runs as {user}, a superuser on database {database}: "
                             "give it a least-privilege backend_role (docs/security.md)")
            elif found[user][1] and kind == "database":
                lines.append(f"warning: key {key_id} ({kind}) runs as {user}, which bypasses row-level security "
                             f"on database {database}: ALTER ROLE {user} NOBYPASSRLS")
    return lines
