"""The HTTP side (``http: {host, port}``): Prometheus metrics, health probes, the seeds' info views.

- ``/metrics``: prometheus-client exposition. A custom collector reads the fleet's state at
  scrape time (pools, clients, the counters each database's connections keep, health,
  the router's plan cache), so the statement path never touches prometheus-client.
- ``/health/live``: 200 while the process serves. ``/health/ready``: 200 only when every
  database that is not ``optional`` is healthy (its circuit closed), else 503 naming them.
- ``/health`` and ``/databases``: JSON per database, as the seeds' services showed it
  (status, last check, response time, connections).
- ``/api/database/replication/jobs`` (GET, POST), ``.../jobs/{id}/run`` and
  ``/api/database/replication/table``: the seeds' replication endpoints (replication/jobs.py),
  for an admin key in ``X-API-Key``/``X-API-Secret`` (or ``Authorization: Bearer id:secret``).

aiohttp runs on pgfleet's own event loop. In a process group (``--workers N``) every worker
listens on the HTTP port too (SO_REUSEPORT), and whichever answers asks the others
(admin/group.py): ``/metrics`` carries every worker's samples with a ``worker`` label, and
the connection counts of ``/health`` and ``/databases`` are the group's totals.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ..api.routes import SqlApi
from ..auth.keys import Role
from ..backend.pool import WAIT_BUCKETS
from ..config import server_tls
from ..directory.directory import Directory
from ..errors import (
    DUPLICATE_DATABASE,
    INVALID_CATALOG_NAME,
    UNDEFINED_OBJECT,
    ClientError,
    ProxyError,
)
from ..replication.jobs import JobError, Replicator, Run, ad_hoc
from ..replication.watermark import ReplicationError
from .group import Group

if TYPE_CHECKING:
    from ..fleet import Fleet

log = logging.getLogger("pgfleet.http")

_STATUS_VALUE = {"healthy": 2, "degraded": 1, "down": 0}


class FleetCollector(Collector):
    """Every metric, read from the fleet when Prometheus scrapes."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        labels = ["database"]
        clients_active = GaugeMetricFamily("pgfleet_clients_active", "Clients with a backend of the database "
                                           "attached (in a transaction or between them)", labels=labels)
        clients_waiting = GaugeMetricFamily("pgfleet_clients_waiting", "Clients waiting for a connection",
                                            labels=labels)
        servers = GaugeMetricFamily("pgfleet_servers", "Backend connections by state", labels=["database", "state"])
        xacts = CounterMetricFamily("pgfleet_transactions", "Transactions on the database (PgBouncer's "
                                    "xact_count: an autocommit statement counts as one)", labels=labels)
        queries = CounterMetricFamily("pgfleet_queries", "Queries (ReadyForQuery from the server)", labels=labels)
        received = CounterMetricFamily("pgfleet_received_bytes", "Bytes read from the database", labels=labels)
        sent = CounterMetricFamily("pgfleet_sent_bytes", "Bytes written to the database", labels=labels)
        errors = CounterMetricFamily("pgfleet_errors", "ErrorResponses from the database, by SQLSTATE class",
                                     labels=["database", "class"])
        disconnects = CounterMetricFamily("pgfleet_server_disconnects", "Backend connections closed, by reason",
                                          labels=["database", "reason"])
        wait_seconds = HistogramMetricFamily("pgfleet_pool_wait_seconds", "How long clients that found no "
                                             "idle connection waited for one", labels=labels)
        for name, pool in fleet.pools.items():
            family = [pool, *pool.siblings]  # its backend roles' pools count with it (their stats are its)
            clients_active.add_metric([name], sum(1 for s in fleet.sessions.values()
                                                  if s.backend is not None and s.backend.database == name))
            clients_waiting.add_metric([name], sum(p.waiting for p in family))
            parked = sum(len(p.between) for p in family)
            servers.add_metric([name, "active"], sum(len(p.active) for p in family) - parked)
            servers.add_metric([name, "parked"], parked)
            servers.add_metric([name, "idle"], sum(len(p.idle) for p in family))
            servers.add_metric([name, "login"], sum(p.opening for p in family))
            stats = pool.stats
            xacts.add_metric([name], stats.transactions)
            queries.add_metric([name], stats.queries)
            received.add_metric([name], stats.received)
            sent.add_metric([name], stats.sent)
            for sqlclass, count in sorted(stats.error_classes.items()):
                errors.add_metric([name, sqlclass], count)
            for reason, count in pool.disconnects.items():
                disconnects.add_metric([name, reason.value], count + sum(p.disconnects[reason] for p in family[1:]))
            buckets = [sum(p.wait_buckets[i] for p in family) for i in range(len(WAIT_BUCKETS))]
            wait_seconds.add_metric([name], [*((f"{b:g}", n) for b, n in zip(WAIT_BUCKETS, buckets, strict=True)),
                                             ("+Inf", sum(p.waits for p in family))],
                                    sum(p.wait_seconds for p in family))
        yield from (clients_active, clients_waiting, servers, xacts, queries, received, sent, errors,
                    disconnects, wait_seconds)

        yield GaugeMetricFamily("pgfleet_clients", "Client connections open (logged in or not)", value=fleet.clients)
        pinned = GaugeMetricFamily("pgfleet_clients_pinned", "Clients that keep their backend for session "
                                   "state (LISTEN, temp tables, ...)", value=fleet.pinned())
        yield pinned
        router = fleet.router
        cache = CounterMetricFamily("pgfleet_plan_cache", "Router plan cache lookups", labels=["result"])
        cache.add_metric(["hit"], router.hits)
        cache.add_metric(["miss"], router.misses)
        yield cache
        routes = CounterMetricFamily("pgfleet_routes", "Statements that ran on several databases, by kind "
                                     "(one-database statements are pgfleet_queries)", labels=["kind"])
        for kind, count in sorted(fleet.route_counts.items()):
            routes.add_metric([kind], count)
        yield routes
        health = GaugeMetricFamily("pgfleet_database_up", "Health: 2 healthy, 1 degraded, 0 down",
                                   labels=labels)
        circuit = GaugeMetricFamily("pgfleet_circuit_open", "1 when the database's circuit is open", labels=labels)
        for name, info in database_info(fleet).items():
            health.add_metric([name], _STATUS_VALUE.get(info["status"], 0))
            circuit.add_metric([name], 1 if info["circuit"] == "open" else 0)
        yield health
        yield circuit
        if isinstance(fleet.directory, Directory):
            yield from _tenant_metrics(fleet.directory)
        if fleet.http_stats is not None:
            yield from fleet.http_stats.metrics()
        replicator = fleet.replicator
        if replicator is not None and replicator.scheduling:  # (the process that schedules the jobs)
            yield from _job_metrics(replicator)
        audit = fleet.audit
        if audit is not None:
            yield CounterMetricFamily("pgfleet_audit_dropped", "Audit lines dropped: the writer could not keep up",
                                      value=audit.dropped)
            yield CounterMetricFamily("pgfleet_audit_written", "Audit lines written", value=audit.written)


HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpStats:
    """The HTTP listener's requests: a count by (endpoint, status), a latency histogram by endpoint."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.counts[(endpoint, status)] = self.counts.get((endpoint, status), 0) + 1
        buckets = self.buckets.setdefault(endpoint, [0] * (len(HTTP_BUCKETS) + 1))
        buckets[bisect.bisect_left(HTTP_BUCKETS, seconds)] += 1
        self.sums[endpoint] = self.sums.get(endpoint, 0.0) + seconds

    def metrics(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("pgfleet_http_requests", "HTTP requests by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), count in sorted(self.counts.items()):
            requests.add_metric([endpoint, str(status)], count)
        latency = HistogramMetricFamily("pgfleet_http_request_seconds", "HTTP request latency by endpoint",
                                        labels=["endpoint"])
        for endpoint, counts in sorted(self.buckets.items()):
            cumulative = list(itertools.accumulate(counts))
            latency.add_metric([endpoint], [*((f"{b:g}", n) for b, n in zip(HTTP_BUCKETS, cumulative, strict=False)),
                                            ("+Inf", cumulative[-1])], self.sums[endpoint])
        yield requests
        yield latency


def _job_metrics(replicator: Replicator) -> Iterator[Metric]:
    labels = ["job"]
    success = GaugeMetricFamily("pgfleet_replication_last_success_timestamp_seconds", "When the last good run "
                                "of the replication job started (its snapshot)", labels=labels)
    lag = GaugeMetricFamily("pgfleet_replication_lag_seconds", "Seconds since the last good run's snapshot: "
                            "how old the newest copied change may be", labels=labels)
    rows = GaugeMetricFamily("pgfleet_replication_last_run_rows", "Rows the job's last run copied", labels=labels)
    copied = CounterMetricFamily("pgfleet_replication_rows_copied", "Rows this process's runs of the job "
                                 "copied since it started", labels=labels)
    verified = GaugeMetricFamily("pgfleet_replication_verified", "1 if the job's last verification found no "
                                 "difference, 0 if it found one", labels=labels)
    running = GaugeMetricFamily("pgfleet_replication_running", "1 while the job runs here", labels=labels)
    now = time.time()
    for job, started, last_rows, ok, busy in replicator.metrics():
        if started is not None:
            success.add_metric([job], started)
            lag.add_metric([job], now - started)
        if last_rows is not None:
            rows.add_metric([job], last_rows)
        copied.add_metric([job], replicator.copied.get(job, 0))
        if ok is not None:
            verified.add_metric([job], 1 if ok else 0)
        running.add_metric([job], 1 if busy else 0)
    yield from (success, lag, rows, copied, verified, running)


def _tenant_metrics(directory: Directory) -> Iterator[Metric]:
    """Per host, the tenant pools' totals; per tenant, only the ``directory.top`` busiest by
    each measure (a thousand tenants make no thousand series)."""
    labels = ["host"]
    known = GaugeMetricFamily("pgfleet_tenants_known", "Tenants looked up and cached, per host", labels=labels)
    pools = GaugeMetricFamily("pgfleet_tenant_pools_open", "Tenant pools open, per host", labels=labels)
    servers = GaugeMetricFamily("pgfleet_tenant_servers", "Backend connections of tenant pools, per host and "
                                "state", labels=["host", "state"])
    clients = GaugeMetricFamily("pgfleet_tenant_clients", "Clients of tenants with a backend, per host",
                                labels=labels)
    waiting = GaugeMetricFamily("pgfleet_tenant_clients_waiting", "Clients of tenants waiting for a backend, "
                                "per host", labels=labels)
    limit = GaugeMetricFamily("pgfleet_tenant_backends_limit", "directory.max_backends_per_host (0: none)",
                              labels=labels)
    for host, s in directory.summary().items():
        known.add_metric([host], s["tenants_known"])
        pools.add_metric([host], s["pools_open"])
        for state in ("active", "idle", "login", "closing"):
            servers.add_metric([host, state], s["closing"] if state == "closing" else s[f"sv_{state}"])
        clients.add_metric([host], s["cl_active"])
        waiting.add_metric([host], s["cl_waiting"])
        limit.add_metric([host], s["limit"] or 0)
    yield from (known, pools, servers, clients, waiting, limit)
    lookups = CounterMetricFamily("pgfleet_tenant_lookups", "Tenant lookups: hit (cached), miss (the registry "
                                  "asked), unknown (no such tenant), error", labels=["result"])
    for result, count in directory.lookups.items():
        lookups.add_metric([result], count)
    yield lookups
    for measure, family in (("servers", GaugeMetricFamily("pgfleet_tenant_pool_servers", "Backend connections of "
                                                          "the busiest tenant pools", labels=["tenant", "host"])),
                            ("clients", GaugeMetricFamily("pgfleet_tenant_pool_clients", "Clients of the busiest "
                                                          "tenant pools", labels=["tenant", "host"])),
                            ("transactions", CounterMetricFamily("pgfleet_tenant_pool_transactions", "Transactions "
                                                                 "of the busiest tenant pools since they opened",
                                                                 labels=["tenant", "host"]))):
        for name, pool, value in directory.top(measure):
            family.add_metric([name, f"{pool.dsn.host}:{pool.dsn.port}"], value)
        yield family


def families(fleet: Fleet) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    """This worker's metrics as plain values: (name, help, type, samples) per family."""
    return [(metric.name, metric.documentation, metric.type,
             [(sample.name, sample.labels, sample.value) for sample in metric.samples])
            for metric in FleetCollector(fleet).collect()]


class GroupCollector(Collector):
    """The metrics of every worker of a process group, each sample labelled with its worker."""

    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, answer in self.answers.items():
            if isinstance(answer, Exception):
                continue
            for name, documentation, kind, samples in answer:
                metric = merged.get(name)
                if metric is None:
                    metric = merged[name] = Metric(name, documentation, kind)
                for sample_name, labels, value in samples:
                    metric.add_sample(sample_name, {**labels, "worker": str(worker)}, value)
        up = GaugeMetricFamily("pgfleet_worker_up", "1 for each worker that answered this scrape, 0 for one "
                               "that did not (restarting)", labels=["worker"])
        for worker, answer in self.answers.items():
            up.add_metric([str(worker)], 0 if isinstance(answer, Exception) else 1)
        yield from merged.values()
        yield up


def database_info(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """Per database, the seeds' info view: status, last check, response time, connections."""
    out: dict[str, dict[str, Any]] = {}
    for name, pool in fleet.pools.items():
        status = fleet.health.status(name)
        out[name] = {
            "database": name,
            "database_name": pool.dsn.dbname,
            "host": pool.dsn.host,
            "port": pool.dsn.port,
            "status": status.status,
            "circuit": status.circuit,
            "last_check": _iso(status.last_check) if status.last_check else None,
            "response_ms": status.response_ms,
            "last_error": status.last_error,
            "optional": fleet.config.databases[name].optional,
            "connections": {"active": len(pool.active), "idle": len(pool.idle), "waiting": pool.waiting,
                            "size": pool.size},
        }
    directory = fleet.directory
    if isinstance(directory, Directory):  # one entry per host of the tenants with a pool
        for host, s in directory.summary().items():
            out[f"tenants@{host}"] = {
                "database": f"tenants@{host}", "host": s["host"], "port": s["port"], "status": s["status"],
                "circuit": "open" if s["down"] else "closed",
                "last_check": _iso(s["last_check"]) if s["last_check"] else None,
                "last_error": "; ".join(s["unwell"][:5]) or None, "optional": True,
                "tenants_known": s["tenants_known"], "pools_open": s["pools_open"],
                "connections": {"active": s["sv_active"], "idle": s["sv_idle"], "waiting": s["cl_waiting"],
                                "limit": s["limit"] or 0},
            }
    return out


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


class HttpServer:
    def __init__(self, fleet: Fleet, group: Group | None = None) -> None:
        self.fleet = fleet
        self.group = group
        fleet.http_stats = HttpStats()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(fleet))
        self.runner: web.AppRunner | None = None
        http = fleet.config.http
        app = web.Application(client_max_size=http.max_body if http is not None else 1024 * 1024,
                              middlewares=[self._count])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/health", self.health)
        app.router.add_get("/databases", self.databases)
        # The seeds' replication endpoints (replication/jobs.py), for admin keys.
        app.router.add_get("/api/database/replication/jobs", self.list_jobs)
        app.router.add_post("/api/database/replication/jobs", self.create_job)
        app.router.add_post("/api/database/replication/jobs/{job_id}/run", self.run_job)
        app.router.add_post("/api/database/replication/table", self.replicate_table)
        # The tenant directory (directory/), for admin keys.
        app.router.add_post("/api/tenants", self.create_tenant)
        app.router.add_delete("/api/tenants/{name}", self.drop_tenant)
        self.replicator: Replicator | None = None  # set by the server
        self.sql = SqlApi(fleet)
        self.sql.add_routes(app)  # SQL over HTTP (api/routes.py)
        self.app = app

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every request by endpoint (the route's path pattern), status and latency."""
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else "unmatched"
            self.fleet.http_stats.record(endpoint, status, time.perf_counter() - started)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        # handler_cancellation: a client that disconnects cancels its request (and so its statement).
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        http, listen = self.fleet.config.http, self.fleet.config.listen
        tls = listen.tls if http is not None and http.tls == "listen" else http.tls if http is not None else None
        context = server_tls(tls) if tls is not None and not isinstance(tls, str) else None
        await web.TCPSite(self.runner, host, port, reuse_port=reuse_port or None, ssl_context=context).start()
        log.info("HTTP%s on %s:%d: /metrics, /health, /health/live, /health/ready, /databases; SQL on /sql and "
                 "/api/database/*", "S" if context is not None else "", host, port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        registry = self.registry
        if self.group is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(GroupCollector(await self.group.ask_all({"op": "metrics"})))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _info(self) -> dict[str, dict[str, Any]]:
        """database_info, with the group's connection counts when there is a group."""
        info = database_info(self.fleet)
        if self.group is None:
            return info
        for worker, answer in (await self.group.ask_all({"op": "databases"})).items():
            if worker == self.group.worker or isinstance(answer, Exception):
                continue  # (a worker restarting: its clients are gone with it)
            for name, theirs in answer.items():
                ours = info.get(name)
                if ours is not None:
                    for field, count in theirs["connections"].items():
                        ours["connections"][field] += count
        return info

    # -- the seeds' replication endpoints

    async def _admin(self, request: web.Request, what: str = "replication jobs") -> web.Response | None:
        """None when the request carries an admin key and its secret (``X-API-Key`` and
        ``X-API-Secret``, or ``Authorization: Bearer <id>:<secret>``), else the 401 or 403."""
        key = await self.sql.key_from_headers(request)  # (a checked secret is remembered a minute)
        if key is None:
            return _error(401, "invalid or missing API key: send X-API-Key and X-API-Secret (or Authorization: "
                               "Bearer <id>:<secret>)")
        if key.role is not Role.ADMIN:
            return _error(403, f"key {key.id} is a {key.role.value} key: {what} need an admin key")
        return None

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object")
        return body if isinstance(body, dict) else _error(400, "the body must be a JSON object")

    async def _jobs(self, request: web.Request) -> Replicator | web.Response:
        """The jobs, for a request with an admin key; else the answer that refuses it."""
        refused = await self._admin(request)
        if refused is not None:
            return refused
        if self.replicator is None:
            return _error(503, "replication jobs do not run here")
        await self.replicator.wait_loaded()
        return self.replicator

    async def list_jobs(self, request: web.Request) -> web.Response:
        replicator = await self._jobs(request)
        if isinstance(replicator, web.Response):
            return replicator
        last = await replicator.last_runs()
        jobs = []
        for job in replicator.jobs().values():
            done = last.get(job.id, {})
            jobs.append({**job.spec(), "lastRun": done["started"].isoformat() if done.get("started") else None,
                         "lastStatus": done.get("status"), "lastRows": done.get("rows"),
                         "lastError": done.get("error"), "running": job.id in replicator.running})
        return web.json_response({"jobs": jobs})

    async def create_job(self, request: web.Request) -> web.Response:
        replicator = await self._jobs(request)
        if isinstance(replicator, web.Response):
            return replicator
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        try:
            job = await replicator.create(body)
        except (JobError, ReplicationError) as exc:
            return _error(409 if "exists already" in str(exc) else 400, str(exc), getattr(exc, "hint", None))
        return web.json_response(job.spec(), status=201)

    async def run_job(self, request: web.Request) -> web.Response:
        replicator = await self._jobs(request)
        if isinstance(replicator, web.Response):
            return replicator
        try:
            job = replicator.job(request.match_info["job_id"])
            if request.query.get("nowait", "").lower() in ("1", "true", "yes"):
                replicator.start_run(job)
                return web.json_response({"jobId": job.id, "status": "started"}, status=202)
            return web.json_response(_run_json(await asyncio.shield(replicator.run(job))))
        except JobError as exc:
            return _error(404 if exc.missing else 409, str(exc), exc.hint)
        except ReplicationError as exc:
            return _error(400, str(exc))

    async def replicate_table(self, request: web.Request) -> web.Response:
        replicator = await self._jobs(request)
        if isinstance(replicator, web.Response):
            return replicator
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        table, source, targets = body.get("table"), body.get("sourceDatabase"), body.get("targetDatabases")
        if not isinstance(table, str) or not isinstance(source, str) or not isinstance(targets, list) or not targets:
            return _error(400, "needs table, sourceDatabase and targetDatabases (a list)",
                          'e.g. {"sourceDatabase": "primary", "targetDatabases": ["secondary"], '
                          '"table": "transactions", "syncKey": "created_at"}')
        try:
            job = ad_hoc(table, source, [str(t) for t in targets], str(body.get("syncKey", "updated_at")),
                         replicator.config)
            return web.json_response(_run_json(await asyncio.shield(replicator.run(job))))
        except JobError as exc:
            return _error(409 if "running" in str(exc) else 400, str(exc), exc.hint)
        except ReplicationError as exc:
            return _error(400, str(exc))

    # -- the tenant directory

    async def _directory(self, request: web.Request) -> Directory | web.Response:
        refused = await self._admin(request, "tenants")
        if refused is not None:
            return refused
        directory = self.fleet.directory
        if not isinstance(directory, Directory):
            return _error(404, "there is no tenant directory in this pgfleet", "configure directory:")
        return directory

    async def create_tenant(self, request: web.Request) -> web.Response:
        directory = await self._directory(request)
        if isinstance(directory, web.Response):
            return directory
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        name, template, host = body.get("name"), body.get("template"), body.get("host")
        if not isinstance(name, str) or not all(v is None or isinstance(v, str) for v in (template, host)):
            return _error(400, "needs name (a string), and optionally template and host", 
                          '{"name": "server_123", "template": "server_template", "host": "pg1"}')
        try:
            made = await _shielded(directory.create(name, template, host))
        except ProxyError as exc:
            return _error(_TENANT_STATUS.get(exc.sqlstate, 400 if isinstance(exc, ClientError) else 503),
                          exc.message, exc.hint)
        return web.json_response(made, status=201)

    async def drop_tenant(self, request: web.Request) -> web.Response:
        directory = await self._directory(request)
        if isinstance(directory, web.Response):
            return directory
        try:
            dropped = await _shielded(directory.drop(request.match_info["name"]))
        except ProxyError as exc:
            return _error(_TENANT_STATUS.get(exc.sqlstate, 400 if isinstance(exc, ClientError) else 503),
                          exc.message, exc.hint)
        return web.json_response(dropped)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        info = database_info(self.fleet)  # health is the same in every worker: no need to ask
        missing = sorted(name for name, db in info.items()
                         if not db["optional"] and (db["status"] not in ("healthy", "degraded")
                                                    or db["circuit"] == "open"))
        if missing or self.fleet.shutting_down:
            return web.json_response({"status": "not ready", "unavailable": missing,
                                      "shutting_down": self.fleet.shutting_down}, status=503)
        return web.json_response({"status": "ready"})

    async def health(self, request: web.Request) -> web.Response:
        info = await self._info()
        overall = "healthy" if all(d["status"] == "healthy" for d in info.values()) else \
            "down" if all(d["status"] == "down" for d in info.values()) else "degraded"
        return web.json_response({"status": overall, "databases": info})

    async def databases(self, request: web.Request) -> web.Response:
        return web.json_response(await self._info())


async def _shielded(work: Any) -> Any:
    """``work`` finished even if the client leaves (a half-made tenant is worse than a late
    answer); its outcome is read either way, so nothing is logged as never retrieved."""
    task = asyncio.get_running_loop().create_task(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


# CREATE and DROP TENANT's errors as HTTP statuses (anything else a client's: 400; a server's: 503).
_TENANT_STATUS = {DUPLICATE_DATABASE: 409, INVALID_CATALOG_NAME: 404, UNDEFINED_OBJECT: 404}


def _error(status: int, message: str, hint: str | None = None) -> web.Response:
    return web.json_response({"error": message, **({"hint": hint} if hint else {})}, status=status)


def _run_json(run: Run) -> dict[str, Any]:
    """A run, with the seeds' field names."""
    return {"jobId": run.job, "status": run.status, "rows": run.rows,
            "duration": round(((run.finished or time.time()) - run.started) * 1000, 1),
            "results": [{"table": p.table, "targetDatabase": p.target, "rows": p.rows,
                         "duration": round(p.seconds * 1000, 1),
                         "status": "ok" if (p.table, p.target) not in run.errors else "failed",
                         "error": run.errors.get((p.table, p.target)), "watermark": p.watermark}
                        for p in run.parts]}
