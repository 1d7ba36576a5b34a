"""A client's pipeline cut into per-database parts that run at once, answered in its order.

Inside a transaction on several databases (two-phase commit), a pipeline (messages up to the
client's Sync) whose statements go to different databases is cut where the database changes:
each part goes to its database's backend and ends with a Sync of pgfleet's (``CUT_SYNC``;
inside the transaction it commits nothing), and the next part goes to the next backend at
once, without waiting for the answers of the first. Statements on different databases cannot
see each other's effects, so running the parts at the same time changes nothing but the
order in which answers arrive; ``SplitPipeline`` puts that order back.

Each part is a run of the client's messages sent to one backend. A backend's answers belong
to its oldest part not yet answered (a backend answers its parts in the order it got them);
the ReadyForQuery of a part's Sync ends it (``part_answered``). Parts are given to the
client in the order the client sent them: the oldest part not yet given streams straight to
the client, later ones are held until it is done.

An error stops the pipeline as PostgreSQL's does: the part that failed is given up to its
ErrorResponse, every later part's answers are dropped (its statements may have run, but the
transaction is failed on that database, so it commits nothing: COMMIT answers ROLLBACK), and
the client's messages up to its Sync are skipped. The client's Sync ends the current part;
when every part is answered pgfleet writes the one ReadyForQuery (``E`` after an error).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..backend.connection import ServerConnection
from ..wire import messages as m

# A part held behind an earlier one stops its backend from being read past this many bytes
# (the server then waits on its socket) until the part's turn comes.
HOLD_LIMIT = 1 << 20


class _Part:
    __slots__ = ("done", "failed", "held", "named", "out", "server", "size")

    def __init__(self, server: ServerConnection) -> None:
        self.server = server
        self.out: list[bytes] = []  # answers held until the part's turn
        self.size = 0
        self.done = False  # its Sync's ReadyForQuery came
        self.failed = False  # ... saying the transaction failed
        self.held = False  # its backend is not read until the part's turn
        self.named: list[bytes] = []  # client statement names its Parses created


class SplitPipeline:
    """Invariant: ``order`` holds every part not yet given to the client, in the client's
    order; ``order[0]`` streams to the client; each backend's parts are in its ``pending``
    deque in the same order, the last one open (no Sync yet) only for the current backend."""

    def __init__(self, write: Callable[[bytes], None], failed: Callable[[list[bytes]], None],
                 later: Callable[[float, Callable[[], None]], object]) -> None:
        self.client_write = write
        self.later = later
        self.out: list[bytes] = []  # for the client: written once per turn of the event loop
        self.on_failed = failed  # told the client statement names whose Parse is to count as skipped
        self.order: deque[_Part] = deque()
        self.pending: dict[ServerConnection, deque[_Part]] = {}
        self.open: _Part | None = None  # the current backend's part, not cut yet
        self.failed = False  # a part given to the client failed: the rest is dropped
        self.closing = False  # no more parts: the client's Sync came, or a statement that needs them all answered
        self.ready = False  # ... the client's Sync: the ReadyForQuery is pgfleet's to write
        self.commit = False  # ... and the session commits the pipeline's implicit transaction first
        self.complete = False  # every part answered and the ReadyForQuery written
        self.tail: list[bytes] = []  # a backend's asynchronous messages after its last part

    def write(self, data: bytes) -> None:
        """Answers for the client: gathered while the backends' reads of this turn of the event
        loop are handled, then one write (a part is often a few small messages)."""
        if not self.out:
            self.later(0, self.flush)
        self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            self.client_write(out[0] if len(out) == 1 else b"".join(out))

    @property
    def servers(self) -> list[ServerConnection]:
        return list(self.pending)

    def part(self, server: ServerConnection) -> None:
        """The client's next messages go to ``server``: a new part, unless its part is open."""
        if self.open is not None and self.open.server is server:
            return
        part = _Part(server)
        self.open = part
        self.order.append(part)
        parts = self.pending.get(server)
        if parts is None:
            parts = self.pending[server] = deque()
            server.write_client = lambda data: self._answer(server, data)
        parts.append(part)

    def cut(self, server: ServerConnection) -> None:
        """``server``'s open part ends: pgfleet's Sync was just queued for it."""
        assert self.open is not None and self.open.server is server
        self.open = None

    def note_statement(self, name: bytes) -> None:
        """A client's named Parse in the open part (forgotten again if the part is dropped)."""
        if self.open is not None:
            self.open.named.append(name)

    def _answer(self, server: ServerConnection, data: bytes) -> None:
        parts = self.pending[server]
        if not parts:
            self.tail.append(data)  # nothing of the client's is due from it: a notice, a notification
            return
        part = parts[0]
        if self.failed:
            return
        if self.order[0] is part:
            self.write(data)
            return
        part.out.append(data)
        part.size += len(data)
        if part.size > HOLD_LIMIT and not part.held and server.transport is not None:
            part.held = True
            server.transport.pause_reading()

    def part_answered(self, server: ServerConnection) -> None:
        """The ReadyForQuery of pgfleet's Sync ending ``server``'s oldest part."""
        part = self.pending[server].popleft()
        part.done = True
        # Failed: its transaction did, or the BEGIN pgfleet sent in it was skipped after an
        # error (outside a transaction block, the Sync then answers idle).
        part.failed = server.tx_status == m.TX_FAILED or server.skipped_begin
        server.skipped_begin = False
        order = self.order
        while order and order[0].done:
            given = order.popleft()
            if given.failed and not self.failed:
                self.failed = True
                self.on_failed([name for later in order for name in later.named])
            if order:
                self._turn(order[0])
        if self.closing and not order:
            self.finish()

    def finish(self) -> None:
        """Every part is answered after the last was cut: the client's Sync gets its one
        ReadyForQuery."""
        self.complete = True
        if self.tail:
            self.write(b"".join(self.tail))
        if self.ready:
            self.write(m.ready_for_query(m.TX_FAILED if self.failed else m.TX_IN_TRANSACTION))

    def _turn(self, part: _Part) -> None:
        """``part`` is the oldest not given: what it holds goes out, and the rest streams."""
        if part.out:
            if not self.failed:
                self.write(part.out[0] if len(part.out) == 1 else b"".join(part.out))
            part.out = []
        if part.held:
            part.held = False
            if part.server.transport is not None:
                part.server.transport.resume_reading()

    def abandon(self) -> None:
        """The client left: nothing more is written, and no backend stays unread."""
        self.out.clear()
        for part in self.order:
            if part.held and part.server.transport is not None:
                part.held = False
                part.server.transport.resume_reading()

    def close(self, ready: bool) -> None:
        """No part follows the current one (cut by the caller): the client's Sync (``ready``),
        or a statement that runs once every part is answered (COMMIT in the pipeline)."""
        self.closing = True
        self.ready = ready
