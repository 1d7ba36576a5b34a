"""The router's answer for one statement, as values.

A ``Route`` says where a statement runs (``Direct`` today; ``Multi`` and ``All`` are the
seams for sharding and fan-out), whether it writes, and why — in words that appear in errors
and logs. These are plain frozen values shared by the router, the backend and the frontend;
nothing here knows about sockets or pglast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.Enum):
    """What a statement does, as far as routing and key policy care."""

    READ = "read"                # SELECT, SHOW, EXPLAIN, VALUES, TABLE, COPY ... TO
    WRITE = "write"              # INSERT, UPDATE, DELETE, MERGE, COPY ... FROM, SELECT ... INTO
    DDL = "ddl"                  # CREATE, ALTER, DROP, TRUNCATE, GRANT, ...
    SESSION = "session"          # SET, RESET, DISCARD, LISTEN, PREPARE, DEALLOCATE, ...
    TRANSACTION = "transaction"  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, ...
    OTHER = "other"              # anything else (VACUUM, DO, CALL, ...): treated as a write


@dataclass(frozen=True, slots=True)
class Relation:
    name: str
    schema: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


# Settings that are lists of identifiers, each quoted by PostgreSQL (GUC_LIST_QUOTE).
LIST_QUOTE = frozenset({"search_path", "temp_tablespaces", "local_preload_libraries",
                        "session_preload_libraries", "shared_preload_libraries",
                        "unix_socket_directories"})


@dataclass(frozen=True, slots=True)
class SettingChange:
    """A session-level SET or RESET a statement makes.

    ``name`` None is RESET ALL (or DISCARD ALL); ``value`` None is RESET name / SET name TO
    DEFAULT. Values are strings as ``set_config()`` takes them.
    """

    name: str | None
    value: str | None


@dataclass(frozen=True, slots=True)
class Statement:
    """One parsed statement: its kind, its command tag word and the relations it touches."""

    kind: Kind
    command: str                       # "SELECT", "INSERT", "SET", ... for messages
    relations: frozenset[Relation] = frozenset()
    read_only_violation: bool = False  # e.g. SET default_transaction_read_only / BEGIN READ WRITE
    settings: tuple[SettingChange, ...] = ()  # session-level SET/RESET/set_config() it makes
    opaque_settings: bool = False      # it changes settings in a way pgfleet cannot replay
    rollback: bool = False             # ROLLBACK / ABORT: the transaction's SETs are undone


@dataclass(frozen=True, slots=True)
class Analysis:
    """Everything the router needs from the parser, cached by exact statement text."""

    statements: tuple[Statement, ...]
    syntax_error: str | None = None

    @property
    def touches_settings(self) -> bool:
        """Whether pgfleet must follow this text to keep the client's settings."""
        return any(stmt.settings or stmt.opaque_settings or stmt.rollback for stmt in self.statements)

    @property
    def writes(self) -> Statement | None:
        for stmt in self.statements:
            if stmt.kind in (Kind.WRITE, Kind.DDL, Kind.OTHER) or stmt.read_only_violation:
                return stmt
        return None


@dataclass(frozen=True, slots=True)
class Direct:
    database: str


@dataclass(frozen=True, slots=True)
class Multi:
    databases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class All:
    pass


Target = Direct | Multi | All


@dataclass(frozen=True, slots=True)
class Route:
    target: Target
    write: bool
    reason: str
    merge: object | None = field(default=None)  # the federated-SELECT merge plan slot
    # True when no table decided the database (COMMIT, SET, SELECT 1, catalogs): inside a
    # transaction such a statement runs where the transaction already is.
    anywhere: bool = False
