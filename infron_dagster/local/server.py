"""The socket server behind ``infron-local serve``: wsgiref, made fit for hostile clients.

One thread (the one in ``serve_forever``) reads every connection through a selector; a pool
of ``threads`` workers runs the app, each on a request that has arrived whole. A client
that sends slowly (a slow-loris dripping one byte at a time) therefore costs a socket and a
small buffer, never a worker: normal clients are served at once however many drip.

What plain ``wsgiref.simple_server`` lacks and this adds:

- **a deadline per request**: headers and body must arrive within ``request_timeout``
  seconds of the request's first byte, and the client may never go silent for longer than
  ``read_timeout`` (the wait for the next request on a kept-alive connection included).
  A late client gets a 408 and its connection is closed; each byte resets nothing.
- **bounded memory per connection**: headers up to 128 KiB (431 beyond); a body is spooled
  to a temp file past 64 KiB, and one over ``max_body_bytes`` is refused with 413 (a
  declared one before a byte of it is read, and before any ``100 Continue``).
- **bounded connections**: at most ``max_connections`` are open; past that the one that
  waited longest in the reading loop is closed, so a flood of idle or dripping sockets
  cannot lock newcomers out.
- **HTTP/1.1 keep-alive**: a client reuses its connection; an idle one holds no thread.
  A response is delimited by its Content-Length (else the connection closes after it).
- **chunked request bodies** are decoded; a request with neither Content-Length nor
  Transfer-Encoding has an empty body (RFC 9112), so the app never waits for bytes that
  will not come. Both framings at once (request smuggling) is a 400.
- **a real listen backlog** (128, not 5), so a burst of clients queues instead of being
  dropped.

Example:
    >>> from infron_dagster.local import create_app
    >>> import tempfile
    >>> server = build_server(create_app(tempfile.mkdtemp()), "127.0.0.1", 0, threads=4)
    >>> server.request_queue_size
    128
    >>> server.server_close()
"""

from __future__ import annotations

import contextlib
import io
import queue
import selectors
import socket
import sys
import tempfile
import threading
import time
from typing import IO, Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from .config import DEFAULT_MAX_BODY_BYTES
from .framing import (
    MAX_HEAD,
    MAX_LINE,
    BadBody,
    ChunkedScanner,
    Refusal,
    RequestBody,
    error_response,
    framing_of,
    parse_head,
    too_large,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_THREADS",
    "LISTEN_BACKLOG",
    "BoundedWSGIServer",
    "KeepAliveHandler",
    "build_server",
]

DEFAULT_THREADS = 64
DEFAULT_READ_TIMEOUT = 30.0
# Time for a whole request; 256 MiB take under a second on loopback, ~30 s at 10 MB/s.
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 256
LISTEN_BACKLOG = 128
_SPOOL_IN_MEMORY = 1 << 16
_RECV_SIZE = 1 << 16
# How long a closing connection is read (and discarded) so its last answer is not lost to
# a reset: closing a socket with unread input sends RST, which may drop the answer.
_LINGER = 2.0
_TICK = 0.25


# -- one connection, as the reading loop sees it ------------------------------------------------


class _Connection:
    """A client socket and the request arriving on it, fed by the reading loop (sans threads).

    `feed` moves received bytes into a spooled request (head, then body); once the request
    is whole, `take_request` hands it to a worker. Bytes past it (a pipelined request) stay
    in `pending` for the next round.
    """

    def __init__(self, sock: socket.socket, address: Any, now: float, cap: int) -> None:
        self.sock = sock
        self.address = address
        self.pending = bytearray()
        self.started: float | None = None  # when the current request's first byte came
        self.last_read = now
        self.closing_at: float | None = None  # set while lingering before the close
        self._cap = cap
        self._scanned = 0  # how much of `pending` was searched for the end of the head
        self._spool: IO[bytes] | None = None
        self._body_left = 0
        self._chunks: ChunkedScanner | None = None
        self._ready = False

    def since(self) -> float:
        """When it began what it is doing now (lingering ones come first: they are done)."""
        if self.closing_at is not None:
            return float("-inf")
        return self.started if self.started is not None else self.last_read

    def receive(self, data: bytes, now: float) -> None:
        """Take bytes the socket delivered."""
        self.last_read = now
        if self.started is None:
            self.started = now
        self.pending += data

    def advance(self) -> bool:
        """Move pending bytes into the request; whether the request is now whole.

        Raises `Refusal` for a request the loop must refuse itself (too large, malformed).
        """
        if not self.pending and self._spool is None:
            return False
        if self._spool is None and not self._take_head():
            return False
        if self._chunks is not None:
            self._take_chunked()
        else:
            taken = min(self._body_left, len(self.pending))
            self._keep(taken)
            self._body_left -= taken
            self._ready = self._body_left == 0
        return self._ready

    def take_request(self) -> IO[bytes]:
        """The whole request, spooled and rewound, for the worker that answers it."""
        spool, self._spool, self._ready, self._chunks = self._spool, None, False, None
        assert spool is not None
        spool.seek(0)
        # A pipelined request already begun counts from now: the wait was ours, not its.
        self.started = time.monotonic() if self.pending else None
        return spool

    def _take_head(self) -> bool:
        end = self._head_end()
        if end is None:
            if b"\n" not in self.pending[: MAX_LINE + 1] and len(self.pending) > MAX_LINE:
                raise Refusal(414, "uri_too_long", "The request line is too long.")
            if len(self.pending) > MAX_HEAD:
                raise Refusal(431, "headers_too_large", "The request headers are too large.")
            return False
        head = bytes(self.pending[:end])
        # Closed by `discard` or by the worker's handler, not here: it outlives this call.
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
        self._keep(end)
        self._scanned = 0
        framing, expects_continue = parse_head(head)
        if framing.chunked:
            self._chunks = ChunkedScanner()
        elif framing.length > self._cap:
            raise too_large(self._cap)
        self._body_left = framing.length
        if expects_continue and (framing.length or framing.chunked):
            self._send_quietly(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _head_end(self) -> int | None:
        buffer = self.pending
        if buffer.startswith((b"\n", b"\r\n")):  # a blank request line: the handler drops it
            return buffer.index(b"\n") + 1
        # Search only what is new (and the 2 bytes before): a dripping client must not
        # make every byte rescan the whole head.
        start = max(self._scanned - 2, 0)
        self._scanned = len(buffer)
        ends = [i + len(s) for s in (b"\n\r\n", b"\n\n") if (i := buffer.find(s, start)) != -1]
        return min(ends) if ends else None

    def _take_chunked(self) -> None:
        assert self._chunks is not None
        try:
            taken = self._chunks.feed(self.pending)
        except BadBody as exc:
            raise Refusal(400, "bad_chunked_body", f"Invalid chunked body: {exc}") from None
        if self._chunks.data_bytes > self._cap:
            raise too_large(self._cap)
        self._keep(taken)
        self._ready = self._chunks.done

    def _keep(self, count: int) -> None:
        assert self._spool is not None
        self._spool.write(self.pending[:count])
        del self.pending[:count]

    def _send_quietly(self, data: bytes) -> None:
        # Small enough for an empty socket buffer; a client that does not read loses it.
        with contextlib.suppress(OSError):
            self.sock.send(data)

    def refuse(self, refusal: Refusal) -> None:
        """Answer `refusal` without waiting."""
        self._send_quietly(error_response(refusal))

    def discard(self) -> None:
        """Forget the request being received (its temp file goes)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.pending.clear()


# -- the handler a worker runs on one whole request ---------------------------------------------


class _SocketWriter(io.BufferedIOBase):
    """``wfile``: writes straight to the socket, each write whole (``sendall``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class _ResponseHandler(ServerHandler):
    """wsgiref's per-request handler, answering HTTP/1.1 and deciding on keep-alive."""

    http_version = "1.1"

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        owner = self.request_handler
        # Without a length the body ends only with the connection. (A body the app left
        # unread needs nothing: the whole request was received before the app ran.)
        if "Content-Length" not in self.headers:
            owner.close_connection = True
        if owner.close_connection:
            self.headers["Connection"] = "close"

    def handle_error(self) -> None:
        self.request_handler.close_connection = True
        super().handle_error()


class KeepAliveHandler(WSGIRequestHandler):
    """Answers one whole request a worker took from the reading loop.

    `request` is the loop's `_Connection`: the request comes from its spool, the answer
    goes to its socket. Logs nothing: request lines are noise, and headers (Authorization)
    must never leak.
    """

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        connection: _Connection = self.request
        self.connection = connection.sock
        # Bounds each write: a client that stops reading its answer frees the worker.
        self.connection.settimeout(getattr(self.server, "read_timeout", DEFAULT_READ_TIMEOUT))
        self.rfile = connection.take_request()
        self.wfile = _SocketWriter(self.connection)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def handle_one_request(self) -> None:
        try:
            self._serve_one()
        except OSError:  # the client left, or stopped reading its answer
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        return True  # the reading loop sent 100 Continue (or refused) before the body came

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve_one(self) -> None:
        self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if not self.raw_requestline:
            return
        if len(self.raw_requestline) > MAX_LINE:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():  # it answered the error and set close_connection
            return
        framing = framing_of(self.headers)
        if framing.refusal is not None:
            self._refuse(framing.refusal)
            return
        body = RequestBody(self.rfile, framing.length, chunked=framing.chunked)
        environ = self.get_environ()
        if framing.chunked:
            environ.pop("CONTENT_LENGTH", None)
        handler = _ResponseHandler(body, self.wfile, self.get_stderr(), environ, multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())
        # close() resets the status once a response went out whole; else it broke off.
        if handler.status is not None or body.broken:
            self.close_connection = True

    def _refuse(self, refusal: Refusal) -> None:
        self.close_connection = True
        self.wfile.write(error_response(refusal))


# -- the server: one reading loop, a pool of workers ----------------------------------------------


class BoundedWSGIServer(WSGIServer):
    """wsgiref's server with a reading loop and `max_threads` workers.

    Connections live in the loop while a request arrives (or while idle between requests)
    and go to a worker only once a request is whole; the worker hands a kept-alive
    connection back. Only the loop touches the connection table, so it needs no lock.
    """

    request_queue_size = LISTEN_BACKLOG
    max_threads = DEFAULT_THREADS
    read_timeout = DEFAULT_READ_TIMEOUT
    request_timeout = DEFAULT_REQUEST_TIMEOUT
    max_connections = DEFAULT_MAX_CONNECTIONS
    max_body_bytes = DEFAULT_MAX_BODY_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._jobs: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._returned: queue.SimpleQueue[tuple[_Connection, bool]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._workers: list[threading.Thread] = []
        self._held: dict[_Connection, None] = {}  # in the loop, in arrival order
        self._busy = 0  # with a worker
        self._selector = selectors.DefaultSelector()
        self._listening = False
        super().__init__(*args, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Read connections and dispatch whole requests until `shutdown()`."""
        self._stopped.clear()
        self._stopping.clear()
        self._start_workers()
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._listen(True)
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(min(poll_interval, _TICK)):
                    self._on_event(key.data)
                self._expire(time.monotonic())
        finally:
            self._listen(False)
            self._selector.unregister(self._wake_read)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it returned."""
        self._stopping.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close every connection, the listening socket and the workers."""
        self._stopping.set()
        for connection in list(self._held):
            self._close_now(connection)
        self._listen(False)
        super().server_close()
        for _ in self._workers:
            self._jobs.put(None)
        self._workers.clear()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished is routine; anything else is worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def _start_workers(self) -> None:
        while len(self._workers) < self.max_threads:
            worker = threading.Thread(target=self._work, name="infron-local-worker", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _wake(self) -> None:
        # Already closed, or its buffer is full: either way the loop is woken or gone.
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    # -- the loop --------------------------------------------------------------------------

    def _on_event(self, data: Any) -> None:
        if data is None:
            self._accept()
        elif data == "wake":
            self._take_back()
        else:
            self._on_readable(data)

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self.socket, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._selector.unregister(self.socket)
        self._listening = on

    def _accept(self) -> None:
        if len(self._held) + self._busy >= self.max_connections:
            if not self._held:
                self._listen(False)  # every connection is with a worker: let them queue
                return
            # The one that waited longest makes room: a newcomer is likelier a real client.
            self._close_now(min(self._held, key=_Connection.since))
        try:
            sock, address = self.socket.accept()
        except OSError:
            return  # the client gave up already, or the process is out of descriptors
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(sock, address, time.monotonic(), self.max_body_bytes)
        self._held[connection] = None
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def _on_readable(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_now(connection)
        elif connection.closing_at is None:
            connection.receive(data, time.monotonic())
            self._advance(connection)

    def _advance(self, connection: _Connection) -> None:
        try:
            ready = connection.advance()
        except Refusal as refusal:
            connection.refuse(refusal)
            self._close_softly(connection)
            return
        if ready:
            self._selector.unregister(connection.sock)
            del self._held[connection]
            self._busy += 1
            self._jobs.put(connection)

    def _take_back(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                connection, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            self._busy -= 1
            self._listen(True)
            connection.sock.setblocking(False)
            self._held[connection] = None
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
            if keep:
                connection.last_read = time.monotonic()
                self._advance(connection)  # a pipelined request may be whole already
            else:
                self._close_softly(connection)

    def _expire(self, now: float) -> None:
        for connection in list(self._held):
            if connection.closing_at is not None:
                if now >= connection.closing_at:
                    self._close_now(connection)
            elif connection.started is None:
                if now - connection.last_read >= self.read_timeout:
                    self._close_softly(connection)  # idle between requests: nothing to say
            elif (
                now - connection.last_read >= self.read_timeout
                or now - connection.started >= self.request_timeout
            ):
                connection.refuse(Refusal(408, "timeout", "The request took too long."))
                self._close_softly(connection)

    def _close_softly(self, connection: _Connection) -> None:
        """Close after the client read our last words: no more writes, input discarded."""
        connection.discard()
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(connection)
            return
        connection.closing_at = time.monotonic() + _LINGER

    def _close_now(self, connection: _Connection) -> None:
        connection.discard()
        if connection in self._held:
            del self._held[connection]
            self._selector.unregister(connection.sock)
        connection.sock.close()
        self._listen(not self._stopping.is_set())

    # -- the workers -----------------------------------------------------------------------

    def _work(self) -> None:
        while (connection := self._jobs.get()) is not None:
            keep = False
            try:
                handler = self.RequestHandlerClass(connection, connection.address, self)
                keep = not handler.close_connection
            except Exception:
                self.handle_error(connection.sock, connection.address)
            self._returned.put((connection, keep))
            self._wake()


class _BoundedWSGIServer6(BoundedWSGIServer):
    address_family = socket.AF_INET6


def build_server(
    app: Any,
    host: str,
    port: int,
    *,
    threads: int = DEFAULT_THREADS,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> BoundedWSGIServer:
    """A bound, listening server for the WSGI `app`; call ``serve_forever()`` on it."""
    if threads < 1 or max_connections < 1 or max_body_bytes < 1:
        raise ValueError("threads, max_connections and max_body_bytes must be >= 1")
    if read_timeout <= 0 or request_timeout <= 0:
        raise ValueError("read_timeout and request_timeout must be > 0")
    base = _BoundedWSGIServer6 if ":" in host else BoundedWSGIServer
    # A subclass carries the limits: __init__ binds and listens before it returns.
    limits = {
        "max_threads": threads,
        "read_timeout": read_timeout,
        "request_timeout": request_timeout,
        "max_connections": max_connections,
        "max_body_bytes": max_body_bytes,
    }
    server_class = type("InfronLocalServer", (base,), limits)
    server = server_class((host, port), KeepAliveHandler)
    server.set_app(app)
    return server
