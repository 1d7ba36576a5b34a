"""``pgfleet run --workers N``: a supervisor process and N workers sharing the client port.

Theory of operation. One Python process uses one core; PgBouncer's answer is to run several
processes on one port with ``so_reuseport`` and leave them strangers. pgfleet's supervisor
starts N workers (each ``python -m proxy run`` with ``--worker i/N``) that listen on the same
port with SO_REUSEPORT, each with its share of every pool (config.share), and ties them into
one group (admin/group.py): cancels reach the worker that owns the client, the console and
``/metrics`` show the whole group, RELOAD reaches every worker, and the health checks and
two-phase recovery run once, in worker 0.

The supervisor itself serves nothing and holds no connection. It:

- starts the workers and waits until each answers on its group socket;
- restarts a worker that dies (its clients lose their connection, the others do not notice),
  at most once per ``RESTART_BACKOFF`` seconds, and later and later (up to ``RESTART_MAX``)
  for one that keeps dying soon after it starts;
- passes SIGTERM and SIGINT on to every worker, and exits when they have all ended; SIGHUP
  to the leader, whose reload hands the new config to the others;
- keeps the config text the group runs (``Group.config_path``), so that a restarted worker runs
  what the others run, not an edit of the file that nobody reloaded;
- gives up, stopping the others, when a worker cannot start at all (a port in use, a config
  error found at start): the exit code is that worker's.

Each worker holds the read end of a pipe whose write end only the supervisor has: when the
supervisor dies, even by SIGKILL, the workers see the end of file and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

import msgspec

from .admin.group import MAX_WORKERS, Group
from .config import Config

log = logging.getLogger("pgfleet.supervisor")

START_TIMEOUT = 60.0  # a worker's first start: listening and answering within this long
RESTART_BACKOFF = 1.0  # a worker that died is started again no sooner than this after its last start
RESTART_MAX = 30.0  # ... and one that keeps dying soon after it starts, up to this much later


class Supervisor:
    def __init__(self, workers: int, arguments: list[str], config: str = "", where: str = "") -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}")
        self.workers = workers
        self.arguments = arguments  # passed to every worker's ``run`` (--config, --log-level)
        self.where = where  # host:port, for the log
        self.directory = tempfile.mkdtemp(prefix="pgfleet-group-")  # mode 0700: only this user
        self.group = Group(self.directory, -1, workers)  # only its paths: the supervisor answers nothing
        self.group.keep_config(config)  # what every worker starts with (RELOAD replaces it)
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.started: dict[int, float] = {}
        self.restarts = 0
        self._backoff: dict[int, float] = {}  # worker -> how long before its next start
        self._pipes: dict[int, int] = {}  # worker -> the write end of its orphan pipe
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._failed: int | None = None  # a worker's exit code when one could not start at all
        self._up: set[int] = set()  # workers that have served (a death then means a restart)
        self._done = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._signal, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self._signal, signal.SIGHUP)
        try:
            # The leader first, so that the others find its health results when they start.
            await self._start(0)
            if await self._ready(0):
                for worker in range(1, self.workers):
                    if self._stopping:
                        break
                    await self._start(worker)
                for worker in range(1, self.workers):
                    if not await self._ready(worker):
                        break
            if self._failed is None and not self._stopping:
                log.info("pgfleet listening on %s with %d workers (supervisor pid %d, worker pids %s)", self.where,
                         self.workers, os.getpid(), ", ".join(str(p.pid) for p in self.processes.values()))
            await self._done.wait()
        finally:
            for fd in self._pipes.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            shutil.rmtree(self.directory, ignore_errors=True)
        return self._failed or 0

    async def _start(self, worker: int) -> None:
        """Start worker ``worker`` (again). A worker in a process group of its own: a signal to the
        supervisor's process group (Ctrl-C) reaches the workers once, passed on from here."""
        read, write = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "run", *self.arguments, "--worker", f"{worker}/{self.workers}",
                "--group", self.directory, "--supervisor-fd", str(read), pass_fds=(read,), process_group=0)
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        old = self._pipes.pop(worker, None)
        if old is not None:
            os.close(old)
        self._pipes[worker] = write
        self.processes[worker] = process
        self.started[worker] = time.monotonic()
        if self._stopping:  # a SIGTERM came while it was being started
            process.send_signal(signal.SIGTERM)
        task = asyncio.get_running_loop().create_task(self._watch(worker, process))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ready(self, worker: int) -> bool:
        """Wait until the worker says it serves (its ``.ready`` file); False if it ended first."""
        deadline = time.monotonic() + START_TIMEOUT
        path = self.group.ready_path(worker)
        while time.monotonic() < deadline:
            process = self.processes[worker]
            if process.returncode is not None or self._failed is not None or self._stopping:
                return False
            if os.path.exists(path):
                self._up.add(worker)
                return True
            await asyncio.sleep(0.05)
        log.error("pgfleet supervisor: worker %d did not start within %gs; stopping", worker, START_TIMEOUT)
        self._failed = 1
        self._signal(signal.SIGTERM)
        return False

    async def _watch(self, worker: int, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.processes.get(worker) is not process:
            return
        if self._stopping:
            self._check_done()
            return
        if worker not in self._up:  # it never served: the next try would fail the same way
            log.error("pgfleet supervisor: worker %d could not start (exit code %s); stopping the others",
                      worker, code)
            self._failed = code if code > 0 else 1
            self._signal(signal.SIGTERM)
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        lived = time.monotonic() - self.started[worker]
        # A worker that dies soon after it started waits twice as long each time (up to
        # RESTART_MAX), so that one that cannot serve does not spin.
        backoff = RESTART_BACKOFF if lived > RESTART_MAX else min(self._backoff.get(worker, 0.5) * 2, RESTART_MAX)
        self._backoff[worker] = backoff
        log.error("pgfleet supervisor: worker %d (pid %d) ended with %s; its clients lost their connections. "
                  "Starting it again in %gs", worker, process.pid, how, backoff)
        while not self._stopping:
            await asyncio.sleep(max(0.0, self.started[worker] + backoff - time.monotonic()))
            if self._stopping:
                break
            self.restarts += 1
            for path in (self.group.path(worker), self.group.ready_path(worker)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            try:
                await self._start(worker)
                return
            except OSError as exc:  # no process could be made (EAGAIN, ENOMEM): try again
                log.error("pgfleet supervisor: cannot start worker %d again (%s); trying again in %gs",
                          worker, exc, RESTART_MAX)
                self.started[worker], backoff = time.monotonic(), RESTART_MAX
        self._check_done()

    def _check_done(self) -> None:
        if self._stopping and all(p.returncode is not None for p in self.processes.values()):
            self._done.set()

    def _signal(self, signum: int) -> None:
        """Pass SIGTERM or SIGINT on to every worker and end once they have ended. SIGHUP (reload)
        goes to the leader only (the first worker serving, if it is not): the worker that reloads
        hands the new config to the others."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
            targets = list(self.processes.values())
        else:
            serving = [w for w in sorted(self.processes) if w in self._up
                       and self.processes[w].returncode is None and os.path.exists(self.group.ready_path(w))]
            targets = [self.processes[serving[0]]] if serving else []
            if not targets:
                log.warning("pgfleet supervisor: SIGHUP while no worker serves: nothing reloaded (the workers "
                            "that start read the file as the group last took it; send SIGHUP again)")
        for process in targets:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
        self._check_done()


def run(workers: int, arguments: list[str], config: str = "", where: str = "") -> int:
    return asyncio.run(Supervisor(workers, arguments, config, where).run())


# ---------------------------------------------------------------------------------------------
# Each worker's share of the config's limits


def share_of(total: int, worker: int, workers: int) -> int:
    """Worker ``worker``'s share of a limit of ``total`` split over ``workers`` processes: the
    total divided evenly, the remainder to the first workers, at least 1 each (so the shares
    add up to the total whenever it is at least ``workers``, which ``unsplittable`` holds)."""
    return max(1, total // workers + (1 if worker < total % workers else 0))


def unsplittable(config: Config, workers: int) -> list[str]:
    """The limits of ``config`` too small to split over ``workers`` processes (each needs at
    least 1, so the group would go over them), as "path value"."""
    found = []
    if config.pool.size < workers:
        found.append(f"pool.size {config.pool.size}")
    for name, db in config.databases.items():
        if db.pool_size is not None and db.pool_size < workers:
            found.append(f"databases.{name}.pool_size {db.pool_size}")
    limit = config.listen.max_client_connections
    if limit is not None and limit < workers:
        found.append(f"listen.max_client_connections {limit}")
    directory = config.directory
    if directory is not None:
        if directory.pool_size < workers:
            found.append(f"directory.pool_size {directory.pool_size}")
        cap = directory.max_backends_per_host
        if cap is not None and cap < workers:
            found.append(f"directory.max_backends_per_host {cap}")
    for i, key in enumerate(config.keys):
        if key.max_connections is not None and key.max_connections < workers:
            found.append(f"keys[{i}].max_connections {key.max_connections} (key {key.id})")
    return found


def share(config: Config, worker: int, workers: int) -> Config:
    """The config one of ``workers`` processes (``pgfleet run --workers N``) runs with: every
    pool size and client limit split over the workers by ``share_of``, so the process group
    together opens no more backend connections, and takes no more clients, than the config
    says. Nothing else changes."""
    if workers <= 1:
        return config

    def part(total: int | None) -> int | None:
        return None if total is None else share_of(total, worker, workers)

    replace = msgspec.structs.replace
    return replace(
        config,
        pool=replace(config.pool, size=share_of(config.pool.size, worker, workers)),
        listen=replace(config.listen, max_client_connections=part(config.listen.max_client_connections)),
        databases={name: replace(db, pool_size=part(db.pool_size)) for name, db in config.databases.items()},
        keys=tuple(replace(key, max_connections=part(key.max_connections)) for key in config.keys),
        directory=None if config.directory is None else replace(
            config.directory, pool_size=share_of(config.directory.pool_size, worker, workers),
            max_backends_per_host=part(config.directory.max_backends_per_host)))
