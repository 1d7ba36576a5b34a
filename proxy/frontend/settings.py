"""A client's session settings: what it SET, what pins it to its backend, its routing hints.

Owns ``SessionSettings`` — the settings pgfleet replays on whichever backend serves the
client (from the startup packet, then from the SETs of transactions that ended well), the
SETs of the running transaction, the session state that pins the client to its backend
(LISTEN, temp tables, ...), and the client's ``SET pgfleet.*`` hints — plus reading
``options=-c name=value`` and the SQL that moves a backend to a client's settings. It never
sends anything itself: the session sends what ``replay`` returns.
"""

from __future__ import annotations

from ..backend.connection import UNKNOWN_SETTINGS
from ..errors import (
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    INVALID_PARAMETER_VALUE,
    UNDEFINED_OBJECT,
    ClientError,
    ProtocolViolation,
)
from ..router.parse import hints_from
from ..router.route import HINT_NAMES, Analysis, Hints, SettingChange

# The setting row-level security policies read (``pgfleet rls``): a database key's bound
# shard-key value, set by pgfleet only.
TENANT = "pgfleet.tenant"

# Startup parameters that are not settings.
NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})


# The settings of a backend that ran something pgfleet could not follow: the next client it
# serves gets RESET ALL before its own settings (backend/connection.py).
DIRTY = UNKNOWN_SETTINGS


def session_settings(params: dict[str, str]) -> dict[str, str]:
    """Startup parameters and ``-c`` options as settings, by lower-case name (GUC names are)."""
    settings = {name.lower(): value for name, value in params.items() if name not in NOT_SETTINGS}
    settings.update((name.lower(), value) for name, value in parse_options(params.get("options", "")).items())
    return settings


def parse_options(options: str) -> dict[str, str]:
    """``-c name=value`` and ``--name=value`` items, with backslash-escaped spaces."""
    words = _split(options)
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            if i + 1 >= len(words):
                raise ProtocolViolation('invalid startup option "-c": expected -c name=value')
            item = words[i + 1]
            i += 2
        elif word.startswith(("-c", "--")):
            item = word[2:]
            i += 1
        else:
            raise ProtocolViolation(f'invalid startup option "{word}": pgfleet accepts -c name=value only')
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ProtocolViolation(f'invalid startup option "{word if word != "-c" else "-c " + item}": '
                                    "expected -c name=value")
        settings[name.replace("-", "_")] = value
    return settings


def _split(options: str) -> list[str]:
    words: list[str] = []
    current: list[str] = []
    escape = False
    for ch in options:
        if escape:
            current.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def set_statement(settings: dict[str, str], applied: dict[str, str]) -> str | None:
    """The SQL that turns a backend's ``applied`` settings into ``settings``, or None.

    Values are strings as a startup ``-c`` option or ``set_config()`` takes them, and go
    through ``set_config()`` so that the backend stores and shows them exactly as it would
    have from the startup packet (a list such as search_path stays a list). The calls sit in
    a WHERE that is always false, so the backend answers with no data rows.
    """
    parts = []
    if applied is DIRTY:
        parts.append("RESET ALL")
        applied = {}
    calls = [f"pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"
             for name, value in settings.items() if applied.get(name) != value]
    if calls:
        parts.append(f"SELECT WHERE pg_catalog.num_nulls({', '.join(calls)}) < 0")
    parts += [f"RESET {_ident(name)}" for name in applied if name not in settings]
    return "; ".join(parts) if parts else None


def _ident(name: str) -> str:
    if name.replace("_", "").replace(".", "").isalnum() and not name[0].isdigit():
        return name
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """A string literal that reads the same whatever the backend's standard_conforming_strings
    (a backslash in a plain literal would not): E'...' with its backslashes doubled."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


# Equal settings, one dict: clients with the same settings share their ``values`` object, so a
# backend handed from one to another needs neither a replay nor a comparison (``is``).
_SHARED: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
_SHARED_MAX = 4096


def shared(values: dict[str, str]) -> dict[str, str]:
    """The one dict of these settings (never changed in place: see ``SessionSettings``)."""
    key = frozenset(values.items())
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()  # many distinct settings: sharing starts over (only a cost, never wrong)
        _SHARED[key] = found = values
    return found


class SessionSettings:
    """The settings one client has, wherever its statements run.

    Invariants: ``values`` is never changed in place (a new dict each time), so a backend
    whose ``settings`` *is* ``values`` needs no replay — the common, cheap check. ``pending``
    is None outside a transaction that SETs; its changes become ``values`` only when the
    transaction ends without error (``settle``).
    """

    __slots__ = (
        "errors_at",
        "hint_values",
        "hints",
        "opaque",
        "pending",
        "pins",
        "startup",
        "unpinning",
        "values",
    )

    def __init__(self, values: dict[str, str]) -> None:
        self.values = shared(values)
        self.startup = self.values  # what RESET returns to
        # Session-level SETs sent in the current transaction, kept once it ends without error;
        # whether one of them cannot be replayed; the backend's error count when the first went.
        self.pending: list[SettingChange] | None = None
        self.opaque = False
        self.errors_at = 0
        # Session state on the attached backend that no other backend has (LISTEN, a temp
        # table, ...): while any, the client keeps that backend, as in session mode.
        self.pins: set[str] = set()
        self.unpinning: tuple[tuple[str, ...], int] | None = None  # dropped if no error (settle)
        # SET pgfleet.shard_key / pgfleet.database ...: the session's hints, pgfleet's own.
        self.hint_values: dict[str, str] = {}
        self.hints: Hints | None = None

    def drop_tenant(self) -> None:
        """``pgfleet.tenant`` is never the client's to set, from the startup packet either: the
        session sets it apart on every transaction of a database key (``Session._send_tenant``)."""
        if TENANT in self.values or TENANT in self.startup:
            self.values = shared({name: value for name, value in self.values.items() if name != TENANT})
            self.startup = {name: value for name, value in self.startup.items() if name != TENANT}

    def logged_in(self, read_only: bool) -> None:
        """The startup values are final: a read-only key's sessions default to read-only."""
        if read_only and "default_transaction_read_only" not in self.values:
            self.values = shared({**self.values, "default_transaction_read_only": "on"})
        self.startup = self.values

    def follow(self, effect: Analysis, errors: int) -> tuple[str, ...]:
        """A statement that changes settings goes to a backend (``errors``: its error count so
        far): remember what it sets; the session state that now pins the client, if new."""
        pinned: tuple[str, ...] = ()
        for stmt in effect.statements:
            if stmt.pins:
                if not self.pins:
                    pinned = stmt.pins
                self.pins.update(stmt.pins)
                self.unpinning = None
            if stmt.unpins and self.pins:
                self.unpinning = (stmt.unpins, errors)
            if stmt.rollback:  # the backend undoes the transaction's SETs itself
                self.pending = None
                self.opaque = False
                continue
            if stmt.settings or stmt.opaque_settings:
                if self.pending is None:
                    self.pending = []
                    self.errors_at = errors
                self.pending.extend(c for c in stmt.settings
                                    if c.name is None or not c.name.startswith("pgfleet."))
                self.opaque = self.opaque or stmt.opaque_settings
        return pinned

    def unpinned(self, errors: int) -> None:
        """The backend is idle outside a transaction: a DISCARD ALL, UNLISTEN * ... that ran
        without error (``errors`` unchanged since) released its pins."""
        if self.unpinning is None:
            return
        dropped, before = self.unpinning
        self.unpinning = None
        if errors == before:
            if "*" in dropped:
                self.pins.clear()
            else:
                self.pins.difference_update(dropped)

    def settle(self, applied: dict[str, str], errors: int, idle: bool) -> tuple[dict[str, str], bool] | None:
        """The backend (its ``applied`` settings, its error count) is idle: the SETs of a
        transaction that ended without error now hold. None while still in the transaction;
        else what the backend's settings are now, and whether they must be replayed on it."""
        pending = self.pending
        assert pending is not None
        replay = False
        if errors != self.errors_at:
            applied = DIRTY  # which of them held is unknown: the next client starts clean
        elif not idle:
            return None  # still in the transaction: they hold only if it commits
        else:
            values = dict(self.values)
            reset = False
            for change in pending:
                if change.name is None:
                    values = dict(self.startup)
                    reset = True
                elif change.value is None:
                    reset = True
                    if change.name in self.startup:
                        values[change.name] = self.startup[change.name]
                    else:
                        values.pop(change.name, None)
                else:
                    values[change.name] = change.value
            self.values = values = shared(values)
            if self.opaque:
                applied = DIRTY  # the client keeps it while it keeps this backend
            elif reset:
                applied = DIRTY  # the backend's RESET went to pgfleet's startup values, not the client's
                replay = True
            else:
                applied = values
        self.drop_pending()
        return applied, replay

    def drop_pending(self) -> None:
        self.pending = None
        self.opaque = False

    def replay(self, applied: dict[str, str]) -> str | None:
        """The statement that moves a backend from ``applied`` to this client's settings."""
        return set_statement(self.values, applied) if applied != self.values else None

    def set_hints(self, analysis: Analysis, may_hint: bool, key_id: str, role: str) -> str | None:
        """SET / RESET pgfleet.*: the session's hints, answered by pgfleet and never sent on.

        The command tag when the query was exactly that; None for other queries. RESET ALL
        clears the hints too, and goes on to the backend.
        """
        changes = [c for stmt in analysis.statements for c in stmt.settings]
        if any(c.name is None for c in changes):
            self.hint_values = {}
            self.hints = None
        fleet = [c for stmt in analysis.statements for c in stmt.fleet_settings]
        if not fleet:
            return None
        if len(analysis.statements) != 1 or len(changes) != len(fleet):
            raise ClientError(FEATURE_NOT_SUPPORTED, "SET pgfleet.* must be a query of its own",
                              hint="send it separately from other statements")
        if not may_hint:
            raise ClientError(INSUFFICIENT_PRIVILEGE, f"key {key_id} ({role}) may not set pgfleet "
                              "routing hints", hint="hints are for server and admin keys")
        values = dict(self.hint_values)
        for change in fleet:
            assert change.name is not None
            name = change.name.removeprefix("pgfleet.")
            if name not in HINT_NAMES:
                raise ClientError(UNDEFINED_OBJECT, f'unrecognized configuration parameter "{change.name}"',
                                  hint=f"pgfleet's settings: {', '.join('pgfleet.' + n for n in HINT_NAMES)}")
            if change.value is None or change.value == "":
                values.pop(name, None)
            else:
                values[name] = change.value
        try:
            hints = hints_from(values)
        except ValueError as exc:
            raise ClientError(INVALID_PARAMETER_VALUE, str(exc)) from None
        self.hint_values = values
        self.hints = hints or None
        command = analysis.statements[0].command
        if command != "SET":
            return command
        return "RESET" if all(c.value is None for c in fleet) else "SET"
