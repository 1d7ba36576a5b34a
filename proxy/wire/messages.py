"""Framing, decoders and builders for the protocol v3 messages pgfleet inspects.

Owns the byte layout of messages: ``frame()`` finds message boundaries in a buffer, the
``decode_*`` functions read the few messages pgfleet must understand, the builders produce
bytes. It never does I/O and never raises anything but ``ProtocolViolation`` on bad bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolViolation

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HEAD = struct.Struct("!cI")
_II = struct.Struct("!ii")

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10000  # PostgreSQL's own limit for a startup packet

# Client message types (frontend -> backend).
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
TERMINATE = ord("X")
PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse and SASLResponse share it
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
COPY_IN_RESPONSE = ord("G")
FUNCTION_CALL = ord("F")

# Server message types (backend -> frontend).
AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION = ord("A")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
COMMAND_COMPLETE = ord("C")
ROW_DESCRIPTION = ord("T")
NO_DATA = ord("n")
PARAMETER_DESCRIPTION = ord("t")
DATA_ROW = ord("D")
EMPTY_QUERY = ord("I")
PORTAL_SUSPENDED = ord("s")
COPY_IN = ord("G")
COPY_OUT = ord("H")
COPY_BOTH = ord("W")
NEGOTIATE_VERSION = ord("v")
# What a Describe or Close names: a portal or a prepared statement.
TARGET_PORTAL = ord("P")
TARGET_STATEMENT = ord("S")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


# ---------------------------------------------------------------------------------------------
# Framing


def frame(buf: bytes | bytearray | memoryview, pos: int, max_size: int) -> tuple[int, int, int] | None:
    """The typed message at ``pos``: ``(type, body_start, end)``, or None if incomplete.

    ``max_size`` bounds the declared length so that a 2 GB length field is refused at once
    instead of being waited for.
    """
    if len(buf) - pos < 5:
        return None
    length = _U32.unpack_from(buf, pos + 1)[0]
    if length < 4 or length > max_size:
        raise ProtocolViolation(f"invalid message length {length} for message type {chr(buf[pos])!r}")
    end = pos + 1 + length
    if len(buf) < end:
        return None
    return buf[pos], pos + 5, end


# ---------------------------------------------------------------------------------------------
# The first message of a connection (no type byte)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


FirstMessage = StartupMessage | SSLRequest | GSSEncRequest | CancelRequest


def parse_first(buf: bytes | bytearray) -> tuple[FirstMessage, int] | None:
    """The untyped first message and the bytes it used, or None if incomplete."""
    if len(buf) < 8:
        return None
    length = _U32.unpack_from(buf, 0)[0]
    if length < 8 or length > MAX_STARTUP:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    code = _U32.unpack_from(buf, 4)[0]
    body = bytes(buf[8:length])
    if code == SSL_REQUEST and length == 8:
        return SSLRequest(), length
    if code == GSSENC_REQUEST and length == 8:
        return GSSEncRequest(), length
    if code == CANCEL_REQUEST and length == 16:
        pid, secret = _II.unpack_from(body, 0)
        return CancelRequest(pid, secret), length
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: pgfleet speaks protocol 3.0")
    return StartupMessage(_startup_params(body)), length


def _startup_params(body: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while True:
        end = body.find(b"\0", pos)
        if end < 0:
            raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
        if end == pos:  # the empty name that ends the list
            if end + 1 != len(body):
                raise ProtocolViolation("invalid startup packet layout: bytes after the terminator")
            return params
        value_end = body.find(b"\0", end + 1)
        if value_end < 0:
            raise ProtocolViolation("invalid startup packet layout: a parameter name has no value")
        try:
            params[body[pos:end].decode()] = body[end + 1:value_end].decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("invalid startup packet: parameters must be UTF-8") from None
        pos = value_end + 1


# ---------------------------------------------------------------------------------------------
# Decoders for the typed messages pgfleet inspects


def _cstr(body: bytes | memoryview, pos: int) -> tuple[str, int]:
    end = bytes(body).find(b"\0", pos) if isinstance(body, memoryview) else body.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("invalid message format: unterminated string")
    try:
        return bytes(body[pos:end]).decode(), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid message format: string is not valid UTF-8") from None


def decode_query(body: bytes) -> str:
    sql, end = _cstr(body, 0)
    if end != len(body):
        raise ProtocolViolation("invalid Query message: trailing bytes after the statement")
    return sql


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: bytes  # the raw count + OIDs, forwarded as they came


def decode_parse(body: bytes) -> Parse:
    name, pos = _cstr(body, 0)
    query, pos = _cstr(body, pos)
    rest = body[pos:]
    if len(rest) < 2:
        raise ProtocolViolation("invalid Parse message: missing parameter type count")
    count = _I16.unpack_from(rest, 0)[0]
    if count < 0 or len(rest) != 2 + 4 * count:
        raise ProtocolViolation("invalid Parse message: parameter type count does not match")
    return Parse(name, query, rest)


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    rest: bytes  # formats, parameters and result formats, forwarded as they came


def decode_bind(body: bytes) -> Bind:
    portal, pos = _cstr(body, 0)
    statement, pos = _cstr(body, pos)
    return Bind(portal, statement, body[pos:])


def counted_values(data: bytes, pos: int, count: int) -> tuple[list[bytes | None], int]:
    """``count`` values, each an Int32 length (-1: NULL) then its bytes, as Bind and arrays
    carry them; and the position after them. Raises ``struct.error`` past the end."""
    values: list[bytes | None] = []
    for _ in range(count):
        length = _I32.unpack_from(data, pos)[0]
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if pos + length > len(data):
            raise struct.error("a value runs past the end")
        values.append(data[pos:pos + length])
        pos += length
    return values, pos


def python_row_values(body: bytes) -> list[bytes | None]:
    """A DataRow body's values (None for NULL); ValueError when it is not a whole DataRow."""
    try:
        count = _I16.unpack_from(body, 0)[0]
        values, _ = counted_values(body, 2, count)
    except struct.error:
        raise ValueError("malformed DataRow: a value runs past the end of the message") from None
    if count < 0:
        raise ValueError("malformed DataRow: a value runs past the end of the message")
    return values


# How keyed_rows reads a sort key column (the spec's mode).
KEY_CALL, KEY_INT, KEY_INT_DESC, KEY_FLOAT, KEY_FLOAT_DESC, KEY_BYTES = range(6)
SortSpec = tuple[tuple[int, int, Callable[[bytes], Any] | None, bool], ...]


def python_keyed_rows(buffer: bytes | bytearray, pos: int, spec: SortSpec) -> tuple[list[tuple[tuple[Any, ...], bytes]], int]:
    """The whole DataRow messages of ``buffer`` from ``pos`` on (up to the first other or
    incomplete message), each as (sort key, message); and the position after them.

    ``spec`` has one (column, mode, read, nulls_first) per ORDER BY key. Each adds a
    (flag, value) pair to the key, so that Python's tuple order is PostgreSQL's: flag 0 is
    NULLS FIRST, 3 NULLS LAST, 1 and 2 values. Integers and floats are read here, negated
    for DESC; a float's NaN (above every number) takes flag 2 ascending, 1 descending. Other
    columns are their bytes (KEY_BYTES) or ``read(bytes)`` (KEY_CALL, DESC included in it).
    """
    rows = []
    size = len(buffer)
    while size - pos >= 5 and buffer[pos] == DATA_ROW:
        length = _I32.unpack_from(buffer, pos + 1)[0]
        if length < 4:
            raise ValueError("malformed DataRow: a value runs past the end of the message")
        end = pos + 1 + length
        if end > size:
            break
        message = bytes(buffer[pos:end])
        rows.append((row_key(python_row_values(message[5:]), spec), message))
        pos = end
    return rows, pos


def row_key(values: list[bytes | None], spec: SortSpec) -> tuple[Any, ...]:
    """The sort key of one row's values (see python_keyed_rows)."""
    key: list[Any] = []
    for column, mode, read, nulls_first in spec:
        if column >= len(values):
            raise ValueError("malformed DataRow: a value runs past the end of the message")
        raw = values[column]
        if raw is None:
            key += (0 if nulls_first else 3, 0)
        elif mode in (KEY_INT, KEY_INT_DESC):
            value = int(raw)
            key += (1, -value if mode == KEY_INT_DESC else value)
        elif mode in (KEY_FLOAT, KEY_FLOAT_DESC):
            number = float(raw)
            if math.isnan(number):
                key += (2 if mode == KEY_FLOAT else 1, 0.0)
            elif mode == KEY_FLOAT_DESC:
                key += (2, -number)
            else:
                key += (1, number)
        else:
            key += (1, raw if mode == KEY_BYTES else read(raw))  # type: ignore[misc]
    return tuple(key)


try:  # the same in C (proxy/wire/_datarow.c), built by pip where a compiler is found
    from . import _datarow  # type: ignore[attr-defined]  # C, without a stub: Any to mypy
except ImportError:  # pragma: no cover - a machine without a compiler
    _datarow = None
row_values = _datarow.fields if _datarow is not None else python_row_values
keyed_rows = _datarow.keyed_rows if _datarow is not None else python_keyed_rows


def bind_parameters(rest: bytes) -> tuple[tuple[int, ...], tuple[bytes | None, ...]]:
    """A Bind's parameter format codes and values (``rest`` is what follows the two names)."""
    try:
        nformats = _I16.unpack_from(rest, 0)[0]
        pos = 2
        formats = struct.unpack_from(f"!{nformats}h", rest, pos) if nformats > 0 else ()
        pos += 2 * nformats
        count = _I16.unpack_from(rest, pos)[0]
        values, _ = counted_values(rest, pos + 2, count)
    except struct.error:
        raise ProtocolViolation("invalid Bind message: parameters run past its end") from None
    if nformats < 0 or count < 0 or (nformats > 1 and nformats != count):
        raise ProtocolViolation(f"bind message has {nformats} parameter formats but {count} parameters")
    return tuple(formats), tuple(values)


def bind_results(rest: bytes) -> tuple[bytes, tuple[int, ...]]:
    """A Bind's parameters (format codes and values, as they came) and its result format codes."""
    try:
        nformats = _I16.unpack_from(rest, 0)[0]
        pos = 2 + 2 * max(nformats, 0)
        count = _I16.unpack_from(rest, pos)[0]
        _, pos = counted_values(rest, pos + 2, count)
        nresults = _I16.unpack_from(rest, pos)[0]
        results = struct.unpack_from(f"!{nresults}h", rest, pos + 2) if nresults > 0 else ()
    except struct.error:
        raise ProtocolViolation("invalid Bind message: it ends before its result formats") from None
    if nformats < 0 or count < 0 or nresults < 0 or len(rest) != pos + 2 + 2 * nresults:
        raise ProtocolViolation("invalid Bind message: its counts do not match its length")
    if any(code not in (0, 1) for code in results):
        raise ProtocolViolation(f"unsupported format code: {max(results)}")
    return rest[:pos], tuple(results)


def decode_execute(body: bytes) -> tuple[str, int]:
    """Execute: (portal name, the most rows to return; 0 is all)."""
    portal, pos = _cstr(body, 0)
    if len(body) != pos + 4:
        raise ProtocolViolation("invalid Execute message: the row limit must follow the portal name")
    return portal, _I32.unpack_from(body, pos)[0]


def decode_target(body: bytes, what: str) -> tuple[int, str]:
    """Describe and Close: ``(b'S' or b'P' as int, name)``."""
    if len(body) < 2:
        raise ProtocolViolation(f"invalid {what} message: too short")
    kind = body[0]
    if kind not in (TARGET_STATEMENT, TARGET_PORTAL):
        raise ProtocolViolation(f"invalid {what} message subtype {chr(kind)!r}")
    name, end = _cstr(body, 1)
    if end != len(body):
        raise ProtocolViolation(f"invalid {what} message: trailing bytes")
    return kind, name


def decode_password(body: bytes) -> str:
    secret, end = _cstr(body, 0)
    if end != len(body):
        raise ProtocolViolation("invalid password message: trailing bytes")
    return secret


def decode_sasl_initial(body: bytes) -> tuple[str, bytes]:
    mechanism, pos = _cstr(body, 0)
    if len(body) < pos + 4:
        raise ProtocolViolation("invalid SASLInitialResponse: missing data length")
    length = _I32.unpack_from(body, pos)[0]
    data = body[pos + 4:]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ProtocolViolation("invalid SASLInitialResponse: data length does not match")
    return mechanism, data


def decode_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\0", pos + 1)
        if end < 0:
            break
        fields[code] = body[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = _cstr(body, 0)
    value, _ = _cstr(body, pos)
    return name, value


def decode_auth(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolViolation("invalid Authentication message")
    return _I32.unpack_from(body, 0)[0], body[4:]


def decode_backend_key(body: bytes) -> tuple[int, int]:
    pid, secret = _II.unpack_from(body, 0)
    return pid, secret


# ---------------------------------------------------------------------------------------------
# Builders


def split(data: bytes) -> list[tuple[int, bytes]]:
    """Whole backend messages, as (kind, body); a partial one at the end is left out."""
    out = []
    pos = 0
    n = len(data)
    while n - pos >= 5:
        end = pos + 1 + _I32.unpack_from(data, pos + 1)[0]
        if end > n:
            break
        out.append((data[pos], data[pos + 5:end]))
        pos = end
    return out


def message(kind: int, body: bytes = b"") -> bytes:
    return _HEAD.pack(bytes((kind,)), len(body) + 4) + body


def _c(s: str) -> bytes:
    return s.encode() + b"\0"


def error_response(sqlstate: str, text: str, *, severity: str = "ERROR", hint: str | None = None,
                   detail: str | None = None, kind: int = ERROR_RESPONSE) -> bytes:
    body = b"S" + _c(severity) + b"V" + _c(severity) + b"C" + _c(sqlstate) + b"M" + _c(text)
    if detail:
        body += b"D" + _c(detail)
    if hint:
        body += b"H" + _c(hint)
    return message(kind, body + b"\0")


def notice_response(sqlstate: str, text: str, severity: str = "NOTICE") -> bytes:
    return error_response(sqlstate, text, severity=severity, kind=NOTICE_RESPONSE)


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(AUTHENTICATION, _I32.pack(code) + data)


AUTHENTICATION_OK = authentication(AUTH_OK)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(_c(m) for m in mechanisms) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, _c(name) + _c(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(BACKEND_KEY_DATA, _II.pack(pid, secret))


# ReadyForQuery's transaction status, the one spelling of each (a byte, as it arrives).
TX_IDLE = ord("I")            # not in a transaction block
TX_IN_TRANSACTION = ord("T")  # in a transaction block
TX_FAILED = ord("E")          # in a failed transaction block: statements refused until it ends
READY_IDLE = message(READY_FOR_QUERY, b"I")
READY_IN_TRANSACTION = message(READY_FOR_QUERY, b"T")
READY_FAILED = message(READY_FOR_QUERY, b"E")
PARSE_COMPLETE_MSG = message(PARSE_COMPLETE)
CLOSE_COMPLETE_MSG = message(CLOSE_COMPLETE)
PORTAL_SUSPENDED_MSG = message(PORTAL_SUSPENDED)
BIND_COMPLETE_MSG = message(BIND_COMPLETE)
NO_DATA_MSG = message(NO_DATA)
SYNC_MSG = message(SYNC)
FLUSH_MSG = message(FLUSH)
TERMINATE_MSG = message(TERMINATE)
SSL_NO = b"N"
SSL_REQUEST_MSG = struct.pack("!II", 8, SSL_REQUEST)
SSL_YES = b"S"


def ready_for_query(status: int) -> bytes:
    return message(READY_FOR_QUERY, bytes((status,)))


COPY_DONE_MSG = b"c\0\0\0\4"


def copy_fail(reason: str) -> bytes:
    return message(COPY_FAIL, reason.encode() + b"\0")


def copy_in_response(columns: int) -> bytes:
    """CopyInResponse: textual rows (text or CSV), ``columns`` columns."""
    return message(COPY_IN_RESPONSE, struct.pack("!bh", 0, columns) + b"\0\0" * columns)


def command_complete(tag: str) -> bytes:
    return message(COMMAND_COMPLETE, _c(tag))


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(_c(k) + _c(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST) + _II.pack(pid, secret)


def password_message(secret: str) -> bytes:
    return message(PASSWORD, _c(secret))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(PASSWORD, _c(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(PASSWORD, data)


def query(sql: str) -> bytes:
    return message(QUERY, _c(sql))


def parse(name: str, sql: str, param_types: bytes = b"\0\0") -> bytes:
    return message(PARSE, _c(name) + _c(sql) + param_types)


def bind(portal: str, statement: str, rest: bytes) -> bytes:
    return message(BIND, _c(portal) + _c(statement) + rest)


def describe(kind: int, name: str) -> bytes:
    return message(DESCRIBE, bytes((kind,)) + _c(name))


def close(kind: int, name: str) -> bytes:
    return message(CLOSE, bytes((kind,)) + _c(name))


def execute(portal: str, max_rows: int = 0) -> bytes:
    return message(EXECUTE, _c(portal) + _I32.pack(max_rows))
