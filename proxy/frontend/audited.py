"""One client's statements on their way to the audit log (admin/audit.py).

Owns ``AuditTrail``: what each audited statement was, where it went, when it started, and
what its answer said (rows, SQLSTATE), read from the backend's own answers (the backend's
``answers`` ear) or from the answer pgfleet composed itself (fan-outs, scatters, COPY,
two-phase commits, refusals). It only records; nothing here changes what the client gets.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ..errors import INTERNAL_ERROR, ProxyError
from ..wire import messages as m


class _Audited:
    """A statement of an audited client, from when it went to its backend until its answer."""

    __slots__ = ("clock", "databases", "ignore", "rows", "simple", "sqlstate", "started", "text")

    def __init__(self, text: str, databases: tuple[str, ...], simple: bool, ignore: bool = False,
                 clock: float | None = None) -> None:
        now = time.monotonic()
        self.clock = now if clock is None else clock  # when it started (time.monotonic)
        self.started = time.time() - (now - self.clock)
        self.text = text
        self.databases = databases
        self.simple = simple  # a Query (ends with ReadyForQuery), else an Execute
        self.ignore = ignore  # a refused statement failed on the backend: logged already
        self.rows: int | None = None
        self.sqlstate: str | None = None


class AuditTrail:
    """The audited statements of one client (key ``user`` from ``peer``)."""

    def __init__(self, audit: Any, user: str, peer: str, over: str = "") -> None:
        self.audit = audit
        self.user = user
        self.peer = peer
        self.over = over  # "http": a statement of SQL over HTTP (api/), its route says so
        self.queue: deque[_Audited] = deque()  # sent to the backend, answer not complete
        self.portals: dict[str, str] = {}  # portal -> its statement's text
        self.text = ""  # the statement being handled (a fan-out, scatter or COPY runs it)

    def start(self, text: str, database: str, simple: bool) -> None:
        """A statement went to a backend; its line is written when its answer is complete."""
        self.queue.append(_Audited(text, (database,), simple))

    def answer(self, kind: int, body: bytes) -> None:
        """An attached backend's answer to this client's statements (the backend's ``answers`` ear)."""
        queue = self.queue
        if kind == m.SYNC:  # Executes still queued were skipped after an error: they never ran
            while queue and not queue[0].simple:
                queue.popleft()
            return
        if not queue:
            return
        entry = queue[0]
        if kind == m.COMMAND_COMPLETE:
            rows = counted_rows(body)
            if rows is not None:
                entry.rows = (entry.rows or 0) + rows
        elif kind == m.ERROR_RESPONSE and entry.sqlstate is None:
            entry.sqlstate = m.decode_fields(body).get("C", INTERNAL_ERROR)
        if (kind == m.READY_FOR_QUERY) if entry.simple else (kind != m.READY_FOR_QUERY):
            queue.popleft()
            if not entry.ignore:
                self._record(entry, "direct")

    def refused(self, exc: ProxyError, on_backend: bool, simple: bool) -> None:
        """A statement pgfleet refused: its line now. When it is refused on the backend (see
        the session's ``_refuse``), the answers to the failing statement are not the client's."""
        entry = _Audited(self.text, (), simple)
        entry.sqlstate = exc.sqlstate
        self._record(entry, "refused")
        if on_backend:
            self.queue.append(_Audited("", (), simple, ignore=True))

    def whole(self, route: str, databases: tuple[str, ...], started: float, answer: bytes) -> None:
        """A statement pgfleet ran itself on several databases (fan-out, scatter, COPY, 2PC),
        or a console command, with the answer the client got."""
        entry = _Audited(self.text, databases, True, clock=started)
        for kind, body in m.split(answer):
            if kind == m.COMMAND_COMPLETE:
                entry.rows = counted_rows(body)
            elif kind == m.ERROR_RESPONSE and entry.sqlstate is None:
                entry.sqlstate = m.decode_fields(body).get("C", INTERNAL_ERROR)
        self._record(entry, route)

    def _record(self, entry: _Audited, route: str) -> None:
        if self.over:  # "http" for a statement on one database, "http-fanout", "http-scatter", ...
            route = self.over if route == "direct" else f"{self.over}-{route}"
        self.audit.record(self.user, self.peer, entry.databases, route, entry.started,
                          time.monotonic() - entry.clock, entry.rows, entry.sqlstate, entry.text)


def counted_rows(tag: bytes) -> int | None:
    """The row count of a CommandComplete tag (INSERT 0 5, UPDATE 3, SELECT 10, ...), or None."""
    words = tag.rstrip(b"\0").rsplit(b" ", 1)
    return int(words[1]) if len(words) == 2 and words[1].isdigit() else None
