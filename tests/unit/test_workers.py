"""The pieces of ``pgfleet run --workers N`` that need no process: the pool split
(config.share), the pid that names a worker, the console's merge of the workers' answers, the
leader's health results taken over by a worker, and the group channel over Unix sockets
(admin/group.py) between two Group objects in one event loop.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

from proxy.admin.console import COMMANDS, Admin, Spread, Table, _summed, answer, find, local_answer
from proxy.admin.group import Group, PeerError, worker_of
from proxy.backend.health import HealthChecker, Outcome, Probe, Status
from proxy.config import load_text
from proxy.errors import (
    CONNECTION_FAILURE,
    INTERNAL_ERROR,
    UNDEFINED_OBJECT,
    ClientError,
    ProxyError,
)
from proxy.fleet import Fleet
from proxy.supervisor import share, share_of, unsplittable

CONFIG = """
pool: {size: 20}
listen: {max_client_connections: 7}
databases:
  a: {dsn: "postgresql://u@127.0.0.1:1/a", pool_size: 5}
  b: {dsn: "postgresql://u@127.0.0.1:1/b"}
default_database: a
keys:
  - {id: k1, secret: s, role: server, max_connections: 3}
  - {id: k2, secret: s, role: client}
"""


# -- the split


@pytest.mark.parametrize("total", [1, 2, 3, 5, 7, 20, 101])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_shares_add_up_to_the_total_and_none_is_empty(total: int, workers: int) -> None:
    shares = [share_of(total, w, workers) for w in range(workers)]
    assert min(shares) >= 1
    assert max(shares) - min(shares) <= 1
    assert sum(shares) == max(total, workers)  # the total, unless it is below one per worker


def test_a_workers_config_runs_its_share_of_every_limit() -> None:
    config = load_text(CONFIG)
    parts = [share(config, w, 3) for w in range(3)]
    assert [p.pool.size for p in parts] == [7, 7, 6]
    assert [p.databases["a"].pool_size for p in parts] == [2, 2, 1]
    assert all(p.databases["b"].pool_size is None for p in parts)  # it takes pool.size's share
    assert [p.listen.max_client_connections for p in parts] == [3, 2, 2]
    assert [p.keys[0].max_connections for p in parts] == [1, 1, 1]
    assert all(p.keys[1].max_connections is None for p in parts)  # no limit stays none
    assert share(config, 0, 1) is config
    assert parts[1].databases["a"].dsn == config.databases["a"].dsn  # nothing else changes


def test_a_clients_pid_names_its_worker() -> None:
    config = load_text(CONFIG)
    for worker in (0, 1, 5, 63):
        fleet = Fleet(config, worker=worker)
        pids = {fleet.new_backend_key()[0] for _ in range(200)}
        assert all(0 < pid < 2**31 and worker_of(pid) == worker for pid in pids)


def test_a_cancel_for_another_workers_client_is_passed_on_and_a_wrong_secret_is_not_obeyed() -> None:
    fleet = Fleet(load_text(CONFIG), worker=1)
    sent: list[tuple[int, int]] = []
    fleet.forward_cancel = lambda pid, secret: sent.append((pid, secret))
    other = (0 << 24) | 12345
    assert fleet.cancel(other, -7)
    assert sent == [(other, -7)]
    mine = (1 << 24) | 99
    assert not fleet.cancel(mine, 1)  # this worker's pid, no such client: nowhere else to go
    assert sent == [(other, -7)]

    class Client:
        secret = 4242
        cancelled = 0

        def cancel_running(self) -> int:
            self.cancelled += 1
            return 1
    client = Client()
    fleet.sessions[mine] = client  # type: ignore[assignment]
    assert not fleet.cancel(mine, 4241)
    assert fleet.cancel(mine, 4242)
    assert client.cancelled == 1


# -- the console's merge


def test_sum_adds_the_counted_columns_of_rows_alike_otherwise() -> None:
    a = Table(("database", "user", "cl_active", "limit"), [("p", "u", 2, None), ("q", "u", 1, 3)])
    b = Table(("database", "user", "cl_active", "limit"), [("p", "u", 5, None), ("q", "u", 0, 4), ("r", "u", 1, 1)])
    assert _summed([a, b], [2, 3], [0, 1]) == [("p", "u", 7, None), ("q", "u", 1, 7), ("r", "u", 1, 1)]
    # A flag that differs between workers (one missed a PAUSE) shows as set: one row, paused.
    c = Table(("database", "paused", "mode", "n"), [("p", False, "transaction", 1)])
    d = Table(("database", "paused", "mode", "n"), [("p", True, "transaction", 1)])
    assert _summed([c, d], [3], [0]) == [("p", True, "transaction", 2)]
    assert _summed([d, c], [3], [0]) == [("p", True, "transaction", 2)]


def test_every_command_that_counts_names_real_columns() -> None:
    for command in COMMANDS:
        if command.spread is Spread.SUM:
            table = command.run(Admin(Fleet(load_text(CONFIG))), "")
            assert isinstance(table, Table)
            assert command.key and set(command.sums) | set(command.key) <= set(table.columns), command.words
            assert not set(command.sums) & set(command.key)


def test_limits_below_the_worker_count_are_named() -> None:
    config = load_text(CONFIG)
    assert unsplittable(config, 3) == []  # all at least 3
    assert unsplittable(config, 4) == ["keys[0].max_connections 3 (key k1)"]
    assert unsplittable(config, 6) == ["databases.a.pool_size 5", "keys[0].max_connections 3 (key k1)"]
    assert unsplittable(config, 8) == ["databases.a.pool_size 5", "listen.max_client_connections 7",
                                       "keys[0].max_connections 3 (key k1)"]


class FakeGroup:
    """Answers as a group of three would: worker 2 is restarting."""

    worker = 0
    workers = 3

    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[int, dict[str, Any]]] = []

    async def ask(self, worker: int, request: dict[str, Any], timeout: float = 5.0) -> Any:
        self.asked.append((worker, request))
        value = self.answers[worker]
        if isinstance(value, Exception):
            raise value
        return value

    async def ask_all(self, request: dict[str, Any], timeout: float = 5.0) -> dict[int, Any]:
        self.asked.append((-1, request))
        return dict(self.answers)


def _admin(group: FakeGroup) -> Admin:
    return Admin(Fleet(load_text(CONFIG)), group=group)  # type: ignore[arg-type]


async def test_show_pools_adds_up_and_says_which_worker_did_not_answer() -> None:
    row = ["a", "u", 1, 0, 1, 2, 0, 0, 0, "transaction"]
    columns = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_parked", "sv_login",
               "cl_pinned", "pool_mode"]
    group = FakeGroup({0: {"columns": columns, "rows": [row], "tag": "SHOW"},
                       1: {"columns": columns, "rows": [row], "tag": "SHOW"},
                       2: PeerError("worker 2 did not answer (ConnectionRefusedError)")})
    command, argument = find("show pools")
    result = await answer(_admin(group), command, argument)  # type: ignore[misc]
    assert isinstance(result, Table)
    assert result.rows == [("a", "u", 2, 0, 2, 4, 0, 0, 0, "transaction")]
    assert len(result.notices) == 1 and "worker 2 did not answer" in result.notices[0]
    assert group.asked == [(-1, {"op": "console", "text": "SHOW POOLS"})]
    notice = result.messages()
    assert notice.startswith(b"N") and b"worker 2 did not answer" in notice


async def test_kill_goes_to_the_worker_that_owns_the_client() -> None:
    group = FakeGroup({0: {"tag": "KILL"}, 1: {"tag": "KILL"}, 2: {"tag": "KILL"}})
    pid = (1 << 24) | 777
    command, argument = find(f"KILL {pid}")
    assert await answer(_admin(group), command, argument) == "KILL"  # type: ignore[misc]
    assert group.asked == [(1, {"op": "console", "text": f"KILL {pid}"})]


async def test_kill_of_a_worker_that_does_not_answer_is_an_error_that_says_so() -> None:
    group = FakeGroup({0: {"tag": "KILL"}, 1: {"tag": "KILL"}, 2: PeerError("gone")})
    command, argument = find(f"KILL {(2 << 24) | 5}")
    with pytest.raises(ProxyError) as caught:
        await answer(_admin(group), command, argument)  # type: ignore[misc]
    assert caught.value.sqlstate == CONNECTION_FAILURE and "worker 2 did not answer" in caught.value.message


async def test_a_refusal_from_the_workers_is_the_answer() -> None:
    refused = ClientError(UNDEFINED_OBJECT, "no client with pid 5", hint="SHOW CLIENTS lists them")
    group = FakeGroup({0: refused, 1: refused, 2: refused})
    command, argument = find("PAUSE nosuch")
    assert command.acts  # (a Describe of it answers NoData and does not run it)
    with pytest.raises(ClientError) as caught:
        await answer(_admin(group), command, argument)  # type: ignore[misc]
    assert caught.value is refused


async def test_a_workers_own_answer_to_the_console_question() -> None:
    admin = Admin(Fleet(load_text(CONFIG)))
    shown = await local_answer(admin, "SHOW DATABASES")
    assert shown["columns"][0] == "name" and [row[0] for row in shown["rows"]] == ["a", "b"]
    assert await local_answer(admin, "PAUSE a") == {"tag": "PAUSE"}
    assert admin.fleet.pools["a"].paused


# -- health, taken from the leader


def test_a_worker_takes_the_leaders_health_and_its_circuits() -> None:
    config = load_text(CONFIG)
    leader, follower = Fleet(config), Fleet(config, worker=1)
    for _ in range(3):
        leader.health.record("a", Probe(Outcome.FAILED, 0.1, "connection refused"), 1000.0)
    assert leader.health.status("a").status is Status.DOWN
    follower.health.adopt(leader.health.states())
    assert follower.health.status("a").status is Status.DOWN
    assert follower.health.status("a").last_error == "connection refused"
    assert follower.pools["a"].outage is not None  # its circuit is open too
    assert follower.pools["b"].outage is None
    leader.health.record("a", Probe(Outcome.ANSWERED, 0.001), 1001.0)
    follower.health.adopt(leader.health.states())
    assert follower.health.status("a").status is Status.HEALTHY and follower.pools["a"].outage is None


def test_the_leader_tells_each_result_as_it_records_it() -> None:
    checker = HealthChecker(load_text(CONFIG), Fleet(load_text(CONFIG)).pools)
    told: list[tuple[str, Probe, float]] = []
    checker.recorded = lambda name, probe, now: told.append((name, probe, now))

    async def probe(*_: Any) -> Probe:
        return Probe(Outcome.ANSWERED, 0.002)
    from proxy.backend import health
    real, health.probe = health.probe, probe  # type: ignore[assignment]
    try:
        asyncio.run(checker.check("b"))
    finally:
        health.probe = real  # type: ignore[assignment]
    assert [(name, p.outcome) for name, p, _ in told] == [("b", Outcome.ANSWERED)]


# -- the channel


async def test_workers_answer_each_other_over_their_sockets(tmp_path: Path) -> None:
    groups = [Group(str(tmp_path), w, 3) for w in range(3)]

    async def handler_of(worker: int) -> Any:
        async def handle(request: dict[str, Any]) -> Any:
            if request["op"] == "refuse":
                raise ClientError(UNDEFINED_OBJECT, "no such thing", hint="look elsewhere")
            if request["op"] == "bug":
                raise RuntimeError("oops")
            return {"worker": worker, "echo": request["x"]}
        return handle

    for group in groups[:2]:  # worker 2 is not up
        await group.serve(await handler_of(group.worker))
    try:
        assert await groups[0].ask(1, {"op": "echo", "x": [1, "two"]}) == {"worker": 1, "echo": [1, "two"]}
        assert await groups[0].ask(0, {"op": "echo", "x": 3}) == {"worker": 0, "echo": 3}  # its own
        answers = await groups[1].ask_all({"op": "echo", "x": "y"})
        assert answers[0] == {"worker": 0, "echo": "y"} and answers[1] == {"worker": 1, "echo": "y"}
        assert isinstance(answers[2], PeerError)
        with pytest.raises(ClientError) as caught:
            await groups[0].ask(1, {"op": "refuse"})
        assert (caught.value.sqlstate, caught.value.message, caught.value.hint) == \
            (UNDEFINED_OBJECT, "no such thing", "look elsewhere")
        with pytest.raises(ClientError) as caught:
            await groups[0].ask(1, {"op": "bug"})
        assert caught.value.sqlstate == INTERNAL_ERROR and "worker 1" in caught.value.message
        # Garbage on a worker's socket (an absurd length, then nothing) does not stop it answering.
        reader, writer = await asyncio.open_unix_connection(groups[1].path(1))
        writer.write(struct.pack("!I", 0xFFFFFFF0) + b"xx")
        await writer.drain()
        assert await reader.read() == b""
        writer.close()
        assert await groups[0].ask(1, {"op": "echo", "x": 4}) == {"worker": 1, "echo": 4}
    finally:
        for group in groups:
            await group.close()
    assert not list(tmp_path.iterdir())  # the sockets are gone with their workers


def test_describing_a_command_that_acts_does_not_run_it() -> None:
    from proxy.admin.console import Console
    from proxy.wire import messages as m
    admin = Admin(Fleet(load_text(CONFIG)))
    console = Console(admin)
    assert console.handle(m.PARSE, m.parse("s", "PAUSE a")) == m.PARSE_COMPLETE_MSG
    described = console.handle(m.DESCRIBE, m.describe(m.TARGET_STATEMENT, "s"))
    assert described == b"\x74\0\0\0\x06\0\0" + m.NO_DATA_MSG
    assert not admin.fleet.pools["a"].paused  # described, not done
    console.handle(m.BIND, m.bind("", "s", b"\0\0\0\0\0\0"))
    assert console.handle(m.EXECUTE, m.execute("")) == m.command_complete("PAUSE")
    assert admin.fleet.pools["a"].paused
