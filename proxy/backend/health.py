"""Health checks and circuit breaking: one checker task per database (DESIGN "Health, failures,
replicas").

Theory of operation. Every ``health.interval`` each database gets ``SELECT 1`` over a fresh
asyncpg control-plane connection (so the check proves what the pools need: the server takes
new logins), connect and query together within ``health.timeout``. The result, a ``Probe``,
goes into that database's ``DatabaseHealth`` through ``DatabaseHealth.record``, a pure step:

    answered within timeout/2                  -> healthy   (failures in a row reset)
    answered slower, or refused the login for
    too many clients (53300: up, but full)     -> degraded  (failures in a row reset)
    failed, fewer than failures_to_down in a row -> degraded
    failed, failures_to_down in a row          -> down

Down is the open circuit: ``Pool.open_circuit`` makes every acquire of that database fail at
once with ``08006 database NAME is unavailable``, fails the clients queued for it, and closes
its idle connections. While down, the circuit is half-open: the database is probed with a
short backoff (0.25 s, 0.5 s, then every second) rather than every ``health.interval``, and
the first probe that answers closes it again (``Pool.close_circuit``).
The checker alone decides the circuit; a pool only obeys. This module never touches a client
nor a pooled backend connection, and the hot path never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import asyncpg

from ..config import Config, Dsn, Health
from .catalog import connect
from .pool import Pool

log = logging.getLogger("pgfleet.health")

APPLICATION_NAME = "pgfleet health"

# While a database is down its circuit is half-open: it is probed after HALF_OPEN_FIRST
# seconds, then twice as long each time up to HALF_OPEN_MAX (never past health.interval), so
# that it takes statements again within a second of answering.
HALF_OPEN_FIRST = 0.25
HALF_OPEN_MAX = 1.0


class Status(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"


class Circuit(enum.StrEnum):
    CLOSED = "closed"  # statements go through
    OPEN = "open"      # statements fail at once with 08006


class Outcome(enum.Enum):
    ANSWERED = "answered"  # SELECT 1 came back
    FULL = "full"          # the server refused the login with 53300 (too many connections)
    FAILED = "failed"      # no answer: refused, reset, timed out, or any other error


class Change(enum.Enum):
    """What a check changed about the circuit (None from ``record``: nothing)."""

    WENT_DOWN = "went_down"
    CAME_BACK = "came_back"


@dataclass(frozen=True)
class Probe:
    """One check's result: how it ended, how long it took, and why it failed."""

    outcome: Outcome
    seconds: float
    error: str | None = None


@dataclass
class DatabaseHealth:
    """What the checks of one database found: the view SHOW HEALTH, /health and metrics read."""

    name: str
    status: Status = Status.HEALTHY   # healthy until a check says otherwise (checks == 0: not yet)
    last_check: float | None = None   # wall clock (time.time()) when the last check ended
    response_ms: float | None = None  # the last check's connect + SELECT 1; None if it failed
    consecutive_failures: int = 0
    last_error: str | None = None     # why it is not healthy now; None while healthy
    checks: int = 0
    failures: int = 0
    down_since: float | None = None   # wall clock when it went down; None while not down

    @property
    def circuit(self) -> Circuit:
        return Circuit.OPEN if self.status is Status.DOWN else Circuit.CLOSED

    def record(self, probe: Probe, now: float, policy: Health) -> Change | None:
        """Take one check's result (pure: no I/O, no clock of its own)."""
        was_down = self.status is Status.DOWN
        self.checks += 1
        self.last_check = now
        if probe.outcome is Outcome.FAILED:
            self.failures += 1
            self.consecutive_failures += 1
            self.response_ms = None
            self.last_error = probe.error
            if self.consecutive_failures < policy.failures_to_down:
                self.status = Status.DEGRADED
                return None
            self.status = Status.DOWN
            if was_down:
                return None
            self.down_since = now
            return Change.WENT_DOWN
        self.consecutive_failures = 0
        self.response_ms = probe.seconds * 1000.0
        if probe.outcome is Outcome.FULL:
            self.status, self.last_error = Status.DEGRADED, probe.error
        elif probe.seconds > policy.timeout / 2:
            self.status = Status.DEGRADED
            self.last_error = f"slow: answered in {self.response_ms:.0f} ms (over half of health.timeout)"
        else:
            self.status, self.last_error = Status.HEALTHY, None
        if not was_down:
            return None
        self.down_since = None
        return Change.CAME_BACK


def describe_error(exc: BaseException) -> str:
    """A control-plane failure in a few words: the SQLSTATE and message, or the OS's reason."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.sqlstate} {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def probe(dsn: Dsn, timeout: float) -> Probe:
    """Connect to ``dsn`` and run ``SELECT 1``, all within ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(timeout):
            conn = await connect(dsn, timeout, APPLICATION_NAME)
            try:
                await conn.fetchval("SELECT 1")
            except BaseException:
                conn.terminate()
                raise
        seconds = loop.time() - started
    except TimeoutError:
        return Probe(Outcome.FAILED, loop.time() - started, f"no answer within {timeout:g}s")
    except asyncpg.TooManyConnectionsError as exc:
        return Probe(Outcome.FULL, loop.time() - started, describe_error(exc))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return Probe(Outcome.FAILED, loop.time() - started, describe_error(exc))
    with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        await conn.close(timeout=timeout)  # it answered: what the goodbye does is not the check's
    return Probe(Outcome.ANSWERED, seconds)


class HealthChecker:
    """The checks of every database of one config snapshot, and the circuits they drive."""

    def __init__(self, config: Config, pools: dict[str, Pool]) -> None:
        self.policy = config.health
        self.pools = pools
        self._dsns = {name: config.dsn(name) for name in config.databases}
        self._health = {name: DatabaseHealth(name) for name in config.databases}
        self._locks = {name: asyncio.Lock() for name in config.databases}  # one check at a time
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Each check's result as it is recorded: the leader of a process group tells the other
        # workers (admin/group.py), whose checkers never probe and only record.
        self.recorded: Callable[[str, Probe, float], None] | None = None
        # A follower's checker logs what the leader already said at debug only (server.py).
        self.log: logging.Logger | logging.LoggerAdapter[logging.Logger] = log

    # -- what others read

    def status(self, name: str) -> DatabaseHealth:
        return self._health[name]

    def statuses(self) -> Iterator[DatabaseHealth]:
        """Every database's health, in the config's order."""
        return iter(self._health.values())

    def states(self) -> list[dict[str, object]]:
        """Every database's health as plain values (the leader of a process group hands them
        to a worker that starts)."""
        return [dataclasses.asdict(health) for health in self._health.values()]

    def adopt(self, states: list[dict[str, object]]) -> None:
        """Take the leader's view (``states``) as this checker's, circuits included."""
        for state in states:
            name = state["name"]
            if not isinstance(name, str) or name not in self._health:
                continue  # a database the leader's config has and this one's not (a reload between)
            health = DatabaseHealth(**state)  # type: ignore[arg-type]
            health.status = Status(health.status)
            self._health[name] = health
            pool = self.pools[name]
            if health.status is Status.DOWN:
                pool.open_circuit(f"its health checks failed ({health.last_error}); statements go through "
                                  "again as soon as one answers (SHOW HEALTH in the admin console)")
            elif pool.outage is not None:
                pool.close_circuit()

    # -- lifecycle

    def start(self) -> None:
        """One task per database; each checks at once, then every ``health.interval``."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(name), name=f"pgfleet health {name}")
                       for name in self._health]

    async def stop(self) -> None:
        """End the checks. Python 3.11 can lose a cancel (``wait_for`` or ``timeout`` racing
        the result it waits for), so each task is cancelled again until it has ended, and a
        check that finishes anyway ends its task."""
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        while tasks:
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=0.1)
            tasks = list(pending)

    async def _watch(self, name: str) -> None:
        backoff = HALF_OPEN_FIRST
        while True:
            try:
                await self.check(name)
            except Exception:  # our bug: logged with its traceback, and the checks go on
                log.exception("internal error in the health check of database %s", name)
            if self._stopping:
                return
            if self._health[name].status is Status.DOWN:  # half-open: probed again soon, with backoff
                delay, backoff = min(backoff, self.policy.interval), min(backoff * 2, HALF_OPEN_MAX)
            else:
                delay, backoff = self.policy.interval, HALF_OPEN_FIRST
            await asyncio.sleep(delay)

    # -- checking

    async def check_now(self) -> list[DatabaseHealth]:
        """One round over every database now, side by side (the console, the tests)."""
        return list(await asyncio.gather(*(self.check(name) for name in self._health)))

    async def check(self, name: str) -> DatabaseHealth:
        """Check one database now, and open or close its circuit as the result says."""
        async with self._locks[name]:
            result = await probe(self._dsns[name], self.policy.timeout)
            now = time.time()
            health = self.record(name, result, now)
            if self.recorded is not None:
                self.recorded(name, result, now)
            return health

    def record(self, name: str, result: Probe, now: float) -> DatabaseHealth:
        """Take one check's result (``now``: wall clock) and set the pool's circuit to match
        the status; no I/O (``check`` probes, this decides)."""
        health, pool, policy = self._health[name], self.pools[name], self.policy
        before, down_since = health.status, health.down_since
        change = health.record(result, now, policy)
        if health.status is Status.DOWN:
            hint = (f"its last {health.consecutive_failures} health checks failed ({health.last_error}); "
                    f"pgfleet probes it every {min(HALF_OPEN_MAX, policy.interval):g}s while it is down and "
                    "lets statements through again as soon as it answers (SHOW HEALTH in the admin console)")
            drained = pool.open_circuit(hint)
            if change is Change.WENT_DOWN:
                self.log.warning("database %s is down: %d health checks in a row failed (last: %s); statements "
                            "routed there fail at once with 08006 until a probe answers (every %gs while "
                            "down); closed %d idle connection(s). Check that the server at %s:%d is up and "
                            "the database's dsn in the config", name, health.consecutive_failures,
                            health.last_error, min(HALF_OPEN_MAX, policy.interval), drained, pool.dsn.host,
                            pool.dsn.port)
            else:
                self.log.debug("database %s is still down: %s", name, health.last_error)
            return health
        if change is Change.CAME_BACK or pool.outage is not None:
            # Back; or open since before this checker existed (RELOAD starts a new one).
            pool.close_circuit()
            away = f" after {now - down_since:.1f}s" if down_since is not None else ""
            self.log.info("database %s is back%s (health check answered in %.0f ms): statements go through "
                     "again", name, away, health.response_ms or 0.0)
            return health
        if health.status is Status.DEGRADED and health.consecutive_failures:
            self.log.warning("health check of database %s failed (%d of %d in a row before it counts as "
                        "down): %s", name, health.consecutive_failures, policy.failures_to_down,
                        health.last_error)
        elif health.status is not before:
            self.log.info("database %s is %s%s", name, health.status,
                     f": {health.last_error}" if health.last_error else "")
        return health
