"""The client session: one PostgreSQL client connection, from startup to Terminate, as a state
machine that does no I/O of its own.

Theory of operation. The seam (``seam.py``) feeds the client's bytes to ``feed``; the session
frames whole messages and handles them in order, each by the handler that ``TABLE`` gives for
``(state, message type)``. A message the table does not know in that state is a protocol
violation (08P01): the client is told why and the connection ends. Everything the session
does goes through its ``Port`` (write to the client, stop or resume reading it, close it, run
a wait) and through the fleet's pools (take a backend of a database); the seam implements
the port over asyncio, and the protocol tests over a list of bytes.

The states::

    STARTUP -> SASL_INITIAL -> SASL_RESPONSE -> SETTING_UP -> READY <-> SKIPPING
            -> PASSWORD ------------------------^             READY <-> COPY_IN
            -> CONSOLE (the admin database)                    any   -> CLOSED

READY takes statements. The transaction's status (idle, in a transaction, failed) is the
``Transaction``'s and the backend's: PostgreSQL takes the same messages in all three, and the
backend itself refuses what a failed transaction may not run. SKIPPING follows an error in
the extended protocol: messages are dropped up to Sync, as PostgreSQL does. COPY_IN takes a
client's rows for a COPY into a sharded table, which pgfleet splits by shard. A session that
waits — for a backend from its pool, for a fan-out's shards — stops reading (``waiting``) and
handles the next message when the wait ends; a client that keeps one backend for session
state (``pins``) stays READY: being pinned changes where statements go, not what it may send.

The state that outlives one message has owners: ``PreparedStatements`` (``prepared.py``),
``Transaction`` (``transaction.py``), ``SessionSettings`` (``settings.py``), ``BackendLink``
(``backendlink.py``: the backend it holds; the pool decides what it keeps, ``Pool.park``), an
``AuditTrail`` (``audited.py``) and a ``Portal`` for several databases (``portal.py``).

Once READY, each message is routed (``Router``), a backend of the routed database is attached
(taken from its pool without waiting when one is idle, else the session waits until the pool
hands one over), and the message is forwarded — runs of messages that need no rewriting in
one write, without going through the table (the hot path in ``_messages``). What the backend
answers to pgfleet's own messages is dropped or made up by the backend's ``Expect`` queue.
When the backend reports ReadyForQuery ``I`` with nothing pending, the pool decides whether
the client keeps it for its next transaction (``Pool.park``) or it goes back (transaction
mode).

A statement pgfleet refuses inside a transaction is refused *on the backend* — pgfleet sends
a statement that fails and replaces its error with its own — so the backend's transaction
fails exactly as PostgreSQL's would. This module is the only place where ``ProxyError``
values become ``ErrorResponse`` bytes.
"""

from __future__ import annotations

import enum
import logging
import re
import secrets
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ..auth.keys import ApiKey, Role, ScramExchange, check_cleartext, check_md5, failed
from ..backend.connection import ServerConnection, send_cancel
from ..backend.expect import (
    CUT_SYNC,
    DROP_QUERY,
    FORWARD_BIND,
    FORWARD_CLOSE,
    FORWARD_DESCRIBE_PORTAL,
    FORWARD_DESCRIBE_STATEMENT,
    FORWARD_EXECUTE,
    FORWARD_PARSE_UNNAMED,
    FORWARD_QUERY,
    FORWARD_SYNC,
    IMPLICIT_BEGIN,
    TENANT_QUERY,
    Answer,
    Expect,
    Fate,
)
from ..backend.pool import DisconnectReason, Pool, Waiter
from ..config import ADMIN_DATABASE
from ..errors import (
    CONNECTION_FAILURE,
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    INTERNAL_ERROR,
    INVALID_AUTHORIZATION_SPECIFICATION,
    INVALID_CATALOG_NAME,
    INVALID_CURSOR_NAME,
    INVALID_PARAMETER_VALUE,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    PROTOCOL_VIOLATION,
    QUERY_CANCELED,
    READ_ONLY_SQL_TRANSACTION,
    SHUTTING_DOWN,
    TOO_MANY_CONNECTIONS,
    UNDEFINED_TABLE,
    AuthFailed,
    BackendError,
    ClientError,
    ProtocolViolation,
    ProxyError,
)
from ..fleet import Fleet
from ..merge.merger import Merger
from ..router.copyrows import (
    BinaryRowSplitter,
    CopyIn,
    CopyOutWriter,
    RowSplitter,
    copy_in,
    copy_out,
)
from ..router.fanout import FanoutPlan
from ..router.parse import split_insert
from ..router.route import (
    PARSER_SETTINGS,
    All,
    Analysis,
    Direct,
    Kind,
    Multi,
    Params,
    Route,
    parser_setting_safe,
)
from ..router.router import SessionContext, UnknownTypes
from ..router.shard import interleave_sequences
from ..wire import messages as m
from .audited import AuditTrail
from .backendlink import BackendLink
from .copysplit import CopySplit
from .gather import Gather
from .portal import (
    Portal,
    bound_limits,
    encoding_name,
    first_database,
    limit_types,
    no_copy,
    one_database,
    split_bound,
)
from .prepared import Prepared, PreparedStatements
from .scatter import Scatter, answer_of
from .settings import DIRTY, TENANT, SessionSettings, session_settings, set_statement
from .split import SplitPipeline
from .transaction import (
    STARTS,
    TRANSACTION_ENDS,
    TRANSACTION_WORDS,
    ControlPortal,
    Transaction,
    across,
    control_word,
    first_word,
    in_failed_transaction,
)

log = logging.getLogger("pgfleet.session")


class _PipelineFailed(Exception):
    """A part of a pipeline cut between databases failed: its error reached the client, and
    the client's messages up to its Sync are skipped (``_join``)."""

LOGIN_TIMEOUT = 60.0
_STATEMENT_MESSAGES = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE))
_REFUSED_SQL = m.query("pgfleet refused this statement")
_MISSING_STATEMENT = "pgfleet_refused_statement"
# Text that may change session settings (SET, RESET, set_config(), DISCARD ALL) or pin the
# backend: statements on a decided database are parsed only when it holds one of these words.
# It is searched in the lower-cased text: a case-insensitive alternation is 5x slower in re.
# Words of statements that may change session state (SET, RESET, set_config, DISCARD, ...):
# their text is analysed (``_may_set``). Plain literals: a regular expression with word
# boundaries costs twice as much on every statement.
_MAYBE_SETTINGS = re.compile(rb"set|discard|listen|advisory|temp|prepare|hold|deallocate|close|database")
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_$")


def _may_set(text: bytes | bytearray) -> bool:
    """Whether a lower-cased statement may change session state: a word of ``_MAYBE_SETTINGS``
    in it, "set" only at the start of a word or of "reset" (OFFSET, a table called dataset,
    keep the fast path)."""
    found = _MAYBE_SETTINGS.search(text)
    while found is not None:
        at = found.start()
        if found.end() - at != 3 or at == 0 or text[at - 1] not in _WORD or (
                text[at - 2:at] == b"re" and (at == 2 or text[at - 3] not in _WORD)):
            return True
        found = _MAYBE_SETTINGS.search(text, at + 3)
    return False


_SNAPSHOT_LEVELS = re.compile(rb"(?i)repeatable|serializable")
_STATEMENT_DESCRIPTION = frozenset((m.PARAMETER_DESCRIPTION, m.ROW_DESCRIPTION, m.NO_DATA))


class State(enum.Enum):
    STARTUP = "startup"              # before the startup packet (and its SSLRequest)
    SASL_INITIAL = "sasl_initial"    # SCRAM: the client's first message is due
    SASL_RESPONSE = "sasl_response"  # SCRAM: the client's proof is due
    PASSWORD = "password"            # md5 or cleartext: the password is due
    SETTING_UP = "setting_up"        # logged in: the first backend checks the startup settings
    READY = "ready"                  # statements (the transaction's status is Transaction's)
    SKIPPING = "skipping"            # an error in the extended protocol: dropping up to Sync
    COPY_IN = "copy_in"              # COPY FROM STDIN into a sharded table: the client sends rows
    CONSOLE = "console"              # an admin client: the console answers every statement
    CLOSED = "closed"


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


class Port(Protocol):
    """What the session needs of its client connection (``seam.ClientConnection`` implements it)."""

    def write(self, data: bytes) -> None: ...
    def direct_writer(self) -> Callable[[bytes], None]: ...  # for the hot path: no closing check
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> bool: ...
    def spawn(self, work: Coroutine[Any, Any, None]) -> Cancellable: ...
    def later(self, delay: float, callback: Callable[[], None]) -> Cancellable: ...


class Session:
    def __init__(self, fleet: Fleet, port: Port) -> None:
        self.fleet = fleet
        self.config = fleet.config
        self.port = port
        self.max_message = fleet.config.listen.max_message_size
        self.session_mode = fleet.config.pool.mode == "session"
        self.state = State.STARTUP
        self.inbox = bytearray()
        # Who the client is.
        self.peer = "?"
        self.over = ""  # "http": a session of SQL over HTTP (api/inprocess.py), for the audit log
        self.user = ""
        self.database: str | None = None
        self.key: ApiKey | None = None
        self.ctx: SessionContext | None = None
        self.fixed: str | None = None  # the database every statement goes to, when decided
        self.unparsed: str | None = None  # ... and when its statements need no parsing either
        self.role: str | None = None  # the backend role its statements run as (None: the dsn's user)
        self.tenant: str | None = None  # the directory's tenant whose database it uses (fleet.directory)
        self.tenant_query: bytes | None = None  # a database key's: sets pgfleet.tenant, sent per transaction
        self.pools: dict[str, Pool] = {}  # that role's pools, by database name (scatter, gather, COPY)
        self.pid = 0
        self.secret = 0
        self.tls = False  # the client's connection is encrypted
        self.connected = time.time()
        self._scram: ScramExchange | None = None
        self._md5_salt = b""
        self.login_timer: Cancellable | None = None
        self.counted_key: str | None = None  # the key this client counts against (fleet.key_clients)
        # The state owners.
        self.statements = PreparedStatements()
        self.tx = Transaction()
        self.settings = SessionSettings({})
        self.link = BackendLink(fleet, self.session_mode)  # the backend it holds, if any
        self.portal: Portal | None = None  # a portal bound for several databases, not yet run
        self.gather: Gather | None = None  # a federated SELECT running
        self.split: SplitPipeline | None = None  # a pipeline run on several databases at once (_join)
        self.queued: Waiter | None = None  # in its pool's queue for a backend (_backend_for)
        self.queued_for = ""  # ... of that database
        self.reading_paused = False
        self.unflushed: list[ServerConnection] = []  # backends its parts wait in (written after _messages)
        self.copy: CopySplit | None = None  # COPY FROM STDIN into a sharded table (State.COPY_IN)
        self.audit: AuditTrail | None = None  # when the audit log is on (admin/audit.py)
        self.console: Any = None  # the admin console's conversation (admin/console.py), State.CONSOLE
        # The message loop.
        self.batch_open = False  # extended messages sent since the last Sync
        self.waiting = False     # reading stopped: a backend is on its way or must go idle
        self.wait_task: Cancellable | None = None
        self.guard: Cancellable | None = None  # the key's statement_timeout, while one runs
        # While a client's messages are handled (_process), what is written to it is
        # gathered here and goes out in one write at the end (see _write).
        self.corked = False
        self.out: list[bytes] = []
        self._send: Callable[[bytes], None] = port.write  # a linked backend's answers (see write)
        self.gone = False  # lost() has run

    # ------------------------------------------------------------------ ClientSession (fleet.py)

    @property
    def backend(self) -> ServerConnection | None:
        return self.link.server

    @property
    def tx_status(self) -> int:
        return self.tx.status

    @property
    def pins(self) -> set[str]:
        return self.settings.pins

    # ------------------------------------------------------------------ from the seam

    def connected_from(self, peer: str) -> None:
        self.fleet.clients += 1
        self.peer = peer
        self._send = self.port.direct_writer()
        self.login_timer = self.port.later(LOGIN_TIMEOUT, self._login_timeout)

    def feed(self, data: bytes) -> None:
        """Bytes from the client."""
        self.inbox += data
        if not self.waiting:
            self._process()
        elif len(self.inbox) > _INBOX_WHILE_WAITING and not self.reading_paused:
            self.reading_paused = True  # a client that keeps sending while it waits: bounded
            self.port.pause_reading()

    def lost(self) -> None:
        """The client's connection is gone."""
        if self.gone:  # a failed TLS handshake already said goodbye
            return
        self.gone = True
        self.fleet.clients -= 1
        if self.counted_key is not None:
            self.fleet.key_clients[self.counted_key] -= 1
            self.counted_key = None
        self._close_backend()
        if self.tenant is not None and self.fleet.directory is not None:
            self.fleet.directory.leave(self.tenant, self)
        if self.copy is not None:  # its shards roll back and go back to their pools
            copy, self.copy = self.copy, None
            self.port.spawn(_finish_copy(copy))
        self.state = State.CLOSED
        if self.queued is not None:
            self.queued.cancel()
            self.queued = None
        if self.wait_task is not None:
            self.wait_task.cancel()
        if self.login_timer is not None:
            self.login_timer.cancel()
        self.fleet.sessions.pop(self.pid, None)

    def client_slow(self, slow: bool) -> None:
        """The client reads slower than its backend answers (or caught up): stop (resume)
        reading the backend, or a fan-out's shards."""
        self.link.slow(slow)
        if self.gather is not None:
            if slow:
                self.gather.pause()
            else:
                self.gather.resume()

    def _login_timeout(self) -> None:
        if self.state in _LOGGING_IN:
            self._fatal(ProxyError(QUERY_CANCELED, "canceling authentication due to timeout",
                                   hint=f"a client must log in within {LOGIN_TIMEOUT:g}s"))

    # ------------------------------------------------------------------ the message loop

    def _process(self) -> None:
        self.corked = True
        try:
            if self.state is State.STARTUP:
                self._startup()
            else:
                self._messages()
        except ProxyError as exc:  # a protocol violation, a failed login, a refusal outside any statement
            self._fatal(exc)
        except Exception:  # our bug: never a traceback for the client, always one in the log
            log.exception("internal error in session %s (key %s)", self.peer, self.user)
            self._fatal(ProxyError(INTERNAL_ERROR, "internal error in pgfleet; the details are in its log"))
        finally:
            self.corked = False
            if self.out:
                self._flush()
            if self.guard is None and self.key is not None and self.key.statement_timeout and self._running():
                self.guard = self.port.later(self.key.statement_timeout, self._guard_fired)

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
                state = self.state
                if state is not _READY:
                    if state is State.CLOSED:
                        break
                    handler = TABLE.get((state, kind))
                    if handler is None:
                        raise ProtocolViolation(
                            f"unexpected message {chr(kind)!r} while the session is {state.value}: "
                            "the client broke the protocol")
                    if end > n:
                        break
                    if not handler(self, bytes(inbox[pos:end])):
                        break  # waiting: the message stays in the inbox
                    pos = end
                    continue
                if end > n:
                    break
                backend = self.link.server
                sets_nothing = False  # its text was searched for words that may set: none
                if backend is None and self.unparsed is not None and self.tx.deferred_begin is None \
                        and self.portal is None and self.settings.pending is None and (
                            (kind == _BIND and not self.fleet.replicas.sets)
                            or ((kind == _QUERY or (kind == _PARSE and inbox[pos + 5] == 0))
                                and not _may_set(inbox[pos + 5:end].lower()))):
                    # A decided database's next transaction: its backend first, so that the
                    # statement takes the hot path (what _backend_for would do for it): a query
                    # or an unnamed Parse that sets nothing (SET pgfleet.* is answered here,
                    # with no backend), or a Bind, unless the database has replicas
                    # (_replica_bind decides). A pool that refuses: the handler says why.
                    try:
                        backend = self._from_pool(self.unparsed)
                    except ProxyError:
                        backend = None
                    else:
                        if backend is None:
                            break  # waiting for one: the message stays in the inbox
                        sets_nothing = kind != _BIND
                # The hot path: messages that go to the attached backend unchanged.
                if backend is not None:
                    expect = _VERBATIM.get(kind, _NOT_VERBATIM)
                    if kind == _EXECUTE and self.audit is not None:
                        expect = _NOT_VERBATIM  # _execute notes it for the audit log
                    elif expect is _NOT_VERBATIM and length > 5:  # shorter: the handler refuses it
                        if kind == _QUERY:
                            # A simple query on a decided database that sets nothing: as it came.
                            if (self.unparsed is not None and self.settings.pending is None and self.audit is None
                                    and inbox.find(0, pos + 5, end) == end - 1
                                    and (sets_nothing or not _may_set(inbox[pos + 5:end].lower()))):
                                backend.expects.append(FORWARD_QUERY)
                                if run < 0:
                                    run = pos
                                pos = end
                                continue
                        elif kind == _DESCRIBE and inbox[pos + 5] == _TARGET_PORTAL:
                            expect = FORWARD_DESCRIBE_PORTAL  # Describe of a portal: as it came
                        elif self.unparsed is not None and inbox[pos + 5] == 0:
                            # The unnamed statement on a decided database: no rewriting either.
                            if kind == _PARSE:
                                if self.settings.pending is None and (
                                        sets_nothing or not _may_set(inbox[pos + 5:end].lower())):
                                    token = backend.unnamed_owner = self.fleet.next_token()
                                    self.statements.unnamed = Prepared.forwarded(bytes(inbox[pos:end]),
                                                                                 self.unparsed, token)
                                    expect = FORWARD_PARSE_UNNAMED
                            elif kind == _BIND and inbox[pos + 6] == 0 and self.audit is None:
                                unnamed = self.statements.unnamed
                                if unnamed is not None and unnamed.effect is None \
                                        and backend.unnamed_owner == unnamed.token:
                                    expect = FORWARD_BIND
                    elif kind == _SYNC and self.split is not None:
                        expect = _NOT_VERBATIM  # the end of a pipeline on several databases (_sync)
                    if expect is not _NOT_VERBATIM:
                        if expect is not None:
                            backend.expects.append(expect)  # never made up: push() inlined
                        if kind == _SYNC:
                            self.batch_open = False
                            backend.skipping = False  # as push() does: what follows is answered
                        else:
                            self.batch_open = True
                        if run < 0:
                            run = pos
                        pos = end
                        continue
                    if run >= 0:
                        backend.send(bytes(inbox[run:pos]))
                        run = -1
                if not self._statement(kind, bytes(inbox[pos:end])):
                    break  # waiting for a backend: the message stays in the inbox
                pos = end
        finally:
            backend = self.link.server
            if backend is not None:
                if run >= 0:
                    backend.send(bytes(inbox[run:pos]))
                backend.flush()
            if self.unflushed:  # the parts of a pipeline on several databases: one write each
                for server in self.unflushed:
                    server.flush()
                self.unflushed.clear()
            del inbox[:pos]

    def _statement(self, kind: int, raw: bytes) -> bool:
        """A READY message that needs a decision, by ``TABLE``. False: wait, and handle it
        again later. A refusal answers the one message and the session goes on."""
        handler = _READY_HANDLERS.get(kind)
        if handler is None:
            raise ProtocolViolation(f"unexpected message {chr(kind)!r} while the session is ready")
        portal = self.portal
        if portal is not None and portal.describe and kind != m.EXECUTE:
            portal.describe = False  # a Describe not followed by its Execute: answer it now
            self._wait_for(self._describe_portal(portal))
            return False
        audit = self.audit
        if audit is not None and (kind == m.QUERY or kind == m.PARSE):
            audit.text = m.decode_query(raw[5:]) if kind == m.QUERY else \
                raw[raw.find(0, 5) + 1:raw.find(0, raw.find(0, 5) + 1)].decode(errors="replace")
        try:
            if self.tx.status == m.TX_FAILED and self.tx.deferred_begin is not None and kind in _STATEMENT_MESSAGES:
                self._aborted(kind, raw)  # a transaction that failed before reaching a database
            return handler(self, raw)
        except ProtocolViolation:
            raise
        except _PipelineFailed:
            self._skip_to_sync()
            return True
        except UnknownTypes as exc:
            if not self.fleet.may_learn_types(exc.tables):
                self._refuse(exc, simple=kind == m.QUERY)  # read moments ago: why is in the message
                return True
            self._wait_for(self.fleet.learn_types(exc.tables))  # then this message again
            return False
        except (ClientError, BackendError) as exc:
            self._refuse(exc, simple=kind == m.QUERY or kind == m.FUNCTION_CALL)
            return True

    def _skip_to_sync(self) -> None:
        """An error in the extended protocol: what the client sends up to Sync is dropped."""
        if self.state is State.READY:
            self.state = State.SKIPPING

    # ------------------------------------------------------------------ SKIPPING, COPY_IN, CONSOLE

    def _skip(self, raw: bytes) -> bool:
        return True

    def _sync_after_error(self, raw: bytes) -> bool:
        self.state = State.READY
        if self.split is not None:
            self._end_split()
            return True
        backend = self.link.server
        if backend is not None and self.tx.deferred_begin is None:  # it skipped to this Sync too: it answers
            self.batch_open = False
            backend.push(FORWARD_SYNC)
            backend.send(raw)
            backend.flush()
            return True
        return self._sync(raw)

    def _copy_data(self, raw: bytes) -> bool:
        assert self.copy is not None
        self.copy.feed(raw[5:])
        return True

    def _copy_ignored(self, raw: bytes) -> bool:
        return True  # Flush and Sync: PostgreSQL ignores them during COPY too

    def _copy_end(self, raw: bytes) -> bool:
        """CopyDone, CopyFail, or any other message (which fails the COPY, as PostgreSQL does)."""
        copy = self.copy
        assert copy is not None
        self.copy = None
        self.state = State.READY
        kind = raw[0]
        reason = None
        if kind == m.COPY_FAIL:
            reason = raw[5:].rstrip(b"\0").decode(errors="replace")
        elif kind != m.COPY_DONE:
            copy.failure = ClientError(PROTOCOL_VIOLATION, f"unexpected message type 0x{kind:02X} during COPY from stdin")
        self._wait_for(self._end_copy(copy, reason))
        return True

    def _console_message(self, raw: bytes) -> bool:
        kind = raw[0]
        started = time.monotonic()
        if self.audit is not None and kind == m.QUERY:
            self.audit.text = m.decode_query(raw[5:])
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
            self.audit.whole("console", (), started, out)

    def _terminate(self, raw: bytes) -> bool:
        self._hang_up()
        return True

    # ------------------------------------------------------------------ login

    def _start_tls(self) -> None:
        """Answered "S": the TLS handshake, then the startup packet over it."""
        self.port.pause_reading()  # the ClientHello is the TLS layer's, not ours
        self.waiting = True
        self.wait_task = self.port.spawn(self._handshake())

    async def _handshake(self) -> None:
        assert self.fleet.tls is not None
        done = await self.port.start_tls(self.fleet.tls, LOGIN_TIMEOUT)
        self.wait_task = None
        if not done:
            self.lost()  # TLS never reached this session: the seam will not tell it
            return
        if self.state is State.CLOSED:
            return
        self.tls = True
        self._send = self.port.direct_writer()
        self.waiting = False
        if self.inbox:
            self._process()

    def _begin_login(self, params: dict[str, str]) -> None:
        tls = self.config.listen.tls
        if not self.tls and tls is not None and (tls.required or self.config.listen.auth == "password"):
            raise AuthFailed(INVALID_AUTHORIZATION_SPECIFICATION, "pgfleet accepts only TLS connections"
                             + (" for cleartext password auth" if not tls.required else ""),
                             hint="connect with sslmode=require (or verify-full)")
        self._take_startup(params)
        method = self.config.listen.auth
        if method == "scram-sha-256":
            self._scram = ScramExchange(self.user, self.key)
            self._write(m.auth_sasl(["SCRAM-SHA-256"]))
            self.state = State.SASL_INITIAL
        elif method == "md5":
            self._md5_salt = secrets.token_bytes(4)
            self._write(m.authentication(m.AUTH_MD5, self._md5_salt))
            self.state = State.PASSWORD
        else:
            self._write(m.authentication(m.AUTH_CLEARTEXT))
            self.state = State.PASSWORD

    def login_verified(self, params: dict[str, str]) -> None:
        """A client whose key the HTTP API has already checked (api/inprocess.py): the startup
        packet's checks and settings, then logged in with no password exchange. A refusal goes
        out as the wire protocol's ErrorResponse, as for any client."""
        try:
            tls = self.config.listen.tls
            if tls is not None and tls.required and not self.tls:
                raise AuthFailed(INVALID_AUTHORIZATION_SPECIFICATION, "pgfleet accepts only TLS connections (listen.tls "
                                 "required): this one came over plain HTTP", hint="use HTTPS (http.tls)")
            if params.get("database") == ADMIN_DATABASE:
                raise ClientError(INSUFFICIENT_PRIVILEGE, "the admin console is not served over HTTP",
                                  hint="connect with psql to the admin console")
            self._take_startup(params)
            self._authenticated()
        except ProxyError as exc:
            self._fatal(exc)

    def _take_startup(self, params: dict[str, str]) -> None:
        """The startup packet's checks, and who it is and what it asks for."""
        if "replication" in params and params["replication"] not in ("false", "off", "no", "0"):
            raise ProxyError(FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgfleet",
                             hint="connect to the database directly for replication")
        user = params.get("user")
        if not user:
            raise AuthFailed(INVALID_AUTHORIZATION_SPECIFICATION, "no PostgreSQL user name specified in startup packet",
                             hint="give the key id as the user name")
        limit = self.config.listen.max_client_connections
        if limit is not None and self.fleet.clients > limit:
            raise ProxyError(TOO_MANY_CONNECTIONS, "sorry, too many clients already",
                             hint=f"pgfleet takes {limit} client connections (listen.max_client_connections): "
                                  "close idle ones, or raise the limit")
        self.user = user
        self.database = params.get("database") or user
        self.settings = SessionSettings(session_settings(params))
        self.key = self.fleet.keys.get(user)

    def _sasl_initial(self, raw: bytes) -> bool:
        mechanism, data = m.decode_sasl_initial(raw[5:])
        if mechanism != "SCRAM-SHA-256":
            raise ProtocolViolation(f"client selected an invalid SASL authentication mechanism {mechanism!r}")
        assert self._scram is not None
        self._write(m.authentication(m.AUTH_SASL_CONTINUE, self._scram.first(data)))
        self.state = State.SASL_RESPONSE
        return True

    def _sasl_response(self, raw: bytes) -> bool:
        assert self._scram is not None
        final = self._scram.final(raw[5:])
        self._write(m.authentication(m.AUTH_SASL_FINAL, final))
        self._authenticated()
        return True

    def _password(self, raw: bytes) -> bool:
        response = m.decode_password(raw[5:])
        if self.config.listen.auth == "md5":
            check_md5(self.key, self.user, self._md5_salt, response)
        else:
            check_cleartext(self.key, self.user, response)
        self._authenticated()
        return True

    def _authenticated(self) -> None:
        key = self.key
        if key is None:  # the exchanges above never let an unknown key through; be explicit
            raise failed(self.user)
        database = self.database
        fleet_name = self.config.listen.database
        audit = self.fleet.audit
        if audit is not None and audit.enabled:
            self.audit = AuditTrail(audit, self.user, self.peer, self.over)
        if database == ADMIN_DATABASE:
            if key.role is not Role.ADMIN:
                raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} may not use the admin console",
                                  hint="connect to the admin console with an admin key")
            if self.fleet.console is None:
                raise ClientError(FEATURE_NOT_SUPPORTED, "the admin console is not available in this process",
                                  hint=f"connect to the fleet database {fleet_name!r}")
            self._open_console()
            return
        tenant = None
        if key.tenant is not None and self.fleet.directory is None:
            raise ClientError(OBJECT_NOT_IN_PREREQUISITE_STATE, f"key {key.id} is bound to tenant {key.tenant}, "
                              "and this pgfleet runs without a tenant directory",
                              hint="restart pgfleet: a directory: added by a reload takes effect at the next start")
        if database == fleet_name:
            direct = tenant = key.tenant  # None but for a database key bound to a tenant
        elif database in self.config.databases:
            if key.role not in (Role.SERVER, Role.ADMIN):
                raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} ({key.role.value}) may not connect to a "
                                  f"database by name", hint=f"connect to the fleet database {fleet_name!r}")
            direct = database
        elif self.fleet.directory is not None and database != ADMIN_DATABASE:
            _may_reach(key, database)  # (before the lookup: a key that may not learns nothing of it)
            direct = tenant = database
        else:
            raise ClientError(INVALID_CATALOG_NAME, f'database "{database}" does not exist',
                              hint=f"connect to the fleet database {fleet_name!r} or one of: "
                                   f"{', '.join(self.config.databases)}")
        if key.max_connections is not None:
            if self.fleet.key_clients.get(key.id, 0) >= key.max_connections:
                raise ProxyError(TOO_MANY_CONNECTIONS, f'too many connections for key "{key.id}"',
                                 hint=f"the key allows {key.max_connections} connections (its max_connections): "
                                      "close idle ones, or raise it")
            self.fleet.key_clients[key.id] = self.fleet.key_clients.get(key.id, 0) + 1
            self.counted_key = key.id
        if key.policy is not None:
            for name in PARSER_SETTINGS:
                value = self.settings.values.get(name)
                if value is not None and not parser_setting_safe(name, value):
                    raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} ({key.role.value}) may not connect with "
                                      f"{name}={value}: pgfleet reads its SQL as UTF-8 with "
                                      "standard_conforming_strings on", hint="connect with client_encoding=UTF8 "
                                      "and without standard_conforming_strings=off")
        self.ctx = SessionContext(key, direct)
        self.fixed = self.fleet.router.fixed_database(self.ctx)
        # Statements need no parsing when the database is decided and the key may write
        # whatever PostgreSQL lets its role.
        self.unparsed = self.fixed if not key.read_only and key.policy is None else None
        self.tenant = tenant
        # A tenant's connections log in as the user of its directory row (never a backend role).
        role = key.backend_role if tenant is None else None
        self.role, self.pools = role, self.fleet.pools_for(role)
        self._bind_tenant(key)
        if self.fixed is not None:
            self.fleet.router.check_database(self.ctx, self.fixed)
        home = self.fleet.router.home_database(self.ctx)
        self.settings.logged_in(key.read_only)
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
        params.update({"client_encoding": "UTF8", "application_name": self.settings.values.get("application_name", ""),
                       "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on"})
        out = [m.AUTHENTICATION_OK, *(m.parameter_status(k, v) for k, v in params.items()),
               m.backend_key_data(self.pid, self.secret), m.ready_for_query(m.TX_IDLE)]
        self._write(b"".join(out))
        self.state = State.CONSOLE
        if self.login_timer is not None:
            self.login_timer.cancel()
        log.info("admin console: key %s from %s", self.user, self.peer)

    async def _setup(self, home: str) -> None:
        try:
            if self.tenant is not None:
                assert self.fleet.directory is not None
                # Looked up (or cached), its pool opened if it is not; this client counts as
                # one of the tenant's from now on (``lost`` lets go).
                pool = await self.fleet.directory.enter(self.tenant, self)
            else:
                pool = self.fleet.pool_of(home, self.role)
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
            self._fatal(ProxyError(error.get("C", INVALID_PARAMETER_VALUE), error.get("M", "invalid startup setting"),
                                   hint="fix the startup options (options=-c name=value) of the connection"))
            return
        # The backend's values, spelled as the server spells them, but for application_name:
        # pgfleet's own connections carry "pgfleet"; the client is told its own, as PostgreSQL would.
        params = {**server.params, "application_name": self.settings.values.get("application_name", "")}
        out = [m.parameter_status(name, value) for name, value in params.items()]
        if self.session_mode and server.pid and server.pid not in self.fleet.sessions and \
                self.fleet.forward_cancel is None:
            # Session mode: the client's backend is its own, so it is told that backend's
            # process id (pg_backend_pid(), NotificationResponse and pg_terminate_backend
            # agree); the secret stays pgfleet's, which checks a CancelRequest before passing it on.
            # Not in a process group (--workers N), whose pids name the worker that owns the client.
            del self.fleet.sessions[self.pid]
            self.pid = server.pid
            self.fleet.sessions[self.pid] = self
        out.append(m.backend_key_data(self.pid, self.secret))
        out.append(m.ready_for_query(m.TX_IDLE))
        self._write(b"".join(out))
        self.state = State.READY
        if self.login_timer is not None:
            self.login_timer.cancel()
        self._maybe_release(server)
        self._resume()

    # ------------------------------------------------------------------ statements

    def _route(self, sql: str, params: Params | None = None) -> Route:
        assert self.ctx is not None
        route = self.fleet.router.route(sql, self.ctx, self.settings.hints, params)
        backend = self.link.server
        if route.anywhere and backend is not None and self._engaged(backend) \
                and self.ctx.key.may_use(backend.database):
            return Route(Direct(backend.database), route.write, "inside the transaction", anywhere=True)
        return route

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
            if self.tx.implicit:
                raise _implicit_control(sql)
            if (self.link.server is None or not self._engaged(self.link.server)) and self._transaction_control(sql, raw):
                return True
            analysis = self.fleet.router.analysis(sql)
            if self.tx.participants:
                end = across(sql, analysis, self.tx.databases(self.link.server))
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
            self.audit.start(raw[5:-1].decode(errors="replace"), database, simple=True)
        backend.push(FORWARD_QUERY)
        backend.send(raw)
        return True

    def _fleet_settings(self, analysis: Analysis) -> bool:
        """SET / RESET pgfleet.*: the session's hints, answered here and never sent on.

        True when the query was exactly that and is answered. RESET ALL clears the hints too,
        and goes on to the backend.
        """
        assert self.key is not None
        tag = self.settings.set_hints(analysis, self.key.role in (Role.SERVER, Role.ADMIN), self.key.id,
                                      self.key.role.value)
        if tag is None:
            return False
        self._made_up(Answer.QUERY, m.command_complete(tag) + m.ready_for_query(self.tx.status))
        return True

    def _effect(self, raw: bytes, start: int) -> Analysis | None:
        """The analysis of a statement on a decided database, if it may change settings."""
        if self.settings.pending is None and not _may_set(raw[start:].lower()):
            return None
        end = raw.find(0, start)
        analysis = self.fleet.router.analysis(raw[start:end].decode(errors="replace"))
        return analysis if analysis.touches_session else None

    def _deferrable(self, word: str) -> bool:
        """Whether pgfleet answers this BEGIN/COMMIT/... itself: a BEGIN before any statement
        of a transaction, or the end of one that never reached a database."""
        backend = self.link.server
        idle = backend is None or not self._engaged(backend)
        if word in STARTS:
            return self.tx.status == m.TX_IDLE and self.tx.deferred_begin is None and idle
        return self.tx.deferred_begin is not None and idle

    def _aborted(self, kind: int, raw: bytes) -> None:
        """In a transaction that failed before reaching a database, only its end is taken."""
        if kind == m.QUERY or kind == m.PARSE:
            sql = m.decode_query(raw[5:]) if kind == m.QUERY else m.decode_parse(raw[5:]).query
            if first_word(sql) in TRANSACTION_ENDS:
                return  # _transaction_control, or the extended protocol's control path, ends it
        elif kind == m.BIND:
            portal_end = raw.find(0, 5)
            name_end = raw.find(0, portal_end + 1)
            control = self.statements.control(raw[portal_end + 1:name_end]) \
                if portal_end >= 0 and name_end >= 0 else None
            if control is not None and control.control in TRANSACTION_ENDS:
                return
        elif self.tx.control_portal is not None:  # Describe or Execute of the bound COMMIT/ROLLBACK
            return
        raise in_failed_transaction()

    def _transaction_control(self, sql: str, raw: bytes) -> bool:
        """BEGIN on the fleet waits for its first routed statement, which picks the database.

        pgfleet answers it at once, and sends it (as it came) to the backend of the first
        statement that needs one. COMMIT or ROLLBACK before any such statement ends it here.
        """
        word = first_word(sql)
        if word not in TRANSACTION_WORDS:
            return False
        analysis = self.fleet.router.analysis(sql)
        if len(analysis.statements) != 1 or analysis.statements[0].kind is not Kind.TRANSACTION:
            return False
        if word in STARTS and self.tx.status == m.TX_IDLE:
            self.tx.hold_begin(raw)
            self._write(m.command_complete("BEGIN") + m.ready_for_query(m.TX_IN_TRANSACTION))
            return True
        if self.tx.deferred_begin is not None and word in TRANSACTION_ENDS:
            tag = self.tx.end_unsent(word)
            self._write(m.command_complete(tag) + m.ready_for_query(m.TX_IDLE))
            return True
        return False

    def _end_across(self, word: str, simple: bool) -> bool:
        """COMMIT (in two phases) or ROLLBACK of a transaction on several databases."""
        if not self._answered_first():
            return False  # then this again
        backend = self.link.server
        self.tx.control_portal = None
        self.link.hand_over()  # the scatter that ends the transaction adopts it
        servers = ([backend] if backend is not None else []) + list(self.tx.participants.values())
        self.tx.participants = {}
        self._wait_for(self._finish_across(servers, word, simple))
        return True

    async def _finish_across(self, servers: list[ServerConnection], word: str, simple: bool,
                             implicit: bool = False) -> None:
        self.fleet.counted("cross_database_transaction")
        started = time.monotonic()
        scatter = Scatter.adopt(self.pools, servers, self.fleet.coordinator)
        failed = any(server.tx_status == m.TX_FAILED for server in servers)
        tag = "ROLLBACK" if failed or word == "ROLLBACK" else "COMMIT"
        reply = m.command_complete(tag)
        try:
            if tag == "COMMIT":
                await scatter.commit()
            else:
                await scatter.rollback()
        except ProxyError as exc:
            reply = answer_of(exc)
            if not simple and not implicit:
                self._skip_to_sync()
        finally:
            for server in servers:
                server.settings = DIRTY if self.settings.pending is not None or self.tx.sets else server.settings
            scatter.give_back()
        self.settings.drop_pending()
        self.tx.ended()
        if self.audit is not None:
            self.audit.text = word
            self.audit.whole("two_phase_commit" if tag == "COMMIT" else "rollback",
                             tuple(server.database for server in servers), started, reply)
        if implicit:  # a pipeline's: its Sync's answer, after an error if the commit failed
            self._write((reply if reply[0] == m.ERROR_RESPONSE else b"") + m.ready_for_query(m.TX_IDLE))
            return
        self._write(reply + m.ready_for_query(m.TX_IDLE) if simple else reply)

    def _function_call(self, raw: bytes) -> bool:
        key = self.key
        assert key is not None
        if key.policy is not None:  # a function by OID: neither the router nor the policy can see it
            raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} ({key.role.value}) may not use the fast-path "
                              "function call interface: refused by its policy (functions)",
                              hint="call the function in a SELECT instead")
        backend = self._backend_for(self.fixed or self.config.default)
        if backend is None:
            return False
        backend.push(FORWARD_QUERY)
        backend.send(raw)
        return True

    def _parse(self, raw: bytes) -> bool:
        statements = self.statements
        if self.unparsed is not None and raw[5] == 0:  # the unnamed statement, decided database
            backend = self._backend_for(self.unparsed)
            if backend is None:
                return False
            self.batch_open = True
            effect = self._effect(raw, 6)
            _no_fleet_settings(effect)
            token = backend.unnamed_owner = self.fleet.next_token()
            statements.unnamed = Prepared(raw, self.unparsed, effect=effect, token=token)
            backend.push(FORWARD_PARSE_UNNAMED)
            backend.send(raw)
            return True
        parse = m.decode_parse(raw[5:])
        routed = False
        analysis = None
        if self.unparsed is not None:
            database = self.unparsed
        else:
            analysis = self.fleet.router.analysis(parse.query)
            route = self._route(parse.query)
            # A statement for several databases runs at Execute, as one scatter or gather (_bind).
            routed = route.needs_params or route.fanout or (route.write and not isinstance(route.target, Direct))
            if not isinstance(route.target, Direct):
                no_copy(analysis, route.target)
            if route.fanout:  # what cannot be merged is refused at Parse, as PostgreSQL's errors come
                limit_types(self.fleet.router.fanout_plan(parse.query, analysis), parse.param_types)
            database = first_database(route) if routed else one_database(route)
            if not routed and not parse.name and database in self.fleet.replicas.sets and analysis.replica_safe:
                database = self._replica_or(database)
        key = parse.name.encode()
        if analysis is not None:
            effect = analysis if analysis.touches_session else None
        else:
            effect = self._effect(raw, 5 + len(key) + 1)
        _no_fleet_settings(effect)
        statements.check_new(key)
        if self.tx.participants:
            across(parse.query, analysis or self.fleet.router.analysis(parse.query), self.tx.databases(self.link.server))
        control = control_word(parse.query, analysis) if analysis is not None else None
        if control is not None or routed:
            # BEGIN, COMMIT, ...: a BEGIN must not pick a database (the first statement does),
            # so it is parsed lazily where it runs, if it ever reaches a backend (see _bind).
            # A statement whose database depends on its parameters: each Bind prepares it
            # there. pglast has parsed both already, so the client's ParseComplete comes at once.
            if parse.name:
                name = self._backend_name(parse)
                prepared = Prepared.named(name, parse.query, parse.param_types, database, effect,
                                          routed=routed, control=control)
            else:
                prepared = Prepared(raw, database, query=parse.query, param_types=parse.param_types,
                                    effect=effect, routed=routed, control=control, token=self.fleet.next_token())
            statements.add(key, prepared)
            if self.split is not None:
                self.split.note_statement(key)
            self._made_up(Answer.PARSE, m.PARSE_COMPLETE_MSG)
            return True
        if parse.name and self.link.server is None and not self.session_mode:
            # A statement some backend already parsed needs no backend now: it is prepared
            # lazily where it is bound. This also spares a pooled backend for clients (like
            # pgbench) that prepare synchronously while others of theirs hold transactions.
            name = self._backend_name(parse)
            if name in self.fleet.pool_of(database, self.role).parsed_ok:
                statements.add(key, Prepared.named(name, parse.query, parse.param_types, database, effect))
                self._write(m.PARSE_COMPLETE_MSG)
                return True
        backend = self._backend_for(database)
        if backend is None:
            return False
        self.batch_open = True
        if not parse.name:
            token = backend.unnamed_owner = self.fleet.next_token()
            statements.unnamed = Prepared(raw, database, query=parse.query, param_types=parse.param_types,
                                          effect=effect, token=token)
            backend.push(FORWARD_PARSE_UNNAMED)
            backend.send(raw)
            return True
        name = self._backend_name(parse)
        prepared = Prepared.named(name, parse.query, parse.param_types, database, effect)
        statements.add(key, prepared)
        if self.split is not None:
            self.split.note_statement(key)
        if name in backend.prepared:
            backend.push(Expect(Answer.PARSE, Fate.MADE_UP, reply=m.PARSE_COMPLETE_MSG))
        else:
            backend.close_stale(name)
            backend.prepared.add(name)
            backend.push(Expect(Answer.PARSE, statement=name, client=key))
            backend.send(prepared.parse)
        return True

    def _backend_name(self, parse: m.Parse) -> str:
        """The name a client's statement has on the backends: in session mode its own (the
        backend is the client's: SQL EXECUTE of a protocol-level statement finds it); in
        transaction mode the name shared by every client that prepares the same text."""
        if self.session_mode:
            return parse.name
        return self.fleet.statement_name(parse.query, parse.param_types)

    def _prepared_on(self, prepared: Prepared, bound: str | None = None) -> ServerConnection | None:
        """The backend that runs a client's statement, with the statement prepared on it.

        A statement whose shard key is a parameter runs on ``bound``, the database its Bind
        chose; without one (Describe) on the shard its route named at Parse.
        """
        backend = self._backend_for(bound or prepared.database)
        if backend is not None:
            name = prepared.backend_name
            if (name not in backend.prepared) if name else (backend.unnamed_owner != prepared.token):
                prepared.prepare_on(backend)
        return backend

    def _bind(self, raw: bytes) -> bool:
        # Only the statement name is rewritten; the rest of the Bind goes as it came.
        portal_end = raw.find(0, 5)
        name_end = raw.find(0, portal_end + 1) if portal_end >= 0 else -1
        if name_end < 0:
            raise ProtocolViolation("invalid Bind message: unterminated string")
        client_name = raw[portal_end + 1:name_end]
        bound = None
        prepared = self.statements.find(client_name)
        word = prepared.control
        if word is not None:
            if self.tx.implicit:
                raise _implicit_control(prepared.query)
            text = prepared.query
            backend = self.link.server
            portal = ControlPortal(raw[5:portal_end].decode(errors="replace"), text, word)
            if self.tx.participants and word in TRANSACTION_ENDS:  # ended everywhere at Execute (_end_across)
                across(text, self.fleet.router.analysis(text), self.tx.databases(backend))
                if not self._answered_first():
                    return False  # then this again
                if backend is not None:
                    # Every participant waits apart, so that the portal's Describe and Execute
                    # come here rather than going on to a backend.
                    self.tx.participants[backend.database] = backend
                    self.link.hand_over()
                self.tx.control_portal = portal
                self._made_up(Answer.BIND, m.BIND_COMPLETE_MSG)
                return True
            if self._deferrable(word):
                if backend is not None:
                    self.link.release()  # parked: the transaction's first statement picks one
                self.tx.control_portal = portal
                self._made_up(Answer.BIND, m.BIND_COMPLETE_MSG)
                return True
            if backend is not None and self._engaged(backend):
                bound = backend.database  # COMMIT and the like end the transaction where it runs
        if prepared.routed:
            formats, values = m.bind_parameters(raw[name_end + 1:])
            route = self._route(prepared.query, Params(values, formats))
            if not isinstance(route.target, Direct):
                if route.fanout or self.fleet.router.analysis(prepared.query).statements[0].command == "SELECT":
                    return self._bind_gather(raw, portal_end, name_end, prepared, route)
                return self._bind_scatter(raw, portal_end, name_end, prepared, route)
            bound = route.target.database
        elif bound is None and self.fleet.replicas.sets:
            bound = self._replica_bind(prepared)
        backend = self._prepared_on(prepared, bound)
        if backend is None:
            return False
        if prepared.effect is not None:
            self._follow(prepared.effect, backend)
        if self.audit is not None:
            self.audit.portals[raw[5:portal_end].decode(errors="replace")] = prepared.query
        self.batch_open = True
        backend.push(FORWARD_BIND)
        backend.last_bound = prepared.backend_name
        # Only the statement's name is rewritten (the unnamed one keeps its own).
        backend.send(m.message(m.BIND, raw[5:portal_end + 1] + prepared.wire_name + raw[name_end + 1:])
                     if prepared.backend_name else raw)
        return True

    def _bind_scatter(self, raw: bytes, portal_end: int, name_end: int, statement: Prepared, route: Route) -> bool:
        """A Bind whose statement writes on several databases: a portal kept here.

        It runs at Execute, as Parse/Bind/Execute on every database in one scatter (see
        ``_scatter``); pgfleet answers the Bind itself.
        """
        target = route.target
        assert not isinstance(target, Direct)
        if route.fanout or not route.write:
            one_database(route)  # refused until the federated SELECT
        joined = self._may_scatter(target, statement.effect)
        name = raw[5:portal_end].decode(errors="replace")
        self._one_portal(name)
        bound = m.parse("", statement.query, statement.param_types) + m.message(m.BIND, b"\0\0" + raw[name_end + 1:])
        portal = self.portal = Portal(name, target.databases, bound, bound, route.replicated)
        portal.joined = joined
        if route.row_shards is not None and len(set(route.row_shards)) > 1:
            # Each shard its own rows, its parameters renumbered from $1, the client's types kept.
            portal.per_database = split_bound(statement.query, statement.param_types, raw[name_end + 1:],
                                              route.row_shards)
            portal.row_order = route.row_shards
        self.portal.text = statement.query
        self._write(m.BIND_COMPLETE_MSG)
        return True

    def _bind_gather(self, raw: bytes, portal_end: int, name_end: int, statement: Prepared, route: Route) -> bool:
        """A Bind of a SELECT that reads several databases: a portal kept here, merged at Execute.

        Every shard runs the plan's shard query with the client's parameters and answers in
        text; the merger writes the client's result formats.
        """
        query, param_types = statement.query, statement.param_types
        target = route.target
        assert not isinstance(target, Direct)
        plan = self.fleet.router.fanout_plan(query, self.fleet.router.analysis(query))
        joined = self._may_scatter(target, statement.effect, read=True)
        name = raw[5:portal_end].decode(errors="replace")
        self._one_portal(name)
        params, formats = m.bind_results(raw[name_end + 1:])
        if plan.limit_param is not None or plan.offset_param is not None:
            plan = plan.bound(bound_limits(*m.bind_parameters(params + b"\0\0"), plan, param_types))
        original = m.parse("", query, param_types) + m.message(m.BIND, b"\0\0" + raw[name_end + 1:])
        shard_query = m.parse("", plan.sql, param_types) + m.message(m.BIND, b"\0\0" + params + b"\0\0")
        self.portal = Portal(name, target.databases, original, shard_query, False, plan, formats)
        self.portal.text = query
        self.portal.joined = joined
        self._write(m.BIND_COMPLETE_MSG)
        return True

    def _one_portal(self, name: str) -> None:
        """pgfleet keeps one portal for several databases at a time (binding it again replaces it)."""
        if self.portal is not None and self.portal.name != name:
            raise ClientError(FEATURE_NOT_SUPPORTED, f'portal "{self.portal.name}" for several databases is '
                              f'still open: pgfleet keeps one such portal at a time, so "{name}" cannot be '
                              "bound beside it", hint="Execute the first portal (or Close it) before binding the next")

    def _may_scatter(self, target: Multi | All, effect: Analysis | None, read: bool = False) -> bool:
        """A statement for several databases runs alone, outside transactions; or, a write
        with two-phase commit, inside the client's transaction on every database it needs
        (True: ``_scatter_joined`` runs it). Refused otherwise.

        A read may also run in a transaction that has not reached any database yet (drivers
        that BEGIN before every statement): in READ COMMITTED each statement has its own
        snapshot anyway. REPEATABLE READ and SERIALIZABLE would need one snapshot for all.
        """
        backend = self.link.server
        deferred = self.tx.deferred_begin is not None and (backend is None or backend.tx_status == m.TX_IDLE) \
            and _SNAPSHOT_LEVELS.search(self.tx.deferred_begin) is None
        joined = False
        if (self.tx.status != m.TX_IDLE and not (read and deferred)) \
                or (backend is not None and backend.tx_status != m.TX_IDLE):
            names = ", ".join(target.databases)
            if self.fleet.coordinator is None:
                raise ClientError(FEATURE_NOT_SUPPORTED, f"a {'read merged from' if read else 'statement on'} several "
                                  f"databases ({names}) cannot run inside a transaction block without two-phase commit",
                                  hint="set two_phase_commit: true (it then joins the transaction on each "
                                       "database), run it outside BEGIN ... COMMIT, or bind the shard key")
            if self.tx.status == m.TX_FAILED:
                raise in_failed_transaction()
            joined = True
        if effect is not None and effect.touches_settings:
            raise ClientError(FEATURE_NOT_SUPPORTED, "a query string for several databases cannot also "
                              "change settings", hint="send SET separately")
        pins = [p for stmt in effect.statements for p in stmt.pins] if effect is not None else []
        if pins:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"a statement for several databases "
                              f"({', '.join(target.databases)}) cannot leave session state "
                              f"({', '.join(sorted(set(pins)))}) on each: one client keeps at most one backend",
                              hint="bind the shard key, or run it on one database (/* pgfleet: database=NAME */)")
        if self.split is not None or (backend is not None and backend.expects):
            # Its answers would come after the scatter's: out of order.
            raise ClientError(FEATURE_NOT_SUPPORTED, f"one pipeline (messages up to Sync) cannot use "
                              f"database {backend.database if backend is not None else '?'} and then several "
                              "databases", hint="send a Sync before a statement for several databases")
        if backend is not None:
            if joined and backend.tx_status != m.TX_IDLE:
                # In the transaction: it waits apart until the scatter adopts it (and the
                # client's Describe and Execute of the portal are not a backend's to answer).
                self.link.hand_over()
                if backend.outbox:
                    backend.flush()
                self.tx.participants[backend.database] = backend
                return True
            if not self.settings.pins:  # a pinned backend stays; the others are taken from the pools
                self.link.release()  # parked here, or done with: the scatter takes its own
        return joined

    def _join_all(self, databases: tuple[str, ...]) -> tuple[dict[str, ServerConnection], bytes]:
        """A read merged from several databases inside the client's transaction (two-phase
        commit): the transaction's backends of those databases, and the BEGIN for the others."""
        participants = self._all_apart()
        adopted = {db: participants.pop(db) for db in databases if db in participants}
        return adopted, self._transaction_begin()

    def _all_apart(self) -> dict[str, ServerConnection]:
        """The attached backend joins the transaction's participants waiting apart; all of them."""
        current = self.link.hand_over()
        participants = self.tx.participants
        if current is not None:
            if current.outbox:
                current.flush()
            participants[current.database] = current
        return participants

    def _transaction_begin(self) -> bytes:
        """The BEGIN a database the transaction reaches now starts with (the held-back one first)."""
        return self.tx.sent_begin() if self.tx.deferred_begin is not None else (self.tx.begin or m.query("BEGIN"))

    def _take_back(self, servers: list[ServerConnection], failed: bool) -> None:
        """Backends a merged read used in the client's transaction: each waits apart again."""
        for server in servers:
            if server.closed:
                server.pool.discard(server)
                failed = True
                continue
            server.attach(self, self.write, parameters=self._parameter_changed,
                          answers=self.audit.answer if self.audit is not None else None)
            self.tx.participants[server.database] = server
        if failed:
            self.tx.status = m.TX_FAILED

    def _scatter_joined(self, statements: dict[str, bytes], replicated: bool, describe: bool | None,
                        after: dict[str, bytes] | None = None, row_order: tuple[str, ...] | None = None) -> None:
        """two_phase_commit: a write for several databases inside the client's transaction.

        The transaction's backends of those databases (the attached one, those waiting apart)
        run it in the transaction; a database the transaction has not reached yet gets a
        backend from its pool and the transaction's BEGIN first. Afterwards every one waits
        apart in the transaction, and COMMIT commits them all in two phases (``_end_across``)."""
        participants = self._all_apart()
        adopted = [participants.pop(db) for db in statements if db in participants]
        begin = self._transaction_begin()
        self._wait_for(self._run_joined(adopted, statements, begin, replicated, describe, after, row_order))

    async def _run_joined(self, adopted: list[ServerConnection], statements: dict[str, bytes], begin: bytes,
                          replicated: bool, describe: bool | None, after: dict[str, bytes] | None,
                          row_order: tuple[str, ...] | None) -> None:
        self.fleet.counted("cross_database_transaction")
        started = time.monotonic()
        scatter = Scatter.adopt(self.pools, adopted, self.fleet.coordinator)
        status = m.TX_IN_TRANSACTION
        try:
            answer = await scatter.run_joined(self.pools, statements, begin, self.settings.values, replicated,
                                              describe, after, row_order)
        except ProxyError as exc:
            answer, status = answer_of(exc), m.TX_FAILED
            if describe is not None:
                self._skip_to_sync()
        for leg in scatter.legs.values():  # back to this client, each waiting apart in the transaction
            server = leg.server
            if leg.lost is not None or server.closed:
                leg.pool.discard(server)
                status = m.TX_FAILED  # a database's part is gone: the transaction can only roll back
                continue
            server.attach(self, self.write, parameters=self._parameter_changed,
                          answers=self.audit.answer if self.audit is not None else None)
            self.tx.participants[leg.database] = server
        self.tx.status = status
        if self.audit is not None:
            self.audit.whole("scatter", tuple(statements), started, answer)
        self._write(answer + m.ready_for_query(status) if describe is None else answer)

    def _execute(self, raw: bytes) -> bool:
        portal = self.portal
        name, max_rows = m.decode_execute(raw[5:])
        control = self.tx.control_portal
        if control is not None and name == control.portal:
            word = control.word
            if self.tx.participants and word in TRANSACTION_ENDS:
                return self._end_across(TRANSACTION_ENDS[word], simple=False)
            self.tx.control_portal = None
            if word in STARTS:
                self.tx.hold_begin(m.query(control.text))
                tag = "BEGIN"
            else:
                tag = self.tx.end_unsent(word)
            self._made_up(Answer.EXECUTE, m.command_complete(tag))
            return True
        if portal is None or name != portal.name:
            backend = self.link.server
            if self.audit is not None and backend is not None:  # off the fast path only to be seen
                self.audit.start(self.audit.portals.get(name, ""), backend.database, simple=False)
                self.batch_open = True
                backend.push(FORWARD_EXECUTE)
                backend.send(raw)
                return True
            raise ClientError(INVALID_CURSOR_NAME, f'portal "{name}" does not exist: Execute needs a Bind '
                              "first in the same transaction")
        if self.audit is not None:
            self.audit.text = portal.text
        run = m.describe(m.TARGET_PORTAL, "") + m.execute("") + m.SYNC_MSG
        statement = portal.messages + run
        if portal.plan is not None:
            if portal.rows is not None:
                self._write(portal.next_rows(max_rows))
                return True
            self._wait_for(self._run_gather(portal.plan, portal.databases, statement, portal, max_rows,
                                            joined=portal.joined))
            return True
        described, portal.describe = portal.describe, False
        self.portal = None
        if max_rows > 0:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"Execute with a row limit ({max_rows}) is not supported "
                              f"for a statement that writes on several databases ({', '.join(portal.databases)})",
                              hint="fetch all its rows at once (no fetch size)")
        per_database = portal.per_database
        statements = {db: (per_database[db] + run if per_database is not None else statement) for db in portal.databases}
        after = self._after(self.fleet.router.analysis(portal.text), portal.databases)
        if portal.joined:
            self._scatter_joined(statements, portal.replicated, described, after, portal.row_order)
        else:
            self._wait_for(self._run_scatter(statements, portal.replicated, describe=described, after=after,
                                             row_order=portal.row_order))
        return True

    def _after(self, analysis: Analysis, databases: tuple[str, ...]) -> dict[str, bytes] | None:
        """What each shard runs after a CREATE TABLE of sharded tables, in its transaction: the
        tables' sequences interleaved, so that ids are unique across shards."""
        router = self.fleet.router
        created = [stmt.target for stmt in analysis.statements
                   if stmt.command == "CREATE" and stmt.target is not None and stmt.target in router.sharded]
        if not created:
            return None
        n = len(router.shards)
        return {db: m.query("; ".join(interleave_sequences(table, router.shards.index(db), n) for table in created))
                for db in databases if db in router.shards}

    async def _describe_apart(self, query: str, param_types: bytes) -> None:
        """Describe of a statement routed at Bind: ParameterDescription and RowDescription (or
        NoData) from the first shard it may run on, on a backend outside the client's transaction."""
        database = first_database(self._route(query))
        statement = m.parse("", query, param_types) + m.describe(m.TARGET_STATEMENT, "") + m.SYNC_MSG
        try:
            answer = await Scatter().run(self.pools, {database: statement}, self.settings.values, True,
                                         keep=_STATEMENT_DESCRIPTION)
        except ProxyError as exc:
            answer = answer_of(exc)
            self._skip_to_sync()
        self._write(answer)

    async def _describe_portal(self, portal: Portal) -> None:
        """Describe of a portal for several databases: the first shard describes the client's
        own statement, bound as the client bound it (its formats too), without running it."""
        statement = portal.describe_messages + m.describe(m.TARGET_PORTAL, "") + m.SYNC_MSG
        try:
            answer = await Scatter().run(self.pools, {portal.databases[0]: statement}, self.settings.values,
                                         True, describe=True)
        except ProxyError as exc:
            answer = answer_of(exc)
            self._skip_to_sync()
        self._write(answer)

    def _describe(self, raw: bytes) -> bool:
        kind, name = m.decode_target(raw[5:], "Describe")
        control = self.tx.control_portal
        if kind == m.TARGET_PORTAL and control is not None and name == control.portal:
            self._made_up(Answer.DESCRIBE_PORTAL, m.NO_DATA_MSG)
            return True
        if kind == m.TARGET_STATEMENT and self.statements.control(name.encode()) is not None \
                and (self.link.server is None or not self._engaged(self.link.server)):
            self._made_up(Answer.DESCRIBE_STATEMENT, m.message(m.PARAMETER_DESCRIPTION, b"\0\0") + m.NO_DATA_MSG)
            return True
        if kind == m.TARGET_PORTAL and self.portal is not None and name == self.portal.name:
            # Answered with the rows when its Execute comes next (drivers send them together),
            # else by a round of its own before the next message (see _statement).
            self.portal.describe = True
            return True
        if kind == m.TARGET_PORTAL:  # a portal: only exists on the backend that bound it
            if self.link.server is None:
                raise ClientError(INVALID_CURSOR_NAME, f'portal "{name}" does not exist', hint="Bind it first")
            self.link.server.push(FORWARD_DESCRIBE_PORTAL)
            self.link.server.send(raw)
            return True
        prepared = self.statements.find(name.encode())
        backend = self.link.server
        parked = backend is None or (backend.tx_status == m.TX_IDLE and not backend.expects)
        if prepared.routed and self.tx.deferred_begin is not None and parked:
            # A transaction that has not reached a database yet must not be pinned by a Describe
            # (asyncpg describes every statement): the first shard describes it apart.
            self._wait_for(self._describe_apart(prepared.query, prepared.param_types))
            return True
        backend = self._prepared_on(prepared)
        if backend is None:
            return False
        self.batch_open = True
        backend.push(FORWARD_DESCRIBE_STATEMENT)
        backend.send(raw if prepared.unnamed else m.describe(kind, prepared.backend_name))
        return True

    def _close(self, raw: bytes) -> bool:
        kind, name = m.decode_target(raw[5:], "Close")
        backend = self.link.server
        if kind == m.TARGET_STATEMENT:
            self.statements.close(name.encode())
            if self.session_mode and backend is not None and name in backend.prepared:
                # Its own name on its own backend: closed there too, so that a Parse of the
                # same name prepares the new text.
                backend.prepared.discard(name)
                backend.push(FORWARD_CLOSE)
                backend.send(raw)
                return True
        elif self.portal is not None and name == self.portal.name:
            self.portal = None
        elif backend is not None:
            backend.push(FORWARD_CLOSE)
            backend.send(raw)
            return True
        self._made_up(Answer.CLOSE, m.CLOSE_COMPLETE_MSG)
        return True

    def _sync(self, raw: bytes) -> bool:
        """A Sync with no backend attached: pgfleet answered everything since the last one.
        Or the end of a pipeline run on several databases at once (``_end_split``)."""
        if self.split is not None:
            self._end_split()
            return True
        self.tx.control_portal = None
        self.portal = None  # the implicit transaction ends, and its portals with it
        self.batch_open = False
        self._write(m.ready_for_query(self.tx.status))
        return True

    def _nothing_in_flight(self, raw: bytes) -> bool:
        return True  # Flush, or COPY messages with no COPY running: nothing to flush or copy

    # ------------------------------------------------------------------ several databases

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
        no_copy(analysis, target)
        if route.fanout or analysis.statements[0].command == "SELECT":  # FOR UPDATE, INTO: refused there
            plan = self.fleet.router.fanout_plan(sql, analysis)
            joined = self._may_scatter(target, analysis, read=True)
            self._wait_for(self._run_gather(plan, target.databases, m.query(plan.sql), joined=joined))
            return True
        if not route.write:
            one_database(route)
        joined = self._may_scatter(target, analysis)
        if route.row_shards is not None:
            texts = split_insert(sql, route.row_shards)
            statements = {db: m.query(texts[db]) for db in target.databases}
        else:
            statements = {db: m.query(sql) for db in target.databases}
        after = self._after(analysis, target.databases)
        if joined:
            self._scatter_joined(statements, route.replicated, None, after, route.row_shards)
        else:
            self._wait_for(self._run_scatter(statements, route.replicated, after=after, row_order=route.row_shards))
        return True

    async def _begin_copy(self, spec: CopyIn, databases: tuple[str, ...], statement: bytes) -> None:
        """COPY FROM STDIN into a sharded table: every shard's COPY started, then the client's."""
        self.fleet.counted("copy")
        router = self.fleet.router
        try:
            columns = spec.columns or tuple(await self.fleet.columns_of(databases[0], spec.table))
            if not columns:
                raise ClientError(UNDEFINED_TABLE, f'relation "{spec.table}" does not exist')
            key = router.sharded[spec.table]
            if key not in columns:
                raise ClientError(FEATURE_NOT_SUPPORTED, f'COPY into sharded table "{spec.table}" must include '
                                  f'its shard key "{key}": pgfleet sends each row to the shard of its key',
                                  hint=f"add {key} to the COPY column list")
            splitter = BinaryRowSplitter(columns.index(key)) if spec.format.binary \
                else RowSplitter(spec.format, columns.index(key))
            copy = CopySplit(router, spec.table, splitter, self.fleet.coordinator)
            await copy.open(self.pools, databases, statement, self.settings.values)
        except ProxyError as exc:
            self._write(answer_of(exc) + m.ready_for_query(self.tx.status))
            return
        if self.state is State.CLOSED:
            await copy.finish("the client disconnected")
            return
        self.copy = copy
        self.state = State.COPY_IN
        self._write(m.copy_in_response(len(columns)))

    async def _end_copy(self, copy: CopySplit, reason: str | None) -> None:
        started = time.monotonic()
        answer = await copy.finish(reason)
        if self.audit is not None:
            self.audit.whole("copy", tuple(leg.database for leg in copy.legs.values()), started, answer)
        self._write(answer + m.ready_for_query(self.tx.status))

    async def _run_scatter(self, statements: dict[str, bytes], replicated: bool, describe: bool | None = None,
                           after: dict[str, bytes] | None = None, row_order: tuple[str, ...] | None = None) -> None:
        """``describe`` None: a simple query, answered up to ReadyForQuery. True or False: an
        Execute (with the client's Describe of the portal or without), answered up to its
        CommandComplete; an error skips the client's messages up to Sync, as PostgreSQL does."""
        self.fleet.counted("scatter")
        started = time.monotonic()
        try:
            answer = await Scatter(self.fleet.coordinator).run(self.pools, statements, self.settings.values,
                                                               replicated, describe, after=after,
                                                               row_order=row_order)
        except ProxyError as exc:
            answer = answer_of(exc)
            if describe is not None:
                self._skip_to_sync()
        if self.audit is not None:
            self.audit.whole("scatter", tuple(statements), started, answer)
        self._write(answer + m.ready_for_query(m.TX_IDLE) if describe is None else answer)

    async def _run_gather(self, plan: FanoutPlan, databases: tuple[str, ...], query: bytes,
                          portal: Portal | None = None, max_rows: int = 0,
                          copy: CopyOutWriter | None = None, joined: bool = False) -> None:
        """A federated SELECT: merged rows to the client as they come.

        A simple query (no ``portal``) ends with ReadyForQuery. An Execute ends with its
        CommandComplete; with a row limit the whole result is kept in the portal and handed
        out ``max_rows`` at a time (PortalSuspended between), as PostgreSQL does.
        """
        self.fleet.counted("fanout")
        settings = self.settings.values
        try:
            digits = int(settings.get("extra_float_digits", "1"))
        except ValueError:
            digits = 1
        await self.fleet.learn_byte_order(databases)
        # Text compares by its bytes only in UTF-8 (other client encodings reorder it).
        text_order = all(self.fleet.byte_order.get(db, False) for db in databases) and \
            encoding_name(settings.get("client_encoding", "UTF8")) in ("UTF8", "UNICODE")
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
        if self.link.client_slow:
            gather.pause()
        started = time.monotonic()
        adopted, begin = self._join_all(databases) if joined else (None, None)
        try:
            last = await gather.run(self.pools, databases, query, settings, adopted, begin)
        finally:
            self.gather = None
            if joined:
                self._take_back(gather.kept, failed=gather.failure is not None)
        if self.audit is not None:
            self.audit.whole("copy" if copy is not None else "fanout", databases, started, last)
        failed = gather.failure is not None or last[:1] == b"E"
        if failed and self.tx.deferred_begin is not None:
            self.tx.status = m.TX_FAILED  # the client's transaction fails, as on one database
        if portal is None:
            if copy is not None:
                last = copy.convert(m.split(last), m.row_values)
            self._write(last + m.ready_for_query(self.tx.status))
            return
        if failed:
            self.portal = None
            self._skip_to_sync()
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
        if self.link.server is not None:
            self.link.server.push(Expect(answer, Fate.MADE_UP, reply=reply))  # at once if nothing is due
        else:
            self._write(reply)

    # ------------------------------------------------------------------ backends

    def _replica_or(self, database: str) -> str:
        """Where a replica-safe read of ``database`` runs (see ``BackendLink.replica``)."""
        backend = self.link.server
        return self.link.replica(database, backend is not None and (self.batch_open or self._engaged(backend)),
                                 bool(self.settings.pins),
                                 self.tx.status == m.TX_IDLE and self.tx.deferred_begin is None)

    def _replica_bind(self, prepared: Prepared) -> str | None:
        """The database a Bind of a replica-safe statement runs on (a replica or its primary),
        or None: where its Parse put it."""
        if prepared.routed or prepared.control is not None:
            return None
        database = prepared.database
        if database.partition("~")[0] not in self.fleet.replicas.sets:
            return None
        if not self.fleet.router.analysis(prepared.query).replica_safe:
            return database.partition("~")[0]
        return self._replica_or(database)

    def _backend_for(self, database: str) -> ServerConnection | None:
        """The attached backend of ``database``, attaching one if needed; None means wait."""
        if self.portal is not None:
            raise ClientError(FEATURE_NOT_SUPPORTED, f'portal "{self.portal.name}" for several databases is '
                              "still open: one pipeline cannot also use another database",
                              hint="send Execute and Sync for it first")
        backend = self.link.server
        if backend is None and self.tx.participants:  # a transaction on several databases, all waiting apart
            return self._rejoin(database)
        if backend is not None and backend.gone and not self._engaged(backend):
            # Parked, and already known dead (its connection_lost is still to come): another one.
            self.link.lost()
            if self.session_mode or self.settings.pins:
                # Its session state went with it: the client is told, as backend_lost tells it.
                reason = backend.close_reason or "the server closed the connection"
                raise ProxyError(CONNECTION_FAILURE, f"the connection to database {backend.database} was lost: "
                                 f"{reason}", hint="its session state went with it: reconnect")
            backend = None
        if backend is not None:
            if backend.database == database:
                if self.tenant_query is not None and backend.tx_status == m.TX_IDLE and not backend.expects \
                        and not self.batch_open:
                    self._send_tenant(backend)
                if self.tx.deferred_begin is not None:  # a parked backend: BEGIN goes first
                    self._send_begin(backend)
                return backend
            if self.settings.pins:
                raise ClientError(FEATURE_NOT_SUPPORTED, f"this connection keeps its backend of database "
                                  f"{backend.database} ({', '.join(sorted(self.settings.pins))} left session "
                                  f"state there); a statement for database {database} needs another connection",
                                  hint="use a separate connection for the other database, or release the "
                                       "state first (DISCARD ALL)")
            # In the client's transaction: the backend's status may not show it yet (its BEGIN
            # is on the way, in the same pipeline).
            if backend.tx_status != m.TX_IDLE or (self.tx.status != m.TX_IDLE and self.tx.deferred_begin is None):
                if self.fleet.coordinator is not None:
                    return self._join(backend, database)
                raise ClientError(FEATURE_NOT_SUPPORTED, f"this transaction runs on database {backend.database}; "
                                  f"a statement for database {database} cannot join it",
                                  hint="commit first, keep a transaction on one database, or set "
                                       "two_phase_commit: true")
            if self.batch_open:
                if self.fleet.coordinator is not None:
                    return self._implicit_across(backend, database)
                raise ClientError(FEATURE_NOT_SUPPORTED, f"one pipeline (messages up to Sync) outside a transaction "
                                  f"cannot use databases {backend.database} and {database}: PostgreSQL commits a "
                                  "pipeline's statements together, which pgfleet does on several databases only "
                                  "with two-phase commit", hint="set two_phase_commit: true, or send a Sync "
                                  "between statements for different databases")
            if backend.busy:
                self.waiting = True  # resumes when the backend goes idle and is released
                return None
            self.link.release()
        return self._from_pool(database)

    def _from_pool(self, database: str) -> ServerConnection | None:
        """A backend of ``database`` attached from its pool; None: the session waits for one."""
        pool = self.fleet.pool_of(database, self.role)
        server = pool.try_acquire()
        if server is None:
            # Queued in the pool, called back with a backend (_granted): no task, no timer of
            # its own. Otherwise (the pool may open one, is paused, ...) a wait of its own.
            self.queued = pool.queue(self._granted, self._not_granted)
            if self.queued is None:
                self._wait_for(self._acquire(database))
            else:
                self.queued_for = database
                self.waiting = True
            return None
        self._attach(server)
        return server

    def _granted(self, server: ServerConnection) -> None:
        """The pool hands over a backend the session queued for (``_backend_for``)."""
        self.queued = None
        if self.state is State.CLOSED:
            server.pool.release(server)
            return
        self._attach(server)
        self._unguard()
        self._resume()

    def _not_granted(self, error: BaseException) -> None:
        """The queue's wait ended without a backend: past ``acquire_timeout`` the statement is
        refused; the circuit opening or a shutdown goes the long way (replicas, the error)."""
        self.queued = None
        if self.state is State.CLOSED:
            return
        if isinstance(error, BackendError):
            self._wait_for(self._acquire(self.queued_for))
            return
        self._unguard()
        if isinstance(error, ProxyError):
            self._drop_pending_message(error)
        self._resume()

    async def _acquire(self, database: str, join: bool = False) -> None:
        pool = self.fleet.pool_of(database, self.role)
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

        The backend it leaves waits in the transaction's participants, idle in the
        transaction, until a statement for its database comes back to it or the transaction
        ends (``_end_across``). A pipeline (messages up to the client's Sync) is cut there
        (``split.py``): the part sent to ``backend`` ends with a Sync of pgfleet's (inside the
        transaction it commits nothing), and the rest goes to ``database`` at once; the
        client hears the answers in its own order, and after an error in one part the rest is
        skipped up to the client's Sync, as PostgreSQL does.
        """
        self._may_join(backend, database)
        if self.batch_open:
            split = self.split
            if split is None:
                split = self.split = SplitPipeline(self.write, self._split_failed, self.port.later)
                split.part(backend)  # what it owes so far is the first part
            elif split.failed:
                raise _PipelineFailed  # its error went to the client; the rest up to Sync is skipped
            split.part(backend)  # (a refusal may have reopened it)
            backend.push(CUT_SYNC)
            backend.send(m.SYNC_MSG)
            split.cut(backend)
        elif backend.expects:
            self.waiting = True  # its answers first: resumes when it is idle (backend_idle)
            return None
        return self._participant(database)

    def _may_join(self, backend: ServerConnection, database: str) -> None:
        """What refuses a transaction going on from ``backend`` to ``database``."""
        if backend.tx_status == m.TX_FAILED:
            raise in_failed_transaction()
        if self.settings.pending is not None or self.tx.sets:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"this transaction changed settings on database "
                              f"{backend.database}, so it cannot go on on database {database} too",
                              hint="SET before BEGIN, or keep a transaction that sets on one database")

    def _implicit_across(self, backend: ServerConnection, database: str) -> ServerConnection | None:
        """A pipeline outside a transaction block reaches a second database (two-phase commit).

        PostgreSQL runs a pipeline's statements in one implicit transaction, committed at its
        Sync. pgfleet keeps that promise on several databases: a BEGIN on the first database
        makes what the pipeline ran there part of a transaction block (PostgreSQL's rule for a
        BEGIN inside a pipeline), the pipeline goes on as in a transaction on several
        databases (``_join``), and the client's Sync commits it in two phases, or rolls it
        back after an error, and answers ReadyForQuery idle (``_end_split``).
        """
        self._may_join(backend, database)  # refused before anything is sent
        if "~" in backend.database:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"this pipeline read from replica {backend.database}, so it "
                              f"cannot go on on database {database}: a replica cannot take part in a two-phase "
                              "commit", hint="send a Sync between the read and the statement for the other database")
        self._inject(backend, IMPLICIT_BEGIN, _BEGIN_QUERY)
        self.tx.status = m.TX_IN_TRANSACTION
        self.tx.implicit = True
        self.tx.implicit_first = backend
        self.tx.begin = None  # the other databases' BEGIN: a plain one
        return self._join(backend, database)

    def _inject(self, server: ServerConnection, expect: Expect, query: bytes) -> None:
        """A simple query of pgfleet's for ``server``, its answer dropped. PostgreSQL drops the
        unnamed prepared statement at every simple query: the next Bind of the client's unnamed
        statement there parses it again (``_prepared_on``)."""
        server.push(expect)
        server.send(query)
        server.unnamed_owner = 0

    def _rejoin(self, database: str) -> ServerConnection | None:
        """A statement of a transaction on several databases whose backends all wait apart
        (a bound COMMIT that was not run): its database's, or a new participant."""
        if any(server.tx_status == m.TX_FAILED for server in self.tx.participants.values()):
            raise in_failed_transaction()
        return self._participant(database)

    def _participant(self, database: str) -> ServerConnection | None:
        """The backend of ``database`` in the transaction: one waiting apart, or a new one from
        the pool (None: on its way)."""
        server = self.tx.participants.pop(database, None)
        if server is not None:
            self._switch(server, fresh=False)
            return server
        server = self.fleet.pool_of(database, self.role).try_acquire()
        if server is None:
            self._wait_for(self._acquire(database, join=True))
            return None
        self._switch(server, fresh=True)
        return server

    def _switch(self, server: ServerConnection, fresh: bool) -> None:
        """The attached backend waits apart; ``server`` (``fresh``: opening the transaction
        there with its BEGIN) runs the next statements."""
        current = self.link.hand_over()
        participants = self.tx.participants
        if current is not None:
            if current.outbox:
                if self.split is not None:
                    if current not in self.unflushed:
                        self.unflushed.append(current)  # its part, written once the messages are handled
                else:
                    current.flush()
            participants[current.database] = current
        if not fresh:
            self.link.take_up(server)  # linked to this client all along
            if self.tx.implicit and server is self.tx.implicit_first:
                # If an error came before its BEGIN, PostgreSQL skipped the BEGIN and this
                # part would commit by itself at its Sync: a BEGIN again (a no-op when the
                # first one held) keeps it in a transaction that the pipeline's end rolls back.
                self._inject(server, IMPLICIT_BEGIN, _BEGIN_QUERY)
        else:
            if len(participants) == 1:
                log.debug("client %s (key %s): a transaction on databases %s and %s (two-phase commit)",
                          self.peer, self.user, next(iter(participants)), server.database)
            self.tx.deferred_begin = self.tx.begin or m.query("BEGIN")
            self._attach(server)
        if self.split is not None:
            self.split.part(server)

    def _drop_pending_message(self, exc: ProxyError) -> None:
        found = m.frame(self.inbox, 0, self.max_message)
        if found is not None:
            kind, _, end = found
            del self.inbox[:end]
            self._refuse(exc, simple=kind == m.QUERY or kind == m.FUNCTION_CALL)

    def _wait_for(self, work: Coroutine[Any, Any, None]) -> None:
        self.waiting = True
        if not self.reading_paused:
            self.reading_paused = True
            self.port.pause_reading()
        self.wait_task = self.port.spawn(self._waiting(work))

    async def _waiting(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except ProxyError:
            raise
        except Exception:  # our bug: never a hung client nor a traceback for it; one in the log
            log.exception("internal error in session %s (key %s)", self.peer, self.user)
            self._fatal(ProxyError(INTERNAL_ERROR, "internal error in pgfleet; the details are in its log"))
        finally:
            self.wait_task = None
            self._unguard()
            self._resume()

    def _resume(self) -> None:
        if self.state is State.CLOSED or self.state is State.SETTING_UP:
            return
        self.waiting = False
        if self.reading_paused:
            self.reading_paused = False
            self.port.resume_reading()
        self._process()  # also flushes what was queued for the backend meanwhile

    def _attach(self, server: ServerConnection) -> None:
        """A backend from its pool runs the client's statements: the held-back BEGIN and the
        client's settings go first."""
        self.link.link(server, self, self.write, self._parameter_changed,
                       self.audit.answer if self.audit is not None else None)
        server.injected_error = None  # a previous client's, if any: not this one's
        if not self.session_mode:  # the notifier a listener hears of is this client, for now
            server.client_pid = self.pid
            if server.pid_owners is None:  # its first client: found by its pid from now on
                server.pid_owners = self.fleet.backend_owner
                server.pid_owners[(server.dsn.host, server.dsn.port, server.pid)] = server
        # Settings first, outside the transaction (a ROLLBACK must not undo them). Settings
        # dicts are never changed in place, so "is" is the common, cheap answer.
        if server.settings is not self.settings.values:
            self._replay_settings(server)  # and the tenant after it
        elif self.tenant_query is not None:
            self._send_tenant(server)
        if self.tx.deferred_begin is not None:
            self._send_begin(server)

    def _send_tenant(self, server: ServerConnection) -> None:
        """A database key's transaction starts: its pgfleet.tenant again, whatever SQL the
        policy could not see did to it since (docs/security.md), in the same write."""
        self._inject(server, TENANT_QUERY, self.tenant_query)  # type: ignore[arg-type]

    def _send_begin(self, server: ServerConnection) -> None:
        self._inject(server, DROP_QUERY, self.tx.sent_begin())

    def _engaged(self, server: ServerConnection) -> bool:
        """Whether the attached backend is in use: a transaction, a pipeline or answers due.

        Otherwise it is only parked with this client between transactions.
        """
        return server.tx_status != m.TX_IDLE or self.batch_open or bool(server.expects) or bool(self.settings.pins)

    def _replay_settings(self, server: ServerConnection) -> None:
        """The client's settings on ``server``; then a database key's tenant, apart (a setting
        the backend refuses must not take it down too, and RESET ALL must not leave it unset)."""
        sql = self.settings.replay(server.settings)
        server.settings = self.settings.values
        if sql is not None:
            self._inject(server, DROP_QUERY, m.query(sql))
        if self.tenant_query is not None:
            self._send_tenant(server)

    def _maybe_release(self, server: ServerConnection) -> None:
        """Between transactions (not pinned, no pipeline open): the pool decides whether this
        client keeps its backend for the next one."""
        if not self.session_mode and not self.settings.pins and not server.expects \
                and server.tx_status == m.TX_IDLE and not self.batch_open \
                and (server.pool.role != self.role or not server.pool.park(server, self)):
            self.link.release()  # (a RELOAD gave the key another backend role: not kept either)

    def give_back(self, server: ServerConnection) -> bool:
        """The pool takes a parked backend back, if this client is between transactions on it."""
        if (self.link.server is not server or server.expects or server.outbox or server.tx_status != m.TX_IDLE
                or self.batch_open or self.settings.pending is not None or self.settings.pins):
            return False
        self.link.take_back(server)
        return True

    # -- Link: called by the attached backend

    def write(self, data: bytes) -> None:
        if self.corked:  # a backend answers at once while the client's messages are handled
            self.out.append(data)
        else:
            self._send(data)

    def backend_idle(self, server: ServerConnection) -> None:
        if server.unprepared:  # the client's Parse failed (or was skipped): PostgreSQL made nothing
            for name in server.unprepared:
                self.statements.close(name)
            server.unprepared.clear()
        split = self.split
        if split is not None:
            if not split.complete:
                return  # a part of a pipeline on several databases: the others are still due
            self._split_done(split)
        elif self.tx.deferred_begin is None:  # else no backend has the transaction: its status is pgfleet's
            self.tx.status = server.tx_status
        idle = server.tx_status == m.TX_IDLE
        if self.tx.sets and idle:
            self.tx.sets = False
        if self.guard is not None:
            self._unguard()
        if self.settings.pending is not None:
            self._settle(server)
        if idle and self.settings.unpinning is not None:
            self.settings.unpinned(server.errors)
        if self.state is State.SETTING_UP:
            self._setup_done(server)
            return
        if self.fleet.shutting_down and not self.busy():
            self.close(SHUTTING_DOWN)
            return
        self._maybe_release(server)
        if self.waiting and self.wait_task is None and self.queued is None:
            self._resume()

    def part_answered(self, server: ServerConnection) -> None:
        if self.split is not None:
            self.split.part_answered(server)

    def _answered_first(self) -> bool:
        """Whether everything sent for the client is answered, as the end of a transaction on
        several databases needs. If not, the session waits until it is: inside a pipeline, by
        cutting what the current backend owes as one more part (``_end_split``)."""
        backend = self.link.server
        if self.split is None and backend is not None and backend.expects:
            if not self.batch_open:
                self.waiting = True  # resumes when it is idle (backend_idle)
                return False
            self.split = SplitPipeline(self.write, self._split_failed, self.port.later)
            self.split.part(backend)
        return self.split is None or self._end_split(sync=False)

    def _end_split(self, sync: bool = True) -> bool:
        """The client's Sync (``sync``) ends a pipeline run on several databases, or COMMIT
        or ROLLBACK in it needs every part answered first: the current part is cut too, and
        the session waits until every part is answered (``backend_idle``). True: they are."""
        split = self.split
        assert split is not None
        if sync:
            self.tx.control_portal = None
            self.batch_open = False
        split.commit = sync and self.tx.implicit  # then its ReadyForQuery comes after the commit
        split.close(ready=sync and not split.commit)
        backend = self.link.server
        if backend is not None and split.open is not None:
            backend.push(CUT_SYNC)
            backend.send(m.SYNC_MSG)
            split.cut(backend)
        if split.order:
            self.waiting = True
            return False
        split.finish()  # every part was answered already
        self._split_done(split)
        return True

    def _split_failed(self, names: list[bytes]) -> None:
        """A part of a pipeline on several databases failed: the rest is skipped, as after an
        error on one database; the client's Parses sent after it count as never made."""
        self.tx.status = m.TX_FAILED
        for name in names:
            self.statements.close(name)
        if self.batch_open:
            self._skip_to_sync()

    def _split_done(self, split: SplitPipeline) -> None:
        self.split = None
        split.flush()  # before anything the session writes next
        for server in split.servers:
            if server.link is self:
                server.write_client = self.write
        self.tx.status = m.TX_FAILED if split.failed else m.TX_IN_TRANSACTION
        if split.commit:  # the pipeline's implicit transaction, on several databases
            self.link.hand_over()  # the scatter that ends it adopts it
            servers = list(split.servers)
            servers += [server for server in self.tx.participants.values() if server not in servers]
            self.tx.participants = {}
            word = "ROLLBACK" if split.failed else "COMMIT"
            self._wait_for(self._finish_across(servers, word, simple=False, implicit=True))

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        if server is not self.link.server:
            if self.tx.participants.get(server.database) is server:  # a transaction on several databases lost one
                del self.tx.participants[server.database]
                server.pool.discard(server)
                log.warning("client %s (key %s): %s", self.peer, self.user, error.message)
                self._fatal(error)
            return
        self.link.lost()
        if not server.expects and server.tx_status == m.TX_IDLE and not self.batch_open \
                and not self.session_mode and not self.settings.pins:
            # Parked between transactions: the client lost nothing, its next statement gets another.
            # (In session mode, or pinned, its session state went with it: it is told, as
            # PostgreSQL would tell it.)
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

    def _parameter_changed(self, name: str, value: str) -> None:
        """A ParameterStatus from the attached backend (it is forwarded as it came)."""
        if name == "default_transaction_read_only" and value == "off" and self.key is not None \
                and self.key.read_only and self.link.server is not None:
            # Defence in depth: something (a server-side function, say) lifted read-only mode.
            server = self.link.lost(DisconnectReason.DIRTY)
            log.warning("client %s (key %s): a statement turned default_transaction_read_only off "
                        "on database %s; closed the client and its backend", self.peer, self.user,
                        server.database)
            self._fatal(ProxyError(READ_ONLY_SQL_TRANSACTION, f"key {self.user} is read-only, and a statement "
                                   "turned default_transaction_read_only off: the connection is closed",
                                   hint="use a key without read_only: true for writes"))

    # ------------------------------------------------------------------ session settings

    def _follow(self, effect: Analysis, backend: ServerConnection) -> None:
        """A statement that changes settings goes to ``backend``: remember what it sets, and
        the session state that pins the client to this backend."""
        for stmt in effect.statements:
            if stmt.closes_database is not None:
                self.fleet.close_idle_connections(stmt.closes_database)
            if stmt.command == "SET" or stmt.settings or stmt.opaque_settings:
                self.tx.sets = True  # SET LOCAL too: it holds on this backend only
            if "*" in stmt.unpins or "PREPARE" in stmt.unpins:
                # DISCARD ALL, DEALLOCATE ALL: the client's protocol-level statements go too, as
                # on PostgreSQL (psycopg prepares _pg3_0 again). Backend-side ones are shared: they stay.
                self.statements = PreparedStatements()
        pinned = self.settings.follow(effect, backend.errors)
        if pinned:
            log.info("client %s (key %s) keeps its backend of database %s until it disconnects: "
                     "%s leaves session state there", self.peer, self.user, backend.database, ", ".join(pinned))

    def _settle(self, server: ServerConnection) -> None:
        """The backend is idle: the SETs of a transaction that ended without error now hold."""
        settled = self.settings.settle(server.settings, server.errors, server.tx_status == m.TX_IDLE)
        if settled is None:
            return
        server.settings, replay = settled
        if replay:
            self._replay_settings(server)
            server.flush()

    # ------------------------------------------------------------------ errors and endings

    def _refuse(self, exc: ProxyError, *, simple: bool) -> None:
        """Answer one statement with an error, as PostgreSQL would, and go on."""
        error = m.error_response(exc.sqlstate, exc.message, hint=exc.hint)
        backend = self.link.server
        if self.tx.deferred_begin is not None and (backend is None or not backend.expects):
            # No backend has the transaction yet (its BEGIN is held back, a backend at most
            # parked): it fails here, as PostgreSQL's would. Only its end is taken now (see
            # _aborted), and COMMIT answers ROLLBACK.
            self.tx.status = m.TX_FAILED
            backend = None
        if self.audit is not None:  # refused on the backend: its answer to that is not the client's
            self.audit.refused(exc, backend is not None, simple)
        if backend is not None:
            if self.split is not None:
                self.split.part(backend)  # in the client's order with the other databases' answers
            # Fail it on the backend too, so that its transaction fails as PostgreSQL's would.
            if simple:
                self._inject(backend, Expect(Answer.QUERY, Fate.REFUSE, reply=error), _REFUSED_SQL)
            else:
                backend.push(Expect(Answer.BIND, Fate.REFUSE, reply=error))
                backend.send(m.bind("", _MISSING_STATEMENT, b"\0\0\0\0\0\0"))
                self._skip_to_sync()
                self.batch_open = True
            return
        if simple:
            self._write(error + m.ready_for_query(self.tx.status))
        else:
            self._write(error)
            self._skip_to_sync()

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
        self.port.close()

    def _write(self, data: bytes) -> None:
        """Write to the client; while its messages are being handled, at the end of them,
        all in one send (a pipeline's ParseComplete, BindComplete, ... were one send each)."""
        if self.corked:
            self.out.append(data)
        else:
            self.port.write(data)

    def _flush(self) -> None:
        out = self.out
        if not out:
            return
        self.out = []
        self.port.write(out[0] if len(out) == 1 else b"".join(out))

    def _close_backend(self) -> None:
        """The client is gone: give its backend back clean, or drop it."""
        if self.split is not None:  # its answers have nobody to go to
            self.split.abandon()
            self.split = None
        participants, self.tx.participants = self.tx.participants, {}
        self.link.abandon(list(participants.values()))  # a transaction on several databases: rolled back
        self.link.close(bool(self.settings.pins))

    def _cancel(self, request: m.CancelRequest) -> None:
        self.fleet.cancel(request.pid, request.secret)
        self.state = State.CLOSED
        self.port.close()

    def cancel_running(self) -> int:
        """Send a cancel to every backend running this client's statement; how many."""
        servers = [self.link.server] if self.link.server is not None else []
        if self.gather is not None:  # a federated SELECT: every shard still answering
            servers += [shard.server for shard in self.gather.shards.values() if not shard.done]
        if self.split is not None:  # a pipeline on several databases: each part still answering
            servers += [server for server in self.split.servers if server not in servers]
        busy = [server for server in servers if server.busy]
        for server in busy:
            self.port.spawn(send_cancel(server, self.fleet.connect))
        return len(busy)

    def _running(self) -> bool:
        backend = self.link.server
        return self.wait_task is not None or self.queued is not None or (backend is not None
                                                                         and bool(backend.expects))

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
            try:
                if self.tenant is not None:
                    _may_reach(key, self.tenant)
                elif key.tenant is not None:
                    raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} is now bound to tenant {key.tenant}",
                                      hint="reconnect: the key's new binding holds for new connections")
            except ClientError as exc:
                self.close(exc)
                return
            self.fixed = self.fleet.router.fixed_database(self.ctx)
            self.unparsed = self.fixed if not key.read_only and key.policy is None else None
            role = key.backend_role if self.tenant is None else None
            self.role, self.pools = role, self.fleet.pools_for(role)
            self._bind_tenant(key)
            backend = self.link.server
            if backend is not None and backend.pool.role != self.role and not self._engaged(backend):
                self.link.release()  # parked, of the old role: the next transaction takes one of the new

    def _bind_tenant(self, key: ApiKey) -> None:
        binding = key.binding if key.role is Role.DATABASE else None
        self.settings.drop_tenant()
        self.tenant_query = m.query(set_statement({TENANT: str(binding)}, {})) if binding is not None else None

    def close(self, error: ProxyError) -> None:
        """Server shutdown or the console's KILL: tell the client why, then close."""
        self._fatal(error)

    def busy(self, statement_only: bool = False) -> bool:
        """Whether closing the client now would cut a statement (or, unless
        ``statement_only``, a transaction) short."""
        if self.wait_task is not None or self.queued is not None or self.state is State.SETTING_UP:
            return True
        if (self.tx.participants and not statement_only) or self.split is not None:
            return True
        backend = self.link.server
        if backend is None:
            return False
        return bool(backend.expects) or (not statement_only and backend.tx_status != m.TX_IDLE)


def _may_reach(key: ApiKey, tenant: str) -> None:
    """42501 unless ``key`` may use the directory's tenant ``tenant``: a server or admin key
    whose databases allow it (by name or pattern), or a database key bound to it."""
    if key.role is Role.DATABASE:
        if key.tenant == tenant:
            return
        raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} (database) may not use database {tenant}",
                          hint=f"it is bound to {'tenant ' + key.tenant if key.tenant else 'a shard-key value'}; "
                               "use a key bound to that tenant")
    if key.role not in (Role.SERVER, Role.ADMIN):
        raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} ({key.role.value}) may not connect to a "
                          "database by name", hint="use a server key whose databases allow it, or a database "
                          "key bound to the tenant (tenant:)")
    if not key.may_use(tenant):
        raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key.id} may not use database {tenant}",
                          hint=f"the key's databases: {', '.join(sorted(key.databases or ()))}")


def _implicit_control(sql: str) -> ClientError:
    """A simple query, or BEGIN/COMMIT/..., in a pipeline outside a transaction block that
    pgfleet runs on several databases (``_implicit_across``): refused rather than committing
    at another point than PostgreSQL would."""
    return ClientError(FEATURE_NOT_SUPPORTED, f"{first_word(sql) or 'this statement'} cannot run inside a "
                       "pipeline (messages up to Sync) that pgfleet runs on several databases outside a "
                       "transaction block: pgfleet commits that pipeline at its Sync",
                       hint="send a Sync before it, or open the transaction with BEGIN before the pipeline")


async def _finish_copy(copy: CopySplit) -> None:
    await copy.finish("the client disconnected")


def _no_fleet_settings(effect: Analysis | None) -> None:
    """SET pgfleet.* is answered by pgfleet in the simple protocol only."""
    if effect is not None and any(stmt.fleet_settings for stmt in effect.statements):
        raise ClientError(FEATURE_NOT_SUPPORTED, "SET pgfleet.* is supported in the simple query protocol only",
                          hint="send it as a plain query (psql, or execute() without parameters), "
                               "or use a /* pgfleet: ... */ comment")


# Messages forwarded unchanged to the attached backend, with what answers them.
_VERBATIM: dict[int, Expect | None] = {
    m.EXECUTE: FORWARD_EXECUTE,
    m.SYNC: FORWARD_SYNC,
    m.FLUSH: None,
    m.COPY_DATA: None,
    m.COPY_DONE: None,
    m.COPY_FAIL: None,
}
_NOT_VERBATIM = Expect(Answer.QUERY, Fate.DROP, reply=b"not verbatim")  # a sentinel
_BEGIN_QUERY = m.query("BEGIN")
# A waiting client's bytes kept before pgfleet stops reading it (a client that waits for a
# backend usually sends nothing more).
_INBOX_WHILE_WAITING = 1 << 20
_KNOWN = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.FLUSH,
                    m.TERMINATE, m.PASSWORD, m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL, m.FUNCTION_CALL))
_LOGGING_IN = frozenset((State.STARTUP, State.SASL_INITIAL, State.SASL_RESPONSE, State.PASSWORD, State.SETTING_UP))
# Hot-path names as module globals: one attribute lookup fewer per message.
_U32 = struct.Struct("!I").unpack_from
_READY = State.READY
_SYNC = m.SYNC
_QUERY = m.QUERY
_DESCRIBE = m.DESCRIBE
_TARGET_PORTAL = m.TARGET_PORTAL
_PARSE = m.PARSE
_BIND = m.BIND
_EXECUTE = m.EXECUTE

Handler = Callable[[Session, bytes], bool]

# (state, message type) -> handler. A handler takes the whole message and returns False when
# the session must wait (the message stays in the inbox and is handled again). A pair missing
# here is a protocol violation. READY's handlers run through Session._statement, which turns a
# refusal into one ErrorResponse; the others' errors end the connection.
TABLE: dict[tuple[State, int], Handler] = {
    (State.SASL_INITIAL, m.PASSWORD): Session._sasl_initial,
    (State.SASL_RESPONSE, m.PASSWORD): Session._sasl_response,
    (State.PASSWORD, m.PASSWORD): Session._password,
    (State.READY, m.QUERY): Session._query,
    (State.READY, m.PARSE): Session._parse,
    (State.READY, m.BIND): Session._bind,
    (State.READY, m.DESCRIBE): Session._describe,
    (State.READY, m.EXECUTE): Session._execute,
    (State.READY, m.CLOSE): Session._close,
    (State.READY, m.SYNC): Session._sync,
    (State.READY, m.FLUSH): Session._nothing_in_flight,
    (State.READY, m.COPY_DATA): Session._nothing_in_flight,
    (State.READY, m.COPY_DONE): Session._nothing_in_flight,
    (State.READY, m.COPY_FAIL): Session._nothing_in_flight,
    (State.READY, m.FUNCTION_CALL): Session._function_call,
    (State.READY, m.TERMINATE): Session._terminate,
    **{(State.SKIPPING, kind): Session._skip for kind in _KNOWN},
    (State.SKIPPING, m.SYNC): Session._sync_after_error,
    (State.SKIPPING, m.TERMINATE): Session._terminate,
    **{(State.COPY_IN, kind): Session._copy_end for kind in _KNOWN},
    (State.COPY_IN, m.COPY_DATA): Session._copy_data,
    (State.COPY_IN, m.FLUSH): Session._copy_ignored,
    (State.COPY_IN, m.SYNC): Session._copy_ignored,
    **{(State.CONSOLE, kind): Session._console_message for kind in _KNOWN},
    (State.CONSOLE, m.TERMINATE): Session._terminate,
}
# TABLE's READY row, by message type alone: one dictionary lookup per message that needs a decision.
_READY_HANDLERS: dict[int, Handler] = {kind: handler for (state, kind), handler in TABLE.items() if state is State.READY}
