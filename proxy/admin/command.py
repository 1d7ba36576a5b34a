"""What an admin console command is, and what it answers: ``Command`` (its words, its
function, how a process group answers it), ``Admin`` (what the functions see), and ``Table``
or a tag, with the wire messages they become (values as text; a column is int8, float8, bool
or text by the Python type of its values).

console.py holds the commands and speaks to the client; jobcommands.py the replication jobs'.
"""

from __future__ import annotations

import datetime as dt
import enum
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import WARNING
from ..wire import messages as m
from .group import Group

if TYPE_CHECKING:
    from ..fleet import Fleet
    from ..replication.jobs import Replicator


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_INT8, _FLOAT8, _BOOL, _TEXT = 20, 701, 16, 25


@dataclass
class Table:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    tag: str = "SHOW"
    notices: tuple[str, ...] = ()  # warnings sent before the rows (a worker that did not answer)

    def messages(self, describe: bool = True, formats: tuple[int, ...] = ()) -> bytes:
        types = self.types()
        out = [_notices(self.notices)]
        if describe:
            out.append(row_description(self.columns, types, formats))
        out += [data_row(row, types, formats) for row in self.rows]
        out.append(m.command_complete(self.tag))
        return b"".join(out)

    def types(self) -> list[int]:
        return [_type_of(row[i] for row in self.rows) for i in range(len(self.columns))]


class Tag(str):
    """A command tag (RELOAD, PAUSE, ...) with warnings sent before it."""

    notices: tuple[str, ...] = ()


Result = Table | str  # a table, or a command tag (RELOAD, PAUSE, ...)


@dataclass
class Admin:
    """What the console sees and may do: the fleet, and the server's own operations."""

    fleet: Fleet
    # RELOAD (every worker of a group): warnings for the operator, or raises ClientError
    reload: Callable[[], Awaitable[list[str]]] | None = None
    started: float = field(default_factory=time.time)
    group: Group | None = None  # pgfleet run --workers N: the other workers (admin/group.py)
    replicator: Replicator | None = None  # the replication jobs (replication/jobs.py)
    configured: Callable[[], Config] | None = None  # the config as the file says (a worker runs a share)

    @property
    def worker(self) -> int:
        return self.group.worker if self.group is not None else 0


class Spread(enum.Enum):
    """How a command answers for a process group (``--workers N``)."""

    LOCAL = "local"  # this worker's answer is the group's: the config, the routing map, health
    SUM = "sum"      # every worker's rows, its ``sums`` columns added up over rows alike otherwise
    EACH = "each"    # every worker's rows, one after the other (they carry a worker column)
    EVERY = "every"  # done by every worker (RELOAD, PAUSE, RESUME)
    OWNER = "owner"  # done by the worker that owns the client named (KILL)


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    argument: str | None  # its name in SHOW HELP, or None: takes none
    run: Callable[[Admin, str], Result | Awaitable[Result]]
    help: str
    spread: Spread = Spread.LOCAL
    sums: tuple[str, ...] = ()  # Spread.SUM: the columns added up ...
    key: tuple[str, ...] = ()   # ... over the rows with the same values here (any other column:
    #                             true if true in any worker, else the first worker's value)
    acts: bool = False  # it does something (a tag, no rows): Describe answers NoData, never runs it


def _messages(result: Result, describe: bool = True, formats: tuple[int, ...] = ()) -> bytes:
    if isinstance(result, str):
        return _notices(getattr(result, "notices", ())) + m.command_complete(result)
    return result.messages(describe, formats)


def _notices(notices: Iterable[str]) -> bytes:
    return b"".join(m.notice_response(WARNING, text, severity="WARNING") for text in notices)


def _description(result: Result, formats: tuple[int, ...] = ()) -> bytes:
    if isinstance(result, str):
        return m.NO_DATA_MSG
    return row_description(result.columns, result.types(), formats)


def _format(formats: tuple[int, ...], i: int) -> int:
    """A column's result format from a Bind's codes: none = text, one = all, else each."""
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0


def row_description(columns: tuple[str, ...], types: list[int], formats: tuple[int, ...] = ()) -> bytes:
    parts = [_I16.pack(len(columns))]
    for i, name in enumerate(columns):
        oid = types[i]
        size = 8 if oid in (_INT8, _FLOAT8) else 1 if oid == _BOOL else -1
        parts.append(name.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, oid, size, -1, _format(formats, i)))
    return m.message(m.ROW_DESCRIPTION, b"".join(parts))


def data_row(row: tuple[Any, ...], types: list[int], formats: tuple[int, ...] = ()) -> bytes:
    parts = [_I16.pack(len(row))]
    for i, value in enumerate(row):
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
            continue
        if _format(formats, i) == 1:
            oid = types[i]
            data = struct.pack("!q", value) if oid == _INT8 else struct.pack("!d", value) if oid == _FLOAT8 \
                else (b"\1" if value else b"\0") if oid == _BOOL else str(value).encode()
        else:
            data = (("t" if value else "f") if isinstance(value, bool) else str(value)).encode()
        parts.append(_I32.pack(len(data)) + data)
    return m.message(m.DATA_ROW, b"".join(parts))


def _type_of(values: Iterable[Any]) -> int:
    found = {type(v) for v in values if v is not None}
    if found == {bool}:
        return _BOOL
    if found == {int}:
        return _INT8
    if found and found <= {int, float}:
        return _FLOAT8
    return _TEXT


def _time(wall: float | None) -> str | None:
    if wall is None:
        return None
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="seconds")


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None
