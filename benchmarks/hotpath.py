"""Python cost of one pgbench -S transaction through pgfleet's hot path, without sockets.

A Session and a ServerConnection are wired to in-memory transports and fed the bytes of
pgbench's select-only transaction (simple, extended and prepared protocol). The figure is
microseconds of CPU (this process's, ``time.process_time``) per transaction on this machine:
what the proxy adds on top of the four system calls a pooler needs anyway.

    .venv/bin/python benchmarks/hotpath.py                          # this checkout
    .venv/bin/python benchmarks/hotpath.py --baseline /tmp/pgfleet-before --repeat 5

``--baseline DIR`` measures the checkout DIR (with DIR/.venv/bin/python) and this one, each
in a process of its own, alternating ``--repeat`` times, and prints the median of each and
their ratio. The script imports ``proxy`` from whichever checkout runs it, and works with
trees from before ``Fleet`` moved from ``proxy.frontend.fleet`` to ``proxy.fleet`` and before
the client's socket moved from ``Session`` into ``proxy.frontend.seam.ClientConnection``
(fed through it, as the server does). It sets a few of the session's and the backend's
attributes by hand (``state``, ``fixed``, ``unparsed``, ``settings``, ``_ready``, ``pool.idle``,
``server.pool``):
a refactoring that renames them must change this script too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("simple", "extended", "prepared")
CONFIG = """
databases: {primary: {dsn: "postgresql://u:p@127.0.0.1:1/db"}}
keys: [{id: k, secret: s, role: server}]
"""
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


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


def measure(n: int, only: str = "") -> dict[str, float]:
    """µs of CPU per transaction of each case, through the ``proxy`` this process imports."""
    from proxy.backend.connection import ServerConnection
    from proxy.config import load_text
    from proxy.frontend.session import Session, State
    from proxy.wire import messages as m
    try:
        from proxy.fleet import Fleet
    except ModuleNotFoundError as exc:  # before 4641750, Fleet was proxy.frontend.fleet's
        if exc.name != "proxy.fleet":
            raise
        from proxy.frontend.fleet import Fleet  # type: ignore[no-redef]
    try:  # the socket side of a session: the asyncio.Protocol that feeds it
        from proxy.frontend.seam import ClientConnection
    except ModuleNotFoundError as exc:  # before it, the Session was the Protocol itself
        if exc.name != "proxy.frontend.seam":
            raise
        ClientConnection = None  # type: ignore[assignment,misc]

    def rows() -> bytes:
        desc = m.message(m.ROW_DESCRIPTION, b"\x00\x01abalance\x00" + b"\x00" * 18)
        row = m.message(m.DATA_ROW, b"\x00\x01\x00\x00\x00\x041234")
        return desc + row + m.command_complete("SELECT 1")

    results: dict[str, float] = {}

    async def run() -> None:
        fleet = Fleet(load_text(CONFIG, env={}))
        pool = fleet.pools["primary"]
        server = ServerConnection("primary", pool.dsn, {}, 0)
        server._ready = asyncio.get_running_loop().create_future()
        server._ready.set_result(None)
        server.transport = Sink()  # type: ignore[assignment]
        server.pool = pool  # the pool sets it when it opens one (older trees: a plain attribute)
        pool.idle.append(server)
        if ClientConnection is not None:
            client = ClientConnection(fleet)
            session = client.session
        else:
            client = session = Session(fleet)  # type: ignore[call-arg]
        client.connection_made(Sink())  # type: ignore[arg-type]  # as the event loop does
        session.state = State.READY
        session.unparsed = session.fixed = "primary"
        # The backend already has the session's settings (a dict, or SessionSettings.values).
        settings = session.settings
        server.settings = settings if isinstance(settings, dict) else settings.values
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
        client.data_received(m.parse("P_0", SQL, b"\x00\x00") + m.SYNC_MSG)
        server.data_received(m.PARSE_COMPLETE_MSG + m.READY_IDLE)
        for name, (request, answer) in cases.items():
            if only and name != only:
                continue
            for _ in range(min(n, 2000)):  # warm-up
                client.data_received(request)
                server.data_received(answer)
            start = time.process_time()
            for _ in range(n):
                client.data_received(request)
                server.data_received(answer)
            took = time.process_time() - start
            results[name] = took / n * 1e6
            assert not server.expects

    asyncio.run(run())
    return results


def measure_tree(python: str, tree: Path, n: int, only: str) -> dict[str, float]:
    """``measure`` in a process of ``python``, importing ``proxy`` from checkout ``tree``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    r = subprocess.run([python, str(HERE), "--json", "--n", str(n), "--only", only], cwd=tree,
                       env=env, capture_output=True, text=True, check=False, timeout=600)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines() or ["(no output)"]
        sys.exit(f"hotpath.py: {tree} failed: {lines[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def commit(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True,
                       text=True, check=False)
    head = r.stdout.strip() or "?"
    r = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "proxy"],
                       capture_output=True, text=True, check=False)
    return head + (" + uncommitted" if r.stdout.strip() else "")


def compare(baseline: Path, n: int, repeat: int, only: str, markdown: bool) -> None:
    trees = {"baseline": (str(baseline / ".venv" / "bin" / "python"), baseline),
             "current": (sys.executable, ROOT)}
    got: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for i in range(repeat):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for t in order:
            for case, us in measure_tree(*trees[t], n, only).items():
                got[t].setdefault(case, []).append(us)
    cases = [c for c in CASES if c in got["current"]]
    med = {t: {c: statistics.median(got[t][c]) for c in cases} for t in trees}
    if markdown:
        print(f"µs of CPU per transaction (`time.process_time`), median of {repeat} alternating "
              f"runs of {n:,} transactions each; baseline {baseline} at {commit(baseline)}, "
              f"current {ROOT} at {commit(ROOT)}.\n")
        print("| mode | baseline µs | current µs | current/baseline | baseline runs | current runs |")
        print("|---|--:|--:|--:|---|---|")
        for c in cases:
            runs = {t: ", ".join(f"{x:.1f}" for x in got[t][c]) for t in trees}
            print(f"| {c} | {med['baseline'][c]:.2f} | {med['current'][c]:.2f} | "
                  f"{med['current'][c] / med['baseline'][c]:.2f}× | {runs['baseline']} | "
                  f"{runs['current']} |")
        return
    print(f"baseline {baseline} ({commit(baseline)}) vs current {ROOT} ({commit(ROOT)}), "
          f"median of {repeat}, µs of CPU per transaction")
    for c in cases:
        print(f"{c:9s} {med['baseline'][c]:6.2f} -> {med['current'][c]:6.2f}  "
              f"{med['current'][c] / med['baseline'][c]:.2f}×")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50000, help="transactions per case (default 50000)")
    p.add_argument("--only", choices=("", *CASES), default="", help="one case only")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="compare with the checkout DIR (run with DIR/.venv/bin/python)")
    p.add_argument("--repeat", type=int, default=3, help="alternations with --baseline (default 3)")
    p.add_argument("--markdown", action="store_true", help="with --baseline: a markdown table")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        if not (baseline / ".venv" / "bin" / "python").exists():
            p.error(f"--baseline: no {baseline / '.venv' / 'bin' / 'python'}")
        compare(baseline, args.n, max(1, args.repeat), args.only, args.markdown)
        return
    results = measure(args.n, args.only)
    if args.json:
        print(json.dumps(results))
        return
    for name, us in results.items():
        print(f"{name:9s} {us:6.2f} us per transaction")


if __name__ == "__main__":
    main()
