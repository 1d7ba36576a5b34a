"""The hash shard function against the real server: shard i of n holds exactly the rows a
native ``PARTITION BY HASH`` partition ``MODULUS n, REMAINDER i`` holds."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.embedded import Cluster
from proxy.errors import ClientError
from proxy.router import shard

INT8_EDGES = [0, 1, -1, 2, -2, 42, 2**31 - 1, -2**31, 2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**63 - 2]


@pytest.fixture(scope="module")
def conn(pg: Cluster) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as c:
        yield c


def partitioned(conn: psycopg.Connection[Any], type_name: str, modulus: int) -> str:
    table = f"hp_{type_name.replace(' ', '_')}_{modulus}"
    conn.execute(f"drop table if exists {table}")
    conn.execute(f"create table {table} (k {type_name}) partition by hash (k)")
    for i in range(modulus):
        conn.execute(f"create table {table}_{i} partition of {table} for values with (modulus {modulus}, "
                     f"remainder {i})")
    return table


def placed(conn: psycopg.Connection[Any], table: str, values: list[Any], type_name: str) -> list[tuple[Any, int]]:
    conn.execute(f"insert into {table} select unnest(%s::{type_name}[])", (values,))
    rows = conn.execute(f"select k, tableoid::regclass::text from {table}").fetchall()
    conn.execute(f"drop table {table}")
    return [(k, int(part.rsplit("_", 1)[1])) for k, part in rows]


def random_ints(rng: random.Random, bits: int, n: int) -> list[int]:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    edges = [v for v in INT8_EDGES if lo <= v <= hi] + [lo, hi]
    return sorted(set(edges + [rng.randint(lo, hi) for _ in range(n)] + list(range(-300, 300))))


@pytest.mark.parametrize("modulus", [2, 3, 7])
@pytest.mark.parametrize(("type_name", "bits"), [("int2", 16), ("int4", 32), ("int8", 64)])
def test_integer_keys_land_where_postgresql_puts_them(conn: psycopg.Connection[Any], type_name: str,
                                                      bits: int, modulus: int) -> None:
    values = random_ints(random.Random(bits * 100 + modulus), bits, 3000)
    rows = placed(conn, partitioned(conn, type_name, modulus), values, type_name)
    assert len(rows) == len(values)
    wrong = [(k, part) for k, part in rows if shard.shard_of(k, type_name, modulus) != part]
    assert not wrong, wrong[:5]


def random_texts(rng: random.Random, n: int) -> list[str]:
    alphabet = "abcXYZ019 -_'\"\\é日本語🙂ß"
    texts = ["", " ", "a", "abc", "x" * 11, "y" * 12, "z" * 13, "w" * 24, "v" * 25, "héllo wörld", "日本語", "🙂"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]
    return sorted(set(texts))


@pytest.mark.parametrize("modulus", [2, 5])
@pytest.mark.parametrize("type_name", ["text", "varchar"])
def test_text_keys_land_where_postgresql_puts_them(conn: psycopg.Connection[Any], type_name: str,
                                                   modulus: int) -> None:
    values = random_texts(random.Random(modulus), 3000)
    rows = placed(conn, partitioned(conn, type_name, modulus), values, type_name)
    assert len(rows) == len(values)
    wrong = [(k, part) for k, part in rows if shard.shard_of(k, type_name, modulus) != part]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("modulus", [2, 3, 4])
def test_uuid_keys_land_where_postgresql_puts_them(conn: psycopg.Connection[Any], modulus: int) -> None:
    rng = random.Random(modulus)
    values = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3000)] + [uuid.UUID(int=0),
                                                                            uuid.UUID(int=2**128 - 1)]
    rows = placed(conn, partitioned(conn, "uuid", modulus), values, "uuid")
    assert len(rows) == len(values)
    wrong = [(k, part) for k, part in rows if shard.shard_of(k, "uuid", modulus) != part]
    assert not wrong, wrong[:5]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=50),
       st.lists(st.text(max_size=30).filter(lambda t: "\0" not in t), min_size=1, max_size=50),
       st.integers(1, 2**63 - 1))
def test_hash_functions_equal_the_servers(conn: psycopg.Connection[Any], ints: list[int], texts: list[str],
                                          seed: int) -> None:
    mask = 2**64 - 1
    got = conn.execute("select array(select hashint8extended(x, %s) from unnest(%s::int8[]) x), "
                       "array(select hashtextextended(t, %s) from unnest(%s::text[]) t)",
                       (seed, ints, seed, texts)).fetchone()
    assert got is not None
    assert [h & mask for h in got[0]] == [shard.hash_int8_extended(v, seed) for v in ints]
    assert [h & mask for h in got[1]] == [shard.hash_bytes_extended(t.encode(), seed) for t in texts]


@pytest.mark.parametrize("text", [
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
    "A0EEBC999C0B4EF8BB6D6BB9BD380A11", "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
    "a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11", "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "a0eebc99", "a0eeb-c999c0b4ef8bb6d6bb9bd380a11", "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
])
def test_uuid_input_is_read_as_the_server_reads_it(conn: psycopg.Connection[Any], text: str) -> None:
    try:
        server = conn.execute("select %s::text::uuid", (text,)).fetchone()
    except psycopg.errors.InvalidTextRepresentation:
        server = None
    try:
        ours: object = shard.key_value(text, "uuid")
    except ClientError as exc:
        assert exc.sqlstate == "22P02"
        ours = None
    assert ours == (server[0] if server else None)
