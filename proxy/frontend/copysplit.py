"""COPY ... FROM STDIN into a sharded table: the client's rows split by shard key over one
backend per shard, all committed or none (as scatter.py's writes).

``open`` takes a backend of every shard and starts ``BEGIN`` then the client's COPY on each;
``feed`` cuts the client's CopyData into rows (copyrows.RowSplitter) and sends each row to
its shard; ``finish`` ends every shard's COPY, then COMMITs all (or ROLLBACKs all when a
shard or a row failed) and returns the client's answer: ``COPY n`` with n summed, or the
first error. A row pgfleet cannot place (no shard key, NULL, a bad value) fails the COPY as
PostgreSQL fails it on a bad row: the rest of the data is read and dropped.
"""

from __future__ import annotations

import asyncio

from ..backend.connection import ServerConnection
from ..backend.expect import FORWARD_QUERY
from ..backend.pool import Pool
from ..backend.twophase import Coordinator
from ..errors import NOT_NULL_VIOLATION, QUERY_CANCELED, BackendError, ClientError, ProxyError
from ..router.copyrows import BinaryRowSplitter, RowSplitter
from ..router.router import Router
from ..wire import messages as m
from .scatter import Scatter, _Leg, _responses, answer_of

_BATCH = 64 * 1024  # bytes of rows gathered per shard before a CopyData goes out


class CopySplit(Scatter):
    def __init__(self, router: Router, table: str, splitter: RowSplitter | BinaryRowSplitter,
                 coordinator: Coordinator | None = None) -> None:
        super().__init__(coordinator)
        self.router = router
        self.table = table
        self.splitter = splitter
        self.failure: ProxyError | None = None
        self.batches: dict[str, list[bytes]] = {}
        self.sizes: dict[str, int] = {}
        self.by_database: dict[str, _Leg] = {}

    # -- Link: a shard that answers while its COPY runs can only be failing

    def backend_idle(self, server: ServerConnection) -> None:
        self._arrived()

    # -- the three steps

    async def open(self, pools: dict[str, Pool], databases: tuple[str, ...], statement: bytes,
                   settings: dict[str, str]) -> None:
        """BEGIN and the COPY on every shard; returns once each asks for data. Raises (with
        every backend given back) when one refuses."""
        try:
            prelude = await self._take(pools, databases, settings)
            self.by_database = {leg.database: leg for leg in self.legs.values()}
            await self._round({db: [*prelude.get(db, ()), m.query("BEGIN")] for db in databases})
            failed = self._first_failure(self._answers())
            if failed is not None:
                raise failed
            for leg in self.legs.values():
                leg.answer.clear()
            self.done = asyncio.get_running_loop().create_future()
            self.waiting = len(self.legs)
            for leg in self.legs.values():
                leg.copy_started = self._arrived
                leg.server.push(FORWARD_QUERY)
                leg.server.send(statement)
                leg.server.flush()
            await self.done
            refused = self._first_failure(self._answers())  # a shard that answered its COPY with an error
            if refused is not None:
                raise refused
        except BaseException:
            await self._abandon()
            raise

    def feed(self, data: bytes, final: bool = False) -> None:
        """The client's CopyData (or its end, ``final``): rows to their shards."""
        if self.failure is not None:
            return
        try:
            for row, key, header in self.splitter.feed(data, final):
                if header:  # every shard's COPY ... HEADER skips (or checks) a header of its own
                    for database in self.by_database:
                        self._add(database, row)
                    continue
                if key is None:
                    raise ClientError(NOT_NULL_VIOLATION, f'null value in column "{self.router.sharded[self.table]}" of '
                                      f'sharded table "{self.table}": a COPY row without its shard key has '
                                      "no shard", hint="give every row its shard key")
                self._add(self.router.copy_shard(self.table, key), row)
        except ProxyError as exc:
            self.failure = exc
            return
        for database in list(self.batches):
            self._send(database)

    def _add(self, database: str, row: bytes) -> None:
        self.batches.setdefault(database, []).append(row)
        self.sizes[database] = self.sizes.get(database, 0) + len(row)
        if self.sizes[database] >= _BATCH:
            self._send(database)

    def _send(self, database: str) -> None:
        rows = self.batches.pop(database, None)
        self.sizes.pop(database, None)
        if rows:
            server = self.by_database[database].server
            server.send(m.message(m.COPY_DATA, b"".join(rows)))
            server.flush()

    async def finish(self, client_error: str | None = None) -> bytes:
        """End every shard's COPY (CopyFail with ``client_error``); all COMMIT or all
        ROLLBACK; the client's answer (CommandComplete, or an ErrorResponse)."""
        try:
            if client_error is None:
                self.feed(b"", final=True)
            end = m.COPY_DONE_MSG if client_error is None and self.failure is None else \
                m.copy_fail(client_error or "pgfleet failed the COPY")
            self.done = asyncio.get_running_loop().create_future()
            self.waiting = 0
            for leg in self.legs.values():
                if leg.lost is None:
                    self.waiting += 1
                    leg.copy_started = None
                    leg.server.send(end)
                    leg.server.flush()
            if self.waiting:
                await self.done
            answers = self._answers()
            failed = self.failure or (ClientError(QUERY_CANCELED, f"COPY from stdin failed: {client_error}")
                                      if client_error is not None else self._first_failure(answers))
            for leg in self.legs.values():
                leg.answer.clear()
            if failed is not None:
                await self._round({leg.database: [m.query("ROLLBACK")] for leg in self.legs.values()
                                   if leg.lost is None})
                return answer_of(failed)
            try:
                await self.commit()
            except ProxyError as exc:
                return answer_of(exc)
            total = 0
            for responses in answers.values():
                for response in responses:
                    for kind, body in response:
                        if kind == m.COMMAND_COMPLETE and body.startswith(b"COPY "):
                            total += int(body[5:-1])
            return m.command_complete(f"COPY {total}")
        finally:
            self.give_back()

    # -- helpers

    def _answers(self) -> dict[str, list[list[tuple[int, bytes]]]]:
        """Each shard's answer so far, one list per ReadyForQuery (an error ends with one)."""
        return {leg.database: _responses(bytes(leg.answer)) for leg in self.legs.values()}

    async def _abandon(self) -> None:
        """A COPY that could not start: fail it where it started, roll every shard back."""
        self.done = asyncio.get_running_loop().create_future()
        self.waiting = 0
        for leg in self.legs.values():
            if leg.lost is None and leg.server.busy:
                self.waiting += 1
                leg.copy_started = None
                leg.server.send(m.copy_fail("pgfleet could not start the COPY on every shard"))
                leg.server.flush()
        try:
            if self.waiting:
                await asyncio.wait_for(self.done, 10)
            await self._round({leg.database: [m.query("ROLLBACK")] for leg in self.legs.values()
                               if leg.lost is None})
        except (TimeoutError, BackendError):
            pass
        finally:
            self.give_back()
