"""The federated merger as a pure object: shards' messages in, one database's answer out."""

from __future__ import annotations

import struct
from decimal import Decimal

import pytest

from proxy.merge.merger import (
    MergeError,
    Merger,
    columns,
    data_row,
    fields,
    float_text,
    numeric_div,
)
from proxy.router.parse import fanout_plan
from proxy.wire import messages as m

INT8, INT4, NUMERIC, TEXT, FLOAT8, BOOL, TSTZ = 20, 23, 1700, 25, 701, 16, 1184


def description(*cols: tuple[str, int]) -> bytes:
    body = struct.pack("!h", len(cols))
    for name, oid in cols:
        body += name.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0)
    return body


def row(*values: object) -> bytes:
    return data_row([None if v is None else str(v).encode() for v in values])[5:]


def messages(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def values(data: bytes) -> list[list[str | None]]:
    return [[None if v is None else v.decode() for v in fields(body)] for kind, body in messages(data) if kind == "D"]


def tag(data: bytes) -> str:
    return [body for kind, body in messages(data) if kind == "C"][-1].rstrip(b"\0").decode()


def run(sql: str, cols: tuple[tuple[str, int], ...], shards: list[list[tuple[object, ...]]],
        **options: object) -> bytes:
    plan = fanout_plan(sql, {"t": "id"}, "SELECT")
    merger = Merger(plan, len(shards), **options)  # type: ignore[arg-type]
    out = b""
    for leg in range(len(shards)):
        merger.feed(leg, m.ROW_DESCRIPTION, description(*cols))
    for leg, rows in enumerate(shards):
        for r in rows:
            merger.feed(leg, m.DATA_ROW, row(*r))
        merger.feed(leg, m.COMMAND_COMPLETE, f"SELECT {len(rows)}\0".encode())
        out += merger.take()
    return out + merger.finish()


def test_plain_rows_are_concatenated_under_one_description() -> None:
    out = run("select id, name from t", (("id", INT8), ("name", TEXT)), [[(1, "a"), (3, "c")], [(2, "b")]])
    assert [k for k, _ in messages(out)] == ["T", "D", "D", "D", "C"]
    assert sorted(values(out)) == [["1", "a"], ["2", "b"], ["3", "c"]]
    assert tag(out) == "SELECT 3"


def test_order_by_merges_sorted_shards_and_strips_hidden_keys() -> None:
    # The shard query is "select name, id AS ?pgfleet_1 ... order by id desc": id is hidden.
    plan = fanout_plan("select name from t order by id desc nulls last", {"t": "id"}, "SELECT")
    assert plan.sql.endswith("ORDER BY id DESC NULLS LAST") and plan.hidden == 1
    cols = (("name", TEXT), ("?pgfleet_1", INT8))
    out = run("select name from t order by id desc nulls last", cols,
              [[("e", 5), ("b", 2), ("x", None)], [("d", 4), ("c", 3), ("a", 1)]])
    assert values(out) == [["e"], ["d"], ["c"], ["b"], ["a"], ["x"]]
    assert columns(messages(out)[0][1])[0][0] == b"name" and len(columns(messages(out)[0][1])) == 1


def test_order_by_streams_rows_before_every_shard_is_done() -> None:
    plan = fanout_plan("select id from t order by id", {"t": "id"}, "SELECT")
    merger = Merger(plan, 2)
    for leg in (0, 1):
        merger.feed(leg, m.ROW_DESCRIPTION, description(("id", INT8)))
    merger.feed(0, m.DATA_ROW, row(1))
    merger.feed(0, m.DATA_ROW, row(4))
    assert values(merger.take()) == []  # shard 1 may still send something smaller
    merger.feed(1, m.DATA_ROW, row(2))
    assert values(merger.take()) == [["1"], ["2"]]
    assert merger.buffered(0) == 1 and merger.buffered(1) == 0
    merger.feed(1, m.COMMAND_COMPLETE, b"SELECT 1\0")
    assert values(merger.take()) == [["4"]]


def test_limit_and_offset_apply_once_after_the_merge() -> None:
    plan = fanout_plan("select id from t order by id limit 2 offset 3", {"t": "id"}, "SELECT")
    assert plan.sql.endswith("LIMIT 5") and "OFFSET" not in plan.sql
    out = run("select id from t order by id limit 2 offset 3", (("id", INT8),),
              [[(1,), (3,), (5,), (7,)], [(2,), (4,), (6,)]])
    assert values(out) == [["4"], ["5"]] and tag(out) == "SELECT 2"


@pytest.mark.parametrize(("keys", "expected"), [
    ("score", ["-Infinity", "-1.5", "0", "2", "Infinity", "NaN", None]),
    ("score desc", [None, "NaN", "Infinity", "2", "0", "-1.5", "-Infinity"]),
    ("score nulls first", [None, "-Infinity", "-1.5", "0", "2", "Infinity", "NaN"]),
])
def test_float_order_puts_nan_above_infinity(keys: str, expected: list[str | None]) -> None:
    first = {"-Infinity", "0", "Infinity", None}  # each shard sends its rows in the query's order
    shards = [[(v,) for v in expected if v in first], [(v,) for v in expected if v not in first]]
    out = run(f"select score from t order by {keys}", (("score", FLOAT8),), shards)
    assert [v[0] for v in values(out)] == expected


def test_numeric_and_timestamptz_keys_are_compared_as_values() -> None:
    out = run("select n from t order by n", (("n", NUMERIC),), [[("10.5",), ("100",)], [("-3",), ("9.99",)]])
    assert [v[0] for v in values(out)] == ["-3", "9.99", "10.5", "100"]
    stamps = [("2024-03-10 01:30:00-05",), ("2024-03-10 03:15:00-04",)], [("2024-03-10 06:20:00+00",)]
    out = run("select ts from t order by ts", (("ts", TSTZ),), [sorted(stamps[0]), stamps[1]])
    assert [v[0] for v in values(out)] == ["2024-03-10 06:20:00+00", "2024-03-10 01:30:00-05",
                                             "2024-03-10 03:15:00-04"]


def test_aggregates_combine_per_group() -> None:
    sql = "select grp, count(*), sum(qty), min(name), max(name), avg(qty), bool_and(ok) from t group by grp"
    plan = fanout_plan(sql, {"t": "id"}, "SELECT")
    cols = (("grp", INT4), ("count", INT8), ("sum", INT8), ("min", TEXT), ("max", TEXT), ("avg", INT8),
            ("?pgfleet_1", INT8), ("bool_and", BOOL))
    assert plan.sql.startswith("SELECT grp, count(*) AS \"count\", sum(qty) AS \"sum\"")
    out = run(sql, cols, [[(1, 2, 3, "b", "c", 3, 2, "t"), (None, 1, 5, "z", "z", 5, 1, "t")],
                          [(1, 1, 0, "a", "a", 0, 1, "f")], []])
    assert sorted(values(out), key=str) == sorted([
        ["1", "3", "3", "a", "c", "1.00000000000000000000", "f"],
        [None, "1", "5", "z", "z", "5.0000000000000000", "t"]], key=str)
    avg = columns(messages(out)[0][1])[5]
    assert avg[0] == b"avg" and struct.unpack_from("!I", avg[1], 6)[0] == NUMERIC


def test_aggregates_without_group_by_answer_one_row_even_with_no_rows() -> None:
    out = run("select count(*), sum(qty), max(name) from t", (("count", INT8), ("sum", INT8), ("max", TEXT)),
              [[(0, None, None)], [(0, None, None)]])
    assert values(out) == [["0", None, None]]
    out = run("select count(*) from t group by grp", (("count", INT8), ("?pgfleet_1", INT4)), [[], []])
    assert values(out) == [] and tag(out) == "SELECT 0"


def test_having_order_and_limit_run_after_the_groups_combine() -> None:
    sql = "select grp, count(*) from t group by grp having sum(qty) > 10 order by 2 desc, grp limit 2"
    cols = (("grp", INT4), ("count", INT8), ("?pgfleet_1", INT8))
    plan = fanout_plan(sql, {"t": "id"}, "SELECT")
    assert "HAVING" not in plan.sql and "LIMIT" not in plan.sql
    out = run(sql, cols, [[(1, 1, 6), (2, 5, 1), (3, 2, 20)], [(1, 1, 6), (2, 1, 1), (4, 9, 50)]])
    assert values(out) == [["4", "9"], ["1", "2"]]  # group 2 fails HAVING; 1 and 3 tie on count


def test_distinct_removes_rows_that_two_shards_both_have() -> None:
    out = run("select distinct name from t order by name", (("name", TEXT),), [[("a",), ("b",)], [("a",), ("c",)]])
    assert values(out) == [["a"], ["b"], ["c"]]


def test_shards_that_describe_different_rows_fail_the_query() -> None:
    plan = fanout_plan("select * from t", {"t": "id"}, "SELECT")
    merger = Merger(plan, 2)
    merger.feed(0, m.ROW_DESCRIPTION, description(("id", INT8)))
    with pytest.raises(MergeError) as err:
        merger.feed(1, m.ROW_DESCRIPTION, description(("id", INT8), ("extra", TEXT)))
    assert err.value.sqlstate == "42804" and "different row descriptions" in err.value.message


def test_sort_keys_of_types_pgfleet_cannot_compare_are_refused() -> None:
    plan = fanout_plan("select d from t order by d", {"t": "id"}, "SELECT")
    merger = Merger(plan, 2)
    with pytest.raises(MergeError) as err:
        merger.feed(0, m.ROW_DESCRIPTION, description(("d", 1186)))
    assert err.value.sqlstate == "0A000" and "interval" in err.value.message


def test_text_keys_need_a_byte_order_collation() -> None:
    plan = fanout_plan("select name from t order by name", {"t": "id"}, "SELECT")
    with pytest.raises(MergeError) as err:
        Merger(plan, 2, text_order=False).feed(0, m.ROW_DESCRIPTION, description(("name", TEXT)))
    assert "C collation" in err.value.message


@pytest.mark.parametrize(("value", "text"), [
    (1.0, "1"), (0.1, "0.1"), (-0.0, "-0"), (1e15, "1e+15"), (123456789012345.0, "123456789012345"),
    (1e-4, "0.0001"), (1e-5, "1e-05"), (1.5e-7, "1.5e-07"), (2.5e100, "2.5e+100"), (float("nan"), "NaN"),
    (float("-inf"), "-Infinity"), (100.0, "100"), (1.25, "1.25"),
])
def test_float_text_is_postgresql_float8out(value: float, text: str) -> None:
    assert float_text(value) == text.encode()


@pytest.mark.parametrize(("total", "count", "text"), [
    (3, 2, "1.5000000000000000"), (3, 3, "1.00000000000000000000"), (10, 3, "3.3333333333333333"),
    (-7, 2, "-3.5000000000000000"), (Decimal("12.50"), 4, "3.1250000000000000"), (0, 5, "0.00000000000000000000"),
])
def test_numeric_division_has_postgresql_scale(total: object, count: int, text: str) -> None:
    assert format(numeric_div(Decimal(total), count), "f") == text  # type: ignore[arg-type]


def test_several_hidden_sort_keys_keep_their_order() -> None:
    # select * hides every key: ORDER BY b, a must not merge as ORDER BY a, b.
    plan = fanout_plan("select * from t order by b, a", {"t": "id"}, "SELECT")
    assert plan.hidden == 2 and [k.column for k in plan.order] == [-2, -1]
    cols = (("a", INT8), ("b", INT8), ("?pgfleet_1", INT8), ("?pgfleet_2", INT8))
    out = run("select * from t order by b, a", cols, [[(2, 1, 1, 2), (1, 3, 3, 1)], [(9, 2, 2, 9)]])
    assert values(out) == [["2", "1"], ["9", "2"], ["1", "3"]]


def test_plain_fan_outs_pass_whole_runs_of_rows_and_stop_at_the_limit() -> None:
    plan = fanout_plan("select id from t limit 3", {"t": "id"}, "SELECT")
    merger = Merger(plan, 2)
    for leg in (0, 1):
        merger.feed(leg, m.ROW_DESCRIPTION, description(("id", INT8)))
    assert merger.passthrough
    merger.pass_rows(data_row([b"1"]) + data_row([b"2"]), 2)
    merger.pass_rows(data_row([b"3"]) + data_row([b"4"]), 2)  # only one of these fits
    merger.pass_rows(data_row([b"5"]), 1)
    assert values(merger.take()) == [["1"], ["2"], ["3"]] and merger.full
