"""A client's transaction as pgfleet sees it: its status, a BEGIN held back, its participants.

Owns ``Transaction``. On the fleet, BEGIN waits for the transaction's first routed statement,
which picks the database: pgfleet answers BEGIN at once and sends it (as it came) to that
statement's backend (``deferred_begin``). A COMMIT or ROLLBACK before any such statement ends
it without a backend. With two-phase commit a transaction may go on to other databases; the
backends it left wait in ``participants``, idle in the transaction, until a statement comes
back to them or it ends. The status is the ReadyForQuery byte the client sees; it follows
the backend's, except while no backend has the transaction yet.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend.connection import ServerConnection
from ..errors import FEATURE_NOT_SUPPORTED, IN_FAILED_SQL_TRANSACTION, ClientError
from ..router.route import Analysis, Kind, TransactionStatement
from ..wire import messages as m

TRANSACTION_WORDS = frozenset(("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"))
# The words that end a transaction, and the command tag PostgreSQL answers each with.
TRANSACTION_ENDS = {"COMMIT": "COMMIT", "END": "COMMIT", "ROLLBACK": "ROLLBACK", "ABORT": "ROLLBACK"}
STARTS = frozenset(("BEGIN", "START"))


class ControlPortal(NamedTuple):
    """A bound BEGIN/COMMIT/... that pgfleet answers itself at its Execute."""

    portal: str  # the client's portal name
    text: str    # the statement
    word: str    # its first word (BEGIN, COMMIT, ...)


class Transaction:
    """The client's transaction. Invariant: ``deferred_begin`` is set only while ``status``
    is in a transaction and no backend has received the BEGIN yet."""

    __slots__ = ("begin", "control_portal", "deferred_begin", "implicit", "implicit_first", "participants", "sets",
                 "status")

    def __init__(self) -> None:
        self.status = m.TX_IDLE  # the ReadyForQuery status the client last got, or will get
        self.deferred_begin: bytes | None = None  # the held-back BEGIN (a Query message)
        self.begin: bytes | None = None  # the BEGIN the transaction opened with (for participants)
        self.sets = False  # it changed settings: then it stays on one database
        # two_phase_commit: the other databases' backends, each idle in the transaction.
        self.participants: dict[str, ServerConnection] = {}
        self.control_portal: ControlPortal | None = None
        # A pipeline outside a transaction block that reached a second database: pgfleet made
        # its implicit transaction one on several, committed in two phases at the client's Sync.
        self.implicit = False
        self.implicit_first: ServerConnection | None = None  # the database that got pgfleet's BEGIN

    @property
    def idle(self) -> bool:
        return self.status == m.TX_IDLE

    def hold_begin(self, begin: bytes) -> None:
        """BEGIN answered by pgfleet; it goes to the backend of the first statement."""
        self.deferred_begin = begin
        self.status = m.TX_IN_TRANSACTION

    def end_unsent(self, word: str) -> str:
        """COMMIT/ROLLBACK of a transaction no backend has seen: the tag PostgreSQL answers
        (a failed transaction's COMMIT says ROLLBACK)."""
        self.deferred_begin = None
        tag = "ROLLBACK" if self.status == m.TX_FAILED else TRANSACTION_ENDS[word]
        self.status = m.TX_IDLE
        return tag

    def sent_begin(self) -> bytes:
        """The held-back BEGIN, now on its way to a backend."""
        begin = self.deferred_begin
        assert begin is not None
        self.begin = begin
        self.deferred_begin = None
        return begin

    def databases(self, attached: ServerConnection | None) -> str:
        """The databases of a transaction on several, for messages."""
        return ", ".join(sorted([*self.participants, *([attached.database] if attached else [])]))

    def ended(self) -> None:
        """A transaction on several databases ended everywhere."""
        self.participants = {}
        self.sets = False
        self.implicit = False
        self.implicit_first = None
        self.status = m.TX_IDLE


def first_word(sql: str) -> str:
    """A statement's first word, upper case ("" for none)."""
    words = sql.split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


def control_word(sql: str, analysis: Analysis) -> str | None:
    """BEGIN, START, COMMIT, END, ROLLBACK or ABORT when ``sql`` is only that (with its
    options); None for anything else (ROLLBACK TO, COMMIT PREPARED, SAVEPOINT...)."""
    if len(analysis.statements) != 1 or analysis.statements[0].kind is not Kind.TRANSACTION:
        return None
    words = sql.replace(";", " ").upper().split()
    if not words or words[0] not in TRANSACTION_WORDS or (len(words) > 1 and words[1] in ("TO", "PREPARED")):
        return None
    return words[0]


# What cannot run in a transaction on several databases, as PostgreSQL names it.
_NOT_ACROSS = {
    TransactionStatement.SAVEPOINT: "SAVEPOINT",
    TransactionStatement.RELEASE: "RELEASE",
    TransactionStatement.ROLLBACK_TO: "ROLLBACK TO SAVEPOINT",
    TransactionStatement.PREPARE: "PREPARE TRANSACTION",
    TransactionStatement.COMMIT_PREPARED: "COMMIT PREPARED",
    TransactionStatement.ROLLBACK_PREPARED: "ROLLBACK PREPARED",
}


def across(sql: str, analysis: Analysis, names: str) -> str | None:
    """In a transaction on several databases (``names``): "COMMIT" or "ROLLBACK" for a
    statement that ends it (pgfleet ends it everywhere), None for others. What cannot span
    databases is refused: savepoints, PREPARE TRANSACTION, SET, COMMIT AND CHAIN."""
    for stmt in analysis.statements:
        what = _NOT_ACROSS.get(stmt.transaction) if stmt.transaction is not None else None
        if what is not None:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"{what} is not supported in a transaction on several "
                              f"databases ({names})", hint="keep savepoints to transactions on one database; "
                              "pgfleet commits this one in two phases itself")
        if stmt.command == "SET" or stmt.settings or stmt.opaque_settings:
            raise ClientError(FEATURE_NOT_SUPPORTED, f"a transaction on several databases ({names}) cannot "
                              "change settings: the SET would hold on one of them only",
                              hint="SET before BEGIN, or SET pgfleet-wide with the key's settings")
    ends = [stmt.transaction for stmt in analysis.statements
            if stmt.transaction in (TransactionStatement.COMMIT, TransactionStatement.ROLLBACK)]
    if not ends:
        return None
    if len(analysis.statements) != 1 or "CHAIN" in sql.upper():
        raise ClientError(FEATURE_NOT_SUPPORTED, f"a transaction on several databases ({names}) must end "
                          "with a COMMIT or ROLLBACK of its own (no other statements, no AND CHAIN)",
                          hint="send COMMIT (or ROLLBACK) alone")
    return "COMMIT" if ends[0] is TransactionStatement.COMMIT else "ROLLBACK"


def in_failed_transaction() -> ClientError:
    return ClientError(IN_FAILED_SQL_TRANSACTION, "current transaction is aborted, commands ignored until "
                       "end of transaction block", hint="ROLLBACK (a statement of this transaction failed)")
