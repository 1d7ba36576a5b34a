"""One write on several databases at once (whole-fleet UPDATE/DELETE, DDL, reference tables,
an INSERT split by shard), answered to the client as one statement.

Each database gets its own backend from its pool, in shard order (so two scatters can never
wait on each other), and runs ``BEGIN`` then its statement. When every one has answered,
all COMMIT if none failed, else all ROLLBACK and the client gets the first error. The
answers are combined as one database would give them: one RowDescription (they must agree),
every DataRow, and row counts summed into one command tag. Without two-phase commit the
COMMITs are not atomic together; a COMMIT that fails after another succeeded is logged as an
error naming both. With a ``Coordinator`` (``two_phase_commit: true``) they are: see
``commit_prepared``, which also ends a client's own transaction on several databases (``adopt``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Callable

from ..backend.connection import ServerConnection
from ..backend.expect import FORWARD_QUERY
from ..backend.pool import Pool
from ..backend.twophase import Coordinator, NotDecided, Unknown
from ..errors import (
    DATATYPE_MISMATCH,
    INTERNAL_ERROR,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    SERIALIZATION_FAILURE,
    STATEMENT_COMPLETION_UNKNOWN,
    TRANSACTION_RESOLUTION_UNKNOWN,
    BackendError,
    ProxyError,
)
from ..wire import messages as m
from .settings import set_statement

log = logging.getLogger("pgfleet.scatter")

_COUNTED = re.compile(rb"^(INSERT 0|UPDATE|DELETE|MERGE|SELECT|COPY) (\d+)$")


def answer_of(exc: ProxyError) -> bytes:
    """The ErrorResponse a client gets for a failed scatter: a database's own, else pgfleet's."""
    raw = exc.raw if isinstance(exc, ScatterError) else None
    return raw or m.error_response(exc.sqlstate, exc.message, hint=exc.hint)


class ScatterError(ProxyError):
    """The combined statement failed; ``raw`` is the ErrorResponse to send, as a backend sent it."""

    def __init__(self, sqlstate: str, message: str, raw: bytes | None = None, hint: str | None = None) -> None:
        super().__init__(sqlstate, message, hint=hint)
        self.raw = raw


class _Leg:
    """One database's part: its backend and the bytes it answered."""

    def __init__(self, database: str, pool: Pool, server: ServerConnection) -> None:
        self.database = database
        self.pool = pool
        self.server = server
        self.answer = bytearray()
        self.lost: BackendError | None = None
        # A COPY FROM STDIN being started (copysplit.py): called once the backend asks for data.
        self.copy_started: Callable[[], None] | None = None

    def receive(self, data: bytes) -> None:
        """What the backend answers (its ``write``): kept apart, per leg."""
        self.answer.extend(data)
        if self.copy_started is not None and any(kind == m.COPY_IN_RESPONSE for kind, _ in m.split(bytes(self.answer))):
            started, self.copy_started = self.copy_started, None
            started()


class Scatter:
    """A ``Link`` for several backends at once, driven by ``run``."""

    def __init__(self, coordinator: Coordinator | None = None) -> None:
        self.legs: dict[ServerConnection, _Leg] = {}
        self.waiting = 0
        self.done: asyncio.Future[None] | None = None
        self.coordinator = coordinator  # set: several databases commit in two phases

    @classmethod
    def adopt(cls, pools: dict[str, Pool], servers: list[ServerConnection], coordinator: Coordinator | None
              ) -> Scatter:
        """A scatter over backends a client holds in one transaction (they come back to it idle)."""
        scatter = cls(coordinator)
        for server in servers:
            scatter._link(server.database, pools[server.database], server)
        return scatter

    def _link(self, database: str, pool: Pool, server: ServerConnection) -> _Leg:
        leg = self.legs[server] = _Leg(database, pool, server)
        server.attach(self, leg.receive)
        if server.transport is not None:
            server.transport.resume_reading()  # its client may have paused it
        return leg

    # -- Link

    def part_answered(self, server: ServerConnection) -> None:
        pass  # only a client session cuts a pipeline (split.py); an adopted backend has no part due

    def backend_idle(self, server: ServerConnection) -> None:
        self._arrived()

    def backend_lost(self, server: ServerConnection, error: BackendError) -> None:
        leg = self.legs.get(server)
        if leg is not None and leg.lost is None:
            leg.lost = error
            self._arrived()

    def _arrived(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- running

    async def run(self, pools: dict[str, Pool], statements: dict[str, bytes],
                  settings: dict[str, str], replicated: bool = False, describe: bool | None = None,
                  keep: frozenset[int] | None = None, after: dict[str, bytes] | None = None,
                  row_order: tuple[str, ...] | None = None) -> bytes:
        """Run ``statements`` and return the client's answer bytes.

        ``statements`` maps each database to a Query message, or (``describe`` not None) to
        Parse, Bind, Describe of the portal, Execute and Sync of the unnamed statement and
        portal: then the answer is an Execute's, with the portal's RowDescription or NoData
        first when ``describe`` is True. Each backend first takes the client's session
        ``settings``. ``keep``: return only those kinds of the first database's answer (a
        Describe run apart). ``after``: a Query message a database runs after the statement, in
        its transaction (its answer is not the client's; an error fails the statement).
        ``row_order``: the database of each row the client gave (an INSERT split by shard), so
        that its RETURNING rows come back in that order. Raises ``ProxyError``
        (``ScatterError`` with the backend's own ErrorResponse when a database refused).
        """
        try:
            prelude = await self._take(pools, tuple(statements), settings)
            skip = {leg.database: len(prelude.get(leg.database, ())) + 1 for leg in self.legs.values()}
            await self._round({leg.database: [*prelude.get(leg.database, ()), m.query("BEGIN"),
                                              statements[leg.database],
                                              *((after[leg.database],) if after and leg.database in after else ())]
                               for leg in self.legs.values()})
            answers = {leg.database: _responses(bytes(leg.answer))[skip[leg.database]:]
                       for leg in self.legs.values()}
            failed = self._first_failure(answers)
            if after:
                answers = {database: answer[:1] for database, answer in answers.items()}
            for leg in self.legs.values():
                leg.answer.clear()
            if failed is not None:
                await self._round({leg.database: [m.query("ROLLBACK")] for leg in self.legs.values()
                                   if leg.lost is None})
                raise failed
            await self.commit()
            if keep is not None:  # only these messages of the first database's answer
                first = next(iter(answers.values()))
                return b"".join(m.message(kind, body) for kind, body in (first[0] if first else ()) if kind in keep)
            return _combine(answers, replicated, describe, row_order)
        finally:
            self.give_back()

    async def run_joined(self, pools: dict[str, Pool], statements: dict[str, bytes], begin: bytes,
                         settings: dict[str, str], replicated: bool = False, describe: bool | None = None,
                         after: dict[str, bytes] | None = None, row_order: tuple[str, ...] | None = None) -> bytes:
        """Inside a client's transaction (two-phase commit): the adopted legs, and a backend of
        each other database of ``statements`` with ``begin`` first, run ``statements``; no
        COMMIT or ROLLBACK (the client's COMMIT ends them all). The legs stay linked here for
        the caller to take back; a failure raises, the legs in their failed transaction."""
        fresh = tuple(db for db in statements if db not in {leg.database for leg in self.legs.values()})
        prelude = await self._take(pools, fresh, settings)
        for database in fresh:
            prelude.setdefault(database, []).append(begin)
        skip = {leg.database: len(prelude.get(leg.database, ())) for leg in self.legs.values()}
        await self._round({leg.database: [*prelude.get(leg.database, ()), statements[leg.database],
                                          *((after[leg.database],) if after and leg.database in after else ())]
                           for leg in self.legs.values()})
        answers = {leg.database: _responses(bytes(leg.answer))[skip[leg.database]:] for leg in self.legs.values()}
        before = {leg.database: _responses(bytes(leg.answer))[:skip[leg.database]] for leg in self.legs.values()}
        failed = self._first_failure(before) or self._first_failure(answers)
        self._clear()
        if failed is not None:
            raise failed
        if after:
            answers = {database: answer[:1] for database, answer in answers.items()}
        return _combine(answers, replicated, describe, row_order)

    async def _take(self, pools: dict[str, Pool], databases: tuple[str, ...], settings: dict[str, str]
                    ) -> dict[str, list[bytes]]:
        """A backend of each database, in order, linked here; the SETs that each needs first."""
        prelude: dict[str, list[bytes]] = {}
        for database in databases:
            pool = pools[database]
            server = await pool.acquire()
            self._link(database, pool, server)
            server.unnamed_owner = 0  # its unnamed statement is about to be this one's
            replay = set_statement(settings, server.settings) if server.settings != settings else None
            server.settings = settings
            if replay is not None:
                prelude[database] = [m.query(replay)]
        return prelude

    async def commit(self) -> None:
        """COMMIT every leg's transaction: in two phases with a coordinator, else one by one."""
        if self.coordinator is not None and len(self.legs) > 1:
            await self.commit_prepared(self.coordinator)
            return
        await self._round({leg.database: [m.query("COMMIT")] for leg in self.legs.values()})
        self._check_commits()

    async def rollback(self) -> None:
        await self._round({leg.database: [m.query("ROLLBACK")] for leg in self.legs.values() if leg.lost is None})

    async def commit_prepared(self, coordinator: Coordinator) -> None:
        """PREPARE TRANSACTION on every leg, the decision into the log, COMMIT PREPARED on
        every leg (backend/twophase.py). Raises when nothing committed; once the decision is
        written it returns, and recovery finishes a leg that could not."""
        if not coordinator.ready:
            await self.rollback()
            raise ProxyError(OBJECT_NOT_IN_PREREQUISITE_STATE, "a transaction on several databases cannot commit: the two-phase commit "
                             f"log in database {coordinator.config.default} is not reachable; it was rolled back",
                             hint="check that database; pgfleet reconnects by itself")
        legs = list(self.legs.values())
        gid = coordinator.begin()
        gids = {leg.database: f"{gid}_{n}" for n, leg in enumerate(legs)}
        finished = False
        try:
            self._clear()
            await self._round({leg.database: [m.query(f"PREPARE TRANSACTION '{gids[leg.database]}'")]
                               for leg in legs if leg.lost is None})
            prepared = [leg for leg in legs if self._tag(leg) == b"PREPARE TRANSACTION"]
            if len(prepared) < len(legs):
                failure = self._first_failure({leg.database: _responses(bytes(leg.answer)) for leg in legs}) \
                    or ProxyError(SERIALIZATION_FAILURE, "a database rolled back its part of the transaction at PREPARE",
                                  hint="run the transaction again")
                await self._finish(prepared, "ROLLBACK PREPARED", gids)
                raise failure
            try:
                await coordinator.decide(gid, [leg.database for leg in legs])
            except NotDecided as exc:
                await self._finish(prepared, "ROLLBACK PREPARED", gids)
                raise ProxyError(STATEMENT_COMPLETION_UNKNOWN, f"the transaction was rolled back on {', '.join(gids)}: {exc}",
                                 hint="run it again once the default database answers") from None
            except Unknown as exc:
                log.error("two-phase commit %s on %s: %s; recovery commits or rolls it back", gid,
                          ", ".join(gids), exc)
                raise ProxyError(TRANSACTION_RESOLUTION_UNKNOWN, f"the transaction's outcome is unknown: {exc}",
                                 hint="pgfleet's recovery finishes it on every database the same way; "
                                      "check before running it again") from None
            finished = await self._finish(legs, "COMMIT PREPARED", gids)
            if not finished:
                log.warning("two-phase commit %s is decided but %s did not finish it yet; recovery will",
                            gid, ", ".join(leg.database for leg in legs if leg.lost is not None or
                                           self._tag(leg) != b"COMMIT PREPARED"))
        finally:
            coordinator.end(gid, finished)

    async def _finish(self, legs: list[_Leg], action: str, gids: dict[str, str]) -> bool:
        """COMMIT PREPARED or ROLLBACK PREPARED on ``legs``; whether every one did it."""
        self._clear()
        live = [leg for leg in legs if leg.lost is None]
        await self._round({leg.database: [m.query(f"{action} '{gids[leg.database]}'")] for leg in live})
        done = [leg for leg in live if leg.lost is None and self._tag(leg) == action.encode()]
        for leg in live:
            if leg not in done and leg.lost is None:
                log.error("%s '%s' failed on database %s: %s", action, gids[leg.database], leg.database,
                          self._error_text(leg))
        return len(done) == len(legs)

    def _clear(self) -> None:
        for leg in self.legs.values():
            leg.answer.clear()

    def _tag(self, leg: _Leg) -> bytes | None:
        """The command tag of the leg's last answer (None: an error, or none)."""
        tag = None
        for kind, body in m.split(bytes(leg.answer)):
            if kind == m.ERROR_RESPONSE:
                return None
            if kind == m.COMMAND_COMPLETE:
                tag = body.rstrip(b"\0")
        return tag

    def _error_text(self, leg: _Leg) -> str:
        for kind, body in m.split(bytes(leg.answer)):
            if kind == m.ERROR_RESPONSE:
                return m.decode_fields(body).get("M", "")
        return "no answer"

    def give_back(self) -> None:
        for leg in self.legs.values():
            if leg.lost is not None or leg.server.closed:
                leg.pool.discard(leg.server)
            elif leg.server.busy or leg.server.tx_status != m.TX_IDLE:
                leg.pool.discard(leg.server)  # never hand on a backend in an unknown state
            else:
                leg.pool.release(leg.server)

    async def _round(self, queries: dict[str, list[bytes]]) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.waiting = 0
        for leg in self.legs.values():
            sent = queries.get(leg.database)
            if not sent or leg.lost is not None:
                continue
            self.waiting += 1
            for query in sent:
                leg.server.push(FORWARD_QUERY)
                leg.server.send(query)
            leg.server.flush()
        if self.waiting:
            await self.done

    def _first_failure(self, answers: dict[str, list[list[tuple[int, bytes]]]]) -> ProxyError | None:
        for leg in self.legs.values():
            if leg.lost is not None:
                return leg.lost
            for response in answers[leg.database]:
                for kind, body in response:
                    if kind == m.ERROR_RESPONSE:
                        fields = m.decode_fields(body)
                        return ScatterError(fields.get("C", INTERNAL_ERROR), fields.get("M", ""),
                                            raw=m.message(kind, body))
        return None

    def _check_commits(self) -> None:
        committed = [leg.database for leg in self.legs.values() if leg.lost is None
                     and m.ERROR_RESPONSE not in (k for r in _responses(bytes(leg.answer)) for k, _ in r)]
        failed = [leg.database for leg in self.legs.values() if leg.database not in committed]
        if failed:
            log.error("a statement on %s committed on %s but not on %s: the databases disagree until "
                      "it is repaired by hand", ", ".join(leg.database for leg in self.legs.values()),
                      ", ".join(committed) or "none", ", ".join(failed))
            raise ScatterError(STATEMENT_COMPLETION_UNKNOWN, f"the statement committed on {', '.join(committed) or 'no database'} "
                               f"but failed to commit on {', '.join(failed)}",
                               hint="check those databases; enable two_phase_commit to make this atomic")


def _responses(data: bytes) -> list[list[tuple[int, bytes]]]:
    """A backend's answer bytes, split into one list of (kind, body) per ReadyForQuery."""
    out: list[list[tuple[int, bytes]]] = []
    current: list[tuple[int, bytes]] = []
    for kind, body in m.split(data):
        if kind == m.READY_FOR_QUERY:
            out.append(current)
            current = []
        else:
            current.append((kind, body))
    return out


def _combine(answers: dict[str, list[list[tuple[int, bytes]]]], replicated: bool = False,
             describe: bool | None = None, row_order: tuple[str, ...] | None = None) -> bytes:
    """Several databases' answers to the same statement(s) as one database's answer.

    ``replicated``: each database holds a copy of the same rows (a reference table), so the
    answer is one database's: its rows and its count, which the others must match.
    ``describe``: None for simple queries (a RowDescription when there are rows); True or
    False for an Execute whose portal the client did or did not Describe.
    """
    legs = list(answers.values())
    parts: list[bytes] = []
    first = legs[0]
    if describe and first and not _groups(first[0]):  # Describe without Execute
        found = [m.message(k, b) for k, b in first[0] if k in (m.ROW_DESCRIPTION, m.NO_DATA)]
        return found[0] if found else m.NO_DATA_MSG
    for index in range(len(first)):  # one per query message (a multi-statement string is one)
        groups = [_groups(leg[index]) for leg in legs]
        for number, group in enumerate(groups[0]):
            description = group["T"]
            tags = []
            for other in groups:
                if number >= len(other):
                    raise ScatterError(INTERNAL_ERROR, "the databases answered the same statement differently",
                                       hint="check that the shards have the same schema")
                if _columns(other[number]["T"]) != _columns(description):
                    raise ScatterError(DATATYPE_MISMATCH, "the databases returned different row descriptions for "
                                       "the same statement", hint="check that their schemas agree")
                tags.append(other[number]["C"])
            if replicated and len({tag for tag in tags}) > 1:
                log.warning("reference-table copies disagree: the same statement answered %s",
                            ", ".join(body.rstrip(b"\0").decode(errors="replace") for _, body in tags))
            parts.extend(m.message(m.NOTICE_RESPONSE, n) for g in groups[:1 if replicated else None]
                         for n in g[number]["N"])
            if describe is not False and description is not None:
                parts.append(m.message(m.ROW_DESCRIPTION, description))
            elif describe:
                parts.append(m.NO_DATA_MSG)
            if description is not None:
                if row_order is not None:  # an INSERT's RETURNING rows, in the order of the client's rows
                    parts.extend(m.message(m.DATA_ROW, row)
                                 for row in _in_row_order({db: groups[i][number]["D"] for i, db in enumerate(answers)},
                                                          row_order))
                else:
                    for other in groups[:1 if replicated else None]:
                        parts.extend(m.message(m.DATA_ROW, row) for row in other[number]["D"])
            parts.append(m.message(*tags[0]) if replicated else _sum_tags(tags))
    return b"".join(parts)


def _in_row_order(rows: dict[str, list[bytes]], row_order: tuple[str, ...]) -> list[bytes]:
    """Each database's RETURNING rows (in the order of its own rows of the INSERT) in the order
    of the client's rows. When a database returned fewer rows than it was given (ON CONFLICT DO
    NOTHING skipped some), which of its rows are missing is unknown: its rows keep their order
    and come where its first rows would."""
    if sum(len(found) for found in rows.values()) == len(row_order) and \
            all(len(found) == row_order.count(db) for db, found in rows.items()):
        taken = dict.fromkeys(rows, 0)
        out = []
        for db in row_order:
            out.append(rows[db][taken[db]])
            taken[db] += 1
        return out
    out, seen = [], set()
    for db in row_order:
        if db not in seen and db in rows:
            seen.add(db)
            out.extend(rows[db])
    return out + [row for db, found in rows.items() if db not in seen for row in found]


def _groups(response: list[tuple[int, bytes]]) -> list[dict]:  # type: ignore[type-arg]
    """One statement's messages each: {"T": RowDescription body or None, "D": rows, "C": tag, "N": notices}."""
    groups = []
    current: dict = {"T": None, "D": [], "C": None, "N": []}  # type: ignore[type-arg]
    for kind, body in response:
        if kind == m.ROW_DESCRIPTION:
            current["T"] = body
        elif kind == m.DATA_ROW:
            current["D"].append(body)
        elif kind == m.NOTICE_RESPONSE:
            current["N"].append(body)
        elif kind in (m.COMMAND_COMPLETE, m.EMPTY_QUERY):
            current["C"] = (kind, body)
            groups.append(current)
            current = {"T": None, "D": [], "C": None, "N": []}
    return groups


def _sum_tags(tags: list[tuple[int, bytes]]) -> bytes:
    kind, body = tags[0]
    if kind != m.COMMAND_COMPLETE:
        return m.message(kind, body)
    found = _COUNTED.match(body.rstrip(b"\0"))
    if found is None:
        return m.message(kind, body)  # DDL and the like: the same tag from every database
    total = 0
    for _, other in tags:
        counted = _COUNTED.match(other.rstrip(b"\0"))
        total += int(counted.group(2)) if counted else 0
    return m.command_complete(f"{found.group(1).decode()} {total}")


def _columns(description: bytes | None) -> list[tuple[bytes, bytes]] | None:
    """A RowDescription's columns as (name, type oid + size + modifier + format).

    The table OID and column number are left out: they differ between databases that hold
    the same table. User-defined types get their own OIDs in each database too, so only
    built-in type OIDs (below 16384) are compared exactly.
    """
    if description is None:
        return None
    count = struct.unpack_from("!h", description, 0)[0]
    pos = 2
    columns = []
    for _ in range(count):
        end = description.index(b"\0", pos)
        name = description[pos:end]
        fields = description[end + 7:end + 19]  # type oid, size, modifier, format
        oid = struct.unpack_from("!I", fields, 0)[0]
        columns.append((name, fields if oid < 16384 else fields[4:]))
        pos = end + 19
    return columns
