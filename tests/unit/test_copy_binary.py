"""Binary COPY FROM STDIN split by shard (asyncpg's copy_records_to_table sends it): the
splitter cuts PostgreSQL's binary file format into header, tuples and trailer however the
client's CopyData messages cut it, and reads each tuple's shard-key field."""

from __future__ import annotations

import struct

import pytest

from proxy.errors import ClientError
from proxy.router.copyrows import BinaryRowSplitter

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)


def row(*fields: bytes | None) -> bytes:
    out = struct.pack("!h", len(fields))
    for field in fields:
        out += struct.pack("!i", -1) if field is None else struct.pack("!i", len(field)) + field
    return out


ROWS = [row(struct.pack("!q", n), f"name {n}".encode()) for n in range(1, 6)] + [row(None, b"x")]
STREAM = HEADER + b"".join(ROWS) + TRAILER


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 19, 20, len(STREAM)])
def test_tuples_come_out_whole_whatever_the_chunks(chunk: int) -> None:
    splitter = BinaryRowSplitter(0)
    out = []
    for start in range(0, len(STREAM), chunk):
        out += splitter.feed(STREAM[start:start + chunk])
    out += splitter.feed(b"", final=True)
    assert [item[0] for item in out] == [HEADER, *ROWS, TRAILER]
    assert [item[2] for item in out] == [True] + [False] * len(ROWS) + [True]  # header, trailer: every shard
    assert [item[1] for item in out[1:-1]] == [struct.pack("!q", n) for n in range(1, 6)] + [None]


def test_the_key_may_be_a_later_field() -> None:
    splitter = BinaryRowSplitter(1)
    out = splitter.feed(HEADER + row(b"a", b"key") + TRAILER, final=True)
    assert out[1][1] == b"key"


def test_a_bad_signature_and_a_cut_stream_are_refused() -> None:
    with pytest.raises(ClientError, match="signature"):
        BinaryRowSplitter(0).feed(b"NOTCOPY" + b"\0" * 20)
    splitter = BinaryRowSplitter(0)
    splitter.feed(HEADER + ROWS[0][:5])
    with pytest.raises(ClientError, match="unexpected EOF"):
        splitter.feed(b"", final=True)
    with pytest.raises(ClientError, match="field count"):
        BinaryRowSplitter(3).feed(HEADER + ROWS[0])
