"""One raw backend connection: log in, then relay a linked client's answers.

Theory of operation. A ``ServerConnection`` is an ``asyncio.Protocol``. While it logs in
(``open``) it parses every message itself: authentication (trust, cleartext, md5, SCRAM via
scramp), ParameterStatus, BackendKeyData, up to the first ReadyForQuery. After that it is
either idle in its pool or *linked* to one client ``Link``; while linked, ``data_received``
walks the message headers of what the backend sends, forwards runs of whole messages to the
client in one write, and uses the ``Expect`` queue (``expect.py``) to drop, replace or make up
the answers to what pgfleet injected. DataRows are never decoded. When a ReadyForQuery leaves
the queue empty, the link is told the backend is idle, and may give it back to the pool.

It never decides routes and never formats errors for clients: failures reach the link as
``BackendError`` values.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import scramp

from ..config import Dsn
from ..errors import CONNECTION_FAILURE, INTERNAL_ERROR, PROTOCOL_VIOLATION, BackendError
from ..wire import messages as m
from .expect import DROP_QUERY as DROP_QUERY_
from .expect import IMPLICIT_BEGIN, Answer, Expect, Fate
from .expect import TENANT_QUERY as TENANT_QUERY_

log = logging.getLogger("pgfleet.backend")

_U32 = struct.Struct("!I").unpack_from

# Message types answered by one Expect entry each, popped when they arrive.
_D = m.DATA_ROW
_COPY_DATA = m.COPY_DATA
# A row (DataRow, CopyData) cut by the end of a read waits for its rest up to this size, so
# that a connection lost mid-row never leaves the client half a row (an error appended to it
# would be read as the rest of the row). Longer rows stream as they come.
_HOLD_BACK = 1 << 20
_Z = m.READY_FOR_QUERY
_TX_IDLE = m.TX_IDLE
_E = m.ERROR_RESPONSE
_EXECUTE_END = frozenset((m.COMMAND_COMPLETE, m.EMPTY_QUERY, m.PORTAL_SUSPENDED))
_SIMPLE_DONE = frozenset((m.PARSE_COMPLETE, m.BIND_COMPLETE, m.CLOSE_COMPLETE))
_DESCRIBE_END = frozenset((m.ROW_DESCRIPTION, m.NO_DATA))
_C = m.COMMAND_COMPLETE
_S = m.PARAMETER_STATUS
_A = m.NOTIFICATION
# Enum members as module globals: one dictionary lookup fewer per message on the hot path.
_DROP = Fate.DROP
_MADE_UP = Fate.MADE_UP
_CUT = Fate.CUT
_QUERY = Answer.QUERY
_SYNC = Answer.SYNC
_EXECUTE = Answer.EXECUTE
_DS = Answer.DESCRIBE_STATEMENT
_DP = Answer.DESCRIBE_PORTAL


class Link(Protocol):
    """Whoever a linked backend reports to: a client session, a scatter, a gather, a janitor.

    What the backend answers goes to the ``write`` given to ``attach``, not through the link:
    a session writes to its client, a scatter or gather leg to its own buffer.
    """

    def backend_idle(self, server: ServerConnection) -> None: ...  # ReadyForQuery, nothing due
    def backend_lost(self, server: ServerConnection, error: BackendError) -> None: ...
    # The ReadyForQuery of a CUT_SYNC (only a client session sends one; a janitor ignores it).
    def part_answered(self, server: ServerConnection) -> None: ...


# How a backend connection reaches its server: TCP (``tcp_connect``) in pgfleet; the protocol
# tests give a scripted transport instead (tests/protocol/harness.py).
Connector = Callable[[Callable[[], asyncio.Protocol], Dsn, float], Awaitable[object]]


async def tcp_connect(factory: Callable[[], asyncio.Protocol], dsn: Dsn, timeout: float) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().create_connection(factory, dsn.host, dsn.port), timeout)


_ASKS_TLS = frozenset({"prefer", "require", "verify-ca", "verify-full"})  # "allow" starts in plaintext


def _client_tls(mode: str, root: str | None) -> ssl.SSLContext:
    """The TLS context for a backend: no checks for prefer/require (as libpq without a root
    certificate), the CA for verify-ca, the CA and the host name for verify-full."""
    if mode in ("prefer", "require"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(cafile=root)
    context.check_hostname = mode == "verify-full"
    return context


class Stats:
    """A database's counters since start, shared by its connections (SHOW STATS, /metrics).

    PgBouncer's meaning: a query is a ReadyForQuery from the server; a transaction, one that
    says idle (an autocommit statement counts as one). Bytes are on the server side.
    """

    __slots__ = ("error_classes", "errors", "queries", "received", "sent", "transactions")

    def __init__(self) -> None:
        self.queries = 0
        self.transactions = 0
        self.received = 0
        self.sent = 0
        self.errors = 0
        self.error_classes: dict[str, int] = {}  # ErrorResponses by SQLSTATE class ("23", "42", ...)


DROP_CLOSE = Expect(Answer.CLOSE, Fate.DROP)  # a stale statement closed before its new Parse

# The settings of a backend that ran something pgfleet could not follow (SET ... FROM
# CURRENT, set_config() with computed arguments, an error in a pipeline after a SET, a failed
# replay of pgfleet's own): the next client it serves gets RESET ALL before its own settings.
UNKNOWN_SETTINGS: dict[str, str] = {"": "unknown"}


# How long a terminated connection under a host cap waits for the server to close its end (a
# busy one's statement is cancelled first: backend/pool.py): it counts against the cap until
# then, and is reset after it.
LINGER = 30.0


class ServerConnection(asyncio.Protocol):
    def __init__(self, database: str, dsn: Dsn, startup: dict[str, str], generation: int,
                 stats: Stats | None = None) -> None:
        self.database = database
        self.pool: Any = None  # the Pool it belongs to (set by the pool; typed loosely: pool imports us)
        self.credentials = "the database's dsn"  # where its user and password come from, for errors
        # Transaction mode: the backends by (host, port, pid) (Fleet.backend_owner), each with
        # the pgfleet pid of the client that last had it, to tell a NotificationResponse's
        # listener which pgfleet client notified; None: pids go to the client as they came.
        self.pid_owners: dict[tuple[str, int, int], ServerConnection] | None = None
        self.client_pid = 0
        self.stats = stats if stats is not None else Stats()
        self.dsn = dsn
        self.startup = startup
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.params: dict[str, str] = {}  # as the server reported them (ParameterStatus)
        self.settings: dict[str, str] = {}  # session settings applied on top of the startup ones
        self.pid = 0
        self.secret = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.tx_status = m.TX_IDLE
        self.prepared: set[str] = set()  # backend-side statement names that exist here
        # Names that exist here with a plan PostgreSQL will not run any more ("cached plan must
        # not change result type" after DDL): closed before they are prepared again.
        self.stale: set[str] = set()
        self.last_bound = ""  # the backend-side name of the last named statement a Bind ran
        self.errors = 0  # ErrorResponses seen: sessions compare counts to know a SET failed
        self.skipped_begin = False  # an IMPLICIT_BEGIN the server skipped after an error
        self.expects: deque[Expect] = deque()
        self.skipping = False  # an error in the extended protocol: the server skips to the next Sync
        # The client's names of statements whose Parse failed or was skipped, for the linked
        # session to forget (it reads them when the backend is idle).
        self.unprepared: list[bytes] = []
        self.unnamed_owner = 0  # the fleet token of the unnamed statement prepared here
        self.injected_error: dict[str, str] | None = None  # the error of a statement pgfleet sent
        self.link: Link | None = None
        # Where the linked side takes the backend's answers, and its optional ears (see attach).
        self.write_client: Callable[[bytes], None] = _discard
        self.on_answer: Callable[[int, bytes], None] | None = None
        self.on_parameter: Callable[[str, str], None] | None = None
        self.outbox: list[bytes] = []
        self.parsed_ok: set[str] = set()  # shared with the pool: see Pool.parsed_ok
        self.closed = False
        self.close_reason = ""
        self.close_code = ""  # the SQLSTATE of the backend's own FATAL, if it sent one
        self._buf = bytearray()  # login phase
        self._head = b""         # an incomplete message header carried to the next chunk
        self._skip = 0           # bytes of a streamed message body still to forward
        self._ready: asyncio.Future[None] | None = None
        self._scram: scramp.ScramClient | None = None
        self.sslmode = dict(dsn.options).get("sslmode", "prefer")  # libpq's default
        self._tls_asked = False
        self._tls_task: asyncio.Task[None] | None = None
        # The cap on connections to its server it counts against (backend/pool.py HostGate), and
        # after a Terminate under it, the timer that closes it if the server does not.
        self.gate: Any = None
        self._lingering: asyncio.TimerHandle | None = None

    # -- opening

    async def open(self, timeout: float, connect: Connector = tcp_connect) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        try:
            await connect(lambda: self, self.dsn, timeout)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except (OSError, TimeoutError) as exc:
            self.abort()
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise BackendError(CONNECTION_FAILURE, f"database {self.database} is unavailable: cannot connect to "
                               f"{self.dsn.host}:{self.dsn.port} ({why})",
                               hint="check that the server is up and the dsn in the config") from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the TLS layer, now wrapping the same connection
            return
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        if self.sslmode in _ASKS_TLS:
            self._tls_asked = True
            transport.write(m.SSL_REQUEST_MSG)
        else:
            self._send_startup()

    def _send_startup(self) -> None:
        assert self.transport is not None
        params = {"user": self.dsn.user, "database": self.dsn.dbname, **self.startup}
        self.transport.write(m.startup_message(params))

    def _tls_answer(self, data: bytes) -> None:
        """The server's one-byte answer to SSLRequest, as libpq takes it for the dsn's sslmode."""
        self._tls_asked = False
        if len(data) != 1:  # bytes after the answer would be outside TLS: refuse, as libpq does
            self._fail_login(BackendError(PROTOCOL_VIOLATION, f"database {self.database} sent unexpected data "
                                          "after its answer to the TLS request"))
            return
        if data == m.SSL_YES:
            self._tls_task = asyncio.get_running_loop().create_task(self._upgrade())
        elif data == m.SSL_NO and self.sslmode == "prefer":
            self._send_startup()
        else:
            self._fail_login(BackendError(CONNECTION_FAILURE, f"database {self.database} does not accept TLS "
                                          f"connections, and its dsn asks sslmode={self.sslmode}",
                                          hint="enable ssl on that server, or lower sslmode in the dsn"))

    async def _upgrade(self) -> None:
        assert self.transport is not None
        mode = self.sslmode
        options = dict(self.dsn.options)
        try:
            context = _client_tls(mode, options.get("sslrootcert"))
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context,
                server_hostname=self.dsn.host if mode == "verify-full" else None)
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as exc:
            self._fail_login(BackendError(CONNECTION_FAILURE, f"database {self.database}: TLS with "
                                          f"{self.dsn.host}:{self.dsn.port} failed ({exc})",
                                          hint="check sslmode and sslrootcert in its dsn"))
            return
        if transport is None:
            return
        self.transport = transport  # type: ignore[assignment]
        self._send_startup()

    def _login_data(self, data: bytes) -> None:
        if self._tls_asked:
            self._tls_answer(data)
            return
        self._buf += data
        pos = 0
        try:
            while (found := m.frame(self._buf, pos, 1 << 24)) is not None:
                kind, start, end = found
                self._login_message(kind, bytes(self._buf[start:end]))
                pos = end
                if self._ready is None or self._ready.done():
                    break
        except BackendError as exc:
            self._fail_login(exc)
            return
        except m.ProtocolViolation as exc:
            self._fail_login(BackendError(PROTOCOL_VIOLATION, f"database {self.database} sent a malformed message "
                                                   f"while logging in: {exc.message}"))
            return
        del self._buf[:pos]

    def _login_message(self, kind: int, body: bytes) -> None:
        if kind == m.AUTHENTICATION:
            self._authenticate(*m.decode_auth(body))
        elif kind == m.PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            self.params[name] = value
        elif kind == m.BACKEND_KEY_DATA:
            self.pid, self.secret = m.decode_backend_key(body)
        elif kind == m.ERROR_RESPONSE:
            fields = m.decode_fields(body)
            raise BackendError(CONNECTION_FAILURE, f"database {self.database} refused pgfleet's login as "
                               f"{self.dsn.user}: {fields.get('M', 'no message')}",
                               hint=f"check the user and password in {self.credentials}")
        elif kind == m.READY_FOR_QUERY:
            self._buf.clear()
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)

    def _authenticate(self, code: int, data: bytes) -> None:
        assert self.transport is not None
        password = self.dsn.password
        if code == m.AUTH_OK:
            return
        if code in (m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL) and password is None:
            raise BackendError(CONNECTION_FAILURE, f"database {self.database} asks for a password for "
                               f"{self.dsn.user} and {self.credentials} has none",
                               hint=f"give {self.credentials} the password" if self.credentials.startswith("backend")
                               else "put the password in the dsn: postgresql://user:pw@host/db")
        assert password is not None
        if code == m.AUTH_CLEARTEXT:
            self.transport.write(m.password_message(password))
        elif code == m.AUTH_MD5:
            inner = hashlib.md5((password + self.dsn.user).encode()).hexdigest()
            digest = "md5" + hashlib.md5(inner.encode() + data[:4]).hexdigest()
            self.transport.write(m.password_message(digest))
        elif code == m.AUTH_SASL:
            mechanisms = [x.decode() for x in data.split(b"\0") if x]
            if "SCRAM-SHA-256" not in mechanisms:
                raise BackendError(CONNECTION_FAILURE, f"database {self.database} offers only {mechanisms}")
            self._scram = scramp.ScramClient(["SCRAM-SHA-256"], self.dsn.user, password)
            self.transport.write(m.sasl_initial_response("SCRAM-SHA-256",
                                                         self._scram.get_client_first().encode()))
        elif code == m.AUTH_SASL_CONTINUE and self._scram is not None:
            try:
                self._scram.set_server_first(data.decode())
                self.transport.write(m.sasl_response(self._scram.get_client_final().encode()))
            except scramp.ScramException as exc:
                raise BackendError(CONNECTION_FAILURE, f"database {self.database}: SCRAM failed: {exc}") from None
        elif code == m.AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(data.decode())
            except scramp.ScramException as exc:
                raise BackendError(CONNECTION_FAILURE, f"database {self.database}: the server's SCRAM signature "
                                   f"is wrong ({exc})") from None
        else:
            raise BackendError(CONNECTION_FAILURE, f"database {self.database} asks for authentication method "
                               f"{code}, which pgfleet does not speak", hint="use trust, md5 or scram-sha-256")

    def _fail_login(self, error: BackendError) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        self.abort()

    # -- linking to a client

    def attach(self, link: Link, write: Callable[[bytes], None], *,
               parameters: Callable[[str, str], None] | None = None,
               answers: Callable[[int, bytes], None] | None = None) -> None:
        """Link the backend: its answers go to ``write``; ``parameters`` hears each ParameterStatus;
        ``answers`` (the audit log's ear) each CommandComplete, EmptyQueryResponse,
        PortalSuspended, ErrorResponse and ReadyForQuery answering the linked side's own
        statements (not what pgfleet sent by itself). Attaching again redirects them."""
        self.link = link
        self.write_client = write
        self.on_parameter = parameters
        self.on_answer = answers

    def detach(self) -> None:
        self.link = None
        self.write_client = _discard
        self.on_answer = None
        self.on_parameter = None
        self.last_used = time.monotonic()

    def send(self, data: bytes) -> None:
        """Queue bytes for the backend; ``flush`` writes them in one system call."""
        self.outbox.append(data)

    def flush(self) -> None:
        outbox = self.outbox
        if outbox and self.transport is not None:
            data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
            self.stats.sent += len(data)
            self.transport.write(data)
            outbox.clear()

    def push(self, expect: Expect) -> None:
        """Queue what the next message sent will be answered with (see ``expect.py``).

        After an error in the extended protocol the server discards every message up to the
        next Sync, and answers none of them: while ``skipping``, only a Sync's answer is due.
        """
        if self.skipping:
            if expect.answer is not Answer.SYNC:
                self._never_answered(expect)
                return
            self.skipping = False
        if expect.fate is Fate.MADE_UP and not self.expects:
            self.write_client(expect.reply)
        else:
            self.expects.append(expect)

    def _never_answered(self, expect: Expect) -> None:
        """A Parse that failed, or any message the server skipped after an error: a Parse in
        it prepared nothing (and the client's name for it, if it was the client's, is free)."""
        if expect.answer is Answer.QUERY:
            if expect is IMPLICIT_BEGIN:
                self.skipped_begin = True
            return
        if expect.answer is Answer.PARSE:
            if expect.statement is not None:
                self.prepared.discard(expect.statement)
            else:
                self.unnamed_owner = 0  # which unnamed statement the server holds is unknown now
            if expect.client:
                self.unprepared.append(expect.client)

    @property
    def busy(self) -> bool:
        """Answers are due, or the server skips to a Sync nobody sent yet (not reusable as it is)."""
        return bool(self.expects) or self.skipping

    # -- relaying answers (the hot path)

    def data_received(self, data: bytes) -> None:
        if self._ready is None or not self._ready.done():
            self._login_data(data)
            return
        stats = self.stats
        stats.received += len(data)
        if self._head:
            data = self._head + data
            self._head = b""
        n = len(data)
        skip = self._skip
        if skip >= n:
            self._skip = skip - n
            self.write_client(data)
            return
        pos = skip
        start = 0
        parts: list[bytes] | None = None
        expects = self.expects
        ready = False
        while pos < n:
            if n - pos < 5:
                break
            kind = data[pos]
            end = pos + 1 + _U32(data, pos + 1)[0]
            if kind == _D or kind == _COPY_DATA:
                if end > n and end - pos <= _HOLD_BACK:
                    break  # a row cut by the read: it goes out whole with the next one
                pos = end  # may run past the chunk: the rest is skipped in later chunks
                continue
            if end > n:
                break  # other messages are small: wait for the whole of it
            if kind == _A and self.pid_owners is not None:
                renamed = self._notifier(data[pos + 5:end])
                if renamed is not None:
                    if parts is None:
                        parts = []
                    parts.append(data[start:pos])
                    parts.append(renamed)
                    start = pos = end
                    continue
            if kind == _E and self._server_fatal(data[pos + 5:end]):
                # The backend is going away: its client hears 08006 from pgfleet instead.
                if parts is None:
                    parts = []
                parts.append(data[start:pos])
                start = pos = end
                continue
            if not expects:  # asynchronous NoticeResponse / ParameterStatus / Notification
                if kind == _S:
                    self._parameter(data[pos + 5:end])
                pos = end
                continue
            head = expects[0]
            drop = False
            reply = None
            if (head is DROP_QUERY_ or head is TENANT_QUERY_ or head is IMPLICIT_BEGIN) and kind != _Z:
                drop = True  # everything an injected query says, but its ReadyForQuery
                if kind == _E:
                    self._error(head, data[pos + 5:end])
                    if head is TENANT_QUERY_:  # fail closed: nothing after it is answered
                        if parts is None:
                            parts = []
                        parts.append(data[start:pos])
                        self.write_client(b"".join(parts))
                        self.close_reason = (f"pgfleet could not set pgfleet.tenant on it "
                                             f"({(self.injected_error or {}).get('M', '?')}), so it was closed "
                                             "before running anything as another tenant")
                        self.abort()
                        return
                elif kind == _S:
                    self._parameter(data[pos + 5:end])
            elif kind == _Z:
                if head.answer is not _SYNC and (head.answer is not _QUERY or self.skipping):
                    head = self._skipped_to_sync()  # what was sent after an error got no answer
                self.skipping = False
                expects.popleft()
                fate = head.fate
                if self.on_answer is not None and fate is not _DROP and fate is not _CUT:
                    # A simple query's end, or a Sync's ("S"): the audit tells them apart.
                    self.on_answer(kind if head.answer is Answer.QUERY else m.SYNC, data[pos + 5:end])
                self.tx_status = status = data[pos + 5]
                stats.queries += 1
                if status == _TX_IDLE:
                    stats.transactions += 1
                if fate is _CUT:
                    # One part of a pipeline cut between databases is answered: what came
                    # before goes out first, and the link decides where what follows goes.
                    if parts is None:
                        parts = []
                    parts.append(data[start:pos])
                    self.write_client(b"".join(parts))
                    parts = None
                    start = end
                    if self.link is not None:
                        self.link.part_answered(self)
                drop = fate is _DROP
                ready = True
            elif kind in _SIMPLE_DONE:
                if head.answer is not _QUERY:
                    expects.popleft()
                    drop = head.fate is _DROP
                    if head.statement is not None:
                        self.parsed_ok.add(head.statement)
            elif kind in _EXECUTE_END:
                if self.on_answer is not None and head.fate is not _DROP:
                    self.on_answer(kind, data[pos + 5:end])
                if head.answer is _EXECUTE:
                    expects.popleft()
                if kind == _C and data[pos + 5] == 68:  # "D": DISCARD / DEALLOCATE
                    self._maybe_forget_statements(data[pos + 5:end - 1])
            elif kind in _DESCRIBE_END:
                if head.answer is _DS or head.answer is _DP:
                    expects.popleft()
            elif kind == _E:
                if self.on_answer is not None and head.fate is not _DROP:
                    self.on_answer(kind, data[pos + 5:end])
                reply, drop = self._error(head, data[pos + 5:end])
            elif kind == _S:
                self._parameter(data[pos + 5:end])
            if drop or reply is not None:
                if parts is None:
                    parts = []
                parts.append(data[start:pos])
                if reply:
                    parts.append(reply)
                start = end
            pos = end
            # Answers pgfleet made up are due as soon as everything before them is out.
            while expects and expects[0].fate is _MADE_UP:
                if parts is None:
                    parts = []
                parts.append(data[start:pos])
                parts.append(expects.popleft().reply)
                start = pos
        if pos > n:
            self._skip = pos - n
            limit = n
        else:
            self._skip = 0
            limit = pos
            if pos < n:
                self._head = data[pos:]
        if parts is None:
            self.write_client(data if start == 0 and limit == n else data[start:limit])
        else:
            parts.append(data[start:limit])
            self.write_client(b"".join(parts))
        if ready and not expects and not self.skipping and self.link is not None:
            self.link.backend_idle(self)

    def _notifier(self, body: bytes) -> bytes | None:
        """A NotificationResponse with the notifying backend's pid replaced by its pgfleet
        client's, when a pgfleet client ran statements on that backend last; else None."""
        assert self.pid_owners is not None
        notifier = self.pid_owners.get((self.dsn.host, self.dsn.port, _U32(body, 0)[0]))
        if notifier is None or not notifier.client_pid:
            return None
        return m.message(_A, struct.pack("!I", notifier.client_pid) + body[4:])

    def _error(self, head: Expect, body: bytes) -> tuple[bytes | None, bool]:
        """An ErrorResponse: in the extended protocol the backend now skips to the next Sync."""
        self.errors += 1
        if self.last_bound and b"RRevalidateCachedQuery\0" in body and self.last_bound in self.prepared:
            # "cached plan must not change result type": the client's driver prepares the
            # statement again (asyncpg does), and pgfleet's shared name for it is prepared again
            # here too. (Other backends keep theirs until it fails there, as a client's would.)
            self.prepared.discard(self.last_bound)
            self.stale.add(self.last_bound)
        stats = self.stats
        stats.errors += 1
        sqlclass = m.decode_fields(body).get("C", INTERNAL_ERROR)[:2]
        stats.error_classes[sqlclass] = stats.error_classes.get(sqlclass, 0) + 1
        if head.answer is Answer.QUERY:
            if head.fate is Fate.REFUSE:
                return head.reply, True
            if head.fate is Fate.DROP:
                self.injected_error = m.decode_fields(body)
                self.settings = UNKNOWN_SETTINGS  # which of its settings held is unknown: reset for the next
                log.warning("database %s: a statement pgfleet sent failed: %s", self.database,
                            self.injected_error.get("M", "?"))
                return None, True
            return None, False
        expects = self.expects
        failing = expects.popleft()
        self._never_answered(failing)
        while expects and expects[0].answer is not Answer.SYNC:
            self._never_answered(expects.popleft())
        # No Sync sent yet: what comes before it is skipped too (see ``push``; whoever sends a
        # Sync without ``push`` clears ``skipping`` itself).
        self.skipping = not expects
        if failing.fate is Fate.REFUSE:
            return failing.reply, True
        return None, False

    def _skipped_to_sync(self) -> Expect:
        """A ReadyForQuery while messages before their Sync are still due: the server skipped
        them after an error (the fast path queues what it forwards without ``push``). They are
        dropped, and the ReadyForQuery answers the Sync."""
        expects = self.expects
        while len(expects) > 1 and expects[0].answer is not Answer.SYNC and (
                expects[0].answer is not Answer.QUERY or self.skipping):
            self._never_answered(expects.popleft())
        self.skipping = False
        return expects[0]

    def _server_fatal(self, body: bytes) -> bool:
        fields = m.decode_fields(body)
        if (fields.get("V") or fields.get("S")) not in ("FATAL", "PANIC"):
            return False
        self.close_code = fields.get("C", "")
        self.close_reason = f"{fields.get('M', 'the server ended the connection')} ({self.close_code or '?'})"
        return True

    def _parameter(self, body: bytes) -> None:
        name, value = m.decode_parameter_status(body)
        self.params[name] = value
        if self.on_parameter is not None:
            self.on_parameter(name, value)

    def close_stale(self, name: str) -> None:
        """Before ``name`` is parsed here again: its stale statement closed (answer dropped)."""
        if name in self.stale:
            self.stale.discard(name)
            self.push(DROP_CLOSE)
            self.send(m.close(m.TARGET_STATEMENT, name))

    def _maybe_forget_statements(self, tag: bytes) -> None:
        if tag in (b"DISCARD ALL", b"DEALLOCATE ALL"):
            self.prepared.clear()
            self.stale.clear()
        elif tag == b"DEALLOCATE":
            # Which one is unknown here: each is closed (if it is still there) and prepared
            # again when next needed (a Parse of a name that still exists would fail, 42P05).
            self.stale |= self.prepared
            self.prepared.clear()

    # -- closing

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.pid_owners is not None:
            self.pid_owners.pop((self.dsn.host, self.dsn.port, self.pid), None)
        if self._lingering is not None:  # terminated under a host cap: its place is free now
            self._lingering.cancel()
            self._lingering = None
            assert self.gate is not None
            self.gate.closing -= 1
            self.gate.freed()
            return
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(BackendError(
                CONNECTION_FAILURE, f"database {self.database} closed the connection while pgfleet logged in"))
            return
        link = self.link
        if link is not None:
            reason = self.close_reason or (f"{exc}" if exc else "the server closed the connection")
            if self.close_code == PROTOCOL_VIOLATION:
                # The client's own malformed message, forwarded as it came: PostgreSQL's verdict.
                link.backend_lost(self, BackendError(
                    PROTOCOL_VIOLATION, f"database {self.database} refused a malformed message: {reason}",
                    hint="the client broke the protocol; the connection is closed"))
                return
            link.backend_lost(self, BackendError(
                CONNECTION_FAILURE, f"the connection to database {self.database} was lost: {reason}",
                hint="the statement may not have completed; reconnect and retry"))

    @property
    def mid_message(self) -> bool:
        """Whether the client has part of a message and is owed the rest (a long row)."""
        return self._skip > 0

    @property
    def gone(self) -> bool:
        """Closed, or closing: the transport saw the end even if connection_lost is still to come."""
        return self.closed or (self.transport is not None and self.transport.is_closing())

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def terminate(self, reason: str) -> None:
        """Close politely (Terminate message) an idle connection. Under a host cap (``gate``)
        the connection counts until the server has closed its end, which it does only after
        its backend has left pg_stat_activity and its connection slot: a new connection that
        takes the freed place never puts the server over the cap, even for a moment."""
        self.close_reason = reason
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(m.TERMINATE_MSG)
        gate = self.gate
        if gate is None:
            transport.close()
            return
        gate.closing += 1
        self._lingering = asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def pause_writing(self) -> None:  # the client is slow: stop reading the backend
        pass

    def resume_writing(self) -> None:
        pass


class _CancelSender(asyncio.Protocol):
    """A connection that carries one CancelRequest and closes (the server answers nothing)."""

    def __init__(self, request: bytes) -> None:
        self.request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]
        transport.close()


async def send_cancel(server: ServerConnection, connect: Connector = tcp_connect) -> None:
    """Ask ``server``'s database to cancel what that backend runs (a new connection, as libpq does)."""
    request = m.cancel_request(server.pid, server.secret)
    try:
        await connect(lambda: _CancelSender(request), server.dsn, 5.0)
    except (OSError, TimeoutError) as exc:
        log.warning("database %s: could not forward a cancel request: %s", server.database, exc)


def _discard(data: bytes) -> None:
    pass
