"""A tiny PostgreSQL client over a plain socket, for tests that must send bytes no driver sends.

It frames the server's messages, runs a real SCRAM-SHA-256 exchange with scramp (or lets the
test send whatever it likes instead), and reads ErrorResponse fields. Every read has a
timeout, so a pgfleet that hangs fails the test instead of blocking it. Builders come from
the test itself or from ``proxy.wire.messages`` (pure functions, no I/O).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Self

import scramp

from proxy.wire import messages as m


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Msg:
    kind: str
    body: bytes

    @property
    def fields(self) -> dict[str, str]:
        return m.decode_fields(self.body)


@dataclass
class Raw:
    port: int
    timeout: float = 10.0
    sock: socket.socket = field(init=False)
    buf: bytes = b""

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("pgfleet sent nothing in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("pgfleet sent nothing in time") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed()
        self.buf += chunk

    def recv_bytes(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self, timeout: float | None = None) -> Msg:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < 5:
            self._fill(deadline)
        length = struct.unpack_from("!I", self.buf, 1)[0]
        while len(self.buf) < 1 + length:
            self._fill(deadline)
        msg = Msg(chr(self.buf[0]), self.buf[5:1 + length])
        self.buf = self.buf[1 + length:]
        return msg

    def until(self, kinds: str, timeout: float | None = None) -> list[Msg]:
        """Messages up to and including the first one whose type is in ``kinds``."""
        out = []
        while True:
            msg = self.recv(timeout)
            out.append(msg)
            if msg.kind in kinds:
                return out

    def error_then_close(self, timeout: float = 5.0) -> dict[str, str]:
        """The ErrorResponse the server sends before it closes; asserts that it does close."""
        error: dict[str, str] | None = None
        deadline = time.monotonic() + timeout
        try:
            while True:
                msg = self.recv(max(deadline - time.monotonic(), 0.001))
                if msg.kind == "E" and error is None:
                    error = msg.fields
        except Closed:
            pass
        assert error is not None, "the connection closed without an ErrorResponse"
        return error

    def closed_soon(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (data is drained)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(deadline)
                self.buf = b""
        except Closed:
            return True
        except TimeoutError:
            return False

    # -- login

    def startup(self, **params: str) -> None:
        self.send(m.startup_message(params))

    def login(self, user: str, secret: str, database: str = "app", **params: str) -> list[Msg]:
        """A complete SCRAM login; returns the messages after AuthenticationOk up to ReadyForQuery."""
        self.startup(user=user, database=database, **params)
        msg = self.recv()
        if msg.kind == "E":
            raise LoginError(msg.fields)
        code, _ = m.decode_auth(msg.body)
        assert code == m.AUTH_SASL, msg
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, secret)
        self.send(m.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode()))
        msg = self.recv()
        if msg.kind == "E":
            raise LoginError(msg.fields)
        client.set_server_first(m.decode_auth(msg.body)[1].decode())
        self.send(m.sasl_response(client.get_client_final().encode()))
        for msg in self.until("ER"):
            if msg.kind == "E":
                raise LoginError(msg.fields)
        client.set_server_final(m.decode_auth(msg.body)[1].decode())
        rest = self.until("ZE")
        if rest[-1].kind == "E":
            raise LoginError(rest[-1].fields)
        return rest

    def query(self, sql: str) -> list[Msg]:
        self.send(m.query(sql))
        return self.until("Z")


class LoginError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')} {fields.get('M')}")
        self.fields = fields


def rows(msgs: list[Msg]) -> list[list[str | None]]:
    """The text values of the DataRows among ``msgs``."""
    out = []
    for msg in msgs:
        if msg.kind != "D":
            continue
        body = msg.body
        (count,) = struct.unpack_from("!h", body, 0)
        pos, row = 2, []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if n < 0:
                row.append(None)
            else:
                row.append(body[pos:pos + n].decode())
                pos += n
        out.append(row)
    return out


def errors(msgs: list[Msg]) -> list[dict[str, str]]:
    return [msg.fields for msg in msgs if msg.kind == "E"]
