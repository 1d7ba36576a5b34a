"""The I/O seam between a client's socket and its session: bytes in, bytes out, no decisions.

``ClientConnection`` is the ``asyncio.Protocol`` the server listens with. It feeds what the
client sends to its ``Session`` and implements the session's ``Port``: write to the client,
stop and resume reading it, close it, upgrade it to TLS, and run the session's waits on the
event loop. Flow control as uvicorn's: when the client reads slower than its answers come,
the session is told, and stops reading its backends until the client catches up.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from ..fleet import Fleet
from .session import Session

log = logging.getLogger("pgfleet.session")


class ClientConnection(asyncio.Protocol):
    def __init__(self, fleet: Fleet) -> None:
        self.transport: asyncio.Transport | None = None
        self.session = Session(fleet, self)
        self.data_received = self.session.feed  # type: ignore[method-assign]  # one call fewer per read

    # -- from the event loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the TLS layer, now wrapping the same connection
            return
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.session.connected_from(f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))

    def data_received(self, data: bytes) -> None:
        self.session.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.lost()

    def pause_writing(self) -> None:
        self.session.client_slow(True)

    def resume_writing(self) -> None:
        self.session.client_slow(False)

    # -- the session's Port

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def direct_writer(self) -> Callable[[bytes], None]:
        """The transport's own write, for a linked backend's answers (the hot path): no check
        for a closing transport, as a client that closes unlinks its backend first."""
        assert self.transport is not None
        return self.transport.write

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> bool:
        """The TLS handshake on this connection; False when it failed (the connection is closed)."""
        raw = self.transport
        assert raw is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(raw, self, context, server_side=True,
                                                              ssl_handshake_timeout=timeout)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("TLS handshake with client %s failed: %s", self.session.peer, exc)
            raw.close()
            return False
        if tls is None:
            return False
        self.transport = tls  # type: ignore[assignment]
        return True

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(work)

    def later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)
