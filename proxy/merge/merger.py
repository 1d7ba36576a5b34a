"""The merger of a federated SELECT: the shards' answers in, one database's answer out. Pure.

It is fed each shard's RowDescription, DataRows and CommandComplete (``feed``) as they
arrive and hands back the bytes the client may have now (``take``), then the rest and the
CommandComplete once every shard is done (``finish``). No sockets: the driver in
``gather.py`` moves the bytes and applies back-pressure with ``buffered``. Shards answer in
text; values are read, compared and written by ``values.py``.
"""

from __future__ import annotations

import heapq
import operator
import struct
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from ..errors import (
    DATATYPE_MISMATCH,
    FEATURE_NOT_SUPPORTED,
    INVALID_TEXT_REPRESENTATION,
    PROTOCOL_VIOLATION,
)
from ..router.fanout import Cmp, Const, FanoutPlan, IsNull, Logic, Output, Ref, SortKey
from ..wire import messages as m
from .values import (
    FLOAT_TYPES,
    INT_TYPES,
    NUMERIC,
    TYPE_NAMES,
    Desc,
    MergeError,
    add_numeric,
    binary_writer,
    equality_reader,
    float_text,
    numeric_div,
    numeric_text,
    read_bytes,
    read_float,
    read_int,
    read_numeric,
    reader,
)

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


# -- DataRow bytes

fields = m.row_values  # a DataRow body's values (None for NULL), in C where built
keyed_rows = m.keyed_rows  # DataRows with their sort keys, in C where built
row_key = m.row_key


def _descending(read: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    return lambda raw: Desc(read(raw))


def data_row(values: list[bytes | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(value)))
            parts.append(value)
    return m.message(m.DATA_ROW, b"".join(parts))


def columns(description: bytes) -> list[tuple[bytes, bytes]]:
    """A RowDescription body as (name, the 18 bytes that follow it) per column."""
    count = _I16.unpack_from(description, 0)[0]
    pos = 2
    out = []
    for _ in range(count):
        end = description.index(b"\0", pos)
        out.append((description[pos:end], description[end + 1:end + 19]))
        pos = end + 19
    return out


def type_of(column: tuple[bytes, bytes]) -> int:
    return int(struct.unpack_from("!I", column[1], 6)[0])


def row_description(cols: list[tuple[bytes, bytes]]) -> bytes:
    return m.message(m.ROW_DESCRIPTION, _I16.pack(len(cols)) + b"".join(name + b"\0" + rest for name, rest in cols))


def _same(a: list[tuple[bytes, bytes]], b: list[tuple[bytes, bytes]]) -> bool:
    """Same names and types; table OIDs and column numbers differ between databases."""
    if len(a) != len(b):
        return False
    for (name_a, rest_a), (name_b, rest_b) in zip(a, b, strict=True):
        if name_a != name_b:
            return False
        oid = struct.unpack_from("!I", rest_a, 6)[0]
        if rest_a[6:] != rest_b[6:] and not (oid >= 16384 and rest_a[10:] == rest_b[10:]):
            return False
    return True


# -- the merger

class _Group:
    __slots__ = ("first", "states")

    def __init__(self, first: list[bytes | None], states: list[Any]) -> None:
        self.first = first     # the first row seen: group values and plain columns
        self.states = states


class Merger:
    """One federated SELECT's merge; ``legs`` shards answer the same shard query."""

    def __init__(self, plan: FanoutPlan, legs: int, *, float_digits: int = 1, text_order: bool = True,
                 formats: tuple[int, ...] = (), describe: bool = True) -> None:
        """``formats``: the client's result format codes, as in Bind (shards answer in text);
        ``describe``: send the RowDescription (a simple query) or not (an Execute)."""
        self.plan = plan
        self.formats = formats
        self.describe = describe
        self.writers: list[Callable[[bytes], bytes] | None] | None = None  # text -> binary, per column
        self.visible = 0
        self.plain = not plan.groups and not plan.hidden  # shard rows go to the client as they are
        self.passthrough = False  # plain, and nothing to decide per row: whole runs of rows go out
        self.ordered = bool(plan.order) and not plan.groups  # rows go in with their keys (keyed)
        self.legs = legs
        self.float_digits = float_digits
        self.text_order = text_order
        self.description: list[tuple[bytes, bytes]] | None = None
        self.width = 0
        self.finished = [False] * legs
        self.out: list[bytes] = []
        self.sent = 0           # rows the client got
        self.skipped = 0        # rows OFFSET dropped
        self.full = plan.limit == 0  # LIMIT reached: the rest is not needed
        self.queues: list[deque[tuple[Any, bytes]]] = [deque() for _ in range(legs)]  # (key, DataRow)
        self.heap: list[tuple[Any, int, int]] = []
        self.in_heap = [False] * legs
        self.starved = legs  # shards still sending with no row waiting: the merge must wait for them
        self.seq = 0
        self.sort_spec: m.SortSpec = ()  # see messages.keyed_rows
        self.seen: set[Any] = set()
        self.last_on: Any = None
        self.groups: dict[Any, _Group] = {}
        self.group_readers: list[Callable[[bytes], Any]] = []
        self.combiners: list[Any] = []

    # -- input

    def feed(self, leg: int, kind: int, body: bytes) -> None:
        if kind == m.DATA_ROW:
            self._row(leg, body)
        elif kind == m.ROW_DESCRIPTION:
            self._describe(leg, body)
        elif kind in (m.COMMAND_COMPLETE, m.EMPTY_QUERY):
            if not self.finished[leg]:
                self.finished[leg] = True
                if not self.in_heap[leg]:
                    self.starved -= 1
            if not self.plan.groups and self.plan.order:
                self._merge()

    def buffered(self, leg: int) -> int:
        return len(self.queues[leg])

    def take(self) -> bytes:
        out = b"".join(self.out)
        self.out.clear()
        return out

    def finish(self) -> bytes:
        """Everything left, then CommandComplete; call once every shard has completed."""
        if self.description is None:  # no shard described rows (cannot happen for a SELECT)
            return self.take() + m.command_complete("SELECT 0")
        if self.plan.groups:
            self._finish_groups()
        elif self.plan.order:
            self._merge()
        return self.take() + m.command_complete(f"SELECT {self.sent}")

    # -- row description

    def _describe(self, leg: int, body: bytes) -> None:
        cols = columns(body)
        if self.description is not None:
            if not _same(cols, self.description):
                raise MergeError(DATATYPE_MISMATCH, "the shards returned different row descriptions for the same query "
                                 "(a column added or changed on some shards only)",
                                 hint="make the shards' schemas the same")
            return
        self.description = cols
        self.width = len(cols)
        plan = self.plan
        if plan.groups:
            self._setup_groups(cols)
            visible = [self._output_column(cols, out) for out in plan.outputs[:plan.visible]]
        else:
            visible = cols[:len(cols) - plan.hidden]
            spec = []
            for key in plan.order:
                column = key.column if key.column >= 0 else len(cols) + key.column
                spec.append(self._sort_column(column, type_of(cols[column]), key))
            self.sort_spec = tuple(spec)
            if plan.distinct or plan.distinct_on:
                on = plan.distinct_on or tuple(range(len(visible)))
                self.distinct_readers = [(c, self._equality(type_of(cols[c]))) for c in on]
        self.visible = len(visible)
        visible = self._client_formats(visible)
        if not plan.groups:
            self.passthrough = self.plain and not (plan.order or plan.distinct or plan.distinct_on or plan.offset)
        if self.describe:
            self.out.append(row_description(visible))

    def _sort_column(self, column: int, type_oid: int, key: SortKey) -> tuple[int, int, Any, bool]:
        """How keyed_rows reads one ORDER BY column."""
        read = reader(type_oid, "ORDER BY", self.text_order)
        if read is read_int:
            mode = m.KEY_INT_DESC if key.descending else m.KEY_INT
        elif read is read_float:
            mode = m.KEY_FLOAT_DESC if key.descending else m.KEY_FLOAT
        elif read is read_bytes and not key.descending:
            mode = m.KEY_BYTES
        else:
            mode = m.KEY_CALL
            if key.descending:
                read = _descending(read)
        return column, mode, read, key.nulls_first

    def _client_formats(self, visible: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Binary columns the client asked for: their writers, and their format in the description."""
        formats = self.formats
        if len(formats) > 1 and len(formats) != len(visible):
            raise MergeError(PROTOCOL_VIOLATION, f"bind message has {len(formats)} result formats but query has "
                             f"{len(visible)} columns")
        codes = [formats[0] if len(formats) == 1 else (formats[i] if formats else 0) for i in range(len(visible))]
        rounded = self.float_digits <= 0 and any(type_of(col) in FLOAT_TYPES for col in visible)
        if not any(codes) and not rounded:
            return visible
        self.writers = [binary_writer(type_of(col)) if code else self._float_writer(type_of(col))
                        for col, code in zip(visible, codes, strict=True)]
        self.plain = False
        return [(name, rest[:16] + struct.pack("!h", code)) for (name, rest), code in zip(visible, codes, strict=True)]

    def _float_writer(self, type_oid: int) -> Callable[[bytes], bytes] | None:
        """With extra_float_digits <= 0 the shards still send exact floats (sort keys and
        sums need them); the client's text is rounded here, as its own setting asks."""
        digits = self.float_digits
        if digits > 0 or type_oid not in FLOAT_TYPES:
            return None
        if type_oid == 701:
            return lambda raw: float_text(float(raw), digits)
        return lambda raw: float_text(float(raw), digits) if raw in (b"NaN", b"Infinity", b"-Infinity") \
            else (f"%.{6 + digits}g" % float(raw)).encode()

    def _equality(self, type_oid: int, what: str = "DISTINCT") -> Callable[[bytes], Any]:
        return equality_reader(type_oid, what)  # equality needs no collation order

    def _output_column(self, cols: list[tuple[bytes, bytes]], out: Output) -> tuple[bytes, bytes]:
        name, rest = cols[out.source]
        if out.agg != "avg":
            return name, rest
        total = type_of(cols[out.source])
        oid, size = (701, 8) if total in FLOAT_TYPES else (NUMERIC, -1)
        return name, struct.pack("!IhIhih", 0, 0, oid, size, -1, 0)

    # -- rows plans

    def _row(self, leg: int, body: bytes) -> None:
        plan = self.plan
        if plan.groups:
            self._group_row(fields(body))
            return
        if self.full:
            return
        message = m.message(m.DATA_ROW, body)
        if not plan.order:
            self._emit(message)
            return
        self.keyed(leg, keyed_rows(message, 0, self.sort_spec)[0])

    def keyed(self, leg: int, rows: list[tuple[Any, bytes]]) -> None:
        """A shard's DataRows, each with its sort key (``keyed_rows`` with ``sort_spec``)."""
        if self.full or not rows:
            return
        queue = self.queues[leg]
        queue.extend(rows)
        if not self.in_heap[leg]:  # its first waiting row: into the heap, and maybe the merge can go on
            heapq.heappush(self.heap, (queue[0][0], self.seq, leg))
            self.seq += 1
            self.in_heap[leg] = True
            self.starved -= 1
            if self.starved == 0:
                self._merge()

    def pass_rows(self, data: bytes, count: int) -> None:
        """``count`` whole DataRow messages, as one shard sent them, when ``passthrough``."""
        limit = self.plan.limit
        if self.full:
            return
        if limit is not None and self.sent + count > limit:
            for _, body in m.split(data):  # the last few, one by one
                if self.full:
                    break
                self._emit(m.message(m.DATA_ROW, body))
            return
        self.out.append(data)
        self.sent += count
        if limit is not None and self.sent >= limit:
            self.full = True

    def _merge(self) -> None:
        """Emit rows while every shard still sending has a row waiting (k-way merge).

        The heap holds each shard's first waiting row; ``starved`` counts the shards still
        sending that have none, and while it is not 0 a smaller row may yet come."""
        queues, heap, in_heap, finished = self.queues, self.heap, self.in_heap, self.finished
        while heap and self.starved == 0 and not self.full:
            _, _, leg = heapq.heappop(heap)
            _, message = queues[leg].popleft()
            in_heap[leg] = False
            self._emit(message)
            if queues[leg]:
                heapq.heappush(heap, (queues[leg][0][0], self.seq, leg))
                self.seq += 1
                in_heap[leg] = True
            elif not finished[leg]:
                self.starved += 1

    def _emit(self, message: bytes, values: list[bytes | None] | None = None) -> None:
        """One merged row: DISTINCT, OFFSET and LIMIT, then out (the shard's DataRow
        ``message`` as it came when ``plain``, else its ``values``)."""
        plan = self.plan
        if self.full:
            return
        if plan.distinct or plan.distinct_on:
            values = values if values is not None else fields(message[5:])
            key = tuple(None if values[c] is None else read(values[c])  # type: ignore[arg-type]
                        for c, read in self.distinct_readers)
            if plan.distinct_on and plan.order:
                if key == self.last_on:
                    return
                self.last_on = key
            else:
                if key in self.seen:
                    return
                self.seen.add(key)
        if self.skipped < plan.offset:
            self.skipped += 1
            return
        if self.plain:
            self.out.append(message)
        else:
            values = values if values is not None else fields(message[5:])
            shown = values[:self.visible]
            writers = self.writers
            if writers is not None:
                shown = [v if v is None or w is None else w(v) for v, w in zip(shown, writers, strict=True)]
            self.out.append(data_row(shown))
        self.sent += 1
        if plan.limit is not None and self.sent >= plan.limit:
            self.full = True

    # -- groups plans

    def _setup_groups(self, cols: list[tuple[bytes, bytes]]) -> None:
        plan = self.plan
        self.group_readers = [self._equality(type_of(cols[c]), "GROUP BY") for c in plan.group_by]
        self.combiners = [_combiner(out, cols, self.text_order) if out.agg else None for out in plan.outputs]

    def _group_row(self, values: list[bytes | None]) -> None:
        key = tuple(None if values[c] is None else read(values[c])  # type: ignore[arg-type]
                    for c, read in zip(self.plan.group_by, self.group_readers, strict=True))
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(values, [c.start() if c else None for c in self.combiners])
        for index, combiner in enumerate(self.combiners):
            if combiner is not None:
                group.states[index] = combiner.add(group.states[index], values)

    def _finish_groups(self) -> None:
        plan = self.plan
        if not plan.group_by and not self.groups:
            # Aggregates without GROUP BY answer one row even when no shard had one.
            self.groups[()] = _Group([None] * self.width, [c.start() if c else None for c in self.combiners])
        rows = []
        assert self.description is not None
        types = [type_of(self._output_column(self.description, out)) for out in plan.outputs]
        for group in self.groups.values():
            row = [group.first[out.source] if combiner is None else combiner.result(state, self.float_digits)
                   for out, combiner, state in zip(plan.outputs, self.combiners, group.states, strict=True)]
            if plan.having is not None and _truth(plan.having, row, types, self.text_order) is not True:
                continue
            rows.append(row)
        if plan.order:
            spec = tuple(self._sort_column(key.column, types[key.column], key) for key in plan.order)
            rows.sort(key=lambda row: row_key(row, spec))
        if plan.distinct or plan.distinct_on:
            on = plan.distinct_on or tuple(range(plan.visible))
            self.distinct_readers = [(c, self._equality(types[c])) for c in on]
        for row in rows:
            if self.full:
                break
            self._emit(b"", row)


# -- aggregates: start, add a shard's partial, result

class _Partial:
    """Combines one aggregate's partial results; a shard's NULL partial adds nothing."""

    def __init__(self, column: int) -> None:
        self.column = column

    def start(self) -> Any:
        return None

    def add(self, state: Any, values: list[bytes | None]) -> Any:
        raw = values[self.column]
        return state if raw is None else self.combine(state, raw)

    def combine(self, state: Any, raw: bytes) -> Any:
        raise NotImplementedError

    def result(self, state: Any, float_digits: int) -> bytes | None:
        raise NotImplementedError


class _Count(_Partial):
    def start(self) -> Any:
        return 0

    def combine(self, state: Any, raw: bytes) -> Any:
        return state + int(raw)

    def result(self, state: Any, float_digits: int) -> bytes | None:
        return str(state).encode()


class _Sum(_Partial):
    def __init__(self, column: int, type_oid: int) -> None:
        super().__init__(column)
        self.plus: Callable[[Any, Any], Any] = operator.add
        if type_oid in INT_TYPES:
            self.read: Callable[[bytes], Any] = int
            self.write: Callable[[Any, int], bytes] = lambda v, _: str(v).encode()
        elif type_oid == NUMERIC:
            self.read = lambda raw: Decimal(raw.decode())
            self.write = lambda v, _: numeric_text(v)
            self.plus = add_numeric
        elif type_oid == 701:
            self.read = float
            self.write = float_text
        else:
            name = {700: "real"}.get(type_oid, TYPE_NAMES.get(type_oid, f"type OID {type_oid}"))
            raise MergeError(FEATURE_NOT_SUPPORTED, f"sum() or avg() of a {name} column across shards is not supported",
                             hint="cast it to numeric or double precision")

    def combine(self, state: Any, raw: bytes) -> Any:
        value = self.read(raw)
        return value if state is None else self.plus(state, value)

    def result(self, state: Any, float_digits: int) -> bytes | None:
        return None if state is None else self.write(state, float_digits)


class _Avg(_Sum):
    def __init__(self, column: int, count: int, type_oid: int) -> None:
        super().__init__(column, type_oid)
        self.count = count
        self.floating = type_oid == 701

    def start(self) -> Any:
        return [None, 0]

    def add(self, state: Any, values: list[bytes | None]) -> Any:
        raw = values[self.column]
        if raw is not None:
            state[0] = self.combine(state[0], raw)
        count = values[self.count]
        state[1] += int(count) if count is not None else 0
        return state

    def result(self, state: Any, float_digits: int) -> bytes | None:
        total, count = state
        if total is None or count == 0:
            return None
        if self.floating:
            return float_text(total / count, float_digits)
        return numeric_text(numeric_div(Decimal(total), count))


class _Extreme(_Partial):
    def __init__(self, column: int, type_oid: int, largest: bool, text_order: bool) -> None:
        super().__init__(column)
        self.read = reader(type_oid, "max()" if largest else "min()", text_order)
        self.largest = largest

    def combine(self, state: Any, raw: bytes) -> Any:
        value = self.read(raw)
        if state is None or (value > state[0] if self.largest else value < state[0]):
            return (value, raw)
        return state

    def result(self, state: Any, float_digits: int) -> bytes | None:
        return None if state is None else state[1]


class _Bool(_Partial):
    def __init__(self, column: int, conjunction: bool) -> None:
        super().__init__(column)
        self.conjunction = conjunction

    def combine(self, state: Any, raw: bytes) -> Any:
        value = raw == b"t"
        if state is None:
            return value
        return (state and value) if self.conjunction else (state or value)

    def result(self, state: Any, float_digits: int) -> bytes | None:
        return None if state is None else (b"t" if state else b"f")


def _combiner(out: Output, cols: list[tuple[bytes, bytes]], text_order: bool) -> Any:
    type_oid = type_of(cols[out.source])
    if out.agg == "count":
        return _Count(out.source)
    if out.agg == "sum":
        return _Sum(out.source, type_oid)
    if out.agg == "avg":
        return _Avg(out.source, out.count, type_oid)
    if out.agg in ("min", "max"):
        return _Extreme(out.source, type_oid, out.agg == "max", text_order)
    return _Bool(out.source, out.agg == "bool_and")


# -- HAVING, in SQL's three-valued logic (None is unknown)

def _truth(expr: Any, row: list[bytes | None], types: list[int], text_order: bool = True) -> bool | None:
    if isinstance(expr, Logic):
        values = [_truth(arg, row, types, text_order) for arg in expr.args]
        if expr.op == "not":
            return None if values[0] is None else not values[0]
        if expr.op == "and":
            return False if False in values else (None if None in values else True)
        return True if True in values else (None if None in values else False)
    if isinstance(expr, IsNull):
        null = row[expr.arg.column] is None if isinstance(expr.arg, Ref) else expr.arg.text is None
        return (not null) if expr.negated else null
    assert isinstance(expr, Cmp)
    type_oid = types[expr.left.column] if isinstance(expr.left, Ref) else (
        types[expr.right.column] if isinstance(expr.right, Ref) else 25)
    if type_oid in (25, 1043, 19) and expr.op not in ("=", "<>") and not text_order:
        raise MergeError(FEATURE_NOT_SUPPORTED, "HAVING ordering text across shards needs the C collation, which these "
                         "databases do not use", hint="compare it in the application")
    left = _operand(expr.left, row, types, type_oid)
    right = _operand(expr.right, row, types, type_oid)
    if left is None or right is None:
        return None
    op = expr.op
    if op == "=":
        return bool(left == right)
    if op == "<>":
        return bool(left != right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


def _operand(node: Any, row: list[bytes | None], types: list[int], type_oid: int | None) -> Any:
    """A HAVING operand as a comparable value, read as the column it is compared with:
    integers and numerics as Decimal, floats as float (PostgreSQL casts the constant), text
    by its bytes, bool as bool. Other types are refused: their constants need the server's
    input functions (time zones, uuid spellings)."""
    if isinstance(node, Const):
        if node.text is None:
            return None
        raw = node.text.encode()
    else:
        raw = row[node.column]
        if raw is None:
            return None
        type_oid = types[node.column]
    try:
        if type_oid in INT_TYPES or type_oid == NUMERIC:
            return read_numeric(raw)  # (NaN last, Decimal): ints and numerics compare exactly
        if type_oid in FLOAT_TYPES:
            return read_float(raw)
    except (ArithmeticError, ValueError):
        raise MergeError(INVALID_TEXT_REPRESENTATION, f"invalid input syntax for a number in HAVING: {raw.decode()!r}") from None
    if type_oid == 16:
        text = raw.decode().strip().lower()
        if text not in _BOOLS:
            raise MergeError(INVALID_TEXT_REPRESENTATION, f'invalid input syntax for type boolean: "{raw.decode()}"')
        return _BOOLS[text]
    if type_oid in (25, 1043, 19):
        return raw
    name = TYPE_NAMES.get(type_oid or 0, f"type OID {type_oid}")
    raise MergeError(FEATURE_NOT_SUPPORTED, f"HAVING comparing a {name} across shards is not supported",
                     hint="compare it in the application, or bind the shard key")


_BOOLS = {"t": True, "true": True, "on": True, "1": True, "yes": True, "y": True,
          "f": False, "false": False, "off": False, "0": False, "no": False, "n": False}
