"""The backend a client holds: which one, how it is linked, and how it goes back.

Owns ``BackendLink``: the attached backend (running the client's statements, or parked with
the client between its transactions), linking it (its answers go to the client; it is not
read while the client reads slowly), giving it back (to its pool; through a ``Janitor`` that
rolls back or resets it first when the client leaves it dirty), and which replica a read may
take. Whether the client keeps its backend between transactions is the pool's decision
(``Pool.park``, asked by the session); whether the backend is still in use is the session's, which knows the
transaction and the pipeline, and tells these methods.
"""

from __future__ import annotations

from collections.abc import Callable

from ..backend.connection import Link, ServerConnection
from ..backend.expect import DROP_QUERY
from ..backend.pool import DisconnectReason, Pool
from ..errors import BackendError
from ..fleet import Fleet
from ..wire import messages as m


class BackendLink:
    """Invariant: ``server``, when set, is linked to this client and counted active in its pool."""

    __slots__ = ("client_slow", "fleet", "server", "session_mode")

    def __init__(self, fleet: Fleet, session_mode: bool) -> None:
        self.fleet = fleet
        self.server: ServerConnection | None = None
        self.session_mode = session_mode  # pool.mode session: a backend is reset before it goes back
        self.client_slow = False  # the client reads slower than answers come

    def link(self, server: ServerConnection, link: Link, write: Callable[[bytes], None],
             parameters: Callable[[str, str], None], answers: Callable[[int, bytes], None] | None) -> None:
        """``server`` (just taken from its pool) now runs the client's statements."""
        self.server = server
        server.attach(link, write, parameters=parameters, answers=answers)
        if self.client_slow and server.transport is not None:
            server.transport.pause_reading()

    def release(self) -> None:
        """The client is done with its backend for now: back to its pool (reset first in
        session mode)."""
        server = self.server
        assert server is not None
        if server.outbox:
            server.flush()
        self.server = None
        if self.client_slow and server.transport is not None:
            server.transport.resume_reading()
        pool = server.pool
        if self.session_mode:
            Janitor(pool, server, reset=True)
        else:
            pool.release(server)

    def take_back(self, server: ServerConnection) -> None:
        """The pool takes the parked backend back for another client (see ``Pool.park``)."""
        self.server = None
        server.detach()
        if self.client_slow and server.transport is not None:
            server.transport.resume_reading()

    def hand_over(self) -> ServerConnection | None:
        """The backend leaves this link still linked to the client: it waits apart in a
        transaction on several databases, or a scatter adopts it to end that transaction."""
        server, self.server = self.server, None
        return server

    def take_up(self, server: ServerConnection) -> None:
        """A backend handed over, still linked to the client, runs its statements again."""
        self.server = server

    def lost(self, reason: DisconnectReason = DisconnectReason.BROKEN) -> ServerConnection:
        """The backend is gone (or must go): dropped from its pool."""
        server = self.server
        assert server is not None
        self.server = None
        server.pool.discard(server, reason)
        return server

    def slow(self, slow: bool) -> None:
        """The client reads slower than its backend answers (or caught up): stop (resume)
        reading the backend."""
        self.client_slow = slow
        server = self.server
        if server is not None and server.transport is not None:
            if slow:
                server.transport.pause_reading()
            else:
                server.transport.resume_reading()

    def replica(self, database: str, in_use: bool, pinned: bool, outside_transaction: bool) -> str:
        """Where a replica-safe read of ``database`` (or of one of its replicas) runs: a usable
        replica, round-robin, outside transactions; else the primary. A pipeline already on a
        replica of it (``in_use``) stays there."""
        base = database.partition("~")[0]
        server = self.server
        if server is not None and in_use:
            here = server.database
            same = here.partition("~")[0] == base and not pinned and server.tx_status == m.TX_IDLE
            return here if same else base
        if not outside_transaction or pinned:
            return base
        pool = self.fleet.replicas.pick(base)
        return pool.name if pool is not None else base

    def close(self, pinned: bool) -> None:
        """The client left: its backend goes back clean, or is dropped."""
        server = self.server
        if server is None:
            return
        self.server = None
        pool = server.pool
        if server.closed:
            pool.discard(server)
        elif server.busy:
            pool.discard(server, DisconnectReason.DIRTY)  # a statement is still running
        elif server.tx_status != m.TX_IDLE or self.session_mode or pinned:
            Janitor(pool, server, rollback=server.tx_status != m.TX_IDLE, reset=self.session_mode or pinned)
        else:
            pool.release(server)

    def abandon(self, servers: list[ServerConnection]) -> None:
        """Backends of a transaction on several databases whose client left: rolled back."""
        for server in servers:
            pool = server.pool
            if server.closed:
                pool.discard(server)
            else:
                Janitor(pool, server, rollback=True)


class Janitor:
    """Links a backend whose client left, runs a clean-up statement and returns it to its pool."""

    def __init__(self, pool: Pool, server: ServerConnection, *, rollback: bool = False,
                 reset: bool = False) -> None:
        self.pool = pool
        server.attach(self, _nowhere)
        if rollback:
            server.push(DROP_QUERY)
            server.send(m.query("ROLLBACK"))
        if reset:  # DISCARD ALL cannot share a query string (an implicit transaction) with others
            server.prepared.clear()
            server.settings = {}
            server.unnamed_owner = 0
            server.push(DROP_QUERY)
            server.send(m.query("DISCARD ALL"))
        server.flush()
        if not server.busy:
            pool.release(server)

    def backend_idle(self, server: ServerConnection) -> None:
        self.pool.release(server)

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        self.pool.discard(server)

    def part_answered(self, server: ServerConnection) -> None:
        pass  # a part of its client's pipeline: the client left, nobody needs it


def _nowhere(data: bytes) -> None:
    """Where a janitor's backend answers go: its client has left."""
