"""Protocol tier: pipelines (messages up to Sync) whose statements go to different databases,
inside a transaction with two-phase commit. pgfleet cuts them into per-database parts, each
ended with a Sync of its own and answered before the next part is sent, so the client hears
its answers in its own order; an error in a part skips the rest up to the client's Sync, as
PostgreSQL does. Bytes in, bytes out (see harness.py).
"""

from __future__ import annotations

import pytest

from tests.protocol.session.harness import (
    Answer,
    Backend,
    Bind,
    BindComplete,
    Case,
    CommandComplete,
    Err,
    ErrorResponse,
    Execute,
    Got,
    Login,
    Opened,
    Parse,
    ParseComplete,
    Query,
    ReadyForQuery,
    Send,
    Sync,
    run_case,
)

TWO_PHASE = {"two_phase_commit": True}
INSERT = "insert into users (id, name) values ($1, $2)"

CASES = [
    Case("pipeline_in_a_transaction_cut_between_shards",
         Login(),
         Send(Query("BEGIN")),
         Got(CommandComplete("BEGIN"), ReadyForQuery("T")),
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(), Sync()),
         Got(ParseComplete()),
         # 42 is on primary: the transaction starts there; 3 is on secondary: primary's part
         # ends with pgfleet's Sync (in the transaction, it commits nothing) ...
         Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",)),
         Answer("primary", CommandComplete("BEGIN"), ReadyForQuery("T"), ParseComplete(), BindComplete(),
                CommandComplete("INSERT 0 1"), ReadyForQuery("T")),
         Got(BindComplete(), CommandComplete("INSERT 0 1")),
         # ... and only once it is answered does the rest go to secondary, with the client's Sync.
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
         Answer("secondary", CommandComplete("BEGIN"), ReadyForQuery("T"), ParseComplete(), BindComplete(),
                CommandComplete("INSERT 0 1"), ReadyForQuery("T")),
         Got(BindComplete(), CommandComplete("INSERT 0 1"), ReadyForQuery("T")),
         Send(Query("ROLLBACK")),
         Backend("primary", ("Q", "ROLLBACK")),
         Backend("secondary", ("Q", "ROLLBACK")),
         Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Got(CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         config=TWO_PHASE),
    Case("pipeline_cut_between_shards_error_in_the_first_part_skips_the_rest",
         Login(),
         Send(Query("BEGIN")),
         Got(CommandComplete("BEGIN"), ReadyForQuery("T")),
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",)),
         Answer("primary", CommandComplete("BEGIN"), ReadyForQuery("T"), ParseComplete(), BindComplete(),
                ErrorResponse("23505", 'duplicate key value violates unique constraint "users_pkey"'),
                ReadyForQuery("E")),
         # PostgreSQL's one error; secondary never sees the rest; the client's Sync is answered
         # by the failed part's backend: the transaction failed.
         Got(BindComplete(), Err("23505")),
         Backend("primary", ("S",)),
         Answer("primary", ReadyForQuery("E")),
         Got(ReadyForQuery("E")),
         Opened("primary#1"),  # secondary was never asked
         Send(Query("ROLLBACK")),
         Backend("primary", ("Q", "ROLLBACK")),
         Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Got(CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         config=TWO_PHASE),
    Case("pipeline_outside_a_transaction_spanning_shards_is_refused_whole",
         # Its statements would commit together on one database: refused, and the part sent
         # to primary fails with it (nothing commits).
         Login(),
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0),
                 ("B", "", "pgfleet_refused_statement"), ("S",)),
         Answer("primary", ParseComplete(), BindComplete(), CommandComplete("INSERT 0 1"),
                ErrorResponse("26000", 'prepared statement "pgfleet_refused_statement" does not exist'),
                ReadyForQuery("I")),
         Got(BindComplete(), CommandComplete("INSERT 0 1"), Err("0A000", "outside a transaction"), ReadyForQuery("I")),
         config=TWO_PHASE),
]


@pytest.mark.parametrize("case", [case.param() for case in CASES])
async def test_session(case: Case) -> None:
    await run_case(case)
