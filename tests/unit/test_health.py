"""The health state machine (backend/health.py ``DatabaseHealth.record``) and what the checker
does to a pool's circuit with each result (``HealthChecker.record``): no sockets, no PostgreSQL.
Probes are values; the clock is passed in."""

from __future__ import annotations

import asyncio

import pytest

from proxy.backend.connection import ServerConnection
from proxy.backend.health import (
    Change,
    Circuit,
    DatabaseHealth,
    HealthChecker,
    Outcome,
    Probe,
    Status,
)
from proxy.backend.pool import DisconnectReason, Pool
from proxy.config import ConfigError, Duration, Health, load_text
from proxy.errors import BackendError

POLICY = Health(interval=Duration(0.2), timeout=Duration(0.5), failures_to_down=2)

OK = Probe(Outcome.ANSWERED, 0.004)
SLOW = Probe(Outcome.ANSWERED, 0.3)  # over half of the 0.5 s timeout
FULL = Probe(Outcome.FULL, 0.01, "53300 sorry, too many clients already")
REFUSED = Probe(Outcome.FAILED, 0.001, "Connection refused")
TIMEOUT = Probe(Outcome.FAILED, 0.5, "no answer within 0.5s")


def run(*probes: Probe, policy: Health = POLICY) -> tuple[DatabaseHealth, list[tuple[Status, Change | None]]]:
    """Feed the probes one second apart; each step's (status, change)."""
    health = DatabaseHealth("secondary")
    steps = []
    for i, probe in enumerate(probes):
        change = health.record(probe, 1000.0 + i, policy)
        steps.append((health.status, change))
    return health, steps


def test_a_new_database_is_healthy_and_not_checked_yet() -> None:
    health = DatabaseHealth("primary")
    assert (health.status, health.circuit, health.checks, health.last_check) == \
        (Status.HEALTHY, Circuit.CLOSED, 0, None)
    assert health.status == "healthy" and health.circuit == "closed"  # what the console compares


def test_healthy_degraded_down_healthy() -> None:
    health, steps = run(OK, REFUSED, TIMEOUT, TIMEOUT, OK)
    assert steps == [(Status.HEALTHY, None), (Status.DEGRADED, None), (Status.DOWN, Change.WENT_DOWN),
                     (Status.DOWN, None), (Status.HEALTHY, Change.CAME_BACK)]
    assert (health.checks, health.failures, health.consecutive_failures) == (5, 3, 0)
    assert health.circuit is Circuit.CLOSED and health.down_since is None and health.last_error is None
    assert health.response_ms == pytest.approx(4.0)
    assert health.last_check == 1004.0


def test_down_records_when_and_why() -> None:
    health, _ = run(OK, REFUSED, REFUSED)
    assert health.status is Status.DOWN and health.circuit is Circuit.OPEN
    assert health.down_since == 1002.0
    assert health.last_error == "Connection refused"
    assert health.response_ms is None
    assert health.consecutive_failures == 2


def test_failures_must_be_in_a_row() -> None:
    _, steps = run(REFUSED, OK, REFUSED, OK, REFUSED)
    assert [status for status, _ in steps] == [Status.DEGRADED, Status.HEALTHY] * 2 + [Status.DEGRADED]
    assert all(change is None for _, change in steps)


def test_one_failure_is_enough_when_failures_to_down_is_1() -> None:
    _, steps = run(TIMEOUT, policy=Health(failures_to_down=1))
    assert steps == [(Status.DOWN, Change.WENT_DOWN)]


def test_a_slow_answer_is_degraded_and_closes_an_open_circuit() -> None:
    health, steps = run(SLOW, REFUSED, REFUSED, SLOW)
    assert steps[0] == (Status.DEGRADED, None)
    assert steps[-1] == (Status.DEGRADED, Change.CAME_BACK)
    assert health.circuit is Circuit.CLOSED
    assert health.last_error is not None and "300 ms" in health.last_error


def test_a_full_server_is_up_degraded_not_a_failure() -> None:
    health, steps = run(REFUSED, FULL, FULL, FULL)
    assert [status for status, _ in steps] == [Status.DEGRADED] * 4
    assert health.consecutive_failures == 0 and health.failures == 1
    assert health.last_error == FULL.error
    _, steps = run(REFUSED, REFUSED, FULL)
    assert steps[-1] == (Status.DEGRADED, Change.CAME_BACK)


@pytest.mark.parametrize(("text", "message"), [
    ("health: {interval: 0s}", "health: interval must be more than 0s"),
    ("health: {timeout: 0}", "health: timeout must be more than 0s"),
    ("health: {failures_to_down: 0}", "health: failures_to_down must be at least 1"),
])
def test_config_refuses_a_health_policy_that_cannot_work(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text('databases: {primary: {dsn: "postgresql://u@h/db"}}\n' + text, env={})
    assert str(err.value) == message


def test_config_takes_short_intervals_for_tests() -> None:
    config = load_text('databases: {primary: {dsn: "postgresql://u@h/db"}}\n'
                       "health: {interval: 200ms, timeout: 0.5s, failures_to_down: 2}", env={})
    assert config.health == POLICY
    assert load_text('databases: {primary: {dsn: "postgresql://u@h/db"}}', env={}).health == \
        Health(interval=Duration(30.0), timeout=Duration(3.0), failures_to_down=3)


CONFIG = load_text('databases: {secondary: {dsn: "postgresql://u@db.example:5433/db"}}\n'
                   "health: {interval: 200ms, timeout: 0.5s, failures_to_down: 2}", env={})


def checker(kind: type[HealthChecker] = HealthChecker) -> tuple[HealthChecker, Pool]:
    pool = Pool("secondary", CONFIG.dsn("secondary"), size=2, acquire_timeout=1.0, idle_timeout=60.0,
                lifetime=3600.0, connect_timeout=1.0, startup={})
    return kind(CONFIG, {"secondary": pool}), pool


def test_down_opens_the_pools_circuit_and_an_answer_closes_it() -> None:
    health, pool = checker()
    health.record("secondary", REFUSED, 1000.0)
    assert pool.outage is None and pool.try_acquire() is None  # degraded: still open for business
    health.record("secondary", REFUSED, 1001.0)
    assert health.status("secondary").circuit is Circuit.OPEN
    with pytest.raises(BackendError) as err:
        pool.try_acquire()
    assert (err.value.sqlstate, err.value.message) == ("08006", "database secondary is unavailable")
    assert err.value.hint is not None
    assert "Connection refused" in err.value.hint and "every 0.2s" in err.value.hint
    health.record("secondary", OK, 1002.5)
    assert pool.outage is None and pool.try_acquire() is None
    assert [h.status for h in health.statuses()] == [Status.HEALTHY]


def test_a_new_checker_closes_a_circuit_it_finds_open() -> None:
    """RELOAD starts a new checker; a pool whose circuit the old one opened must not stay shut."""
    health, pool = checker()
    pool.open_circuit("left by the previous checker")
    health.record("secondary", OK, 1000.0)
    assert pool.outage is None


async def test_clients_queued_for_a_connection_get_the_error_at_once() -> None:
    health, pool = checker()
    granted: list[ServerConnection] = []
    failed: list[BaseException] = []
    pool.size = 0  # full: a client queues
    assert pool.queue(granted.append, failed.append) is not None
    for second in range(2):
        health.record("secondary", TIMEOUT, 1000.0 + second)
    assert not pool.waiters
    assert not granted
    assert len(failed) == 1
    assert isinstance(failed[0], BackendError)
    assert "database secondary is unavailable" in failed[0].message
    assert pool.disconnects[DisconnectReason.DOWN] == 0  # nothing was idle


class _LosesItsCancel(HealthChecker):
    async def check(self, name: str) -> DatabaseHealth:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # as Python 3.11's asyncio.wait_for does when its result is ready at the cancel
        return self.status(name)


async def test_stop_ends_a_check_that_lost_its_cancel() -> None:
    """pgfleet's shutdown waits for the checks: one that swallows the cancel must not hang it."""
    stubborn, _ = checker(_LosesItsCancel)
    stubborn.start()
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stubborn.stop(), 2)
