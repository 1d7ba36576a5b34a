"""Protocol tier: login, the simple query protocol, and bad input — bytes in, bytes out.

Each case is a table row: what the client sends, what each scripted backend receives and
answers, what the client gets (see harness.py). The expected answers are PostgreSQL's own.
No sockets: the autouse fixture makes every way to one fail, and checks none was tried.
"""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest

from proxy.wire import messages as m
from tests.protocol.session.harness import (
    CLIENT_PARAMS,
    SERVER_PARAMS,
    Answer,
    AnswerChunks,
    Authenticate,
    Backend,
    Bind,
    Case,
    Closed,
    CommandComplete,
    DataRow,
    Describe,
    EmptyQueryResponse,
    Err,
    ErrorResponse,
    Execute,
    Fatal,
    Got,
    GotRaw,
    Kind,
    Login,
    NoticeResponse,
    Opened,
    ParameterStatus,
    Query,
    ReadyForQuery,
    RowDescription,
    Send,
    SendChunks,
    ServerClosed,
    Startup,
    Sync,
    Terminate,
    forbid_sockets,
    result,
    run_case,
    settings_replay,
)

ONE = result(["?column?"], [["1"]])
TWO = result(["?column?"], [["2"]])
PARAMS = [ParameterStatus(name, value) for name, value in SERVER_PARAMS if name != "application_name"]


def _len(kind: bytes, length: int, body: bytes = b"") -> bytes:
    """A typed message with a made-up length field."""
    return kind + length.to_bytes(4, "big") + body


REFUSED_BIND = ("B", "", "pgfleet_refused_statement")
REFUSED_ERROR = ErrorResponse("26000", 'prepared statement "pgfleet_refused_statement" does not exist')
def startup_version(major: int, minor: int, **params: str) -> bytes:
    """A startup packet asking for protocol ``major.minor``."""
    packet = Startup(**params)
    return packet[:4] + bytes((0, major, 0, minor)) + packet[8:]


BIG_ROWS = [DataRow(str(i), "x" * 300) for i in range(40)]
BIG = RowDescription(("id", 23), "pad") + b"".join(BIG_ROWS) + CommandComplete("SELECT 40") + ReadyForQuery("I")


def _cut(data: bytes, *at: int) -> list[bytes]:
    points = [0, *at, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


CASES = [
    # ------------------------------------------------------------------ login
    Case("login_reports_server_parameters",
         # pgfleet's backends carry application_name "pgfleet"; the client is told its own ('').
         Login(want=[("R", 0), *[ParameterStatus(n, v) for n, v in CLIENT_PARAMS], Kind("K"), ReadyForQuery("I")])),
    Case("login_startup_settings_replayed_on_the_backend",
         Authenticate(application_name="psql", DateStyle="German"),
         Got(("R", 0)),
         Backend("primary", settings_replay(application_name="psql", datestyle="German")),
         Answer("primary", RowDescription(), CommandComplete("SELECT 0"),
                ParameterStatus("application_name", "psql"), ParameterStatus("DateStyle", "German, DMY"),
                ReadyForQuery("I")),
         Got(*[ParameterStatus(n, {"application_name": "psql", "DateStyle": "German, DMY"}.get(n, v))
               for n, v in SERVER_PARAMS], Kind("K"), ReadyForQuery("I"))),
    Case("login_bad_startup_option",
         Authenticate(options="-c no_such_setting=1"),
         Got(("R", 0)),
         Backend("primary", settings_replay(no_such_setting="1")),
         Answer("primary", ErrorResponse("42704", 'unrecognized configuration parameter "no_such_setting"'),
                ReadyForQuery("I")),
         Got(Fatal("42704", 'unrecognized configuration parameter "no_such_setting"')),
         Closed()),
    Case("login_wrong_password",
         Login(secret="not-the-secret",
               want=[Fatal("28P01", 'password authentication failed for user "pf_server"')]),
         Closed(), Opened()),
    Case("login_unknown_key",
         Login(key="pf_nobody", secret="x", want=[Fatal("28P01", 'password authentication failed for user "pf_nobody"')]),
         Closed()),
    Case("login_unknown_database",
         Login(database="nope", want=[Fatal("3D000", 'database "nope" does not exist')]),
         Closed(), Opened()),
    Case("login_without_user",
         Send(Startup(database="app")),
         Got(Fatal("28000", "no PostgreSQL user name specified in startup packet")),
         Closed()),
    Case("login_client_key_may_not_name_a_database",
         Login(key="pf_client", database="secondary", want=[Fatal("42501")]),
         Closed()),
    Case("login_ssl_request_refused_then_startup",
         Send(m.SSL_REQUEST_MSG),
         GotRaw(b"N"),
         Send(Startup(user="pf_server", database="app")),
         Got(("R", 10, b"SCRAM-SHA-256\0\0")),
         Closed(closed=False)),
    Case("login_gssenc_request_refused",
         Send(b"\0\0\0\x08\x04\xd2\x16\x30"),
         GotRaw(b"N"),
         Closed(closed=False)),
    Case("login_startup_packet_too_short",
         Send(b"\0\0\0\x04\0\x03\0\0"),
         Got(Fatal("08P01")),
         Closed()),
    Case("login_startup_packet_too_long",
         Send(b"\0\x01\0\0\0\x03\0\0"),
         Got(Fatal("08P01")),
         Closed()),
    Case("login_startup_without_terminator",
         Send(b"\0\0\0\x0d\0\x03\0\0user\0"),
         Got(Fatal("08P01", "invalid startup packet layout")),
         Closed()),
    Case("login_unsupported_protocol_version",
         Send(startup_version(2, 0, user="pf_server", database="app")),
         Got(Fatal("0A000", "unsupported frontend protocol 2.0")),
         Closed(),
         bug="protocol 2.0 is refused with SQLSTATE 08P01; PostgreSQL says 0A000 "
             "(unsupported frontend protocol 2.0: server supports 3.0 to 3.0)"),
    Case("login_protocol_3_2_negotiated_down",
         Send(startup_version(3, 2, user="pf_server", database="app")),
         Got(("v", 0), ("R", 10, b"SCRAM-SHA-256\0\0")),
         bug="a startup packet asking for protocol 3.2 gets no NegotiateProtocolVersion; PostgreSQL 16 "
             "answers NegotiateProtocolVersion (newest minor 0) before authenticating"),
    Case("login_query_instead_of_sasl_response",
         Send(Startup(user="pf_server", database="app")),
         Got(("R", 10, b"SCRAM-SHA-256\0\0")),
         Send(Query("select 1")),
         Got(Fatal("08P01")),
         Closed(), Opened()),
    Case("login_bad_sasl_mechanism",
         Send(Startup(user="pf_server", database="app")),
         Got(("R", 10, b"SCRAM-SHA-256\0\0")),
         Send(m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc")),
         Got(Fatal("08P01")),
         Closed()),
    Case("login_md5",
         Login(want=[("R", 0), *[ParameterStatus(n, v) for n, v in CLIENT_PARAMS], Kind("K"), ReadyForQuery("I")]),
         config={"listen": {"auth": "md5"}}),

    # ------------------------------------------------------------------ simple query
    Case("simple_select",
         Login(),
         Send(Query("select 1")),
         Backend("primary", ("Q", "select 1")),
         Got(),
         Answer("primary", ONE),
         Got(ONE)),
    Case("simple_several_statements_in_one_string",
         Login(),
         Send(Query("select 1; select 2")),
         Backend("primary", ("Q", "select 1; select 2")),
         Answer("primary", ONE[:-6], TWO),
         Got(ONE[:-6], TWO)),
    Case("simple_empty_query",
         Login(),
         Send(Query("")),
         Backend("primary", ("Q", "")),
         Answer("primary", EmptyQueryResponse(), ReadyForQuery("I")),
         Got(("I",), ("Z", "I"))),
    Case("simple_error",
         Login(),
         Send(Query("select nope")),
         Backend("primary", ("Q", "select nope")),
         Answer("primary", ErrorResponse("42703", 'column "nope" does not exist'), ReadyForQuery("I")),
         Got(("E", "ERROR", "42703", 'column "nope" does not exist'), ("Z", "I")),
         Send(Query("select 1")),
         Backend("primary", ("Q", "select 1")),
         Answer("primary", ONE),
         Got(ONE)),
    Case("simple_notice_passes_through",
         Login(),
         Send(Query("do $$ begin raise notice 'hello'; end $$")),
         Backend("primary", ("Q", "do $$ begin raise notice 'hello'; end $$")),
         Answer("primary", NoticeResponse("hello"), CommandComplete("DO"), ReadyForQuery("I")),
         Got(("N", "NOTICE", "00000", "hello"), ("C", "DO"), ("Z", "I"))),
    Case("simple_parameter_status_passes_through",
         Login(),
         Send(Query("set application_name = 'reports'")),
         Backend("primary", ("Q", "set application_name = 'reports'")),
         Answer("primary", CommandComplete("SET"), ParameterStatus("application_name", "reports"),
                ReadyForQuery("I")),
         Got(("C", "SET"), ("S", "application_name", "reports"), ("Z", "I"))),
    Case("simple_long_result_in_chunks",
         Login(),
         Send(Query("select id, pad from generate_series(0, 39) id, repeat('x', 300) pad")),
         Backend("primary", ("Q", "select id, pad from generate_series(0, 39) id, repeat('x', 300) pad")),
         # Cut inside a header, inside a DataRow, between messages, inside CommandComplete.
         AnswerChunks("primary", *_cut(BIG, 3, 40, 700, 3000, 6000, len(BIG) - 12, len(BIG) - 3)),
         Got(BIG)),
    Case("simple_result_one_byte_at_a_time",
         Login(),
         Send(Query("select 1")),
         Backend("primary", ("Q", "select 1")),
         AnswerChunks("primary", *[ONE[i:i + 1] for i in range(len(ONE))]),
         Got(ONE)),
    Case("simple_query_split_across_reads",
         Login(),
         SendChunks(Query("select 1")[:7], Query("select 1")[7:]),
         Backend("primary", ("Q", "select 1")),
         Answer("primary", ONE),
         Got(ONE)),
    Case("simple_query_byte_by_byte",
         Login(),
         SendChunks(*[bytes([b]) for b in Query("select 1") + Query("select 2")]),
         Backend("primary", ("Q", "select 1"), ("Q", "select 2")),
         Answer("primary", ONE, TWO),
         Got(ONE, TWO)),
    Case("simple_two_queries_in_one_read",
         Login(),
         Send(Query("select 1"), Query("select 2")),
         Backend("primary", ("Q", "select 1"), ("Q", "select 2")),
         Answer("primary", ONE),
         Got(ONE),
         Answer("primary", TWO),
         Got(TWO)),
    Case("simple_terminate_closes_and_keeps_backend",
         Login(),
         Send(Terminate()),
         Got(), Closed(),
         ServerClosed("primary", closed=False)),

    # ------------------------------------------------------------------ garbage
    Case("garbage_unknown_message_type",
         Login(),
         Send(_len(b"z", 4)),
         Got(Fatal("08P01", "invalid frontend message type 122")),
         Closed()),
    Case("garbage_absurd_length",
         Login(),
         Send(_len(b"Q", 0x7FFFFFF0, b"select 1\0")),
         Got(Fatal("08P01", "invalid message length")),
         Closed()),
    Case("garbage_length_below_four",
         Login(),
         Send(_len(b"Q", 2)),
         Got(Fatal("08P01", "invalid message length")),
         Closed()),
    Case("garbage_query_without_terminator",
         Login(),
         Send(_len(b"Q", 12, b"select 1"), Query("select 1")),
         Got(Err("08P01", "invalid string in message"), ("Z", "I")),
         Closed(closed=False),
         strict_end=False,
         bug="a Query whose text lacks its terminating zero closes the connection (FATAL); PostgreSQL "
             "answers ERROR 08P01 invalid string in message, then ReadyForQuery, and goes on"),
    Case("garbage_truncated_then_rest_later",
         Login(),
         Send(Query("select 1")[:4]),
         Got(), Closed(closed=False),
         Send(Query("select 1")[4:]),
         Backend("primary", ("Q", "select 1")),
         Answer("primary", ONE),
         Got(ONE)),
    Case("garbage_bind_missing_statement",
         Login(),
         Send(Bind("", "nope"), Execute(), Sync()),
         # pgfleet fails a statement on the backend in place of the refused one (so that a
         # transaction there fails as PostgreSQL's would) and answers with its own error.
         Backend("primary", REFUSED_BIND, ("S",)),
         Answer("primary", REFUSED_ERROR, ReadyForQuery("I")),
         Got(Err("26000", 'prepared statement "nope" does not exist'), ("Z", "I"))),
    Case("garbage_execute_missing_portal",
         Login(),
         Send(Execute("nope"), Sync()),
         Backend("primary", ("E", "nope", 0), ("S",)),
         Answer("primary", ErrorResponse("34000", 'portal "nope" does not exist'), ReadyForQuery("I")),
         Got(("E", "ERROR", "34000", 'portal "nope" does not exist'), ("Z", "I"))),
    Case("garbage_describe_missing_statement",
         Login(),
         Send(Describe("S", "nope"), Sync()),
         Backend("primary", REFUSED_BIND, ("S",)),
         Answer("primary", REFUSED_ERROR, ReadyForQuery("I")),
         Got(Err("26000", 'prepared statement "nope" does not exist'), ("Z", "I"))),
    Case("garbage_describe_bad_subtype",
         Login(),
         Send(_len(b"D", 7, b"X\0"), Sync()),
         Got(Err("08P01", "invalid DESCRIBE message subtype 88"), ("Z", "I")),
         Closed(closed=False),
         strict_end=False,
         bug="a Describe with an unknown subtype closes the connection (FATAL); PostgreSQL answers "
             "ERROR 08P01 invalid DESCRIBE message subtype 88, skips to Sync and goes on"),
    Case("garbage_message_during_copy_free_state",
         Login(),
         Send(m.COPY_DONE_MSG, Query("select 1")),
         # PostgreSQL ignores CopyDone outside COPY; pgfleet may pass it on for the backend to ignore.
         Backend("primary", ("c",), ("Q", "select 1")),
         Answer("primary", ONE),
         Got(ONE)),
    Case("garbage_unknown_message_before_startup_completes",
         Send(Startup(user="pf_server", database="app")),
         Got(("R", 10, b"SCRAM-SHA-256\0\0")),
         Send(_len(b"z", 4)),
         Got(Fatal("08P01")),
         Closed()),
]


@pytest.mark.parametrize("case", [case.param() for case in CASES])
async def test_session(case: Case) -> None:
    await run_case(case)


async def test_the_tier_cannot_open_a_socket() -> None:
    """The guard every module of the tier runs under: any way to a socket fails, and is seen."""
    async with forbid_sockets() as attempts:
        with pytest.raises(OSError):
            socket.socket()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 5432))
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", 5432)
        with pytest.raises(OSError):
            await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", 5432)
    assert len(attempts) == 4, attempts
