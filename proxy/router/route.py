"""The router's answer for one statement, as values.

A ``Route`` says where a statement runs (``Direct``, or ``Multi`` / ``All`` for several
databases), whether it writes, whether a read must be merged (``fanout``: its merge plan is
``Router.fanout_plan``, cached by text), and why — in words that appear in errors and logs.
These are plain frozen values (msgspec structs) shared by the router, the backend and the
frontend; nothing here knows about sockets or pglast.
"""

from __future__ import annotations

import enum

import msgspec
from msgspec.structs import force_setattr

from .keybind import InsertKeys, Placement


class Kind(enum.Enum):
    """What a statement does, as far as routing and key policy care."""

    READ = "read"                # SELECT, SHOW, EXPLAIN, VALUES, TABLE, COPY ... TO
    WRITE = "write"              # INSERT, UPDATE, DELETE, MERGE, COPY ... FROM, SELECT ... INTO
    DDL = "ddl"                  # CREATE, ALTER, DROP, TRUNCATE, GRANT, ...
    SESSION = "session"          # SET, RESET, DISCARD, LISTEN, PREPARE, DEALLOCATE, ...
    TRANSACTION = "transaction"  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, ...
    OTHER = "other"              # anything else (VACUUM, DO, CALL, ...): treated as a write


class TransactionStatement(enum.StrEnum):
    """A transaction statement's kind (PostgreSQL's TRANS_STMT_*, without the prefix)."""

    NONE = ""                     # not a transaction statement
    BEGIN = "BEGIN"
    START = "START"
    COMMIT = "COMMIT"             # COMMIT / END
    ROLLBACK = "ROLLBACK"         # ROLLBACK / ABORT
    SAVEPOINT = "SAVEPOINT"
    RELEASE = "RELEASE"
    ROLLBACK_TO = "ROLLBACK_TO"   # ROLLBACK TO SAVEPOINT
    PREPARE = "PREPARE"           # PREPARE TRANSACTION
    COMMIT_PREPARED = "COMMIT_PREPARED"
    ROLLBACK_PREPARED = "ROLLBACK_PREPARED"


class Relation(msgspec.Struct, frozen=True):
    name: str
    schema: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


# The settings that change how PostgreSQL reads SQL text: pgfleet's parser reads it as UTF-8
# with standard_conforming_strings on, so for a key with a policy they must stay so (else a
# string to pgfleet could be SQL to the backend, past the router and the policy).
PARSER_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding"})
# Client-only encodings in which a multibyte character may end with the byte of a backslash.
_BACKSLASH_TRAIL_ENCODINGS = frozenset({
    "SJIS", "SHIFTJIS", "MSKANJI", "WIN932", "WINDOWS932", "SHIFTJIS2004", "BIG5", "WIN950", "WINDOWS950",
    "GBK", "WIN936", "WINDOWS936", "CP936", "UHC", "WIN949", "WINDOWS949", "JOHAB", "GB18030",
})
_TRUE = frozenset({"on", "true", "yes", "1", "t", "y"})


def parser_setting_safe(name: str, value: str | None) -> bool:
    """Whether SET ``name`` (one of PARSER_SETTINGS) to ``value`` (None: computed at run time)
    keeps SQL text reading the same to pgfleet and to PostgreSQL."""
    if value is None:
        return False
    if name == "standard_conforming_strings":
        return value.strip().lower() in _TRUE
    return "".join(ch for ch in value.upper() if ch.isalnum()) not in _BACKSLASH_TRAIL_ENCODINGS


# Settings that are lists of identifiers, each quoted by PostgreSQL (GUC_LIST_QUOTE).
LIST_QUOTE = frozenset({"search_path", "temp_tablespaces", "local_preload_libraries",
                        "session_preload_libraries", "shared_preload_libraries",
                        "unix_socket_directories"})


class SettingChange(msgspec.Struct, frozen=True):
    """A session-level SET or RESET a statement makes.

    ``name`` None is RESET ALL (or DISCARD ALL); ``value`` None is RESET name / SET name TO
    DEFAULT. Values are strings as ``set_config()`` takes them.
    """

    name: str | None
    value: str | None


class Statement(msgspec.Struct, frozen=True):
    """One parsed statement: its kind, its command tag word and the relations it touches."""

    kind: Kind
    command: str                       # "SELECT", "INSERT", "SET", ... for messages
    relations: frozenset[Relation] = frozenset()
    read_only_violation: bool = False  # e.g. SET default_transaction_read_only / BEGIN READ WRITE
    settings: tuple[SettingChange, ...] = ()  # session-level SET/RESET/set_config() it makes
    opaque_settings: bool = False      # it changes settings in a way pgfleet cannot replay
    rollback: bool = False             # ROLLBACK / ABORT: the transaction's SETs are undone
    placement: Placement | None = None  # the sharded tables it reads or writes, and their keys
    insert: InsertKeys | None = None   # INSERT into a sharded table: each row's key
    moves_rows: bool = False           # UPDATE that assigns a shard key
    shape: str = ""                    # a SELECT's shape in words ("count(*) with GROUP BY"), for refusals
    target: str | None = None          # the table an INSERT/UPDATE/DELETE/MERGE writes, CREATE TABLE creates
    pins: tuple[str, ...] = ()         # session state it leaves on its backend (LISTEN, ...)
    unpins: tuple[str, ...] = ()       # session state it drops ("*": all, DISCARD ALL)
    closes_database: str | None = None  # DROP DATABASE x / ALTER DATABASE x RENAME: x needs no connection
    transaction: TransactionStatement = TransactionStatement.NONE  # a transaction statement's kind
    replica_safe: bool = False         # a plain SELECT calling only functions that never write
    # What it does, in the statement kinds of a key's policy (config.STATEMENT_KINDS), nested
    # statements included (EXPLAIN ANALYZE, PREPARE, COPY (query), a CTE's DELETE ...).
    acts: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()  # the functions it calls (lower case; pg_catalog's unqualified)

    @property
    def fleet_settings(self) -> tuple[SettingChange, ...]:
        """SET/RESET of pgfleet.* (hints for the session): pgfleet's own, never a backend's."""
        return tuple(c for c in self.settings if c.name is not None and c.name.startswith("pgfleet."))


HINT_NAMES = ("shard_key", "shard", "database", "databases")


class Hints(msgspec.Struct, frozen=True):
    """Where a server key asks a statement to go (a leading comment or SET pgfleet.*)."""

    shard_key: str | None = None
    shard: int | None = None
    database: str | None = None
    databases: tuple[str, ...] | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.shard_key, self.shard, self.database, self.databases))

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name) if name != 'databases' else ','.join(self.databases or ())}"
                 for name in HINT_NAMES if getattr(self, name) is not None]
        return " ".join(parts)


class Params(msgspec.Struct, frozen=True):
    """A Bind's parameter values and format codes, as the client sent them."""

    values: tuple[bytes | None, ...]
    formats: tuple[int, ...] = ()

    def format_of(self, index: int) -> int:
        if not self.formats:
            return 0
        if len(self.formats) == 1:
            return self.formats[0]
        return self.formats[index] if index < len(self.formats) else 0


def _binds_key(stmt: Statement) -> bool:
    """Whether a statement's shard key is a parameter."""
    if stmt.placement is not None and any(
            v.param is not None for o in stmt.placement.occurrences for v in (o.values or ())):
        return True
    return stmt.insert is not None and any(v is not None and v.param is not None for v in (stmt.insert.rows or ()))


class Analysis(msgspec.Struct, frozen=True):
    """Everything the router needs from the parser, cached by exact statement text."""

    statements: tuple[Statement, ...]
    syntax_error: str | None = None
    hints: Hints | None = None       # from a leading /* pgfleet: ... */ comment
    hint_error: str | None = None    # a pgfleet comment that could not be read
    primary: bool = False            # /* pgfleet: primary */: never a replica

    # Computed once from the statements (``__post_init__``): read on every statement of a
    # cached text, so not rebuilt from generators each time.
    replica_safe: bool = False     # a replica may answer it (outside a transaction): one plain
                                   # SELECT that writes nothing, locks nothing and calls only
                                   # functions known not to write
    needs_params: bool = False     # a shard key is bound to a parameter: the route is known at Bind
    touches_settings: bool = False  # pgfleet must follow this text to keep the client's settings
    touches_session: bool = False  # ... or state that pins a backend

    def __post_init__(self) -> None:
        statements = self.statements
        force_setattr(self, "replica_safe",
                      len(statements) == 1 and statements[0].replica_safe and not self.primary)
        force_setattr(self, "needs_params", any(_binds_key(stmt) for stmt in statements))
        force_setattr(self, "touches_settings",
                      any(stmt.settings or stmt.opaque_settings or stmt.rollback for stmt in statements))
        force_setattr(self, "touches_session", any(
            stmt.settings or stmt.opaque_settings or stmt.rollback or stmt.pins or stmt.unpins
            or stmt.closes_database or stmt.command == "SET" for stmt in statements))

    @property
    def writes(self) -> Statement | None:
        for stmt in self.statements:
            if stmt.kind in (Kind.WRITE, Kind.DDL, Kind.OTHER) or stmt.read_only_violation:
                return stmt
        return None


class Direct(msgspec.Struct, frozen=True):
    database: str


class Multi(msgspec.Struct, frozen=True):
    databases: tuple[str, ...]


class All(msgspec.Struct, frozen=True):
    """Every shard (a statement on a sharded or reference table without a bound key)."""

    databases: tuple[str, ...] = ()


Target = Direct | Multi | All


class Route(msgspec.Struct, frozen=True):
    target: Target
    write: bool
    reason: str
    # True when no table decided the database (COMMIT, SET, SELECT 1, catalogs): inside a
    # transaction such a statement runs where the transaction already is.
    anywhere: bool = False
    # A shard key is bound to a parameter and none was given: ``target`` is only where the
    # statement can be parsed and described (any shard); Bind decides where it runs.
    needs_params: bool = False
    fanout: bool = False  # a read of several databases whose rows must be merged into one result
    # INSERT ... VALUES into a sharded table: which shard each row goes to (row index order).
    row_shards: tuple[str, ...] | None = None
    # A write of reference tables only: every shard holds a copy, so the count is one shard's.
    replicated: bool = False
