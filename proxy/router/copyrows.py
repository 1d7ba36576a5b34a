"""COPY into and out of a sharded table, the pure part: what the statement asks (table,
columns, format; ``parse.py`` reads it), the rows of the client's COPY FROM STDIN data, each
with its shard-key text, and a merged SELECT's answer written as COPY TO STDOUT's. Pure.

Rows are split as PostgreSQL reads them: text format ends a row at each newline (a newline
inside a value is written ``\\n``), CSV at a newline outside quotes. Only the shard-key field
of each row is decoded; the row goes to its shard as it came.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BAD_COPY_FILE_FORMAT, FEATURE_NOT_SUPPORTED, ClientError
from .parse import copy_from_stdin, copy_to_stdout


@dataclass(frozen=True)
class CopyFormat:
    """How COPY writes rows: text or CSV, and the options of either."""

    csv: bool
    delimiter: bytes
    null: bytes
    quote: bytes
    escape: bytes
    header: bool
    binary: bool = False


def copy_format(options: dict[str, str | bool]) -> CopyFormat:
    """A COPY's format from its options (already checked to be text or csv)."""
    fmt = str(options.get("format", "text")).lower()
    csv = fmt == "csv"
    quote = str(options.get("quote", '"')).encode()
    return CopyFormat(csv=csv, delimiter=str(options.get("delimiter", "," if csv else "\t")).encode(),
                      null=str(options.get("null", "" if csv else "\\N")).encode(), quote=quote,
                      escape=str(options.get("escape", quote.decode())).encode(),
                      header=options.get("header", False) not in (False, "false", "off", "0"), binary=fmt == "binary")


@dataclass(frozen=True)
class CopyIn:
    """A COPY FROM STDIN: its table, its column list (empty: all, in table order), its format."""

    table: str
    columns: tuple[str, ...]
    format: CopyFormat


def copy_in(sql: str) -> CopyIn | None:
    """The COPY FROM STDIN of ``sql``; None if it is not one. Formats pgfleet cannot split
    are refused here."""
    found = copy_from_stdin(sql)
    if found is None:
        return None
    table, columns, options = found
    fmt = str(options.get("format", "text")).lower()
    if fmt not in ("text", "csv", "binary"):
        raise ClientError(FEATURE_NOT_SUPPORTED, f"COPY {fmt.upper()} into a sharded table is not supported: "
                          "pgfleet reads each row's shard key", hint="use FORMAT text, csv or binary")
    return CopyIn(table=table, columns=columns, format=copy_format(options))


_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


class BinaryRowSplitter:
    """Cuts binary COPY data (PostgreSQL's file format) into tuples as it arrives and reads
    each tuple's field ``key_index``: ``(tuple bytes, key bytes or None for NULL, broadcast)``;
    the header and the trailer are broadcast, every shard's COPY needs its own."""

    binary = True

    def __init__(self, key_index: int) -> None:
        self.key_index = key_index
        self.rest = b""
        self.started = False  # the header was read
        self.ended = False    # the trailer (-1) was read

    def feed(self, data: bytes, final: bool = False) -> list[tuple[bytes, bytes | None, bool]]:
        buffer = self.rest + data
        out: list[tuple[bytes, bytes | None, bool]] = []
        pos = 0
        n = len(buffer)
        if not self.started:
            if n < 19:
                return self._keep(buffer, 0, final, out)
            if buffer[:11] != _SIGNATURE:
                raise ClientError(BAD_COPY_FILE_FORMAT, "COPY file signature not recognized")
            end = 19 + int.from_bytes(buffer[15:19], "big")
            if n < end:
                return self._keep(buffer, 0, final, out)
            out.append((buffer[:end], None, True))
            self.started = True
            pos = end
        while not self.ended and n - pos >= 2:
            count = int.from_bytes(buffer[pos:pos + 2], "big", signed=True)
            if count == -1:
                out.append((buffer[pos:pos + 2], None, True))
                self.ended = True
                pos += 2
                break
            if count <= self.key_index:
                raise ClientError(BAD_COPY_FILE_FORMAT, f"row field count is {count}, expected more than "
                                  f"{self.key_index} (the shard key's place)")
            at = pos + 2
            key: bytes | None = None
            complete = True
            for field in range(count):
                if n - at < 4:
                    complete = False
                    break
                length = int.from_bytes(buffer[at:at + 4], "big", signed=True)
                at += 4
                if length > 0:
                    if n - at < length:
                        complete = False
                        break
                    if field == self.key_index:
                        key = buffer[at:at + length]
                    at += length
                elif length == 0 and field == self.key_index:
                    key = b""
            if not complete:
                break
            out.append((buffer[pos:at], key, False))
            pos = at
        return self._keep(buffer, pos, final, out)

    def _keep(self, buffer: bytes, pos: int, final: bool, out: list[tuple[bytes, bytes | None, bool]]
              ) -> list[tuple[bytes, bytes | None, bool]]:
        self.rest = buffer[pos:]
        if final and self.rest and not self.ended:
            raise ClientError(BAD_COPY_FILE_FORMAT, "unexpected EOF in COPY data")
        return out


class RowSplitter:
    """Cuts COPY data into rows as it arrives and reads each row's field ``key_index``."""

    def __init__(self, spec: CopyFormat, key_index: int) -> None:
        self.spec = spec
        self.key_index = key_index
        self.rest = b""        # an incomplete row, carried to the next chunk
        self.header = spec.header
        self.ended = False     # the text format's end marker \. was read

    def feed(self, data: bytes, final: bool = False) -> list[tuple[bytes, str | None, bool]]:
        """Whole rows of ``rest + data``: (row bytes with its newline, key text or None for
        NULL, is_header). ``final``: the data ended, a last row without newline counts."""
        buffer = self.rest + data
        rows: list[tuple[bytes, str | None, bool]] = []
        start = 0
        while not self.ended:
            end = self._row_end(buffer, start)
            if end < 0:
                if final and start < len(buffer):
                    end = len(buffer)
                else:
                    break
            row = buffer[start:end + 1] if end < len(buffer) else buffer[start:] + b"\n"
            start = end + 1
            line = row.rstrip(b"\n").rstrip(b"\r")
            if not self.spec.csv and line == b"\\.":
                self.ended = True
                break
            if self.header:
                self.header = False
                rows.append((row, None, True))
                continue
            rows.append((row, self._key(line), False))
        self.rest = b"" if self.ended else buffer[start:]
        return rows

    def _row_end(self, buffer: bytes, start: int) -> int:
        if not self.spec.csv:
            return buffer.find(b"\n", start)
        return self._unquoted(buffer, start, 10)  # "\n" outside quotes

    def _unquoted(self, data: bytes, i: int, stop: int) -> int:
        """The first ``stop`` byte at or after ``i`` outside CSV quotes; -1 if none."""
        quote, escape = self.spec.quote[0], self.spec.escape[0]
        quoted = False
        n = len(data)
        while i < n:
            byte = data[i]
            if quoted:
                if byte == escape and escape != quote and i + 1 < n and data[i + 1] in (quote, escape):
                    i += 2
                    continue
                if byte == quote:
                    quoted = False
            elif byte == quote:
                quoted = True
            elif byte == stop:
                return i
            i += 1
        return -1

    def _key(self, line: bytes) -> str | None:
        raw, quoted = self._field(line, self.key_index)
        if raw is None:
            raise ClientError(BAD_COPY_FILE_FORMAT, f"missing data for column {self.key_index + 1} (the shard key) in a COPY row",
                              hint="every row needs a value for each column of the COPY")
        if not quoted and raw == self.spec.null:
            return None
        if self.spec.csv:
            return raw.decode(errors="replace")
        return _unescape(raw).decode(errors="replace")

    def _field(self, line: bytes, index: int) -> tuple[bytes | None, bool]:
        """Field ``index`` of a row, as written but unquoted (CSV), and whether it was quoted."""
        delimiter = self.spec.delimiter[0]
        field = 0
        i = 0
        n = len(line)
        while field < index:  # skip to the start of the field
            if i >= n:
                return None, False
            i = self._skip(line, i, delimiter)
            if i >= n:
                return None, False
            i += 1  # the delimiter
            field += 1
        end = self._skip(line, i, delimiter)
        raw = line[i:end]
        if self.spec.csv and raw[:1] == self.spec.quote:
            quote, escape = self.spec.quote, self.spec.escape
            inner = raw[1:-1] if len(raw) > 1 and raw.endswith(quote) else raw[1:]
            return inner.replace(escape + quote, quote).replace(escape + escape, escape), True
        return raw, False

    def _skip(self, line: bytes, i: int, delimiter: int) -> int:
        """The position of the delimiter (or the end) that ends the field starting at ``i``."""
        n = len(line)
        if self.spec.csv:
            end = self._unquoted(line, i, delimiter)
            return n if end < 0 else end
        while i < n:
            byte = line[i]
            if byte == 92:  # a backslash escapes the next byte, a delimiter too
                i += 2
                continue
            if byte == delimiter:
                return i
            i += 1
        return n


_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("v"): b"\v"}


def _unescape(raw: bytes) -> bytes:
    """A text-format COPY value's backslash sequences, as PostgreSQL reads them."""
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        byte = raw[i]
        if byte != 92 or i + 1 >= n:
            out.append(byte)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt]
            i += 2
        elif 48 <= nxt <= 55:  # \ooo octal
            j = i + 1
            while j < n and j < i + 4 and 48 <= raw[j] <= 55:
                j += 1
            out.append(int(raw[i + 1:j], 8) & 0xFF)
            i = j
        elif nxt == ord("x") and i + 2 < n and chr(raw[i + 2]) in "0123456789abcdefABCDEF":
            j = i + 2
            while j < n and j < i + 4 and chr(raw[j]) in "0123456789abcdefABCDEF":
                j += 1
            out.append(int(raw[i + 2:j], 16))
            i = j
        else:
            out.append(nxt)
            i += 2
    return bytes(out)


@dataclass(frozen=True)
class CopyOut:
    """A COPY ... TO STDOUT of a sharded table: the SELECT it stands for and its format."""

    select: str
    format: CopyFormat


def copy_out(sql: str) -> CopyOut | None:
    """The COPY TO STDOUT of ``sql`` as a SELECT pgfleet can fan out; None if it is not one."""
    found = copy_to_stdout(sql)
    if found is None:
        return None
    select, options = found
    fmt = str(options.get("format", "text")).lower()
    if fmt not in ("text", "csv") or set(options) - {"format", "delimiter", "null", "header", "quote", "escape"}:
        raise ClientError(FEATURE_NOT_SUPPORTED, f"COPY TO STDOUT of a sharded table supports FORMAT text and "
                          f"csv with DELIMITER, NULL, HEADER, QUOTE and ESCAPE (got {', '.join(sorted(options))})",
                          hint="COPY from each shard's database by name for other options")
    return CopyOut(select=select, format=copy_format(options))


class CopyOutWriter:
    """Turns a merged SELECT's answer (RowDescription, DataRows in text, CommandComplete)
    into COPY TO STDOUT's (CopyOutResponse, a CopyData per row, CopyDone, COPY n)."""

    def __init__(self, spec: CopyOut) -> None:
        self.spec = spec.format

    def convert(self, messages: list[tuple[int, bytes]], row_values: Any) -> bytes:
        out = []
        for kind, body in messages:
            if kind == ord("T"):  # RowDescription
                count = int.from_bytes(body[:2], "big")
                out.append(_message(ord("H"), b"\0" + count.to_bytes(2, "big") + b"\0\0" * count))  # CopyOutResponse
                if self.spec.header:
                    out.append(_message(ord("d"), self._line(_names(body))))
            elif kind == ord("D"):
                out.append(_message(ord("d"), self._line(row_values(body))))
            elif kind == ord("C") and body.startswith(b"SELECT "):
                out.append(_message(ord("c"), b""))  # CopyDone
                out.append(_message(kind, b"COPY " + body[7:]))
            else:
                out.append(_message(kind, body))
        return b"".join(out)

    def _line(self, values: list[bytes | None]) -> bytes:
        spec = self.spec
        fields = []
        for value in values:
            if value is None:
                fields.append(spec.null)
            elif spec.csv:
                special = (spec.delimiter in value or spec.quote in value or b"\n" in value or b"\r" in value
                           or value == spec.null or value == b"")
                fields.append(spec.quote + value.replace(spec.quote, spec.escape + spec.quote) + spec.quote
                              if special else value)
            else:
                fields.append(_escape(value, spec.delimiter))
        return spec.delimiter.join(fields) + b"\n"


def _escape(value: bytes, delimiter: bytes) -> bytes:
    """A value in COPY's text format: backslash, newline, carriage return, tab and the delimiter escaped."""
    if not any(c in value for c in (b"\\", b"\n", b"\r", b"\t", delimiter)):
        return value
    value = value.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r").replace(b"\t", b"\\t")
    return value.replace(delimiter, b"\\" + delimiter) if delimiter != b"\t" else value


def _names(description: bytes) -> list[bytes | None]:
    count = int.from_bytes(description[:2], "big")
    names: list[bytes | None] = []
    pos = 2
    for _ in range(count):
        end = description.index(b"\0", pos)
        names.append(description[pos:end])
        pos = end + 1 + 18
    return names


def _message(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + (len(body) + 4).to_bytes(4, "big") + body
