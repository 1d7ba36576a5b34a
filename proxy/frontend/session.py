"""The client session: one PostgreSQL client connection, from startup to Terminate.

Theory of operation. A ``Session`` is an ``asyncio.Protocol``. Bytes from the client go into
``inbox``; ``_process`` frames whole messages and handles them in order. Login is a table,
``LOGIN``: ``(state, message type) -> handler``; a message the table does not know is a
protocol violation and ends the connection. Once ready, each message is routed (``Router``),
a backend of the routed database is attached (taken from its pool without waiting when one
is idle, else the session stops reading until the pool hands one over), and the message is
forwarded — runs of messages that need no rewriting in one write. Named prepared statements
are renamed to pgfleet's shared backend-side names and prepared lazily on whichever backend
runs them; what the backend answers to pgfleet's own messages is dropped or made up by the
backend's ``Expect`` queue. When the backend reports ReadyForQuery ``I`` with nothing pending,
the session gives it back to the pool (transaction mode).

A statement pgfleet refuses inside a transaction is refused *on the backend* — pgfleet sends
a statement that fails and replaces its error with its own — so the backend's transaction
fails exactly as PostgreSQL's would. This module is the only place where ``ProxyError``
values become ``ErrorResponse`` bytes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import secrets
import ssl
import struct
import time
from collections import deque
from typing import Any

from ..auth.keys import ApiKey, Role, ScramExchange, check_cleartext, check_md5, failed
from ..backend.connection import ServerConnection, send_cancel
from ..backend.expect import (
    DROP_QUERY,
    FORWARD_BIND,
    FORWARD_CLOSE,
    FORWARD_DESCRIBE_PORTAL,
    FORWARD_DESCRIBE_STATEMENT,
    FORWARD_EXECUTE,
    FORWARD_PARSE_UNNAMED,
    FORWARD_QUERY,
    FORWARD_SYNC,
    Answer,
    Expect,
    Fate,
)
from ..backend.pool import DisconnectReason, Pool
from ..config import ADMIN_DATABASE
from ..errors import AuthFailed, BackendError, ClientError, ProtocolViolation, ProxyError
from ..router.copyrows import CopyIn, CopyOutWriter, RowSplitter, copy_in, copy_out
from ..router.fanout import FanoutPlan
from ..router.parse import hints_from, split_insert
from ..router.route import (
    HINT_NAMES,
    All,
    Analysis,
    Direct,
    Hints,
    Kind,
    Multi,
    Params,
    Route,
    SettingChange,
)
from ..router.router import SessionContext
from ..wire import messages as m
from .copysplit import CopySplit
from ..fleet import Fleet
from .gather import Gather
from ..merge.merger import Merger
from .scatter import Scatter, answer_of
from .startup import DIRTY, session_settings, set_statement

log = logging.getLogger("pgfleet.session")

_I = 73  # ReadyForQuery status "I": idle, no transaction
_T = 84  # "T": in a transaction
_E = 69  # "E": in a failed transaction
SHUTTING_DOWN = ProxyError("57P01", "terminating connection because pgfleet is shutting down",
                           hint="reconnect in a moment")
_TRANSACTION_WORDS = frozenset(("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"))
_TRANSACTION_ENDS = {"COMMIT": "COMMIT", "END": "COMMIT", "ROLLBACK": "ROLLBACK", "ABORT": "ROLLBACK"}
_STATEMENT_MESSAGES = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE))
_REFUSED_SQL = m.query("pgfleet refused this statement")
_MISSING_STATEMENT = "pgfleet_refused_statement"
# Text that may change session settings (SET, RESET, set_config(), DISCARD ALL). Statements
# on a decided database are parsed only when this matches, to follow the client's settings.
# Words without which a statement neither changes settings nor pins its backend.
_MAYBE_SETTINGS = re.compile(rb"set|discard|listen|advisory|temp|prepare|hold|deallocate|close|database",
                             re.IGNORECASE)


class State(enum.Enum):
    STARTUP = "startup"
    SASL_INITIAL = "sasl_initial"
    SASL_RESPONSE = "sasl_response"
    PASSWORD = "password"
    SETTING_UP = "setting_up"
    READY = "ready"
    CLOSED = "closed"


class Prepared:
    """A client's named prepared statement: pgfleet's backend-side name and where it runs."""

    __slots__ = ("backend_name", "control", "database", "effect", "param_types", "query", "routed", "wire_name")

    def __init__(self, backend_name: str, query: str, param_types: bytes, database: str,
                 effect: Analysis | None, routed: bool = False, control: str | None = None) -> None:
        self.backend_name = backend_name
        self.wire_name = backend_name.encode() + b"\0"  # as it goes into a Bind
        self.query = query
        self.param_types = param_types
        self.database = database
        self.effect = effect  # its analysis, when running it changes session settings
        self.routed = routed  # its shard key is a parameter: each Bind decides the database
        self.control = control  # BEGIN, COMMIT, ...: its first word (see Session._bind)


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


class _Portal:
    """A bound statement for several databases, kept by pgfleet and run at its Execute:
    a write (one scatter) or, with a ``plan``, a federated SELECT (one gather)."""

    __slots__ = ("databases", "describe", "describe_messages", "formats", "messages", "name", "plan",
                 "replicated", "rows", "text")

    def __init__(self, name: str, databases: tuple[str, ...], describe_messages: bytes, messages: bytes,
                 replicated: bool, plan: FanoutPlan | None = None, formats: tuple[int, ...] = ()) -> None:
        self.name = name
        self.databases = databases
        self.describe_messages = describe_messages  # Parse and Bind of the client's own statement
        self.messages = messages  # Parse and Bind of what each database runs (unnamed)
        self.replicated = replicated
        self.plan = plan
        self.formats = formats    # the client's result formats
        self.rows: deque[bytes] | None = None  # a row-limited Execute's result, not yet handed out
        self.describe = False     # the client's Describe of it, not answered yet
        self.text = ""            # the client's statement (the audit log)

    def next_rows(self, max_rows: int) -> bytes:
        """The next ``max_rows`` rows (all when 0), then PortalSuspended or CommandComplete."""
        rows = self.rows
        assert rows is not None
        count = len(rows) if max_rows <= 0 else min(max_rows, len(rows))
        out = [m.message(m.DATA_ROW, rows.popleft()) for _ in range(count)]
        # As PostgreSQL: a fetch that filled its limit suspends, even when nothing is left.
        out.append(m.PORTAL_SUSPENDED_MSG if 0 < max_rows == count else m.command_complete(f"SELECT {count}"))
        return b"".join(out)


class Session(asyncio.Protocol):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.config = fleet.config
        self.max_message = fleet.config.listen.max_message_size
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = State.STARTUP
        self.inbox = bytearray()
        self.user = ""
        self.database: str | None = None
        self.key: ApiKey | None = None
        self.ctx: SessionContext | None = None
        self.fixed: str | None = None
        self.unparsed: str | None = None
        self.deferred_begin: bytes | None = None  # see _transaction_control
        self.settings: dict[str, str] = {}
        self.startup_settings: dict[str, str] = {}  # what RESET returns to
        # Session-level SETs sent in the current transaction, kept once it ends without error.
        self.pending: list[SettingChange] | None = None
        self.pending_opaque = False  # ... and whether one of them cannot be replayed
        self.pending_errors = 0      # the backend's error count when the first was sent
        self.unnamed_effect: Analysis | None = None  # the unnamed statement's, if it sets
        self.pid = 0
        self.secret = 0
        self.backend: ServerConnection | None = None
        self.tx_status = _I
        # two_phase_commit: the other databases' backends of a transaction on several, each
        # idle in it while the attached one runs; the transaction's BEGIN, to open it on the
        # next one; and whether it changed settings (then it stays on one database).
        self.others: dict[str, ServerConnection] = {}
        self.tx_begin: bytes | None = None
        self.tx_sets = False
        self.statements: dict[bytes, Prepared] = {}  # by the client's name, as sent
        # The client's unnamed statement: its Parse message as it came, its database, and a
        # fleet-wide number that a backend holding exactly that Parse carries too.
        self.unnamed: tuple[bytes, str] | None = None
        self.unnamed_token = 0
        self.unnamed_routed: str | None = None  # its text, when each Bind picks its database
        self.unnamed_control: str | None = None  # its text, when it is BEGIN/COMMIT/... (see _bind)
        # A bound BEGIN/COMMIT/... that pgfleet answers itself: (portal, text, word).
        self.control_portal: tuple[str, str, str] | None = None
        self.portal: _Portal | None = None  # a portal bound for several databases, not yet run
        self.gather: Gather | None = None   # a federated SELECT running
        # SET pgfleet.shard_key / pgfleet.database ...: the session's hints, pgfleet's own.
        self.hint_values: dict[str, str] = {}
        self.hints: Hints | None = None
        self.skipping = False       # after an error in the extended protocol: drop until Sync
        self.batch_open = False     # extended messages sent since the last Sync
        self.waiting = False        # reading stopped: a backend is on its way or must go idle
        self.wait_task: asyncio.Task[None] | None = None
        self.paused_by_client = False
        self.session_mode = fleet.config.pool.mode == "session"
        # Session state on the attached backend that no other backend has (LISTEN, a temp
        # table, ...): while any, the client keeps that backend, as in session mode.
        self.pins: set[str] = set()
        self.unpinning: tuple[tuple[str, ...], int] | None = None  # dropped if no error (backend_idle)
        self._scram: ScramExchange | None = None
        self._md5_salt = b""
        self.login_timer: asyncio.TimerHandle | None = None
        # While a client's messages are handled (_process), what is written to it is
        # gathered here and goes out in one write at the end (see _write).
        self.corked = False
        self.out: list[bytes] = []
        self.counted_key: str | None = None  # the key this client counts against (fleet.key_clients)
        self.tls = False  # the client's connection is encrypted
        self.gone = False  # connection_lost has run
        self.copy: CopySplit | None = None  # COPY FROM STDIN into a sharded table, taking rows
        self.guard: asyncio.TimerHandle | None = None  # the key's statement_timeout, while one runs
        self.connected = time.time()
        # The audit log (admin/audit.py), when on: every statement gets a line. Its client's
        # statements then skip the verbatim fast paths, so that each is seen.
        audit = fleet.audit
        self.audit = audit if audit is not None and audit.enabled else None
        self.audit_queue: deque[_Audited] = deque()  # sent to the backend, answer not complete
        self.audit_portals: dict[str, str] = {}  # portal -> its statement's text
        self.audit_text = ""  # the statement a fan-out, scatter or COPY runs
        self.console: Any = None  # the admin console's conversation (admin/console.py), for its clients

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.fleet.clients += 1
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.login_timer = asyncio.get_running_loop().call_later(LOGIN_TIMEOUT, self._login_timeout)

    def _login_timeout(self) -> None:
        if self.state is not State.READY:
            self._fatal(ProxyError("57014", "canceling authentication due to timeout",
                                   hint=f"a client must log in within {LOGIN_TIMEOUT:g}s"))

    def data_received(self, data: bytes) -> None:
        self.inbox += data
        if not self.waiting:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gone:  # a failed TLS handshake already said goodbye
            return
        self.gone = True
        self.fleet.clients -= 1
        if self.counted_key is not None:
            self.fleet.key_clients[self.counted_key] -= 1
            self.counted_key = None
        self._close_backend()
        if self.copy is not None:  # its shards roll back and go back to their pools
            copy, self.copy = self.copy, None
            asyncio.get_running_loop().create_task(copy.finish("the client disconnected"))
        self.state = State.CLOSED
        if self.wait_task is not None:
            self.wait_task.cancel()
        self.fleet.sessions.pop(self.pid, None)

    def pause_writing(self) -> None:
        """The client reads slower than its backend answers: stop reading the backend."""
        self.paused_by_client = True
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()
        if self.gather is not None:
            self.gather.pause()

    def resume_writing(self) -> None:
        self.paused_by_client = False
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()
        if self.gather is not None:
            self.gather.resume()

    # ------------------------------------------------------------------ the message loop

    def _process(self) -> None:
        self.corked = True
        try:
            if self.state is State.STARTUP:
                self._startup()
            else:
                self._messages()
        except ProtocolViolation as exc:
            self._fatal(exc)
        except AuthFailed as exc:
            self._fatal(exc)
        except ProxyError as exc:  # a refusal outside any statement (e.g. at login): fatal
            self._fatal(exc)
        except Exception as exc:  # our bug: never a traceback for the client, always one in the log
            log.exception("internal error in session %s (key %s): %s", self.peer, self.user, exc)
            self._fatal(ProxyError("XX000", "internal error in pgfleet; the details are in its log"))
        finally:
            self.corked = False
            if self.out:
                self._flush()
            if self.guard is None and self.key is not None and self.key.statement_timeout and self._running():
                self.guard = asyncio.get_running_loop().call_later(self.key.statement_timeout, self._guard_fired)

    def _startup(self) -> None:
        while self.state is State.STARTUP:
            found = m.parse_first(self.inbox)
            if found is None:
                return
            first, used = found
            del self.inbox[:used]
            if isinstance(first, m.SSLRequest) and self.fleet.tls is not None and not self.tls:
                if self.inbox:  # bytes sent before the handshake could be injected into it
                    raise ProtocolViolation("received unencrypted data after SSL request")
                self._write(m.SSL_YES)
                self._flush()
                self._start_tls()
                return
            if isinstance(first, m.SSLRequest | m.GSSEncRequest):
                self._write(m.SSL_NO)
            elif isinstance(first, m.CancelRequest):
                self._cancel(first)
                return
            else:
                self._begin_login(first.params)
        if self.inbox:
            self._messages()

    def _messages(self) -> None:
        inbox = self.inbox
        n = len(inbox)
        pos = 0
        run = -1  # start of a run of messages forwarded as they came
        limit = self.max_message
        try:
            while not self.waiting:
                if n - pos < 5:
                    break
                kind = inbox[pos]
                if kind not in _KNOWN:
                    raise ProtocolViolation(f"invalid frontend message type {kind}")
                length = _U32(inbox, pos + 1)[0]
                if length < 4 or length > limit:
                    raise ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}")
                end = pos + 1 + length
                if self.state is not _READY:
                    if self.state is State.CLOSED:
                        break
                    handler = LOGIN.get((self.state, kind))
                    if handler is None:
                        raise ProtocolViolation(
                            f"unexpected message {chr(kind)!r} during {self.state.value}: "
                            "the client broke the startup protocol")
                    if end > n:
                        break
                    handler(self, bytes(inbox[pos + 5:end]))
                    pos = end
                    continue
                if end > n:
                    break
                backend = self.backend
                if self.skipping:
                    if kind != _SYNC:
                        pos = end
                        continue
                    self.skipping = False
                    if backend is None:
                        self._write(m.ready_for_query(self.tx_status))
                        pos = end
                        continue
                # The hot path: messages that go to the attached backend unchanged.
                if backend is not None:
                    expect = _VERBATIM.get(kind, _NOT_VERBATIM)
                    if kind == _EXECUTE and self.audit is not None:
                        expect = _NOT_VERBATIM  # _execute notes it for the audit log
                    elif expect is _NOT_VERBATIM and length > 5:  # shorter: _handle() refuses it
                        if kind == _QUERY:
                            # A simple query on a decided database that sets nothing: as it came.
                            if (self.unparsed is not None and self.pending is None and self.audit is None
                                    and inbox.find(0, pos + 5, end) == end - 1
                                    and _MAYBE_SETTINGS.search(inbox, pos + 5, end) is None):
                                backend.expects.append(FORWARD_QUERY)
                                if run < 0:
                                    run = pos
                                pos = end
                                continue
                        elif kind == _DESCRIBE and inbox[pos + 5] == 0x50:
                            expect = FORWARD_DESCRIBE_PORTAL  # Describe of a portal: as it came
                        elif self.unparsed is not None and inbox[pos + 5] == 0:
                            # The unnamed statement on a decided database: no rewriting either.
                            if kind == _PARSE:
                                if self.pending is None and _MAYBE_SETTINGS.search(inbox, pos + 5, end) is None:
                                    self.unnamed = (bytes(inbox[pos:end]), self.unparsed)
                                    self.unnamed_control = None
                                    self.unnamed_token = backend.unnamed_owner = self.fleet.next_token()
                                    self.unnamed_effect = None
                                    expect = FORWARD_PARSE_UNNAMED
                            elif (kind == _BIND and inbox[pos + 6] == 0 and self.unnamed_effect is None
                                  and self.audit is None
                                  and backend.unnamed_owner == self.unnamed_token):
                                expect = FORWARD_BIND
                    if expect is not _NOT_VERBATIM:
                        if expect is not None:
                            backend.expects.append(expect)  # never made up: push() inlined
                        self.batch_open = kind != _SYNC
                        if run < 0:
                            run = pos
                        pos = end
                        continue
                    if run >= 0:
                        backend.send(bytes(inbox[run:pos]))
                        run = -1
                if not self._handle(kind, bytes(inbox[pos:end])):
                    break  # waiting for a backend: the message stays in the inbox
                pos = end
        finally:
            backend = self.backend
            if backend is not None:
                if run >= 0:
                    backend.send(bytes(inbox[run:pos]))
                backend.flush()
            del inbox[:pos]

    def _handle(self, kind: int, raw: bytes) -> bool:
        """One message that needs a decision. False: wait, and handle it again later."""
        if self.copy is not None:
            return self._copy_message(kind, raw)
        portal = self.portal
        if portal is not None and portal.describe and kind != m.EXECUTE:
            portal.describe = False  # a Describe not followed by its Execute: answer it now
            self._wait_for(self._describe_portal(portal))
            return False
        if self.audit is not None and (kind == m.QUERY or kind == m.PARSE):
            self.audit_text = m.decode_query(raw[5:]) if kind == m.QUERY else \
                raw[raw.find(0, 5) + 1:raw.find(0, raw.find(0, 5) + 1)].decode(errors="replace")
        if self.console is not None:
            return self._console_message(kind, raw)
        try:
            if self.tx_status == _E and self.deferred_begin is not None and kind in _STATEMENT_MESSAGES:
                self._aborted(kind, raw)  # a failed fan-out ended it, on no backend
            if kind == m.QUERY:
                return self._query(raw)
            if kind == m.PARSE:
                return self._parse(raw)
            if kind == m.BIND:
                return self._bind(raw)
            if kind == m.DESCRIBE:
                return self._describe(raw)
            if kind == m.CLOSE:
                return self._close(raw)
            if kind == m.EXECUTE:
                return self._execute(raw)
            if kind == m.SYNC:
                self.control_portal = None
                self.portal = None  # the implicit transaction ends, and its portals with it
                self.batch_open = False
                self._write(m.ready_for_query(self.tx_status))
                return True
            if kind in (m.FLUSH, m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL):
                return True  # nothing in flight: nothing to flush or copy
            if kind == m.TERMINATE:
                self._hang_up()
                return True
            if kind == m.FUNCTION_CALL:
                return self._function_call(raw)
            raise ProtocolViolation(f"invalid frontend message type {kind}")
        except ClientError as exc:
            if isinstance(exc, ProtocolViolation):
                raise
            self._refuse(exc, simple=kind == m.QUERY)
            return True
        except BackendError as exc:
            self._refuse(exc, simple=kind == m.QUERY)
            return True

    # ------------------------------------------------------------------ login

    def _start_tls(self) -> None:
        """Answered "S": the TLS handshake, then the startup packet over it."""
        assert self.transport is not None
        self.transport.pause_reading()  # the ClientHello is the TLS layer's, not ours
        self.waiting = True
        self.wait_task = asyncio.get_running_loop().create_task(self._handshake(self.transport))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        assert self.fleet.tls is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                raw, self, self.fleet.tls, server_side=True, ssl_handshake_timeout=LOGIN_TIMEOUT)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("TLS handshake with client %s failed: %s", self.peer, exc)
            self.wait_task = None
            raw.close()
            self.connection_lost(None)  # TLS never reached this protocol: it will not be told
            return
        self.wait_task = None
        if transport is None or self.state is State.CLOSED:
            return
        self.transport = transport  # type: ignore[assignment]
        self.tls = True
        self.waiting = False
        if self.inbox:
            self._process()

    def _begin_login(self, params: dict[str, str]) -> None:
        tls = self.config.listen.tls
        if not self.tls and tls is not None and (tls.required or self.config.listen.auth == "password"):
            raise AuthFailed("28000", "pgfleet accepts only TLS connections"
                             + (" for cleartext password auth" if not tls.required else ""),
                             hint="connect with sslmode=require (or verify-full)")
        if "replication" in params and params["replication"] not in ("false", "off", "no", "0"):
            raise ProxyError("0A000", "replication connections are not supported by pgfleet",
                             hint="connect to the database directly for replication")
        user = params.get("user")
        if not user:
            raise AuthFailed("28000", "no PostgreSQL user name specified in startup packet",
                             hint="give the key id as the user name")
        limit = self.config.listen.max_client_connections
        if limit is not None and self.fleet.clients > limit:
            raise ProxyError("53300", "sorry, too many clients already",
                             hint=f"pgfleet takes {limit} client connections (listen.max_client_connections): "
                                  "close idle ones, or raise the limit")
        self.user = user
        self.database = params.get("database") or user
        self.settings = session_settings(params)
        self.key = self.fleet.keys.get(user)
        method = self.config.listen.auth
        if method == "scram-sha-256":
            self._scram = ScramExchange(user, self.key)
            self._write(m.auth_sasl(["SCRAM-SHA-256"]))
            self.state = State.SASL_INITIAL
        elif method == "md5":
            self._md5_salt = secrets.token_bytes(4)
            self._write(m.authentication(m.AUTH_MD5, self._md5_salt))
            self.state = State.PASSWORD
        else:
            self._write(m.authentication(m.AUTH_CLEARTEXT))
            self.state = State.PASSWORD

    def _sasl_initial(self, body: bytes) -> None:
        mechanism, data = m.decode_sasl_initial(body)
        if mechanism != "SCRAM-SHA-256":
            raise ProtocolViolation(f"client selected an invalid SASL authentication mechanism {mechanism!r}")
        assert self._scram is not None
        self._write(m.authentication(m.AUTH_SASL_CONTINUE, self._scram.first(data)))
        self.state = State.SASL_RESPONSE

    def _sasl_response(self, body: bytes) -> None:
        assert self._scram is not None
        final = self._scram.final(body)
        self._write(m.authentication(m.AUTH_SASL_FINAL, final))
        self._authenticated()

    def _password(self, body: bytes) -> None:
        response = m.decode_password(body)
        if self.config.listen.auth == "md5":
            check_md5(self.key, self.user, self._md5_salt, response)
        else:
            check_cleartext(self.key, self.user, response)
        self._authenticated()

    def _authenticated(self) -> None:
        key = self.key
        if key is None:  # the exchanges above never let an unknown key through; be explicit
            raise failed(self.user)
        database = self.database
        fleet_name = self.config.listen.database
        if database == ADMIN_DATABASE:
            if key.role is not Role.ADMIN:
                raise ClientError("42501", f"key {key.id} may not use the admin console",
                                  hint="connect to the admin console with an admin key")
            if self.fleet.console is None:
                raise ClientError("0A000", "the admin console is not available in this process",
                                  hint=f"connect to the fleet database {fleet_name!r}")
            self._open_console()
            return
        if database == fleet_name:
            direct = None
        elif database in self.config.databases:
            if key.role not in (Role.SERVER, Role.ADMIN):
                raise ClientError("42501", f"key {key.id} ({key.role.value}) may not connect to a "
                                  f"database by name", hint=f"connect to the fleet database {fleet_name!r}")
            direct = database
        else:
            raise ClientError("3D000", f'database "{database}" does not exist',
                              hint=f"connect to the fleet database {fleet_name!r} or one of: "
                                   f"{', '.join(self.config.databases)}")
        if key.max_connections is not None:
            if self.fleet.key_clients.get(key.id, 0) >= key.max_connections:
                raise ProxyError("53300", f'too many connections for key "{key.id}"',
                                 hint=f"the key allows {key.max_connections} connections (its max_connections): "
                                      "close idle ones, or raise it")
            self.fleet.key_clients[key.id] = self.fleet.key_clients.get(key.id, 0) + 1
            self.counted_key = key.id
        self.ctx = SessionContext(key, direct)
        self.fixed = self.fleet.router.fixed_database(self.ctx)
        # Statements need no parsing when the database is decided and the key may write.
        self.unparsed = self.fixed if not key.read_only else None
        if self.fixed is not None:
            self.fleet.router.check_database(self.ctx, self.fixed)
        home = self.fleet.router.home_database(self.ctx)
        if key.read_only:
            self.settings.setdefault("default_transaction_read_only", "on")
        self.startup_settings = self.settings
        self._write(m.AUTHENTICATION_OK)
        self.state = State.SETTING_UP
        self.pid, self.secret = self.fleet.new_backend_key()
        self.fleet.sessions[self.pid] = self
        # Take a backend of the home database now: it checks the startup settings and gives
        # the ParameterStatus values to report, spelled as the server spells them.
        self._wait_for(self._setup(home))

    def _open_console(self) -> None:
        """An admin client: the console answers its statements; no backend, no pool."""
        assert self.fleet.console is not None
        self.console = self.fleet.console()
        self.pid, self.secret = self.fleet.new_backend_key()
        self.fleet.sessions[self.pid] = self
        params = dict(self.fleet.pools[self.config.default].params) or {"server_version": "15"}
        params.update({"client_encoding": "UTF8", "application_name": self.settings.get("application_name", ""),
                       "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on"})
        out = [m.AUTHENTICATION_OK, *(m.parameter_status(k, v) for k, v in params.items()),
               m.backend_key_data(self.pid, self.secret), m.ready_for_query(_I)]
        self._write(b"".join(out))
        self.state = State.READY
        if self.login_timer is not None:
            self.login_timer.cancel()
        log.info("admin console: key %s from %s", self.user, self.peer)

    def _console_message(self, kind: int, raw: bytes) -> bool:
        if kind == m.TERMINATE:
            self._hang_up()
            return True
        started = time.monotonic()
        out = self.console.handle(kind, raw)
        if isinstance(out, bytes):
            self._write(out)
            self._audit_console(kind, started, out)
        else:
            self._wait_for(self._console_answer(out, kind, started))
        return True

    async def _console_answer(self, pending: Any, kind: int, started: float) -> None:
        out = await pending
        self._write(out)
        self._audit_console(kind, started, out)

    def _audit_console(self, kind: int, started: float, out: bytes) -> None:
        """An admin command (simple query) in the audit log, as written: it has no literals to hide."""
        if self.audit is not None and kind == m.QUERY:
            self._audit_whole("console", (), started, out)

    async def _setup(self, home: str) -> None:
        pool = self.fleet.pools[home]
        try:
            server = await pool.acquire()
        except ProxyError as exc:
            self._fatal(exc)
            return
        if self.state is State.CLOSED:
            pool.release(server)
            return
        self._attach(server)
        server.flush()
        if server.busy:
            return  # settings are being applied; _setup_done runs at its ReadyForQuery
        self._setup_done(server)

    def _setup_done(self, server: ServerConnection) -> None:
        error = server.injected_error
        if error is not None:
            server.injected_error = None
            self._fatal(ProxyError(error.get("C", "22023"), error.get("M", "invalid startup setting"),
                                   hint="fix the startup options (options=-c name=value) of the connection"))
            return
        out = [m.parameter_status(name, value) for name, value in server.params.items()]
        out.append(m.backend_key_data(self.pid, self.secret))
        out.append(m.ready_for_query(_I))
        self._write(b"".join(out))
        self.state = State.READY
        if self.login_timer is not None:
            self.login_timer.cancel()
        self._maybe_release(server)
        self._resume()

    # ------------------------------------------------------------------ statements

    def _route(self, sql: str, params: Params | None = None) -> Route:
        assert self.ctx is not None
        route = self.fleet.router.route(sql, self.ctx, self.hints, params)
        backend = self.backend
        if route.anywhere and backend is not None and self._engaged(backend) \
                and self.ctx.key.may_use(backend.database):
            return Route(Direct(backend.database), route.write, "inside the transaction", anywhere=True)
        return route

    def _route_database(self, sql: str) -> str:
        if self.unparsed is not None:
            return self.unparsed
        return _one_database(self._route(sql))

    def _query(self, raw: bytes) -> bool:
        # On a decided database the text is not even decoded: the backend checks it.
        if self.unparsed is not None:
            if raw[-1] != 0 or raw.find(0, 5) != len(raw) - 1:
                raise ProtocolViolation("invalid Query message: the text must end at its one zero byte")
            database = self.unparsed
            effect = self._effect(raw, 5)
            if effect is not None and self._fleet_settings(effect):
                return True
        else:
            sql = m.decode_query(raw[5:])
            if (self.backend is None or not self._engaged(self.backend)) and self._transaction_control(sql, raw):
                return True
            analysis = self.fleet.router.analysis(sql)
            if self.others:
                end = self._across(sql, analysis)
                if end is not None:
                    return self._end_across(end, simple=True)
            if analysis.touches_settings and self._fleet_settings(analysis):
                return True
            route = self._route(sql)
            if not isinstance(route.target, Direct):
                return self._scatter(sql, route, analysis)
            database = route.target.database
            effect = analysis if analysis.touches_session else None
            if not route.write and database in self.fleet.replicas.sets and analysis.replica_safe:
                database = self._replica_or(database)
        backend = self._backend_for(database)
        if backend is None:
            return False
        if effect is not None:
            self._follow(effect, backend)
        if self.audit is not None:
            self._audit_start(raw[5:-1].decode(errors="replace"), database, simple=True)
        backend.push(FORWARD_QUERY)
        backend.send(raw)
        return True

    def _fleet_settings(self, analysis: Analysis) -> bool:
        """SET / RESET pgfleet.*: the session's hints, answered here and never sent on.

        True when the query was exactly that and is answered. RESET ALL clears the hints too,
        and goes on to the backend.
        """
        changes = [c for stmt in analysis.statements for c in stmt.settings]
        if any(c.name is None for c in changes):
            self.hint_values = {}
            self.hints = None
        fleet = [c for stmt in analysis.statements for c in stmt.fleet_settings]
        if not fleet:
            return False
        assert self.key is not None
        if len(analysis.statements) != 1 or len(changes) != len(fleet):
            raise ClientError("0A000", "SET pgfleet.* must be a query of its own",
                              hint="send it separately from other statements")
        if self.key.role not in (Role.SERVER, Role.ADMIN):
            raise ClientError("42501", f"key {self.key.id} ({self.key.role.value}) may not set pgfleet "
                              "routing hints", hint="hints are for server and admin keys")
        values = dict(self.hint_values)
        for change in fleet:
            assert change.name is not None
            name = change.name.removeprefix("pgfleet.")
            if name not in HINT_NAMES:
                raise ClientError("42704", f'unrecognized configuration parameter "{change.name}"',
                                  hint=f"pgfleet's settings: {', '.join('pgfleet.' + n for n in HINT_NAMES)}")
            if change.value is None or change.value == "":
                values.pop(name, None)
            else:
                values[name] = change.value
        try:
            hints = hints_from(values)
        except ValueError as exc:
            raise ClientError("22023", str(exc)) from None
        self.hint_values = values
        self.hints = hints or None
        tag = analysis.statements[0].command if analysis.statements[0].command != "SET" else (
            "RESET" if all(c.value is None for c in fleet) else "SET")
        self._made_up(Answer.QUERY, m.command_complete(tag) + m.ready_for_query(self.tx_status))
        return True

    def _effect(self, raw: bytes, start: int) -> Analysis | None:
        """The analysis of a statement on a decided database, if it may change settings."""
        if self.pending is None and _MAYBE_SETTINGS.search(raw, start) is None:
            return None
        end = raw.find(0, start)
        analysis = self.fleet.router.analysis(raw[start:end].decode(errors="replace"))
        return analysis if analysis.touches_session else None

    def _control_of(self, client_name: bytes) -> tuple[str, str] | None:
        """(text, first word) of a statement that is BEGIN, COMMIT, ...; None for others."""
        if not client_name:
            if self.unnamed_control is None or self.unnamed is None:
                return None
            return self.unnamed_control, _first_word(self.unnamed_control)
        prepared = self.statements.get(client_name)
        if prepared is None or prepared.control is None:
            return None
        return prepared.query, prepared.control

    def _deferrable(self, word: str) -> bool:
        """Whether pgfleet answers this BEGIN/COMMIT/... itself: a BEGIN before any statement
        of a transaction, or the end of one that never reached a database."""
        backend = self.backend
        idle = backend is None or not self._engaged(backend)
        if word in ("BEGIN", "START"):
            return self.tx_status == _I and self.deferred_begin is None and idle
        return self.deferred_begin is not None and idle

    def _aborted(self, kind: int, raw: bytes) -> None:
        """In a transaction that failed before reaching a database, only its end is taken."""
        if kind == m.QUERY or kind == m.PARSE:
            sql = m.decode_query(raw[5:]) if kind == m.QUERY else m.decode_parse(raw[5:]).query
            if _first_word(sql) in _TRANSACTION_ENDS:
                return  # _transaction_control, or the extended protocol's control path, ends it
        elif kind == m.BIND:
            portal_end = raw.find(0, 5)
            name_end = raw.find(0, portal_end + 1)
            control = self._control_of(raw[portal_end + 1:name_end]) if portal_end >= 0 and name_end >= 0 else None
            if control is not None and control[1] in _TRANSACTION_ENDS:
                return
        elif self.control_portal is not None:  # Describe or Execute of the bound COMMIT/ROLLBACK
            return
        raise _in_failed_transaction()

    def _transaction_control(self, sql: str, raw: bytes) -> bool:
        """BEGIN on the fleet waits for its first routed statement, which picks the database.

        pgfleet answers it at once, and sends it (as it came) to the backend of the first
        statement that needs one. COMMIT or ROLLBACK before any such statement ends it here.
        """
        word = _first_word(sql)
        if word not in _TRANSACTION_WORDS:
            return False
        analysis = self.fleet.router.analysis(sql)
        if len(analysis.statements) != 1 or analysis.statements[0].kind is not Kind.TRANSACTION:
            return False
        if word in ("BEGIN", "START") and self.tx_status == _I:
            self.deferred_begin = raw
            self.tx_status = _T
            self._write(m.command_complete("BEGIN") + m.ready_for_query(_T))
            return True
        if self.deferred_begin is not None and word in _TRANSACTION_ENDS:
            self.deferred_begin = None
            tag = "ROLLBACK" if self.tx_status == _E else _TRANSACTION_ENDS[word]  # as PostgreSQL answers COMMIT
            self.tx_status = _I
            self._write(m.command_complete(tag) + m.ready_for_query(_I))
            return True
        return False

    def _across(self, sql: str, analysis: Analysis) -> str | None:
        """In a transaction on several databases: "COMMIT" or "ROLLBACK" for a statement that
        ends it (pgfleet ends it everywhere), None for others. What cannot span databases is
        refused: savepoints, PREPARE TRANSACTION, SET, COMMIT AND CHAIN."""
        names = ", ".join(sorted([*self.others, *([self.backend.database] if self.backend else [])]))
        for stmt in analysis.statements:
            kind = stmt.transaction
            if kind in ("SAVEPOINT", "RELEASE", "ROLLBACK_TO", "PREPARE", "COMMIT_PREPARED", "ROLLBACK_PREPARED"):
                what = {"ROLLBACK_TO": "ROLLBACK TO SAVEPOINT", "PREPARE": "PREPARE TRANSACTION"}.get(
                    kind, kind.replace("_", " "))
                raise ClientError("0A000", f"{what} is not supported in a transaction on several databases "
                                  f"({names})", hint="keep savepoints to transactions on one database; "
                                  "pgfleet commits this one in two phases itself")
            if stmt.command == "SET" or stmt.settings or stmt.opaque_settings:
                raise ClientError("0A000", f"a transaction on several databases ({names}) cannot change "
                                  "settings: the SET would hold on one of them only",
                                  hint="SET before BEGIN, or SET pgfleet-wide with the key's settings")
        ends = [stmt.transaction for stmt in analysis.statements if stmt.transaction in ("COMMIT", "ROLLBACK")]
        if not ends:
            return None
        if len(analysis.statements) != 1 or "CHAIN" in sql.upper():
            raise ClientError("0A000", f"a transaction on several databases ({names}) must end with a "
                              "COMMIT or ROLLBACK of its own (no other statements, no AND CHAIN)",
                              hint="send COMMIT (or ROLLBACK) alone")
        return ends[0]

    def _end_across(self, word: str, simple: bool) -> bool:
        """COMMIT (in two phases) or ROLLBACK of a transaction on several databases."""
        backend = self.backend
        if backend is not None and backend.expects:
            if self.batch_open:
                raise ClientError("0A000", "the end of a transaction on several databases must follow a Sync",
                                  hint="send Sync before COMMIT")
            self.waiting = True  # its answers first: resumes when it is idle (backend_idle)
            return False
        self.control_portal = None
        servers = ([backend] if backend is not None else []) + list(self.others.values())
        self.backend = None
        self.others = {}
        self._wait_for(self._finish_across(servers, word, simple))
        return True

    async def _finish_across(self, servers: list[ServerConnection], word: str, simple: bool) -> None:
        self.fleet.counted("cross_database_transaction")
        started = time.monotonic()
        scatter = Scatter.adopt(self.fleet.pools, servers, self.fleet.coordinator)
        failed = any(server.tx_status == _E for server in servers)
        tag = "ROLLBACK" if failed or word == "ROLLBACK" else "COMMIT"
        reply = m.command_complete(tag)
        try:
            if tag == "COMMIT":
                await scatter.commit()
            else:
                await scatter.rollback()
        except ProxyError as exc:
            reply = answer_of(exc)
            self.skipping = not simple
        finally:
            for server in servers:
                server.settings = DIRTY if self.pending is not None or self.tx_sets else server.settings
            scatter._give_back()
        self.pending = None
        self.pending_opaque = False
        self.tx_sets = False
        self.tx_status = _I
        self.audit_text = word
        self._audit_whole("two_phase_commit" if tag == "COMMIT" else "rollback",
                          tuple(server.database for server in servers), started, reply)
        self._write(reply + m.ready_for_query(_I) if simple else reply)

    def _function_call(self, raw: bytes) -> bool:
        backend = self._backend_for(self.fixed or self.config.default)
        if backend is None:
            return False
        backend.push(FORWARD_QUERY)
        backend.send(raw)
        return True

    def _parse(self, raw: bytes) -> bool:
        if self.unparsed is not None and raw[5] == 0:  # the unnamed statement, decided database
            backend = self._backend_for(self.unparsed)
            if backend is None:
                return False
            self.batch_open = True
            self.unnamed_effect = self._effect(raw, 6)
            _no_fleet_settings(self.unnamed_effect)
            self.unnamed = (raw, self.unparsed)
            self.unnamed_control = None
            self.unnamed_token = backend.unnamed_owner = self.fleet.next_token()
            backend.push(FORWARD_PARSE_UNNAMED)
            backend.send(raw)
            return True
        parse = m.decode_parse(raw[5:])
        routed = False
        if self.unparsed is not None:
            database = self.unparsed
        else:
            route = self._route(parse.query)
            # A statement for several databases runs at Execute, as one scatter or gather (_bind).
            routed = route.needs_params or route.fanout or (route.write and not isinstance(route.target, Direct))
            if not isinstance(route.target, Direct):
                _no_copy(self.fleet.router.analysis(parse.query), route.target)
            if route.fanout:  # what cannot be merged is refused at Parse, as PostgreSQL's errors come
                _limit_types(self.fleet.router.fanout_plan(parse.query, self.fleet.router.analysis(parse.query)),
                             parse.param_types)
            database = _first(route) if routed else _one_database(route)
            if not routed and not parse.name and database in self.fleet.replicas.sets \
                    and self.fleet.router.analysis(parse.query).replica_safe:
                database = self._replica_or(database)
        key = parse.name.encode()
        if self.unparsed is None:
            analysis = self.fleet.router.analysis(parse.query)
            effect = analysis if analysis.touches_session else None
        else:
            effect = self._effect(raw, 5 + len(key) + 1)
        _no_fleet_settings(effect)
        if key and key in self.statements:
            raise ClientError("42P05", f'prepared statement "{parse.name}" already exists',
                              hint="Close it first, or use another name")
        if self.others:
            self._across(parse.query, self.fleet.router.analysis(parse.query))
        control = _control_word(parse.query, self.fleet.router.analysis(parse.query)) \
            if self.unparsed is None else None
        if control is not None:
            # BEGIN, COMMIT, ...: a BEGIN must not pick a database (the first statement does),
            # so it is parsed lazily where it runs, if it ever reaches a backend (see _bind).
            name = self.fleet.statement_name(parse.query, parse.param_types)
            if parse.name:
                self.statements[key] = Prepared(name, parse.query, parse.param_types, database, effect,
                                                control=control)
            else:
                self.unnamed_effect = effect
                self.unnamed = (raw, database)
                self.unnamed_routed = None
                self.unnamed_control = parse.query
                self.unnamed_token = self.fleet.next_token()
            self._made_up(Answer.PARSE, m.PARSE_COMPLETE_MSG)
            return True
        if routed:
            # Where it runs depends on its parameters: each Bind prepares it there. pglast has
            # parsed it already, so the client's ParseComplete can come at once.
            name = self.fleet.statement_name(parse.query, parse.param_types)
            if parse.name:
                self.statements[key] = Prepared(name, parse.query, parse.param_types, database, effect, True)
            else:
                self.unnamed_effect = effect
                self.unnamed = (raw, database)
                self.unnamed_routed = parse.query
                self.unnamed_control = None
                self.unnamed_token = self.fleet.next_token()
            self._made_up(Answer.PARSE, m.PARSE_COMPLETE_MSG)
            return True
        if parse.name and self.backend is None:
            # A statement some backend already parsed needs no backend now: it is prepared
            # lazily where it is bound. This also spares a pooled backend for clients (like
            # pgbench) that prepare synchronously while others of theirs hold transactions.
            name = self.fleet.statement_name(parse.query, parse.param_types)
            if name in self.fleet.pools[database].parsed_ok:
                self.statements[key] = Prepared(name, parse.query, parse.param_types, database, effect)
                self._write(m.PARSE_COMPLETE_MSG)
                return True
        backend = self._backend_for(database)
        if backend is None:
            return False
        self.batch_open = True
        if not parse.name:
            self.unnamed_effect = effect
            self.unnamed = (raw, database)
            self.unnamed_routed = None
            self.unnamed_control = None
            self.unnamed_token = backend.unnamed_owner = self.fleet.next_token()
            backend.push(FORWARD_PARSE_UNNAMED)
            backend.send(raw)
            return True
        name = self.fleet.statement_name(parse.query, parse.param_types)
        self.statements[key] = Prepared(name, parse.query, parse.param_types, database, effect)
        if name in backend.prepared:
            backend.push(Expect(Answer.PARSE, Fate.MADE_UP, reply=m.PARSE_COMPLETE_MSG))
        else:
            backend.prepared.add(name)
            backend.push(Expect(Answer.PARSE, statement=name))
            backend.send(m.parse(name, parse.query, parse.param_types))
        return True

    def _prepared_on(self, client_name: bytes, bound: str | None = None
                     ) -> tuple[ServerConnection | None, Prepared | None]:
        """The backend that runs a client's statement, with the statement prepared on it.

        The statement is None for the unnamed one, which keeps its name on the backend. A
        statement whose shard key is a parameter runs on ``bound``, the database its Bind
        chose; without one (Describe) on the shard its route named at Parse.
        """
        if not client_name:
            if self.unnamed is None:
                raise ClientError("26000", "unnamed prepared statement does not exist",
                                  hint="send Parse before Bind")
            parse_raw, database = self.unnamed
            backend = self._backend_for(bound or database)
            if backend is not None and backend.unnamed_owner != self.unnamed_token:
                backend.unnamed_owner = self.unnamed_token
                backend.push(DROP_PARSE)
                backend.send(parse_raw)
            return backend, None
        prepared = self._named(client_name)
        backend = self._backend_for(bound or prepared.database)
        if backend is not None and prepared.backend_name not in backend.prepared:
            backend.prepared.add(prepared.backend_name)
            backend.push(Expect(Answer.PARSE, Fate.DROP, statement=prepared.backend_name))
            backend.send(m.parse(prepared.backend_name, prepared.query, prepared.param_types))
        return backend, prepared

    def _named(self, client_name: bytes) -> Prepared:
        prepared = self.statements.get(client_name)
        if prepared is None:
            name = client_name.decode(errors="replace")
            raise ClientError("26000", f'prepared statement "{name}" does not exist',
                              hint="send Parse for it first")
        return prepared

    def _bind(self, raw: bytes) -> bool:
        # Only the statement name is rewritten; the rest of the Bind goes as it came.
        portal_end = raw.find(0, 5)
        name_end = raw.find(0, portal_end + 1) if portal_end >= 0 else -1
        if name_end < 0:
            raise ProtocolViolation("invalid Bind message: unterminated string")
        client_name = raw[portal_end + 1:name_end]
        bound = None
        control = self._control_of(client_name)
        if control is not None:
            text, word = control
            backend = self.backend
            if self.others and word in _TRANSACTION_ENDS:  # ended everywhere at Execute (_end_across)
                self._across(text, self.fleet.router.analysis(text))
                if backend is not None:
                    if backend.expects:
                        if self.batch_open:
                            raise ClientError("0A000", "the end of a transaction on several databases must "
                                              "follow a Sync", hint="send Sync before COMMIT")
                        self.waiting = True  # its answers first: resumes when it is idle
                        return False
                    # Every participant waits apart, so that the portal's Describe and Execute
                    # come here rather than going on to a backend.
                    self.others[backend.database] = backend
                    self.backend = None
                self.control_portal = (raw[5:portal_end].decode(errors="replace"), text, word)
                self._made_up(Answer.BIND, m.BIND_COMPLETE_MSG)
                return True
            if self._deferrable(word):
                if backend is not None:
                    self._detach(backend)  # parked: the transaction's first statement picks one
                self.control_portal = (raw[5:portal_end].decode(errors="replace"), text, word)
                self._made_up(Answer.BIND, m.BIND_COMPLETE_MSG)
                return True
            if backend is not None and self._engaged(backend):
                bound = backend.database  # COMMIT and the like end the transaction where it runs
        routed = self._routed_text(client_name)
        if routed is not None:
            formats, values = m.bind_parameters(raw[name_end + 1:])
            route = self._route(routed[0], Params(values, formats))
            if not isinstance(route.target, Direct):
                if route.fanout or self.fleet.router.analysis(routed[0]).statements[0].command == "SELECT":
                    return self._bind_gather(raw, portal_end, name_end, routed, route)
                return self._bind_scatter(raw, portal_end, name_end, routed, route)
            bound = route.target.database
        elif bound is None and self.fleet.replicas.sets:
            bound = self._replica_bind(client_name)
        backend, prepared = self._prepared_on(client_name, bound)
        if backend is None:
            return False
        effect = self.unnamed_effect if prepared is None else prepared.effect
        if effect is not None:
            self._follow(effect, backend)
        if self.audit is not None:
            text = prepared.query if prepared is not None else \
                m.decode_parse(self.unnamed[0][5:]).query if self.unnamed is not None else ""
            self.audit_portals[raw[5:portal_end].decode(errors="replace")] = text
        self.batch_open = True
        backend.push(FORWARD_BIND)
        if prepared is None:
            backend.send(raw)
        else:
            body = raw[5:portal_end + 1] + prepared.wire_name + raw[name_end + 1:]
            backend.send(m.message(m.BIND, body))
        return True

    def _routed_text(self, client_name: bytes) -> tuple[str, bytes, Analysis | None] | None:
        """(text, parameter types, effect) of a statement whose Bind decides where it runs."""
        if not client_name:
            if self.unnamed_routed is None or self.unnamed is None:
                return None
            return self.unnamed_routed, m.decode_parse(self.unnamed[0][5:]).param_types, self.unnamed_effect
        prepared = self._named(client_name)
        return (prepared.query, prepared.param_types, prepared.effect) if prepared.routed else None

    def _bind_scatter(self, raw: bytes, portal_end: int, name_end: int,
                      statement: tuple[str, bytes, Analysis | None], route: Route) -> bool:
        """A Bind whose statement writes on several databases: a portal kept here.

        It runs at Execute, as Parse/Bind/Execute on every database in one scatter (see
        ``_scatter``); pgfleet answers the Bind itself.
        """
        query, param_types, effect = statement
        target = route.target
        assert not isinstance(target, Direct)
        if route.fanout or not route.write:
            _one_database(route)  # refused until the federated SELECT
        if route.row_shards is not None and len(set(route.row_shards)) > 1:
            raise ClientError("0A000", f"an INSERT whose rows go to several shards ({route.reason}) must be "
                              "a simple query: in the extended protocol each shard's part would leave "
                              "some parameters unused", hint="insert one row per statement (executemany "
                              "pipelines them), or send the INSERT without parameters")
        self._may_scatter(target, effect)
        self._one_portal(raw[5:portal_end].decode(errors="replace"))
        bound = m.parse("", query, param_types) + m.message(m.BIND, b"\0\0" + raw[name_end + 1:])
        self.portal = _Portal(raw[5:portal_end].decode(errors="replace"), target.databases, bound, bound,
                              route.replicated)
        self.portal.text = query
        self._write(m.BIND_COMPLETE_MSG)
        return True

    def _bind_gather(self, raw: bytes, portal_end: int, name_end: int,
                     statement: tuple[str, bytes, Analysis | None], route: Route) -> bool:
        """A Bind of a SELECT that reads several databases: a portal kept here, merged at Execute.

        Every shard runs the plan's shard query with the client's parameters and answers in
        text; the merger writes the client's result formats.
        """
        query, param_types, effect = statement
        target = route.target
        assert not isinstance(target, Direct)
        plan = self.fleet.router.fanout_plan(query, self.fleet.router.analysis(query))
        self._may_scatter(target, effect, read=True)
        self._one_portal(raw[5:portal_end].decode(errors="replace"))
        params, formats = m.bind_results(raw[name_end + 1:])
        if plan.limit_param is not None or plan.offset_param is not None:
            plan = plan.bound(_limits(*m.bind_parameters(params + b"\0\0"), plan, param_types))
        original = m.parse("", query, param_types) + m.message(m.BIND, b"\0\0" + raw[name_end + 1:])
        shard_query = m.parse("", plan.sql, param_types) + m.message(m.BIND, b"\0\0" + params + b"\0\0")
        self.portal = _Portal(raw[5:portal_end].decode(errors="replace"), target.databases, original,
                              shard_query, False, plan, formats)
        self.portal.text = query
        self._write(m.BIND_COMPLETE_MSG)
        return True

    def _one_portal(self, name: str) -> None:
        """pgfleet keeps one portal for several databases at a time (binding it again replaces it)."""
        if self.portal is not None and self.portal.name != name:
            raise ClientError("0A000", f'portal "{self.portal.name}" for several databases is still open: pgfleet '
                              f'keeps one such portal at a time, so "{name}" cannot be bound beside it',
                              hint="Execute the first portal (or Close it) before binding the next")

    def _may_scatter(self, target: Multi | All, effect: Analysis | None, read: bool = False) -> None:
        """A statement for several databases runs alone, outside transactions; refused otherwise.

        A read may also run in a transaction that has not reached any database yet (drivers
        that BEGIN before every statement): in READ COMMITTED each statement has its own
        snapshot anyway. REPEATABLE READ and SERIALIZABLE would need one snapshot for all.
        """
        backend = self.backend
        deferred = self.deferred_begin is not None and (backend is None or backend.tx_status == _I) \
            and _SNAPSHOT_LEVELS.search(self.deferred_begin) is None
        if (self.tx_status != _I and not (read and deferred)) or (backend is not None and backend.tx_status != _I):
            raise ClientError("0A000", f"a statement on several databases ({', '.join(target.databases)}) "
                              "cannot run inside a transaction block",
                              hint="run it outside BEGIN ... COMMIT (it then commits on all or none "
                                   "of them), or bind the shard key")
        if effect is not None and effect.touches_settings:
            raise ClientError("0A000", "a query string for several databases cannot also change settings",
                              hint="send SET separately")
        pins = [p for stmt in effect.statements for p in stmt.pins] if effect is not None else []
        if pins:
            raise ClientError("0A000", f"a statement for several databases ({', '.join(target.databases)}) "
                              f"cannot leave session state ({', '.join(sorted(set(pins)))}) on each: one "
                              "client keeps at most one backend", hint="bind the shard key, or run it "
                              "on one database (/* pgfleet: database=NAME */)")
        if backend is not None:
            if backend.expects:  # its answers would come after the scatter's: out of order
                raise ClientError("0A000", f"one pipeline (messages up to Sync) cannot use database "
                                  f"{backend.database} and then several databases",
                                  hint="send a Sync before a statement for several databases")
            if not self.pins:  # a pinned backend stays; the others are taken from the pools
                self._detach(backend)  # parked here, or done with: the scatter takes its own

    def _execute(self, raw: bytes) -> bool:
        portal = self.portal
        name, max_rows = m.decode_execute(raw[5:])
        control = self.control_portal
        if control is not None and name == control[0]:
            word = control[2]
            if self.others and word in _TRANSACTION_ENDS:
                return self._end_across(_TRANSACTION_ENDS[word], simple=False)
            self.control_portal = None
            if word in ("BEGIN", "START"):
                self.deferred_begin = m.query(control[1])
                self.tx_status = _T
                tag = "BEGIN"
            else:
                self.deferred_begin = None
                tag = "ROLLBACK" if self.tx_status == _E else _TRANSACTION_ENDS[word]
                self.tx_status = _I
            self._made_up(Answer.EXECUTE, m.command_complete(tag))
            return True
        if portal is None or name != portal.name:
            backend = self.backend
            if self.audit is not None and backend is not None:  # off the fast path only to be seen
                self._audit_start(self.audit_portals.get(name, ""), backend.database, simple=False)
                self.batch_open = True
                backend.push(FORWARD_EXECUTE)
                backend.send(raw)
                return True
            raise ClientError("34000", f'portal "{name}" does not exist: Execute needs a Bind first in '
                              "the same transaction")
        self.audit_text = portal.text
        statement = portal.messages + m.describe(0x50, "") + m.execute("") + m.SYNC_MSG
        if portal.plan is not None:
            if portal.rows is not None:
                self._write(portal.next_rows(max_rows))
                return True
            self._wait_for(self._run_gather(portal.plan, portal.databases, statement, portal, max_rows))
            return True
        described, portal.describe = portal.describe, False
        self.portal = None
        if max_rows > 0:
            raise ClientError("0A000", f"Execute with a row limit ({max_rows}) is not supported for a "
                              f"statement that writes on several databases ({', '.join(portal.databases)})",
                              hint="fetch all its rows at once (no fetch size)")
        self._wait_for(self._run_scatter({db: statement for db in portal.databases}, portal.replicated,
                                         describe=described))
        return True

    async def _describe_apart(self, query: str, param_types: bytes) -> None:
        """Describe of a statement routed at Bind: ParameterDescription and RowDescription (or
        NoData) from the first shard it may run on, on a backend outside the client's transaction."""
        database = _first(self._route(query))
        statement = m.parse("", query, param_types) + m.describe(0x53, "") + m.SYNC_MSG
        try:
            answer = await Scatter().run(self.fleet.pools, {database: statement}, self.settings, True,
                                         keep=_STATEMENT_DESCRIPTION)
        except ProxyError as exc:
            answer = answer_of(exc)
            self.skipping = True
        self._write(answer)

    async def _describe_portal(self, portal: _Portal) -> None:
        """Describe of a portal for several databases: the first shard describes the client's
        own statement, bound as the client bound it (its formats too), without running it."""
        statement = portal.describe_messages + m.describe(0x50, "") + m.SYNC_MSG
        try:
            answer = await Scatter().run(self.fleet.pools, {portal.databases[0]: statement}, self.settings,
                                         True, describe=True)
        except ProxyError as exc:
            answer = answer_of(exc)
            self.skipping = True
        self._write(answer)

    def _describe(self, raw: bytes) -> bool:
        kind, name = m.decode_target(raw[5:], "Describe")
        control = self.control_portal
        if kind == 0x50 and control is not None and name == control[0]:
            self._made_up(Answer.DESCRIBE_PORTAL, m.NO_DATA_MSG)
            return True
        if kind == 0x53 and self._control_of(name.encode()) is not None \
                and (self.backend is None or not self._engaged(self.backend)):
            self._made_up(Answer.DESCRIBE_STATEMENT, m.message(m.PARAMETER_DESCRIPTION, b"\0\0") + m.NO_DATA_MSG)
            return True
        if kind == 0x50 and self.portal is not None and name == self.portal.name:
            # Answered with the rows when its Execute comes next (drivers send them together),
            # else by a round of its own before the next message (see _handle).
            self.portal.describe = True
            return True
        if kind == 0x50:  # a portal: only exists on the backend that bound it
            if self.backend is None:
                raise ClientError("34000", f'portal "{name}" does not exist', hint="Bind it first")
            self.backend.push(FORWARD_DESCRIBE_PORTAL)
            self.backend.send(raw)
            return True
        routed = self._routed_text(name.encode())
        parked = self.backend is None or (self.backend.tx_status == _I and not self.backend.expects)
        if routed is not None and self.deferred_begin is not None and parked:
            # A transaction that has not reached a database yet must not be pinned by a Describe
            # (asyncpg describes every statement): the first shard describes it apart.
            self._wait_for(self._describe_apart(routed[0], routed[1]))
            return True
        backend, prepared = self._prepared_on(name.encode())
        if backend is None:
            return False
        self.batch_open = True
        backend.push(FORWARD_DESCRIBE_STATEMENT)
        backend.send(raw if prepared is None else m.describe(kind, prepared.backend_name))
        return True

    def _close(self, raw: bytes) -> bool:
        kind, name = m.decode_target(raw[5:], "Close")
        backend = self.backend
        if kind == 0x53:
            # Backend-side statements are shared and stay prepared; only the client's name goes.
            self.statements.pop(name.encode(), None)
            if not name:
                self.unnamed = None
        elif self.portal is not None and name == self.portal.name:
            self.portal = None
        elif backend is not None:
            backend.push(FORWARD_CLOSE)
            backend.send(raw)
            return True
        self._made_up(Answer.CLOSE, m.CLOSE_COMPLETE_MSG)
        return True

    def _scatter(self, sql: str, route: Route, analysis: Analysis) -> bool:
        """A simple query for several databases: run it on all of them, answer once."""
        target = route.target
        assert not isinstance(target, Direct)
        spec = copy_in(sql) if analysis.statements[0].command == "COPY" else None
        if spec is not None and spec.table in self.fleet.router.sharded and route.write:
            self._may_scatter(target, analysis)
            self._wait_for(self._begin_copy(spec, target.databases, m.query(sql)))
            return True
        out = copy_out(sql) if analysis.statements[0].command == "COPY" and not route.write else None
        if out is not None:  # COPY (SELECT ...) TO STDOUT: the merged SELECT, as COPY rows
            plan = self.fleet.router.fanout_plan(out.select, self.fleet.router.analysis(out.select))
            self._may_scatter(target, analysis, read=True)
            self._wait_for(self._run_gather(plan, target.databases, m.query(plan.sql), copy=CopyOutWriter(out)))
            return True
        _no_copy(analysis, target)
        if route.fanout or analysis.statements[0].command == "SELECT":  # FOR UPDATE, INTO: refused there
            plan = self.fleet.router.fanout_plan(sql, analysis)
            self._may_scatter(target, analysis, read=True)
            self._wait_for(self._run_gather(plan, target.databases, m.query(plan.sql)))
            return True
        if not route.write:
            _one_database(route)
        self._may_scatter(target, analysis)
        if route.row_shards is not None:
            texts = split_insert(sql, route.row_shards)
            statements = {db: m.query(texts[db]) for db in target.databases}
        else:
            statements = {db: m.query(sql) for db in target.databases}
        self._wait_for(self._run_scatter(statements, route.replicated))
        return True

    async def _begin_copy(self, spec: CopyIn, databases: tuple[str, ...], statement: bytes) -> None:
        """COPY FROM STDIN into a sharded table: every shard's COPY started, then the client's."""
        self.fleet.counted("copy")
        router = self.fleet.router
        try:
            columns = spec.columns or tuple(await self.fleet.columns_of(databases[0], spec.table))
            if not columns:
                raise ClientError("42P01", f'relation "{spec.table}" does not exist')
            key = router.sharded[spec.table]
            if key not in columns:
                raise ClientError("0A000", f'COPY into sharded table "{spec.table}" must include its shard key '
                                  f'"{key}": pgfleet sends each row to the shard of its key',
                                  hint=f"add {key} to the COPY column list")
            copy = CopySplit(router, spec.table, RowSplitter(spec.format, columns.index(key)), self.fleet.coordinator)
            await copy.open(self.fleet.pools, databases, statement, self.settings)
        except ProxyError as exc:
            self._write(answer_of(exc) + m.ready_for_query(self.tx_status))
            return
        self.copy = copy
        self._write(m.copy_in_response(len(columns)))

    def _copy_message(self, kind: int, raw: bytes) -> bool:
        """A client message while its COPY into a sharded table takes rows."""
        copy = self.copy
        assert copy is not None
        if kind == m.COPY_DATA:
            copy.feed(raw[5:])
            return True
        if kind in (m.FLUSH, m.SYNC):  # PostgreSQL ignores them during COPY too
            return True
        self.copy = None
        reason = None
        if kind == m.COPY_FAIL:
            reason = raw[5:].rstrip(b"\0").decode(errors="replace")
        elif kind != m.COPY_DONE:
            copy.failure = ClientError("08P01", f"unexpected message type 0x{kind:02X} during COPY from stdin")
        self._wait_for(self._end_copy(copy, reason))
        return True

    async def _end_copy(self, copy: CopySplit, reason: str | None) -> None:
        started = time.monotonic()
        answer = await copy.finish(reason)
        self._audit_whole("copy", tuple(leg.database for leg in copy.legs.values()), started, answer)
        self._write(answer + m.ready_for_query(self.tx_status))

    async def _run_scatter(self, statements: dict[str, bytes], replicated: bool,
                           describe: bool | None = None) -> None:
        """``describe`` None: a simple query, answered up to ReadyForQuery. True or False: an
        Execute (with the client's Describe of the portal or without), answered up to its
        CommandComplete; an error skips the client's messages up to Sync, as PostgreSQL does."""
        self.fleet.counted("scatter")
        started = time.monotonic()
        try:
            answer = await Scatter(self.fleet.coordinator).run(self.fleet.pools, statements, self.settings,
                                                               replicated, describe)
        except ProxyError as exc:
            answer = answer_of(exc)
            self.skipping = describe is not None
        self._audit_whole("scatter", tuple(statements), started, answer)
        self._write(answer + m.ready_for_query(_I) if describe is None else answer)

    async def _run_gather(self, plan: FanoutPlan, databases: tuple[str, ...], query: bytes,
                          portal: _Portal | None = None, max_rows: int = 0,
                          copy: CopyOutWriter | None = None) -> None:
        """A federated SELECT: merged rows to the client as they come.

        A simple query (no ``portal``) ends with ReadyForQuery. An Execute ends with its
        CommandComplete; with a row limit the whole result is kept in the portal and handed
        out ``max_rows`` at a time (PortalSuspended between), as PostgreSQL does.
        """
        self.fleet.counted("fanout")
        try:
            digits = int(self.settings.get("extra_float_digits", "1"))
        except ValueError:
            digits = 1
        await self.fleet.learn_byte_order(databases)
        # Text compares by its bytes only in UTF-8 (other client encodings reorder it).
        text_order = all(self.fleet.byte_order.get(db, False) for db in databases) and \
            _encoding(self.settings.get("client_encoding", "UTF8")) in ("UTF8", "UNICODE")
        settings = self.settings
        if digits <= 0:  # the shards send exact floats; the merger rounds them as the client asked
            settings = {**settings, "extra_float_digits": "1"}
        merger = Merger(plan, len(databases), float_digits=digits, text_order=text_order,
                        formats=portal.formats if portal else (), describe=portal is None or portal.describe)
        if portal is not None:
            portal.describe = False
        kept: list[bytes] = []
        write = self._write if copy is None else lambda data: self._write(copy.convert(m.split(data), m.row_values))
        gather = Gather(merger, kept.append if max_rows > 0 else write)
        self.gather = gather
        if self.paused_by_client:
            gather.pause()
        started = time.monotonic()
        try:
            last = await gather.run(self.fleet.pools, databases, query, settings)
        finally:
            self.gather = None
        self._audit_whole("copy" if copy is not None else "fanout", databases, started, last)
        failed = gather.failure is not None or last[:1] == b"E"
        if failed and self.deferred_begin is not None:
            self.tx_status = _E  # the client's transaction fails, as on one database
        if portal is None:
            if copy is not None:
                last = copy.convert(m.split(last), m.row_values)
            self._write(last + m.ready_for_query(self.tx_status))
            return
        if failed:
            self.portal = None
            self.skipping = True
            self._write(b"".join(kept) + last)
            return
        if max_rows == 0:
            portal.rows = deque()  # run to completion: running it again answers SELECT 0
            self._write(last)
            return
        answer = m.split(b"".join(kept) + last)
        portal.rows = deque(body for kind, body in answer if kind == m.DATA_ROW)
        described = b"".join(m.message(kind, body) for kind, body in answer if kind == m.ROW_DESCRIPTION)
        self._write(described + portal.next_rows(max_rows))

    def _made_up(self, answer: Answer, reply: bytes) -> None:
        """An answer pgfleet gives in place of a backend's, after what the backend still owes."""
        if self.backend is not None:
            self.backend.push(Expect(answer, Fate.MADE_UP, reply=reply))  # at once if nothing is due
        else:
            self._write(reply)

    # ------------------------------------------------------------------ backends

    def _replica_or(self, database: str) -> str:
        """Where a replica-safe read of ``database`` (or of one of its replicas) runs: a usable
        replica, round-robin, outside transactions; else the primary. A pipeline already on a
        replica of it stays there."""
        base = database.partition("~")[0]
        backend = self.backend
        if backend is not None and (self.batch_open or self._engaged(backend)):
            here = backend.database
            return here if here.partition("~")[0] == base and not self.pins and backend.tx_status == _I else base
        if self.tx_status != _I or self.deferred_begin is not None or self.pins:
            return base
        pool = self.fleet.replicas.pick(base)
        return pool.name if pool is not None else base

    def _replica_bind(self, client_name: bytes) -> str | None:
        """The database a Bind of a replica-safe statement runs on (a replica or its primary),
        or None: where its Parse put it."""
        if client_name:
            prepared = self.statements.get(client_name)
            if prepared is None or prepared.routed or prepared.control is not None:
                return None
            text, database = prepared.query, prepared.database
        else:
            if self.unnamed is None or self.unnamed_routed is not None or self.unnamed_control is not None:
                return None
            database = self.unnamed[1]
            text = m.decode_parse(self.unnamed[0][5:]).query
        if database.partition("~")[0] not in self.fleet.replicas.sets:
            return None
        if not self.fleet.router.analysis(text).replica_safe:
            return database.partition("~")[0]
        return self._replica_or(database)

    def _backend_for(self, database: str) -> ServerConnection | None:
        """The attached backend of ``database``, attaching one if needed; None means wait."""
        if self.portal is not None:
            raise ClientError("0A000", f'portal "{self.portal.name}" for several databases is still '
                              "open: one pipeline cannot also use another database",
                              hint="send Execute and Sync for it first")
        backend = self.backend
        if backend is None and self.others:  # a transaction on several databases, all waiting apart
            return self._rejoin(database)
        if backend is not None and backend.gone and not self._engaged(backend):
            # Parked, and already known dead (its connection_lost is still to come): another one.
            self.backend = None
            self.fleet.pool_of(backend.database).discard(backend)
            backend = None
        if backend is not None:
            if backend.database == database:
                if self.deferred_begin is not None:  # a parked backend: BEGIN goes first
                    self._send_begin(backend)
                return backend
            if self.pins:
                raise ClientError("0A000", f"this connection keeps its backend of database {backend.database} "
                                  f"({', '.join(sorted(self.pins))} left session state there); a statement "
                                  f"for database {database} needs another connection",
                                  hint="use a separate connection for the other database, or release the "
                                       "state first (DISCARD ALL)")
            if backend.tx_status != _I:
                if self.fleet.coordinator is not None:
                    return self._join(backend, database)
                raise ClientError("0A000", f"this transaction runs on database {backend.database}; "
                                  f"a statement for database {database} cannot join it",
                                  hint="commit first, keep a transaction on one database, or set "
                                       "two_phase_commit: true")
            if self.batch_open:
                raise ClientError("0A000", f"one pipeline (messages up to Sync) cannot use databases "
                                  f"{backend.database} and {database}",
                                  hint="send a Sync between statements for different databases")
            if backend.busy:
                self.waiting = True  # resumes when the backend goes idle and is released
                return None
            self._detach(backend)
        pool = self.fleet.pool_of(database)
        server = pool.try_acquire()
        if server is None:
            self._wait_for(self._acquire(database))
            return None
        self._attach(server)
        return server

    async def _acquire(self, database: str, join: bool = False) -> None:
        pool = self.fleet.pool_of(database)
        try:
            server = await pool.acquire()
        except BackendError as exc:
            primary = self.fleet.replicas.failed(database, exc.message)
            if primary is None:
                self._drop_pending_message(exc)
                return
            await self._acquire(primary, join)  # a replica that fails: its primary answers
            return
        except ProxyError as exc:
            # The message that needed it is refused; the session goes on with the next one.
            self._drop_pending_message(exc)
            return
        if self.state is State.CLOSED:
            pool.release(server)
            return
        if join:
            self._switch(server, fresh=True)
        else:
            self._attach(server)

    def _join(self, backend: ServerConnection, database: str) -> ServerConnection | None:
        """two_phase_commit: the transaction on ``backend`` goes on on ``database`` too.

        The backend it leaves waits in ``others``, idle in the transaction, until a statement
        for its database comes back to it or the transaction ends (``_end_across``).
        """
        if backend.tx_status == _E:
            raise _in_failed_transaction()
        if self.batch_open:
            raise ClientError("0A000", f"one pipeline (messages up to Sync) cannot use databases "
                              f"{backend.database} and {database}",
                              hint="send a Sync between statements for different databases")
        if self.pending is not None or self.tx_sets:
            raise ClientError("0A000", f"this transaction changed settings on database {backend.database}, "
                              f"so it cannot go on on database {database} too",
                              hint="SET before BEGIN, or keep a transaction that sets on one database")
        if backend.expects:
            self.waiting = True  # its answers first: resumes when it is idle (backend_idle)
            return None
        return self._participant(database)

    def _rejoin(self, database: str) -> ServerConnection | None:
        """A statement of a transaction on several databases whose backends all wait apart
        (a bound COMMIT that was not run): its database's, or a new participant."""
        if any(server.tx_status == _E for server in self.others.values()):
            raise _in_failed_transaction()
        return self._participant(database)

    def _participant(self, database: str) -> ServerConnection | None:
        """The backend of ``database`` in the transaction: one waiting in ``others``, or a new
        one from the pool (None: on its way)."""
        server = self.others.pop(database, None)
        if server is not None:
            self._switch(server, fresh=False)
            return server
        server = self.fleet.pool_of(database).try_acquire()
        if server is None:
            self._wait_for(self._acquire(database, join=True))
            return None
        self._switch(server, fresh=True)
        return server

    def _switch(self, server: ServerConnection, fresh: bool) -> None:
        """The attached backend waits in ``others``; ``server`` (``fresh``: opening the
        transaction there with its BEGIN) runs the next statements."""
        current = self.backend
        if current is not None:
            if current.outbox:
                current.flush()
            self.others[current.database] = current
        if not fresh:
            self.backend = server  # linked here all along
            return
        if len(self.others) == 1:
            log.debug("client %s (key %s): a transaction on databases %s and %s (two-phase commit)",
                      self.peer, self.user, next(iter(self.others)), server.database)
        self.backend = None
        self.deferred_begin = self.tx_begin or m.query("BEGIN")
        self._attach(server)

    def _drop_pending_message(self, exc: ProxyError) -> None:
        found = m.frame(self.inbox, 0, self.max_message)
        if found is not None:
            kind, _, end = found
            del self.inbox[:end]
            self._refuse(exc, simple=kind == m.QUERY)

    def _wait_for(self, coro: object) -> None:
        self.waiting = True
        assert self.transport is not None
        self.transport.pause_reading()
        self.wait_task = asyncio.get_running_loop().create_task(self._waiting(coro))

    async def _waiting(self, coro: object) -> None:
        try:
            await coro  # type: ignore[misc]
        finally:
            self.wait_task = None
            self._unguard()
            self._resume()

    def _resume(self) -> None:
        if self.state is State.CLOSED or self.state is State.SETTING_UP:
            return
        self.waiting = False
        assert self.transport is not None
        self.transport.resume_reading()
        self._process()  # also flushes what was queued for the backend meanwhile

    def _attach(self, server: ServerConnection) -> None:
        self.backend = server
        server.attach(self)
        if self.audit is not None:
            server.on_answer = self._audit_answer
        if self.paused_by_client and server.transport is not None:
            server.transport.pause_reading()
        if self.deferred_begin is not None:
            self._send_begin(server)
        # Settings dicts are never changed in place, so "is" is the common, cheap answer.
        if server.settings is not self.settings:
            self._replay_settings(server)

    def _send_begin(self, server: ServerConnection) -> None:
        assert self.deferred_begin is not None
        server.push(DROP_QUERY)
        server.send(self.deferred_begin)
        self.tx_begin = self.deferred_begin
        self.deferred_begin = None

    def _engaged(self, server: ServerConnection) -> bool:
        """Whether the attached backend is in use: a transaction, a pipeline or answers due.

        Otherwise it is only parked with this client between transactions.
        """
        return server.tx_status != _I or self.batch_open or bool(server.expects) or bool(self.pins)

    def _replay_settings(self, server: ServerConnection) -> None:
        sql = set_statement(self.settings, server.settings) if server.settings != self.settings else None
        server.settings = self.settings
        if sql is not None:
            server.push(DROP_QUERY)
            server.send(m.query(sql))

    def _detach(self, server: ServerConnection) -> None:
        if server.outbox:
            server.flush()
        self.backend = None
        if self.paused_by_client and server.transport is not None:
            server.transport.resume_reading()
        pool = self.fleet.pool_of(server.database)
        if self.session_mode:
            Janitor(pool, server, reset=True)
        else:
            pool.release(server)

    def _maybe_release(self, server: ServerConnection) -> None:
        if not self.session_mode and not self.pins and not server.expects and server.tx_status == _I and not self.batch_open:
            pool = self.fleet.pool_of(server.database)
            now = _monotonic()
            if not pool.waiters and server.generation == pool.generation \
                    and now - server.created < pool.lifetime:
                # Affinity: keep it for this client's next transaction until someone needs it.
                pool.parked[server] = now
            else:
                self._detach(server)

    def give_back(self, server: ServerConnection) -> bool:
        """The pool takes a parked backend back, if this client is between transactions on it."""
        if (self.backend is not server or server.expects or server.outbox or server.tx_status != _I
                or self.batch_open or self.pending is not None or self.pins):
            return False
        self.backend = None
        server.detach()
        if self.paused_by_client and server.transport is not None:
            server.transport.resume_reading()
        return True

    # -- Link: called by the attached backend

    def write(self, data: bytes) -> None:
        if self.corked:  # a backend answers at once while the client's messages are handled
            self.out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def backend_idle(self, server: ServerConnection) -> None:
        self.tx_status = server.tx_status
        if self.tx_sets and server.tx_status == _I:
            self.tx_sets = False
        if self.guard is not None:
            self._unguard()
        if self.pending is not None:
            self._settle(server)
        if self.unpinning is not None and server.tx_status == _I:
            dropped, errors = self.unpinning
            self.unpinning = None
            if server.errors == errors:  # DISCARD ALL, UNLISTEN * ... ran
                if "*" in dropped:
                    self.pins.clear()
                else:
                    self.pins.difference_update(dropped)
        if self.state is State.SETTING_UP:
            self._setup_done(server)
            return
        if self.fleet.shutting_down and not self.busy():
            self.close(SHUTTING_DOWN)
            return
        self._maybe_release(server)
        if self.waiting and self.wait_task is None:
            self._resume()

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        if server is not self.backend:
            if self.others.get(server.database) is server:  # a transaction on several databases lost one
                del self.others[server.database]
                self.fleet.pool_of(server.database).discard(server)
                log.warning("client %s (key %s): %s", self.peer, self.user, error.message)
                self._fatal(error)
            return
        self.backend = None
        self.fleet.pool_of(server.database).discard(server)
        if not server.expects and server.tx_status == _I and not self.batch_open:
            # Parked between transactions: the client lost nothing, its next statement gets another.
            log.info("client %s (key %s): its idle backend went away: %s", self.peer, self.user,
                     error.message)
            return
        log.warning("client %s (key %s): %s", self.peer, self.user, error.message)
        if server.mid_message:
            # The client has part of a row: an error after it would be read as the rest of it.
            # Closing without one is what it sees when PostgreSQL itself dies mid-row.
            log.warning("closing client %s (key %s) without an error: it had part of a row from database %s",
                        self.peer, self.user, server.database)
            self._hang_up()
            return
        self._fatal(error)

    def parameter_changed(self, name: str, value: str) -> None:
        """A ParameterStatus from the attached backend (it is forwarded as it came)."""
        if name == "default_transaction_read_only" and value == "off" and self.key is not None \
                and self.key.read_only and self.backend is not None:
            # Defence in depth: something (a server-side function, say) lifted read-only mode.
            server = self.backend
            self.backend = None
            self.fleet.pool_of(server.database).discard(server, DisconnectReason.DIRTY)
            log.warning("client %s (key %s): a statement turned default_transaction_read_only off "
                        "on database %s; closed the client and its backend", self.peer, self.user,
                        server.database)
            self._fatal(ProxyError("25006", f"key {self.user} is read-only, and a statement turned "
                                   "default_transaction_read_only off: the connection is closed",
                                   hint="use a key without read_only: true for writes"))

    # ------------------------------------------------------------------ session settings

    def _follow(self, effect: Analysis, backend: ServerConnection) -> None:
        """A statement that changes settings goes to ``backend``: remember what it sets, and
        the session state that pins the client to this backend."""
        for stmt in effect.statements:
            if stmt.closes_database is not None:
                self.fleet.close_idle_connections(stmt.closes_database)
            if stmt.pins:
                if not self.pins:
                    log.info("client %s (key %s) keeps its backend of database %s until it disconnects: "
                             "%s leaves session state there", self.peer, self.user, backend.database,
                             ", ".join(stmt.pins))
                self.pins.update(stmt.pins)
                self.unpinning = None
            if stmt.unpins and self.pins:
                self.unpinning = (stmt.unpins, backend.errors)
            if stmt.command == "SET" or stmt.settings or stmt.opaque_settings:
                self.tx_sets = True  # SET LOCAL too: it holds on this backend only
            if stmt.rollback:  # the backend undoes the transaction's SETs itself
                self.pending = None
                self.pending_opaque = False
                continue
            if stmt.settings or stmt.opaque_settings:
                if self.pending is None:
                    self.pending = []
                    self.pending_errors = backend.errors
                self.pending.extend(c for c in stmt.settings
                                    if c.name is None or not c.name.startswith("pgfleet."))
                self.pending_opaque = self.pending_opaque or stmt.opaque_settings

    def _settle(self, server: ServerConnection) -> None:
        """The backend is idle: the SETs of a transaction that ended without error now hold."""
        pending = self.pending
        assert pending is not None
        if server.errors != self.pending_errors:
            # Which of them held is unknown: the next client of this backend starts clean.
            server.settings = DIRTY
        elif server.tx_status != _I:
            return  # still in the transaction: they hold only if it commits
        else:
            settings = dict(self.settings)
            reset = False
            for change in pending:
                if change.name is None:
                    settings = dict(self.startup_settings)
                    reset = True
                elif change.value is None:
                    reset = True
                    if change.name in self.startup_settings:
                        settings[change.name] = self.startup_settings[change.name]
                    else:
                        settings.pop(change.name, None)
                else:
                    settings[change.name] = change.value
            self.settings = settings
            if self.pending_opaque:
                server.settings = DIRTY  # the client keeps it while it keeps this backend
            elif reset:
                # The backend's RESET went to pgfleet's startup values, not the client's.
                server.settings = DIRTY
                self._replay_settings(server)
                server.flush()
            else:
                server.settings = settings
        self.pending = None
        self.pending_opaque = False

    # ------------------------------------------------------------------ the audit log

    def _audit_start(self, text: str, database: str, simple: bool) -> None:
        self.audit_queue.append(_Audited(text, (database,), simple))

    def _audit_answer(self, kind: int, body: bytes) -> None:
        """An attached backend's answer to this client's statements (see ServerConnection.on_answer)."""
        queue = self.audit_queue
        if kind == m.SYNC:  # Executes still queued were skipped after an error: they never ran
            while queue and not queue[0].simple:
                queue.popleft()
            return
        if not queue:
            return
        entry = queue[0]
        if kind == m.COMMAND_COMPLETE:
            rows = _counted_rows(body)
            if rows is not None:
                entry.rows = (entry.rows or 0) + rows
        elif kind == m.ERROR_RESPONSE and entry.sqlstate is None:
            entry.sqlstate = m.decode_fields(body).get("C", "XX000")
        if (kind == m.READY_FOR_QUERY) if entry.simple else (kind != m.READY_FOR_QUERY):
            queue.popleft()
            if not entry.ignore:
                self._audit_record(entry, "direct")

    def _audit_record(self, entry: _Audited, route: str) -> None:
        assert self.audit is not None
        self.audit.record(self.user, self.peer, entry.databases, route, entry.started,
                          time.monotonic() - entry.clock, entry.rows, entry.sqlstate, entry.text)

    def _audit_refused(self, exc: ProxyError, backend: ServerConnection | None, simple: bool) -> None:
        """A statement pgfleet refused: its line now; the backend's answers to the failing
        statement pgfleet sends in its place (see _refuse) are not the client's."""
        entry = _Audited(self.audit_text, (), simple)
        entry.sqlstate = exc.sqlstate
        self._audit_record(entry, "refused")
        if backend is not None:
            self.audit_queue.append(_Audited("", (), simple, ignore=True))

    def _audit_whole(self, route: str, databases: tuple[str, ...], started: float, answer: bytes) -> None:
        """A statement pgfleet ran itself on several databases (fan-out, scatter, COPY, 2PC)."""
        if self.audit is None:
            return
        entry = _Audited(self.audit_text, databases, True, clock=started)
        for kind, body in m.split(answer):
            if kind == m.COMMAND_COMPLETE:
                entry.rows = _counted_rows(body)
            elif kind == m.ERROR_RESPONSE and entry.sqlstate is None:
                entry.sqlstate = m.decode_fields(body).get("C", "XX000")
        self._audit_record(entry, route)

    # ------------------------------------------------------------------ errors and endings

    def _refuse(self, exc: ProxyError, *, simple: bool) -> None:
        """Answer one statement with an error, as PostgreSQL would, and go on."""
        error = m.error_response(exc.sqlstate, exc.message, hint=exc.hint)
        backend = self.backend
        if self.audit is not None:
            self._audit_refused(exc, backend, simple)
        if backend is not None:
            # Fail it on the backend too, so that its transaction fails as PostgreSQL's would.
            if simple:
                backend.push(Expect(Answer.QUERY, Fate.REFUSE, reply=error))
                backend.send(_REFUSED_SQL)
            else:
                backend.push(Expect(Answer.BIND, Fate.REFUSE, reply=error))
                backend.send(m.bind("", _MISSING_STATEMENT, b"\0\0\0\0\0\0"))
                self.skipping = True
                self.batch_open = True
            return
        if simple:
            self._write(error + m.ready_for_query(self.tx_status))
        else:
            self._write(error)
            self.skipping = True

    def _fatal(self, exc: ProxyError) -> None:
        if self.state is State.CLOSED:
            return
        log.info("closing client %s (key %s): %s %s", self.peer, self.user or "-", exc.sqlstate, exc.message)
        self._write(m.error_response(exc.sqlstate, exc.message, severity="FATAL", hint=exc.hint))
        self._hang_up()

    def _hang_up(self) -> None:
        """Close the client after what was written to it; its backend goes back or is dropped."""
        self.state = State.CLOSED
        self._close_backend()
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        """Write to the client; while its messages are being handled, at the end of them,
        all in one send (a pipeline's ParseComplete, BindComplete, ... were one send each)."""
        if self.corked:
            self.out.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush(self) -> None:
        out = self.out
        if not out:
            return
        self.out = []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _close_backend(self) -> None:
        """The client is gone: give its backend back clean, or drop it."""
        others, self.others = self.others, {}
        for other in others.values():  # a transaction on several databases: rolled back everywhere
            if other.closed:
                self.fleet.pool_of(other.database).discard(other)
            else:
                Janitor(self.fleet.pool_of(other.database), other, rollback=True)
        server = self.backend
        if server is None:
            return
        self.backend = None
        pool = self.fleet.pool_of(server.database)
        if server.closed:
            pool.discard(server)
        elif server.busy:
            pool.discard(server, DisconnectReason.DIRTY)  # a statement is still running
        elif server.tx_status != _I or self.session_mode or self.pins:
            Janitor(pool, server, rollback=server.tx_status != _I, reset=self.session_mode or bool(self.pins))
        else:
            pool.release(server)

    def _cancel(self, request: m.CancelRequest) -> None:
        target = self.fleet.sessions.get(request.pid)
        if target is not None and secrets.compare_digest(
                target.secret.to_bytes(4, "big"), request.secret.to_bytes(4, "big", signed=True)):
            target.cancel_running()
        self.state = State.CLOSED
        assert self.transport is not None
        self.transport.close()

    def cancel_running(self) -> int:
        """Send a cancel to every backend running this client's statement; how many."""
        servers = [self.backend] if self.backend is not None else []
        if self.gather is not None:  # a federated SELECT: every shard still answering
            servers += [shard.server for shard in self.gather.shards.values() if not shard.done]
        busy = [server for server in servers if server.busy]
        for server in busy:
            asyncio.get_running_loop().create_task(send_cancel(server, self.fleet.connect))
        return len(busy)

    def _running(self) -> bool:
        backend = self.backend
        return self.wait_task is not None or (backend is not None and bool(backend.expects))

    def _unguard(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None

    def _guard_fired(self) -> None:
        self.guard = None
        key = self.key
        if key is None or not self._running():
            return
        if self.cancel_running():
            log.info("key %s: a statement ran past the key's statement_timeout (%gs): cancelled (client %s)",
                     key.id, key.statement_timeout, self.peer)

    def rekey(self, key: ApiKey) -> None:
        """RELOAD: the client's key got new settings; they hold from its next statement."""
        if self.key is None or self.ctx is None:
            return
        self.key = key
        self.ctx = SessionContext(key, self.ctx.database)
        if self.console is None:
            self.fixed = self.fleet.router.fixed_database(self.ctx)
            self.unparsed = self.fixed if not key.read_only else None

    def close(self, error: ProxyError) -> None:
        """Server shutdown: tell the client why, then close."""
        self._fatal(error)

    def busy(self, statement_only: bool = False) -> bool:
        """Whether closing the client now would cut a statement (or, unless
        ``statement_only``, a transaction) short."""
        if self.wait_task is not None or self.state is State.SETTING_UP:
            return True
        if self.others and not statement_only:
            return True
        backend = self.backend
        if backend is None:
            return False
        return bool(backend.expects) or (not statement_only and backend.tx_status != _I)


class Janitor:
    """Links a backend whose client left, runs a clean-up statement and returns it to its pool."""

    def __init__(self, pool: Pool, server: ServerConnection, *, rollback: bool = False,
                 reset: bool = False) -> None:
        self.pool = pool
        server.attach(self)
        if rollback:
            server.push(DROP_QUERY)
            server.send(m.query("ROLLBACK"))
        if reset:  # DISCARD ALL cannot share a query string (an implicit transaction) with others
            server.prepared.clear()
            server.settings = {}
            server.unnamed_owner = 0
            server.push(DROP_QUERY)
            server.send(m.query("DISCARD ALL"))
        server.flush()
        if not server.busy:
            pool.release(server)

    def write(self, data: bytes) -> None:
        pass

    def backend_idle(self, server: ServerConnection) -> None:
        self.pool.release(server)

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        self.pool.discard(server)

    def parameter_changed(self, name: str, value: str) -> None:
        pass

    def give_back(self, server: ServerConnection) -> bool:
        return False  # it goes back to the pool by itself when its clean-up is done


# Messages forwarded unchanged to the attached backend, with what answers them.
_VERBATIM: dict[int, Expect | None] = {
    m.EXECUTE: FORWARD_EXECUTE,
    m.SYNC: FORWARD_SYNC,
    m.FLUSH: None,
    m.COPY_DATA: None,
    m.COPY_DONE: None,
    m.COPY_FAIL: None,
}

_U32 = struct.Struct("!I").unpack_from
_monotonic = time.monotonic
_READY = State.READY
_SYNC = m.SYNC
_QUERY = m.QUERY
_SNAPSHOT_LEVELS = re.compile(rb"(?i)repeatable|serializable")
_STATEMENT_DESCRIPTION = frozenset((m.PARAMETER_DESCRIPTION, m.ROW_DESCRIPTION, m.NO_DATA))
_DESCRIBE = m.DESCRIBE
_PARSE = m.PARSE
_BIND = m.BIND
_EXECUTE = m.EXECUTE
DROP_PARSE = Expect(Answer.PARSE, Fate.DROP)
_NOT_VERBATIM = Expect(Answer.QUERY, Fate.DROP, reply=b"not verbatim")  # a sentinel
_KNOWN = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.FLUSH,
                    m.TERMINATE, m.PASSWORD, m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL, m.FUNCTION_CALL))
LOGIN_TIMEOUT = 60.0

LOGIN = {
    (State.SASL_INITIAL, m.PASSWORD): Session._sasl_initial,
    (State.SASL_RESPONSE, m.PASSWORD): Session._sasl_response,
    (State.PASSWORD, m.PASSWORD): Session._password,
}


def _one_database(route: Route) -> str:
    """The database of a route that runs on one; several are refused until pgfleet can run them."""
    target = route.target
    if isinstance(target, Direct):
        return target.database
    what = "a read that needs merging from" if route.fanout else "a statement on"
    raise ClientError("0A000", f"{what} several databases ({', '.join(target.databases)}: {route.reason}) "
                      "is not supported by this version of pgfleet",
                      hint="bind the shard key (WHERE key = value), or add /* pgfleet: shard=N */")


def _encoding(name: str) -> str:
    """An encoding name as PostgreSQL compares them ('utf-8', as asyncpg sends it, is UTF8)."""
    return "".join(ch for ch in name.upper() if ch.isalnum())


def _limit_types(plan: FanoutPlan, param_types: bytes) -> None:
    """LIMIT $n / OFFSET $n declared as text: PostgreSQL's own error (at Parse, as it does).
    Other non-integer types (float8 2.7, numeric 2.5) are refused: PostgreSQL rounds them."""
    declared = struct.unpack_from(f"!{len(param_types) // 4}I", param_types, 2) if len(param_types) > 2 else ()
    for number, what in ((plan.limit_param, "LIMIT"), (plan.offset_param, "OFFSET")):
        oid = declared[number - 1] if number is not None and number <= len(declared) else 0
        if oid in (25, 1043):
            raise ClientError("42804", f"argument of {what} must be type bigint, not type text")
        if oid not in (0, 20, 21, 23):
            raise ClientError("0A000", f"{what} ${number} of type OID {oid} across shards is not supported",
                              hint=f"send {what} as an integer")


def _limits(formats: tuple[int, ...], values: tuple[bytes | None, ...], plan: FanoutPlan, param_types: bytes
            ) -> tuple[int | None, ...]:
    """The Bind's LIMIT and OFFSET parameters as integers (None for NULL), as PostgreSQL reads them.

    Parameters declared as another type than an integer (float8 2.7, numeric 2.5) are refused:
    PostgreSQL would round them, in ways that depend on the type."""
    out: list[int | None] = [None] * len(values)
    _limit_types(plan, param_types)
    for number, what, sqlstate in ((plan.limit_param, "LIMIT", "2201W"), (plan.offset_param, "OFFSET", "2201X")):
        if number is None:
            continue
        if number > len(values):
            raise ClientError("08P01", f"bind message supplies {len(values)} parameters, but the statement "
                              f"needs ${number}")
        data = values[number - 1]
        if data is None:
            continue
        binary = (formats[0] if len(formats) == 1 else formats[number - 1] if formats else 0) == 1
        try:
            value = int.from_bytes(data, "big", signed=True) if binary and len(data) in (2, 4, 8) else int(data)
        except ValueError:
            raise ClientError("22P02", f'invalid input syntax for type bigint: "{data.decode(errors="replace")}"') \
                from None
        if value < 0:
            raise ClientError(sqlstate, f"{what} must not be negative")
        out[number - 1] = value
    return tuple(out)


def _in_failed_transaction() -> ClientError:
    return ClientError("25P02", "current transaction is aborted, commands ignored until end of transaction block",
                       hint="ROLLBACK (a statement of this transaction failed)")


def _counted_rows(tag: bytes) -> int | None:
    """The row count of a CommandComplete tag (INSERT 0 5, UPDATE 3, SELECT 10, ...), or None."""
    words = tag.rstrip(b"\0").rsplit(b" ", 1)
    return int(words[1]) if len(words) == 2 and words[1].isdigit() else None


def _first_word(sql: str) -> str:
    """A statement's first word, upper case ("" for none)."""
    words = sql.split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


def _control_word(sql: str, analysis: Analysis) -> str | None:
    """BEGIN, START, COMMIT, END, ROLLBACK or ABORT when ``sql`` is only that (with its
    options); None for anything else (ROLLBACK TO, COMMIT PREPARED, SAVEPOINT...)."""
    if len(analysis.statements) != 1 or analysis.statements[0].kind is not Kind.TRANSACTION:
        return None
    words = sql.replace(";", " ").upper().split()
    if not words or words[0] not in _TRANSACTION_WORDS or (len(words) > 1 and words[1] in ("TO", "PREPARED")):
        return None
    return words[0]


def _no_copy(analysis: Analysis, target: Multi | All) -> None:
    """COPY on several databases is not split or merged yet: refused before anything runs
    (each database would wait for its own COPY data)."""
    if any(stmt.command == "COPY" for stmt in analysis.statements):
        raise ClientError("0A000", f"COPY of a table on several databases ({', '.join(target.databases)}) is not "
                          "supported yet", hint="COPY into or out of each shard's database by name, or use "
                          "INSERT ... VALUES (split by shard key) and SELECT (merged) through the fleet")


def _first(route: Route) -> str:
    target = route.target
    return target.database if isinstance(target, Direct) else target.databases[0]


def _no_fleet_settings(effect: Analysis | None) -> None:
    """SET pgfleet.* is answered by pgfleet in the simple protocol only."""
    if effect is not None and any(stmt.fleet_settings for stmt in effect.statements):
        raise ClientError("0A000", "SET pgfleet.* is supported in the simple query protocol only",
                          hint="send it as a plain query (psql, or execute() without parameters), "
                               "or use a /* pgfleet: ... */ comment")
