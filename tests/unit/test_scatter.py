"""Combining several databases' answers to one statement into one answer (pure)."""

from __future__ import annotations

import struct

import pytest

from proxy.frontend.scatter import ScatterError, _combine, _responses
from proxy.wire import messages as m


def description(table_oid: int, type_oid: int = 23, name: bytes = b"n") -> bytes:
    return struct.pack("!h", 1) + name + b"\0" + struct.pack("!IhIhih", table_oid, 1, type_oid, 4, -1, 0)


def answer(*messages: bytes) -> list[list[tuple[int, bytes]]]:
    return _responses(b"".join(messages) + m.ready_for_query(73))


def row(value: bytes) -> bytes:
    return m.message(m.DATA_ROW, struct.pack("!hi", 1, len(value)) + value)


def kinds(data: bytes) -> list[str]:
    return [chr(k) for k, _ in _responses(data + m.ready_for_query(73))[0]]


def test_counts_are_summed_and_rows_concatenated_under_one_description() -> None:
    a = answer(m.message(m.ROW_DESCRIPTION, description(111)), row(b"1"), m.command_complete("UPDATE 1"))
    b = answer(m.message(m.ROW_DESCRIPTION, description(222)), row(b"2"), row(b"3"),
               m.command_complete("UPDATE 2"))
    out = _combine({"primary": a, "secondary": b})
    assert kinds(out) == ["T", "D", "D", "D", "C"]
    assert out.endswith(m.command_complete("UPDATE 3"))


@pytest.mark.parametrize(("tags", "expected"), [
    (("INSERT 0 2", "INSERT 0 5"), "INSERT 0 7"),
    (("DELETE 0", "DELETE 4"), "DELETE 4"),
    (("CREATE INDEX", "CREATE INDEX"), "CREATE INDEX"),
])
def test_command_tags(tags: tuple[str, str], expected: str) -> None:
    out = _combine({"a": answer(m.command_complete(tags[0])), "b": answer(m.command_complete(tags[1]))})
    assert out == m.command_complete(expected)


def test_a_replicated_write_reports_one_copy() -> None:
    out = _combine({"a": answer(m.command_complete("UPDATE 1")), "b": answer(m.command_complete("UPDATE 1"))},
                   replicated=True)
    assert out == m.command_complete("UPDATE 1")


def test_different_columns_are_an_error_not_a_mixed_result() -> None:
    a = answer(m.message(m.ROW_DESCRIPTION, description(1, 23)), m.command_complete("DELETE 0"))
    b = answer(m.message(m.ROW_DESCRIPTION, description(1, 25)), m.command_complete("DELETE 0"))
    with pytest.raises(ScatterError) as err:
        _combine({"a": a, "b": b})
    assert err.value.sqlstate == "42804"


def extended(*messages: bytes) -> list[list[tuple[int, bytes]]]:
    """A backend's answer to Parse, Bind, Describe (portal), Execute, Sync."""
    return answer(m.PARSE_COMPLETE_MSG, m.BIND_COMPLETE_MSG, *messages)


@pytest.mark.parametrize("describe", [True, False])
def test_an_execute_answers_the_portal_description_only_when_asked(describe: bool) -> None:
    a = extended(m.message(m.ROW_DESCRIPTION, description(1)), row(b"1"), m.command_complete("DELETE 1"))
    b = extended(m.message(m.ROW_DESCRIPTION, description(2)), m.command_complete("DELETE 0"))
    out = _combine({"a": a, "b": b}, describe=describe)
    assert kinds(out) == (["T"] if describe else []) + ["D", "C"]  # never Parse/BindComplete again
    assert out.endswith(m.command_complete("DELETE 1"))


def test_an_execute_without_rows_answers_nodata_when_described() -> None:
    a = extended(m.NO_DATA_MSG, m.command_complete("UPDATE 2"))
    b = extended(m.NO_DATA_MSG, m.command_complete("UPDATE 3"))
    assert kinds(_combine({"a": a, "b": b}, describe=True)) == ["n", "C"]
    assert _combine({"a": a, "b": b}, describe=False) == m.command_complete("UPDATE 5")


def test_a_describe_without_execute_answers_the_description_alone() -> None:
    with_rows = extended(m.message(m.ROW_DESCRIPTION, description(1)))
    assert _combine({"a": with_rows}, describe=True) == m.message(m.ROW_DESCRIPTION, description(1))
    assert _combine({"a": extended(m.NO_DATA_MSG)}, describe=True) == m.NO_DATA_MSG
