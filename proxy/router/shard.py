"""Shard functions: which shard of ``n`` owns a shard-key value. Pure.

``hash`` is bit-compatible with PostgreSQL's ``PARTITION BY HASH``: shard ``i`` of ``n``
holds exactly the rows a native hash partition ``MODULUS n, REMAINDER i`` would hold. It
is PostgreSQL's extended hash of the value (``hashint8extended`` for int2/int4/int8,
``hashtextextended`` for text/varchar under a deterministic collation,
``uuid_hash_extended`` for uuid) with the partition seed, combined as
``compute_partition_hash_value`` does for a one-column key. ``modulo`` is ``value % n``
for integer keys (never negative: Python's floor modulo).

Values arrive as text (a literal, or a Bind parameter in text format) or as binary Bind
parameters; ``key_value`` reads them as the column's type and raises ``22P02``/``22003``
as PostgreSQL would for a value that is not of that type.
"""

from __future__ import annotations

import functools
import struct
import uuid

from ..errors import (
    CHARACTER_NOT_IN_REPERTOIRE,
    INVALID_BINARY_REPRESENTATION,
    INVALID_PARAMETER_VALUE,
    INVALID_TEXT_REPRESENTATION,
    NUMERIC_VALUE_OUT_OF_RANGE,
    ClientError,
)

PARTITION_SEED = 0x7A5B22367996DCFD  # HASH_PARTITION_SEED in PostgreSQL's partbounds.c
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF

INT_TYPES = {"int2": 16, "smallint": 16, "int4": 32, "integer": 32, "int": 32,
             "int8": 64, "bigint": 64}
TEXT_TYPES = frozenset({"text", "varchar", "character varying"})
KEY_TYPES = frozenset(INT_TYPES) | TEXT_TYPES | {"uuid"}

_WORDS3 = struct.Struct("<3I")


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M32; a ^= _rot(c, 4); c = (c + b) & _M32
    b = (b - a) & _M32; b ^= _rot(a, 6); a = (a + c) & _M32
    c = (c - b) & _M32; c ^= _rot(b, 8); b = (b + a) & _M32
    a = (a - c) & _M32; a ^= _rot(c, 16); c = (c + b) & _M32
    b = (b - a) & _M32; b ^= _rot(a, 19); a = (a + c) & _M32
    c = (c - b) & _M32; c ^= _rot(b, 4); b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    # _rot inlined: this runs once per routed shard key.
    m = _M32
    c ^= b; c = (c - (((b << 14) | (b >> 18)) & m)) & m
    a ^= c; a = (a - (((c << 11) | (c >> 21)) & m)) & m
    b ^= a; b = (b - (((a << 25) | (a >> 7)) & m)) & m
    c ^= b; c = (c - (((b << 16) | (b >> 16)) & m)) & m
    a ^= c; a = (a - (((c << 4) | (c >> 28)) & m)) & m
    b ^= a; b = (b - (((a << 14) | (a >> 18)) & m)) & m
    c ^= b; c = (c - (((b << 24) | (b >> 8)) & m)) & m
    return a, b, c


@functools.lru_cache(maxsize=512)  # (length, seed): the partition seed is constant
def _seeded(length: int, seed: int) -> tuple[int, int, int]:
    a = b = c = (0x9E3779B9 + length + 3923095) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    return a, b, c


def hash_uint32_extended(k: int, seed: int) -> int:
    a, b, c = _seeded(4, seed)
    a = (a + k) & _M32
    a, b, c = _final(a, b, c)
    return (b << 32) | c


def hash_bytes_extended(data: bytes, seed: int) -> int:
    """PostgreSQL's hash_bytes_extended (Jenkins lookup3), little-endian word reads."""
    n = len(data)
    a, b, c = _seeded(n, seed)
    pos = 0
    while n - pos >= 12:
        x, y, z = _WORDS3.unpack_from(data, pos)
        a, b, c = _mix((a + x) & _M32, (b + y) & _M32, (c + z) & _M32)
        pos += 12
    tail = data[pos:] + bytes(12 - (n - pos))  # zero padding adds nothing
    x, y, z = _WORDS3.unpack(tail)
    # The lowest byte of c is not used by the tail (it was meant for the length).
    a, b, c = _final((a + x) & _M32, (b + y) & _M32, (c + (z << 8)) & _M32)
    return (b << 32) | c


def hash_int8_extended(value: int, seed: int) -> int:
    """hashint8extended; int2 and int4 hash to the same values (PostgreSQL makes sure)."""
    lo = value & _M32
    hi = (value >> 32) & _M32
    lo ^= hi if value >= 0 else (~hi & _M32)
    return hash_uint32_extended(lo, seed)


def partition_hash(value: int | str | uuid.UUID, type_name: str) -> int:
    """The row hash of a one-column hash partition key (compute_partition_hash_value)."""
    if _native is not None:
        hashed: int
        if type_name in INT_TYPES:
            hashed = _native.int_hash(value)
        else:
            hashed = _native.bytes_hash(value.bytes if isinstance(value, uuid.UUID) else value.encode())  # type: ignore[union-attr]
        return hashed
    return python_partition_hash(value, type_name)


def python_partition_hash(value: int | str | uuid.UUID, type_name: str) -> int:
    """``partition_hash`` in Python: used where the C extension is not built; tested equal."""
    if type_name in INT_TYPES:
        assert isinstance(value, int)
        h = hash_int8_extended(value, PARTITION_SEED)
    elif type_name == "uuid":
        assert isinstance(value, uuid.UUID)
        h = hash_bytes_extended(value.bytes, PARTITION_SEED)
    else:
        assert isinstance(value, str)
        h = hash_bytes_extended(value.encode(), PARTITION_SEED)
    # hash_combine64(0, h)
    return (h + 0x49A0F4DD15E5A8E3) & _M64


def shard_of(value: int | str | uuid.UUID, type_name: str, shards: int, function: str = "hash") -> int:
    """The index of the shard (of ``shards``) that owns ``value``."""
    if function == "modulo":
        if not isinstance(value, int):
            raise ClientError(INVALID_PARAMETER_VALUE, f"the modulo shard function needs an integer shard key, not {type_name}",
                              hint="use function: hash for text and uuid shard keys")
        return value % shards
    return partition_hash(value, type_name) % shards


def python_int_shard_of(value: int, shards: int) -> int:
    """``shard_of(value, "int8", shards, "hash")`` in one function: the routed-Bind hot path.

    hashint8extended -> hash_uint32_extended with the partition seed (whose seeded start is
    a constant) -> the lookup3 final mix; tested equal to ``shard_of``.
    """
    m = _M32
    lo = value & m
    hi = (value >> 32) & m
    lo ^= hi if value >= 0 else (~hi & m)
    a, b, c = _SEEDED4
    _, b, c = _final((a + lo) & m, b, c)
    return ((((b << 32) | c) + 0x49A0F4DD15E5A8E3) & _M64) % shards


def key_value(text: str, type_name: str) -> int | str | uuid.UUID:
    """A shard-key value given as text, read as PostgreSQL reads that type's input."""
    if type_name in INT_TYPES:
        bits = INT_TYPES[type_name]
        stripped = text.strip()
        digits = stripped[1:] if stripped[:1] in "+-" else stripped
        if not digits.isascii() or not digits.isdigit():
            raise ClientError(INVALID_TEXT_REPRESENTATION, f'invalid input syntax for type {_pg_name(type_name)}: "{text}"')
        value = int(stripped)
        if not -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
            raise ClientError(NUMERIC_VALUE_OUT_OF_RANGE, f'value "{text}" is out of range for type {_pg_name(type_name)}')
        return value
    if type_name == "uuid":
        return _uuid(text)
    return text


def binary_key_value(data: bytes, type_name: str) -> int | str | uuid.UUID:
    """A shard-key value from a Bind parameter in binary format."""
    if type_name in INT_TYPES:
        # The client declares the parameter's type: an int4 for a bigint column is fine.
        if len(data) not in (2, 4, 8):
            raise ClientError(INVALID_BINARY_REPRESENTATION, f"incorrect binary data format: {len(data)} bytes for an integer "
                              f"shard key ({_pg_name(type_name)})")
        return key_value(str(int.from_bytes(data, "big", signed=True)), type_name)
    if type_name == "uuid":
        if len(data) != 16:
            raise ClientError(INVALID_BINARY_REPRESENTATION, f"incorrect binary data format: {len(data)} bytes for uuid")
        return uuid.UUID(bytes=data)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ClientError(CHARACTER_NOT_IN_REPERTOIRE, "invalid byte sequence for encoding \"UTF8\" in a shard-key "
                          "parameter") from None


def _uuid(text: str) -> uuid.UUID:
    # PostgreSQL takes 32 hex digits, optionally in braces, with a hyphen after any group of
    # four digits. Python's parser is more lenient (urn:uuid:), so check the shape first.
    body = text[1:-1] if text.startswith("{") and text.endswith("}") else text
    digits = body.replace("-", "")
    ok = (len(digits) == 32 and all(ch in "0123456789abcdefABCDEF" for ch in digits)
          and not body.startswith("-") and not body.endswith("-") and "--" not in body
          and all(len(group) % 4 == 0 for group in body.split("-")))
    if not ok:
        raise ClientError(INVALID_TEXT_REPRESENTATION, f'invalid input syntax for type uuid: "{text}"')
    return uuid.UUID(hex=digits)


def _pg_name(type_name: str) -> str:
    return {"int2": "smallint", "int4": "integer", "int": "integer", "int8": "bigint",
            "varchar": "character varying"}.get(type_name, type_name)


_SEEDED4 = _seeded(4, PARTITION_SEED)

try:  # the same arithmetic in C (proxy/router/_hash.c), built by pip where a compiler is found
    from . import _hash as _native  # type: ignore[attr-defined]  # C, without a stub: Any to mypy
except ImportError:  # pragma: no cover - a machine without a compiler
    _native = None

int_shard_of = _native.int_shard_of if _native is not None else python_int_shard_of


def interleave_sequences(table: str, index: int, count: int) -> str:
    """SQL for shard ``index`` of ``count`` that makes the sequences ``table``'s columns own
    (serial, bigserial, identity) interleave with the other shards' (start ``index + 1``,
    increment ``count``), so that no id is handed out on two shards. Sequences already used
    (``pg_sequence_last_value`` not null) are left alone: a CREATE TABLE IF NOT EXISTS of a
    table that has rows must not restart them."""
    literal = "'" + table.replace("'", "''") + "'"
    return (
        "DO $pgfleet$ DECLARE s regclass; BEGIN "
        "FOR s IN SELECT c.oid::regclass FROM pg_catalog.pg_depend d "
        "JOIN pg_catalog.pg_class c ON c.oid = d.objid AND c.relkind = 'S' "
        "WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        f"AND d.refobjid = pg_catalog.to_regclass({literal}) AND d.deptype IN ('a', 'i') LOOP "
        "IF pg_catalog.pg_sequence_last_value(s) IS NULL THEN "
        "EXECUTE pg_catalog.format('ALTER SEQUENCE %s INCREMENT BY %s START WITH %s RESTART WITH %s', "
        f"s, {count}, {index + 1}, {index + 1}); END IF; END LOOP; END $pgfleet$"
    )
