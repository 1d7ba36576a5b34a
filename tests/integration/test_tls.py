"""TLS on both sides. Clients: listen.tls answers SSLRequest with "S" and negotiates TLS,
``required: true`` refuses plaintext (28000), cleartext password auth only over TLS.
Backends: each dsn's sslmode as libpq takes it, against a cluster started with ssl=on.
Certificates come from trustme (a throwaway CA)."""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import trustme

from proxy.embedded import Cluster, _make_traversable, server_user
from proxy.wire import messages as m

from .conftest import Fleet


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Server certificate for 127.0.0.1 and localhost, its key, and the CA, as files."""
    base = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cert": base / "server.crt", "key": base / "server.key", "ca": base / "ca.crt"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["key"].chmod(0o600)
    _make_traversable(base)
    user = server_user()
    if user is not None:  # PostgreSQL (ssl=on below) must own its key
        for path in paths.values():
            os.chown(path, user.pw_uid, user.pw_gid)
    return {name: str(path) for name, path in paths.items()}


def tls_fleet(make_fleet: Any, certs: dict[str, str], required: bool = False, **overrides: Any) -> Fleet:
    listen = {"tls": {"cert": certs["cert"], "key": certs["key"], "required": required}, **overrides.pop("listen", {})}
    fleet: Fleet = make_fleet(listen=listen, **overrides)
    return fleet


def ssl_in_use(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.pgconn.ssl_in_use)


def test_clients_negotiate_tls_and_verify_pgfleets_certificate(make_fleet: Any, certs: dict[str, str]) -> None:
    fleet = tls_fleet(make_fleet, certs)
    with psycopg.connect(fleet.dsn(sslmode="verify-full", sslrootcert=certs["ca"]), autocommit=True) as conn:
        assert ssl_in_use(conn)
        assert conn.execute("select current_database()").fetchone() == ("bank",)
    with psycopg.connect(fleet.dsn(sslmode="disable"), autocommit=True) as plain:  # not required
        assert not ssl_in_use(plain)
    out = fleet.psql("select 41 + 1", "pf_server", "app")
    assert out.stdout.strip() == "42"  # psql's default sslmode=prefer takes TLS too


async def test_asyncpg_over_tls(make_fleet: Any, certs: dict[str, str]) -> None:
    fleet = tls_fleet(make_fleet, certs, required=True)
    context = ssl.create_default_context(cafile=certs["ca"])
    conn = await asyncpg.connect(fleet.dsn(), ssl=context)
    try:
        assert await conn.fetchval("select $1::int * 2", 21) == 42
    finally:
        await conn.close()


def test_required_tls_refuses_plaintext_with_28000(make_fleet: Any, certs: dict[str, str]) -> None:
    fleet = tls_fleet(make_fleet, certs, required=True)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(fleet.dsn(sslmode="disable"))
    assert "pgfleet accepts only TLS connections" in str(refused.value)
    with psycopg.connect(fleet.dsn(sslmode="require"), autocommit=True) as conn:
        assert ssl_in_use(conn)


def test_cleartext_password_auth_only_over_tls(make_fleet: Any, certs: dict[str, str]) -> None:
    fleet = tls_fleet(make_fleet, certs, listen={"auth": "password"})
    with psycopg.connect(fleet.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(fleet.dsn(sslmode="disable"))
    assert "only TLS connections for cleartext password auth" in str(refused.value)


def test_bad_tls_clients_are_closed_and_others_go_on(make_fleet: Any, certs: dict[str, str]) -> None:
    fleet = tls_fleet(make_fleet, certs)
    ssl_request = struct.pack("!II", 8, m.SSL_REQUEST)
    # Bytes sent with the request, before the handshake, could be injected into it: refused.
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=5) as sock:
        sock.sendall(ssl_request + m.startup_message({"user": "pf_server", "database": "app"}))
        answer = sock.recv(4096)  # no "S": a FATAL ErrorResponse in plaintext, then close
        assert answer[:1] == b"E" and b"08P01" in answer and b"unencrypted data after SSL request" in answer
    # A client that says "TLS" and then sends garbage instead of a ClientHello.
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=5) as sock:
        sock.sendall(ssl_request)
        assert sock.recv(1) == b"S"
        sock.sendall(b"\x16\x03\x01\x00\x05" + b"\x00" * 5)  # a TLS record that is no ClientHello
        while sock.recv(4096):  # a TLS alert perhaps, then the close; never a hang (timeout 5 s)
            pass
    with psycopg.connect(fleet.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "Traceback" not in fleet.log()
    assert "TLS handshake with client" in fleet.log()


@pytest.fixture(scope="module")
def ssl_cluster(certs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster("tls", tmp_path_factory.mktemp("tls-pg") / "pg",
                      settings={"ssl": "on", "ssl_cert_file": certs["cert"], "ssl_key_file": certs["key"]})
    cluster.start()
    cluster.create_database("secure")
    try:
        yield cluster
    finally:
        cluster.stop()


def _backend_ssl(fleet: Fleet) -> Any:
    with psycopg.connect(fleet.dsn(database="secure"), autocommit=True) as conn:
        return conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()


@pytest.mark.parametrize(("query", "encrypted"), [
    ("", True),                      # libpq's default, prefer: TLS when the server offers it
    ("?sslmode=disable", False),
    ("?sslmode=allow", False),       # allow starts in plaintext
    ("?sslmode=require", True),
    ("?sslmode=verify-ca&sslrootcert={ca}", True),
    ("?sslmode=verify-full&sslrootcert={ca}", True),
])
def test_backend_sslmode_from_the_dsn(make_fleet: Any, ssl_cluster: Cluster, certs: dict[str, str],
                                      query: str, encrypted: bool) -> None:
    fleet: Fleet = make_fleet(databases={"secure": {"dsn": ssl_cluster.dsn("secure") + query.format(ca=certs["ca"])}})
    assert _backend_ssl(fleet) == (encrypted,)


def test_backend_verification_failures_are_08006_naming_the_database(
        make_fleet: Any, ssl_cluster: Cluster, pg: Cluster, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    fleet: Fleet = make_fleet(databases={
        "secure": {"dsn": ssl_cluster.dsn("secure") + f"?sslmode=verify-full&sslrootcert={other_ca}"},
        "plain": {"dsn": pg.dsn("bank") + "?sslmode=require"},  # this cluster has ssl off
    })
    with pytest.raises(psycopg.OperationalError) as failed:
        _backend_ssl(fleet)
    assert "database secure: TLS with" in str(failed.value) and "failed" in str(failed.value)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(fleet.dsn(database="plain"), autocommit=True).execute("select 1")
    assert "database plain does not accept TLS connections" in str(refused.value)
    assert "Traceback" not in fleet.log()
