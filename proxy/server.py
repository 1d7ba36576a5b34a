"""Lifecycle: listen, keep the pools tidy, reload, shut down.

Owns the event loop's top level: the listening socket, the periodic pool reaper, signal
handling (SIGTERM/SIGINT: stop accepting, let clients finish up to a timeout, close). It
builds one ``Fleet`` from a config snapshot; it never parses statements or messages.

As one worker of ``pgfleet run --workers N`` (supervisor.py starts them) it listens with
SO_REUSEPORT, runs its share of every pool (supervisor.share), answers the other workers
(admin/group.py), and only the leader, worker 0, runs the health checks and the two-phase
recovery; the others take the leader's health results.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import msgspec

from .admin.audit import AuditLog
from .admin.console import Admin, Console, local_answer
from .admin.group import Group, PeerError, worker_of
from .admin.http import HttpServer, database_info, families
from .auth.keys import load_keys
from .backend.health import HealthChecker, Outcome, Probe
from .backend.pool import DisconnectReason
from .config import Config, load_text, read_config
from .directory.directory import Directory
from .errors import CONFIG_FILE_ERROR, PROTOCOL_VIOLATION, SHUTTING_DOWN, ClientError, ConfigError
from .fleet import Fleet
from .frontend.seam import ClientConnection
from .replication.jobs import Replicator
from .supervisor import share, unsplittable

log = logging.getLogger("pgfleet")

REAP_INTERVAL = 1.0
RELOAD_TIMEOUT = 60.0  # a worker's reload may read the catalog (shard-key types)
STOP_GRACE = 1.0  # a second SIGTERM sooner than this is the same one (a process group's signal, passed on)
TYPES_RETRY = 5  # reaper ticks between tries to read unknown shard-key types


class _Echo(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A follower's health log: what the leader already logged, at debug only."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


class Server:
    def __init__(self, config: Config, source: str | None = None, group: Group | None = None) -> None:
        self.group = group  # pgfleet run --workers N: this worker's place; None: the only process
        self.configured = config  # as the file says (a worker runs its share: supervisor.share)
        config = self._share(config)
        self.config = config
        self.source = source  # the config file RELOAD reads again (None: the environment)
        self.fleet = Fleet(config, worker=group.worker if group is not None else 0)
        self.admin = Admin(self.fleet, reload=self._reload_for_console, group=group,
                           configured=lambda: self.configured)
        self.missed: list[str] = []  # workers the last reload did not reach
        self.fleet.console = lambda: Console(self.admin)
        self.listener: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._fast = False
        self._stop_time = 0.0
        self._reaper: asyncio.Task[None] | None = None
        self.http = HttpServer(self.fleet, group) if config.http is not None else None
        audit_config = config.audit
        if group is not None and audit_config.path is not None:  # one file per worker (docs/workers.md)
            path = Path(audit_config.path)
            audit_config = msgspec.structs.replace(
                audit_config, path=str(path.with_name(f"{path.stem}.w{group.worker}{path.suffix}")))
        audit = AuditLog(audit_config, dsn_of=lambda database: self.config.dsn(database))
        self.fleet.audit = audit if audit.enabled else None
        if group is not None:
            self.fleet.forward_cancel = self._forward_cancel
        self.directory = Directory(self.fleet, config) if config.directory is not None else None
        self.fleet.directory = self.directory
        self.replicator = Replicator(config)
        self.admin.replicator = self.replicator
        self.fleet.replicator = self.replicator  # (for /metrics)
        if self.http is not None:
            self.http.replicator = self.replicator

    @property
    def leader(self) -> bool:
        """Whether this process runs the health checks (a single process, or worker 0)."""
        return self.group is None or self.group.leader

    def _share(self, config: Config) -> Config:
        return share(config, self.group.worker, self.group.workers) if self.group is not None else config

    def _start_health(self) -> None:
        health = self.fleet.health
        if not self.leader:
            health.log = _Echo(logging.getLogger("pgfleet.health"), {})
            return  # the leader's results come in as "probe" requests
        if self.group is not None:
            group = self.group
            health.recorded = lambda name, probe, now: group.tell(group.others, {
                "op": "probe", "name": name, "outcome": probe.outcome.value, "seconds": probe.seconds,
                "error": probe.error, "now": now})
        health.start()

    # -- the other workers' requests (admin/group.py)

    async def _peer(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        fleet = self.fleet
        if op == "cancel":
            return fleet.cancel(int(request["pid"]), int(request["secret"]))
        if op == "console":
            return await local_answer(self.admin, str(request["text"]))
        if op == "metrics":
            return families(fleet)
        if op == "databases":
            return database_info(fleet)
        if op == "state":  # a worker that starts (again) takes the group's state
            return {"health": fleet.health.states(), "paused": [n for n, p in fleet.pools.items() if p.paused]}
        if op == "reload":
            return await self.take(str(request["text"]))
        if op == "probe":
            name = str(request["name"])
            if name in fleet.pools:  # (not a database a reload removed here)
                fleet.health.record(name, Probe(Outcome(request["outcome"]), float(request["seconds"]),
                                                request["error"]), float(request["now"]))
            return None
        raise ClientError(PROTOCOL_VIOLATION, f"unknown worker request {op!r}",
                          hint="the workers of one group run the same pgfleet version")

    async def _join(self, group: Group) -> None:
        """A worker that starts while others serve (it was restarted) takes their state: what
        is paused, and (but the leader, which checks itself) the circuits as the leader sees
        them. The first worker that answers gives it, the leader first."""
        for worker in group.others:
            try:
                state = await group.ask(worker, {"op": "state"})
            except (PeerError, ClientError):
                continue  # not up (the group's first start), or restarting too
            for name in state["paused"]:
                pool = self.fleet.pools.get(name)
                if pool is not None:
                    pool.pause()
            if not group.leader and worker == 0:
                self.fleet.health.adopt(state["health"])
            if state["paused"]:
                log.info("worker %d: paused like the rest of the group: %s", group.worker, ", ".join(state["paused"]))
            return

    def _forward_cancel(self, pid: int, secret: int) -> None:
        group = self.group
        worker = worker_of(pid)
        if group is not None and 0 <= worker < group.workers:
            log.debug("cancel for client pid %d passed on to worker %d", pid, worker)
            group.tell([worker], {"op": "cancel", "pid": pid, "secret": secret})

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        group = self.group
        if group is not None:  # first: a cancel or a console question may come at once
            await group.serve(self._peer)
        # Types first: a statement on a sharded table that came before them would be refused.
        await self.learn_shard_key_types()
        if self.fleet.coordinator is not None:  # what a dead pgfleet left in doubt is finished first
            await self.fleet.coordinator.start()
        if group is not None:
            await self._join(group)
        self.listener = await loop.create_server(
            lambda: ClientConnection(self.fleet), listen.host, listen.port, reuse_address=True,
            reuse_port=group is not None, backlog=1024)
        self._reaper = loop.create_task(self._reap())
        if self.fleet.audit is not None:
            await self.fleet.audit.start()
        self.fleet.replicas.start()
        if self.http is not None and self.config.http is not None:
            await self.http.start(self.config.http.host, self.config.http.port, reuse_port=group is not None)
        self._start_health()  # the first round runs in the background
        if self.directory is not None:
            self.directory.start()
        await self.replicator.start(schedule=self.leader)  # (the jobs' lock also keeps other hosts apart)
        if group is not None:
            group.ready()
        where = f"worker {group.worker} of {group.workers} (pid {os.getpid()}) " if group is not None else ""
        log.info("pgfleet %slistening on %s:%d (fleet database %r, %d databases, pool mode %s)",
                 where, listen.host, listen.port, listen.database, len(self.config.databases),
                 self.config.pool.mode)

    async def _reap(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in self.fleet.pools.values():
                pool.reap()
            for name, pool in list(self.fleet.retired.items()):  # a reload removed its database
                pool.reap()
                if not pool.active and not any(sibling.active for sibling in pool.siblings):
                    pool.close()  # its backend roles' pools too: none still runs a client's statement
                    del self.fleet.retired[name]
            ticks += 1
            if self.fleet.router.unknown_types and ticks % TYPES_RETRY == 0:
                await self.learn_shard_key_types()

    async def learn_shard_key_types(self) -> None:
        """Read the shard-key column types off the first shard (config's sharding.types win)."""
        missing = self.fleet.router.unknown_types
        if missing:
            await self.fleet.learn_types(missing)

    async def reload(self) -> list[str]:
        """RELOAD / SIGHUP: read the config again; a valid one takes over, an invalid one is
        refused (ConfigError, with the path of the bad key) and the running one stays. In a
        process group the text read here goes to every other worker too, and becomes the one a
        restarted worker starts with; what changed here is returned, and each worker that did
        not take it is logged and kept in ``missed``."""
        try:
            text = read_config(self.source)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise ClientError(CONFIG_FILE_ERROR, f"invalid config, nothing changed: {exc}",
                              hint="fix the file and RELOAD again") from None
        changes = await self.take(text)
        group = self.group
        self.missed = []
        if group is not None:
            group.keep_config(text)
            answers = await asyncio.gather(*(group.ask(w, {"op": "reload", "text": text}, RELOAD_TIMEOUT)
                                             for w in group.others), return_exceptions=True)
            for worker, answer in zip(group.others, answers, strict=True):
                if isinstance(answer, BaseException):
                    self.missed.append(f"worker {worker} did not take the new config: {answer} (it takes it "
                                       "when it starts again; RELOAD again to retry)")
                    log.warning("reload: %s", self.missed[-1])
        return changes

    async def _reload_for_console(self) -> list[str]:
        await self.reload()
        return self.missed

    async def take(self, text: str) -> list[str]:
        """A config text takes over in this process (a worker's part of a group's reload)."""
        try:
            config = load_text(text, source=self.source or "environment")
            load_keys(config)  # verifiers must parse too
            workers = self.group.workers if self.group is not None else 1
            small = unsplittable(config, workers)
            if small:
                raise ConfigError("pool", f"{'; '.join(small)}: below the {workers} workers these "
                                  "limits are split over (each takes at least 1)")
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise ClientError(CONFIG_FILE_ERROR, f"invalid config, nothing changed: {exc}",
                              hint="fix the file and RELOAD again") from None
        old = self.config
        self.configured, config = config, self._share(config)
        changes = self.fleet.apply(config)
        self.config = config
        fleet = self.fleet
        if (config.health, list(config.databases)) != (old.health, list(old.databases)) or \
                any(config.dsn(n) != old.dsn(n) for n in config.databases if n in old.databases):
            await fleet.health.stop()  # the checks follow the new databases and addresses
            fleet.health = HealthChecker(config, fleet.pools)
            self._start_health()
        if {n: (d.replicas, d.max_replica_lag) for n, d in config.databases.items()} != \
                {n: (d.replicas, d.max_replica_lag) for n, d in old.databases.items()}:
            await fleet.replicas.stop(close=False)
            for pool in fleet.replicas.pools.values():
                pool.close_idle(DisconnectReason.GENERATION)
                for server in pool.active:  # a new replica pool of the same name will not keep them
                    server.generation = -1
            previous = fleet.replicas.pools
            fleet.forget_pools(list(previous))
            fleet.replicas = fleet.new_replicas(config)
            fleet.replicas.start()
            for name, pool in previous.items():  # closed by the reaper once their clients leave
                if name not in fleet.replicas.pools:
                    fleet.retired[name] = pool
            changes.append("replicas changed")
        if config.replication != old.replication:
            changes.append("replication jobs changed")
        if (config.directory is None) != (old.directory is None):
            changes.append("directory added or removed: takes effect at the next restart")
        elif self.directory is not None and config.directory is not None:
            changes.extend(self.directory.apply(config))
        await self.replicator.reload(config)
        log.info("reloaded %s: %s", self.source or "the environment's config", "; ".join(changes) or "no change")
        if self.fleet.router.unknown_types:
            await self.learn_shard_key_types()
        return changes

    def _sighup(self) -> None:
        async def run() -> None:
            try:
                await self.reload()
            except ClientError:
                pass  # logged by reload()
        asyncio.get_running_loop().create_task(run())

    def stop(self, fast: bool = False) -> None:
        """SIGTERM: let open transactions finish (up to shutdown_timeout); SIGINT (``fast``):
        only the statements running now."""
        self._fast = self._fast or fast
        now = asyncio.get_running_loop().time()
        if self._stopped.is_set() and now - self._stop_time > STOP_GRACE:
            self._fast = True  # a second signal: do not wait any more
        elif not self._stopped.is_set():
            self._stop_time = now
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.close(self.config.shutdown_timeout, fast=self._fast)

    async def close(self, timeout: float = 10.0, *, fast: bool = False) -> None:
        """Stop accepting; close clients between transactions at once, the others as their
        transaction (``fast``: their statement) ends, all of them at ``timeout``; then the
        backends."""
        loop = asyncio.get_running_loop()
        if self.listener is not None:
            self.listener.close()
        fleet = self.fleet
        fleet.shutting_down = True
        running = sum(1 for s in fleet.sessions.values() if s.busy(fast))
        log.info("pgfleet shutting down: %d client(s), %d with a %s still running; waiting up to %gs",
                 len(fleet.sessions), running, "statement" if fast else "transaction", timeout)
        for session in list(fleet.sessions.values()):
            if not session.busy(fast):
                session.close(SHUTTING_DOWN)
        deadline = loop.time() + timeout
        while any(s.busy(fast) for s in fleet.sessions.values()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = list(fleet.sessions.values())
        if any(s.busy(fast) for s in left):
            log.warning("pgfleet shutdown: %d client(s) still in a transaction after %gs are disconnected "
                        "(their transactions roll back)", sum(1 for s in left if s.busy(fast)), timeout)
        for session in left:
            session.close(SHUTTING_DOWN)
        await self.fleet.health.stop()
        if self.directory is not None:
            await self.directory.stop()
        for pool in self.fleet.pools.values():
            pool.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self.fleet.coordinator is not None:
            await self.fleet.coordinator.stop()
        await self.replicator.stop()
        await self.fleet.replicas.stop()
        if self.http is not None:
            await self.http.stop()
        if self.fleet.audit is not None:
            await self.fleet.audit.stop()
        if self.group is not None:
            await self.group.close()
        if self.listener is not None:
            await self.listener.wait_closed()


async def serve(config: Config, source: str | None = None, group: Group | None = None,
                supervisor: int | None = None) -> None:
    """Run until SIGTERM or SIGINT; ``supervisor``: a pipe's read end whose end of file says
    the supervisor is gone (a worker then stops as on SIGTERM)."""
    server = Server(config, source, group)
    await server.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.stop)
    loop.add_signal_handler(signal.SIGINT, server.stop, True)
    loop.add_signal_handler(signal.SIGHUP, server._sighup)
    if supervisor is not None:
        def orphaned() -> None:
            if os.read(supervisor, 1):
                return
            loop.remove_reader(supervisor)
            log.error("worker %d: the supervisor process is gone; stopping as on SIGTERM",
                      group.worker if group is not None else 0)
            server.stop()
        loop.add_reader(supervisor, orphaned)
    await server.serve_until_stopped()
    log.info("pgfleet stopped")


def install_loop() -> None:
    """The one place the event loop is chosen: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
