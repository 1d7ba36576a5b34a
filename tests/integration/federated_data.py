"""Data for the federated-SELECT differential tests (test_federated.py).

One schema, loaded into an oracle database (every row) and into the shards of two fleets
(rows split by ``shard_of(id, "int8", n)``): ``items`` and ``item_tags`` are sharded by id,
``cats`` is a reference table with the same rows everywhere. Rows come from a fixed seeded
generator (2,000 rows) and from hypothesis strategies; both lean on small pools so that
duplicates, ties and NULLs are the rule, and on edge values: NaN/Infinity/-0.0 floats,
numeric NaN, empty and non-ASCII text, timestamps around DST changes with several offsets.

Floats in ``score`` are multiples of 1/8 below 2**24 in size, so their sums are exact in any
addition order; ``ratio`` holds arbitrary non-negative doubles (0.1, 1/3, denormals), whose
sums may differ in the last bits between the oracle and a merge (compared with a tolerance).
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import strategies as st

from proxy.router.shard import shard_of

SCHEMA = """
CREATE TABLE items (id bigint PRIMARY KEY, grp int, cat text, price numeric(12,2), qty int,
                    score float8, ratio float8, flag bool, ts timestamptz, d date, u uuid, note text);
CREATE TABLE item_tags (id bigint NOT NULL, tag text NOT NULL, PRIMARY KEY (id, tag));
CREATE TABLE cats (code text PRIMARY KEY, label text);
"""
ITEM_COLUMNS = ("id", "grp", "cat", "price", "qty", "score", "ratio", "flag", "ts", "d", "u", "note")
# Session time zone of every database (oracle and shards): DST matters for ts::text, ::date.
TIMEZONE = "Europe/Berlin"

Row = tuple[Any, ...]
Dataset = tuple[list[Row], list[Row]]  # (items rows, item_tags rows)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
OFFSETS = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)),
           timezone(timedelta(hours=14)), timezone(timedelta(hours=-10)), BERLIN, NEW_YORK]

CAT_POOL = ["a", "A", "b", "B", "", " ", "é", "É", "Ä", "z", "日本", "🙂", "a b", "ab", "it's"]
CATS: list[Row] = [("a", "Alpha"), ("A", "alpha"), ("b", None), ("é", "Ünïcödé"), ("日本", "Japan"),
                   ("", "empty"), ("z", "Alpha"), ("zz", "unused")]
TAG_POOL = ["t1", "t2", "t10", "T1", "a", "é", "", "🙂"]
NOTE_POOL = ["", " ", "a", "é", "x" * 40, "NULL", "\\N", "tab\there", "line\nbreak", "🙂🙂"]
UUID_POOL = [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.UUID("12345678-1234-5678-1234-567812345678"),
             uuid.UUID("f0000000-0000-4000-8000-000000000001")]
PRICE_EDGES = [Decimal("0.00"), Decimal("-0.01"), Decimal("0.01"), Decimal("1.50"), Decimal("-1.50"),
               Decimal("9999999999.99"), Decimal("-9999999999.99"), Decimal("NaN")]
SCORE_EDGES = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -1.0, 0.5, 2.0**24, -(2.0**24)]
RATIO_EDGES = [0.0, 0.1, 1 / 3, 1e-300, 5e-324, 999.999, 2.5e-5]
TS_EDGES = [
    datetime(2024, 3, 31, 0, 30, tzinfo=UTC),          # 01:30 CET, before the spring change
    datetime(2024, 3, 31, 1, 30, tzinfo=UTC),          # 03:30 CEST, after it
    datetime(2024, 10, 27, 0, 30, tzinfo=UTC),         # 02:30 CEST
    datetime(2024, 10, 27, 1, 30, tzinfo=UTC),         # 02:30 CET: the same wall time again
    datetime(2024, 3, 10, 1, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
    datetime(2024, 3, 10, 3, 0, tzinfo=timezone(timedelta(hours=-4))),
    datetime(2024, 11, 3, 1, 30, tzinfo=timezone(timedelta(hours=-4))),
    datetime(2024, 11, 3, 1, 30, tzinfo=timezone(timedelta(hours=-5))),
    datetime(2000, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=14))),    # one instant ...
    datetime(1999, 12, 31, 0, 0, tzinfo=timezone(timedelta(hours=-10))),  # ... two offsets
    datetime(2024, 6, 15, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
    datetime(2024, 1, 1, 23, 30, tzinfo=UTC),          # the next day in Berlin
]
DATE_EDGES = [date(2000, 2, 29), date(1900, 1, 1), date(2100, 12, 31), date(1999, 12, 31), date(2024, 3, 31)]
ID_EDGES = [0, 1, -1, 2, -2, 2**63 - 1, -(2**63), 2**31, -(2**31) - 1]


def split(items: list[Row], tags: list[Row], shards: int) -> list[Dataset]:
    """The rows each of ``shards`` shards holds: by the hash of id, as pgfleet routes them."""
    parts: list[Dataset] = [([], []) for _ in range(shards)]
    for row in items:
        parts[shard_of(row[0], "int8", shards)][0].append(row)
    for row in tags:
        parts[shard_of(row[0], "int8", shards)][1].append(row)
    return parts


# ---------------------------------------------------------------------------------------------
# The fixed dataset


def fixed_dataset(n: int = 2000, seed: int = 20240331) -> Dataset:
    rng = random.Random(seed)

    def maybe(value: Any, null: float = 0.1) -> Any:
        return None if rng.random() < null else value

    ids: set[int] = set(ID_EDGES)
    while len(ids) < n:
        ids.add(rng.randint(-10**6, 10**6) if rng.random() < 0.85 else rng.randint(-(2**63), 2**63 - 1))
    items: list[Row] = []
    for id_ in sorted(ids, key=lambda _: rng.random()):
        price = rng.choice(PRICE_EDGES) if rng.random() < 0.1 else \
            Decimal(rng.choice([rng.randint(-500, 500), rng.randint(-10**9, 10**9)])).scaleb(-2)
        score = rng.choice(SCORE_EDGES) if rng.random() < 0.15 else rng.randint(-(2**27), 2**27) / 8
        ratio = rng.choice(RATIO_EDGES) if rng.random() < 0.2 else rng.uniform(0, 1000)
        ts = rng.choice(TS_EDGES) if rng.random() < 0.3 else \
            datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(-10**9, 10**9),
                                                         microseconds=rng.choice([0, rng.randint(0, 999999)]))
        if rng.random() < 0.5:
            ts = ts.astimezone(rng.choice(OFFSETS))
        d = rng.choice(DATE_EDGES) if rng.random() < 0.2 else date(2000, 1, 1) + timedelta(days=rng.randint(-3000, 3000))
        u = rng.choice(UUID_POOL) if rng.random() < 0.5 else uuid.UUID(int=rng.getrandbits(128))
        note = rng.choice(NOTE_POOL) if rng.random() < 0.5 else \
            "".join(rng.choice("abcXYZ éü日🙂'\"\\,;") for _ in range(rng.randint(0, 12)))
        items.append((id_, maybe(rng.randint(-3, 9)), maybe(rng.choice(CAT_POOL)), maybe(price),
                      maybe(rng.randint(-100000, 100000) if rng.random() < 0.5 else rng.randint(-20, 20)),
                      maybe(score), maybe(ratio), maybe(rng.random() < 0.6), maybe(ts), maybe(d), maybe(u),
                      maybe(note, 0.2)))
    tags: list[Row] = []
    for row in items:
        for tag in rng.sample(TAG_POOL, rng.choice([0, 0, 1, 1, 2, 3])):
            tags.append((row[0], tag))
    return items, tags


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies


def _nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
_prices = st.one_of(st.sampled_from(PRICE_EDGES),
                    st.integers(-10**6, 10**6).map(lambda c: Decimal(c).scaleb(-2)))
_scores = st.one_of(st.sampled_from(SCORE_EDGES), st.integers(-(2**27), 2**27).map(lambda k: k / 8))
_ratios = st.one_of(st.sampled_from(RATIO_EDGES), st.floats(0, 1000))
_timestamps = st.one_of(
    st.sampled_from(TS_EDGES),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2040, 12, 31),
                 timezones=st.sampled_from(OFFSETS), allow_imaginary=False))
_dates = st.one_of(st.sampled_from(DATE_EDGES), st.dates(date(1900, 1, 1), date(2100, 12, 31)))


def _rows(ids: st.SearchStrategy[int]) -> st.SearchStrategy[Row]:
    return st.tuples(
        ids,
        _nullable(st.integers(-3, 4)),
        _nullable(st.sampled_from(CAT_POOL)),
        _nullable(_prices),
        _nullable(st.one_of(st.integers(-5, 5), st.integers(-100000, 100000))),
        _nullable(_scores),
        _nullable(_ratios),
        _nullable(st.booleans()),
        _nullable(_timestamps),
        _nullable(_dates),
        _nullable(st.one_of(st.sampled_from(UUID_POOL), st.uuids())),
        _nullable(st.one_of(st.sampled_from(NOTE_POOL), _text)),
    )


def _id_pools() -> dict[tuple[int, int], list[int]]:
    """Ids by (shard of 2, shard of 3): drawing from one pool puts every row on one shard of each fleet."""
    pools: dict[tuple[int, int], list[int]] = {}
    for value in [*range(-300, 300), *ID_EDGES]:
        pools.setdefault((shard_of(value, "int8", 2), shard_of(value, "int8", 3)), []).append(value)
    return pools


ID_POOLS = _id_pools()


@st.composite
def datasets(draw: st.DrawFn, max_rows: int = 25) -> Dataset:
    """Items (at least one) and their tags; about a third sit on one shard of each fleet."""
    if draw(st.integers(0, 2)) == 0:
        ids: st.SearchStrategy[int] = st.sampled_from(ID_POOLS[draw(st.sampled_from(sorted(ID_POOLS)))])
    else:
        ids = st.one_of(st.integers(-40, 40), st.sampled_from(ID_EDGES), st.integers(-(2**63), 2**63 - 1))
    items = draw(st.lists(_rows(ids), min_size=1, max_size=max_rows, unique_by=lambda row: row[0]))
    tags = [(row[0], tag) for row in items
            for tag in draw(st.lists(st.sampled_from(TAG_POOL), max_size=2, unique=True))]
    return items, tags
