"""The audit log: one JSON line (and/or one row of ``pgfleet.audit``) per statement.

This module owns the queue between the sessions and the audit sinks, the writer task that
empties it, the line format, the file's rotation and the table. The calling side is
``AuditLog.record``: it appends a tuple to a bounded deque and nothing else, so it never
formats, parses, does I/O or waits; when the deque is full the statement is dropped and
counted (``dropped``), and a warning says so at most every ``WARN_INTERVAL`` seconds. It must
never block a client, and it never writes a literal of a statement in ``normalized`` mode.

Theory of operation. The writer looks at the queue every ``LINGER`` seconds (so a batch
gathers, and ``record`` need not wake anything) and hands up to ``BATCH`` statements to one
worker thread, which normalises them (``router.parse.normalized``), builds the lines and rows
and appends the lines to the file; the rows then go to the table by ``COPY`` on the event
loop. A sink that fails (disk full, database down) rests for ``audit.retry_interval`` and is
tried again; one line is logged when it fails and one when it works again. While at least one
sink works, batches flow and each statement some sink did not take counts in ``dropped``;
while none works the writer stops taking from the queue, so the queue fills and ``record``
drops and counts. ``written`` counts statements every configured sink took; ``written +
dropped + queued`` is every statement recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any

import asyncpg
import msgspec

from ..backend.catalog import connect
from ..config import Audit, Dsn
from ..errors import ConfigError
from ..router.parse import fingerprinted, normalized

log = logging.getLogger("pgfleet.audit")

LINGER = 0.05          # seconds between the writer's looks at an empty queue
BATCH = 1000           # statements per batch (one thread hop, one write, one COPY)
WARN_INTERVAL = 10.0   # at most one "queue full" warning this often
CONNECT_TIMEOUT = 5.0  # the table's database: connecting
COPY_TIMEOUT = 10.0    # ... and one batch's COPY

# (key, client, databases, route, started, duration, rows, sqlstate, statement): what record keeps.
Entry = tuple[str, str, tuple[str, ...], str, float, float, int | None, str | None, str]

TABLE_DDL = """
CREATE SCHEMA IF NOT EXISTS pgfleet;
CREATE TABLE IF NOT EXISTS pgfleet.audit (
    time timestamptz NOT NULL,
    key text NOT NULL,
    client text NOT NULL,
    databases text[] NOT NULL,
    route text NOT NULL,
    duration_ms double precision NOT NULL,
    rows bigint,
    sqlstate text,
    statement text,
    fingerprint text
);
CREATE INDEX IF NOT EXISTS audit_time ON pgfleet.audit USING brin (time)
"""
COLUMNS = ("time", "key", "client", "databases", "route", "duration_ms", "rows", "sqlstate",
           "statement", "fingerprint")
_TABLE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Line(msgspec.Struct, frozen=True):
    """One audit line; the fields in the order they are written."""

    time: str                 # ISO 8601, UTC, milliseconds: 2024-05-01T12:00:00.123Z
    key: str                  # the key id the client logged in with
    client: str               # the client's address
    databases: tuple[str, ...]
    route: str                # the route kind
    duration_ms: float
    rows: int | None
    sqlstate: str | None      # None: it succeeded
    statement: str | None     # per audit.statements; None with "none"
    fingerprint: str | None   # pglast's fingerprint; None with "none" or when it does not parse


_encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------------------------------------
# Lines and rows (built in the writer's thread)


def line_of(entry: Entry, statements: str) -> Line:
    """The audit line for one recorded statement, with its text as ``statements`` says."""
    key, client, databases, route, started, duration, rows, sqlstate, sql = entry
    if statements == "normalized":
        text, signature = normalized(sql)
    elif statements == "full":
        text, signature = sql, fingerprinted(sql)
    else:
        text, signature = None, None
    return Line(time=iso_time(started), key=key, client=client, databases=databases, route=route,
                duration_ms=round(duration * 1000.0, 3), rows=rows, sqlstate=sqlstate,
                statement=text, fingerprint=signature)


def iso_time(started: float) -> str:
    moment = dt.datetime.fromtimestamp(started, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row_of(line: Line, started: float) -> tuple[Any, ...]:
    """The ``pgfleet.audit`` row of a line (``COLUMNS``' order)."""
    return (dt.datetime.fromtimestamp(started, dt.UTC), line.key, line.client, list(line.databases),
            line.route, line.duration_ms, line.rows, line.sqlstate, line.statement, line.fingerprint)


# ---------------------------------------------------------------------------------------------
# Sinks


class RotatingFile:
    """JSON lines appended to ``path``; past ``max_bytes`` it becomes ``path.1`` (``path.1`` becomes
    ``path.2``, ... up to ``backups``) and a new file starts, as logging's RotatingFileHandler does.

    Written by hand rather than through RotatingFileHandler because that one wants LogRecords, a
    formatter and its own lock for what is here a batch of bytes from one thread. Only the
    writer's thread calls it; every method may raise OSError.
    """

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: Any = None
        self._size = 0

    def open(self) -> None:
        if self._file is not None:
            return
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        # 0600: the lines name keys and clients, and in "full" mode carry whatever was sent.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)
        self._size = os.fstat(fd).st_size

    def write(self, lines: Sequence[bytes]) -> None:
        """Append ``lines`` (each ending in a newline), rotating between lines as needed."""
        self.open()
        chunk: list[bytes] = []
        size = self._size
        for line in lines:
            if self.max_bytes and size > 0 and size + len(line) > self.max_bytes:
                self._write(chunk)
                chunk = []
                self._rotate()
                size = 0
            chunk.append(line)
            size += len(line)
        self._write(chunk)

    def _write(self, chunk: list[bytes]) -> None:
        if chunk:
            data = b"".join(chunk)
            self._file.write(data)
            self._size += len(data)

    def _rotate(self) -> None:
        self.close()
        names = [self.path] + [f"{self.path}.{i}" for i in range(1, self.backups + 1)]
        with contextlib.suppress(FileNotFoundError):  # the oldest goes (the only one if no backups)
            os.remove(names[-1])
        for i in range(self.backups, 0, -1):  # path.2 -> path.3, path.1 -> path.2, path -> path.1
            if os.path.exists(names[i - 1]):
                os.replace(names[i - 1], names[i])
        self.open()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


class AuditTable:
    """Rows in ``pgfleet.audit`` of one configured database, over one asyncpg connection that
    is made (and the table created) on first use and after a failure."""

    def __init__(self, database: str, dsn_of: Callable[[str], Dsn]) -> None:
        self.database = database
        self._dsn_of = dsn_of
        self._conn: asyncpg.Connection | None = None

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        """COPY ``rows`` in; raises one of ``_TABLE_ERRORS`` (the connection is then dropped)."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = None
                conn = await connect(self._dsn_of(self.database), CONNECT_TIMEOUT, "pgfleet audit")
                try:
                    try:
                        await conn.execute(TABLE_DDL, timeout=COPY_TIMEOUT)
                    except asyncpg.UniqueViolationError:  # another pgfleet created it at the same time
                        await conn.execute(TABLE_DDL, timeout=COPY_TIMEOUT)
                except BaseException:
                    conn.terminate()
                    raise
                self._conn = conn
            await self._conn.copy_records_to_table("audit", schema_name="pgfleet", columns=COLUMNS,
                                                   records=rows, timeout=COPY_TIMEOUT)
        except BaseException:
            self.terminate()
            raise

    def terminate(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()

    async def close(self, timeout: float) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=timeout)
            except _TABLE_ERRORS:
                conn.terminate()


class _Outage:
    """Whether one sink works; when not, since when and when to try it again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.retry_at = 0.0
        self.dropped_before = 0  # AuditLog.dropped when it failed

    def resting(self, now: float) -> bool:
        return self.down and now < self.retry_at


# ---------------------------------------------------------------------------------------------
# The log


class AuditLog:
    """The queue from the sessions to the sinks, and the task that empties it."""

    def __init__(self, config: Audit, dsn_of: Callable[[str], Dsn] | None = None) -> None:
        self.config = config
        self.enabled = config.path is not None or config.table is not None
        self.dropped = 0   # statements some configured sink did not get
        self.written = 0   # statements every configured sink got
        self._queue: deque[Entry] = deque()
        self._limit = config.queue_size if self.enabled else 0
        self._stopping = asyncio.Event()
        self._unreported = 0  # dropped by record and not yet in a warning
        self._warn_at = 0.0
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._file = (RotatingFile(config.path, config.max_bytes, config.backups)
                      if config.path is not None else None)
        if config.table is not None and dsn_of is None:
            raise ValueError("audit.table needs dsn_of, to find the database's address")
        self._table = AuditTable(config.table, dsn_of) if config.table is not None and dsn_of else None
        self._file_state = _Outage(config.path or "")
        self._table_state = _Outage(f"table pgfleet.audit in database {config.table}")
        self._sinks = [state for state, sink in ((self._file_state, self._file),
                                                 (self._table_state, self._table)) if sink is not None]
        self.target = " and ".join(state.name for state in self._sinks)  # for log lines

    @property
    def queued(self) -> int:
        """Statements waiting for the writer (a gauge)."""
        return len(self._queue)

    def record(self, key: str, client: str, databases: tuple[str, ...], route: str, started: float,
               duration: float, rows: int | None, sqlstate: str | None, statement: str) -> None:
        """Queue one finished statement; ``started`` is ``time.time()``, ``duration`` seconds.

        Never waits: when the queue is full (or the log is off or stopped) it drops the
        statement and, if the log is on, counts it.
        """
        queue = self._queue
        if len(queue) < self._limit:
            queue.append((key, client, databases, route, started, duration, rows, sqlstate, statement))
            return
        if not self.enabled:
            return
        self.dropped += 1
        self._unreported += 1
        now = monotonic()
        if now >= self._warn_at:
            self._warn(now)

    def _warn(self, now: float) -> None:
        count, self._unreported = self._unreported, 0
        self._warn_at = now + WARN_INTERVAL
        if self._closed:
            log.warning("audit log closed: %d statement(s) not logged", count)
        else:
            log.warning("audit log queue full: %d statement(s) not logged; the writer cannot keep up "
                        "with %s", count, self.target)

    # -- lifecycle

    async def start(self) -> None:
        """Open the file (a ConfigError if it cannot be) and start the writer task.

        The table's database is not asked here: a database that is down must not keep pgfleet
        from starting; the writer connects when there is something to write.
        """
        if not self.enabled or self._task is not None:
            return
        if self._file is not None:
            try:
                self._file.open()
            except OSError as exc:
                raise ConfigError("audit.path", f"cannot open {self._file.path}: "
                                                f"{exc.strerror or exc}") from None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgfleet-audit")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pgfleet audit writer")
        self._task.add_done_callback(self._writer_done)

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then close the sinks.

        What is still queued then is counted as dropped; statements recorded afterwards too.
        """
        if self._closed:
            return
        if self._unreported:
            self._warn(monotonic())
        self._closed = True
        self._stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task})
        self._limit = 0
        if self._queue:
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
            log.warning("audit log stopped with %d statement(s) not written to %s", left, self.target)
        if self._unreported:
            self._warn(monotonic())
        remaining = max(0.1, deadline - loop.time())
        if self._table is not None:
            await self._table.close(remaining)
        if self._executor is not None:
            if self._file is not None:
                with contextlib.suppress(OSError, TimeoutError):
                    closed = loop.run_in_executor(self._executor, self._file.close)
                    await asyncio.wait_for(closed, remaining)
            self._executor.shutdown(wait=False)
        elif self._file is not None:
            self._file.close()

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("audit log writer stopped by a bug; statements are dropped from now on",
                      exc_info=task.exception())

    # -- the writer

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if self._unreported and monotonic() >= self._warn_at:
                self._warn(monotonic())
            if not queue:
                if self._stopping.is_set():
                    return
                # Polled rather than woken by record, which then costs one append and no more.
                await self._pause(LINGER)  # returns at once when stopping
                continue
            now = monotonic()
            if all(state.resting(now) for state in self._sinks):  # nothing can write: let the queue fill
                if self._stopping.is_set():
                    return
                await self._pause(min(state.retry_at for state in self._sinks) - now)
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), BATCH))]
            if await self._write(batch, now):
                self.written += len(batch)
            else:
                self.dropped += len(batch)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _write(self, batch: list[Entry], now: float) -> bool:
        """Give ``batch`` to every sink that is not resting; whether every sink took it."""
        assert self._executor is not None
        to_file = self._file is not None and not self._file_state.resting(now)
        to_table = self._table is not None and not self._table_state.resting(now)
        loop = asyncio.get_running_loop()
        rows, file_error = await loop.run_in_executor(self._executor, self._prepare, batch, to_file,
                                                      to_table)
        ok = True
        if self._file is not None:
            ok = to_file and file_error is None
            self._settle(self._file_state, file_error if to_file else None, took=ok)
        if self._table is not None:
            table_error: BaseException | None = None
            if to_table:
                try:
                    await self._table.write(rows)
                except _TABLE_ERRORS as exc:
                    table_error = exc
            self._settle(self._table_state, table_error, took=to_table and table_error is None)
            ok = ok and to_table and table_error is None
        return ok

    def _prepare(self, batch: list[Entry], to_file: bool, to_table: bool
                 ) -> tuple[list[tuple[Any, ...]], OSError | None]:
        """In the writer's thread: the lines (appended to the file here) and the table's rows."""
        statements = self.config.statements
        lines = [line_of(entry, statements) for entry in batch]
        error = None
        if to_file:
            assert self._file is not None
            try:
                self._file.write([_encode(line) + b"\n" for line in lines])
            except OSError as exc:
                error = exc
                with contextlib.suppress(OSError):
                    self._file.close()  # opened again on the next try
        rows = ([row_of(line, entry[4]) for line, entry in zip(lines, batch, strict=True)]
                if to_table else [])
        return rows, error

    def _settle(self, state: _Outage, error: BaseException | None, took: bool) -> None:
        """Note how a sink did with a batch: one log line when it fails, one when it is back."""
        if error is not None:
            state.retry_at = monotonic() + self.config.retry_interval
            if not state.down:
                state.down = True
                state.dropped_before = self.dropped
                log.error("audit log: cannot write to %s (%s); its statements are dropped until it "
                          "works again (trying every %gs)", state.name, _reason(error),
                          self.config.retry_interval)
        elif took and state.down:
            state.down = False
            log.warning("audit log: writing to %s again; %d statement(s) were dropped meanwhile",
                        state.name, self.dropped - state.dropped_before)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
