"""A pool of raw backend connections for one database.

Each connection state is a container (PgBouncer's lists): ``idle`` (a LIFO deque), ``active``
(a set), ``opening`` (a count of logins in flight), and ``waiters`` — one ``Waiter`` per queued
client, which ``release`` hands a connection to by calling it back (no task, no future, no
timer per waiter: one timer per pool fails the waiters past ``acquire_timeout``, oldest first).
``parked`` is the part of ``active`` that stays with its client between transactions while
nobody else needs it (affinity: the next transaction skips the pool); when a connection is
needed and none is idle, a parked one that is idle is taken back from its client. Counts for
``SHOW POOLS`` and metrics are their lengths. A ``generation`` number, bumped on reload,
retires old connections as they come back. The circuit (``outage``) is opened and closed by
the health checker (backend/health.py) only: while it is open every acquire fails at once
with 08006, and connections coming back are closed instead of kept. The pool never touches a
client socket.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..config import Dsn
from ..errors import (
    ADMIN_SHUTDOWN,
    CONNECTION_FAILURE,
    TOO_MANY_CONNECTIONS,
    BackendError,
    ClientError,
)
from ..wire import messages as m
from .connection import Connector, ServerConnection, Stats, send_cancel, tcp_connect

log = logging.getLogger("pgfleet.pool")


# Cancels sent for busy backends a host-capped pool retires (kept until they are sent).
_CANCELS: set[asyncio.Task[None]] = set()

# Upper bounds (seconds) of the wait-time histogram (/metrics: pgfleet_pool_wait_seconds).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Holder(Protocol):
    """A client that keeps a parked connection between its transactions (see ``Pool.park``)."""

    def give_back(self, server: ServerConnection) -> bool: ...  # True: taken back from it, now


class Waiter:
    """A client queued for a connection: ``grant`` gets one, or ``fail`` the error (timeout,
    the circuit opening, shutdown). ``cancel`` takes it out of the queue (its client left)."""

    __slots__ = ("counted", "deadline", "done", "fail", "grant", "queued")

    def __init__(self, grant: Callable[[ServerConnection], None], fail: Callable[[BaseException], None],
                 queued: float, deadline: float, counted: bool) -> None:
        self.grant = grant
        self.fail = fail
        self.queued = queued
        self.deadline = deadline
        self.counted = counted  # its wait goes into the pool's wait statistics when it ends
        self.done = False

    def cancel(self) -> None:
        self.done = True


class DisconnectReason(enum.Enum):
    IDLE_TIMEOUT = "idle_timeout"
    LIFETIME = "lifetime"
    BROKEN = "broken"
    GENERATION = "generation"
    SHUTDOWN = "shutdown"
    DIRTY = "dirty"
    DATABASE_GOING = "database_going"  # DROP DATABASE / ALTER DATABASE ... RENAME of its database
    DOWN = "down"  # its database's health checks failed: the circuit opened (backend/health.py)
    HOST_CAP = "host_cap"  # closed for another pool's client under max_backends_per_host


class HostGate:
    """The cap on backend connections to one server (host:port) over every pool that shares
    it (the tenant directory's ``max_backends_per_host``).

    A pool may open a connection only while the gate ``admits``: its pools' connections (idle,
    active, logging in) plus those terminated whose server has not closed its end yet
    (``closing``) stay under ``limit``. A pool that may not is ``want``-ed: the oldest idle
    connection of another pool is closed to make room, and the pool opens one for its first
    waiter once a place is ``freed``. A connection given back while other pools want a place
    is closed rather than kept idle (``hand_over``)."""

    def __init__(self, host: str, port: int, limit: int | None) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.pools: set[Pool] = set()
        self.closing = 0
        self.wanting: deque[Pool] = deque()
        self._waking = False

    @property
    def used(self) -> int:
        return sum(pool.total for pool in self.pools) + self.closing

    def admits(self) -> bool:
        return self.limit is None or self.used < self.limit

    def want(self, pool: Pool) -> None:
        """``pool`` has a waiter and may not open a connection: make room for it."""
        if pool not in self.wanting:
            self.wanting.append(pool)
        self._prune()
        if self.closing >= len(self.wanting):
            return  # places are on their way already
        oldest: Pool | None = None
        for other in self.pools:
            if other is not pool and other.idle and (oldest is None or
                                                      other.idle[0].last_used < oldest.idle[0].last_used):
                oldest = other
        if oldest is not None:
            server = oldest.idle.popleft()
            oldest.retire(server, DisconnectReason.HOST_CAP)
            return
        for other in self.pools:  # else one kept by a client between its transactions
            if other is not pool and other.give_up_parked():
                return

    def _prune(self) -> None:
        """Pools that want a place no more (their clients left, or they closed) leave the queue."""
        if any(p.closed or not p.waiting for p in self.wanting):
            self.wanting = deque(p for p in self.wanting if not p.closed and p.waiting)

    def hand_over(self, pool: Pool) -> bool:
        """Whether a connection ``pool`` gets back should be closed for another pool's waiter."""
        return any(other is not pool and other.waiting for other in self.wanting)

    def freed(self) -> None:
        """A place may be free: the pools that want one open a connection, first come first."""
        if self._waking:
            return
        self._waking = True
        try:
            self._prune()
            while self.wanting and self.admits():
                pool = self.wanting.popleft()
                pool.replace()
            for pool in [p for p in self.pools if not p.total and (p.closed or p.gate is not self)]:
                self.pools.discard(pool)  # closed, or moved to another host with nothing left here
        finally:
            self._waking = False


class Pool:
    def __init__(self, name: str, dsn: Dsn, *, size: int, acquire_timeout: float, idle_timeout: float,
                 lifetime: float, connect_timeout: float, startup: dict[str, str],
                 connect: Connector = tcp_connect, gate: HostGate | None = None) -> None:
        self.name = name
        self.gate = gate  # the cap on connections to its server it shares with other pools
        if gate is not None:
            gate.pools.add(self)
        self.connect = connect
        self.dsn = dsn
        self.size = size
        self.acquire_timeout = acquire_timeout
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.connect_timeout = connect_timeout
        self.startup = startup
        self.generation = 0
        self.idle: deque[ServerConnection] = deque()
        self.active: set[ServerConnection] = set()
        self.opening = 0
        self.waiters: deque[Waiter] = deque()
        self._expiry: asyncio.TimerHandle | None = None  # fails the oldest waiter at its deadline
        # Connections their client keeps between transactions (insertion-ordered, oldest first),
        # each with that client and the time it was last parked.
        self.parked: dict[ServerConnection, tuple[Holder, float]] = {}
        self.params: dict[str, str] = {}  # the server's ParameterStatus values, from the first login
        # Backend-side statement names that some backend of this database parsed without error.
        self.parsed_ok: set[str] = set()
        self.closed = False
        # The circuit: None while closed; while open, the hint of the error every acquire gets.
        self.outage: str | None = None
        # PAUSE (admin console): acquires wait until RESUME; the running transactions go on.
        self.paused = False
        self._resumed: asyncio.Event | None = None
        # The pools of the same database for other backend roles (fleet.pool_of): they follow
        # this one's circuit and PAUSE.
        self.siblings: list[Pool] = []
        self.role: str | None = None  # the backend role its connections log in as; None: the dsn's user
        self.credentials = "the database's dsn"  # where that user's password comes from (for errors)
        self.stats = Stats()  # shared by its connections: SHOW STATS, /metrics
        self.waits = 0  # acquires that found no idle connection, and the seconds they took
        self.wait_seconds = 0.0
        # How many of them took longer than the bound before and at most this one (the last:
        # longer than all); ``wait_buckets`` sums them up.
        self.wait_counts = [0] * (len(WAIT_BUCKETS) + 1)
        self.disconnects: dict[DisconnectReason, int] = {reason: 0 for reason in DisconnectReason}

    @property
    def between(self) -> list[ServerConnection]:
        """The parked connections whose client is between transactions now (a client that
        uses its parked connection again leaves it marked parked: see ``parked``)."""
        return [server for server in self.parked if server.tx_status == m.TX_IDLE and not server.expects]

    @property
    def waiting(self) -> int:
        """Clients queued for a connection now (not those that left or timed out)."""
        return sum(1 for waiter in self.waiters if not waiter.done)

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.opening

    def try_acquire(self) -> ServerConnection | None:
        """An idle connection now, without waiting, or None; raises while the circuit is open."""
        if self.outage is not None:
            raise self.unavailable()
        if self.paused:
            return None
        idle = self.idle
        while idle:
            server = idle.pop()
            if server.gone:
                continue
            if self._expired(server, time.monotonic()):
                self._retire(server, DisconnectReason.LIFETIME)
                continue
            self.active.add(server)
            return server
        if self.parked and (self.total >= self.size or (self.gate is not None and not self.gate.admits())):
            return self._take_parked()
        return None

    def park(self, server: ServerConnection, holder: Holder) -> bool:
        """Affinity: ``holder``'s client, between transactions, keeps ``server`` for its next one
        until another client needs it (then ``take`` asks for it back). False when the pool
        wants it back now (clients wait, or the pool is full with none idle, or it is of an old
        generation or past its lifetime): the caller releases it."""
        if self.waiters or (not self.idle and self.total >= self.size) or (
                self.gate is not None and self.gate.wanting):
            # Clients wait, or the next one to come would have to take it back from this one
            # (``_take_parked``): a full pool hands connections round instead. So does a pool
            # whose host's other pools wait for a place.
            return False
        now = time.monotonic()
        if server.generation != self.generation or now - server.created >= self.lifetime:
            return False
        self.parked[server] = (holder, now)
        return True

    def give_up_parked(self) -> bool:
        """Close one connection parked with a client between transactions (its next
        transaction takes one from the pool), for another pool of the host; whether one was."""
        for server, (holder, _) in list(self.parked.items()):
            if server.tx_status != m.TX_IDLE or server.expects:
                continue
            del self.parked[server]
            if holder.give_back(server):
                self.active.discard(server)
                self._retire(server, DisconnectReason.HOST_CAP)
                return True
        return False

    def _take_parked(self) -> ServerConnection | None:
        """A parked connection whose client is between transactions, taken back from it."""
        parked = self.parked
        while parked:
            server = next(iter(parked))
            holder, _ = parked.pop(server)
            if server.gone:
                continue
            if holder.give_back(server):
                return server  # it stays in ``active``, now for another client
        return None

    async def acquire(self) -> ServerConnection:
        server = self.try_acquire()
        if server is not None:
            return server
        started = time.monotonic()
        try:
            while self.paused and self._resumed is not None:
                await self._resumed.wait()
                server = self.try_acquire()
                if server is not None:
                    return server
            return await self._acquire_slow()
        finally:
            self._waited(time.monotonic() - started)

    def _waited(self, seconds: float) -> None:
        self.waits += 1
        self.wait_seconds += seconds
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1

    @property
    def wait_buckets(self) -> list[int]:
        """How many waits took at most each bound of ``WAIT_BUCKETS`` (cumulative)."""
        return list(itertools.accumulate(self.wait_counts[:len(WAIT_BUCKETS)]))

    async def _acquire_slow(self) -> ServerConnection:
        if self.closed:
            raise BackendError(CONNECTION_FAILURE, f"database {self.name} is shutting down")
        gate = self.gate
        if self.total < self.size and (gate is None or gate.admits()):
            return await self._open()
        got: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()

        def grant(server: ServerConnection) -> None:
            if got.done():  # the acquiring task was cancelled meanwhile
                self.release(server)
            else:
                got.set_result(server)

        def fail(error: BaseException) -> None:
            if not got.done():
                got.set_exception(error)

        waiter = self._queue(grant, fail, counted=False)  # (acquire counts its whole wait)
        if gate is not None and self.total < self.size:
            gate.want(self)  # the host is at its cap: a place is made, and opened for the waiter
        try:
            return await got
        finally:
            waiter.cancel()  # (cancelled while queued: it is skipped)

    def queue(self, grant: Callable[[ServerConnection], None],
              fail: Callable[[BaseException], None]) -> Waiter | None:
        """The cheap wait of a client session: ``grant`` is called with a connection as soon as
        one comes back, or ``fail`` with the error. None when this pool cannot simply queue
        (paused, closed, its circuit open, or it may open a connection): ``acquire`` then."""
        if self.paused or self.closed or self.outage is not None or self.total < self.size:
            return None
        return self._queue(grant, fail)

    def _queue(self, grant: Callable[[ServerConnection], None], fail: Callable[[BaseException], None],
               counted: bool = True) -> Waiter:
        now = time.monotonic()
        waiter = Waiter(grant, fail, now, now + self.acquire_timeout, counted)
        self.waiters.append(waiter)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self.acquire_timeout, self._expire)
        return waiter

    def _expire(self) -> None:
        """The oldest waiters past their deadline fail (``TOO_MANY_CONNECTIONS``)."""
        self._expiry = None
        now = time.monotonic()
        waiters = self.waiters
        while waiters and (waiters[0].done or waiters[0].deadline <= now):
            waiter = waiters.popleft()
            if not waiter.done:
                waiter.done = True
                if waiter.counted:
                    self._waited(now - waiter.queued)
                waiter.fail(self._timed_out())
        if waiters:
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, waiters[0].deadline - now), self._expire)

    def _timed_out(self) -> ClientError:
        gate = self.gate
        if gate is not None and self.total < self.size:
            return ClientError(
                TOO_MANY_CONNECTIONS, f"database {self.name}: no backend connection became free within "
                f"{self.acquire_timeout:g}s: server {gate.host}:{gate.port} is at its cap of {gate.limit} "
                "connections over all tenant pools", hint="raise directory.max_backends_per_host (if the server's "
                "max_connections allows) or pool.acquire_timeout, or shorten transactions")
        return ClientError(
            TOO_MANY_CONNECTIONS, f"database {self.name}: no backend connection became free within "
            f"{self.acquire_timeout:g}s (pool size {self.size})",
            hint=f"raise pool.size (now {self.size}) or pool.acquire_timeout, or shorten transactions")

    def _fail_waiters(self, error: Callable[[], BaseException]) -> None:
        """Every queued client gets the error (a new one each: a raised exception grows)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done:
                waiter.done = True
                waiter.fail(error())

    async def _open(self, reserved: bool = False) -> ServerConnection:
        if not reserved:
            self.opening += 1
        server = ServerConnection(self.name, self.dsn, self.startup, self.generation, self.stats)
        server.pool = self
        server.gate = self.gate
        server.credentials = self.credentials
        server.parsed_ok = self.parsed_ok
        try:
            await server.open(self.connect_timeout, self.connect)
        except BaseException:
            self.opening -= 1
            if self.gate is not None:
                self.gate.freed()  # the place it held goes to the next pool that wants one
            raise
        self.opening -= 1
        if not self.params:
            self.params = dict(server.params)
        self.active.add(server)
        return server

    def release(self, server: ServerConnection) -> None:
        """Take a connection back; it must be idle (ReadyForQuery ``I``, nothing pending)."""
        self.parked.pop(server, None)
        self.active.discard(server)
        server.detach()
        if server.closed:
            self._replace()
            return
        if server.busy or server.tx_status != m.TX_IDLE:
            self._retire(server, DisconnectReason.DIRTY)
            self._replace()
            return
        if server.generation != self.generation or self.closed:
            self._retire(server, DisconnectReason.GENERATION)
            self._replace()
            return
        if self.outage is not None:
            self._retire(server, DisconnectReason.DOWN)
            return
        waiters = self.waiters
        if not waiters and self.gate is not None and self.gate.wanting and self.gate.hand_over(self):
            self._retire(server, DisconnectReason.HOST_CAP)  # its place goes to another pool's client
            return
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done:
                waiter.done = True
                self.active.add(server)
                if waiter.counted:
                    self._waited(time.monotonic() - waiter.queued)
                waiter.grant(server)
                return
        self.idle.append(server)

    def discard(self, server: ServerConnection, reason: DisconnectReason = DisconnectReason.BROKEN) -> None:
        """Drop a connection that cannot be reused (broken, or its client vanished mid-query)."""
        self.parked.pop(server, None)
        self.active.discard(server)
        server.detach()
        self._retire(server, reason)
        self._replace()

    def _replace(self) -> None:
        """A slot freed up: if clients wait, open a connection for the first of them (under a
        host cap: if the host has a place, else once one is freed); other pools of the host
        may take the place otherwise."""
        self.replace()
        if self.gate is not None:
            self.gate.freed()

    def replace(self) -> None:
        if self.waiters and self.total < self.size and not self.closed and self.outage is None:
            gate = self.gate
            if gate is not None and not gate.admits():
                gate.want(self)
                return
            self.opening += 1  # the place is taken now, before the task runs
            asyncio.get_running_loop().create_task(self._open_for_waiter())

    async def _open_for_waiter(self) -> None:
        try:
            server = await self._open(reserved=True)
        except BackendError as exc:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done:
                    waiter.done = True
                    waiter.fail(exc)
                    return
            return
        self.release(server)

    def _retire(self, server: ServerConnection, reason: DisconnectReason) -> None:
        self.disconnects[reason] += 1
        if not server.closed:
            if self.gate is not None and (server.expects or server.tx_status != m.TX_IDLE) and server.pid:
                # Under a host cap a busy backend is cancelled too: it reads the Terminate only
                # when its statement ends, and holds its place on the server until then.
                task = asyncio.get_running_loop().create_task(send_cancel(server, self.connect))
                _CANCELS.add(task)
                task.add_done_callback(_CANCELS.discard)
            server.terminate(reason.value)
        elif self.gate is not None:
            self.gate.freed()  # it was closed already: its place is free now

    def retire(self, server: ServerConnection, reason: DisconnectReason) -> None:
        """Close a connection taken out of this pool (HostGate: to make room on its server)."""
        self._retire(server, reason)

    def _expired(self, server: ServerConnection, now: float) -> bool:
        return now - server.created > self.lifetime or server.generation != self.generation

    def reap(self) -> None:
        """Close idle connections past idle_timeout or lifetime (called periodically)."""
        for sibling in self.siblings:
            sibling.reap()
        now = time.monotonic()
        keep: deque[ServerConnection] = deque()
        for server in self.idle:
            if server.closed:
                continue
            if now - server.last_used > self.idle_timeout:
                self._retire(server, DisconnectReason.IDLE_TIMEOUT)
            elif self._expired(server, now):
                self._retire(server, DisconnectReason.LIFETIME)
            else:
                keep.append(server)
        self.idle = keep
        for server, (holder, parked_at) in list(self.parked.items()):
            if now - parked_at > self.idle_timeout:
                reason = DisconnectReason.IDLE_TIMEOUT
            elif self._expired(server, now):
                reason = DisconnectReason.LIFETIME
            else:
                continue
            del self.parked[server]
            if holder.give_back(server):
                self.active.discard(server)
                self._retire(server, reason)
        if self.outage is not None and self.parked:
            # Parked after the circuit opened (their transaction was running then): drained now.
            self.close_idle(DisconnectReason.DOWN)

    # -- PAUSE / RESUME (admin console)

    def pause(self) -> None:
        """New transactions wait for ``resume``; those running finish. Connections parked with
        clients between transactions come back to the pool (still open)."""
        for sibling in self.siblings:
            sibling.pause()
        if self.paused:
            return
        self.paused = True
        self._resumed = asyncio.Event()
        for server, (holder, _) in list(self.parked.items()):
            del self.parked[server]
            if holder.give_back(server):
                self.release(server)

    def resume(self) -> None:
        for sibling in self.siblings:
            sibling.resume()
        self.paused = False
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    # -- the circuit (opened and closed by backend/health.py)

    def unavailable(self) -> BackendError:
        """The error of an acquire while the circuit is open (a new one each time: an exception
        raised again and again would grow its traceback)."""
        return BackendError(CONNECTION_FAILURE, f"database {self.name} is unavailable", hint=self.outage)

    def open_circuit(self, hint: str) -> int:
        """The database is down: from now on every acquire fails at once (``hint`` says why and
        what to do), clients queued for a connection get that error now, and the connections
        no client is using are closed; the number closed. Connections in use stay with their
        clients and are closed when they come back. Calling it again updates the hint and
        drains what came back meanwhile."""
        self.outage = hint
        for sibling in self.siblings:  # their idle connections close below, with ours
            sibling.open_circuit(hint)
        if self._resumed is not None:  # clients waiting out a PAUSE get the error now too
            self._resumed.set()
            self._resumed = asyncio.Event()
        self._fail_waiters(self.unavailable)
        return self.close_idle(DisconnectReason.DOWN)

    def close_circuit(self) -> None:
        """The database answers again: acquires open connections as before."""
        self.outage = None
        for sibling in self.siblings:
            sibling.close_circuit()

    def close_idle(self, reason: DisconnectReason) -> int:
        """Close every connection no client is using (idle, or parked with a client between
        transactions); the number closed."""
        closed = sum(sibling.close_idle(reason) for sibling in self.siblings)
        while self.idle:
            server = self.idle.pop()
            if not server.closed:
                self._retire(server, reason)
                closed += 1
        for server, (holder, _) in list(self.parked.items()):
            del self.parked[server]
            if holder.give_back(server):
                self.active.discard(server)
                self._retire(server, reason)
                closed += 1
        return closed

    def close(self) -> None:
        for sibling in self.siblings:
            sibling.close()
        self.closed = True
        for server in list(self.idle) + list(self.active):
            self._retire(server, DisconnectReason.SHUTDOWN)
        self.idle.clear()
        self.parked.clear()
        self.active.clear()
        self._fail_waiters(lambda: BackendError(ADMIN_SHUTDOWN, f"database {self.name} is shutting down"))
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.gate is not None:
            self.gate.freed()  # (it wants no place any more)
