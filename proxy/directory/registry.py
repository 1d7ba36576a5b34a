"""The registry database of the tenant directory: reading tenants' rows, decrypting their
passwords, and the rows CREATE TENANT and DROP TENANT write.

A row names a tenant and where its database is: ``name, host, port, dbname, user,
password`` (a Fernet token, from ``pgfleet tenants encrypt``), or a plain ``dsn``. Rows are
read as ``to_jsonb`` of the table's (or the query's) rows, so that a registry may have more
columns than these, or fewer (``dsn`` alone, or no ``password``). The registry is reached over
asyncpg (control plane, DESIGN "Libraries"); the crypto is ``cryptography``'s Fernet: AES-128
in CBC mode with an HMAC-SHA256, nothing written by hand.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..backend.health import describe_error
from ..config import Directory, Dsn, fernet_keys, parse_dsn
from ..errors import CONFIG_FILE_ERROR, CONNECTION_FAILURE, BackendError, ConfigError, ProxyError

APPLICATION_NAME = "pgfleet directory"

# A tenant's name as CREATE TENANT takes it: a database name that needs no quoting.
TENANT_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# The registry table CREATE TENANT makes when it is missing (table mode).
TABLE_COLUMNS = ('name text PRIMARY KEY, host text, port integer, dbname text, "user" text, '
                 "password text, dsn text, created_at timestamptz NOT NULL DEFAULT now()")


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant as its registry row says: where its database is, and who logs in."""

    name: str
    dsn: Dsn

    @property
    def host(self) -> tuple[str, int]:
        return self.dsn.host, self.dsn.port


def new_key() -> str:
    """A new encryption key for directory.encryption_key (``pgfleet tenants key``)."""
    return Fernet.generate_key().decode("ascii")


class Crypto:
    """The directory's encryption key(s): the first encrypts, every one decrypts (a key is
    rotated by putting the new one first and re-encrypting the rows at leisure)."""

    def __init__(self, keys: str | None) -> None:
        self.fernet = MultiFernet([Fernet(key) for key in fernet_keys(keys)]) if keys else None

    def encrypt(self, plain: str) -> str:
        if self.fernet is None:
            raise ValueError("no encryption key")
        return self.fernet.encrypt(plain.encode()).decode("ascii")

    def decrypt(self, token: str, tenant: str) -> str:
        if self.fernet is None:
            raise ProxyError(CONFIG_FILE_ERROR, f'tenant "{tenant}": its password in the directory is encrypted '
                             "and directory.encryption_key is not set",
                             hint="set directory.encryption_key (DB_ENCRYPTION_KEY) to the key its row was "
                                  "encrypted with")
        try:
            return self.fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeError, ValueError):
            raise ProxyError(CONFIG_FILE_ERROR, f'tenant "{tenant}": its password in the directory cannot be '
                             "decrypted with directory.encryption_key (a wrong key, or a corrupt ciphertext)",
                             hint="encrypt it again with `pgfleet tenants encrypt` under the running key, or put "
                                  "the key it was encrypted with in directory.encryption_key") from None


def tenant_of(row: dict[str, Any], crypto: Crypto) -> Tenant:
    """The tenant of a registry row, or ProxyError (F0000) naming it and what is wrong."""
    name = str(row.get("name"))
    password = row.get("password")
    plain = crypto.decrypt(password, name) if isinstance(password, str) and password else None
    try:
        if row.get("dsn"):
            dsn = parse_dsn(str(row["dsn"]), f'tenant "{name}": dsn')
            return Tenant(name, dsn if plain is None else msgspec.structs.replace(dsn, password=plain))
        missing = [column for column in ("host", "dbname", "user") if not row.get(column)]
        if missing:
            raise ConfigError(f'tenant "{name}"', f"its registry row has no {', '.join(missing)} (and no dsn)")
        port = int(row.get("port") or 5432)
        if not 0 < port < 65536:
            raise ConfigError(f'tenant "{name}"', f"port {port} is not between 1 and 65535")
        return Tenant(name, Dsn(host=str(row["host"]), port=port, user=str(row["user"]), password=plain,
                                dbname=str(row["dbname"])))
    except (ConfigError, ValueError, TypeError) as exc:
        raise ProxyError(CONFIG_FILE_ERROR, f'tenant "{name}": its row in the directory is not usable ({exc})',
                         hint="fix the row in the registry") from None


class Registry:
    """The registry database, over a small asyncpg pool of its own."""

    def __init__(self, config: Directory, dsn: Dsn, timeout: float) -> None:
        self.config = config
        self.dsn = dsn
        self.timeout = timeout
        if config.table is not None:
            self.source = _quoted(config.table)
        else:
            assert config.query is not None
            self.source = f"({config.query.rstrip().rstrip(';')})"
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _conn(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                dsn = self.dsn
                self._pool = await asyncpg.create_pool(
                    host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, database=dsn.dbname,
                    min_size=0, max_size=4, timeout=self.timeout, max_inactive_connection_lifetime=60.0,
                    server_settings={"application_name": APPLICATION_NAME})
            return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(self.timeout):  # the wait for a connection included
                pool = await self._conn()
                rows = await pool.fetch(sql, *args)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise BackendError(CONNECTION_FAILURE, f"the tenant directory's registry (database "
                               f"{self.config.registry}) did not answer: {describe_error(exc)}",
                               hint="check the registry database and directory.table / directory.query") from None
        return [json.loads(row[0]) for row in rows]

    async def row(self, name: str) -> dict[str, Any] | None:
        rows = await self._fetch(f"SELECT to_jsonb(t) FROM {self.source} t WHERE t.name::text = $1", name)
        return rows[0] if rows else None

    async def rows(self, names: list[str]) -> dict[str, dict[str, Any]]:
        found = await self._fetch(f"SELECT to_jsonb(t) FROM {self.source} t WHERE t.name::text = ANY($1::text[])",
                                  names)
        return {str(row.get("name")): row for row in found}

    async def everything(self) -> list[dict[str, Any]]:
        return await self._fetch(f"SELECT to_jsonb(t) FROM {self.source} t")

    async def execute(self, sql: str, *args: Any) -> str:
        """A write to the registry (CREATE and DROP TENANT; table mode)."""
        pool = await self._conn()
        result: str = await pool.execute(sql, *args, timeout=self.timeout)
        return result

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()


def _quoted(table: str) -> str:
    """The table as SQL spells it unquoted (folded to lower case), quoted: a reserved word works too."""
    return ".".join(f'"{part.lower()}"' for part in table.split("."))
