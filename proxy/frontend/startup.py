"""Startup parameters -> the client's session settings. Pure.

Owns reading ``options=-c name=value`` and the other startup parameters into the settings
pgfleet replays on whichever backend serves the client. Never talks to a backend.
"""

from __future__ import annotations

from ..errors import ProtocolViolation

# Startup parameters that are not settings.
NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})


# The settings of a backend that ran something pgfleet could not follow (SET ... FROM
# CURRENT, set_config() with computed arguments, an error in a pipeline after a SET): the
# next client it serves gets RESET ALL before its own settings.
DIRTY: dict[str, str] = {"": "unknown"}


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
        elif word.startswith("-c") or word.startswith("--"):
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
    return "'" + value.replace("'", "''") + "'"
