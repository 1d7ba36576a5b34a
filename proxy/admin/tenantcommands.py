"""The admin console's tenant directory commands (directory/): SHOW TENANTS, CREATE TENANT,
DROP TENANT; and the directory's rows of SHOW POOLS and SHOW HEALTH (per host, then the
busiest tenants), so that both stay readable with thousands of tenants."""

from __future__ import annotations

import re
from typing import Any

from ..directory.directory import Directory
from ..errors import FEATURE_NOT_SUPPORTED, SYNTAX_ERROR, ClientError
from .command import Admin, Command, Spread, Table, _time


def directory_of(admin: Admin) -> Directory:
    directory = admin.fleet.directory
    if not isinstance(directory, Directory):
        raise ClientError(FEATURE_NOT_SUPPORTED, "there is no tenant directory in this pgfleet",
                          hint="configure directory: (docs/directory.md)")
    return directory


def pool_rows(admin: Admin, mode: str) -> list[tuple[Any, ...]]:
    """SHOW POOLS's rows for the directory: one per host (``tenants@host:port``, the sums),
    then the busiest tenant pools by servers."""
    directory = admin.fleet.directory
    if not isinstance(directory, Directory):
        return []
    rows: list[tuple[Any, ...]] = []
    for host, s in directory.summary().items():
        if s["pools_open"]:
            rows.append((f"tenants@{host}", "*", s["cl_active"], s["cl_waiting"], s["sv_active"], s["sv_idle"], 0,
                         s["sv_login"], 0, mode))
    for name, pool, _ in directory.top("servers"):
        active, _clients = directory.clients(name)
        rows.append((name, pool.dsn.user, active, pool.waiting, len(pool.active), len(pool.idle), 0, pool.opening,
                     0, mode))
    return rows


def health_rows(admin: Admin) -> list[tuple[Any, ...]]:
    """SHOW HEALTH's rows for the directory: one per host with open tenant pools, its status
    the worst of theirs, the tenants that are not healthy named."""
    directory = admin.fleet.directory
    if not isinstance(directory, Directory):
        return []
    rows: list[tuple[Any, ...]] = []
    for host, s in directory.summary().items():
        if not s["pools_open"]:
            continue
        checked = s["healthy"] + s["degraded"] + s["down"]
        rows.append((f"tenants@{host}", s["status"], _time(s["last_check"]), None, s["down"],
                     "open" if s["down"] else "closed",
                     "; ".join(s["unwell"][:5]) or f"{checked} tenant pool(s) checked, all healthy"))
    return rows


def _tenants(admin: Admin, _: str) -> Table:
    directory = admin.fleet.directory
    rows = []
    known = sorted(set(directory.known) | set(directory.pools)) if isinstance(directory, Directory) else []
    for name in known:
        assert isinstance(directory, Directory)
        pool = directory.pools.get(name)
        row = directory.known.get(name)
        dsn = pool.dsn if pool is not None else row.tenant.dsn if row is not None else None
        if dsn is None:
            continue
        active, _ = directory.clients(name)
        health = directory.health.get(name)
        rows.append((name, dsn.host, dsn.port, dsn.dbname, dsn.user, "open" if pool is not None else "closed",
                     active, pool.waiting if pool is not None else 0, len(pool.active) if pool is not None else 0,
                     len(pool.idle) if pool is not None else 0, str(health.status) if health is not None else None))
    return Table(("name", "host", "port", "dbname", "user", "pool", "cl_active", "cl_waiting", "sv_active",
                  "sv_idle", "status"), rows)


_CREATE = re.compile(r"^(?P<name>\S+)(?:\s+FROM\s+TEMPLATE\s+(?P<template>\S+))?(?:\s+ON\s+(?P<host>\S+))?$",
                     re.IGNORECASE)


async def _create(admin: Admin, argument: str) -> str:
    directory = directory_of(admin)
    match = _CREATE.match(argument.strip())
    if match is None:
        raise ClientError(SYNTAX_ERROR, f"CREATE TENANT: cannot read {argument!r}",
                          hint="CREATE TENANT name [FROM TEMPLATE template] [ON host]")
    await directory.create(match["name"], _unquoted(match["template"]), _unquoted(match["host"]))
    return "CREATE TENANT"


async def _drop(admin: Admin, argument: str) -> str:
    directory = directory_of(admin)
    name = argument.strip()
    if not name or " " in name:
        raise ClientError(SYNTAX_ERROR, f"DROP TENANT: cannot read {argument!r}", hint="DROP TENANT name")
    await directory.drop(name)
    return "DROP TENANT"


def _unquoted(word: str | None) -> str | None:
    """A template or host name, its double quotes taken off (a tenant's name is never quoted:
    it is one that needs none)."""
    if word is None:
        return None
    return word[1:-1] if len(word) > 1 and word[0] == word[-1] == '"' else word


TENANT_COMMANDS: tuple[Command, ...] = (
    Command(("SHOW", "TENANTS"), None, _tenants, "the tenants pgfleet knows (directory): where, pool open or "
            "closed, clients, servers, health", Spread.SUM, ("cl_active", "cl_waiting", "sv_active", "sv_idle"),
            ("name",)),
    # CREATE and DROP TENANT run in the worker asked: the registry is every worker's, and a
    # dropped tenant's clients in other workers are closed at their next read of it.
    Command(("CREATE", "TENANT"), "name [FROM TEMPLATE template] [ON host]", _create,
            "create a tenant's database from a template and register it", acts=True),
    Command(("DROP", "TENANT"), "name", _drop, "close a tenant's clients, drop its database and registry row",
            acts=True),
)
