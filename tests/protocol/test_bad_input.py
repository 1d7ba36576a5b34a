"""Bad input over raw sockets against a running pgfleet: each gets a clear error, nothing else breaks.

Every test here talks to one pgfleet process (per module) in front of the real cluster. After
each test a fixture checks that pgfleet is still running and still answers a normal psycopg
query, and that it holds no more backends than its pool size. The primary's backends log in
as pf_trust, a role no other fleet uses on bank, so pg_stat_activity counts only ours.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import scramp

from proxy.embedded import Cluster
from proxy.wire import messages as m
from tests.integration.conftest import Fleet, fleet_config
from tests.integration.rawclient import Closed, LoginError, Raw, errors, rows

POOL_SIZE = 4
KEY, SECRET = "pf_server", "server-secret"


@pytest.fixture(scope="module")
def fleet(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    config = fleet_config(pg, pool={"size": POOL_SIZE, "acquire_timeout": "5s"},
                          databases={"primary": {"dsn": pg.dsn("bank", user="pf_trust")}})
    proc = Fleet(config, tmp_path_factory.mktemp("badinput")).start()
    try:
        yield proc
    finally:
        proc.stop()


def backends(pg: Cluster) -> int:
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        return conn.execute("select count(*) from pg_stat_activity where usename = 'pf_trust' "
                            "and datname = 'bank' and backend_type = 'client backend'").fetchone()[0]  # type: ignore[index]


def settle(pg: Cluster, limit: int = POOL_SIZE, timeout: float = 8.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := backends(pg)) > limit and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


@pytest.fixture(autouse=True)
def still_serving(fleet: Fleet, pg: Cluster) -> Iterator[None]:
    log_start = len(fleet.log())
    yield
    assert fleet.proc is not None and fleet.proc.poll() is None, f"pgfleet exited: {fleet.log()[-3000:]}"
    with psycopg.connect(fleet.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)
    assert settle(pg) <= POOL_SIZE
    new_log = fleet.log()[log_start:]
    assert "Traceback" not in new_log and "internal error" not in new_log, new_log[-3000:]


@pytest.fixture
def table(pg: Cluster) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int)")
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn("bank"), autocommit=True) as conn:
            conn.execute(f"drop table if exists {name}")


def table_rows(pg: Cluster, table: str) -> int:
    with psycopg.connect(pg.dsn("bank")) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]  # type: ignore[index]


def logged_in(fleet: Fleet, database: str = "app") -> Raw:
    raw = Raw(fleet.port)
    raw.login(KEY, SECRET, database)
    return raw


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


# ---------------------------------------------------------------------------------------------
# Malformed and truncated messages after login


MALFORMED = {
    "query without terminator": msg(b"Q", b"select 1"),
    "query with trailing bytes": msg(b"Q", b"select 1\x00junk"),
    "query not utf-8": msg(b"Q", b"select '\xff\xfe'\x00"),
    "unknown message type": msg(b"\x01", b""),
    "server message type from a client": msg(b"R", b"\x00\x00\x00\x00"),
    "length below 4": b"Q\x00\x00\x00\x02",
    "parse with bad parameter count": msg(b"P", b"\x00select $1\x00\x00\x03\x00\x00\x00\x17"),
    "parse without parameter count": msg(b"P", b"\x00select 1\x00"),
    "parse unterminated name": msg(b"P", b"stmt"),
    "bind unterminated": msg(b"B", b"portal\x00stmt"),
    "describe bad subtype": msg(b"D", b"Xname\x00"),
    "describe empty": msg(b"D", b""),
    "close bad subtype": msg(b"C", b"Qname\x00"),
    "password message after login": msg(b"p", b"secret\x00"),
    "a startup packet after login": m.startup_message({"user": KEY, "database": "app"}),
}


# On a decided database these go to PostgreSQL as they came (pgfleet reads nothing in them),
# and the client gets PostgreSQL's own answer: an ERROR, after which the session goes on.
ANSWERED_BY_POSTGRESQL = {"query not utf-8": "22021", "parse with bad parameter count": "08P01",
                          "parse without parameter count": "08P01"}


@pytest.mark.parametrize("name", sorted(ANSWERED_BY_POSTGRESQL))
def test_malformed_message_on_a_decided_database_gets_postgresqls_answer(fleet: Fleet, name: str) -> None:
    with logged_in(fleet, "primary") as raw:
        raw.send(MALFORMED[name] + msg(b"S", b""))
        error = raw.recv()
        assert error.kind == "E" and error.fields["S"] == "ERROR", error
        assert error.fields["C"] == ANSWERED_BY_POSTGRESQL[name]
        assert raw.recv().kind == "Z"
        if name.startswith("query"):
            assert raw.recv().kind == "Z"  # the Sync's own ReadyForQuery
        assert [r.kind for r in raw.query("select 41 + 1")] == ["T", "D", "C", "Z"]


@pytest.mark.parametrize(("name", "database"), [  # routed, and on a decided database
    (name, database) for name in MALFORMED for database in ("app", "primary")
    if database == "app" or name not in ANSWERED_BY_POSTGRESQL])
def test_malformed_message_after_login_is_08P01_then_close(fleet: Fleet, name: str, database: str) -> None:
    data = MALFORMED[name]
    with logged_in(fleet, database) as raw:
        started = time.monotonic()
        raw.send(data)
        error = raw.error_then_close()
        assert error["C"] == "08P01", error
        assert error["S"] == "FATAL"
        assert time.monotonic() - started < 3


def test_malformed_message_in_the_middle_of_a_transaction(fleet: Fleet, pg: Cluster, table: str) -> None:
    with logged_in(fleet) as raw:
        raw.query("begin")
        raw.query(f"insert into {table} values (1)")
        raw.send(msg(b"D", b"Zx\x00"))
        assert raw.error_then_close()["C"] == "08P01"
    time.sleep(0.2)
    assert table_rows(pg, table) == 0


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_truncated_message_then_disconnect(fleet: Fleet, cut: int) -> None:
    data = m.query("select 'a truncated statement'")
    with logged_in(fleet) as raw:
        raw.send(data[:cut])
    with logged_in(fleet) as raw:  # and a truncated one that is completed later is fine
        raw.send(data[:cut])
        time.sleep(0.1)
        raw.send(data[cut:])
        assert rows(raw.until("Z")) == [["a truncated statement"]]


def test_message_split_into_single_bytes(fleet: Fleet) -> None:
    with logged_in(fleet) as raw:
        data = m.query("select 7") + m.parse("", "select $1::int") + \
            m.bind("", "", b"\x00\x00\x00\x01\x00\x00\x00\x0212\x00\x00") + \
            m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00") + m.SYNC_MSG
        for i in range(len(data)):
            raw.send(data[i:i + 1])
        out = raw.until("Z") + raw.until("Z")
        assert rows(out) == [["7"], ["12"]]


# ---------------------------------------------------------------------------------------------
# 2 GB length fields


def test_two_gigabyte_length_after_login_is_refused_at_once(fleet: Fleet) -> None:
    with logged_in(fleet) as raw:
        started = time.monotonic()
        raw.send(b"Q\x80\x00\x00\x00")
        error = raw.error_then_close()
        assert error["C"] == "08P01"
        assert time.monotonic() - started < 2


def test_two_gigabyte_copy_data_is_refused_at_once(fleet: Fleet) -> None:
    with logged_in(fleet) as raw:
        raw.send(b"d\x7f\xff\xff\xff" + b"x" * 100)
        assert raw.error_then_close()["C"] == "08P01"


def test_two_gigabyte_startup_packet_is_refused_at_once(fleet: Fleet) -> None:
    with Raw(fleet.port) as raw:
        started = time.monotonic()
        raw.send(struct.pack("!II", 2**31, m.PROTOCOL_V3))
        assert raw.error_then_close()["C"] == "08P01"
        assert time.monotonic() - started < 2


def test_two_gigabyte_sasl_message_is_refused_at_once(fleet: Fleet) -> None:
    with Raw(fleet.port) as raw:
        raw.startup(user=KEY, database="app")
        assert raw.recv().kind == "R"
        raw.send(b"p\x80\x00\x00\x00")
        assert raw.error_then_close()["C"] == "08P01"


# ---------------------------------------------------------------------------------------------
# Startup


@pytest.mark.parametrize("params", [{"database": "app"}, {"user": "", "database": "app"}, {}])
def test_startup_without_user_is_28000(fleet: Fleet, params: dict[str, str]) -> None:
    with Raw(fleet.port) as raw:
        raw.startup(**params)
        error = raw.error_then_close()
        assert error["C"] == "28000"


def _packet(code: int, body: bytes) -> bytes:
    return struct.pack("!II", len(body) + 8, code) + body


@pytest.mark.parametrize("packet", [
    struct.pack("!II", 4, m.PROTOCOL_V3),
    struct.pack("!II", 10001, m.PROTOCOL_V3),
    _packet(0x00020000, b"user\x00u\x00\x00"),                 # protocol 2.0
    _packet(0x00040000, b"user\x00u\x00\x00"),                 # protocol 4.0
    _packet(m.PROTOCOL_V3, b"user\x00u"),                      # parameters not terminated
    _packet(m.PROTOCOL_V3, b"user\x00u\x00database\x00"),       # a name without a value
    _packet(m.PROTOCOL_V3, b"user\x00u\x00\x00trailing"),
    _packet(m.SSL_REQUEST, b"\x00\x00\x00\x00"),                # an SSLRequest of the wrong size
], ids=["length 4", "length 10001", "protocol 2.0", "protocol 4.0", "unterminated", "name without value",
        "bytes after terminator", "long SSLRequest"])
def test_bad_startup_packets_are_refused(fleet: Fleet, packet: bytes) -> None:
    with Raw(fleet.port) as raw:
        raw.send(packet)
        error = raw.error_then_close()
        assert error["C"] in ("08P01", "0A000"), error


@pytest.mark.parametrize("request_code", [m.SSL_REQUEST, m.GSSENC_REQUEST])
def test_ssl_and_gss_requests_are_answered_n_then_startup_works(fleet: Fleet, request_code: int) -> None:
    with Raw(fleet.port) as raw:
        raw.send(struct.pack("!II", 8, request_code))
        assert raw.recv_bytes(1) == b"N"
        raw.login(KEY, SECRET)
        assert rows(raw.query("select current_database()")) == [["bank"]]


def test_psql_with_sslmode_prefer_falls_back_to_plain(fleet: Fleet) -> None:
    import subprocess
    result = subprocess.run(["psql", "-X", "-At", "-c", "select 'plain'", fleet.dsn(sslmode="prefer")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "plain"


@pytest.mark.parametrize("options", ["-c=", "-c", "-c foo", "-c =x", "-cfoo=", "--foo", "x"])
def test_bad_startup_options_are_08P01(fleet: Fleet, options: str) -> None:
    with Raw(fleet.port) as raw:
        with pytest.raises(LoginError) as err:
            raw.login(KEY, SECRET, options=options)
        assert err.value.fields["C"] == "08P01", err.value.fields
        assert raw.closed_soon()


def test_startup_option_with_a_value_the_server_refuses(fleet: Fleet) -> None:
    with Raw(fleet.port) as raw:
        with pytest.raises(LoginError) as err:
            raw.login(KEY, SECRET, options="-c statement_timeout=banana")
        assert err.value.fields["C"] == "22023"
        assert raw.closed_soon()


def test_startup_options_are_applied_as_postgresql_applies_them(fleet: Fleet, pg: Cluster) -> None:
    options = r"-c search_path=pg_catalog,public -c application_name=raw\ one -c work_mem=5MB"
    probe = ["show search_path", "select current_schemas(false)::text", "show application_name", "show work_mem"]
    with psycopg.connect(pg.dsn("bank"), options=options) as direct:
        expected = [direct.execute(sql).fetchone()[0] for sql in probe]  # type: ignore[index]
    assert expected[1] == "{pg_catalog,public}"
    with Raw(fleet.port) as raw:
        raw.login(KEY, SECRET, options=options)
        got = [rows(raw.query(sql))[0][0] for sql in probe]
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Authentication exchanges that break the protocol


def _to_sasl_initial(fleet: Fleet) -> Raw:
    raw = Raw(fleet.port)
    raw.startup(user=KEY, database="app")
    code, data = m.decode_auth(raw.recv().body)
    assert code == m.AUTH_SASL and b"SCRAM-SHA-256" in data
    return raw


def _to_sasl_response(fleet: Fleet) -> tuple[Raw, scramp.ScramClient]:
    raw = _to_sasl_initial(fleet)
    client = scramp.ScramClient(["SCRAM-SHA-256"], KEY, SECRET)
    raw.send(m.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode()))
    code, data = m.decode_auth(raw.recv().body)
    assert code == m.AUTH_SASL_CONTINUE
    client.set_server_first(data.decode())
    return raw, client


def test_second_startup_message_during_authentication_is_08P01(fleet: Fleet) -> None:
    with _to_sasl_initial(fleet) as raw:
        raw.send(m.startup_message({"user": KEY, "database": "app"}))
        assert raw.error_then_close()["C"] == "08P01"


def test_second_startup_message_during_scram_is_08P01(fleet: Fleet) -> None:
    raw, _ = _to_sasl_response(fleet)
    with raw:
        raw.send(m.startup_message({"user": KEY, "database": "app"}))
        assert raw.error_then_close()["C"] == "08P01"


SASL_INITIAL = {
    "declared length too long": msg(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", 100) + b"n,,n=,r=abc"),
    "declared length too short": msg(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", 3) + b"n,,n=,r=abc"),
    "negative length": msg(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", -5) + b"n,,n=,r=abc"),
    "no length": msg(b"p", b"SCRAM-SHA-256\x00\x00\x00"),
    "no mechanism terminator": msg(b"p", b"SCRAM-SHA-256"),
    "unknown mechanism": m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc"),
    "no data": msg(b"p", b"SCRAM-SHA-256\x00\xff\xff\xff\xff"),
    "missing nonce": m.sasl_initial_response("SCRAM-SHA-256", b"n,,n="),
    "missing user attribute": m.sasl_initial_response("SCRAM-SHA-256", b"n,,r=abcdef"),
    "missing gs2 header": m.sasl_initial_response("SCRAM-SHA-256", b"n=,r=abcdef"),
    "channel binding required": m.sasl_initial_response("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"),
    "not utf-8": m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=\xff,r=abc"),
    "empty body": msg(b"p", b""),
}


@pytest.mark.parametrize("data", SASL_INITIAL.values(), ids=SASL_INITIAL.keys())
def test_malformed_sasl_initial_response_is_08P01(fleet: Fleet, data: bytes) -> None:
    with _to_sasl_initial(fleet) as raw:
        raw.send(data)
        error = raw.error_then_close()
        assert error["C"] == "08P01", error


SASL_FINAL = {
    "missing proof": lambda final: final.rsplit(",p=", 1)[0],
    "missing channel binding": lambda final: final.split(",", 1)[1],
    "wrong nonce": lambda final: "c=biws,r=forged," + final.rsplit(",", 1)[1],
    "garbage": lambda final: "garbage",
    "empty": lambda final: "",
    "proof too short": lambda final: final.rsplit(",p=", 1)[0] + ",p=AAAA",
}


@pytest.mark.parametrize("mangle", SASL_FINAL.values(), ids=SASL_FINAL.keys())
def test_malformed_sasl_response_is_08P01(fleet: Fleet, mangle: Any) -> None:
    raw, client = _to_sasl_response(fleet)
    with raw:
        raw.send(m.sasl_response(mangle(client.get_client_final()).encode()))
        error = raw.error_then_close()
        assert error["C"] == "08P01", error


def test_password_message_instead_of_sasl_is_08P01(fleet: Fleet) -> None:
    with _to_sasl_initial(fleet) as raw:
        raw.send(m.password_message(SECRET))
        assert raw.error_then_close()["C"] == "08P01"


@pytest.mark.parametrize("data", [
    m.query("select 1"),
    m.parse("", "select 1"),
    m.SYNC_MSG,
    m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00"),
], ids=["Query", "Parse", "Sync", "Execute"])
def test_messages_before_authentication_finished_are_08P01(fleet: Fleet, data: bytes) -> None:
    with _to_sasl_initial(fleet) as raw:
        raw.send(data)
        assert raw.error_then_close()["C"] == "08P01"
    raw, _ = _to_sasl_response(fleet)
    with raw:
        raw.send(data)
        assert raw.error_then_close()["C"] == "08P01"


def test_typed_message_before_startup_is_refused(fleet: Fleet) -> None:
    with Raw(fleet.port) as raw:
        raw.send(m.query("select 1"))
        error = raw.error_then_close()
        assert error["C"] == "08P01"


def test_disconnect_during_authentication(fleet: Fleet) -> None:
    for _ in range(5):
        with _to_sasl_initial(fleet):
            pass
        raw, _ = _to_sasl_response(fleet)
        raw.close()


# ---------------------------------------------------------------------------------------------
# Clients that vanish mid-statement or mid-transaction


def test_client_disconnects_mid_statement(fleet: Fleet, pg: Cluster) -> None:
    for _ in range(POOL_SIZE + 2):  # more than the pool: a leaked backend would show
        raw = logged_in(fleet)
        raw.send(m.query("select pg_sleep(2)"))
        time.sleep(0.05)
        raw.close()
    with psycopg.connect(fleet.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert settle(pg, timeout=10) <= POOL_SIZE


def test_client_disconnects_mid_transaction_after_its_answers(fleet: Fleet, pg: Cluster, table: str) -> None:
    for i in range(POOL_SIZE + 2):
        raw = logged_in(fleet)
        assert raw.query("begin")[-1].body == b"T"
        assert raw.query(f"insert into {table} values ({i})")[-1].body == b"T"
        raw.close()
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)
    assert table_rows(pg, table) == 0
    assert settle(pg) <= POOL_SIZE


def test_client_disconnects_mid_transaction_before_its_answers(fleet: Fleet, pg: Cluster, table: str) -> None:
    for i in range(POOL_SIZE + 2):
        raw = logged_in(fleet)
        raw.send(m.query("begin") + m.query(f"insert into {table} values ({i})"))
        raw.close()
    time.sleep(0.3)
    assert table_rows(pg, table) == 0
    assert settle(pg) <= POOL_SIZE


def test_client_disconnects_mid_pipeline_without_sync(fleet: Fleet, pg: Cluster, table: str) -> None:
    for i in range(POOL_SIZE + 2):
        raw = logged_in(fleet)
        raw.query("begin")
        raw.send(m.parse("", f"insert into {table} values ({i})") + m.bind("", "", b"\x00\x00\x00\x00\x00\x00")
                 + m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00") + m.FLUSH_MSG)
        out = raw.until("C")
        assert [x.kind for x in out] == ["1", "2", "C"]
        raw.close()
    time.sleep(0.3)
    assert table_rows(pg, table) == 0
    assert settle(pg) <= POOL_SIZE


def test_client_disconnect_does_not_disturb_others(fleet: Fleet, table: str) -> None:
    with psycopg.connect(fleet.dsn()) as other:
        other.execute(f"insert into {table} values (100)")  # in a transaction, on its own backend
        for _ in range(3):
            raw = logged_in(fleet)
            raw.send(m.query("begin") + m.query(f"insert into {table} values (1)") + m.query("select pg_sleep(1)"))
            raw.close()
        assert other.execute(f"select count(*) from {table}").fetchone() == (1,)
        other.commit()


# ---------------------------------------------------------------------------------------------
# Backends that die


def _terminate(pg: Cluster, pid: int) -> None:
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        assert conn.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_backend_dies_in_a_transaction_client_gets_08006_others_go_on(fleet: Fleet, pg: Cluster) -> None:
    with psycopg.connect(fleet.dsn()) as victim, psycopg.connect(fleet.dsn(), autocommit=True) as other:
        pid = victim.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert other.execute("select pg_backend_pid()").fetchone()[0] != pid  # type: ignore[index]
        _terminate(pg, pid)
        time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError) as err:
            victim.execute("select 1")
        assert err.value.sqlstate == "08006", (err.value.sqlstate, str(err.value))
        assert other.execute("select 2").fetchone() == (2,)
    with psycopg.connect(fleet.dsn(), autocommit=True) as fresh:
        assert fresh.execute("select 3").fetchone() == (3,)


def test_backend_dies_client_is_told_08006_and_closed(fleet: Fleet, pg: Cluster) -> None:
    with logged_in(fleet) as raw:
        raw.query("begin")
        pid = int(rows(raw.query("select pg_backend_pid()"))[0][0])  # type: ignore[arg-type]
        _terminate(pg, pid)
        seen: list[dict[str, str]] = []
        with pytest.raises(Closed):
            while True:
                msg_ = raw.recv(timeout=5)
                if msg_.kind == "E":
                    seen.append(msg_.fields)
        assert "08006" in [e["C"] for e in seen], seen
        assert all(e["S"] == "FATAL" for e in seen)


def test_backend_dies_mid_query_client_gets_08006(fleet: Fleet, pg: Cluster) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as victim:
        pid = victim.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                victim.execute("select pg_sleep(20)")
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

        # the next statement lands on the same idle backend (the pool hands out the last one in)
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 5
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as admin:
            while time.monotonic() < deadline:
                running = admin.execute(
                    "select pid from pg_stat_activity where usename = 'pf_trust' and query = 'select pg_sleep(20)' "
                    "and state = 'active'").fetchall()
                if running:
                    break
                time.sleep(0.05)
            assert running, "the statement never started"
            started = time.monotonic()
            admin.execute("select pg_terminate_backend(%s)", (running[0][0],))
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - started < 5
        assert outcome and isinstance(outcome[0], psycopg.OperationalError), outcome
        assert outcome[0].sqlstate == "08006", (outcome[0].sqlstate, str(outcome[0]))
    assert pid  # (the first statement ran on a real backend)


def test_idle_pooled_backends_that_die_are_replaced_silently(fleet: Fleet, pg: Cluster) -> None:
    with psycopg.connect(fleet.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as admin:
            pids = [r[0] for r in admin.execute(
                "select pid from pg_stat_activity where usename = 'pf_trust' and datname = 'bank'").fetchall()]
            assert pids
            for pid in pids:
                admin.execute("select pg_terminate_backend(%s)", (pid,))
        time.sleep(0.3)
        for i in range(5):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)


def test_backend_key_cancel_request(fleet: Fleet) -> None:
    with Raw(fleet.port) as raw:
        after = raw.login(KEY, SECRET)
        (key,) = [x for x in after if x.kind == "K"]
        pid, secret = m.decode_backend_key(key.body)
        raw.send(m.query("select pg_sleep(20)"))
        time.sleep(0.5)
        started = time.monotonic()
        with Raw(fleet.port) as cancel:
            cancel.send(m.cancel_request(pid, secret))
            assert cancel.closed_soon()
        out = raw.until("Z", timeout=10)
        assert time.monotonic() - started < 5
        assert [e["C"] for e in errors(out)] == ["57014"]
        assert rows(raw.query("select 'after cancel'")) == [["after cancel"]]


def test_cancel_request_with_a_wrong_key_is_ignored(fleet: Fleet) -> None:
    with Raw(fleet.port) as raw:
        after = raw.login(KEY, SECRET)
        (key,) = [x for x in after if x.kind == "K"]
        pid, secret = m.decode_backend_key(key.body)
        raw.send(m.query("select pg_sleep(1), 'finished'"))
        with Raw(fleet.port) as cancel:
            cancel.send(m.cancel_request(pid, secret ^ 1))
            assert cancel.closed_soon()
        with Raw(fleet.port) as cancel:
            cancel.send(m.cancel_request(pid ^ 0x5A5A, secret))
            assert cancel.closed_soon()
        out = raw.until("Z", timeout=10)
        assert errors(out) == [] and rows(out) == [["", "finished"]]


def test_terminate_message_closes_cleanly(fleet: Fleet) -> None:
    with logged_in(fleet) as raw:
        raw.send(m.query("begin") + m.TERMINATE_MSG)
        try:
            raw.until("Z")
        except Closed:
            pass
        assert raw.closed_soon()
