"""A federated SELECT on the wire: one backend per shard, their answers through the merger.

Each shard gets the plan's shard query as a simple Query on a backend of its pool (taken in
shard order, like scatter.py's writes). Their answers are framed per shard and fed to the
``Merger`` as they arrive; whatever it can give is written to the client at once, so plain
fan-outs and ORDER BY ... LIMIT stream in bounded memory. A shard whose rows pile up
(the merge waits on a slower shard) stops being read until the merge catches up; a client
that reads slowly stops all of them (``pause`` / ``resume``).

A shard that fails (its ErrorResponse, a lost connection, answers the merger refuses) fails
the whole statement, with that shard's SQLSTATE and its name in the message. Rows already
sent stay sent, as when PostgreSQL itself fails in the middle of a result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Callable

from ..backend.connection import ServerConnection
from ..backend.expect import FORWARD_QUERY
from ..backend.pool import Pool
from ..errors import INTERNAL_ERROR, BackendError, ProxyError
from ..merge.merger import Merger, keyed_rows
from ..wire import messages as m
from .settings import set_statement

log = logging.getLogger("pgfleet.gather")

_U32 = struct.Struct("!I")
# What a shard says besides its rows: ReadyForQuery ends it (backend_idle follows).
_NOT_MERGED = frozenset((m.READY_FOR_QUERY, m.PARAMETER_STATUS, m.NOTICE_RESPONSE))
HIGH_ROWS = 4096  # rows a shard may have waiting in the merge before it is paused
LOW_ROWS = 1024


class _Shard:
    def __init__(self, index: int, database: str, pool: Pool, server: ServerConnection) -> None:
        self.index = index
        self.database = database
        self.pool = pool
        self.server = server
        self.inbox = bytearray()
        self.replays = 0       # answers to pgfleet's own SET still to skip (up to ReadyForQuery)
        self.done = False
        self.paused = False


class Gather:
    """A ``Link`` for every shard of one federated SELECT, driven by ``run``."""

    def __init__(self, merger: Merger, write: Callable[[bytes], None]) -> None:
        self.merger = merger
        self.write = write
        self.shards: dict[ServerConnection, _Shard] = {}
        self.kept: list[ServerConnection] = []  # in the client's transaction: its backends, to take back
        self.failure: bytes | None = None
        self.waiting = 0
        self.done: asyncio.Future[None] | None = None
        self.client_paused = False

    # -- Link

    def part_answered(self, server: ServerConnection) -> None:
        pass  # only a client session cuts a pipeline (split.py); an adopted backend has no part due

    def backend_idle(self, server: ServerConnection) -> None:
        shard = self.shards.get(server)
        if shard is not None and not shard.done:
            shard.done = True
            self._arrived()

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        shard = self.shards.get(server)
        if shard is not None and not shard.done:
            self._fail(m.error_response(error.sqlstate, error.message, hint=error.hint), shard)
            shard.done = True
            self._arrived()

    def _arrived(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- flow control

    def pause(self) -> None:
        """The client reads slowly: stop reading every shard still answering."""
        self.client_paused = True
        for shard in self.shards.values():
            if not shard.done and shard.server.transport is not None:
                shard.server.transport.pause_reading()

    def resume(self) -> None:
        self.client_paused = False
        for shard in self.shards.values():
            if not shard.paused and shard.server.transport is not None:
                shard.server.transport.resume_reading()

    # -- running

    async def run(self, pools: dict[str, Pool], databases: tuple[str, ...], query: bytes,
                  settings: dict[str, str], adopted: dict[str, ServerConnection] | None = None,
                  begin: bytes | None = None) -> bytes:
        """Run ``query`` (a Query message, or Parse/Bind/Describe/Execute/Sync) on every
        database; write the merged rows; return the last bytes (the rest and CommandComplete,
        or the ErrorResponse).

        ``adopted`` (two-phase commit: the read is in the client's transaction): the
        transaction's backends of some of the databases; the others get one from their pool and
        ``begin`` first. None goes back to a pool then: ``kept`` has them all for the client."""
        joined = adopted is not None
        try:
            for index, database in enumerate(databases):
                pool = pools[database]
                server = adopted.pop(database, None) if adopted is not None else None
                fresh = server is None
                if server is None:
                    server = await pool.acquire()
                shard = _Shard(index, database, pool, server)
                if joined:
                    self.kept.append(server)
                    if fresh and begin is not None:
                        server.push(FORWARD_QUERY)
                        server.send(begin)
                        shard.replays += 1
                self.shards[server] = shard
                server.attach(self, functools.partial(self._received, shard))  # each shard to its inbox
                server.unnamed_owner = 0  # its unnamed statement becomes the shard query's
                if self.client_paused and server.transport is not None:
                    server.transport.pause_reading()
            self.done = asyncio.get_running_loop().create_future()
            self.waiting = len(self.shards)
            for shard in self.shards.values():
                server = shard.server
                if server.settings != settings:
                    replay = set_statement(settings, server.settings)
                    server.settings = settings
                    if replay is not None:
                        server.push(FORWARD_QUERY)
                        server.send(m.query(replay))
                        shard.replays += 1
                server.push(FORWARD_QUERY)
                server.send(query)
                server.flush()
            await self.done
            if self.failure is not None:
                return self.failure
            return self.merger.finish()
        except ProxyError as exc:
            if self.failure is not None:
                return self.failure
            return m.error_response(exc.sqlstate, exc.message, hint=exc.hint)
        except Exception:  # a bug must not leave the client without an answer
            log.exception("internal error in a federated query on %s", ", ".join(databases))
            return m.error_response(INTERNAL_ERROR, "internal error in pgfleet while merging the shards' answers; "
                                    "the details are in its log")
        finally:
            for shard in self.shards.values():
                server = shard.server
                # A backend goes back to its pool reading, whoever paused it (a client that
                # paused after the last answer came would leave it deaf for the next one).
                if (shard.paused or self.client_paused) and server.transport is not None and not server.closed:
                    server.transport.resume_reading()
                if joined:
                    continue  # the client's transaction keeps it (``kept``)
                if server.closed or server.busy or server.tx_status != m.TX_IDLE:
                    shard.pool.discard(server)
                else:
                    shard.pool.release(server)

    def _received(self, shard: _Shard, data: bytes) -> None:
        inbox = shard.inbox
        inbox += data
        pos = 0
        n = len(inbox)
        merger = self.merger
        run = -1  # the start of a run of DataRows that goes out whole (merger.passthrough)
        rows = 0
        ended = False  # this shard's answer is complete
        while n - pos >= 5:
            end = pos + 1 + _U32.unpack_from(inbox, pos + 1)[0]
            if end > n:
                break
            kind = inbox[pos]
            if kind == m.DATA_ROW and merger.ordered and self.failure is None and not shard.replays:
                try:  # the run of DataRows from here, each with its sort key, framed and read in C
                    keyed, after = keyed_rows(inbox, pos, merger.sort_spec)
                    merger.keyed(shard.index, keyed)
                except Exception as exc:  # noqa: BLE001 - _merge_failed tells a refusal from a bug
                    self._merge_failed(exc, shard)
                    after = pos
                if after == pos:
                    end = pos + 1 + _U32.unpack_from(inbox, pos + 1)[0]
                    if end > n:
                        break
                    pos = end  # the row failed: skip it, as after any failure
                else:
                    pos = after
                continue
            if kind == m.DATA_ROW and merger.passthrough and self.failure is None and not shard.replays:
                if run < 0:
                    run = pos
                rows += 1
                pos = end
                continue
            if run >= 0:
                merger.pass_rows(bytes(inbox[run:pos]), rows)
                run, rows = -1, 0
            if kind == m.ERROR_RESPONSE:
                self._fail(bytes(inbox[pos:end]), shard)
            elif shard.replays:
                if kind == m.READY_FOR_QUERY:
                    shard.replays -= 1
            elif kind == m.READY_FOR_QUERY:
                ended = True
            elif self.failure is None and kind not in _NOT_MERGED:
                try:
                    merger.feed(shard.index, kind, bytes(inbox[pos + 5:end]))
                except Exception as exc:  # noqa: BLE001 - _merge_failed tells a refusal from a bug
                    self._merge_failed(exc, shard)
            pos = end
        if run >= 0:
            merger.pass_rows(bytes(inbox[run:pos]), rows)
        del inbox[:pos]
        if self.failure is None:
            # The last shard's last answer: what is left goes out with CommandComplete (run),
            # so a small result is one send.
            if not (ended and self.waiting <= 1):
                out = merger.take()
                if out:
                    self.write(out)
            self._balance()

    def _merge_failed(self, exc: Exception, shard: _Shard) -> None:
        if isinstance(exc, ProxyError):  # the merger refuses what the shard sent
            self._fail(m.error_response(exc.sqlstate, exc.message, hint=exc.hint), shard)
            return
        # A bug in the merge (or a malformed row) must not take the shard's connection with it.
        log.error("internal error merging the answer of shard %s", shard.database, exc_info=exc)
        self._fail(m.error_response(INTERNAL_ERROR, "internal error in pgfleet while merging the "
                                    "shards' answers; the details are in its log"), shard)

    def _balance(self) -> None:
        """Pause a shard whose rows pile up in the merge; resume those it has caught up on."""
        merger = self.merger
        for shard in self.shards.values():
            transport = shard.server.transport
            if transport is None or shard.done:
                continue
            waiting = merger.buffered(shard.index)
            if not shard.paused and waiting > HIGH_ROWS:
                shard.paused = True
                transport.pause_reading()
            elif shard.paused and waiting < LOW_ROWS:
                shard.paused = False
                if not self.client_paused:
                    transport.resume_reading()

    def _fail(self, error: bytes, shard: _Shard) -> None:
        if self.failure is not None:
            return
        body = error[5:]
        fields = m.decode_fields(body)
        self.failure = _naming(body, shard.database)
        log.info("federated query failed on shard %s: %s %s", shard.database, fields.get("C", INTERNAL_ERROR),
                 fields.get("M", ""))
        for other in self.shards.values():  # nothing more is needed from the others
            if other.paused and other.server.transport is not None:
                other.paused = False
                other.server.transport.resume_reading()


def _naming(body: bytes, database: str) -> bytes:
    """An ErrorResponse whose message names the shard it came from; other fields kept."""
    parts = []
    for item in body.split(b"\0"):
        if item[:1] == b"M":
            item += f" (on shard {database})".encode()
        if item:
            parts.append(item + b"\0")
    return m.message(m.ERROR_RESPONSE, b"".join(parts) + b"\0")
