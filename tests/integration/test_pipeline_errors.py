"""An error in the middle of a pipeline, through pgfleet, with real drivers.

After an ErrorResponse in the extended protocol PostgreSQL ignores every message up to the
next Sync and answers that Sync with ReadyForQuery. psycopg's async connection sends a
pipeline in several writes (executemany: often the Parse alone, then the Bind/Describe/Execute
of each row, Sync and Flush), so the backend's error often reaches pgfleet before the rest of
the pipeline has been forwarded. pgfleet must then still know that the backend skips to the next Sync:
it used to forget it once the error had emptied its queue of expected answers, so the
ReadyForQuery of that Sync was taken for the answer to the first message sent after the
error (a re-Parse pgfleet injected, whose answer is dropped) and the client waited forever.

Whether psycopg's writes race the backend's error is a matter of timing, so most tests make it
certain: the raw client (``rawclient.Raw``) sends the failing message alone, waits for its
error, and only then sends the rest of the pipeline and its Sync; the drivers go through
``ErrorFirst``, a relay that pauses after each Parse and Execute. Every driver call is
bounded by ``asyncio.wait_for`` (and every raw read by a timeout) so that a hang fails the test.
Each test runs on the fleet database and on a database by name, in both pool modes.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from proxy.embedded import Cluster
from proxy.wire import messages as m

from .conftest import KEYS, Fleet, fleet_config
from .rawclient import Msg, Raw, rows

T = TypeVar("T")
TIMEOUT = 10.0  # seconds: PostgreSQL answers each of these at once; longer is a hang
BAD = "wat ($1, $2)"  # a syntax error (42601)
PARAMS = [(1, 2), (3, 4)]
ROUNDS = 10  # psycopg as it sends: tries per test of the racy case


@pytest.fixture(scope="module", params=["transaction", "session"])
def fleet(request: pytest.FixtureRequest, pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The standard fleet, once per pool mode."""
    workdir: Path = tmp_path_factory.mktemp(f"fleet-{request.param}")
    proc = Fleet(fleet_config(pg, pool={"mode": request.param}), workdir).start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(params=["app", "primary"])
def database(request: pytest.FixtureRequest) -> str:
    """The fleet database (routed), or the default database by name (decided at login)."""
    return str(request.param)


@pytest.fixture
def table(pg: Cluster) -> Iterator[str]:
    """A fresh table ``name (id int primary key)`` in bank (the primary database)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int primary key)")
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
            conn.execute(f"drop table if exists {name}")


async def bounded(awaitable: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(awaitable, TIMEOUT)
    except TimeoutError:
        pytest.fail(f"{what}: no answer within {TIMEOUT:g}s (pgfleet hangs)", pytrace=False)


@asynccontextmanager
async def psycopg_conn(dsn: str, **kwargs: Any) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await bounded(psycopg.AsyncConnection.connect(dsn, **kwargs), "connect")
    try:
        yield conn
    finally:
        with suppress(Exception):  # a connection left hanging by a failed test: just drop it
            await asyncio.wait_for(conn.close(), 5)


async def recovers(conn: psycopg.AsyncConnection[Any]) -> None:
    """After the error: ROLLBACK works and the connection runs statements again."""
    await bounded(conn.rollback(), "rollback after the error")
    cur = await bounded(conn.execute("SELECT 1"), "SELECT 1 after the rollback")
    assert await cur.fetchone() == (1,)
    await bounded(conn.rollback(), "rollback")


async def others_unharmed(fleet: Fleet, database: str) -> None:
    """Every backend of the pool still answers a new client properly (none was given back
    while it still skipped messages up to a Sync)."""
    async def one(n: int) -> int:
        async with psycopg_conn(fleet.dsn(database=database), autocommit=True) as conn:
            cur = await bounded(conn.execute("SELECT %s::int", (n,)), "SELECT on another connection")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])
    assert await asyncio.gather(*(one(n) for n in range(12))) == list(range(12))


_PAUSE_AFTER = frozenset((ord("P"), ord("E")))  # Parse, Execute (frontend "E")


class ErrorFirst:
    """A relay between a driver and pgfleet that forwards the driver's messages one by one and
    waits a moment after each Parse and each Execute: the backend's error to either then always
    reaches pgfleet before the rest of the pipeline does. Nothing is changed or dropped."""

    PAUSE = 0.1  # seconds; the backend answers in about a millisecond

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def dsn(self, database: str) -> str:
        secret = KEYS["pf_server"][0]
        return (f"postgresql://pf_server:{secret}@127.0.0.1:{self.port}/{database}"
                "?sslmode=disable&gssencmode=disable")  # the startup packet comes first

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        fleet_r, fleet_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        for task in (self._up(client_r, fleet_w), self._down(fleet_r, client_w)):
            self.tasks.add(asyncio.get_running_loop().create_task(task))

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            writer.write(struct.pack("!I", length) + await reader.readexactly(length - 4))  # startup
            while True:
                head = await reader.readexactly(5)
                writer.write(head + await reader.readexactly(struct.unpack_from("!I", head, 1)[0] - 4))
                await writer.drain()
                if head[0] in _PAUSE_AFTER:
                    await asyncio.sleep(self.PAUSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------
# the raw protocol: the backend's error comes before the rest of the pipeline, always

BIND = b"\0\0\0\0\0\0"  # no parameter formats, no parameters, no result formats


def kinds(msgs: list[Msg]) -> list[str]:
    return [msg.kind for msg in msgs]


def rest_of_pipeline(statement: str) -> bytes:
    """What psycopg's executemany sends after the Parse: Bind, Describe, Execute for each row."""
    one = m.bind("", statement, BIND) + m.describe(0x50, "") + m.execute("")
    return one + one


def error_first(raw: Raw, first: bytes) -> list[Msg]:
    """Send ``first`` (ending with a Flush) and wait for its ErrorResponse: pgfleet has
    forwarded it, and the backend now skips every message up to the next Sync."""
    raw.send(first + m.FLUSH_MSG)
    got = raw.until("E")
    assert got[-1].fields["C"] == "42601", got[-1].fields
    return got


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("before", ["autocommit", "begin", "statement"])
def test_raw_error_before_the_rest_of_the_pipeline(fleet: Fleet, database: str, before: str, named: bool) -> None:
    """Parse fails; then Bind/Describe/Execute twice and Sync: the answer is ReadyForQuery
    alone, "E" in a transaction (BEGIN alone, or BEGIN and a statement), "I" outside."""
    name = "s1" if named else ""
    with Raw(fleet.port) as raw:
        raw.login("pf_server", KEYS["pf_server"][0], database)
        if before != "autocommit":
            assert kinds(raw.query("BEGIN")) == ["C", "Z"]
        if before == "statement":
            assert rows(raw.query("SELECT 7")) == [["7"]]
        assert kinds(error_first(raw, m.parse(name, "wat ($1, $2)"))) == ["E"]
        raw.send(rest_of_pipeline(name) + m.SYNC_MSG + m.FLUSH_MSG)
        got = raw.until("Z")
        assert kinds(got) == ["Z"] and got[0].body == (b"I" if before == "autocommit" else b"E")
        if before != "autocommit":
            got = raw.query("SELECT 1")
            assert kinds(got) == ["E", "Z"] and got[0].fields["C"] == "25P02" and got[1].body == b"E"
            assert kinds(raw.query("ROLLBACK")) == ["C", "Z"]
        got = raw.query("SELECT 1")
        assert rows(got) == [["1"]] and got[-1].body == b"I"


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_raw_backend_goes_back_to_the_pool(make_fleet: Any, database: str, named: bool) -> None:
    """Pool size 1, transaction mode: once the failed pipeline has ended and its client is idle,
    another client gets the one backend. (With the unnamed statement the old accounting even
    forwarded the ReadyForQuery, but left the skipped messages' entries queued: the backend
    never looked idle again and stayed with its client.)"""
    fleet = make_fleet(pool={"mode": "transaction", "size": 1, "acquire_timeout": "3s"})
    name = "s1" if named else ""
    with Raw(fleet.port) as first, Raw(fleet.port) as second:
        first.login("pf_server", KEYS["pf_server"][0], database)
        second.login("pf_server", KEYS["pf_server"][0], database)
        error_first(first, m.parse(name, "wat ($1, $2)"))
        first.send(rest_of_pipeline(name) + m.SYNC_MSG)
        got = first.until("Z")
        assert kinds(got) == ["Z"] and got[0].body == b"I"
        assert rows(first.query("SELECT 1")) == [["1"]]
        got = second.query("SELECT 2")
        assert rows(got) == [["2"]], [msg.fields for msg in got if msg.kind == "E"]
        assert rows(first.query("SELECT 3")) == [["3"]]


def test_raw_good_bad_good(fleet: Fleet, database: str) -> None:
    """Good, bad (its error before the rest), good, Sync: the third is never run or answered."""
    with Raw(fleet.port) as raw:
        raw.login("pf_server", KEYS["pf_server"][0], database)
        good = m.parse("", "SELECT 1") + m.bind("", "", BIND) + m.execute("")
        got = error_first(raw, good + m.parse("", "wat"))
        assert kinds(got) == ["1", "2", "D", "C", "E"]
        raw.send(good + m.SYNC_MSG)
        got = raw.until("Z")
        assert kinds(got) == ["Z"] and got[0].body == b"I"
        assert rows(raw.query("SELECT 2")) == [["2"]]


def test_raw_skipped_parse_prepares_nothing(fleet: Fleet, database: str) -> None:
    """A named statement parsed after the error is skipped by the backend: pgfleet must not
    count it as prepared there, or the next Parse of the same text gets a made-up
    ParseComplete and its Bind fails with 26000 on the backend."""
    with Raw(fleet.port) as raw:
        raw.login("pf_server", KEYS["pf_server"][0], database)
        assert kinds(raw.query("BEGIN")) == ["C", "Z"]
        error_first(raw, m.parse("bad", "wat"))
        raw.send(m.parse("skipped", "SELECT 40 + 2") + m.bind("", "skipped", BIND) + m.execute("")
                 + m.SYNC_MSG)
        got = raw.until("Z")
        assert kinds(got) == ["Z"] and got[0].body == b"E"
        assert kinds(raw.query("ROLLBACK")) == ["C", "Z"]
        raw.send(m.parse("again", "SELECT 40 + 2") + m.bind("", "again", BIND) + m.execute("") + m.SYNC_MSG)
        got = raw.until("Z")
        assert kinds(got) == ["1", "2", "D", "C", "Z"], [msg.fields for msg in got if msg.kind == "E"]
        assert rows(got) == [["42"]]


@pytest.mark.parametrize("how", ["failed", "skipped"])
def test_raw_name_of_a_statement_never_prepared_is_free(fleet: Fleet, database: str, how: str) -> None:
    """A named statement whose Parse failed, or was skipped after an earlier error, was never
    created: a new Parse of that name works, as on PostgreSQL (no 42P05). Drivers that name
    statements by their text (pgx's statement cache) parse the same name again after a failure."""
    with Raw(fleet.port) as raw:
        raw.login("pf_server", KEYS["pf_server"][0], database)
        pipeline = m.parse("s1", "wat") if how == "failed" else m.parse("bad", "wat") + m.parse("s1", "SELECT 0")
        raw.send(pipeline + m.SYNC_MSG)
        got = raw.until("Z")
        assert kinds(got) == ["E", "Z"] and got[0].fields["C"] == "42601"
        raw.send(m.parse("s1", "SELECT 1") + m.bind("", "s1", BIND) + m.execute("") + m.SYNC_MSG)
        got = raw.until("Z")
        assert rows(got) == [["1"]], [msg.fields for msg in got if msg.kind == "E"]


# ---------------------------------------------------------------------------------------------
# psycopg 3, async


@pytest.fixture
async def relay(fleet: Fleet) -> AsyncIterator[ErrorFirst]:
    async with ErrorFirst(fleet.port) as started:
        yield started


@pytest.mark.parametrize("timing", ["as-sent", "error-first"])
async def test_async_executemany_syntax_error(fleet: Fleet, relay: ErrorFirst, database: str, timing: str) -> None:
    """The reported case: executemany (a named statement, pipelined) in a transaction.

    "as-sent": whether the error overtakes the rest of the pipeline is timing, so a few
    rounds. "error-first": through ``ErrorFirst``, it always does."""
    dsn = fleet.dsn(database=database) if timing == "as-sent" else relay.dsn(database)
    for _ in range(ROUNDS if timing == "as-sent" else 2):
        async with psycopg_conn(dsn) as conn:
            cur = psycopg.AsyncRawCursor(conn)
            with pytest.raises(pgerrors.SyntaxError):
                await bounded(cur.executemany(BAD, PARAMS), "executemany of a syntax error")
            await recovers(conn)
            with pytest.raises(pgerrors.SyntaxError):  # and again, on the same connection
                await bounded(cur.executemany(BAD, PARAMS), "executemany of a syntax error, again")
            await recovers(conn)
    await others_unharmed(fleet, database)


async def test_async_executemany_syntax_error_unnamed(relay: ErrorFirst, database: str) -> None:
    """The same with the unnamed statement (preparing disabled)."""
    async with psycopg_conn(relay.dsn(database), prepare_threshold=None) as conn:
        cur = psycopg.AsyncRawCursor(conn)
        with pytest.raises(pgerrors.SyntaxError):
            await bounded(cur.executemany(BAD, PARAMS), "executemany of a syntax error (unnamed)")
        await recovers(conn)


async def test_async_executemany_syntax_error_autocommit(fleet: Fleet, relay: ErrorFirst, database: str) -> None:
    async with psycopg_conn(relay.dsn(database), autocommit=True) as conn:
        cur = psycopg.AsyncRawCursor(conn)
        with pytest.raises(pgerrors.SyntaxError):
            await bounded(cur.executemany(BAD, PARAMS), "executemany of a syntax error (autocommit)")
        cur2 = await bounded(conn.execute("SELECT 1"), "SELECT 1 after the error")
        assert await cur2.fetchone() == (1,)
    await others_unharmed(fleet, database)


async def test_async_executemany_syntax_error_after_a_statement(relay: ErrorFirst, database: str, pg: Cluster,
                                                                table: str) -> None:
    """In a transaction that already ran a statement on its backend: it fails, and rolls back."""
    async with psycopg_conn(relay.dsn(database)) as conn:
        await bounded(conn.execute(f"insert into {table} values (1)"), "insert")
        cur = psycopg.AsyncRawCursor(conn)
        with pytest.raises(pgerrors.SyntaxError):
            await bounded(cur.executemany(BAD, PARAMS), "executemany of a syntax error")
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            await bounded(conn.execute("SELECT 1"), "a statement in the failed transaction")
        await recovers(conn)
    with psycopg.connect(pg.dsn("bank")) as direct:
        assert direct.execute(f"select count(*) from {table}").fetchone() == (0,)


@pytest.mark.parametrize("autocommit", [False, True])
async def test_async_executemany_of_a_failing_insert(relay: ErrorFirst, database: str, pg: Cluster,
                                                     table: str, autocommit: bool) -> None:
    """An error at Execute (not Parse): the first row inserts, the second violates the key,
    the third is skipped; the whole pipeline rolls back."""
    async with psycopg_conn(relay.dsn(database), autocommit=autocommit) as conn:
        cur = psycopg.AsyncRawCursor(conn)
        with pytest.raises(pgerrors.UniqueViolation):
            await bounded(cur.executemany(f"insert into {table} values ($1)", [(1,), (1,), (2,)]),
                          "executemany of a duplicate key")
        await recovers(conn)
    with psycopg.connect(pg.dsn("bank")) as direct:
        assert direct.execute(f"select count(*) from {table}").fetchone() == (0,)


@pytest.mark.parametrize("autocommit", [False, True])
async def test_async_pipeline_good_bad_good(relay: ErrorFirst, database: str, pg: Cluster, table: str,
                                            autocommit: bool) -> None:
    """A bad statement in the middle of a pipeline: the statements after it are skipped, and
    the whole pipeline (one implicit or explicit transaction) leaves nothing behind."""
    async with psycopg_conn(relay.dsn(database), autocommit=autocommit) as conn:
        async def pipeline() -> None:
            async with conn.pipeline():
                cur = psycopg.AsyncRawCursor(conn)
                await cur.execute(f"insert into {table} values ($1)", (1,))
                await cur.execute(BAD, (1, 2))
                await cur.execute(f"insert into {table} values ($1)", (2,))
        with pytest.raises(pgerrors.SyntaxError):
            await bounded(pipeline(), "a pipeline with a syntax error in the middle")
        await recovers(conn)
    with psycopg.connect(pg.dsn("bank")) as direct:
        assert direct.execute(f"select count(*) from {table}").fetchone() == (0,)


async def test_async_named_statement_after_the_error(relay: ErrorFirst, database: str) -> None:
    """Prepared statements work after the error: pgfleet must not believe a backend holds a
    statement whose Parse the backend skipped."""
    async with psycopg_conn(relay.dsn(database), prepare_threshold=0) as conn:
        cur = psycopg.AsyncRawCursor(conn)
        with pytest.raises(pgerrors.SyntaxError):
            await bounded(cur.executemany(BAD, PARAMS), "executemany of a syntax error")
        await recovers(conn)
        for _ in range(3):
            await bounded(cur.executemany("SELECT $1::int + $2::int", PARAMS), "executemany after the error")
            await bounded(cur.execute("SELECT $1::int + $2::int", (20, 22), prepare=True), "prepared SELECT")
            assert await cur.fetchone() == (42,)
        await bounded(conn.commit(), "commit")


# ---------------------------------------------------------------------------------------------
# asyncpg (its executemany prepares first, with a Sync of its own) and the synchronous psycopg
# connection (the same pipeline as the async one; as it sends, it races the error less often)


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_asyncpg_executemany_syntax_error(fleet: Fleet, database: str, in_transaction: bool) -> None:
    conn = await bounded(asyncpg.connect(fleet.dsn(database=database)), "connect")
    try:
        if in_transaction:
            tx = conn.transaction()
            await bounded(tx.start(), "BEGIN")
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await bounded(conn.executemany(BAD, PARAMS), "asyncpg executemany of a syntax error")
        if in_transaction:
            await bounded(tx.rollback(), "ROLLBACK")
        assert await bounded(conn.fetchval("SELECT 1"), "SELECT 1 after the error") == 1
    finally:
        await asyncio.wait_for(conn.close(), 5)


@pytest.mark.parametrize("timing", ["as-sent", "error-first"])
async def test_sync_executemany_syntax_error(fleet: Fleet, relay: ErrorFirst, database: str, timing: str) -> None:
    dsn = fleet.dsn(database=database) if timing == "as-sent" else relay.dsn(database)

    def rounds() -> None:
        with psycopg.connect(dsn) as conn:
            cur = psycopg.RawCursor(conn)
            for _ in range(ROUNDS if timing == "as-sent" else 2):
                with pytest.raises(pgerrors.SyntaxError):
                    cur.executemany(BAD, PARAMS)
                conn.rollback()
                assert conn.execute("SELECT 1").fetchone() == (1,)
                conn.rollback()

    # In a thread of its own, so that a hang fails the test rather than blocking it (the thread
    # ends when pgfleet stops; the default executor would be waited for when the loop closes).
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            rounds()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome = partial(done.set_exception, exc)
        else:
            outcome = partial(done.set_result, None)
        with suppress(RuntimeError):  # the test gave up and its loop is closed
            loop.call_soon_threadsafe(lambda: None if done.done() else outcome())

    threading.Thread(target=run, name="sync-executemany", daemon=True).start()
    await bounded(done, "synchronous executemany of a syntax error")
