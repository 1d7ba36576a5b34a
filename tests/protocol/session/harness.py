"""A socket-free protocol harness: a real ``Fleet`` and client sessions, scripted backends.

In the style of h11's tests: bytes in, bytes out. A test drives pgfleet's client session with
the bytes a PostgreSQL client sends, plays every backend connection pgfleet opens by feeding
it the bytes a PostgreSQL server would answer, and asserts on the messages each side
receives, decoded into plain tuples (``("Q", "select 1")``, ``("Z", "I")``). Nothing here opens
a socket or starts a process; everything runs on the test's event loop.

Theory of operation.

* ``Harness`` builds a ``Fleet`` from a config dict (through ``proxy.config.load_text``, so the
  snapshot is validated as pgfleet's own loader does) with ``scripted_connect`` as its
  Connector. Each connection a pool opens gets a ``FakeTransport``; the connector reads the
  first packet the protocol writes in ``connection_made``: a startup packet makes a
  ``ScriptedServer`` whose login is answered (AuthenticationOk, ParameterStatus,
  BackendKeyData, ReadyForQuery) on the next loop iteration, as the network would; a
  CancelRequest is recorded in ``Harness.cancels``.
* ``ScriptedServer.received()`` decodes what pgfleet sent since last asked; ``answer(...)``
  feeds backend messages to pgfleet.
* ``SessionSeam`` is the ONLY code that touches the client session's API (construction,
  ``connection_made``, ``data_received``, ``connection_lost``, and what it writes to its
  transport). When the session is rewritten, adapt this class and nothing else: ``Client`` and
  the test cases only see bytes and decoded messages.
* ``Harness.settle()`` runs the loop until nothing moves (tasks the session starts, such as
  pool acquires, complete), so every step of a case sees the state after it.
* A case (``Case``) is a named list of steps — ``Login``, ``Send``, ``Backend`` (what a backend
  received), ``Answer`` (what it says), ``Got`` (what the client received), ``Closed``... —
  run by ``run_case``, which settles the loop after each step, checks at the end that nothing
  is left unread on either side, fails if pgfleet logged a traceback, and on a failure shows
  the conversation so far. A case with ``bug=`` states PostgreSQL's behaviour and is a strict
  xfail until pgfleet matches it.
* Backends are told apart by database and the order pgfleet opened them: "primary" is the
  first connection to primary, "primary#2" the second.

The decoded forms (server -> client, ``decode_backend``): ``("R", code[, data])``,
``("S", name, value)``, ``("K", pid, secret)``, ``("Z", status)``, ``("E", severity, sqlstate,
message)``, ``("N", ...)`` alike, ``("T", (name, type oid), ...)``, ``("D", value, ...)`` (str,
None for NULL), ``("C", tag)``, ``("I",)``, ``("1",)``, ``("2",)``, ``("3",)``, ``("n",)``,
``("s",)``, ``("t", oid, ...)``, ``("G"|"H", format, columns)``, ``("d", data)``, ``("c",)``,
``("A", pid, channel, payload)``. Client -> server (``decode_frontend``): ``("Q", sql)``,
``("P", name, query[, type oids])``, ``("B", portal, statement[, text parameters])``,
``("D", "S"|"P", name)``, ``("E", portal, max_rows)``, ``("C", "S"|"P", name)``, ``("S",)``,
``("H",)``, ``("X",)``, ``("d", data)``, ``("c",)``, ``("f", reason)``, ``("F", ...)``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import importlib.util
import itertools
import json
import logging
import re
import secrets
import struct
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from proxy.config import Config, Dsn, load_text
from proxy.fleet import Fleet
from proxy.wire import messages as m
from tests.configs import overridden

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

# ---------------------------------------------------------------------------------------------
# The fleet under test

KEYS = {  # key id -> (secret, role)
    "pf_server": ("server-secret", "server"),
    "pf_client": ("client-secret", "client"),
    "pf_tenant": ("tenant-secret", "database"),
    "pf_tenant3": ("tenant3-secret", "database"),
    "pf_admin": ("admin-secret", "admin"),
}
USER_IDS = {"pf_tenant": 42, "pf_tenant3": 3}  # users.id 42 lives on primary, 3 on secondary
DATABASES = ("primary", "secondary", "analytics")


def fleet_config(**overrides: Any) -> dict[str, Any]:
    """Three databases: primary and secondary are the shards of ``users`` (by ``id``, its type
    pinned so that no catalog is read), ``events`` lives in analytics; a key of each role
    (two database keys: user_id 42, on primary, and user_id 3, on secondary)."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 6432, "database": "app"},
        "pool": {"mode": "transaction", "size": 2, "acquire_timeout": "5s"},
        "databases": {name: {"dsn": f"postgresql://pgfleet@{name}.backend.test:5432/{name}?sslmode=disable"}
                      for name in DATABASES},
        "default_database": "primary",
        "sharding": {"shards": ["primary", "secondary"], "function": "hash",
                     "tables": {"users": "id"}, "types": {"users": "integer"}},
        "tables": {"events": "analytics"},
        "keys": [{"id": key, "secret": secret, "role": role, **({"user_id": USER_IDS[key]} if key in USER_IDS else {})}
                 for key, (secret, role) in KEYS.items()],
    }
    return overridden(config, overrides)


# What every scripted backend reports at login (PostgreSQL 16 with a UTF8 database).
SERVER_PARAMS = (
    ("application_name", "pgfleet"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"),
    ("IntervalStyle", "postgres"),
    ("is_superuser", "off"),
    ("server_encoding", "UTF8"),
    ("server_version", "16.4"),
    ("session_authorization", "pgfleet"),
    ("standard_conforming_strings", "on"),
    ("TimeZone", "UTC"),
)
# What a client that sent no application_name is told: the server's values, but its own
# (empty) application_name rather than the one of pgfleet's backend connections.
CLIENT_PARAMS = tuple((n, "" if n == "application_name" else v) for n, v in SERVER_PARAMS)


# ---------------------------------------------------------------------------------------------
# Transports


class FakeTransport(asyncio.Transport):
    """Records what its protocol writes and delivers what the peer sends, as asyncio's
    transports do: nothing is delivered while the protocol has paused reading (it comes on
    resume), and ``close`` tells the protocol on the next loop iteration."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.protocol: asyncio.Protocol | None = None
        self.written = bytearray()
        self.closing = False
        self.reading = True
        self.held = bytearray()  # what the peer sent while reading was paused
        self.peer = peer

    def deliver(self, data: bytes) -> None:
        """Bytes from the peer, as one read."""
        if self.closing or self.protocol is None:
            return
        if self.reading and not self.held:
            self.protocol.data_received(data)
        else:
            self.held += data

    def _deliver_held(self) -> None:
        if self.reading and self.held and not self.closing and self.protocol is not None:
            data, self.held = bytes(self.held), bytearray()
            self.protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.written += data

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def lose(self, exc: Exception | None) -> None:
        """The peer went away: the protocol hears it now."""
        if self.closing:
            return
        self.closing = True
        if self.protocol is not None:
            self.protocol.connection_lost(exc)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 6432)}.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            asyncio.get_running_loop().call_soon(self._deliver_held)

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------------
# Decoding


def _cstr(body: bytes, pos: int) -> tuple[str, int]:
    end = body.index(b"\0", pos)
    return body[pos:end].decode(errors="replace"), end + 1


def _frames(data: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Whole typed messages and the bytes they use."""
    out = []
    pos = 0
    while len(data) - pos >= 5:
        end = pos + 1 + _U32.unpack_from(data, pos + 1)[0]
        if end > len(data):
            break
        out.append((data[pos], bytes(data[pos + 5:end])))
        pos = end
    return out, pos


def _fields(body: bytes) -> tuple[str, str, str]:
    fields = m.decode_fields(body)
    return fields.get("V", fields.get("S", "")), fields.get("C", ""), fields.get("M", "")


def decode_backend_message(kind: int, body: bytes) -> tuple[Any, ...]:
    letter = chr(kind)
    if letter == "R":
        code = _I32.unpack_from(body, 0)[0]
        return ("R", code) if len(body) == 4 else ("R", code, body[4:])
    if letter == "S":
        name, pos = _cstr(body, 0)
        value, _ = _cstr(body, pos)
        return ("S", name, value)
    if letter == "K":
        return ("K", *struct.unpack("!ii", body))
    if letter == "Z":
        return ("Z", chr(body[0]))
    if letter in "EN":
        return (letter, *_fields(body))
    if letter == "T":
        count = _I16.unpack_from(body, 0)[0]
        pos = 2
        columns = []
        for _ in range(count):
            name, pos = _cstr(body, pos)
            type_oid = _U32.unpack_from(body, pos + 6)[0]
            pos += 18
            columns.append((name, type_oid))
        return ("T", *columns)
    if letter == "D":
        values = m.python_row_values(body)
        return ("D", *(None if v is None else bytes(v).decode(errors="replace") for v in values))
    if letter == "C":
        return ("C", _cstr(body, 0)[0])
    if letter == "t":
        count = _I16.unpack_from(body, 0)[0]
        return ("t", *struct.unpack_from(f"!{count}I", body, 2))
    if letter == "v":
        newest, count = struct.unpack_from("!ii", body, 0)
        pos, options = 8, []
        for _ in range(count):
            option, pos = _cstr(body, pos)
            options.append(option)
        return ("v", newest, *options)
    if letter in "GHW":
        fmt, columns = struct.unpack_from("!bh", body, 0)
        return (letter, fmt, columns)
    if letter == "d":
        return ("d", body)
    if letter == "A":
        pid = _I32.unpack_from(body, 0)[0]
        channel, pos = _cstr(body, 4)
        payload, _ = _cstr(body, pos)
        return ("A", pid, channel, payload)
    if not body:
        return (letter,)
    return (letter, body)


def decode_backend(data: bytes | bytearray) -> list[tuple[Any, ...]]:
    frames, used = _frames(data)
    assert used == len(data), f"a partial message: {bytes(data[used:])!r}"
    return [decode_backend_message(kind, body) for kind, body in frames]


def _bind_parameters(rest: bytes) -> tuple[Any, ...]:
    try:
        formats, values = m.bind_parameters(rest)
    except m.ProtocolViolation:
        return ("<malformed>",)
    out: list[Any] = []
    for i, value in enumerate(values):
        binary = (formats[0] if len(formats) == 1 else formats[i] if formats else 0) == 1
        out.append(None if value is None else value if binary else value.decode(errors="replace"))
    return tuple(out)


def decode_frontend_message(kind: int, body: bytes) -> tuple[Any, ...]:
    letter = chr(kind)
    try:
        if letter == "Q":
            return ("Q", _cstr(body, 0)[0])
        if letter == "P":
            parse = m.decode_parse(body)
            count = _I16.unpack_from(parse.param_types, 0)[0]
            types = struct.unpack_from(f"!{count}I", parse.param_types, 2)
            return ("P", parse.name, parse.query, types) if types else ("P", parse.name, parse.query)
        if letter == "B":
            bind = m.decode_bind(body)
            params = _bind_parameters(bind.rest)
            return ("B", bind.portal, bind.statement, params) if params else ("B", bind.portal, bind.statement)
        if letter in "DC":
            return (letter, chr(body[0]), _cstr(body, 1)[0])
        if letter == "E":
            return ("E", *m.decode_execute(body))
        if letter == "d":
            return ("d", body)
        if letter == "f":
            return ("f", _cstr(body, 0)[0])
    except (ValueError, struct.error, m.ProtocolViolation):
        pass
    if not body:
        return (letter,)
    return (letter, body)


def decode_frontend(data: bytes | bytearray) -> list[tuple[Any, ...]]:
    frames, used = _frames(data)
    assert used == len(data), f"a partial message: {bytes(data[used:])!r}"
    return [decode_frontend_message(kind, body) for kind, body in frames]


class Err:
    """Matches a decoded ErrorResponse (or NoticeResponse) by severity, SQLSTATE and,
    optionally, a regular expression searched in its message."""

    def __init__(self, sqlstate: str, message: str | None = None, severity: str = "ERROR",
                 kind: str = "E") -> None:
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.kind = kind

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, tuple) or len(other) != 4 or other[0] != self.kind:
            return False
        return other[1] == self.severity and other[2] == self.sqlstate and (
            self.message is None or re.search(self.message, other[3]) is not None)

    def __hash__(self) -> int:
        return hash((self.kind, self.sqlstate))

    def __repr__(self) -> str:
        text = f", {self.message!r}" if self.message else ""
        return f"Err({self.severity} {self.sqlstate}{text})"


class Kind:
    """Matches any decoded message of one type (a BackendKeyData's random values, say)."""

    def __init__(self, letter: str) -> None:
        self.letter = letter

    def __eq__(self, other: object) -> bool:
        return isinstance(other, tuple) and bool(other) and other[0] == self.letter

    def __hash__(self) -> int:
        return hash(self.letter)

    def __repr__(self) -> str:
        return f"Kind({self.letter!r})"


class Like:
    """Matches a string field by a regular expression (a backend-side statement name whose
    number is incidental: ``Like(r"pgfleet_\\d+")``)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(self.pattern, other) is not None

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"Like({self.pattern!r})"


PGFLEET_NAME = Like(r"pgfleet_\d+")  # a statement name pgfleet gave on the backend


def Fatal(sqlstate: str, message: str | None = None) -> Err:
    return Err(sqlstate, message, severity="FATAL")


def expected(items: Iterable[Any], decode: Callable[[bytes], list[tuple[Any, ...]]]) -> list[Any]:
    """Expectations as a flat list: bytes are decoded (builders can describe answers),
    tuples and matchers stay."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, bytes | bytearray):
            out.extend(decode(item))
        elif isinstance(item, list):
            out.extend(expected(item, decode))
        else:
            out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# Builders: frontend messages (what a client sends)


def Query(sql: str) -> bytes:
    return m.query(sql)


def _types(types: Iterable[int]) -> bytes:
    oids = tuple(types)
    return _I16.pack(len(oids)) + b"".join(_U32.pack(o) for o in oids)


def Parse(name: str, query: str, types: Iterable[int] = ()) -> bytes:
    return m.parse(name, query, _types(types))


def Bind(portal: str, statement: str, params: Iterable[str | bytes | None] = (),
         formats: Iterable[int] = (), result_formats: Iterable[int] = ()) -> bytes:
    values = list(params)
    fmts = tuple(formats)
    results = tuple(result_formats)
    body = _I16.pack(len(fmts)) + b"".join(_I16.pack(f) for f in fmts) + _I16.pack(len(values))
    for value in values:
        if value is None:
            body += _I32.pack(-1)
        else:
            data = value.encode() if isinstance(value, str) else value
            body += _I32.pack(len(data)) + data
    body += _I16.pack(len(results)) + b"".join(_I16.pack(f) for f in results)
    return m.bind(portal, statement, body)


def Describe(kind: str, name: str = "") -> bytes:
    return m.describe(ord(kind), name)


def Close(kind: str, name: str = "") -> bytes:
    return m.close(ord(kind), name)


def Execute(portal: str = "", max_rows: int = 0) -> bytes:
    return m.execute(portal, max_rows)


def Sync() -> bytes:
    return m.SYNC_MSG


def Flush() -> bytes:
    return m.FLUSH_MSG


def Terminate() -> bytes:
    return m.TERMINATE_MSG


def CopyFail(reason: str) -> bytes:
    return m.copy_fail(reason)


def Startup(**params: str) -> bytes:
    return m.startup_message(params)


def CancelRequest(pid: int, secret: int) -> bytes:
    return m.cancel_request(pid, secret)


# Builders: backend messages (what a server answers); CopyData and CopyDone go both ways.


def CopyData(data: bytes | str) -> bytes:
    return m.message(m.COPY_DATA, data.encode() if isinstance(data, str) else data)


def CopyDone() -> bytes:
    return m.COPY_DONE_MSG


def RowDescription(*columns: str | tuple[str, int]) -> bytes:
    """Columns by name (type text) or (name, type oid); text format."""
    body = _I16.pack(len(columns))
    for column in columns:
        name, oid = (column, 25) if isinstance(column, str) else column
        size = {16: 1, 20: 8, 21: 2, 23: 4}.get(oid, -1)
        body += name.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, oid, size, -1, 0)
    return m.message(m.ROW_DESCRIPTION, body)


def DataRow(*values: str | None) -> bytes:
    body = _I16.pack(len(values))
    for value in values:
        if value is None:
            body += _I32.pack(-1)
        else:
            data = value.encode()
            body += _I32.pack(len(data)) + data
    return m.message(m.DATA_ROW, body)


def CommandComplete(tag: str) -> bytes:
    return m.command_complete(tag)


def ReadyForQuery(status: str = "I") -> bytes:
    return m.ready_for_query(ord(status))


def ErrorResponse(sqlstate: str, message: str, severity: str = "ERROR") -> bytes:
    return m.error_response(sqlstate, message, severity=severity)


def NoticeResponse(message: str, sqlstate: str = "00000", severity: str = "NOTICE") -> bytes:
    return m.notice_response(sqlstate, message, severity)


def ParameterStatus(name: str, value: str) -> bytes:
    return m.parameter_status(name, value)


def NotificationResponse(pid: int, channel: str, payload: str) -> bytes:
    return m.message(m.NOTIFICATION, _I32.pack(pid) + channel.encode() + b"\0" + payload.encode() + b"\0")


def ParseComplete() -> bytes:
    return m.PARSE_COMPLETE_MSG


def BindComplete() -> bytes:
    return m.BIND_COMPLETE_MSG


def CloseComplete() -> bytes:
    return m.CLOSE_COMPLETE_MSG


def NoData() -> bytes:
    return m.NO_DATA_MSG


def PortalSuspended() -> bytes:
    return m.PORTAL_SUSPENDED_MSG


def EmptyQueryResponse() -> bytes:
    return m.message(m.EMPTY_QUERY)


def ParameterDescription(*oids: int) -> bytes:
    return m.message(m.PARAMETER_DESCRIPTION, _I16.pack(len(oids)) + b"".join(_U32.pack(o) for o in oids))


def CopyInResponse(columns: int, fmt: int = 0) -> bytes:
    return m.message(m.COPY_IN, struct.pack("!bh", fmt, columns) + _I16.pack(fmt) * columns)


def CopyOutResponse(columns: int, fmt: int = 0) -> bytes:
    return m.message(m.COPY_OUT, struct.pack("!bh", fmt, columns) + _I16.pack(fmt) * columns)


def settings_replay(**settings: str) -> tuple[str, str]:
    """The query pgfleet sends a backend to give it a client's settings (decoded)."""
    calls = ", ".join(f"pg_catalog.set_config('{name}', '{value}', false)" for name, value in settings.items())
    return ("Q", f"SELECT WHERE pg_catalog.num_nulls({calls}) < 0")


def tenant_login(key: str, shard: str, tenant: str, c: str = "a", secret: str | None = None) -> list[Step]:
    """A database key logs in: its first backend gets pgfleet.tenant (row-level security
    reads it) before the client is told it is ready."""
    no_rows = RowDescription() + CommandComplete("SELECT 0")
    return [Authenticate(c=c, key=key, secret=secret), Got(("R", 0), c=c),
            Backend(shard, settings_replay(**{"pgfleet.tenant": tenant})),
            Answer(shard, no_rows, ReadyForQuery("I")),
            Got(*(ParameterStatus(n, v) for n, v in CLIENT_PARAMS), Kind("K"), ReadyForQuery("I"), c=c)]


def result(columns: Iterable[str | tuple[str, int]], rows: Iterable[Iterable[str | None]], tag: str | None = None,
           status: str | None = "I") -> bytes:
    """A simple query's whole answer: RowDescription, DataRows, CommandComplete [ReadyForQuery]."""
    rows = [tuple(r) for r in rows]
    out = RowDescription(*columns) + b"".join(DataRow(*r) for r in rows)
    out += CommandComplete(tag if tag is not None else f"SELECT {len(rows)}")
    return out + (ReadyForQuery(status) if status is not None else b"")


# ---------------------------------------------------------------------------------------------
# Scripted backends


class ScriptedServer:
    """One backend connection pgfleet opened, played by the test."""

    def __init__(self, harness: Harness, database: str, ordinal: int, protocol: asyncio.Protocol,
                 transport: FakeTransport, startup: dict[str, str], pid: int, secret: int) -> None:
        self.harness = harness
        self.database = database
        self.ordinal = ordinal  # 1 for the first connection pgfleet opened to this database
        self.protocol = protocol  # pgfleet's side of the connection (a ServerConnection)
        self.transport = transport
        self.startup = startup
        self.pid = pid
        self.secret = secret
        self._read = len(transport.written)  # the startup packet was read at login

    def __repr__(self) -> str:
        return f"<backend {self.name}>"

    @property
    def name(self) -> str:
        return f"{self.database}#{self.ordinal}"

    def received(self) -> list[tuple[Any, ...]]:
        """What pgfleet sent this backend since last asked, decoded."""
        data = self.transport.written
        frames, used = _frames(memoryview(data)[self._read:])
        self._read += used
        return [decode_frontend_message(kind, body) for kind, body in frames]

    def peek(self) -> list[tuple[Any, ...]]:
        """What ``received()`` would return, left unread."""
        frames, _ = _frames(memoryview(self.transport.written)[self._read:])
        return [decode_frontend_message(kind, body) for kind, body in frames]

    def answer(self, *messages: bytes) -> None:
        """Feed backend messages (or any bytes) to pgfleet, in one read."""
        self.transport.deliver(b"".join(messages))

    def drop(self) -> None:
        """The server's connection is lost (a crash, a network failure)."""
        self.transport.lose(ConnectionResetError("connection reset by peer"))

    @property
    def closed(self) -> bool:
        return self.transport.closing


def _login_answer(pid: int, secret: int) -> bytes:
    out = [m.AUTHENTICATION_OK]
    out += [m.parameter_status(name, value) for name, value in SERVER_PARAMS]
    out += [m.backend_key_data(pid, secret), m.READY_IDLE]
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# The client session seam: the only code that knows the session's API.


class SessionSeam:
    """One client connection to pgfleet's session, without a socket.

    The client side is an ``asyncio.Protocol`` built with the fleet: given a transport by
    ``connection_made``, fed by ``data_received``, told of the end by ``connection_lost`` (the
    transport calls it); it writes to the transport and closes it. That protocol is the
    rewrite's thin seam (``proxy.frontend.seam.ClientConnection``) where it exists, else the
    session itself (``proxy.frontend.session.Session``, up to commit 917318d). Nothing else of
    the session is used; if its construction changes, only this class changes.
    """

    def __init__(self, fleet: Fleet, peer: tuple[str, int]) -> None:
        try:
            from proxy.frontend.seam import ClientConnection as protocol_class
        except ImportError:
            from proxy.frontend.session import Session as protocol_class  # type: ignore[assignment]

        self.transport = FakeTransport(peer)
        self.protocol: asyncio.Protocol = protocol_class(fleet)
        self.transport.protocol = self.protocol
        self.protocol.connection_made(self.transport)
        self._read = 0

    def feed(self, data: bytes) -> None:
        """Bytes from the client, as one read (held while the session has paused reading)."""
        self.transport.deliver(data)

    def take(self) -> bytes:
        """What the session wrote to the client since last asked."""
        data = bytes(self.transport.written[self._read:])
        self._read = len(self.transport.written)
        return data

    @property
    def closed(self) -> bool:
        """The session closed the connection."""
        return self.transport.closing

    @property
    def written(self) -> int:
        """Bytes written to the client so far (the harness watches it to know the loop settled)."""
        return len(self.transport.written)

    def disconnect(self) -> None:
        """The client goes away without a Terminate (its socket closes)."""
        self.transport.lose(None)


class LoginFailed(AssertionError):
    """pgfleet did not answer a login step as PostgreSQL does."""


@functools.cache
def _salted(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


class ScramClient:
    """The client side of SCRAM-SHA-256 as libpq runs it (RFC 5802/7677, no channel binding,
    empty user name: PostgreSQL takes it from the startup packet). By hand rather than
    scramp's client only to cache the salted password: 4096 PBKDF2 rounds per login add up."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.auth_message = b""
        self.server_key = b""

    def first(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        if not fields["r"].startswith(self.nonce):
            raise LoginFailed(f"the server's nonce does not extend ours: {server_first!r}")
        salted = _salted(self.secret, base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")
        without_proof = f"c=biws,r={fields['r']}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), self.auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        expected = base64.b64encode(hmac.digest(self.server_key, self.auth_message, "sha256")).decode()
        if server_final.decode() != f"v={expected}":
            raise LoginFailed(f"the server's SCRAM signature is wrong: {server_final!r}")


class Client:
    """A PostgreSQL client of pgfleet: sends frontend messages, reads decoded answers."""

    def __init__(self, harness: Harness, name: str, seam: SessionSeam) -> None:
        self.harness = harness
        self.name = name
        self.seam = seam
        self._pending = b""
        self.backlog: list[tuple[Any, ...]] = []  # decoded, put back for the next received()
        self.backend_key: tuple[int, int] | None = None

    def send(self, *messages: bytes) -> None:
        """Bytes to pgfleet, in one read."""
        self.seam.feed(b"".join(messages))

    def received(self) -> list[tuple[Any, ...]]:
        """What the client received since last asked, decoded (whole messages only)."""
        data = self._pending + self.seam.take()
        frames, used = _frames(data)
        self._pending = data[used:]
        backlog, self.backlog = self.backlog, []
        return backlog + [decode_backend_message(kind, body) for kind, body in frames]

    def raw(self) -> bytes:
        """What the client received since last asked, as bytes (SSLRequest's answer is one byte)."""
        data = self._pending + self.seam.take()
        self._pending = b""
        return data

    @property
    def closed(self) -> bool:
        return self.seam.closed

    def disconnect(self) -> None:
        self.seam.disconnect()

    async def login(self, key: str = "pf_server", database: str = "app", secret: str | None = None,
                    **params: str) -> list[tuple[Any, ...]]:
        """Startup and SCRAM-SHA-256 (or md5, as configured); what came after the SASL final
        message (AuthenticationOk, ParameterStatus..., BackendKeyData, ReadyForQuery)."""
        secret = KEYS[key][0] if secret is None else secret
        h = self.harness
        self.send(Startup(user=key, database=database, **params))
        await h.settle()
        first = self.received()
        if first and first[0][:2] == ("R", m.AUTH_MD5):
            inner = hashlib.md5((secret + key).encode()).hexdigest()
            self.send(m.password_message("md5" + hashlib.md5(inner.encode() + first[0][2]).hexdigest()))
            await h.settle()
            answer = self.received()
        else:
            if first[:1] != [("R", m.AUTH_SASL, b"SCRAM-SHA-256\0\0")]:
                raise LoginFailed(f"expected AuthenticationSASL, got {first}")
            scram = ScramClient(secret)
            self.send(m.sasl_initial_response("SCRAM-SHA-256", scram.first()))
            await h.settle()
            cont = self.received()
            if len(cont) != 1 or cont[0][:2] != ("R", m.AUTH_SASL_CONTINUE):
                raise LoginFailed(f"expected AuthenticationSASLContinue, got {cont}")
            self.send(m.sasl_response(scram.final(cont[0][2])))
            await h.settle()
            answer = self.received()
            if answer and answer[0][:2] == ("R", m.AUTH_SASL_FINAL):
                scram.verify(answer[0][2])  # pgfleet proves it knows the secret too
                answer = answer[1:]
        for message in answer:
            if message[0] == "K":
                self.backend_key = (message[1], message[2])
        return answer


# ---------------------------------------------------------------------------------------------
# The harness


@functools.cache
def _verifier(secret: str) -> str:
    """A key's SCRAM verifier, as pg_authid stores it (computed once: 4096 PBKDF2 rounds)."""
    from proxy.auth.keys import Verifier

    return str(Verifier.from_secret(secret, salt=b"pgfleet-protocol"))


@functools.cache
def _load(text: str) -> Config:
    """A validated snapshot per distinct config (snapshots are frozen: fleets may share one)."""
    return load_text(text, env={}, source="harness")


class Harness:
    """A fleet, its scripted backends and its clients, on the running loop."""

    def __init__(self, **overrides: Any) -> None:
        config = fleet_config(**overrides)
        if config["listen"].get("auth", "scram-sha-256") == "scram-sha-256":
            # Stored as verifiers, as in production: no key derivation per fleet built.
            config["keys"] = [{**key, "secret": _verifier(key["secret"])} for key in config["keys"]]
        self.config = _load(json.dumps(config, sort_keys=True))
        self.fleet = Fleet(self.config, connect=self.scripted_connect)
        # Whether each database sorts text by bytes (a fan-out reads it once from the
        # catalog with asyncpg): known here, as a catalog read would need a socket.
        self.fleet.byte_order.update(dict.fromkeys(self.config.databases, True))
        self.hosts = {self.config.dsn(name).host: name for name in self.config.databases}
        self.servers: list[ScriptedServer] = []
        self.cancels: list[tuple[str, int, int]] = []  # (database, pid, secret) of each CancelRequest
        self.refused: set[str] = set()  # databases whose connections fail (refuse())
        self.clients: dict[str, Client] = {}
        self.transcript: list[str] = []  # the conversation so far, for failure messages
        self._pids = itertools.count(1001)
        self._peers = itertools.count(50001)

    # -- the Connector

    async def scripted_connect(self, factory: Callable[[], asyncio.Protocol], dsn: Dsn, timeout: float) -> None:
        database = self.hosts[dsn.host]
        if database in self.refused:
            raise ConnectionRefusedError(111, "Connection refused")
        protocol = factory()
        transport = FakeTransport((dsn.host, dsn.port))
        transport.protocol = protocol
        protocol.connection_made(transport)
        first = bytes(transport.written)
        found = m.parse_first(first)
        assert found is not None, f"pgfleet opened a connection to {database} and sent no startup packet"
        message, _ = found
        if isinstance(message, m.CancelRequest):
            self.cancels.append((database, message.pid, message.secret))
            return
        assert isinstance(message, m.StartupMessage), f"unexpected first packet to {database}: {message}"
        pid = next(self._pids)
        secret = pid * 7919 % 2**31
        ordinal = 1 + sum(1 for s in self.servers if s.database == database)
        server = ScriptedServer(self, database, ordinal, protocol, transport, message.params, pid, secret)
        self.servers.append(server)
        asyncio.get_running_loop().call_soon(transport.deliver, _login_answer(pid, secret))

    def refuse(self, database: str) -> None:
        """New connections to ``database`` fail (ECONNREFUSED)."""
        self.refused.add(database)

    def server(self, database: str, ordinal: int = 1) -> ScriptedServer:
        for server in self.servers:
            if server.database == database and server.ordinal == ordinal:
                return server
        opened = ", ".join(s.name for s in self.servers) or "none"
        raise AssertionError(f"pgfleet opened no connection {database}#{ordinal} (opened: {opened})")

    # -- clients

    def client(self, name: str = "a") -> Client:
        """The client called ``name``, connected (TCP-wise) on first use."""
        client = self.clients.get(name)
        if client is None:
            seam = SessionSeam(self.fleet, ("10.0.0.7", next(self._peers)))
            client = self.clients[name] = Client(self, name, seam)
        return client

    # -- the loop

    async def settle(self, rounds: int = 200) -> None:
        """Run the loop until nothing moves: no bytes written anywhere and no task woken for
        a few iterations in a row."""
        quiet = 0
        last = None
        for _ in range(rounds):
            await asyncio.sleep(0)
            state = (sum(len(s.transport.written) for s in self.servers),
                     sum(c.seam.written for c in self.clients.values()),
                     len(self.servers), len(self.cancels),
                     sum(1 for t in asyncio.all_tasks() if not t.done()))
            if state == last:
                quiet += 1
                if quiet >= 5:
                    return
            else:
                quiet = 0
                last = state

    async def close(self) -> None:
        """Every client goes away; what pgfleet does then runs out."""
        for client in self.clients.values():
            if not client.closed:
                client.disconnect()
        await self.settle()
        for pool in self.fleet.pools.values():
            pool.close()
        await self.settle()


# ---------------------------------------------------------------------------------------------
# Table-driven cases: a case is a list of steps; each runs, then the loop settles.


def _show(items: list[Any]) -> str:
    return "\n".join(f"    {item!r}" for item in items) or "    (nothing)"


def _check(where: str, got: list[Any], want: list[Any]) -> None:
    if got != want:
        raise AssertionError(f"{where}:\n  got:\n{_show(got)}\n  expected:\n{_show(want)}")


def _wire(data: bytes, decode: Callable[[bytes], list[tuple[Any, ...]]]) -> str:
    """Bytes for the transcript: decoded when they are whole typed messages."""
    if data[:1] == b"\0":
        return f"<untyped packet {data[:8].hex()}...>" if len(data) > 8 else f"<untyped packet {data.hex()}>"
    try:
        _, used = _frames(data)
        if used != len(data):
            raise ValueError
        return ", ".join(repr(decode_message) for decode_message in decode(data)) or "(nothing)"
    except (ValueError, struct.error, AssertionError, IndexError):
        return repr(data[:60]) + ("..." if len(data) > 60 else "")


def _server_of(h: Harness, name: str) -> ScriptedServer:
    database, _, ordinal = name.partition("#")
    return h.server(database, int(ordinal or 1))


class Step:
    async def run(self, h: Harness) -> None:
        raise NotImplementedError


class Login(Step):
    """A client logs in (SCRAM-SHA-256 by default) and gets AuthenticationOk, the server's
    ParameterStatus values, BackendKeyData and ReadyForQuery 'I'."""

    def __init__(self, c: str = "a", key: str = "pf_server", database: str = "app", want: list[Any] | None = None,
                 secret: str | None = None, **params: str) -> None:
        self.c, self.key, self.database, self.want, self.secret, self.params = c, key, database, want, secret, params

    async def run(self, h: Harness) -> None:
        answer = await h.client(self.c).login(self.key, self.database, self.secret, **self.params)
        if self.want is not None:  # exactly these messages after the SASL exchange
            _check(f"client {self.c} login", answer, expected(self.want, decode_backend))
            return
        kinds = [message[0] for message in answer]
        if not answer or answer[0] != ("R", 0) or kinds[-2:] != ["K", "Z"] or answer[-1] != ("Z", "I") \
                or set(kinds[1:-2]) - {"S"}:
            raise AssertionError(f"client {self.c}: login as {self.key} failed:\n{_show(answer)}")

    def __repr__(self) -> str:
        return f"Login({self.c}, {self.key})"


class Authenticate(Step):
    """A client sends its startup packet and proves its secret; what pgfleet says after that
    (AuthenticationOk, ... or an error) is left for the next ``Got``."""

    def __init__(self, c: str = "a", key: str = "pf_server", database: str = "app", secret: str | None = None,
                 **params: str) -> None:
        self.c, self.key, self.database, self.secret, self.params = c, key, database, secret, params

    async def run(self, h: Harness) -> None:
        client = h.client(self.c)
        client.backlog = await client.login(self.key, self.database, self.secret, **self.params)


class Send(Step):
    """The client sends messages (bytes), all in one read."""

    def __init__(self, *messages: bytes, c: str = "a") -> None:
        self.messages, self.c = messages, c

    async def run(self, h: Harness) -> None:
        data = b"".join(self.messages)
        h.transcript.append(f"{self.c} -> pgfleet: {_wire(data, decode_frontend)}")
        h.client(self.c).send(data)


class SendChunks(Step):
    """The client's bytes arrive cut into these chunks, the loop settling between them."""

    def __init__(self, *chunks: bytes, c: str = "a") -> None:
        self.chunks, self.c = chunks, c

    async def run(self, h: Harness) -> None:
        h.transcript.append(f"{self.c} -> pgfleet in {len(self.chunks)} reads: "
                            f"{_wire(b''.join(self.chunks), decode_frontend)}")
        for chunk in self.chunks:
            h.client(self.c).send(chunk)
            await h.settle()


class Backend(Step):
    """What backend ``name`` ("primary" or "primary#2", numbered in the order pgfleet opened
    them) received since last asked; nothing when no messages are given."""

    def __init__(self, name: str, *want: Any) -> None:
        self.name, self.want = name, want

    async def run(self, h: Harness) -> None:
        server = _server_of(h, self.name)
        got = server.received()
        h.transcript.append(f"pgfleet -> {server.name}: {', '.join(map(repr, got)) or '(nothing)'}")
        _check(f"backend {server.name} received", got, expected(self.want, decode_frontend))


class BackendEnds(Step):
    """What backend ``name`` received since last asked ends with these messages (what comes
    before them is pgfleet's business: messages PostgreSQL skips after an error, say)."""

    def __init__(self, name: str, *tail: Any) -> None:
        self.name, self.tail = name, tail

    async def run(self, h: Harness) -> None:
        server = _server_of(h, self.name)
        got = server.received()
        h.transcript.append(f"pgfleet -> {server.name}: {', '.join(map(repr, got)) or '(nothing)'}")
        want = expected(self.tail, decode_frontend)
        if got[len(got) - len(want):] != want:
            raise AssertionError(f"backend {server.name} received:\n{_show(got)}\n  expected it to end with:\n"
                                 f"{_show(want)}")


class Answer(Step):
    """Backend ``name`` answers (messages in one read)."""

    def __init__(self, name: str, *messages: bytes) -> None:
        self.name, self.messages = name, messages

    async def run(self, h: Harness) -> None:
        server = _server_of(h, self.name)
        h.transcript.append(f"{server.name} -> pgfleet: {_wire(b''.join(self.messages), decode_backend)}")
        server.answer(*self.messages)


class AnswerChunks(Step):
    """Backend ``name`` answers bytes cut into chunks, the loop settling between them."""

    def __init__(self, name: str, *chunks: bytes) -> None:
        self.name, self.chunks = name, chunks

    async def run(self, h: Harness) -> None:
        server = _server_of(h, self.name)
        h.transcript.append(f"{server.name} -> pgfleet in {len(self.chunks)} reads: "
                            f"{_wire(b''.join(self.chunks), decode_backend)}")
        for chunk in self.chunks:
            server.answer(chunk)
            await h.settle()


class Drop(Step):
    """Backend ``name``'s connection is lost."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self, h: Harness) -> None:
        _server_of(h, self.name).drop()


class Got(Step):
    """What client ``c`` received since last asked (bytes are decoded; ``Err`` matches errors)."""

    def __init__(self, *want: Any, c: str = "a") -> None:
        self.want, self.c = want, c

    async def run(self, h: Harness) -> None:
        got = h.client(self.c).received()
        h.transcript.append(f"pgfleet -> {self.c}: {', '.join(map(repr, got)) or '(nothing)'}")
        _check(f"client {self.c} received", got, expected(self.want, decode_backend))


class GotRaw(Step):
    """The exact bytes client ``c`` received since last asked (the one-byte SSL answer)."""

    def __init__(self, want: bytes, c: str = "a") -> None:
        self.want, self.c = want, c

    async def run(self, h: Harness) -> None:
        got = h.client(self.c).raw()
        assert got == self.want, f"client {self.c} received {got!r}, expected {self.want!r}"


class Closed(Step):
    """Whether pgfleet has closed client ``c``'s connection."""

    def __init__(self, c: str = "a", closed: bool = True) -> None:
        self.c, self.closed = c, closed

    async def run(self, h: Harness) -> None:
        got = h.client(self.c).closed
        assert got == self.closed, f"client {self.c}: closed is {got}, expected {self.closed}"


class Disconnect(Step):
    """Client ``c`` goes away (its socket closes, no Terminate)."""

    def __init__(self, c: str = "a") -> None:
        self.c = c

    async def run(self, h: Harness) -> None:
        h.client(self.c).disconnect()


class PoolState(Step):
    """The state of database ``database``'s pool now: clients queued (not cancelled), and the
    connections idle in it, parked with a client between transactions and (if given) active."""

    def __init__(self, database: str = "primary", *, waiting: int, idle: int, parked: int,
                 active: int | None = None) -> None:
        self.database, self.want = database, {"waiting": waiting, "idle": idle, "parked": parked}
        if active is not None:
            self.want["active"] = active

    async def run(self, h: Harness) -> None:
        pool = h.fleet.pools[self.database]
        got = {"waiting": pool.waiting, "idle": len(pool.idle), "parked": len(pool.parked)}
        if "active" in self.want:
            got["active"] = len(pool.active)
        h.transcript.append(f"pool {self.database}: {got}")
        assert got == self.want, f"pool {self.database}: {got}, expected {self.want}"


class Opened(Step):
    """The backend connections pgfleet opened so far, in order."""

    def __init__(self, *names: str) -> None:
        self.names = names

    async def run(self, h: Harness) -> None:
        _check("backend connections opened", [s.name for s in h.servers], list(self.names))


class ServerClosed(Step):
    """Whether pgfleet closed backend ``name``."""

    def __init__(self, name: str, closed: bool = True) -> None:
        self.name, self.closed = name, closed

    async def run(self, h: Harness) -> None:
        got = _server_of(h, self.name).closed
        assert got == self.closed, f"backend {self.name}: closed is {got}, expected {self.closed}"


class Cancels(Step):
    """The CancelRequests pgfleet sent since the case began, each as the backend it names
    ("primary#1": that connection's BackendKeyData)."""

    def __init__(self, *names: str) -> None:
        self.names = names

    async def run(self, h: Harness) -> None:
        servers = [_server_of(h, name) for name in self.names]
        want = [(server.database, server.pid, server.secret) for server in servers]
        _check("cancel requests sent", h.cancels, want)


class SendCancel(Step):
    """A new connection ``c`` sends a CancelRequest with client ``of``'s BackendKeyData
    (its secret plus ``wrong``, to send a wrong one)."""

    def __init__(self, c: str, of: str, wrong: int = 0) -> None:
        self.c, self.of, self.wrong = c, of, wrong

    async def run(self, h: Harness) -> None:
        key = h.client(self.of).backend_key
        assert key is not None, f"client {self.of} has no BackendKeyData"
        h.client(self.c).send(CancelRequest(key[0], (key[1] + self.wrong) % 2**31))


class Sleep(Step):
    """Real time passes (for timers: a key's statement_timeout)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self, h: Harness) -> None:
        await asyncio.sleep(self.seconds)


class Refuse(Step):
    """New connections to database ``name`` fail."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self, h: Harness) -> None:
        h.refuse(self.name)


def rewritten_session() -> bool:
    """Whether the client side is the rewrite (a thin Protocol seam over a sans-IO session)."""
    return importlib.util.find_spec("proxy.frontend.seam") is not None


class Case:
    """A named list of steps; ``config``: overrides of ``fleet_config``; ``bug``: a known bug
    (the case states PostgreSQL's behaviour and is expected to fail until it is fixed);
    ``fixed_in_rewrite``: the bug is gone in the rewritten session (expected to fail only
    with the session it replaces)."""

    def __init__(self, name: str, *steps: Step, config: dict[str, Any] | None = None, bug: str | None = None,
                 fixed_in_rewrite: bool = False, strict_end: bool = True) -> None:
        self.name = name
        self.steps = steps
        self.config = config or {}
        self.bug = bug
        self.fixed_in_rewrite = fixed_in_rewrite
        self.strict_end = strict_end  # at the end nothing may be left unread on either side

    def param(self) -> Any:
        import pytest

        failing = self.bug is not None and not (self.fixed_in_rewrite and rewritten_session())
        marks = [pytest.mark.xfail(strict=True, reason=f"bug: {self.bug}")] if failing else []
        return pytest.param(self, id=self.name, marks=marks)


class _Tracebacks(logging.Handler):
    """Records log records that carry a traceback (pgfleet's own bugs, a task's lost exception)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.name == "asyncio":
            self.records.append(record)


@contextlib.contextmanager
def no_tracebacks() -> Iterator[None]:
    """Fails when pgfleet (or asyncio, for a task) logged an exception while inside."""
    handler = _Tracebacks()
    loggers = [logging.getLogger("pgfleet"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    if handler.records:
        record = handler.records[0]
        raise AssertionError(f"pgfleet logged an exception ({record.name}): {record.getMessage()}\n"
                             + "".join(traceback.format_exception(*record.exc_info) if record.exc_info else ""))


async def run_case(case: Case) -> None:
    with no_tracebacks():
        await _run_case(case)


async def _run_case(case: Case) -> None:
    h = Harness(**case.config)
    try:
        for number, step in enumerate(case.steps, 1):
            try:
                await step.run(h)
                await h.settle()
            except AssertionError as exc:
                backends = "".join(f"\n  {server.name}{' (closed)' if server.closed else ''}:\n{_show(server.peek())}"
                                   for server in h.servers)
                transcript = "\n".join(f"  {line}" for line in h.transcript[-40:])
                raise AssertionError(f"step {number} ({type(step).__name__}): {exc}\n"
                                     f"unread by the backends:{backends or ' (none opened)'}\n"
                                     f"transcript:\n{transcript}") from None
        if case.strict_end:
            for client in h.clients.values():
                left = client.received()
                assert not left, f"at the end, client {client.name} has unread messages:\n{_show(left)}"
            for server in h.servers:
                left = server.received()
                assert not left, f"at the end, backend {server.name} has unread messages:\n{_show(left)}"
    finally:
        await h.close()


# ---------------------------------------------------------------------------------------------
# No sockets: the whole tier runs without one.


class SocketUsed(OSError):
    pass


@contextlib.asynccontextmanager
async def forbid_sockets() -> AsyncIterator[list[str]]:
    """Every way to a socket raises while inside; yields the attempts (to assert none)."""
    import socket

    attempts: list[str] = []
    loop = asyncio.get_running_loop()

    def refuse(what: str) -> Callable[..., Any]:
        def forbidden(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args!r}")
            raise SocketUsed(f"the protocol tier must not use sockets: {what}")
        return forbidden

    def refuse_async(what: str) -> Callable[..., Any]:
        async def forbidden(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args!r}")
            raise SocketUsed(f"the protocol tier must not use sockets: {what}")
        return forbidden

    class NoSocket(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            attempts.append(f"socket.socket{args!r}")
            raise SocketUsed("the protocol tier must not use sockets: socket.socket()")

    import pytest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "socket", NoSocket)
        for name in ("create_connection", "getaddrinfo", "socketpair", "create_server"):
            patch.setattr(socket, name, refuse(f"socket.{name}"))
        for name in ("create_connection", "create_server", "create_unix_connection", "create_unix_server",
                     "create_datagram_endpoint", "getaddrinfo", "sock_connect", "connect_accepted_socket"):
            patch.setattr(loop, name, refuse_async(f"loop.{name}"))
        yield attempts
