"""Protocol tier: pipelines (messages up to Sync) whose statements go to different databases,
inside a transaction with two-phase commit. pgfleet cuts them into per-database parts, each
ended with a Sync of its own, and sends every part at once (frontend/split.py); the client
hears the answers in its own order, whatever order the databases answer in. An error in a
part ends the pipeline as PostgreSQL does: that part's answers up to the error, nothing of
the later parts, one ReadyForQuery "E". Bytes in, bytes out (see harness.py).
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
    DataRow,
    Describe,
    Disconnect,
    Err,
    ErrorResponse,
    Execute,
    Got,
    Login,
    Parse,
    ParseComplete,
    PoolState,
    PortalSuspended,
    Query,
    ReadyForQuery,
    RowDescription,
    Send,
    Sync,
    run_case,
)

TWO_PHASE = {"two_phase_commit": True}
INSERT = "insert into users (id, name) values ($1, $2)"
SELECT = "select name from users where id = $1"

BEGIN_T = (CommandComplete("BEGIN"), ReadyForQuery("T"))
ROLLBACK_BOTH = (
    Send(Query("ROLLBACK")),
    Backend("primary", ("Q", "ROLLBACK")),
    Backend("secondary", ("Q", "ROLLBACK")),
    Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
    Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
    Got(CommandComplete("ROLLBACK"), ReadyForQuery("I")),
)

# A backend's answers to its first part of TWO_PARTS_SENT; the client's answers to two rows.
FIRST_INSERT = (*BEGIN_T, ParseComplete(), BindComplete(), CommandComplete("INSERT 0 1"), ReadyForQuery("T"))
TWO_INSERTED = (BindComplete(), CommandComplete("INSERT 0 1"), BindComplete(), CommandComplete("INSERT 0 1"))
# A pipeline outside a transaction block that failed on two databases: pgfleet rolls both
# back, and answers the client's Sync idle.
IMPLICIT_ROLLED_BACK = (
    Backend("primary", ("Q", "ROLLBACK")),
    Backend("secondary", ("Q", "ROLLBACK")),
    Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
    Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
    Got(ReadyForQuery("I")),
)
IN_A_TRANSACTION = (Login(), Send(Query("BEGIN")), Got(*BEGIN_T))
# In a transaction: 42 and 43 are on primary, 3 on secondary. Each part ends with pgfleet's
# Sync, and every part is sent at once.
TWO_PARTS_SENT = (
    *IN_A_TRANSACTION,
    Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(), Sync()),
    Got(ParseComplete()),
    Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",)),
    Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
)
THREE_PARTS_SENT = (
    *IN_A_TRANSACTION,
    Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(),
         Bind("", "", ["43", "c"]), Execute(), Sync()),
    Got(ParseComplete()),
    Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",),
            ("B", "", "", ("43", "c")), ("E", "", 0), ("S",)),
    Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
)

CASES = [
    Case("pipeline_in_a_transaction_cut_between_shards_runs_both_parts_at_once",
         *IN_A_TRANSACTION,
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(), Sync()),
         Got(ParseComplete()),
         # 42 is on primary: the transaction starts there; 3 is on secondary: primary's part
         # ends with pgfleet's Sync (in the transaction, it commits nothing), and secondary's
         # part is sent at once, without waiting for primary's answers.
         Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
         # secondary answers first: held until primary's part is out.
         Answer("secondary", *FIRST_INSERT),
         Got(),
         Answer("primary", *FIRST_INSERT),
         Got(*TWO_INSERTED, ReadyForQuery("T")),
         *ROLLBACK_BOTH,
         config=TWO_PHASE),
    Case("pipeline_cut_three_times_keeps_the_client_order",
         # primary, secondary, primary: primary answers both its parts before secondary
         # answers its one; the client hears 42, 3, 43 in that order.
         *THREE_PARTS_SENT,
         Answer("primary", *FIRST_INSERT, BindComplete(), CommandComplete("INSERT 0 1"), ReadyForQuery("T")),
         Got(BindComplete(), CommandComplete("INSERT 0 1")),  # 43's answer waits for 3's
         Answer("secondary", *FIRST_INSERT),
         Got(*TWO_INSERTED, ReadyForQuery("T")),
         *ROLLBACK_BOTH,
         config=TWO_PHASE),
    Case("pipeline_cut_between_shards_error_in_the_first_part_drops_the_rest",
         *TWO_PARTS_SENT,
         Answer("secondary", *FIRST_INSERT),
         Answer("primary", *BEGIN_T, ParseComplete(), BindComplete(),
                ErrorResponse("23505", 'duplicate key value violates unique constraint "users_pkey"'),
                ReadyForQuery("E")),
         # PostgreSQL's one error, nothing of what came after it, and the transaction failed
         # (secondary's insert ran, but its transaction commits nothing: see the ROLLBACK).
         Got(BindComplete(), Err("23505"), ReadyForQuery("E")),
         Send(Query("COMMIT")),
         Backend("primary", ("Q", "ROLLBACK")),
         Backend("secondary", ("Q", "ROLLBACK")),
         Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Got(CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         config=TWO_PHASE),
    Case("pipeline_cut_between_shards_error_in_the_second_part",
         *THREE_PARTS_SENT,
         Answer("secondary", *BEGIN_T, ParseComplete(), BindComplete(),
                ErrorResponse("23505", 'duplicate key value violates unique constraint "users_pkey"'),
                ReadyForQuery("E")),
         Answer("primary", *FIRST_INSERT, BindComplete(), CommandComplete("INSERT 0 1"), ReadyForQuery("T")),
         Got(BindComplete(), CommandComplete("INSERT 0 1"), BindComplete(), Err("23505"), ReadyForQuery("E")),
         *ROLLBACK_BOTH,
         config=TWO_PHASE),
    Case("pipeline_error_known_before_the_client_is_done_skips_its_rest",
         # The first part fails while the client is still sending: what it sends up to its
         # Sync is not sent anywhere.
         *IN_A_TRANSACTION,
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute()),
         Got(ParseComplete()),
         Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0)),
         Answer("primary", *BEGIN_T, ParseComplete(), BindComplete(),
                ErrorResponse("23505", 'duplicate key value violates unique constraint "users_pkey"'),
                ReadyForQuery("E")),
         Got(BindComplete(), Err("23505")),
         Send(Bind("", "", ["44", "d"]), Execute(), Sync()),
         Backend("primary"),
         Backend("secondary", ("S",)),
         Answer("secondary", *FIRST_INSERT),
         Got(ReadyForQuery("E")),
         *ROLLBACK_BOTH,
         config=TWO_PHASE),
    Case("pipeline_cut_with_describe_and_a_row_limit",
         # Describe and a row limit (PortalSuspended) in the parts: each answer where the
         # client asked for it.
         *IN_A_TRANSACTION,
         Send(Parse("", "select name from users where id = $1"),
              Bind("", "", ["42"]), Describe("P"), Execute("", 1),
              Bind("", "", ["3"]), Describe("P"), Execute("", 1), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("Q", "BEGIN"), ("P", "", "select name from users where id = $1"),
                 ("B", "", "", ("42",)), ("D", "P", ""), ("E", "", 1), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", "select name from users where id = $1"),
                 ("B", "", "", ("3",)), ("D", "P", ""), ("E", "", 1), ("S",)),
         Answer("secondary", *BEGIN_T, ParseComplete(), BindComplete(), RowDescription("name"), DataRow("b"),
                PortalSuspended(), ReadyForQuery("T")),
         Answer("primary", *BEGIN_T, ParseComplete(), BindComplete(), RowDescription("name"), DataRow("a"),
                PortalSuspended(), ReadyForQuery("T")),
         Got(BindComplete(), RowDescription("name"), DataRow("a"), PortalSuspended(),
             BindComplete(), RowDescription("name"), DataRow("b"), PortalSuspended(), ReadyForQuery("T")),
         *ROLLBACK_BOTH,
         config=TWO_PHASE),
    Case("pipeline_cut_then_rollback_in_the_same_pipeline",
         # The end of the transaction in the pipeline waits until every part is answered,
         # then ends it on every database; the client's Sync is answered idle.
         *IN_A_TRANSACTION,
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(),
              Parse("r", "ROLLBACK"), Bind("", "r"), Execute(), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
         Answer("primary", *FIRST_INSERT),
         Answer("secondary", *FIRST_INSERT),
         Got(BindComplete(), CommandComplete("INSERT 0 1"), BindComplete(), CommandComplete("INSERT 0 1"),
             ParseComplete(), BindComplete()),
         Backend("primary", ("Q", "ROLLBACK")),
         Backend("secondary", ("Q", "ROLLBACK")),
         Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Got(CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         config=TWO_PHASE),
    Case("pipeline_outside_a_transaction_on_two_shards_fails_whole",
         # PostgreSQL runs a pipeline in one implicit transaction: with two-phase commit
         # pgfleet makes it one on both shards (a BEGIN on primary takes in what ran there);
         # an error on secondary rolls back primary's insert too, and the Sync answers idle.
         Login(),
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("Q", "BEGIN"), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
         Answer("primary", ParseComplete(), BindComplete(), CommandComplete("INSERT 0 1"),
                CommandComplete("BEGIN"), ReadyForQuery("T"), ReadyForQuery("T")),
         Got(BindComplete(), CommandComplete("INSERT 0 1")),
         Answer("secondary", CommandComplete("BEGIN"), ReadyForQuery("T"), ParseComplete(), BindComplete(),
                ErrorResponse("23505", 'duplicate key value violates unique constraint "users_pkey"'),
                ReadyForQuery("E")),
         Got(BindComplete(), Err("23505")),
         *IMPLICIT_ROLLED_BACK,
         # The next pipeline starts afresh, on one database.
         Send(Bind("", "", ["3", "b"]), Execute(), Sync()),
         Backend("secondary", ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
         Answer("secondary", BindComplete(), CommandComplete("INSERT 0 1"), ReadyForQuery("I")),
         Got(BindComplete(), CommandComplete("INSERT 0 1"), ReadyForQuery("I")),
         config=TWO_PHASE),
    Case("pipeline_outside_a_transaction_error_before_pgfleets_begin_rolls_back_every_part",
         # 42 fails on primary before pgfleet's BEGIN, which PostgreSQL then skips (its Sync
         # answers idle): the part is failed all the same, and primary's next part runs after
         # a BEGIN of its own, so the ROLLBACK at the end undoes 43 too. The client hears the
         # one error and an idle ReadyForQuery, as from one database.
         Login(),
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(),
              Bind("", "", ["43", "c"]), Execute(), Sync()),
         Got(ParseComplete()),
         # (pgfleet's BEGIN, a simple query, drops the unnamed statement: parsed again.)
         Backend("primary", ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("Q", "BEGIN"), ("S",),
                 ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("43", "c")), ("E", "", 0), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0), ("S",)),
         Answer("primary", ParseComplete(), BindComplete(),
                ErrorResponse("23505", 'duplicate key value violates unique constraint "users_pkey"'),
                ReadyForQuery("I"), *BEGIN_T, ParseComplete(), BindComplete(), CommandComplete("INSERT 0 1"),
                ReadyForQuery("T")),
         Answer("secondary", *FIRST_INSERT),
         Got(BindComplete(), Err("23505")),
         *IMPLICIT_ROLLED_BACK,
         config=TWO_PHASE),
    Case("pipeline_outside_a_transaction_refused_before_anything_is_sent_for_it",
         # A SET earlier in the pipeline: it cannot go on to a second database. Refused
         # before pgfleet sends its BEGIN, so the pipeline fails as on one database and the
         # session goes on outside any transaction.
         Login(),
         Send(Parse("", "set search_path = public"), Bind("", ""), Execute(),
              Parse("", INSERT), Bind("", "", ["3", "b"]), Execute(), Sync()),
         Backend("primary", ("P", "", "set search_path = public"), ("B", "", ""), ("E", "", 0),
                 ("B", "", "pgfleet_refused_statement"), ("S",)),
         Answer("primary", ParseComplete(), BindComplete(), CommandComplete("SET"),
                ErrorResponse("26000", 'prepared statement "pgfleet_refused_statement" does not exist'),
                ReadyForQuery("I")),
         Got(ParseComplete(), BindComplete(), CommandComplete("SET"), ParseComplete(),
             Err("0A000", "changed settings"), ReadyForQuery("I")),
         Send(Query("select * from users where id = 3")),
         Backend("secondary", ("Q", "select * from users where id = 3")),
         Answer("secondary", CommandComplete("SELECT 0"), ReadyForQuery("I")),
         Got(CommandComplete("SELECT 0"), ReadyForQuery("I")),
         config=TWO_PHASE),
    Case("pipeline_part_held_when_the_client_leaves_gives_its_backend_back",
         # secondary's part (over 1 MiB) is held behind primary's, its backend not read; the
         # client leaves: secondary is read again, rolled back and back in its pool.
         *IN_A_TRANSACTION,
         Send(Parse("", SELECT), Bind("", "", ["42"]), Execute(), Bind("", "", ["3"]), Execute(),
              Bind("", "", ["43"]), Execute(), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("Q", "BEGIN"), ("P", "", SELECT), ("B", "", "", ("42",)), ("E", "", 0), ("S",),
                 ("B", "", "", ("43",)), ("E", "", 0), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", SELECT), ("B", "", "", ("3",)), ("E", "", 0), ("S",)),
         Answer("secondary", *BEGIN_T, ParseComplete(), BindComplete(), *[DataRow("x" * 1000)] * 1500,
                CommandComplete("SELECT 1500"), ReadyForQuery("T")),
         Got(),
         Disconnect(),
         Backend("primary", ("X",)),  # answers still due: closed
         Backend("secondary", ("Q", "ROLLBACK")),
         Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         PoolState("secondary", waiting=0, idle=1, parked=0, active=0),
         config=TWO_PHASE),
    Case("pipeline_outside_a_transaction_on_two_shards_refuses_a_simple_query_in_it",
         # pgfleet commits such a pipeline at its Sync; a simple query in it would commit
         # earlier on PostgreSQL: refused, and the pipeline fails whole.
         Login(),
         Send(Parse("", INSERT), Bind("", "", ["42", "a"]), Execute(), Bind("", "", ["3", "b"]), Execute(),
              Query("select 1"), Sync()),
         Got(ParseComplete()),
         Backend("primary", ("P", "", INSERT), ("B", "", "", ("42", "a")), ("E", "", 0), ("Q", "BEGIN"), ("S",)),
         Backend("secondary", ("Q", "BEGIN"), ("P", "", INSERT), ("B", "", "", ("3", "b")), ("E", "", 0),
                 ("Q", "pgfleet refused this statement"), ("S",)),
         Answer("primary", ParseComplete(), BindComplete(), CommandComplete("INSERT 0 1"),
                CommandComplete("BEGIN"), ReadyForQuery("T"), ReadyForQuery("T")),
         Answer("secondary", CommandComplete("BEGIN"), ReadyForQuery("T"), ParseComplete(), BindComplete(),
                CommandComplete("INSERT 0 1"),
                ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("E"),
                ReadyForQuery("E")),
         Got(BindComplete(), CommandComplete("INSERT 0 1"), BindComplete(), CommandComplete("INSERT 0 1"),
             Err("0A000", "SELECT cannot run inside a pipeline"), ReadyForQuery("E")),
         Backend("primary", ("Q", "ROLLBACK")),
         Backend("secondary", ("Q", "ROLLBACK")),
         Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Answer("secondary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Got(ReadyForQuery("I")),
         config=TWO_PHASE),
]


@pytest.mark.parametrize("case", [case.param() for case in CASES])
async def test_session(case: Case) -> None:
    await run_case(case)
