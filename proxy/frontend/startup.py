"""Startup parameters -> the client's session settings. Pure.

Owns reading ``options=-c name=value`` and the other startup parameters into the settings
pgfleet replays on whichever backend serves the client. Never talks to a backend.
"""

from __future__ import annotations

from ..errors import ProtocolViolation

# Startup parameters that are not settings.
NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})


def session_settings(params: dict[str, str]) -> dict[str, str]:
    settings = {name: value for name, value in params.items() if name not in NOT_SETTINGS}
    settings.update(parse_options(params.get("options", "")))
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
        elif word.startswith("-c"):
            item = word[2:]
            i += 1
        elif word.startswith("--"):
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
    """The SQL that turns a backend's ``applied`` settings into ``settings``, or None."""
    parts = [f"SET {_ident(name)} TO {_literal(value)}"
             for name, value in settings.items() if applied.get(name) != value]
    parts += [f"RESET {_ident(name)}" for name in applied if name not in settings]
    return "; ".join(parts) if parts else None


def _ident(name: str) -> str:
    if name.replace("_", "").replace(".", "").isalnum() and not name[0].isdigit():
        return name
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
