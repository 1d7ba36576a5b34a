"""Shard functions, pure: the hash against an independent byte-at-a-time reference, value input."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ClientError
from proxy.router import shard

M32 = 0xFFFFFFFF


def ref_hash_bytes(key: bytes, seed: int) -> int:
    """PostgreSQL's unaligned path of hash_bytes_extended, byte by byte, as a reference."""
    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & M32

    def mix(a: int, b: int, c: int) -> tuple[int, int, int]:
        for x, y, z, r in ((0, 1, 2, 4), (1, 2, 0, 6), (2, 0, 1, 8), (0, 1, 2, 16), (1, 2, 0, 19), (2, 0, 1, 4)):
            v = [a, b, c]
            v[x] = (v[x] - v[z]) & M32
            v[x] ^= rot(v[z], r)
            v[z] = (v[z] + v[y]) & M32
            a, b, c = v
        return a, b, c

    def final(a: int, b: int, c: int) -> tuple[int, int, int]:
        v = [a, b, c]
        for x, y, r in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):
            v[x] ^= v[y]
            v[x] = (v[x] - rot(v[y], r)) & M32
        return v[0], v[1], v[2]

    length = len(key)
    a = b = c = (0x9E3779B9 + length + 3923095) & M32
    if seed:
        a = (a + (seed >> 32)) & M32
        b = (b + (seed & M32)) & M32
        a, b, c = mix(a, b, c)
    k = key
    while len(k) >= 12:
        a = (a + k[0] + (k[1] << 8) + (k[2] << 16) + (k[3] << 24)) & M32
        b = (b + k[4] + (k[5] << 8) + (k[6] << 16) + (k[7] << 24)) & M32
        c = (c + k[8] + (k[9] << 8) + (k[10] << 16) + (k[11] << 24)) & M32
        a, b, c = mix(a, b, c)
        k = k[12:]
    n = len(k)
    if n >= 11:
        c = (c + (k[10] << 24)) & M32
    if n >= 10:
        c = (c + (k[9] << 16)) & M32
    if n >= 9:
        c = (c + (k[8] << 8)) & M32
    if n >= 8:
        b = (b + (k[7] << 24)) & M32
    if n >= 7:
        b = (b + (k[6] << 16)) & M32
    if n >= 6:
        b = (b + (k[5] << 8)) & M32
    if n >= 5:
        b = (b + k[4]) & M32
    if n >= 4:
        a = (a + (k[3] << 24)) & M32
    if n >= 3:
        a = (a + (k[2] << 16)) & M32
    if n >= 2:
        a = (a + (k[1] << 8)) & M32
    if n >= 1:
        a = (a + k[0]) & M32
    a, b, c = final(a, b, c)
    return (b << 32) | c


@given(st.binary(max_size=80), st.integers(0, 2**64 - 1))
def test_hash_bytes_matches_the_bytewise_reference(data: bytes, seed: int) -> None:
    assert shard.hash_bytes_extended(data, seed) == ref_hash_bytes(data, seed)


@given(st.integers(-2**63, 2**63 - 1))
def test_int8_hash_is_the_uint32_hash_of_its_folded_halves(value: int) -> None:
    lo, hi = value & M32, (value >> 32) & M32
    folded = lo ^ (hi if value >= 0 else ~hi & M32)
    assert shard.hash_int8_extended(value, 7) == ref_hash_uint32(folded, 7)


def ref_hash_uint32(k: int, seed: int) -> int:
    """hash_uint32_extended equals hash_bytes_extended of the 4 little-endian bytes."""
    return ref_hash_bytes(k.to_bytes(4, "little"), seed)


@given(st.integers(-2**31, 2**31 - 1), st.integers(1, 64))
def test_int2_int4_int8_put_a_value_on_the_same_shard(value: int, n: int) -> None:
    assert shard.shard_of(value, "int4", n) == shard.shard_of(value, "int8", n)
    if -2**15 <= value < 2**15:
        assert shard.shard_of(value, "int2", n) == shard.shard_of(value, "int8", n)


@given(st.integers(-2**63, 2**63 - 1), st.integers(1, 64))
def test_shards_are_in_range(value: int, n: int) -> None:
    assert 0 <= shard.shard_of(value, "int8", n) < n
    assert 0 <= shard.shard_of(value, "int8", n, "modulo") < n


def test_modulo_is_the_seeds_parity_rule() -> None:
    assert [shard.shard_of(v, "int8", 2, "modulo") for v in (0, 1, 2, 3, 42, 43)] == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ClientError) as err:
        shard.shard_of("abc", "text", 2, "modulo")
    assert err.value.sqlstate == "22023"


@pytest.mark.parametrize(("text", "type_name", "expected"), [
    ("42", "int8", 42), (" -7 ", "int4", -7), ("+5", "int2", 5),
    ("9223372036854775807", "int8", 2**63 - 1), ("-9223372036854775808", "bigint", -2**63),
    ("", "text", ""), ("héllo", "varchar", "héllo"),
    ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}", "uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("a0eebc999c0b4ef8bb6d6bb9bd380a11", "uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("a0ee-bc99-9c0b4ef8-bb6d6bb9-bd380a11", "uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
])
def test_key_values_read_as_postgresql_reads_them(text: str, type_name: str, expected: object) -> None:
    assert shard.key_value(text, type_name) == expected


@pytest.mark.parametrize(("text", "type_name", "sqlstate"), [
    ("abc", "int8", "22P02"), ("4.5", "int4", "22P02"), ("", "int4", "22P02"), ("١٢", "int4", "22P02"),
    ("9223372036854775808", "int8", "22003"), ("2147483648", "int4", "22003"), ("32768", "int2", "22003"),
    ("urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "uuid", "22P02"), ("a0eebc99", "uuid", "22P02"),
    ("a0eeb-c999c0b4ef8bb6d6bb9bd380a11", "uuid", "22P02"), ("-a0eebc999c0b4ef8bb6d6bb9bd380a11", "uuid", "22P02"),
])
def test_values_that_are_not_of_the_type_are_refused(text: str, type_name: str, sqlstate: str) -> None:
    with pytest.raises(ClientError) as err:
        shard.key_value(text, type_name)
    assert err.value.sqlstate == sqlstate


def test_binary_parameters() -> None:
    assert shard.binary_key_value((-2).to_bytes(8, "big", signed=True), "int8") == -2
    assert shard.binary_key_value((70000).to_bytes(4, "big", signed=True), "int4") == 70000
    u = uuid.uuid4()
    assert shard.binary_key_value(u.bytes, "uuid") == u
    # The client declares a parameter's type: an int4 for a bigint key reads as that integer.
    assert shard.binary_key_value(b"\0\0\0\1", "int8") == 1
    assert shard.binary_key_value(b"\xff\xfe", "int8") == -2
    for data, type_name in ((b"\0\0\1", "int8"), (b"\0" * 15, "uuid")):
        with pytest.raises(ClientError) as err:
            shard.binary_key_value(data, type_name)
        assert err.value.sqlstate == "22P03"
    with pytest.raises(ClientError) as err:  # an int8 value too big for an int4 key
        shard.binary_key_value((1 << 40).to_bytes(8, "big", signed=True), "int4")
    assert err.value.sqlstate == "22003"


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), st.integers(min_value=1, max_value=16))
def test_the_inlined_int_shard_function_equals_shard_of(value: int, shards: int) -> None:
    assert shard.int_shard_of(value, shards) == shard.shard_of(value, "int8", shards, "hash")
    assert shard.python_int_shard_of(value, shards) == shard.int_shard_of(value, shards)


def test_the_c_hash_is_built() -> None:
    """``pip install`` builds proxy/router/_hash.c where gcc exists, as on every machine here."""
    assert shard._native is not None, "proxy.router._hash was not built: pip install -e . with a C compiler"


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1))
def test_the_c_int_hash_equals_the_python_one(value: int) -> None:
    assert shard._native is not None
    for type_name in ("int2", "int4", "int8"):
        assert shard.partition_hash(value, type_name) == shard.python_partition_hash(value, type_name)


@given(st.text(max_size=60))
def test_the_c_text_hash_equals_the_python_one(text: str) -> None:
    assert shard.partition_hash(text, "text") == shard.python_partition_hash(text, "text")


@given(st.uuids())
def test_the_c_uuid_hash_equals_the_python_one(value: uuid.UUID) -> None:
    assert shard.partition_hash(value, "uuid") == shard.python_partition_hash(value, "uuid")


def test_the_c_int_shard_function_refuses_what_python_would_not_hash() -> None:
    assert shard._native is not None
    with pytest.raises(OverflowError):
        shard._native.int_shard_of(1 << 63, 2)
    with pytest.raises(ValueError):
        shard._native.int_shard_of(1, 0)
