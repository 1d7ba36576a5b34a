"""The process group of ``pgfleet run --workers N``: how one worker talks to the others.

Theory of operation. The workers share the client port (SO_REUSEPORT: the kernel hands each
new connection to one of them) and nothing else: each has its own fleet, pools and sessions.
What must still act as one goes over a Unix socket per worker, ``worker-<i>.sock`` in the
group's directory (made by the supervisor, mode 0700):

- a CancelRequest names a client by the pid pgfleet gave it; the pid carries its worker's
  number (``worker_of``), and a worker that gets a cancel for another worker's client passes
  it on;
- the admin console and ``/metrics`` ask every worker and add up (or label) what they say;
- RELOAD, PAUSE and RESUME run on every worker; KILL on the one that owns the client;
- worker 0 (the leader) alone runs the health checks and the two-phase recovery, and tells the
  others each check's result so that every worker opens and closes the same circuits.

A request and its answer are each one msgspec-JSON message behind a 4-byte length. A request
is a dict with an ``op``; the answer is ``{"ok": value}`` or ``{"error": {"code", "message",
"hint"}}``. A worker that does not answer within ``ASK_TIMEOUT`` (it is restarting) is left
out of a group answer, and the answer says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ..errors import CONNECTION_FAILURE, INTERNAL_ERROR, ClientError, ProxyError
from ..fleet import WORKER_SHIFT

log = logging.getLogger("pgfleet.group")

# A client's pid (BackendKeyData) is its worker's number in the bits from WORKER_SHIFT up, and
# a random number below (fleet.py); MAX_WORKERS keeps the pid a positive int4.
MAX_WORKERS = 64
ASK_TIMEOUT = 5.0
MAX_MESSAGE = 64 * 1024 * 1024

_LENGTH = struct.Struct("!I")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def worker_of(pid: int) -> int:
    """The worker that owns the client with BackendKeyData pid ``pid``."""
    return pid >> WORKER_SHIFT


class GroupError(Exception):
    """This worker cannot take its place in the group (its socket cannot be made)."""


class PeerError(Exception):
    """A worker did not answer (it is starting or restarting), or its answer was cut."""


class Group:
    """This worker's place in the group: its number, the others', and the socket it answers on."""

    def __init__(self, directory: str, worker: int, workers: int) -> None:
        self.directory = directory
        self.worker = worker
        self.workers = workers
        self._server: asyncio.AbstractServer | None = None
        self._handle: Handler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def leader(self) -> bool:
        """Worker 0 runs what must run once: health checks, two-phase recovery."""
        return self.worker == 0

    @property
    def others(self) -> list[int]:
        return [w for w in range(self.workers) if w != self.worker]

    def path(self, worker: int) -> str:
        return os.path.join(self.directory, f"worker-{worker}.sock")

    def ready_path(self, worker: int) -> str:
        """A file the worker makes once it serves clients (the supervisor waits for it)."""
        return os.path.join(self.directory, f"worker-{worker}.ready")

    @property
    def config_path(self) -> str:
        """The config text the group runs: written by the supervisor at start and by a worker
        at each RELOAD the group took, read by every worker that starts (so that a restarted
        one runs what the others run, not an edit of the file nobody reloaded yet)."""
        return os.path.join(self.directory, "config.yaml")

    def keep_config(self, text: str) -> None:
        temporary = f"{self.config_path}.{self.worker}"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, self.config_path)

    def running_config(self) -> str:
        with open(self.config_path, encoding="utf-8") as f:
            return f.read()

    def ready(self) -> None:
        with open(self.ready_path(self.worker), "w") as file:
            file.write(str(os.getpid()))

    # -- answering

    async def serve(self, handle: Handler) -> None:
        """Answer the other workers' requests with ``handle`` (a ClientError it raises goes back
        as an error; anything else is our bug, logged here and answered as an error)."""
        self._handle = handle
        path = self.path(self.worker)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        try:
            self._server = await asyncio.start_unix_server(self._answer, path)
        except OSError as exc:
            raise GroupError(f"worker {self.worker} cannot open its group socket {path}: {exc.strerror or exc} "
                             "(the supervisor's directory; is TMPDIR short enough and writable?)") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for path in (self.path(self.worker), self.ready_path(self.worker)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for task in list(self._tasks):
            task.cancel()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read(reader)
            answer = await self.run(request)
            writer.write(_frame(answer))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, PeerError, msgspec.DecodeError):
            pass  # the asking worker went away; it reports that itself
        finally:
            writer.close()

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request here; the answer as it goes back on the socket."""
        assert self._handle is not None
        try:
            return {"ok": await self._handle(request)}
        except ProxyError as exc:
            return {"error": {"code": exc.sqlstate, "message": exc.message, "hint": exc.hint}}
        except Exception as exc:  # our bug: the asker gets an error, the log gets the traceback
            log.exception("internal error answering worker request %r", request.get("op"))
            return {"error": {"code": INTERNAL_ERROR, "message": f"internal error in worker {self.worker}: {exc!r}",
                              "hint": "see that worker's log"}}

    # -- asking

    async def ask(self, worker: int, request: dict[str, Any], timeout: float = ASK_TIMEOUT) -> Any:
        """Worker ``worker``'s answer to ``request`` (this worker's own when it is this one).
        Raises ClientError when it answers with an error, PeerError when it does not answer."""
        if worker == self.worker:
            answer = await self.run(request)
        else:
            answer = await self._ask(worker, request, timeout)
        error = answer.get("error")
        if error is not None:
            raise ClientError(error["code"], error["message"], hint=error.get("hint"))
        return answer.get("ok")

    async def _ask(self, worker: int, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self.path(worker))
                try:
                    writer.write(_frame(request))
                    await writer.drain()
                    answer: dict[str, Any] = await _read(reader)
                    return answer
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
            raise PeerError(f"worker {worker} did not answer ({exc.__class__.__name__}: {exc})") from None

    async def ask_all(self, request: dict[str, Any], timeout: float = ASK_TIMEOUT) -> dict[int, Any]:
        """Every worker's answer, by worker number: a value, a ClientError, or a PeerError."""
        workers = range(self.workers)
        answers = await asyncio.gather(*(self.ask(w, request, timeout) for w in workers), return_exceptions=True)
        out: dict[int, Any] = {}
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, ClientError | PeerError):
                raise answer
            out[worker] = answer
        return out

    def tell(self, workers: list[int], request: dict[str, Any]) -> None:
        """Send ``request`` to ``workers`` without waiting (a cancel, the leader's health
        results); a worker that does not answer misses it."""
        for worker in workers:
            task = asyncio.get_running_loop().create_task(self._tell(worker, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _tell(self, worker: int, request: dict[str, Any]) -> None:
        with contextlib.suppress(PeerError):
            await self._ask(worker, request, ASK_TIMEOUT)


def unreachable(worker: int, error: PeerError) -> ProxyError:
    return ProxyError(CONNECTION_FAILURE, f"worker {worker} did not answer: {error}",
                      hint="it is restarting if it died (the supervisor logs it); ask again in a moment")


def _frame(value: Any) -> bytes:
    body = _encode(value)
    return _LENGTH.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> Any:
    (length,) = _LENGTH.unpack(await reader.readexactly(4))
    if length > MAX_MESSAGE:
        raise PeerError(f"a worker message of {length} bytes is over {MAX_MESSAGE}")
    return _decode(await reader.readexactly(length))
