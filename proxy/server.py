"""Lifecycle: listen, keep the pools tidy, reload, shut down.

Owns the event loop's top level: the listening socket, the periodic pool reaper, signal
handling (SIGTERM/SIGINT: stop accepting, let clients finish up to a timeout, close). It
builds one ``Fleet`` from a config snapshot; it never parses statements or messages.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from .config import Config
from .errors import ProxyError
from .frontend.fleet import Fleet
from .frontend.session import Session

log = logging.getLogger("pgfleet")

REAP_INTERVAL = 1.0


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.fleet = Fleet(config)
        self.listener: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self.listener = await loop.create_server(
            lambda: Session(self.fleet), listen.host, listen.port, reuse_address=True, backlog=1024)
        self._reaper = loop.create_task(self._reap())
        log.info("pgfleet listening on %s:%d (fleet database %r, %d databases, pool mode %s)",
                 listen.host, listen.port, listen.database, len(self.config.databases),
                 self.config.pool.mode)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in self.fleet.pools.values():
                pool.reap()

    def stop(self) -> None:
        self._stopped.set()

    async def serve_until_stopped(self, shutdown_timeout: float = 10.0) -> None:
        await self._stopped.wait()
        await self.close(shutdown_timeout)

    async def close(self, timeout: float = 10.0) -> None:
        if self.listener is not None:
            self.listener.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(s.backend is not None and s.backend.tx_status != 73 for s in self.fleet.sessions.values()):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.fleet.sessions.values()):
            session.close(ProxyError("57P01", "terminating connection because pgfleet is shutting down",
                                     hint="reconnect in a moment"))
        for pool in self.fleet.pools.values():
            pool.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self.listener is not None:
            await self.listener.wait_closed()


async def serve(config: Config) -> None:
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve_until_stopped()
    log.info("pgfleet stopped")


def install_loop() -> None:
    """The one place the event loop is chosen: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
