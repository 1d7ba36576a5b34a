"""Python cost of one pgbench -S transaction through pgfleet's hot path, without sockets.

A Session and a ServerConnection are wired to in-memory transports and fed the bytes of
pgbench's select-only transaction (simple, extended and prepared protocol). The figure is
microseconds of Python per transaction on this machine: what the proxy adds on top of the
four system calls a pooler needs anyway. Run: .venv/bin/python benchmarks/hotpath.py
"""

from __future__ import annotations

import asyncio
import time

from proxy.backend.connection import ServerConnection
from proxy.config import load_text
from proxy.fleet import Fleet
from proxy.frontend.session import Session, State
from proxy.wire import messages as m

CONFIG = """
databases: {primary: {dsn: "postgresql://u:p@127.0.0.1:1/db"}}
keys: [{id: k, secret: s, role: server}]
"""
ONLY = ""
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


class Sink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 1)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


def rows() -> bytes:
    desc = m.message(m.ROW_DESCRIPTION, b"\x00\x01abalance\x00" + b"\x00" * 18)
    row = m.message(m.DATA_ROW, b"\x00\x01\x00\x00\x00\x041234")
    return desc + row + m.command_complete("SELECT 1")


def main() -> None:
    async def run() -> None:
        fleet = Fleet(load_text(CONFIG, env={}))
        pool = fleet.pools["primary"]
        server = ServerConnection("primary", pool.dsn, {}, 0)
        server._ready = asyncio.get_running_loop().create_future()
        server._ready.set_result(None)
        server.transport = Sink()  # type: ignore[assignment]
        pool.idle.append(server)
        session = Session(fleet)
        session.transport = Sink()  # type: ignore[assignment]
        session.state = State.READY
        session.unparsed = session.fixed = "primary"
        server.settings = session.settings
        data = rows()
        cases = {
            "simple": (m.query(SQL.replace("$1", "42")), data + m.READY_IDLE),
            "extended": (m.parse("", SQL, b"\x00\x00") + m.bind("", "", b"\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
                         + m.describe(0x50, "") + m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00") + m.SYNC_MSG,
                         m.PARSE_COMPLETE_MSG + m.message(m.BIND_COMPLETE) + data + m.READY_IDLE),
            "prepared": (m.bind("", "P_0", b"\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
                         + m.describe(0x50, "") + m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00") + m.SYNC_MSG,
                         m.message(m.BIND_COMPLETE) + data + m.READY_IDLE),
        }
        session.data_received(m.parse("P_0", SQL, b"\x00\x00") + m.SYNC_MSG)
        server.data_received(m.PARSE_COMPLETE_MSG + m.READY_IDLE)
        for name, (request, answer) in cases.items():
            if ONLY and name != ONLY:
                continue
            n = 50000
            start = time.perf_counter()
            for _ in range(n):
                session.data_received(request)
                server.data_received(answer)
            took = time.perf_counter() - start
            print(f"{name:9s} {took / n * 1e6:6.2f} us per transaction")
            assert not server.expects

    asyncio.run(run())


if __name__ == "__main__":
    main()
