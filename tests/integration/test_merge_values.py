"""The values the merger computes, against the real server: PostgreSQL's float8 output and
the scale of numeric division (avg), so a merged answer is spelled as one database spells it."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.embedded import Cluster
from proxy.merge.values import float_text, numeric_div, read_datetime


@pytest.fixture(scope="module")
def conn(pg: Cluster) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as c:
        yield c


EDGES = [0.0, -0.0, 1.0, 0.1, 1e15, 1e16, 123456789012345.6, 1e-4, 1e-5, 5e-324, 1.7976931348623157e308,
         math.inf, -math.inf, math.nan, 2.5e-7, 100.0, 1234567.0, 0.30000000000000004]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=40))
def test_float_text_is_the_servers_float8_output(conn: psycopg.Connection[Any], values: list[float]) -> None:
    values = values + EDGES
    for digits in (1, 0, -3):
        conn.execute(f"set extra_float_digits = {digits}")
        texts = conn.execute("select x::text from unnest(%s::float8[]) with ordinality as u(x, i) order by i",
                             ([struct.unpack("!d", struct.pack("!d", v))[0] for v in values],)).fetchall()
        assert [float_text(v, digits).decode() for v in values] == [t[0] for t in texts]
    conn.execute("reset extra_float_digits")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-10**12, 10**12), min_size=1, max_size=30),
       st.lists(st.decimals(min_value=-10**9, max_value=10**9, places=3, allow_nan=False), min_size=1, max_size=30))
def test_numeric_division_is_the_servers_avg(conn: psycopg.Connection[Any], ints: list[int],
                                             decimals: list[Decimal]) -> None:
    got = conn.execute("select avg(x)::text from unnest(%s::int8[]) as u(x)", (ints,)).fetchone()
    assert got is not None and format(numeric_div(Decimal(sum(ints)), len(ints)), "f") == got[0]
    got = conn.execute("select avg(x)::text, sum(x)::text from unnest(%s::numeric[]) as u(x)", (decimals,)).fetchone()
    assert got is not None
    assert format(numeric_div(Decimal(got[1]), len(decimals)), "f") == got[0]


def test_timestamps_read_as_the_instants_the_server_orders(conn: psycopg.Connection[Any]) -> None:
    conn.execute("set timezone = 'America/New_York'")
    rows = conn.execute("""
        select v::text from unnest(array['2024-03-10 01:59:59-05', '2024-03-10 03:00:00-04', '-infinity',
            '0044-03-15 12:00:00+00 BC', '2024-11-03 01:30:00-04', '2024-11-03 01:15:00-05', 'infinity',
            '12345-01-01 00:00:00+00', '1999-12-31 23:59:59.999999+00']::timestamptz[]) as u(v)
        order by u.v""").fetchall()
    conn.execute("reset timezone")
    texts = [r[0].encode() for r in rows]
    assert sorted(texts, key=read_datetime) == texts
    assert len({read_datetime(t) for t in texts}) == len(texts)


@pytest.mark.parametrize(("type_name", "oid", "send", "literals"), [
    ("numeric", 1700, "numeric_send", ["0", "0.00", "-1", "12345.6789", "0.0001", "10000", "-99999999.000001",
                                       "123456789012345678901234567890.5", "NaN", "Infinity", "-Infinity", "1e-20"]),
    ("int8", 20, "int8send", ["0", "-1", "9223372036854775807", "-9223372036854775808"]),
    ("int4", 23, "int4send", ["0", "-2147483648", "2147483647"]),
    ("int2", 21, "int2send", ["0", "-32768", "32767"]),
    ("float8", 701, "float8send", ["0", "-0", "1.5", "NaN", "Infinity", "-Infinity", "1e-300"]),
    ("float4", 700, "float4send", ["0", "1.5", "NaN", "-Infinity", "3.4e38"]),
    ("bool", 16, "boolsend", ["t", "f"]),
    ("uuid", 2950, "uuid_send", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000000"]),
    ("date", 1082, "date_send", ["2024-02-29", "1999-12-31", "0044-03-15 BC", "infinity", "-infinity", "5874897-12-31"]),
    ("timestamp", 1114, "timestamp_send", ["2000-01-01 00:00:00", "1970-01-01 00:00:00.000001", "infinity",
                                           "0044-03-15 12:30:00 BC"]),
    ("timestamptz", 1184, "timestamptz_send", ["2024-03-10 03:15:00-04", "2000-01-01 00:00:00+05:30", "-infinity"]),
    ("text", 25, "textsend", ["", "héllo", "a\tb"]),
])
def test_binary_output_is_the_servers_send_function(conn: psycopg.Connection[Any], type_name: str, oid: int,
                                                    send: str, literals: list[str]) -> None:
    from proxy.merge.values import binary_writer
    write = binary_writer(oid)
    conn.execute("set timezone = 'UTC'")
    for literal in literals:
        text, binary = conn.execute(f"select %s::{type_name}::text, {send}(%s::{type_name})",
                                    (literal, literal)).fetchone()  # type: ignore[misc]
        assert write(text.encode()) == bytes(binary), (type_name, literal, text)
    conn.execute("reset timezone")
