"""The pure part of COPY into a sharded table: the statement's format, and rows with their
shard-key text however the client's data is cut into CopyData messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ClientError
from proxy.router.copyrows import RowSplitter, copy_in


def split(sql: str, key: int, data: bytes, cuts: list[int] | None = None) -> list[tuple[bytes, str | None, bool]]:
    spec = copy_in(sql)
    assert spec is not None
    splitter = RowSplitter(spec.format, key)
    rows = []
    start = 0
    for cut in sorted(set(cuts or [])) + [len(data)]:
        rows += splitter.feed(data[start:cut])
        start = cut
    return rows + splitter.feed(b"", final=True)


def test_copy_in_reads_the_statement() -> None:
    spec = copy_in("COPY public.users (name, user_id) FROM STDIN WITH CSV HEADER DELIMITER ';'")
    assert spec is not None
    assert (spec.table, spec.columns, spec.format.csv, spec.format.delimiter, spec.format.header,
            spec.format.null) == ("users", ("name", "user_id"), True, b";", True, b"")
    text = copy_in("copy users from stdin")
    assert text is not None
    assert (text.format.csv, text.format.delimiter, text.format.null, text.format.header) == (False, b"\t", b"\\N", False)
    assert copy_in("copy users to stdout") is None
    assert copy_in("copy users from '/tmp/x'") is None
    assert copy_in("select 1") is None
    binary = copy_in("copy users from stdin (format binary)")  # asyncpg's copy_records_to_table
    assert binary is not None and binary.format.binary and not binary.format.csv


def test_text_rows_escapes_null_and_the_end_marker() -> None:
    data = b"1\ta\\tb\n2\\\tx\tz\n\\N\tnull key\n\\x33\toctal and hex \\063\n\\.\nignored\n"
    rows = split("copy t from stdin", 0, data)
    assert [key for _, key, _ in rows] == ["1", "2\tx", None, "3"]
    assert b"".join(row for row, _, _ in rows) == data[:data.index(b"\\.")]
    assert [key for _, key, _ in split("copy t from stdin", 1, b"1\tk1\n2\tk2")] == ["k1", "k2"]


def test_csv_rows_quotes_newlines_header_and_null() -> None:
    data = b'id,name\n1,"a, ""b""\nc"\n"2",x\n,empty key\n""," quoted empty"\n'
    rows = split("copy t from stdin (format csv, header)", 0, data)
    assert rows[0] == (b"id,name\n", None, True)
    assert [key for _, key, _ in rows[1:]] == ["1", "2", None, ""]
    assert [key for _, key, _ in split("copy t from stdin (format csv)", 1, b'1,"x\ny"\n2,"z"""\n')] == ["x\ny", 'z"']
    escaped = split("copy t from stdin (format csv, escape '\\')", 1, b'1,"a\\"b"\n')
    assert [key for _, key, _ in escaped] == ['a"b']


def test_a_row_without_the_key_field_is_22p04() -> None:
    with pytest.raises(ClientError) as short:
        split("copy t from stdin", 2, b"1\ta\n")
    assert short.value.sqlstate == "22P04"


@given(st.lists(st.tuples(st.integers(-10**6, 10**6), st.text(alphabet=st.characters(blacklist_categories=["Cs"]),
                                                                max_size=8)), max_size=20),
       st.lists(st.integers(0, 400), max_size=10), st.booleans())
def test_rows_are_the_same_however_the_data_is_cut(rows: list[tuple[int, str]], cuts: list[int], csv: bool) -> None:
    if csv:
        data = b"".join(f'"{name.replace(chr(34), chr(34) * 2)}",{key}\n'.encode() for key, name in rows)
        sql = "copy t (name, id) from stdin (format csv)"
    else:
        def esc(s: str) -> str:
            return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        data = b"".join(f"{esc(name)}\t{key}\n".encode() for key, name in rows)
        sql = "copy t (name, id) from stdin"
    got = split(sql, 1, data, [c for c in cuts if c <= len(data)])
    assert [key for _, key, _ in got] == [str(key) for key, _ in rows]
    assert b"".join(row for row, _, _ in got) == data


def test_copy_out_writes_text_and_csv_as_postgresql_does() -> None:
    from proxy.router.copyrows import CopyOutWriter, copy_out
    from proxy.wire import messages as m
    description = m.message(m.ROW_DESCRIPTION, b"\0\2" + b"a\0" + b"\0" * 18 + b"b\0" + b"\0" * 18)[5:]
    rows = [[b"1", None], [b"x\ty\\z\nw", b""], [b'q"uote,', b"\\N"]]
    answer = [(m.ROW_DESCRIPTION, description)] + [(m.DATA_ROW, b"") for _ in rows] + [(m.COMMAND_COMPLETE, b"SELECT 3\0")]
    values = iter(rows)

    def convert(sql: str) -> list[tuple[int, bytes]]:
        spec = copy_out(sql)
        assert spec is not None
        nonlocal values
        values = iter(rows)
        return m.split(CopyOutWriter(spec).convert(answer, lambda _: next(values)))

    text = convert("copy t to stdout")
    assert text[0] == (ord("H"), b"\0\0\2\0\0\0\0")
    assert [body for kind, body in text if kind == ord("d")] == [b"1\t\\N\n", b"x\\ty\\\\z\\nw\t\n", b'q"uote,\t\\\\N\n']
    assert text[-2:] == [(ord("c"), b""), (ord("C"), b"COPY 3\0")]
    csv = convert("copy t to stdout (format csv, header)")
    assert [body for kind, body in csv if kind == ord("d")] == [
        b"a,b\n", b"1,\n", b'"x\ty\\z\nw",""\n', b'"q""uote,",\\N\n']
