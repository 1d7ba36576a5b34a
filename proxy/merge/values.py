"""PostgreSQL values as the merger needs them: read from text output in PostgreSQL's order,
written as PostgreSQL writes computed values (float8out, numeric division), and encoded in
binary for clients that ask for binary results. Pure.

Text types compare by their bytes, which is PostgreSQL's order under the C collation (and
C.UTF-8); callers refuse text sort keys on databases with another collation. Dates and
timestamps must be in ISO DateStyle (the default).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from ..errors import FEATURE_NOT_SUPPORTED, ProxyError

INT_TYPES = frozenset({20, 21, 23, 26, 28})      # int8, int2, int4, oid, xid
FLOAT_TYPES = frozenset({700, 701})
NUMERIC = 1700
BYTE_ORDER_TYPES = frozenset({25, 1043, 19, 16, 2950, 1083})  # text, varchar, name, bool, uuid, time
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 18})
BPCHAR = 1042  # char(n): trailing spaces do not count
DATE, TIMESTAMP, TIMESTAMPTZ = 1082, 1114, 1184
# Types whose text output is canonical: equal values print the same (bytea as hex, inet, ...).
_BYTES_EQUAL = frozenset({17, 869, 650, 829, 774, 26, 1266})
TYPE_NAMES = {18: '"char"', 1186: "interval", 114: "json", 3802: "jsonb", 17: "bytea", 790: "money", 1266: "timetz",
              869: "inet", 650: "cidr", 829: "macaddr", 3614: "tsvector", 142: "xml", 600: "point"}


class MergeError(ProxyError):
    """The shards' answers cannot be merged (they disagree, or a value cannot be read)."""


# -- values

def read_int(raw: bytes) -> int:
    return int(raw)


def read_float(raw: bytes) -> Any:
    value = float(raw)  # "NaN", "Infinity", "-Infinity" read as Python reads them
    return (1, 0.0) if math.isnan(value) else (0, value)  # NaN sorts above everything and equals NaN


def read_numeric(raw: bytes) -> Any:
    value = Decimal(raw.decode())
    return (1, Decimal(0)) if value.is_nan() else (0, value)


def read_bytes(raw: bytes) -> bytes:
    return raw


_DATETIME = re.compile(rb"^(\d{4,})-(\d\d)-(\d\d)(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
                       rb"(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?)?( BC)?$")


def _days_from_civil(y: int, m_: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year; 0 is 1 BC)."""
    y -= m_ <= 2
    era = y // 400  # Python's // floors, so no adjustment for negative years
    yoe = y - era * 400
    doy = (153 * (m_ + (-3 if m_ > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def read_datetime(raw: bytes) -> Any:
    """A date, timestamp or timestamptz in ISO DateStyle as microseconds since 1970 (UTC)."""
    if raw == b"infinity":
        return math.inf
    if raw == b"-infinity":
        return -math.inf
    found = _DATETIME.match(raw)
    if found is None:
        raise MergeError(FEATURE_NOT_SUPPORTED, f"cannot read the date/time value {raw.decode(errors='replace')!r} to "
                         "merge the shards' rows", hint="SET DateStyle TO ISO for federated queries")
    year, month, day, hh, mi, ss, frac, sign, oh, om, os_, bc = found.groups()
    y = int(year)
    if bc:
        y = 1 - y
    micros = _days_from_civil(y, int(month), int(day)) * 86_400_000_000
    if hh is not None:
        micros += ((int(hh) * 60 + int(mi)) * 60 + int(ss)) * 1_000_000
        if frac:
            micros += int(frac.ljust(6, b"0"))
    if sign is not None:
        offset = (int(oh) * 60 + int(om or 0)) * 60 + int(os_ or 0)
        micros -= (offset if sign == b"+" else -offset) * 1_000_000
    return micros


def read_bpchar(raw: bytes) -> bytes:
    return raw.rstrip(b" ")


def equality_reader(type_oid: int, what: str) -> Callable[[bytes], Any]:
    """How to read a column's value so that Python's == is PostgreSQL's = (GROUP BY, DISTINCT).

    Types whose equal values can print differently ('1 day' and '24 hours', jsonb numbers)
    are refused: their text does not tell."""
    if type_oid == 18:  # "char": one byte
        return read_bytes
    if type_oid in _BYTES_EQUAL:
        return read_bytes
    return reader(type_oid, what)


def reader(type_oid: int, what: str, text_order: bool = True) -> Callable[[bytes], Any]:
    """How to read a column's text value into something Python orders as PostgreSQL does."""
    if type_oid in INT_TYPES:
        return read_int
    if type_oid in FLOAT_TYPES:
        return read_float
    if type_oid == NUMERIC:
        return read_numeric
    if type_oid in (DATE, TIMESTAMP, TIMESTAMPTZ):
        return read_datetime
    if type_oid in BYTE_ORDER_TYPES or type_oid == BPCHAR:
        if type_oid in TEXT_TYPES and not text_order:
            raise MergeError(FEATURE_NOT_SUPPORTED, f"{what} on a text column across shards needs the C collation and "
                             "client_encoding UTF8, which this query does not have",
                             hint="bind the shard key, or order the rows in the application")
        return read_bpchar if type_oid == BPCHAR else read_bytes
    name = TYPE_NAMES.get(type_oid, f"type OID {type_oid}")
    raise MergeError(FEATURE_NOT_SUPPORTED, f"{what} on a column of type {name} across shards is not supported",
                     hint="bind the shard key, or cast it to a type pgfleet can compare (text, numeric, "
                          "timestamp)")


class Desc:
    """A value that sorts in reverse (for DESC keys of any type)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: Desc) -> bool:
        less: bool = other.value < self.value
        return less

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Desc) and self.value == other.value


# -- PostgreSQL's output of computed values

def float_text(value: float, extra_digits: int = 1) -> bytes:
    """A float8 as PostgreSQL writes it (float8out): shortest exact digits when
    extra_float_digits > 0, else %.{15+extra}g."""
    if math.isnan(value):
        return b"NaN"
    if value in (math.inf, -math.inf):
        return b"Infinity" if value > 0 else b"-Infinity"
    if extra_digits <= 0:
        return (f"%.{15 + extra_digits}g" % value).encode()
    if value == 0:
        return b"-0" if math.copysign(1.0, value) < 0 else b"0"
    _, digits, exponent = _shortest(abs(value)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    point = len(digits) + int(exponent) - 1  # the exponent of the first digit
    head = "-" if value < 0 else ""
    if point < -4 or point >= 15:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{head}{mantissa}e{'+' if point >= 0 else '-'}{abs(point):02d}".encode()
    if point < 0:
        return f"{head}0.{'0' * (-point - 1)}{text}".encode()
    if len(text) <= point + 1:
        return f"{head}{text}{'0' * (point + 1 - len(text))}".encode()
    return f"{head}{text[:point + 1]}.{text[point + 1:]}".encode()


_WIDE = Context(prec=1200)


def _shortest(value: float) -> Decimal:
    """The fewest digits that read back as ``value`` (positive, finite), as PostgreSQL's Ryu
    finds them: strictly inside the rounding interval. Python's repr also takes a decimal on
    the interval's edge when the mantissa is even, so it is only the first length to try."""
    exact = Decimal(value)
    low = _WIDE.divide(_WIDE.add(exact, Decimal(math.nextafter(value, -math.inf))), 2)
    high = _WIDE.divide(_WIDE.add(exact, Decimal(math.nextafter(value, math.inf))), 2)
    start = len(repr(value).split("e")[0].replace(".", "").replace("-", "").strip("0")) or 1
    for length in range(start, 18):
        rounded = Decimal(format(value, f".{length - 1}e"))  # correctly rounded to that length
        step = Decimal(1).scaleb(rounded.adjusted() - (length - 1))
        # Near a power of two the interval is lopsided: a neighbour of the rounded value may
        # be inside when it is not. Of those inside, the nearest (then the even one) wins.
        inside = [c for c in (rounded, _WIDE.add(rounded, step), _WIDE.subtract(rounded, step)) if low < c < high]
        if inside:
            return min(inside, key=lambda c: (abs(_WIDE.subtract(c, exact)), int(c.as_tuple().digits[-1]) % 2))
    return Decimal(format(value, ".16e"))


def _nbase(value: Decimal) -> tuple[int, int]:
    """(weight, first digit) of a numeric in PostgreSQL's base-10000 digits."""
    value = abs(value)
    if value == 0:
        return 0, 0
    weight = value.adjusted() // 4
    first = int(value.scaleb(-4 * weight, _WIDE))
    return weight, first


def numeric_div(total: Decimal, count: int) -> Decimal:
    """numeric_div(total, count) with PostgreSQL's result scale (select_div_scale).

    NaN and the infinities divide to themselves (count is positive)."""
    if not total.is_finite():
        return total
    divisor = Decimal(count)
    w1, f1 = _nbase(total)
    w2, f2 = _nbase(divisor)
    qweight = w1 - w2 - (1 if f1 <= f2 else 0)
    scale = max(16 - qweight * 4, -int(total.as_tuple().exponent), 0)
    scale = min(scale, 1000)
    quotient = _WIDE.divide(total, divisor)
    return quotient.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP, context=_WIDE)


def numeric_text(value: Decimal) -> bytes:
    return format(value, "f").encode()  # NaN, Infinity, -Infinity as PostgreSQL spells them


# Sums of numerics as PostgreSQL adds them: Infinity + -Infinity is NaN, not an error.
NUMERIC_SUMS = Context(prec=1200, traps=[])


def add_numeric(a: Decimal, b: Decimal) -> Decimal:
    return NUMERIC_SUMS.add(a, b)


# -- binary output (for clients that ask for binary results)

_EPOCH_2000 = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970
_BINARY_SIMPLE: dict[int, Callable[[bytes], bytes]] = {
    21: lambda raw: struct.pack("!h", int(raw)),
    23: lambda raw: struct.pack("!i", int(raw)),
    20: lambda raw: struct.pack("!q", int(raw)),
    26: lambda raw: struct.pack("!I", int(raw)),
    700: lambda raw: struct.pack("!f", float(raw)),
    701: lambda raw: struct.pack("!d", float(raw)),
    16: lambda raw: b"\x01" if raw in (b"t", b"true") else b"\x00",
    18: lambda raw: b"\x00" if not raw else (bytes((int(raw[1:], 8),)) if raw[:1] == b"\\" and len(raw) == 4
                                             else raw[:1]),  # "char": its one byte
    2950: lambda raw: bytes.fromhex(raw.decode().replace("-", "")),
}


def _binary_text(raw: bytes) -> bytes:
    return raw  # text, varchar, bpchar, name, char: the same UTF-8 bytes


def _binary_date(raw: bytes) -> bytes:
    value = read_datetime(raw)
    if value in (math.inf, -math.inf):
        return struct.pack("!i", 0x7FFFFFFF if value > 0 else -0x80000000)
    return struct.pack("!i", (value - _EPOCH_2000) // 86_400_000_000)


def _binary_timestamp(raw: bytes) -> bytes:
    value = read_datetime(raw)
    if value in (math.inf, -math.inf):
        return struct.pack("!q", 0x7FFFFFFFFFFFFFFF if value > 0 else -0x8000000000000000)
    return struct.pack("!q", value - _EPOCH_2000)


def _binary_numeric(raw: bytes) -> bytes:
    """numeric_send: base-10000 digits, weight, sign and display scale."""
    text = raw.decode()
    special = {"NaN": (0xC000, 0), "Infinity": (0xD000, 32), "-Infinity": (0xF000, 32)}.get(text)
    if special is not None:  # the server sends a display scale of 32 for the infinities
        return struct.pack("!hhHh", 0, 0, *special)
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("+-").partition(".")
    scale = len(fraction)
    whole = whole.lstrip("0")
    whole = "0" * (-len(whole) % 4) + whole
    fraction = fraction + "0" * (-len(fraction) % 4)
    groups = [int(whole[i:i + 4]) for i in range(0, len(whole), 4)] + \
        [int(fraction[i:i + 4]) for i in range(0, len(fraction), 4)]
    weight = len(whole) // 4 - 1
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight, negative = 0, False
    return struct.pack(f"!hhHh{len(groups)}h", len(groups), weight, 0x4000 if negative else 0, scale, *groups)


def binary_writer(type_oid: int) -> Callable[[bytes], bytes]:
    """How to turn a column's text value into its binary format; 0A000 for other types."""
    found = _BINARY_SIMPLE.get(type_oid)
    if found is not None:
        return found
    if type_oid in TEXT_TYPES and type_oid != 18:
        return _binary_text
    if type_oid == DATE:
        return _binary_date
    if type_oid in (TIMESTAMP, TIMESTAMPTZ):
        return _binary_timestamp
    if type_oid == NUMERIC:
        return _binary_numeric
    name = TYPE_NAMES.get(type_oid, f"type OID {type_oid}")
    raise MergeError(FEATURE_NOT_SUPPORTED, f"binary results of type {name} from a query across shards are not supported",
                     hint="ask for this column in text format")
