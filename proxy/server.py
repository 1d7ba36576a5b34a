"""Lifecycle: listen, keep the pools tidy, reload, shut down.

Owns the event loop's top level: the listening socket, the periodic pool reaper, signal
handling (SIGTERM/SIGINT: stop accepting, let clients finish up to a timeout, close). It
builds one ``Fleet`` from a config snapshot; it never parses statements or messages.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import asyncpg

from .backend.catalog import shard_key_types
from .config import Config
from .frontend.fleet import Fleet
from .frontend.session import SHUTTING_DOWN, Session

log = logging.getLogger("pgfleet")

REAP_INTERVAL = 1.0
TYPES_RETRY = 5  # reaper ticks between tries to read unknown shard-key types


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.fleet = Fleet(config)
        self.listener: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._fast = False
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        # Types first: a statement on a sharded table that came before them would be refused.
        await self.learn_shard_key_types()
        if self.fleet.coordinator is not None:  # what a dead pgfleet left in doubt is finished first
            await self.fleet.coordinator.start()
        self.listener = await loop.create_server(
            lambda: Session(self.fleet), listen.host, listen.port, reuse_address=True, backlog=1024)
        self._reaper = loop.create_task(self._reap())
        log.info("pgfleet listening on %s:%d (fleet database %r, %d databases, pool mode %s)",
                 listen.host, listen.port, listen.database, len(self.config.databases),
                 self.config.pool.mode)

    async def _reap(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in self.fleet.pools.values():
                pool.reap()
            ticks += 1
            if self.fleet.router.unknown_types and ticks % TYPES_RETRY == 0:
                await self.learn_shard_key_types()

    async def learn_shard_key_types(self) -> None:
        """Read the shard-key column types off the first shard (config's sharding.types win)."""
        router = self.fleet.router
        missing = router.unknown_types
        if not missing:
            return
        first = router.shards[0]
        try:
            found = await shard_key_types(self.config.dsn(first), {t: router.sharded[t] for t in missing},
                                          self.config.pool.connect_timeout)
            for problem in router.learn_types(found):
                log.warning("shard key %s; statements on that table are refused", problem)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not read shard-key types from database %s: %s; statements on %s are "
                        "refused until it answers (or set sharding.types)", first, exc, ", ".join(missing))
            return
        still = router.unknown_types
        if still:
            log.warning("database %s has no shard-key column for %s; statements on them are refused "
                        "(create the tables, or set sharding.types)", first,
                        ", ".join(f"{t}.{router.sharded[t]}" for t in still))

    def stop(self, fast: bool = False) -> None:
        """SIGTERM: let open transactions finish (up to shutdown_timeout); SIGINT (``fast``):
        only the statements running now."""
        self._fast = self._fast or fast
        if self._stopped.is_set():
            self._fast = True  # a second signal: do not wait any more
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.close(self.config.shutdown_timeout, fast=self._fast)

    async def close(self, timeout: float = 10.0, *, fast: bool = False) -> None:
        """Stop accepting; close clients between transactions at once, the others as their
        transaction (``fast``: their statement) ends, all of them at ``timeout``; then the
        backends."""
        loop = asyncio.get_running_loop()
        if self.listener is not None:
            self.listener.close()
        fleet = self.fleet
        fleet.shutting_down = True
        running = sum(1 for s in fleet.sessions.values() if s.busy(fast))
        log.info("pgfleet shutting down: %d client(s), %d with a %s still running; waiting up to %gs",
                 len(fleet.sessions), running, "statement" if fast else "transaction", timeout)
        for session in list(fleet.sessions.values()):
            if not session.busy(fast):
                session.close(SHUTTING_DOWN)
        deadline = loop.time() + timeout
        while any(s.busy(fast) for s in fleet.sessions.values()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = list(fleet.sessions.values())
        if any(s.busy(fast) for s in left):
            log.warning("pgfleet shutdown: %d client(s) still in a transaction after %gs are disconnected "
                        "(their transactions roll back)", sum(1 for s in left if s.busy(fast)), timeout)
        for session in left:
            session.close(SHUTTING_DOWN)
        for pool in self.fleet.pools.values():
            pool.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self.fleet.coordinator is not None:
            await self.fleet.coordinator.stop()
        if self.listener is not None:
            await self.listener.wait_closed()


async def serve(config: Config) -> None:
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.stop)
    loop.add_signal_handler(signal.SIGINT, server.stop, True)
    await server.serve_until_stopped()
    log.info("pgfleet stopped")


def install_loop() -> None:
    """The one place the event loop is chosen: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
