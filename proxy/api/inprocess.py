"""SQL over HTTP runs through the same session as the wire protocol, in process.

An HTTP request that carries SQL gets a ``Session`` (frontend/session.py) of its own, exactly
the one a psql client gets. The only differences are in how it is reached:
- its Port is this object, not a socket: what the session writes is collected here and
  decoded, and what the request asks is fed to it as protocol messages (Parse, Bind,
  Describe, Execute, Sync);
- its login is ``Session.login_verified``: the HTTP layer has already checked the key's
  secret (auth/keys.check_secret), so there is no SCRAM exchange.

Routing, key policies, tenant binding, the merger, two-phase commit, pools, audit and limits
are therefore the wire protocol's own, and nothing that a key may not do over the wire can
be done over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..errors import CONNECTION_FAILURE, FEATURE_NOT_SUPPORTED
from ..fleet import Fleet
from ..frontend.session import Session
from ..wire import messages as m

# A stream's reader lagging by more than STREAM_HIGH bytes stops the backends; under
# STREAM_LOW they go on.
STREAM_HIGH = 1024 * 1024
STREAM_LOW = 256 * 1024
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")  # table oid, column, type oid, size, modifier, format


@dataclass(frozen=True)
class Field:
    name: str
    table_id: int
    column_id: int
    type_id: int
    size: int
    modifier: int
    format: int


@dataclass
class Result:
    """One statement's answer: its columns, rows (text values, None for NULL) and tag."""

    fields: list[Field] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    command: str = ""
    row_count: int | None = None


NO_COPY = _NO_COPY = "COPY is not served over HTTP: send the rows as INSERT statements, or use the wire protocol"


class TooBig(Exception):
    """An answer gathered whole went over the limit (the session was ended)."""


@dataclass
class SqlError(Exception):
    """An ErrorResponse, every field of it (code, message, detail, hint, position, ...)."""

    fields: dict[str, str]

    @property
    def code(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


_NAMES = {"S": "severity", "V": "severity", "C": "code", "M": "message", "D": "detail", "H": "hint",
          "P": "position", "p": "internalPosition", "q": "internalQuery", "W": "where", "s": "schema",
          "t": "table", "c": "column", "d": "dataType", "n": "constraint", "F": "file", "L": "line",
          "R": "routine"}


def error_json(fields: dict[str, str]) -> dict[str, str]:
    """An ErrorResponse's fields by the names Neon's driver (and node's pg) give them."""
    return {_NAMES[k]: v for k, v in fields.items() if k in _NAMES}


class InProcess:
    """One session driven in process: the Port of ``Session`` and the client of its answers."""

    def __init__(self, fleet: Fleet, peer: str, over: str = "http", tls: bool = False, limit: int | None = None) -> None:
        self.session = Session(fleet, self)
        self.session.tls = tls  # (listen.tls.required holds over HTTP too)
        self.limit = limit  # bytes of an answer gathered whole (run): past it the session ends, TooBig
        self.too_big = False
        self._scan = 0  # where _has_ready looks next (each frame read once)
        self._seen_ready = False
        self._out = bytearray()  # what the session wrote, not decoded yet
        self._ready: asyncio.Future[None] | None = None
        self._more: asyncio.Future[None] | None = None  # a stream waits for what comes next
        self._slow = False  # the session was told its client is slow (a stream's reader lags)
        self.closed = False
        self._lost = False
        self.baseline: dict[str, str] = {}  # its settings after login (a reused session must still have them)
        self.session.connected_from(peer)
        self.session.over = over  # (the audit log's route)

    # -- the session's Port

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self._out += data
        if self.limit is not None and self._more is None and len(self._out) > self.limit + 65536:
            self.too_big = True  # (a gathered answer: the statement is cancelled, the session ends)
            self.session.cancel_running()
            self.close()
            return
        more = self._more
        if more is not None and not more.done():
            more.set_result(None)
        if len(self._out) > STREAM_HIGH and more is not None and not self._slow:
            self._slow = True
            self.session.client_slow(True)  # the backends wait until the stream's reader catches up
        waiter = self._ready
        if waiter is not None and not waiter.done() and self._has_ready():
            waiter.set_result(None)

    def direct_writer(self) -> Callable[[bytes], None]:
        return self.write

    def pause_reading(self) -> None:
        pass  # a request is fed whole, once the previous one is answered

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for waiter in (self._ready, self._more):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        asyncio.get_running_loop().call_soon(self._gone)

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> bool:
        return False

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(work)

    def later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    def _gone(self) -> None:
        if not self._lost:
            self._lost = True
            self.session.lost()

    # -- the client side

    async def login(self, key_id: str, database: str, settings: dict[str, str]) -> None:
        """Log in as ``key_id`` (already checked) to ``database``; SqlError if refused."""
        self.session.login_verified({**settings, "user": key_id, "database": database})
        await self._answers()

    async def run(self, statements: list[tuple[str, list[Any]]]) -> list[Result]:
        """Each (sql, parameters) as Parse/Bind/Describe/Execute, then one Sync: one pipeline,
        as PostgreSQL runs it (an error ends it). Parameters are bound as text, never pasted
        into the SQL. SqlError on the first error."""
        out = bytearray()
        for sql, params in statements:
            out += m.parse("", sql)
            out += m.bind("", "", _bind_rest(params))
            out += m.describe(m.TARGET_PORTAL, "")
            out += m.execute("")
        out += m.SYNC_MSG
        self.session.feed(bytes(out))
        return await self._answers()

    async def stream(self, sql: str, params: list[Any]) -> AsyncIterator[tuple[str, Any]]:
        """One statement's answer as it comes: ("fields", [Field]), ("row", [values]) for
        each row, then ("done", (command, count)). SqlError for an ErrorResponse. While the
        reader of this iterator lags by more than STREAM_HIGH bytes, the session stops reading
        its backends (as for a slow client over the wire), so memory stays bounded."""
        self.session.feed(m.parse("", sql) + m.bind("", "", _bind_rest(params)) + m.describe(m.TARGET_PORTAL, "")
                          + m.execute("") + m.SYNC_MSG)
        pos = 0
        error: SqlError | None = None
        loop = asyncio.get_running_loop()
        while True:
            data = self._out
            while pos + 5 <= len(data):
                (length,) = _I32.unpack_from(data, pos + 1)
                if pos + 1 + length > len(data):
                    break
                kind, body = data[pos], bytes(data[pos + 5:pos + 1 + length])
                pos += 1 + length
                if kind == m.DATA_ROW:
                    if error is None:
                        yield "row", _values(body)
                elif kind == m.ROW_DESCRIPTION:
                    yield "fields", _fields(body)
                elif kind == m.COMMAND_COMPLETE:
                    yield "done", _tag(body)
                elif kind == m.ERROR_RESPONSE and error is None:
                    error = SqlError(m.decode_fields(body))
                elif kind == m.READY_FOR_QUERY:
                    del data[:pos]
                    self._resume()
                    if error is not None:
                        raise error
                    return
            if pos > STREAM_LOW:
                del data[:pos]
                pos = 0
            if len(data) - pos < STREAM_LOW:
                self._resume()
            if self.closed:
                raise error or SqlError({"C": CONNECTION_FAILURE, "M": "the session ended", "S": "FATAL"})
            self._more = loop.create_future()
            try:
                await self._more
            finally:
                self._more = None

    def _resume(self) -> None:
        if self._slow:
            self._slow = False
            self.session.client_slow(False)

    async def simple(self, sql: str) -> list[Result]:
        """A simple Query (BEGIN, COMMIT, ...)."""
        self.session.feed(m.query(sql))
        return await self._answers()

    def cancel(self) -> None:
        """The HTTP client went away: its running statement is cancelled."""
        self.session.cancel_running()

    def finish(self) -> None:
        """Say goodbye (Terminate), as a client that is done."""
        if not self.closed:
            self.session.feed(m.TERMINATE_MSG)
            self.close()

    def _has_ready(self) -> bool:
        """Whether a ReadyForQuery has come; each frame is looked at once (``_scan``). A
        CopyInResponse is answered with CopyFail: COPY is not served over HTTP."""
        if self._seen_ready:
            return True
        pos, data = self._scan, self._out
        while pos + 5 <= len(data):
            (length,) = _I32.unpack_from(data, pos + 1)
            if pos + 1 + length > len(data):
                break
            kind = data[pos]
            pos += 1 + length
            if kind == m.READY_FOR_QUERY:
                self._scan, self._seen_ready = pos, True
                return True
            if kind == m.COPY_IN_RESPONSE:
                # As libpq ends a COPY of the extended protocol: CopyFail, then a Sync (the one
                # sent with the statement was ignored while the COPY ran).
                asyncio.get_running_loop().call_soon(self.session.feed, m.copy_fail(_NO_COPY) + m.SYNC_MSG)
        self._scan = pos
        return False

    async def _answers(self) -> list[Result]:
        """The answers up to ReadyForQuery, decoded; SqlError for an ErrorResponse."""
        if not self._has_ready() and not self.closed:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self._ready
            finally:
                self._ready = None
        data, self._out = bytes(self._out), bytearray()
        self._scan, self._seen_ready = 0, False
        if self.too_big:
            raise TooBig()
        results: list[Result] = []
        ready = False
        current = Result()
        error: SqlError | None = None
        pos = 0
        while pos + 5 <= len(data):
            kind = data[pos]
            (length,) = _I32.unpack_from(data, pos + 1)
            body = data[pos + 5:pos + 1 + length]
            pos += 1 + length
            if kind == m.ROW_DESCRIPTION:
                current.fields = _fields(body)
            elif kind == m.DATA_ROW:
                current.rows.append(_values(body))
            elif kind == m.COMMAND_COMPLETE:
                current.command, current.row_count = _tag(body)
                results.append(current)
                current = Result()
            elif kind == m.EMPTY_QUERY:
                results.append(current)
                current = Result()
            elif kind == m.ERROR_RESPONSE and error is None:
                error = SqlError(m.decode_fields(body))
            elif kind == m.COPY_OUT and error is None:
                error = SqlError({"C": FEATURE_NOT_SUPPORTED, "M": _NO_COPY, "S": "ERROR"})
            elif kind == m.READY_FOR_QUERY:
                ready = True
                break
        if error is not None:
            raise error
        if not ready:  # the session ended before its answer was whole: never a partial answer
            raise SqlError({"C": CONNECTION_FAILURE, "M": "the session ended before the answer was complete "
                            "(the database connection broke)", "S": "FATAL"})
        return results


def _bind_rest(params: list[Any]) -> bytes:
    """Bind's parameter part: every value as text (None: NULL), results as text."""
    out = bytearray(_I16.pack(0))  # no parameter format codes: all text
    out += _I16.pack(len(params))
    for value in params:
        if value is None:
            out += _I32.pack(-1)
        else:
            text = _text(value).encode()
            out += _I32.pack(len(text)) + text
    out += _I16.pack(0)  # result formats: all text
    return bytes(out)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _fields(body: bytes) -> list[Field]:
    (count,) = _I16.unpack_from(body, 0)
    pos, out = 2, []
    for _ in range(count):
        end = body.index(0, pos)
        name = body[pos:end].decode()
        table, column, type_id, size, modifier, fmt = _FIELD.unpack_from(body, end + 1)
        out.append(Field(name, table, column, type_id, size, modifier, fmt))
        pos = end + 1 + _FIELD.size
    return out


def _values(body: bytes) -> list[str | None]:
    (count,) = _I16.unpack_from(body, 0)
    pos, out = 2, []
    for _ in range(count):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + length].decode())
            pos += length
    return out


def _tag(body: bytes) -> tuple[str, int | None]:
    tag = body.rstrip(b"\0").decode()
    words = tag.split()
    count = int(words[-1]) if len(words) > 1 and words[-1].isdigit() else None
    return words[0] if words else tag, count
