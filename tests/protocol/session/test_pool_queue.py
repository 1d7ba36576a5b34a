"""Protocol tier: clients queued in a full pool. A session that needs a backend while every
connection of its pool is in use waits in the pool's queue (``Pool.queue``): nothing reaches
a backend for it and it hears nothing until a connection comes back, which goes to the
oldest client still waiting (one that left is skipped); past ``pool.acquire_timeout`` its
statement is refused with 53300 and the session goes on. Between transactions a client keeps
its backend (affinity) only while nobody else needs it: with clients waiting, or a full pool
with nothing idle, it goes back and is handed round. Bytes in, bytes out (see harness.py).

Every case runs twice: with a server key (statements are parsed to pick their database) and
with a client key (the database is decided: statements take the hot path, which asks the pool
before the statement is looked at).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.protocol.session.harness import (
    Answer,
    Backend,
    Case,
    Closed,
    CommandComplete,
    Disconnect,
    Err,
    Got,
    Harness,
    Login,
    Opened,
    PoolState,
    Query,
    ReadyForQuery,
    Send,
    Sleep,
    Step,
    result,
    run_case,
)


def one(value: str, status: str = "I") -> bytes:
    return result(["?column?"], [[value]], status=status)


BEGIN_T = (CommandComplete("BEGIN"), ReadyForQuery("T"))
COMMITTED = (CommandComplete("COMMIT"), ReadyForQuery("I"))
NO_FREE = r"^database primary: no backend connection became free within 0\.2s \(pool size 1\)$"


def pool(size: int, timeout: str = "5s") -> dict[str, Any]:
    return {"pool": {"mode": "transaction", "size": size, "acquire_timeout": timeout}}


def a_in_a_transaction(key: str) -> list[Step]:
    """Clients a, b (and c) logged in; a holds primary#1 in a transaction."""
    return [
        Login("a", key=key), Login("b", key=key), Login("c", key=key),
        Opened("primary#1"),
        Send(Query("begin"), Query("select 1"), c="a"),
        Got(*BEGIN_T, c="a"),
        Backend("primary", ("Q", "begin"), ("Q", "select 1")),
        Answer("primary", *BEGIN_T, one("1", "T")),
        Got(one("1", "T"), c="a"),
    ]


def a_commits() -> list[Step]:
    return [
        Send(Query("commit"), c="a"),
        Backend("primary", ("Q", "commit")),
        Answer("primary", *COMMITTED),
        Got(*COMMITTED, c="a"),
    ]


def two_transactions(key: str, between: Step) -> list[Step]:
    """A lone client runs two transactions; ``between`` checks the pool between them. Both
    run on primary#1, the only backend opened."""
    def transaction(value: str) -> list[Step]:
        return [Send(Query("begin"), Query(f"select {value}"), c="a"),
                Got(*BEGIN_T, c="a"),
                Backend("primary", ("Q", "begin"), ("Q", f"select {value}")),
                Answer("primary", *BEGIN_T, one(value, "T")),
                Got(one(value, "T"), c="a"),
                *a_commits()]
    return [Login("a", key=key), *transaction("1"), between, *transaction("2"), Opened("primary#1")]


def cases(key: str) -> list[Case]:
    return [
        Case(f"{key}_queued_client_runs_on_the_backend_that_comes_back",
             *a_in_a_transaction(key),
             Send(Query("select 2"), c="b"),
             # b waits in the pool's queue: nothing for it goes anywhere, it hears nothing,
             # and no connection is opened (the pool is full).
             Backend("primary"),
             Got(c="b"),
             Opened("primary#1"),
             PoolState(waiting=1, idle=0, parked=0),
             *a_commits(),
             # a's transaction ended: its backend goes to b, whose statement runs there.
             Backend("primary", ("Q", "select 2")),
             PoolState(waiting=0, idle=0, parked=0),
             Answer("primary", one("2")),
             Got(one("2"), c="b"),
             Opened("primary#1"),
             config=pool(1)),

        Case(f"{key}_queued_clients_are_served_oldest_first",
             *a_in_a_transaction(key),
             Send(Query("begin"), Query("select 2"), c="b"),
             Got(*BEGIN_T, c="b"),  # BEGIN is pgfleet's to answer; the statement waits
             Send(Query("select 3"), c="c"),
             Backend("primary"),
             Got(c="b"), Got(c="c"),
             PoolState(waiting=2, idle=0, parked=0),
             *a_commits(),
             # b queued first: the backend goes to b (its transaction), c still waits.
             Backend("primary", ("Q", "begin"), ("Q", "select 2")),
             Answer("primary", *BEGIN_T, one("2", "T")),
             Got(one("2", "T"), c="b"),
             Got(c="c"),
             PoolState(waiting=1, idle=0, parked=0),
             # b's transaction holds it: c's statement does not go in between.
             Send(Query("select 22"), c="b"),
             Backend("primary", ("Q", "select 22")),
             Answer("primary", one("22", "T")),
             Got(one("22", "T"), c="b"),
             Got(c="c"),
             Send(Query("commit"), c="b"),
             Backend("primary", ("Q", "commit")),
             Answer("primary", *COMMITTED),
             Got(*COMMITTED, c="b"),
             # Only now c's turn.
             Backend("primary", ("Q", "select 3")),
             Answer("primary", one("3")),
             Got(one("3"), c="c"),
             PoolState(waiting=0, idle=1, parked=0),
             Opened("primary#1"),
             config=pool(1)),

        Case(f"{key}_queued_client_that_left_is_skipped",
             *a_in_a_transaction(key),
             Send(Query("select 2"), c="b"),
             Send(Query("select 3"), c="c"),
             PoolState(waiting=2, idle=0, parked=0),
             Disconnect("b"),
             PoolState(waiting=1, idle=0, parked=0),  # b's place in the queue is cancelled
             Backend("primary"),
             *a_commits(),
             # The backend goes to c, the next one waiting; b's statement is never sent.
             Backend("primary", ("Q", "select 3")),
             Answer("primary", one("3")),
             Got(one("3"), c="c"),
             Got(c="b"),
             Closed("b"),
             PoolState(waiting=0, idle=1, parked=0),
             Opened("primary#1"),
             config=pool(1)),

        Case(f"{key}_queued_client_times_out_and_goes_on",
             *a_in_a_transaction(key),
             Send(Query("select 2"), c="b"),
             Got(c="b"),
             PoolState(waiting=1, idle=0, parked=0),
             Sleep(0.4),  # past acquire_timeout (200ms)
             Got(Err("53300", NO_FREE), ReadyForQuery("I"), c="b"),
             Backend("primary"),  # b's statement was dropped, not sent later
             PoolState(waiting=0, idle=0, parked=0),
             Closed("b", closed=False),
             # b goes on: its next statement waits for the backend again, and runs on it.
             Send(Query("select 3"), c="b"),
             Got(c="b"),
             *a_commits(),
             Backend("primary", ("Q", "select 3")),
             Answer("primary", one("3")),
             Got(one("3"), c="b"),
             Opened("primary#1"),
             config=pool(1, "200ms")),

        Case(f"{key}_lone_client_keeps_using_the_one_backend",
             # A pool of one with none idle is full: the backend is not parked with a
             # (Pool.park refuses) but goes back to the pool, idle; a takes it from there.
             *two_transactions(key, PoolState(waiting=0, idle=1, parked=0)),
             config=pool(1)),

        Case(f"{key}_lone_client_keeps_its_backend_between_transactions",
             # Room in the pool and nobody waiting: a keeps primary#1 (parked), and its next
             # transaction runs there.
             *two_transactions(key, PoolState(waiting=0, idle=0, parked=1)),
             PoolState(waiting=0, idle=0, parked=1),
             config=pool(2)),

        Case(f"{key}_backend_goes_round_when_a_client_waits",
             *a_in_a_transaction(key),
             Send(Query("select 2"), c="b"),
             Backend("primary"),
             Got(c="b"),
             *a_commits(),
             # b waits: a does not keep the backend; b's statement runs on it at once.
             Backend("primary", ("Q", "select 2")),
             PoolState(waiting=0, idle=0, parked=0),
             # a's next statement has to wait for it now ...
             Send(Query("select 11"), c="a"),
             Got(c="a"),
             Backend("primary"),
             PoolState(waiting=1, idle=0, parked=0),
             Answer("primary", one("2")),
             Got(one("2"), c="b"),
             # ... and gets it as soon as b's statement ends (b does not keep it either).
             Backend("primary", ("Q", "select 11")),
             Answer("primary", one("11")),
             Got(one("11"), c="a"),
             PoolState(waiting=0, idle=1, parked=0),
             Opened("primary#1"),
             config=pool(1)),

        Case(f"{key}_full_pool_gives_a_freed_backend_to_the_waiter",
             # Pool of two: a and c each hold one in a transaction, b waits.
             Login("a", key=key), Login("c", key=key), Login("b", key=key),
             Send(Query("begin"), Query("select 1"), c="a"),
             Got(*BEGIN_T, c="a"),
             Send(Query("begin"), Query("select 3"), c="c"),
             Got(*BEGIN_T, c="c"),
             Opened("primary#1", "primary#2"),
             Backend("primary#1", ("Q", "begin"), ("Q", "select 1")),
             Backend("primary#2", ("Q", "begin"), ("Q", "select 3")),
             Answer("primary#1", *BEGIN_T, one("1", "T")),
             Got(one("1", "T"), c="a"),
             Answer("primary#2", *BEGIN_T, one("3", "T")),
             Got(one("3", "T"), c="c"),
             Send(Query("select 2"), c="b"),
             Got(c="b"),
             Backend("primary#1"), Backend("primary#2"),
             PoolState(waiting=1, idle=0, parked=0),
             Send(Query("commit"), c="a"),
             Backend("primary#1", ("Q", "commit")),
             Answer("primary#1", *COMMITTED),
             Got(*COMMITTED, c="a"),
             # a's backend is not kept with a: b waits for it.
             Backend("primary#1", ("Q", "select 2")),
             Answer("primary#1", one("2")),
             Got(one("2"), c="b"),
             PoolState(waiting=0, idle=1, parked=0),  # nor with b (the pool is full)
             Opened("primary#1", "primary#2"),
             Send(Query("commit"), c="c"),
             Backend("primary#2", ("Q", "commit")),
             Answer("primary#2", *COMMITTED),
             Got(*COMMITTED, c="c"),
             config=pool(2)),
    ]


class OpenCircuit(Step):
    def __init__(self, database: str) -> None:
        self.database = database

    async def run(self, h: Harness) -> None:
        h.fleet.pools[self.database].open_circuit("the database is down")


EARLY_ATTACH = [
    # A decided database (a server key connecting to one by name) takes its backend before the hot path only for what goes
    # on to it: a SET pgfleet.* answered here leaves the pool's one backend free for others.
    Case("decided_database_answering_set_pgfleet_holds_no_backend",
         Login("a", database="secondary"), Login("b", database="secondary"),
         Opened("secondary#1"),
         PoolState("secondary", waiting=0, idle=1, parked=0),
         Send(Query("set pgfleet.shard_key = '3'"), c="a"),
         Got(CommandComplete("SET"), ReadyForQuery("I"), c="a"),
         Backend("secondary"),
         PoolState("secondary", waiting=0, idle=1, parked=0),
         Send(Query("select 2"), c="b"),
         Backend("secondary", ("Q", "select 2")),
         Answer("secondary", one("2")),
         Got(one("2"), c="b"),
         config=pool(1)),
    # ... and a pool whose circuit is open refuses the statement (08006), as the handler
    # would: the client is not closed.
    Case("decided_database_with_its_circuit_open_refuses_the_statement",
         Login("a", database="secondary"),
         OpenCircuit("secondary"),
         Send(Query("select 1"), c="a"),
         Got(Err("08006", "database secondary is unavailable"), ReadyForQuery("I"), c="a"),
         Send(Query("select 1"), c="a"),  # and the session goes on
         Got(Err("08006", "database secondary is unavailable"), ReadyForQuery("I"), c="a"),
         strict_end=False),  # (the circuit closed the idle backend: its Terminate is not read)
]

CASES = [*cases("pf_server"), *cases("pf_client"), *EARLY_ATTACH]


@pytest.mark.parametrize("case", [case.param() for case in CASES])
async def test_session(case: Case) -> None:
    await run_case(case)
