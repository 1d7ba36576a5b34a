"""SQL over HTTP on ``http.port``: the seeds' ``/api/database/*`` endpoints and Neon's ``/sql``.

Every request that carries SQL runs in a session of its own, the wire protocol's
(api/inprocess.py): the same key checks, routing, merger, two-phase commit, pools and audit.

- **Authentication.** The seeds' endpoints take ``X-API-Key`` and ``X-API-Secret``, or
  ``Authorization: Bearer <id>:<secret>``. ``/sql`` takes Neon's ``Neon-Connection-String``
  (``postgresql://<key id>:<secret>@host/<database>``). A missing, unknown or wrong key is a 401
  with one message. The secret is checked against the key's SCRAM verifier
  (auth/keys.check_secret); a key and secret that passed are remembered for
  ``SECRET_CACHE`` seconds (a PBKDF2 per request would cost more than the query).
- **Values.** The seeds' endpoints answer JSON numbers only where that is lossless (int2, int4,
  float4, float8), booleans for bool, parsed JSON for json and jsonb, and strings for
  everything else: int8 and numeric included (``"bigint": "number"`` in the body asks for
  numbers). ``/sql`` answers as Neon does: text values under ``Neon-Raw-Text-Output: true``
  (what its driver sends), else the same typing as the seeds' endpoints.
- **Errors.** An ErrorResponse is answered with all of its fields. The seeds' endpoints use 403
  for 42501, 503 for connection errors (class 08, 57P01, 53300), 504 for a statement
  cancelled by a timeout, and 400 for the rest. ``/sql`` always answers 400, as Neon does.
- **Limits** (``http:`` config):
  - ``max_body`` (the request, 413);
  - ``max_response`` (507, naming the limit and how to page);
  - ``statement_timeout`` (unless the key has its own);
  - ``max_requests_per_key`` (429).
  A client that disconnects cancels its statement.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from ..auth.keys import ApiKey, check_secret
from ..config import ADMIN_DATABASE
from ..errors import (
    ADMIN_SHUTDOWN,
    INSUFFICIENT_PRIVILEGE,
    INVALID_PASSWORD,
    PROTOCOL_VIOLATION,
    QUERY_CANCELED,
    TOO_MANY_CONNECTIONS,
)
from .inprocess import NO_COPY, InProcess, Result, SqlError, TooBig, error_json

if TYPE_CHECKING:
    from ..fleet import Fleet

log = logging.getLogger("pgfleet.http")

SECRET_CACHE = 60.0
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_$-]*")
_LOSSLESS_NUMBERS = frozenset({21, 23, 26, 700, 701})  # int2, int4, oid, float4, float8
_BIG_NUMBERS = frozenset({20, 1700})  # int8, numeric
_JSON = frozenset({114, 3802})
_BOOL = 16

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SqlApi:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._verified: dict[tuple[str, bytes], tuple[float, Any]] = {}  # (key, sha256(secret)) -> until, verifier
        self._busy: dict[str, int] = {}  # requests running per key

    def add_routes(self, app: web.Application) -> None:
        safe = self._safe
        app.router.add_post("/api/database/query", safe(self.query))
        app.router.add_post("/api/database/transaction", safe(self.transaction))
        app.router.add_post("/api/database/federated-query", safe(self.federated))
        app.router.add_get("/api/database/info", safe(self.info))
        app.router.add_get("/api/database/health", safe(self.health))
        app.router.add_get("/api/database/schema", safe(self.schema))
        app.router.add_post("/api/v1/query", safe(self.query))
        app.router.add_post("/api/v1/query/batch", safe(self.transaction))
        app.router.add_post("/sql", safe(self.neon, neon=True))

    def _safe(self, handler: Handler, neon: bool = False) -> Handler:
        """``handler``, answering JSON whatever goes wrong: an answer over http.max_response
        (507), and our own bugs (500, logged with the traceback; never sent)."""
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except TooBig:
                return _TooBig(0, self.http.max_response).response(neon)
            except (web.HTTPException, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("internal error answering %s %s", request.method, request.path)
                message = "internal error in pgfleet; the details are in its log"
                return _json({"message": message} if neon else {"error": message}, 500)
        return run

    @property
    def http(self) -> Any:
        return self.fleet.config.http

    # -- who asks

    async def key_of(self, key_id: str | None, secret: str | None) -> ApiKey | None:
        """The key ``key_id`` if ``secret`` is its secret, else None. A checked pair is remembered
        SECRET_CACHE seconds, tied to the key's verifier (a RELOAD that changes the secret or
        removes the key ends it). The PBKDF2 of a check runs off the event loop."""
        if not key_id or secret is None:
            return None
        key = self.fleet.keys.get(key_id)
        digest = hashlib.sha256(secret.encode(errors="surrogateescape")).digest()
        now = time.monotonic()
        cached = self._verified.get((key_id, digest))
        if cached is not None and cached[0] > now and key is not None and cached[1] == key.verifier:
            return key
        ok = await asyncio.get_running_loop().run_in_executor(None, check_secret, key, secret)
        if not ok or key is None:
            return None
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[(key_id, digest)] = (now + SECRET_CACHE, key.verifier)
        return key

    async def key_from_headers(self, request: web.Request) -> ApiKey | None:
        """The key of ``X-API-Key``/``X-API-Secret`` or ``Authorization: Bearer id:secret``, if right."""
        key_id, secret = request.headers.get("X-API-Key"), request.headers.get("X-API-Secret")
        bearer = request.headers.get("Authorization", "")
        if key_id is None and bearer.lower().startswith("bearer ") and ":" in bearer:
            key_id, secret = bearer[7:].strip().split(":", 1)
        return await self.key_of(key_id, secret)

    # -- running SQL

    async def _run(self, key: ApiKey, database: str, work: Callable[[InProcess], Awaitable[Any]],
                   request: web.Request) -> Any:
        """A new session of ``key`` on ``database`` for ``work``, closed after it: every request
        starts as a new client would, and nothing of one reaches the next. The key's concurrent
        requests are bounded (429 past ``max_requests_per_key``)."""
        if self.fleet.shutting_down:
            raise _Stopping()
        if database == ADMIN_DATABASE:
            raise _NotServed(f"the admin console ({ADMIN_DATABASE}) is not served over HTTP: use psql")
        limit = self.http.max_requests_per_key
        if self._busy.get(key.id, 0) >= limit:
            raise _TooMany(key.id, limit)
        self._busy[key.id] = self._busy.get(key.id, 0) + 1
        settings = {"application_name": "pgfleet http"}
        if key.statement_timeout is None:
            settings["statement_timeout"] = f"{int(self.http.statement_timeout * 1000)}"
        session = InProcess(self.fleet, _peer(request), tls=request.secure, limit=self.http.max_response)
        try:
            await session.login(key.id, database, settings)
            return await work(session)
        except asyncio.CancelledError:  # the HTTP client went away: its statement is cancelled
            session.cancel()
            raise
        finally:
            session.finish()
            self._busy[key.id] -= 1

    def _check_size(self, results: list[Result]) -> None:
        size = sum(len(v) if v is not None else 4 for r in results for row in r.rows for v in row)
        if size > self.http.max_response:
            raise _TooBig(size, self.http.max_response)

    # -- the seeds' endpoints

    async def query(self, request: web.Request) -> web.StreamResponse:
        if "application/x-ndjson" in request.headers.get("Accept", ""):
            return await self._stream(request)
        return await self._seeds(request, lambda body: [(_text(body, "query"), _params(body))], single=True)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """``Accept: application/x-ndjson``: one JSON line for the fields, one per row as rows
        arrive, one for the end (or the error). No http.max_response: the HTTP client's reading
        paces the backends (InProcess.stream)."""
        started = time.perf_counter()
        key = await self.key_from_headers(request)
        if key is None:
            return _unauthorized()
        try:
            body = await request.json()
            sql, params = _text(body, "query"), _params(body)
        except (ValueError, _BadRequest) as exc:
            return _json({"error": str(exc) if isinstance(exc, _BadRequest) else "the body is not valid JSON"}, 400)
        numbers = body.get("bigint") == "number"
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        dumps = json.JSONEncoder(default=str).encode

        async def work(session: InProcess) -> None:
            fields: list[Any] = []
            try:
                async for kind, value in session.stream(sql, params):
                    if not response.prepared:
                        await response.prepare(request)
                    if kind == "fields":
                        fields = value
                        line = {"fields": [{"name": f.name, "dataTypeID": f.type_id} for f in fields]}
                    elif kind == "row":
                        line = {f.name: _typed(v, f.type_id, numbers) for f, v in zip(fields, value, strict=True)}
                    else:
                        line = {"command": value[0], "rowCount": value[1],
                                "duration": round((time.perf_counter() - started) * 1000, 3)}
                    await response.write(dumps(line).encode() + b"\n")
            except SqlError as exc:
                if not response.prepared:
                    response.set_status(_status(exc.code))
                    await response.prepare(request)
                await response.write(dumps({"error": error_json(exc.fields)}).encode() + b"\n")
        try:
            await self._run(key, str(body.get("database") or self.fleet.config.listen.database), work, request)
        except SqlError as exc:
            return _json({"error": error_json(exc.fields)}, _status(exc.code))
        except _Refused as exc:
            return exc.response()
        await response.write_eof()
        return response

    async def transaction(self, request: web.Request) -> web.StreamResponse:
        def statements(body: dict[str, Any]) -> list[tuple[str, list[Any]]]:
            queries = body.get("queries")
            if not isinstance(queries, list) or not queries:
                raise _BadRequest('"queries" must be a list of {"query", "params"}')
            return [(_text(q, "query"), _params(q)) if isinstance(q, dict) else _bad("each query is an object")
                    for q in queries]
        return await self._seeds(request, statements, single=False)

    async def federated(self, request: web.Request) -> web.StreamResponse:
        """The merger; ``databases`` (optional) is the wire protocol's ``/* pgfleet: databases=a,b */``
        hint, with the same rules: a server or admin key, databases it may see."""
        def statement(body: dict[str, Any]) -> list[tuple[str, list[Any]]]:
            sql = _text(body, "query")
            names = body.get("databases")
            if names is not None:
                if not isinstance(names, list) or not names or \
                        not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
                    raise _BadRequest('"databases" must be a list of database names')
                sql = f"/* pgfleet: databases={','.join(names)} */ {sql}"
                shift[0] = len(sql) - len(_text(body, "query"))
            return [(sql, _params(body))]
        shift = [0]  # the hint's length: an error's position is the client's text's
        return await self._seeds(request, statement, single=True, shift=shift)

    async def _seeds(self, request: web.Request, read: Callable[[dict[str, Any]], list[tuple[str, list[Any]]]],
                     single: bool, shift: list[int] | None = None) -> web.StreamResponse:
        started = time.perf_counter()
        key = await self.key_from_headers(request)
        if key is None:
            return _unauthorized()
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise _BadRequest("the body must be a JSON object")
            statements = read(body)
        except (ValueError, _BadRequest) as exc:
            return _json({"error": str(exc) if isinstance(exc, _BadRequest) else "the body is not valid JSON"}, 400)
        numbers = body.get("bigint") == "number"
        database = body.get("database") or self.fleet.config.listen.database

        async def work(session: InProcess) -> list[Result]:
            return await (session.run(statements) if single else _in_transaction(session, statements))
        try:
            results = await self._run(key, str(database), work, request)
            self._check_size(results)
        except SqlError as exc:
            fields = dict(exc.fields)
            if shift and shift[0] and fields.get("P", "").isdigit():
                fields["P"] = str(max(1, int(fields["P"]) - shift[0]))
            return _json({"error": error_json(fields)}, _status(exc.code))
        except _Refused as exc:
            return exc.response()
        duration = round((time.perf_counter() - started) * 1000, 3)
        shaped = [_shaped(r, numbers) for r in results]
        if single:
            return _json({**shaped[-1], "duration": duration} if shaped else {"rows": [], "duration": duration})
        return _json({"results": shaped, "duration": duration})

    async def info(self, request: web.Request) -> web.StreamResponse:
        key = await self.key_from_headers(request)
        if key is None:
            return _unauthorized()
        return _json({"key": key.id, "role": key.role.value, "databases": self._health_of(key)})

    async def health(self, request: web.Request) -> web.StreamResponse:
        key = await self.key_from_headers(request)
        if key is None:
            return _unauthorized()
        databases = self._health_of(key)
        status = "healthy" if all(d["status"] == "healthy" for d in databases) else "degraded"
        return _json({"status": status, "databases": databases})

    def _health_of(self, key: ApiKey) -> list[dict[str, Any]]:
        """The seeds' health fields for every database the key may see."""
        out = []
        for name, pool in self.fleet.pools.items():
            if not key.may_use(name):
                continue
            h = self.fleet.health.status(name)
            out.append({"database": name, "status": str(h.status),
                        "lastChecked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.last_check))
                        if h.last_check else None,
                        "connectionCount": len(pool.active) + len(pool.idle), "responseTime": h.response_ms})
        return out

    async def schema(self, request: web.Request) -> web.StreamResponse:
        key = await self.key_from_headers(request)
        if key is None:
            return _unauthorized()
        sql = ("SELECT table_schema, table_name, column_name, data_type, is_nullable = 'YES' AS nullable "
               "FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema', "
               "'pgfleet') ORDER BY 1, 2, ordinal_position")
        database = request.query.get("database") or self.fleet.config.listen.database
        try:
            results = await self._run(key, database, lambda s: s.run([(sql, [])]), request)
        except SqlError as exc:
            return _json({"error": error_json(exc.fields)}, _status(exc.code))
        except _Refused as exc:
            return exc.response()
        tables: dict[str, list[dict[str, Any]]] = {}
        for schema, table, column, kind, nullable in (results[0].rows if results else []):
            tables.setdefault(f"{schema}.{table}", []).append(
                {"name": column, "type": kind, "nullable": nullable == "t"})
        return _json({"database": database, "tables": tables})

    # -- Neon's /sql

    async def neon(self, request: web.Request) -> web.StreamResponse:
        try:
            parts = urlsplit(request.headers.get("Neon-Connection-String", ""))
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
        except ValueError:
            user = password = ""
        key = await self.key_of(user, password) if user else None
        if key is None:
            return _json({"message": "authentication failed: the Neon-Connection-String's user and password "
                                     "must be a pgfleet key id and its secret", "code": INVALID_PASSWORD}, 401)
        database = unquote(parts.path.lstrip("/")) or self.fleet.config.listen.database
        try:
            body = await request.json()
        except ValueError:
            return _json({"message": "the body is not valid JSON"}, 400)
        raw = request.headers.get("Neon-Raw-Text-Output", "").lower() == "true"
        arrays = request.headers.get("Neon-Array-Mode", "").lower() == "true"
        batch = isinstance(body, dict) and isinstance(body.get("queries"), list)
        try:
            if batch:
                statements = [(_text(q, "query"), _params(q)) for q in body["queries"]]
            elif isinstance(body, dict):
                statements = [(_text(body, "query"), _params(body))]
            else:
                raise _BadRequest("the body must be a JSON object")
        except _BadRequest as exc:
            return _json({"message": str(exc)}, 400)
        begin = _begin(request.headers)

        async def work(session: InProcess) -> list[Result]:
            return await (_in_transaction(session, statements, begin) if batch else session.run(statements))
        try:
            results = await self._run(key, database, work, request)
            self._check_size(results)
        except SqlError as exc:
            return _json(error_json(exc.fields), 400)
        except _Refused as exc:
            return exc.response(neon=True)
        shaped = [_neon(r, raw, arrays) for r in results]
        return _json({"results": shaped} if batch else shaped[-1] if shaped else {"rows": []})


async def _in_transaction(session: InProcess, statements: list[tuple[str, list[Any]]],
                          begin: str = "BEGIN") -> list[Result]:
    """The statements as one transaction: all of them, or (the first error) none."""
    await session.simple(begin)
    try:
        results = await session.run(statements)
    except SqlError:
        await session.simple("ROLLBACK")
        raise
    await session.simple("COMMIT")
    return results


def _begin(headers: Any) -> str:
    """BEGIN as Neon's batch headers ask (isolation level, read only, deferrable)."""
    words = ["BEGIN"]
    level = headers.get("Neon-Batch-Isolation-Level")
    levels = {"serializable": "SERIALIZABLE", "repeatableread": "REPEATABLE READ",
              "readcommitted": "READ COMMITTED", "readuncommitted": "READ UNCOMMITTED"}
    if level and level.lower() in levels:
        words.append(f"ISOLATION LEVEL {levels[level.lower()]}")
    if headers.get("Neon-Batch-Read-Only", "").lower() == "true":
        words.append("READ ONLY")
    if headers.get("Neon-Batch-Deferrable", "").lower() == "true":
        words.append("DEFERRABLE")
    return " ".join(words)


def _neon(result: Result, raw: bool, arrays: bool) -> dict[str, Any]:
    fields = [{"name": f.name, "dataTypeID": f.type_id, "tableID": f.table_id, "columnID": f.column_id,
               "dataTypeSize": f.size, "dataTypeModifier": f.modifier, "format": "text"} for f in result.fields]
    convert = (lambda row: row) if raw else (lambda row: [_typed(v, f.type_id, False) for v, f in
                                                           zip(row, result.fields, strict=True)])
    rows: list[Any] = [convert(row) for row in result.rows]
    if not arrays:
        rows = [dict(zip((f.name for f in result.fields), row, strict=True)) for row in rows]
    return {"command": result.command, "rowCount": result.row_count, "rowAsArray": arrays, "fields": fields,
            "rows": rows}


def _shaped(result: Result, numbers: bool) -> dict[str, Any]:
    names = [f.name for f in result.fields]
    rows = [{name: _typed(value, f.type_id, numbers) for name, value, f in zip(names, row, result.fields, strict=True)}
            for row in result.rows]
    return {"rows": rows, "rowCount": result.row_count if result.row_count is not None else len(rows),
            "fields": [{"name": f.name, "dataTypeID": f.type_id} for f in result.fields], "command": result.command}


def _typed(value: str | None, type_id: int, numbers: bool) -> Any:
    if value is None:
        return None
    if type_id in _LOSSLESS_NUMBERS or (numbers and type_id in _BIG_NUMBERS):
        try:
            number = float(value) if type_id in (700, 701, 1700) else int(value)
        except ValueError:
            return value  # NaN, Infinity: not JSON numbers
        return value if not math.isfinite(number) else number
    if type_id == _BOOL:
        return value == "t"
    if type_id in _JSON:
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # nested past Python's limit: as PostgreSQL wrote it
            return value
    return value


_COPY = re.compile(r"\A(?:\s+|--[^\n]*\n|/\*.*?\*/)*copy\b", re.IGNORECASE | re.DOTALL)


def _text(body: Any, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise _BadRequest(f'"{name}" must be a non-empty string of SQL')
    if _COPY.match(value):
        raise _BadRequest(NO_COPY)
    return value


def _params(body: dict[str, Any]) -> list[Any]:
    params = body.get("params", [])
    if params is None:
        return []
    if not isinstance(params, list):
        raise _BadRequest('"params" must be a list')
    if len(params) > 32767:
        raise _BadRequest(f'{len(params)} "params": a statement takes at most 32767')
    return params


def _bad(message: str) -> Any:
    raise _BadRequest(message)


def _peer(request: web.Request) -> str:
    return f"http:{request.remote or '?'}"


def _status(code: str) -> int:
    if code == INSUFFICIENT_PRIVILEGE or code.startswith("28"):  # (28000: TLS required, or the like)
        return 403
    if code == PROTOCOL_VIOLATION:  # (what the request sent, e.g. a NUL in the SQL)
        return 400
    if code.startswith("08") or code in (ADMIN_SHUTDOWN, TOO_MANY_CONNECTIONS):
        return 503
    if code == QUERY_CANCELED:
        return 504
    return 400


def _unauthorized() -> web.Response:
    return _json({"error": "invalid or missing API key: send X-API-Key and X-API-Secret (or Authorization: "
                           "Bearer <id>:<secret>)"}, 401)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=lambda v: json.dumps(v, default=str))


class _BadRequest(Exception):
    pass


class _Refused(Exception):
    def response(self, neon: bool = False) -> web.Response:
        raise NotImplementedError


class _NotServed(_Refused):
    def __init__(self, message: str) -> None:
        self.message = message

    def response(self, neon: bool = False) -> web.Response:
        return _json({"message": self.message} if neon else {"error": self.message}, 403)


class _Stopping(_Refused):
    def response(self, neon: bool = False) -> web.Response:
        message = "pgfleet is shutting down: send the request again in a moment (to another instance)"
        return _json({"message": message} if neon else {"error": message}, 503)


class _TooMany(_Refused):
    def __init__(self, key: str, limit: int) -> None:
        self.key, self.limit = key, limit

    def response(self, neon: bool = False) -> web.Response:
        message = (f"key {self.key} has {self.limit} requests running (http.max_requests_per_key): wait for one "
                   "to end")
        return _json({"message": message} if neon else {"error": message}, 429)


class _TooBig(_Refused):
    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit

    def response(self, neon: bool = False) -> web.Response:
        message = (f"the result is over http.max_response ({self.limit} bytes of values): ask for fewer rows "
                   "(LIMIT, or keyset paging with WHERE key > last), or stream it with Accept: application/x-ndjson")
        return _json({"message": message} if neon else {"error": message}, 507)
