"""A TCP forwarder that breaks its connections on demand, for the fault tests.

``FaultProxy(host, port)`` listens on 127.0.0.1:``.port`` and forwards every connection to
``host:port``. One thread runs a selector loop; the other threads (the tests) ask it to act
and wait until it has:

- ``cut()`` resets every live connection at once, on both sides (SO_LINGER 0: an RST, no FIN),
  and says how many there were (``live()`` counts them without cutting);
- ``refuse(True)`` closes the listening socket (connects get ECONNREFUSED), ``refuse(False)``
  listens again on the same port;
- ``stall(True)`` accepts connections and then never answers them (a black hole, until
  ``cut()``), so a client's connect timeout is what ends them;
- ``reset_next(n)`` resets the next ``n`` connections as soon as they are accepted, and
  forwards the ones after them (one failure exactly, whenever it comes);
- ``hold(b"...")`` keeps back, on each connection, the first chunk the client sends that
  contains those bytes and everything after it (the target never sees them), until
  ``hold(None)`` lets them through.

Standard library only; nothing here knows about PostgreSQL.
"""

from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from types import TracebackType
from typing import Any, Self

_CHUNK = 1 << 16
_HIGH_WATER = 1 << 20  # stop reading a side while this much waits to be written to the other
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Conn:
    """One forwarded connection: the client's socket, the target's, and what each still owes."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.socks = (client, server)
        self.pending = {client: bytearray(), server: bytearray()}  # to be written to that socket
        self.closed = False
        self.handler: Callable[[socket.socket, int], None] | None = None
        self.held: bytearray | None = None  # the client's bytes kept back by hold()

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.socks[1] if sock is self.socks[0] else self.socks[0]


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port``, and break it on demand."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0  # chosen at start(), kept across refuse(True)/refuse(False)
        self.accepted = 0  # connections accepted so far (a test can check pgfleet came through)
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._conns: set[_Conn] = set()
        self._held: list[socket.socket] = []  # accepted while stalled: never answered
        self._stalled = False
        self._resets = 0  # connections still to reset on accept (reset_next)
        self._hold: bytes | None = None
        self._running = False
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name=f"faultproxy->{target_port}", daemon=True)

    # -- the tests' side

    def start(self) -> Self:
        self._listen()
        self._sel.register(self._wake_r, _READ, None)
        self._running = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._running:
            self._call(self._shutdown)
            self._thread.join(5)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def live(self) -> int:
        """How many connections are open through the proxy now (held ones included)."""
        return int(self._call(lambda: len(self._conns) + len(self._held)))

    def cut(self) -> int:
        """Reset every live connection (both sides); returns how many there were."""
        return int(self._call(self._cut))

    def refuse(self, on: bool = True) -> None:
        self._call(partial(self._refuse, on))

    def stall(self, on: bool = True) -> None:
        def set_stalled() -> None:
            self._stalled = on
        self._call(set_stalled)

    def reset_next(self, count: int = 1) -> None:
        def set_resets() -> None:
            self._resets = count
        self._call(set_resets)

    def resets_left(self) -> int:
        """How many of the connections ``reset_next`` asked for have not come yet."""
        return int(self._call(lambda: self._resets))

    def hold(self, pattern: bytes | None) -> None:
        def set_hold() -> None:
            self._hold = pattern
            if pattern is None:
                for conn in list(self._conns):
                    if conn.held is not None:
                        server = conn.socks[1]
                        conn.pending[server] += conn.held
                        conn.held = None
                        self._watch(server, _READ | _WRITE, conn.handler)
        self._call(set_hold)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread and wait for it: no socket is touched by two threads."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box.append(exc)
            finally:
                done.set()

        self._calls.put(run)
        self._wake_w.send(b"!")
        if not done.wait(10):
            raise RuntimeError("the fault proxy's loop did not answer within 10 s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # -- the loop thread

    def _run(self) -> None:
        while self._running:
            for key, events in self._sel.select():
                if key.data is None:
                    self._wake_r.recv(4096)
                    while not self._calls.empty():
                        self._calls.get()()
                else:
                    key.data(key.fileobj, events)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._sel.register(sock, _READ, self._accept)

    def _accept(self, listener: socket.socket, _events: int) -> None:
        if listener is not self._listener:
            return  # closed by refuse() earlier in this round of events
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        if self._resets > 0:
            self._resets -= 1
            _reset(client)
            return
        if self._stalled:
            self._held.append(client)
            return
        try:
            server = socket.create_connection(self.target, timeout=2)
        except OSError:
            _reset(client)
            return
        conn = _Conn(client, server)
        conn.handler = partial(self._pump, conn)
        for sock in conn.socks:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sel.register(sock, _READ, conn.handler)
        self._conns.add(conn)

    def _pump(self, conn: _Conn, sock: socket.socket, events: int) -> None:
        if conn.closed:
            return  # closed earlier in this round of events
        peer = conn.peer(sock)
        try:
            if events & _WRITE:
                self._send(sock, conn.pending[sock])
            if events & _READ:
                data = sock.recv(_CHUNK)
                if not data:
                    self._close(conn, reset=False)
                    return
                if sock is conn.socks[0] and (conn.held is not None or (self._hold and self._hold in data)):
                    conn.held = (conn.held or bytearray()) + data
                else:
                    conn.pending[peer] += data
                    self._send(peer, conn.pending[peer])
        except OSError:
            self._close(conn, reset=True)  # one side was reset: so is the other
            return
        for side in conn.socks:
            mask = (_READ if len(conn.pending[conn.peer(side)]) < _HIGH_WATER else 0) | \
                   (_WRITE if conn.pending[side] else 0)
            self._watch(side, mask, conn.handler)

    @staticmethod
    def _send(sock: socket.socket, buf: bytearray) -> None:
        if buf:
            with suppress(BlockingIOError):
                del buf[:sock.send(buf)]

    def _watch(self, sock: socket.socket, mask: int, handler: Any) -> None:
        key = self._sel.get_map().get(sock)
        if key is None:
            if mask:
                self._sel.register(sock, mask, handler)
        elif not mask:
            self._sel.unregister(sock)
        elif key.events != mask:
            self._sel.modify(sock, mask, handler)

    def _close(self, conn: _Conn, reset: bool) -> None:
        conn.closed = True
        self._conns.discard(conn)
        for sock in conn.socks:
            with suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            if reset:
                _reset(sock)
            else:  # one side said goodbye: pass on what it can take now, then a FIN
                with suppress(OSError):
                    self._send(sock, conn.pending[sock])
                sock.close()

    def _cut(self) -> int:
        count = len(self._conns) + len(self._held)
        for conn in list(self._conns):
            self._close(conn, reset=True)
        for sock in self._held:
            _reset(sock)
        self._held.clear()
        return count

    def _refuse(self, on: bool) -> None:
        if on and self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()  # connects queued in the backlog are reset too
            self._listener = None
        elif not on and self._listener is None:
            self._listen()

    def _shutdown(self) -> None:
        self._cut()
        self._refuse(True)
        self._running = False
