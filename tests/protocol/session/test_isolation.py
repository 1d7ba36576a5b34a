"""Protocol tier: tenant isolation (docs/security.md). A key's statement policy refuses
what its role may not run before any backend sees it, in both protocols; a database key's
``pgfleet.tenant`` (what row-level security reads) goes to every backend that serves it, in
the same write as the statement, and a client can neither set it nor reach the backend by
the fast-path function call. Bytes in, bytes out (see harness.py).
"""

from __future__ import annotations

import re
import struct

import pytest

from proxy.wire import messages as m
from tests.protocol.session.harness import (
    Answer,
    Backend,
    Bind,
    Case,
    CommandComplete,
    Err,
    ErrorResponse,
    Execute,
    Got,
    Login,
    Parse,
    Query,
    ReadyForQuery,
    RowDescription,
    Send,
    Sync,
    result,
    run_case,
    settings_replay,
    tenant_login,
)

NO_ROWS = RowDescription() + CommandComplete("SELECT 0")


def FunctionCall(oid: int, *args: bytes) -> bytes:
    """A fast-path FunctionCall of function ``oid`` with text arguments, text result."""
    body = struct.pack("!IhhH", oid, 1, 0, len(args))
    body += b"".join(struct.pack("!i", len(a)) + a for a in args) + struct.pack("!h", 0)
    return m.message(m.FUNCTION_CALL, body)


SET_CONFIG = 2078  # pg_catalog.set_config(text, text, boolean)

CASES = [
    Case("policy_refuses_do_for_a_client_key_before_the_backend",
         Login(key="pf_client"),
         Send(Query("DO $$ BEGIN PERFORM 1; END $$")),
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", re.escape("key pf_client (client) may not run DO blocks: refused by its policy "
                                     "(statements: do)")), ReadyForQuery("I")),
         Send(Query("select 1")),
         Backend("primary", ("Q", "select 1")),
         Answer("primary", result(["?column?"], [["1"]])),
         Got(result(["?column?"], [["1"]]))),
    Case("policy_refuses_copy_to_program_for_a_tenant",
         *tenant_login("pf_tenant", "primary", "42"),
         Send(Query("COPY (SELECT 1) TO PROGRAM 'id'")),
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", re.escape("(statements: copy_program)")), ReadyForQuery("I"))),
    Case("policy_refuses_in_the_extended_protocol_and_skips_to_sync",
         Login(key="pf_client"),
         Send(Parse("", "select pg_read_file('PG_VERSION')"), Bind("", ""), Execute(), Sync()),
         Backend("primary", ("B", "", "pgfleet_refused_statement"), ("S",)),
         Answer("primary", ErrorResponse("26000", 'prepared statement "pgfleet_refused_statement" does not exist'),
                ReadyForQuery("I")),
         Got(Err("42501", re.escape("pg_read_file()")), ReadyForQuery("I"))),
    Case("policy_refuses_set_local_of_the_tenant_setting",
         Login(key="pf_client"),
         Send(Query("SET LOCAL pgfleet.tenant = '3'")),
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", re.escape("(statements: set_role)")), ReadyForQuery("I"))),
    Case("fast_path_function_call_refused_for_a_key_with_a_policy",
         Login(key="pf_client"),
         Send(FunctionCall(SET_CONFIG, b"pgfleet.tenant", b"3", b"false")),
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", "fast-path function call"), ReadyForQuery("I"))),
    Case("fast_path_function_call_goes_through_for_a_server_key",
         Login(key="pf_server"),
         Send(FunctionCall(SET_CONFIG, b"application_name", b"x", b"false")),
         Backend("primary", ("F", FunctionCall(SET_CONFIG, b"application_name", b"x", b"false")[5:])),
         Answer("primary", m.message(ord("V"), struct.pack("!i", 1) + b"x"), ReadyForQuery("I")),
         Got(("V", b"\x00\x00\x00\x01x"), ReadyForQuery("I"))),
    Case("tenant_setting_moves_with_the_backend_to_the_next_tenant",
         # Two tenants of the same shard take turns on one backend: each statement goes
         # after the setting of its own tenant, in the same write.
         *tenant_login("pf_tenant", "primary", "42"),
         *tenant_login("pf_tenant42b", "primary", "1042", c="b", secret="tenant-secret"),
         Send(Query("select id from users where id = 42")),
         Backend("primary", settings_replay(**{"pgfleet.tenant": "42"}), ("Q", "select id from users where id = 42")),
         Answer("primary", NO_ROWS, ReadyForQuery("I"), result(["id"], [["42"]])),
         Got(result(["id"], [["42"]])),
         config={"keys": [{"id": "pf_tenant", "secret": "tenant-secret", "role": "database", "user_id": 42},
                          {"id": "pf_tenant42b", "secret": "tenant-secret", "role": "database", "user_id": 1042}],
                 "pool": {"size": 1}}),
    Case("tenant_setting_goes_before_begin_and_again_after_rollback",
         # Outside the transaction, so that a ROLLBACK cannot undo it; and again at the next one.
         *tenant_login("pf_tenant", "primary", "42"),
         Send(Query("BEGIN")),
         Got(CommandComplete("BEGIN"), ReadyForQuery("T")),
         Send(Query("select id from users where id = 42")),
         Backend("primary", settings_replay(**{"pgfleet.tenant": "42"}), ("Q", "BEGIN"),
                 ("Q", "select id from users where id = 42")),
         Answer("primary", NO_ROWS, ReadyForQuery("I"), CommandComplete("BEGIN"), ReadyForQuery("T"),
                result(["id"], [["42"]], status="T")),
         Got(result(["id"], [["42"]], status="T")),
         Send(Query("ROLLBACK")),
         Backend("primary", ("Q", "ROLLBACK")),
         Answer("primary", CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Got(CommandComplete("ROLLBACK"), ReadyForQuery("I")),
         Send(Query("select id from users where id = 42")),
         Backend("primary", settings_replay(**{"pgfleet.tenant": "42"}), ("Q", "select id from users where id = 42")),
         Answer("primary", NO_ROWS, ReadyForQuery("I"), result(["id"], [["42"]])),
         Got(result(["id"], [["42"]]))),
    Case("tenant_statement_that_fails_closes_the_backend_before_the_next_answer",
         # Fail closed: the statement after it ran as the backend's previous tenant; its rows
         # never reach the client, which hears that the connection was lost instead.
         *tenant_login("pf_tenant", "primary", "42"),
         Send(Query("select id from users where id = 42")),
         Backend("primary", settings_replay(**{"pgfleet.tenant": "42"}), ("Q", "select id from users where id = 42")),
         Answer("primary", ErrorResponse("57014", "canceling statement due to user request"), ReadyForQuery("I"),
                result(["id"], [["7"]])),
         Got(Err("08006", "could not set pgfleet.tenant", severity="FATAL"))),
    Case("tenant_cannot_set_its_tenant",
         *tenant_login("pf_tenant", "primary", "42"),
         Send(Query("SET pgfleet.tenant = '3'")),
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", "may not set pgfleet routing hints"), ReadyForQuery("I")),
         Send(Query("select set_config('pgfleet.tenant', '3', false)")),
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", "may not set pgfleet routing hints"), ReadyForQuery("I")),
         Send(Query("select set_config('pgfleet.tenant', '3', true)")),  # transaction-local: the policy's
         Backend("primary", ("Q", "pgfleet refused this statement")),
         Answer("primary", ErrorResponse("42601", 'syntax error at or near "pgfleet"'), ReadyForQuery("I")),
         Got(Err("42501", re.escape("(statements: set_role)")), ReadyForQuery("I"))),
]


@pytest.mark.parametrize("case", [case.param() for case in CASES])
async def test_session(case: Case) -> None:
    await run_case(case)
