"""The tenant directory's parts without a server: its config and its refusals, key
allow-lists with patterns, the registry rows' crypto (Fernet, key rotation, a wrong key, a
corrupt token) and the per-host cap (``HostGate``) over pools whose servers are played here:
a server counts from its connect until it has closed its end, as pg_stat_activity would see
it, and the cap is checked at every step."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography.fernet import Fernet

from proxy.auth.keys import load_keys
from proxy.backend.pool import DisconnectReason, HostGate, Pool
from proxy.config import Dsn, load_text
from proxy.directory.registry import Crypto, new_key, tenant_of
from proxy.errors import (
    CONFIG_FILE_ERROR,
    TOO_MANY_CONNECTIONS,
    ClientError,
    ConfigError,
    ProxyError,
)
from proxy.supervisor import share, unsplittable
from proxy.wire import messages as m

BASE = """
databases:
  registry: {dsn: "postgresql://postgres:pw@127.0.0.1:5432/registry"}
keys:
  - {id: adm, secret: s, role: admin}
"""


def config(extra: str) -> Any:
    return load_text(BASE + extra)


# -- config


def test_a_directory_config_is_read_with_its_defaults() -> None:
    key = new_key()
    loaded = config(f"directory: {{registry: registry, table: tenants, encryption_key: '{key}'}}\n")
    directory = loaded.directory
    assert directory is not None
    assert (directory.registry, directory.table, directory.pool_size, directory.max_backends_per_host) == \
        ("registry", "tenants", 5, None)
    assert (directory.cache_ttl, directory.idle_timeout, directory.top) == (30.0, 60.0, 10)


@pytest.mark.parametrize(("extra", "path", "reason"), [
    ("directory: {registry: nope, table: t}\n", "directory.registry", "'nope' is not one of databases"),
    ("directory: {registry: registry}\n", "directory.table", "either table"),
    ("directory: {registry: registry, table: t, query: 'select 1'}\n", "directory.table", "not both"),
    ("directory: {registry: registry, table: 't; drop table x'}\n", "directory.table", "a table name"),
    ("directory: {registry: registry, table: t, encryption_key: short}\n", "directory.encryption_key",
     "not a Fernet key"),
    ("directory: {registry: registry, table: t, max_backends_per_host: 0}\n", "directory.max_backends_per_host",
     "at least 1"),
    ("directory: {registry: registry, table: t, idle_timeout: 0s}\n", "directory.idle_timeout", "more than 0s"),
    ("directory: {registry: registry, table: t, hosts: {pg1: 'mysql://x'}}\n", "directory.hosts.pg1", ""),
    ("directory: {registry: registry, table: t, pool_sizes: 3}\n", "directory.pool_sizes", "unknown key"),
])
def test_a_bad_directory_config_names_the_key(extra: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(extra)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_a_tenant_binding_is_for_database_keys_with_a_directory_only() -> None:
    directory = "directory: {registry: registry, table: t}\n"
    with pytest.raises(ConfigError, match="needs directory"):
        load_text(BASE + "  - {id: t1, secret: s, role: database, tenant: server_1}\n")
    with pytest.raises(ConfigError, match="only a database key"):
        load_text(BASE + "  - {id: t1, secret: s, role: server, tenant: server_1}\n" + directory)
    with pytest.raises(ConfigError, match="takes no user_id"):
        load_text(BASE + "  - {id: t1, secret: s, role: database, tenant: server_1, user_id: 4}\n" + directory)
    loaded = load_text(BASE + "  - {id: t1, secret: s, role: database, tenant: server_1}\n" + directory)
    assert load_keys(loaded)["t1"].tenant == "server_1"


def test_allow_lists_take_patterns_and_tenant_names() -> None:
    with pytest.raises(ConfigError, match="needs directory"):
        load_text(BASE + "  - {id: s1, secret: s, role: server, databases: [server_1]}\n")
    loaded = load_text(BASE + "  - {id: s1, secret: s, role: server, databases: ['server_*', registry, 'b?']}\n")
    key = load_keys(loaded)["s1"]
    assert key.may_use("server_123") and key.may_use("registry") and key.may_use("b1")
    assert not key.may_use("Server_1") and not key.may_use("other") and not key.may_use("b12")
    assert key.named == ["registry"]


def test_pool_sizes_and_the_cap_are_split_over_workers() -> None:
    loaded = config("directory: {registry: registry, table: t, pool_size: 5, max_backends_per_host: 9}\n")
    parts = [share(loaded, w, 2).directory for w in range(2)]
    assert [(p.pool_size, p.max_backends_per_host) for p in parts if p is not None] == [(3, 5), (2, 4)]
    assert unsplittable(loaded, 6) == ["directory.pool_size 5"]


# -- rows and crypto


def test_a_password_is_decrypted_with_any_of_the_keys_and_encrypted_with_the_first() -> None:
    old, new = new_key(), new_key()
    token = Fernet(old.encode()).encrypt(b"secret").decode()
    crypto = Crypto(f"{new},{old}")
    assert crypto.decrypt(token, "t") == "secret"
    assert Fernet(new.encode()).decrypt(crypto.encrypt("other").encode()) == b"other"


@pytest.mark.parametrize("token", ["corrupt", "gAAAAAB" + "x" * 80, ""])
def test_a_wrong_key_or_a_corrupt_token_is_one_error_naming_the_tenant(token: str) -> None:
    token = token or Fernet(new_key().encode()).encrypt(b"secret").decode()  # "": another key's
    with pytest.raises(ProxyError) as caught:
        tenant_of({"name": "server_5", "host": "h", "port": 5432, "dbname": "d", "user": "u", "password": token},
                  Crypto(new_key()))
    assert caught.value.sqlstate == CONFIG_FILE_ERROR
    assert 'tenant "server_5"' in caught.value.message and "cannot be decrypted" in caught.value.message


def test_rows_become_addresses() -> None:
    key = new_key()
    crypto = Crypto(key)
    token = crypto.encrypt("pw")
    row = {"name": "s1", "host": "db1", "port": 5433, "dbname": "s1db", "user": "owner", "password": token}
    assert tenant_of(row, crypto).dsn == Dsn(host="db1", port=5433, user="owner", password="pw", dbname="s1db")
    plain = {"name": 7, "dsn": "postgresql://u:plain@db2:5434/seven"}
    assert tenant_of(plain, Crypto(None)).dsn == Dsn(host="db2", port=5434, user="u", password="plain",
                                                      dbname="seven")
    assert tenant_of({**plain, "password": token}, crypto).dsn.password == "pw"  # the column wins
    with pytest.raises(ProxyError, match='tenant "s2": its row in the directory is not usable'):
        tenant_of({"name": "s2", "dbname": "x"}, crypto)
    with pytest.raises(ProxyError, match="encryption_key is not set"):
        tenant_of(row, Crypto(None))


# -- the host cap, with servers played here


class Server(asyncio.Transport):
    """One backend connection as the server sees it: it logs in at once, and on Terminate it
    leaves pg_stat_activity, then closes its end (a moment later)."""

    def __init__(self, host: Host, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.host = host
        self.protocol = protocol
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data).startswith(m.TERMINATE_MSG):
            self.host.leave(self)
            asyncio.get_running_loop().call_later(0.01, self._closed)

    def _closed(self) -> None:
        if not self.closing:
            self.closing = True
            self.protocol.connection_lost(None)

    def close(self) -> None:
        self.host.leave(self)
        self._closed()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Host:
    """The server: its backends now, and the most it ever had at once."""

    def __init__(self) -> None:
        self.live: set[Server] = set()
        self.most = 0

    async def connect(self, factory: Any, dsn: Dsn, timeout: float) -> None:
        protocol = factory()
        server = Server(self, protocol)
        self.live.add(server)
        self.most = max(self.most, len(self.live))
        protocol.connection_made(server)
        answer = m.AUTHENTICATION_OK + m.backend_key_data(len(self.live), 1) + m.READY_IDLE
        asyncio.get_running_loop().call_soon(protocol.data_received, answer)

    def leave(self, server: Server) -> None:
        self.live.discard(server)


def pools(host: Host, gate: HostGate, *names: str, size: int = 2, timeout: float = 2.0) -> list[Pool]:
    dsn = Dsn(host="db", port=5432, user="u", password=None, dbname="d", options=(("sslmode", "disable"),))
    return [Pool(name, dsn, size=size, acquire_timeout=timeout, idle_timeout=60, lifetime=3600, connect_timeout=1,
                 startup={}, connect=host.connect, gate=gate) for name in names]


def test_a_client_of_another_tenant_gets_the_place_a_busy_tenant_gives_back() -> None:
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 2)
        a, b = pools(host, gate, "a", "b")
        held = [await a.acquire(), await a.acquire()]
        waiting = asyncio.ensure_future(b.acquire())
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(host.live) == 2  # b waits: the host is at its cap
        a.release(held.pop())  # b wants a place: this one closes rather than idles
        got = await asyncio.wait_for(waiting, 2)
        assert got.pool is b and host.most == 2 and a.disconnects[DisconnectReason.HOST_CAP] == 1
        b.release(got)
        a.release(held.pop())
        assert gate.used <= 2

    asyncio.run(run())


def test_an_idle_connection_of_another_tenant_is_closed_to_make_room() -> None:
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 3)
        a, b, c = pools(host, gate, "a", "b", "c")
        for pool in (a, b):
            first, second = await pool.acquire(), await pool.acquire() if pool is a else None
            pool.release(first)
            if second is not None:
                pool.release(second)
        assert (len(a.idle), len(b.idle), len(host.live)) == (2, 1, 3)
        got = await asyncio.wait_for(c.acquire(), 2)
        assert got.pool is c and host.most == 3
        assert a.disconnects[DisconnectReason.HOST_CAP] == 1  # a's oldest idle one went

    asyncio.run(run())


def test_past_acquire_timeout_the_wait_ends_naming_the_host_cap() -> None:
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 1)
        a, b = pools(host, gate, "a", "b", timeout=0.2)
        held = await a.acquire()
        with pytest.raises(ClientError) as caught:
            await b.acquire()
        assert caught.value.sqlstate == TOO_MANY_CONNECTIONS
        assert "server db:5432 is at its cap of 1 connections" in caught.value.message
        assert "directory.max_backends_per_host" in (caught.value.hint or "")
        a.release(held)
        assert host.most == 1

    asyncio.run(run())


def test_many_clients_over_many_tenants_never_put_the_host_over_its_cap() -> None:
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 3)
        tenants = pools(host, gate, *(f"t{i}" for i in range(8)), timeout=5.0)

        async def client(i: int) -> None:
            for round_ in range(6):
                pool = tenants[(i * 7 + round_ * 3) % len(tenants)]
                server = await pool.acquire()
                assert server.pool is pool
                await asyncio.sleep(0.002 * (i % 3))
                pool.release(server)

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(12))), 30)
        assert host.most <= 3
        for pool in tenants:
            pool.close()
        await asyncio.sleep(0.05)
        assert not host.live and gate.used == 0

    asyncio.run(run())


class Between:
    """A client between transactions that keeps its connection parked (affinity)."""

    def __init__(self) -> None:
        self.given_back: list[Any] = []

    def give_back(self, server: Any) -> bool:
        self.given_back.append(server)
        return True


def test_a_connection_parked_with_an_idle_client_gives_way_to_another_tenant() -> None:
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 1)
        a, b = pools(host, gate, "a", "b")
        server = await a.acquire()
        holder = Between()
        assert a.park(server, holder)
        got = await asyncio.wait_for(b.acquire(), 2)
        assert holder.given_back == [server] and server.closed and got.pool is b
        assert host.most == 1 and a.disconnects[DisconnectReason.HOST_CAP] == 1

    asyncio.run(run())


# -- pgfleet tenants key | encrypt


def test_pgfleet_tenants_encrypt_prints_a_token_the_directory_decrypts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from proxy.cli import main

    assert main(["tenants", "key"]) == 0
    key = capsys.readouterr().out.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    monkeypatch.setenv("DB_ENCRYPTION_KEY", key)
    assert main(["tenants", "encrypt"]) == 0
    token = capsys.readouterr().out.strip()
    assert Crypto(key).decrypt(token, "t") == "s3cret pass"
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert main(["tenants", "encrypt", "--key", "not-a-key"]) == 2
    assert "not a Fernet key" in capsys.readouterr().err
    monkeypatch.delenv("DB_ENCRYPTION_KEY")
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert main(["tenants", "encrypt"]) == 2
    assert "no encryption key" in capsys.readouterr().err


def test_a_connection_closed_under_the_cap_forgets_its_notifier_entry() -> None:
    """Fleet.backend_owner (who notified, by backend pid) loses the entry of a connection that
    closed after lingering for its server, as it does for any other."""
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 2)
        (a,) = pools(host, gate, "a")
        server = await a.acquire()
        owners: dict[tuple[str, int, int], Any] = {("db", 5432, server.pid): server}
        server.pid_owners = owners
        a.release(server)
        a.close()
        assert gate.closing == 1  # counted until the server closed its end
        await asyncio.sleep(0.05)
        assert owners == {} and gate.closing == 0 and gate.used == 0

    asyncio.run(run())


def test_a_busy_connection_retired_under_the_cap_is_cancelled_too() -> None:
    """Its backend reads the Terminate only when its statement ends: a CancelRequest goes to the
    server as well, on a connection of its own."""
    async def run() -> None:
        host, gate = Host(), HostGate("db", 5432, 2)
        cancels: list[bytes] = []
        connect = host.connect

        async def connect_or_cancel(factory: Any, dsn: Dsn, timeout: float) -> None:
            protocol = factory()
            if type(protocol).__name__ == "_CancelSender":
                written: list[bytes] = []
                transport = type("T", (), {"write": lambda self, d: written.append(bytes(d)),
                                           "close": lambda self: cancels.append(b"".join(written))})()
                protocol.connection_made(transport)
                return
            await connect(lambda: protocol, dsn, timeout)

        (a,) = pools(host, gate, "a")
        a.connect = connect_or_cancel
        server = await a.acquire()
        server.tx_status = m.TX_IN_TRANSACTION  # in the middle of something
        a.discard(server, DisconnectReason.DIRTY)
        await asyncio.sleep(0.05)
        assert len(cancels) == 1 and cancels[0] == m.cancel_request(server.pid, server.secret)

    asyncio.run(run())


def test_the_registry_is_reached_only_by_admin_keys_and_keys_that_name_it() -> None:
    """It holds every tenant's address and credentials: a server key without an allow-list, or
    with a pattern that happens to match it, is refused there (by name and by a hint), while
    the other databases stay open to it."""
    from proxy.router.router import Router, SessionContext

    loaded = load_text("""
databases:
  main: {dsn: "postgresql://postgres:pw@127.0.0.1:5432/main"}
  registry: {dsn: "postgresql://postgres:pw@127.0.0.1:5432/registry"}
default_database: main
directory: {registry: registry, table: tenants}
keys:
  - {id: adm, secret: s, role: admin}
  - {id: any, secret: s, role: server}
  - {id: pat, secret: s, role: server, databases: ['reg*', main]}
  - {id: named, secret: s, role: server, databases: [registry]}
""")
    router, keys = Router(loaded), load_keys(loaded)
    for allowed in ("adm", "named"):
        router.check_database(SessionContext(keys[allowed], None), "registry")
    for refused in ("any", "pat"):
        with pytest.raises(ClientError, match="tenant directory's registry") as caught:
            router.check_database(SessionContext(keys[refused], None), "registry")
        assert caught.value.sqlstate == "42501"
        with pytest.raises(ClientError, match="registry"):
            router.route("/* pgfleet: database=registry */ SELECT 1", SessionContext(keys[refused], None))
        router.check_database(SessionContext(keys[refused], None), "main")
