"""Statements for several databases as the session keeps them: bound portals run at Execute,
and the checks a statement must pass before it runs on several databases. Pure values.
"""

from __future__ import annotations

import struct
from collections import deque

from ..errors import (
    DATATYPE_MISMATCH,
    FEATURE_NOT_SUPPORTED,
    INVALID_ROW_COUNT_IN_LIMIT_CLAUSE,
    INVALID_ROW_COUNT_IN_RESULT_OFFSET_CLAUSE,
    INVALID_TEXT_REPRESENTATION,
    PROTOCOL_VIOLATION,
    ClientError,
)
from ..router.fanout import FanoutPlan
from ..router.parse import split_insert_params
from ..router.route import All, Analysis, Direct, Multi, Route
from ..wire import messages as m


class Portal:
    """A bound statement for several databases, kept by pgfleet and run at its Execute:
    a write (one scatter) or, with a ``plan``, a federated SELECT (one gather)."""

    __slots__ = (
        "databases",
        "describe",
        "describe_messages",
        "formats",
        "joined",
        "messages",
        "name",
        "per_database",
        "plan",
        "replicated",
        "row_order",
        "rows",
        "text",
    )

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
        self.joined = False       # a write inside the client's transaction (two-phase commit)
        self.row_order: tuple[str, ...] | None = None  # an INSERT split by shard: each row's database
        self.per_database: dict[str, bytes] | None = None  # then each database's own Parse and Bind

    def next_rows(self, max_rows: int) -> bytes:
        """The next ``max_rows`` rows (all when 0), then PortalSuspended or CommandComplete."""
        rows = self.rows
        assert rows is not None
        count = len(rows) if max_rows <= 0 else min(max_rows, len(rows))
        out = [m.message(m.DATA_ROW, rows.popleft()) for _ in range(count)]
        # As PostgreSQL: a fetch that filled its limit suspends, even when nothing is left.
        out.append(m.PORTAL_SUSPENDED_MSG if 0 < max_rows == count else m.command_complete(f"SELECT {count}"))
        return b"".join(out)


def one_database(route: Route) -> str:
    """The database of a route that runs on one; several are refused until pgfleet can run them."""
    target = route.target
    if isinstance(target, Direct):
        return target.database
    what = "a read that needs merging from" if route.fanout else "a statement on"
    raise ClientError(FEATURE_NOT_SUPPORTED, f"{what} several databases ({', '.join(target.databases)}: {route.reason}) "
                      "is not supported by this version of pgfleet",
                      hint="bind the shard key (WHERE key = value), or add /* pgfleet: shard=N */")


def encoding_name(name: str) -> str:
    """An encoding name as PostgreSQL compares them ('utf-8', as asyncpg sends it, is UTF8)."""
    return "".join(ch for ch in name.upper() if ch.isalnum())


def limit_types(plan: FanoutPlan, param_types: bytes) -> None:
    """LIMIT $n / OFFSET $n declared as text: PostgreSQL's own error (at Parse, as it does).
    Other non-integer types (float8 2.7, numeric 2.5) are refused: PostgreSQL rounds them."""
    declared = struct.unpack_from(f"!{len(param_types) // 4}I", param_types, 2) if len(param_types) > 2 else ()
    for number, what in ((plan.limit_param, "LIMIT"), (plan.offset_param, "OFFSET")):
        oid = declared[number - 1] if number is not None and number <= len(declared) else 0
        if oid in (25, 1043):
            raise ClientError(DATATYPE_MISMATCH, f"argument of {what} must be type bigint, not type text")
        if oid not in (0, 20, 21, 23):
            raise ClientError(FEATURE_NOT_SUPPORTED, f"{what} ${number} of type OID {oid} across shards is not supported",
                              hint=f"send {what} as an integer")


def bound_limits(formats: tuple[int, ...], values: tuple[bytes | None, ...], plan: FanoutPlan, param_types: bytes
            ) -> tuple[int | None, ...]:
    """The Bind's LIMIT and OFFSET parameters as integers (None for NULL), as PostgreSQL reads them.

    Parameters declared as another type than an integer (float8 2.7, numeric 2.5) are refused:
    PostgreSQL would round them, in ways that depend on the type."""
    out: list[int | None] = [None] * len(values)
    limit_types(plan, param_types)
    for number, what, sqlstate in ((plan.limit_param, "LIMIT", INVALID_ROW_COUNT_IN_LIMIT_CLAUSE),
                                   (plan.offset_param, "OFFSET", INVALID_ROW_COUNT_IN_RESULT_OFFSET_CLAUSE)):
        if number is None:
            continue
        if number > len(values):
            raise ClientError(PROTOCOL_VIOLATION, f"bind message supplies {len(values)} parameters, but the statement "
                              f"needs ${number}")
        data = values[number - 1]
        if data is None:
            continue
        binary = (formats[0] if len(formats) == 1 else formats[number - 1] if formats else 0) == 1
        try:
            value = int.from_bytes(data, "big", signed=True) if binary and len(data) in (2, 4, 8) else int(data)
        except ValueError:
            raise ClientError(INVALID_TEXT_REPRESENTATION, f'invalid input syntax for type bigint: "{data.decode(errors="replace")}"') \
                from None
        if value < 0:
            raise ClientError(sqlstate, f"{what} must not be negative")
        out[number - 1] = value
    return tuple(out)


def no_copy(analysis: Analysis, target: Multi | All) -> None:
    """COPY on several databases is not split or merged yet: refused before anything runs
    (each database would wait for its own COPY data)."""
    if any(stmt.command == "COPY" for stmt in analysis.statements):
        raise ClientError(FEATURE_NOT_SUPPORTED, f"COPY of a table on several databases ({', '.join(target.databases)}) is not "
                          "supported yet", hint="COPY into or out of each shard's database by name, or use "
                          "INSERT ... VALUES (split by shard key) and SELECT (merged) through the fleet")


def first_database(route: Route) -> str:
    target = route.target
    return target.database if isinstance(target, Direct) else target.databases[0]


def split_bound(query: str, param_types: bytes, bind_rest: bytes, row_shards: tuple[str, ...]) -> dict[str, bytes]:
    """A multi-row INSERT bound in the extended protocol, split by shard: per shard the unnamed
    Parse of its rows (parameters renumbered, the client's declared types kept) and its Bind
    (those parameters' values and format codes, the client's result formats)."""
    formats, values = m.bind_parameters(bind_rest)
    _, results = m.bind_results(bind_rest)
    count = struct.unpack_from("!h", param_types, 0)[0] if len(param_types) >= 2 else 0
    oids = struct.unpack_from(f"!{count}I", param_types, 2) if count > 0 else ()
    out = {}
    for database, (text, numbers) in split_insert_params(query, row_shards).items():
        types = struct.pack("!h", len(numbers)) + b"".join(
            struct.pack("!I", oids[n - 1] if n - 1 < len(oids) else 0) for n in numbers)
        codes = [formats[n - 1] for n in numbers] if len(formats) > 1 else list(formats)
        body = [struct.pack(f"!h{len(codes)}h", len(codes), *codes), struct.pack("!h", len(numbers))]
        for n in numbers:
            value = values[n - 1] if n - 1 < len(values) else None
            body.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
        body.append(struct.pack(f"!h{len(results)}h", len(results), *results))
        out[database] = m.parse("", text, types) + m.message(m.BIND, b"\0\0" + b"".join(body))
    return out
