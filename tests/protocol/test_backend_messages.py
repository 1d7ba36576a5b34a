"""Backend messages real PostgreSQL never sends, fed as bytes into a ServerConnection.

PostgreSQL always puts a SQLSTATE (``C``) in an ErrorResponse, so a backend that leaves it out
(a proxy or a foreign server in between) cannot be produced with the real server. These tests
feed the bytes of such messages to the wire decoder and to ``ServerConnection`` (no socket:
the connection's protocol methods are called directly) and check that pgfleet answers with a
``BackendError`` carrying a real SQLSTATE, or forwards the message untouched, and never
crashes.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import DROP_QUERY, FORWARD_QUERY
from proxy.config import Dsn
from proxy.errors import BackendError
from proxy.wire import messages as m

NO_SQLSTATE = m.message(m.ERROR_RESPONSE, b"SFATAL\x00VFATAL\x00Mtoo many connections for role\x00\x00")
NO_FIELDS = m.message(m.ERROR_RESPONSE, b"\x00")


def server() -> ServerConnection:
    dsn = Dsn(host="127.0.0.1", port=1, user="pf_user", password=None, dbname="bank")
    return ServerConnection("primary", dsn, {}, 0)


class Link:
    """Stands for the client side of a linked backend; records what reaches the client."""

    def __init__(self) -> None:
        self.written = b""
        self.idle = 0
        self.lost: list[BackendError] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def backend_idle(self, server: ServerConnection) -> None:
        self.idle += 1

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        self.lost.append(error)



def test_decode_fields_of_an_error_without_sqlstate() -> None:
    fields = m.decode_fields(NO_SQLSTATE[5:])
    assert "C" not in fields
    assert fields == {"S": "FATAL", "V": "FATAL", "M": "too many connections for role"}


@pytest.mark.parametrize("raw,text", [(NO_SQLSTATE, "too many connections for role"), (NO_FIELDS, "no message")])
def test_login_error_without_sqlstate_is_a_backend_error_08006(raw: bytes, text: str) -> None:
    conn = server()
    with pytest.raises(BackendError) as err:
        conn._login_message(m.ERROR_RESPONSE, raw[5:])
    assert err.value.sqlstate == "08006"
    assert "primary" in err.value.message and text in err.value.message


async def feed_login(reply: bytes) -> BackendError:
    """Open a ServerConnection to a socket that answers the startup packet with ``reply``."""
    got_startup = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(head, "big") - 4)
        got_startup.set()
        for i in range(len(reply)):  # byte by byte, so framing across reads is exercised
            writer.write(reply[i:i + 1])
            await writer.drain()
        try:
            if reply:
                await reader.read()  # until pgfleet closes
        finally:
            writer.close()

    listener = await asyncio.start_server(backend, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    # sslmode=disable: this fake server answers the startup packet, not a TLS request
    conn = ServerConnection("primary", Dsn(host="127.0.0.1", port=port, user="pf_user", password=None,
                                           dbname="bank", options=(("sslmode", "disable"),)), {}, 0)
    try:
        with pytest.raises(BackendError) as err:
            await conn.open(5)
        assert got_startup.is_set()
        assert conn.closed
    finally:
        listener.close()
        await listener.wait_closed()
    return err.value


async def test_login_error_without_sqlstate_fails_the_login() -> None:
    error = await feed_login(m.AUTHENTICATION_OK + NO_SQLSTATE)
    assert error.sqlstate == "08006"
    assert "too many connections for role" in error.message


async def test_login_error_without_any_field_fails_the_login() -> None:
    error = await feed_login(NO_FIELDS)
    assert error.sqlstate == "08006"


async def test_backend_closing_during_login_fails_the_login() -> None:
    error = await feed_login(b"")
    assert error.sqlstate == "08006"


async def test_malformed_backend_login_message_is_a_backend_error() -> None:
    conn = server()
    conn._ready = asyncio.get_running_loop().create_future()
    conn.data_received(m.message(m.AUTHENTICATION, b"\x00\x00"))  # an Authentication too short to read
    error = conn._ready.exception()
    assert isinstance(error, BackendError)
    assert error.sqlstate == "08P01"
    assert "primary" in error.message


async def test_absurd_length_from_a_backend_during_login_is_a_backend_error() -> None:
    conn = server()
    conn._ready = asyncio.get_running_loop().create_future()
    conn.data_received(b"R\x7f\xff\xff\xff")
    error = conn._ready.exception()
    assert isinstance(error, BackendError)
    assert error.sqlstate == "08P01"


async def test_error_without_sqlstate_after_login_is_forwarded_untouched() -> None:
    conn = server()
    conn._ready = asyncio.get_running_loop().create_future()
    conn._ready.set_result(None)
    link = Link()
    conn.attach(link, link.write)
    conn.push(FORWARD_QUERY)
    reply = m.message(m.ERROR_RESPONSE, b"SERROR\x00Mno code here\x00\x00") + m.READY_IDLE
    conn.data_received(reply)
    assert link.written == reply
    assert link.idle == 1
    assert not conn.busy


async def test_error_without_sqlstate_to_an_injected_statement_is_recorded_not_forwarded() -> None:
    conn = server()
    conn._ready = asyncio.get_running_loop().create_future()
    conn._ready.set_result(None)
    link = Link()
    conn.attach(link, link.write)
    conn.push(DROP_QUERY)  # e.g. the SET that replays a client's settings
    conn.data_received(m.message(m.ERROR_RESPONSE, b"SERROR\x00Mbad setting\x00\x00") + m.READY_IDLE)
    assert link.written == b""
    assert conn.injected_error == {"S": "ERROR", "M": "bad setting"}
    assert link.idle == 1
