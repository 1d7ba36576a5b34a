"""What every client session shares: the config snapshot, the router, the pools, the keys.

Owns the registry of live sessions (for CancelRequest) and the backend-side names of
prepared statements, which are shared by all clients so that a statement prepared once on a
backend serves every client that prepares the same text (as PgBouncer 1.21+ does).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from ..auth.keys import ApiKey, load_keys
from ..backend.pool import Pool
from ..config import Config
from ..router.router import Router

if TYPE_CHECKING:
    from .session import Session


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
        self.sessions: dict[int, Session] = {}
        # Whether each database sorts text in byte order (learned from its catalog at start).
        self.byte_order: dict[str, bool] = {}
        self._statement_names: dict[tuple[str, bytes], str] = {}
        self._tokens = 0

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
