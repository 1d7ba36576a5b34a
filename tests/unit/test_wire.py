"""The wire layer (proxy/wire/messages.py): one table of messages and their exact bytes.

Every row is built by pgfleet's builder and compared with bytes written out by hand from the
protocol documentation; then the bytes are framed whole, byte by byte (``frame`` says None
until the message is complete) and with trailing bytes of the next message, and the body is
decoded back to the value. Bad bytes must raise ``ProtocolViolation`` (SQLSTATE 08P01) and
nothing else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ProtocolViolation
from proxy.wire import messages as m

MAX = 1 << 24


@dataclass(frozen=True)
class Row:
    name: str
    built: bytes                               # what pgfleet's builder produced
    wire: bytes                                # the same message written out by hand
    decode: Callable[[bytes], Any] | None      # decoder of the body, if pgfleet has one
    value: Any = None                          # what the decoder must return


def _decode_describe(body: bytes) -> Any:
    return m.decode_target(body, "Describe")


def _decode_close(body: bytes) -> Any:
    return m.decode_target(body, "Close")


ROWS = [
    Row("Query", m.query("select 1"), b"Q\x00\x00\x00\x0dselect 1\x00", m.decode_query, "select 1"),
    Row("Query empty", m.query(""), b"Q\x00\x00\x00\x05\x00", m.decode_query, ""),
    Row("Query utf-8", m.query("select 'é'"), b"Q\x00\x00\x00\x10select '\xc3\xa9'\x00",
        m.decode_query, "select 'é'"),
    Row("Parse named, one int4 param",
        m.parse("s1", "select $1", b"\x00\x01\x00\x00\x00\x17"),
        b"P\x00\x00\x00\x17s1\x00select $1\x00\x00\x01\x00\x00\x00\x17",
        m.decode_parse, m.Parse("s1", "select $1", b"\x00\x01\x00\x00\x00\x17")),
    Row("Parse unnamed, no types", m.parse("", "select 1"),
        b"P\x00\x00\x00\x10\x00select 1\x00\x00\x00",
        m.decode_parse, m.Parse("", "select 1", b"\x00\x00")),
    Row("Bind", m.bind("p", "s1", b"\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00"),
        b"B\x00\x00\x00\x15p\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00",
        m.decode_bind, m.Bind("p", "s1", b"\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")),
    Row("Describe statement", m.describe(ord("S"), "s1"), b"D\x00\x00\x00\x08Ss1\x00",
        _decode_describe, (0x53, "s1")),
    Row("Describe portal", m.describe(ord("P"), ""), b"D\x00\x00\x00\x06P\x00",
        _decode_describe, (0x50, "")),
    Row("Close statement", m.close(ord("S"), "stmt"), b"C\x00\x00\x00\x0aSstmt\x00",
        _decode_close, (0x53, "stmt")),
    Row("Close portal", m.close(ord("P"), ""), b"C\x00\x00\x00\x06P\x00", _decode_close, (0x50, "")),
    Row("PasswordMessage", m.password_message("pw"), b"p\x00\x00\x00\x07pw\x00", m.decode_password, "pw"),
    Row("SASLInitialResponse", m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc",
        m.decode_sasl_initial, ("SCRAM-SHA-256", b"n,,n=,r=abc")),
    Row("SASLInitialResponse without data (-1)", m.message(m.PASSWORD, b"SCRAM-SHA-256\x00\xff\xff\xff\xff"),
        b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\xff\xff\xff\xff",
        m.decode_sasl_initial, ("SCRAM-SHA-256", b"")),
    Row("SASLResponse", m.sasl_response(b"c=biws,r=x,p=y"), b"p\x00\x00\x00\x12c=biws,r=x,p=y", None),
    Row("Sync", m.SYNC_MSG, b"S\x00\x00\x00\x04", None),
    Row("Flush", m.FLUSH_MSG, b"H\x00\x00\x00\x04", None),
    Row("Terminate", m.TERMINATE_MSG, b"X\x00\x00\x00\x04", None),
    Row("ErrorResponse", m.error_response("42P01", "no such table"),
        b"E\x00\x00\x00\x29SERROR\x00VERROR\x00C42P01\x00Mno such table\x00\x00",
        m.decode_fields, {"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "no such table"}),
    Row("ErrorResponse FATAL with hint and detail",
        m.error_response("08P01", "bad", severity="FATAL", hint="h", detail="d"),
        b"E\x00\x00\x00\x25SFATAL\x00VFATAL\x00C08P01\x00Mbad\x00Dd\x00Hh\x00\x00",
        m.decode_fields, {"S": "FATAL", "V": "FATAL", "C": "08P01", "M": "bad", "D": "d", "H": "h"}),
    Row("ErrorResponse without SQLSTATE (decoded, not built)",
        m.message(m.ERROR_RESPONSE, b"SERROR\x00Mno code\x00\x00"),
        b"E\x00\x00\x00\x15SERROR\x00Mno code\x00\x00",
        m.decode_fields, {"S": "ERROR", "M": "no code"}),
    Row("NoticeResponse", m.notice_response("01000", "hi"),
        b"N\x00\x00\x00\x20SNOTICE\x00VNOTICE\x00C01000\x00Mhi\x00\x00",
        m.decode_fields, {"S": "NOTICE", "V": "NOTICE", "C": "01000", "M": "hi"}),
    Row("AuthenticationOk", m.AUTHENTICATION_OK, b"R\x00\x00\x00\x08\x00\x00\x00\x00", m.decode_auth, (0, b"")),
    Row("AuthenticationMD5Password", m.authentication(m.AUTH_MD5, b"salt"),
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt", m.decode_auth, (5, b"salt")),
    Row("AuthenticationCleartextPassword", m.authentication(m.AUTH_CLEARTEXT),
        b"R\x00\x00\x00\x08\x00\x00\x00\x03", m.decode_auth, (3, b"")),
    Row("AuthenticationSASL", m.auth_sasl(["SCRAM-SHA-256"]),
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00", m.decode_auth, (10, b"SCRAM-SHA-256\x00\x00")),
    Row("AuthenticationSASLContinue", m.authentication(m.AUTH_SASL_CONTINUE, b"r=1,s=2,i=4096"),
        b"R\x00\x00\x00\x16\x00\x00\x00\x0br=1,s=2,i=4096", m.decode_auth, (11, b"r=1,s=2,i=4096")),
    Row("ParameterStatus", m.parameter_status("TimeZone", "UTC"),
        b"S\x00\x00\x00\x11TimeZone\x00UTC\x00", m.decode_parameter_status, ("TimeZone", "UTC")),
    Row("BackendKeyData", m.backend_key_data(1234, -5),
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xff\xff\xff\xfb", m.decode_backend_key, (1234, -5)),
    Row("ReadyForQuery idle", m.READY_IDLE, b"Z\x00\x00\x00\x05I", None),
    Row("ReadyForQuery in transaction", m.ready_for_query(ord("T")), b"Z\x00\x00\x00\x05T", None),
    Row("ReadyForQuery failed", m.READY_FAILED, b"Z\x00\x00\x00\x05E", None),
    Row("ParseComplete", m.PARSE_COMPLETE_MSG, b"1\x00\x00\x00\x04", None),
    Row("CloseComplete", m.CLOSE_COMPLETE_MSG, b"3\x00\x00\x00\x04", None),
    Row("CommandComplete", m.command_complete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00", None),
]

NEXT = b"Z\x00\x00\x00\x05I"  # the start of the message that follows, for the trailing-bytes case


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_builder_gives_the_documented_bytes(row: Row) -> None:
    assert row.built == row.wire


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_frame_whole_message_and_decode(row: Row) -> None:
    found = m.frame(row.wire, 0, MAX)
    assert found == (row.wire[0], 5, len(row.wire))
    if row.decode is not None:
        assert row.decode(row.wire[5:]) == row.value


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_frame_byte_by_byte_is_none_until_complete(row: Row) -> None:
    buf = bytearray()
    for i, byte in enumerate(row.wire):
        assert m.frame(buf, 0, MAX) is None, f"framed after {i} of {len(row.wire)} bytes"
        buf.append(byte)
    assert m.frame(buf, 0, MAX) == (row.wire[0], 5, len(row.wire))
    # The same at an offset inside a larger buffer (a message after another one).
    prefix = m.SYNC_MSG
    buf = bytearray(prefix)
    for byte in row.wire:
        assert m.frame(buf, len(prefix), MAX) is None
        buf.append(byte)
    assert m.frame(buf, len(prefix), MAX) == (row.wire[0], len(prefix) + 5, len(prefix) + len(row.wire))


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_frame_with_trailing_bytes_stops_at_the_message_end(row: Row) -> None:
    for tail in (NEXT[:1], NEXT[:3], NEXT, NEXT + NEXT):
        data = row.wire + tail
        kind, start, end = m.frame(data, 0, MAX)  # type: ignore[misc]
        assert (kind, start, end) == (row.wire[0], 5, len(row.wire))
        if row.decode is not None:
            assert row.decode(data[start:end]) == row.value
    # and a memoryview / bytearray buffer frames the same
    assert m.frame(bytearray(row.wire + NEXT), 0, MAX) == (row.wire[0], 5, len(row.wire))
    assert m.frame(memoryview(row.wire + NEXT), 0, MAX) == (row.wire[0], 5, len(row.wire))


def test_frame_walks_a_run_of_messages() -> None:
    data = b"".join(r.wire for r in ROWS)
    pos, seen = 0, []
    while (found := m.frame(data, pos, MAX)) is not None:
        seen.append(data[pos:found[2]])
        pos = found[2]
    assert pos == len(data)
    assert seen == [r.wire for r in ROWS]


# ---------------------------------------------------------------------------------------------
# Frame: lengths that must be refused at once


@pytest.mark.parametrize("length", [0, 1, 3, 2**31, 2**32 - 1, MAX + 1])
def test_frame_refuses_impossible_lengths_without_waiting(length: int) -> None:
    head = b"Q" + struct.pack("!I", length)
    with pytest.raises(ProtocolViolation) as err:
        m.frame(head, 0, MAX)  # only the 5-byte header: refused before any body arrives
    assert err.value.sqlstate == "08P01"
    assert f"invalid message length {length}" in err.value.message


def test_frame_accepts_exactly_max_size_and_waits_for_it() -> None:
    head = b"d" + struct.pack("!I", 1000)
    assert m.frame(head, 0, 1000) is None
    assert m.frame(head + b"x" * 996, 0, 1000) == (ord("d"), 5, 1001)
    with pytest.raises(ProtocolViolation):
        m.frame(head, 0, 999)


def test_two_gigabyte_length_is_refused() -> None:
    with pytest.raises(ProtocolViolation) as err:
        m.frame(b"Q\x80\x00\x00\x00select 1", 0, 256 * 1024 * 1024)
    assert err.value.sqlstate == "08P01"


# ---------------------------------------------------------------------------------------------
# The first message of a connection


STARTUP = (b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00alice\x00database\x00app\x00\x00")
FIRST_ROWS = [
    ("StartupMessage", m.startup_message({"user": "alice", "database": "app"}), STARTUP,
     m.StartupMessage({"user": "alice", "database": "app"})),
    ("StartupMessage with options",
     m.startup_message({"user": "u", "options": "-c search_path=x"}),
     b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00u\x00options\x00-c search_path=x\x00\x00",
     m.StartupMessage({"user": "u", "options": "-c search_path=x"})),
    ("SSLRequest", None, b"\x00\x00\x00\x08\x04\xd2\x16\x2f", m.SSLRequest()),
    ("GSSENCRequest", None, b"\x00\x00\x00\x08\x04\xd2\x16\x30", m.GSSEncRequest()),
    ("CancelRequest", m.cancel_request(77, -2), b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x4d\xff\xff\xff\xfe",
     m.CancelRequest(77, -2)),
    ("StartupMessage protocol 3.2", None,
     b"\x00\x00\x00\x10\x00\x03\x00\x02user\x00u\x00\x00", m.StartupMessage({"user": "u"})),
]


@pytest.mark.parametrize("name,built,wire,value", FIRST_ROWS, ids=[r[0] for r in FIRST_ROWS])
def test_parse_first(name: str, built: bytes | None, wire: bytes, value: Any) -> None:
    if built is not None:
        assert built == wire
    assert m.parse_first(wire) == (value, len(wire))
    buf = bytearray()
    for byte in wire:
        assert m.parse_first(buf) is None
        buf.append(byte)
    assert m.parse_first(buf) == (value, len(wire))
    # trailing bytes (a client that pipelines its first typed message) are not consumed
    assert m.parse_first(wire + m.query("select 1")) == (value, len(wire))


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 2**31, 2**32 - 1])
def test_parse_first_refuses_bad_startup_lengths(length: int) -> None:
    with pytest.raises(ProtocolViolation) as err:
        m.parse_first(struct.pack("!II", length, m.PROTOCOL_V3))
    assert err.value.sqlstate == "08P01"
    assert "invalid startup packet length" in err.value.message


def test_parse_first_accepts_the_maximum_startup_length() -> None:
    filler = "x" * (m.MAX_STARTUP - 8 - len("user\0u\0a\0\0\0"))
    packet = m.startup_message({"user": "u", "a": filler})
    assert len(packet) == m.MAX_STARTUP
    assert m.parse_first(packet) == (m.StartupMessage({"user": "u", "a": filler}), m.MAX_STARTUP)


@pytest.mark.parametrize("code,shown", [(0x00020000, "2.0"), (0x00040000, "4.0"), (0x04D2162D, "1234.5677"),
                                        (0, "0.0")])
def test_parse_first_refuses_unsupported_protocols(code: int, shown: str) -> None:
    body = struct.pack("!I", code) + b"user\x00u\x00\x00"
    with pytest.raises(ProtocolViolation) as err:
        m.parse_first(struct.pack("!I", len(body) + 4) + body)
    assert err.value.sqlstate == "08P01"
    assert f"unsupported frontend protocol {shown}" in err.value.message


@pytest.mark.parametrize("body,reason", [
    (b"user\x00u\x00", "expected terminator"),              # no final empty name
    (b"user\x00u", "has no value"),                         # value not terminated
    (b"user\x00", "has no value"),                          # a name with no value
    (b"user\x00u\x00\x00junk", "bytes after the terminator"),
    (b"user\x00\xff\xfe\x00\x00", "UTF-8"),
    (b"", "expected terminator"),
])
def test_parse_first_refuses_bad_startup_layouts(body: bytes, reason: str) -> None:
    payload = struct.pack("!I", m.PROTOCOL_V3) + body
    with pytest.raises(ProtocolViolation) as err:
        m.parse_first(struct.pack("!I", len(payload) + 4) + payload)
    assert err.value.sqlstate == "08P01"
    assert reason in err.value.message


def test_ssl_and_cancel_codes_with_wrong_lengths_are_not_taken_for_what_they_claim() -> None:
    # An SSLRequest must be exactly 8 bytes, a CancelRequest exactly 16.
    with pytest.raises(ProtocolViolation):
        m.parse_first(b"\x00\x00\x00\x0c\x04\xd2\x16\x2f\x00\x00\x00\x00")
    with pytest.raises(ProtocolViolation):
        m.parse_first(b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\x00\x00\x00\x01")


# ---------------------------------------------------------------------------------------------
# Decoders on bad bodies


@pytest.mark.parametrize("decode,body,reason", [
    (m.decode_query, b"select 1", "unterminated string"),
    (m.decode_query, b"select 1\x00x", "trailing bytes"),
    (m.decode_query, b"select '\xff'\x00", "UTF-8"),
    (m.decode_parse, b"s1\x00select 1", "unterminated string"),
    (m.decode_parse, b"s1", "unterminated string"),
    (m.decode_parse, b"s1\x00select 1\x00", "missing parameter type count"),
    (m.decode_parse, b"s1\x00select 1\x00\x00", "missing parameter type count"),
    (m.decode_parse, b"\x00select $1\x00\x00\x02\x00\x00\x00\x17", "count does not match"),
    (m.decode_parse, b"\x00select $1\x00\x00\x01\x00\x00\x00\x17\x00", "count does not match"),
    (m.decode_parse, b"\x00select $1\x00\x00\x00\x00\x00\x00\x17", "count does not match"),
    (m.decode_parse, b"\x00select $1\x00\xff\xff", "count does not match"),
    (m.decode_bind, b"portal", "unterminated string"),
    (m.decode_bind, b"portal\x00stmt", "unterminated string"),
    (_decode_describe, b"Xs1\x00", "subtype 'X'"),
    (_decode_describe, b"s\x00", "subtype 's'"),
    (_decode_describe, b"S", "too short"),
    (_decode_describe, b"", "too short"),
    (_decode_describe, b"Ss1", "unterminated string"),
    (_decode_describe, b"Ss1\x00\x00", "trailing bytes"),
    (_decode_close, b"Qname\x00", "invalid Close message subtype"),
    (m.decode_password, b"secret", "unterminated string"),
    (m.decode_password, b"secret\x00more", "trailing bytes"),
    (m.decode_sasl_initial, b"SCRAM-SHA-256", "unterminated string"),
    (m.decode_sasl_initial, b"SCRAM-SHA-256\x00\x00\x00", "missing data length"),
    (m.decode_sasl_initial, b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc", "length does not match"),
    (m.decode_sasl_initial, b"SCRAM-SHA-256\x00\x00\x00\x00\x01abc", "length does not match"),
    (m.decode_sasl_initial, b"SCRAM-SHA-256\x00\x7f\xff\xff\xffabc", "length does not match"),
    (m.decode_sasl_initial, b"SCRAM-SHA-256\x00\xff\xff\xff\xfeabc", "length does not match"),
    (m.decode_parameter_status, b"TimeZone\x00UTC", "unterminated string"),
    (m.decode_auth, b"\x00\x00", "invalid Authentication message"),
])
def test_decoders_refuse_bad_bodies(decode: Callable[[bytes], Any], body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation) as err:
        decode(body)
    assert err.value.sqlstate == "08P01"
    assert reason in err.value.message


def test_decode_fields_tolerates_what_a_server_may_send() -> None:
    # Unterminated last field: the complete fields are kept, nothing is raised.
    assert m.decode_fields(b"SERROR\x00C42P01\x00Mhalf") == {"S": "ERROR", "C": "42P01"}
    assert m.decode_fields(b"") == {}
    assert m.decode_fields(b"\x00") == {}
    # Non-UTF-8 text is replaced, not raised: a backend's message must never crash pgfleet.
    assert m.decode_fields(b"SERROR\x00M\xff\x00\x00") == {"S": "ERROR", "M": "\ufffd"}


def test_bind_parameters_reads_formats_values_and_nulls() -> None:
    rest = struct.pack("!hh", 1, 1) + struct.pack("!h", 2) + struct.pack("!i", 2) + b"42" + struct.pack("!i", -1)
    assert m.bind_parameters(rest + b"\0\0") == ((1,), (b"42", None))


@pytest.mark.parametrize("rest", [
    b"",                                                          # no format count
    struct.pack("!hh", 0, 1) + struct.pack("!i", 10) + b"abc",    # a value past the end
    struct.pack("!hhh", 2, 0, 0) + struct.pack("!h", 3),          # two formats, three values
    struct.pack("!h", -1),                                        # a negative count
])
def test_bind_parameters_refuses_malformed_parameter_parts(rest: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.bind_parameters(rest)


def test_execute_round_trip_and_malformed() -> None:
    assert m.decode_execute(m.execute("p1", 7)[5:]) == ("p1", 7)
    assert m.decode_execute(m.execute("")[5:]) == ("", 0)
    for body in (b"p1\0\0\0", b"p1", b"p1\0\0\0\0\0\0"):
        with pytest.raises(ProtocolViolation):
            m.decode_execute(body)


@given(st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=12))
def test_row_values_in_c_and_python_agree(values: list[bytes | None]) -> None:
    body = struct.pack("!h", len(values)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values)
    assert m.python_row_values(body) == values
    assert m.row_values(body) == values
    for cut in range(len(body)):  # every truncation is an error in both, never a short row
        with pytest.raises(ValueError):
            m.row_values(body[:cut])
        with pytest.raises(ValueError):
            m.python_row_values(body[:cut])


def test_row_values_is_the_c_one() -> None:
    from proxy.wire import _datarow
    assert m.row_values is _datarow.fields


def _data_row(values: list[bytes | None]) -> bytes:
    return m.message(m.DATA_ROW, struct.pack("!h", len(values)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values))


_INTS = st.integers(-(2**63), 2**63 - 1).map(lambda i: str(i).encode())
_FLOATS = st.one_of(st.floats(allow_nan=True).map(
    lambda f: b"NaN" if math.isnan(f) else b"Infinity" if f == float("inf") else b"-Infinity" if f == -float("inf")
    else repr(f).encode()), st.sampled_from([b"-0", b"1e+300", b"4.9e-324"]))
_KEY_ROWS = st.lists(st.tuples(st.one_of(st.none(), _INTS), st.one_of(st.none(), _FLOATS),
                               st.one_of(st.none(), st.binary(max_size=8))), max_size=8)


@given(_KEY_ROWS, st.lists(st.tuples(st.sampled_from(range(3)), st.booleans(), st.booleans(), st.booleans()),
                           min_size=1, max_size=4))
def test_keyed_rows_in_c_and_python_agree(rows: list[tuple[bytes | None, ...]],
                                          keys: list[tuple[int, bool, bool, bool]]) -> None:
    modes = {0: (m.KEY_INT, m.KEY_INT_DESC), 1: (m.KEY_FLOAT, m.KEY_FLOAT_DESC), 2: (m.KEY_BYTES, m.KEY_CALL)}
    spec = tuple((column, modes[column][descending], bytes.upper if column == 2 and descending else None,
                  nulls_first) for column, descending, nulls_first, _ in keys)
    data = b"".join(_data_row(list(row)) for row in rows)
    tail = m.command_complete("SELECT 1")
    for buffer in (data, bytearray(data + tail), data + _data_row([b"1"])[:-1]):
        python = m.python_keyed_rows(buffer, 0, spec)
        assert m.keyed_rows(buffer, 0, spec) == python
        assert python[1] == len(data)
        assert [message for _, message in python[0]] == [_data_row(list(row)) for row in rows]


def test_keyed_rows_order_is_postgresql_order() -> None:
    """NULLs first or last, NaN above every float, DESC reversed: sorting by the key gives
    what ORDER BY gives."""
    floats = [b"1.5", None, b"NaN", b"-Infinity", b"Infinity", b"-2", b"0"]
    data = b"".join(_data_row([b"7", f]) for f in floats)
    for keyed in (m.keyed_rows, m.python_keyed_rows):
        def order(mode: int, nulls_first: bool) -> list[bytes | None]:
            rows, _ = keyed(data, 0, ((1, mode, None, nulls_first),))  # noqa: B023
            return [m.row_values(message[5:])[1] for _, message in sorted(rows, key=lambda r: r[0])]
        assert order(m.KEY_FLOAT, False) == [b"-Infinity", b"-2", b"0", b"1.5", b"Infinity", b"NaN", None]
        assert order(m.KEY_FLOAT, True) == [None, b"-Infinity", b"-2", b"0", b"1.5", b"Infinity", b"NaN"]
        assert order(m.KEY_FLOAT_DESC, True) == [None, b"NaN", b"Infinity", b"1.5", b"0", b"-2", b"-Infinity"]
        assert order(m.KEY_FLOAT_DESC, False) == [b"NaN", b"Infinity", b"1.5", b"0", b"-2", b"-Infinity", None]
        ints = b"".join(_data_row([i]) for i in (b"3", None, b"-9223372036854775808", b"10"))
        rows, _ = keyed(ints, 0, ((0, m.KEY_INT_DESC, None, False),))
        assert [m.row_values(msg[5:])[0] for _, msg in sorted(rows, key=lambda r: r[0])] == [
            b"10", b"3", b"-9223372036854775808", None]


@pytest.mark.parametrize("message", [
    m.message(m.DATA_ROW, b"\0\1\0\0\0\x09ab"),           # a value past the end
    m.message(m.DATA_ROW, b"\0\0"),                          # no column 0
    m.message(m.DATA_ROW, b"\0"),                             # no column count
    b"D\0\0\0\x02",                                          # a length under 4
    m.message(m.DATA_ROW, b"\0\1\0\0\0\x03x1y"),          # not a number
    m.message(m.DATA_ROW, b"\0\1\0\0\0\0"),               # an empty number
])
def test_keyed_rows_refuses_malformed_rows_in_c_and_python(message: bytes) -> None:
    for keyed in (m.keyed_rows, m.python_keyed_rows):
        with pytest.raises(ValueError):
            keyed(message, 0, ((0, m.KEY_INT, None, False),))


def test_keyed_rows_is_the_c_one() -> None:
    from proxy.wire import _datarow
    assert m.keyed_rows is _datarow.keyed_rows


def test_split_gives_whole_messages_and_leaves_a_partial_one_out() -> None:
    data = m.command_complete("SELECT 1") + m.ready_for_query(73)
    assert m.split(data) == [(m.COMMAND_COMPLETE, b"SELECT 1\0"), (m.READY_FOR_QUERY, b"I")]
    assert m.split(data + m.command_complete("X")[:6]) == m.split(data)
