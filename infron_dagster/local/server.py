"""The socket server behind ``infron-local serve``: wsgiref, made fit for hostile clients.

What plain ``wsgiref.simple_server`` lacks and this adds:

- **HTTP/1.1 keep-alive**: a client reuses its connection instead of paying a TCP handshake
  (and a TIME_WAIT socket) per request. A response is delimited by its Content-Length; a
  request body the app left unread is drained (up to 1 MiB) or the connection is closed, so
  leftover bytes are never taken for the next request.
- **chunked request bodies** are decoded; a request with neither Content-Length nor
  Transfer-Encoding has an empty body (RFC 9112), so the app never waits for bytes that
  will not come.
- **a real listen backlog** (128, not 5), so a burst of clients queues instead of being
  dropped.
- **bounded threads**: at most ``threads`` connections are served at once; the next ones
  wait in the backlog until a thread is free, so a flood cannot exhaust the process. An
  idle kept-alive connection holds its thread, so once every thread is taken a finished
  answer closes its connection instead of keeping it: queued clients always get a turn.
- **read timeouts** (``read_timeout`` seconds on every socket read, the wait for the next
  request on a kept-alive connection included), so a slow or silent client cannot hold a
  thread forever.

Example:
    >>> from infron_dagster.local import create_app
    >>> import tempfile
    >>> server = build_server(create_app(tempfile.mkdtemp()), "127.0.0.1", 0, threads=4)
    >>> server.request_queue_size
    128
    >>> server.server_close()
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any, BinaryIO
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

__all__ = [
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_THREADS",
    "LISTEN_BACKLOG",
    "BoundedWSGIServer",
    "KeepAliveHandler",
    "build_server",
]

DEFAULT_THREADS = 64
DEFAULT_READ_TIMEOUT = 30.0
LISTEN_BACKLOG = 128
_DRAIN_LIMIT = 1 << 20
_MAX_LINE = 65536
_MAX_TRAILERS = 100


class BadBody(ValueError):
    """The request body is not valid chunked transfer coding."""


class RequestBody:
    """``wsgi.input`` for one request: Content-Length bytes, or a decoded chunked body.

    It never reads past the body, so the next request on the connection stays intact; any
    read error marks it broken (the connection is then closed, its state being unknown).
    """

    def __init__(self, rfile: BinaryIO, length: int | None, chunked: bool = False) -> None:
        self._rfile = rfile
        self._left = 0 if length is None else length  # bytes left in the body or chunk
        self._chunked = chunked
        self._eof = not chunked and self._left == 0
        self.broken = False

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the body (all of it when negative); b"" at its end."""
        out = bytearray()
        while (size < 0 or len(out) < size) and not self._eof:
            want = self._left if size < 0 else min(self._left, size - len(out))
            out += self._guarded(lambda want=want: self._read_some(want))
        return bytes(out)

    def readline(self, size: int = -1) -> bytes:
        """One line of the body (WSGI requires it; the app reads by size)."""
        out = bytearray()
        while (size < 0 or len(out) < size) and not out.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            out += byte
        return bytes(out)

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def finish(self) -> bool:
        """Drain what the app left unread, up to a limit; whether the body is now consumed."""
        if self.broken or (not self._chunked and self._left > _DRAIN_LIMIT):
            return False  # not worth the wait: closing the connection is cheaper
        drained = 0
        try:
            while not self._eof and drained <= _DRAIN_LIMIT:
                drained += len(self.read(min(1 << 16, _DRAIN_LIMIT + 1 - drained)))
        except Exception:
            return False
        return self._eof

    def _guarded(self, read: Callable[[], bytes]) -> bytes:
        try:
            return read()
        except Exception:
            self.broken = True
            raise

    def _read_some(self, want: int) -> bytes:
        if self._chunked and self._left == 0:
            self._next_chunk()
            if self._eof:
                return b""
        data = self._rfile.read(min(want, self._left)) if want else b""
        if want and not data:
            raise ConnectionError("the client closed the connection mid-body")
        self._left -= len(data)
        if self._left == 0:
            if self._chunked:
                self._expect_crlf()
            else:
                self._eof = True
        return data

    def _next_chunk(self) -> None:
        line = self._rfile.readline(_MAX_LINE + 1)
        size_text = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not size_text or len(size_text) > 16:
            raise BadBody("malformed chunk size line")
        if any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise BadBody("malformed chunk size line")
        self._left = int(size_text, 16)
        if self._left == 0:
            self._skip_trailers()
            self._eof = True

    def _expect_crlf(self) -> None:
        if self._rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BadBody("a chunk does not end with CRLF")

    def _skip_trailers(self) -> None:
        for _ in range(_MAX_TRAILERS):
            line = self._rfile.readline(_MAX_LINE + 1)
            if not line.endswith(b"\n"):
                raise BadBody("malformed chunked trailer")
            if line in (b"\r\n", b"\n"):
                return
        raise BadBody("too many chunked trailer lines")


class _ResponseHandler(ServerHandler):
    """wsgiref's per-request handler, answering HTTP/1.1 and deciding on keep-alive."""

    http_version = "1.1"

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        owner = self.request_handler
        # Without a length the body ends only with the connection; an unread request body
        # must go before the next request can be read.
        if "Content-Length" not in self.headers or not self.stdin.finish():
            owner.close_connection = True
        # Kept alive, an idle connection would hold the last thread while others queue.
        at_capacity = getattr(owner.server, "at_capacity", None)
        if at_capacity is not None and at_capacity():
            owner.close_connection = True
        if owner.close_connection:
            self.headers["Connection"] = "close"

    def handle_error(self) -> None:
        self.request_handler.close_connection = True
        super().handle_error()


class KeepAliveHandler(WSGIRequestHandler):
    """Serves requests on one connection until the client closes, errs or stays silent.

    Logs nothing: request lines are noise, and headers (Authorization) must never leak.
    """

    protocol_version = "HTTP/1.1"
    # The status line and headers go out in separate small writes; Nagle would hold
    # each kept-alive answer for a delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.timeout = getattr(self.server, "read_timeout", DEFAULT_READ_TIMEOUT)
        super().setup()

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        try:
            self._serve_one()
        except OSError:  # timed out (TimeoutError), or the client left
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve_one(self) -> None:
        self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > _MAX_LINE:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():  # it answered the error and set close_connection
            return
        body = self._body()
        if body is None:
            return
        environ = self.get_environ()
        if body._chunked:
            environ.pop("CONTENT_LENGTH", None)
        handler = _ResponseHandler(body, self.wfile, self.get_stderr(), environ, multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())
        # close() resets the status once a response went out whole; else it broke off.
        if handler.status is not None or body.broken:
            self.close_connection = True

    def _body(self) -> RequestBody | None:
        codings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if codings and lengths:
            # Both framings at once is the classic request-smuggling shape: refuse it.
            self._refuse(400, "bad_framing", "Send Content-Length or Transfer-Encoding, not both.")
            return None
        if codings:
            if ",".join(codings).strip().lower() != "chunked":
                self._refuse(501, "unsupported_transfer_encoding", "Only chunked is supported.")
                return None
            return RequestBody(self.rfile, None, chunked=True)
        if not lengths:
            return RequestBody(self.rfile, None)
        text = lengths[0].strip()
        if len(set(lengths)) > 1 or not text.isdigit() or not text.isascii():
            self._refuse(400, "bad_content_length", "Content-Length must be one integer.")
            return None
        return RequestBody(self.rfile, int(text))

    def _refuse(self, status: int, code: str, message: str) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        payload = json.dumps({"error": error}).encode()
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


class BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server with a thread per connection, at most `max_threads` at once.

    A connection is accepted only once a thread is free; until then it waits in the
    kernel's listen backlog (`request_queue_size`), where a client sees a slow connect,
    never a reset.
    """

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    max_threads = DEFAULT_THREADS
    read_timeout = DEFAULT_READ_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_threads)
        self._open = 0
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()
        super().__init__(*args, **kwargs)

    def at_capacity(self) -> bool:
        """Whether every thread holds a connection (so the next client has to wait)."""
        with self._open_lock:
            return self._open >= self.max_threads

    def get_request(self) -> tuple[socket.socket, Any]:
        while not self._slots.acquire(timeout=0.2):
            if self._stopping.is_set():
                raise OSError("the server is shutting down")
        try:
            accepted = super().get_request()
        except BaseException:
            self._slots.release()
            raise
        with self._open_lock:
            self._open += 1
        return accepted

    def shutdown_request(self, request: Any) -> None:
        # Called exactly once per accepted connection, whichever way it ends.
        try:
            super().shutdown_request(request)
        finally:
            with self._open_lock:
                self._open -= 1
            self._slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished is routine; anything else is worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _BoundedWSGIServer6(BoundedWSGIServer):
    address_family = socket.AF_INET6


def build_server(
    app: Any,
    host: str,
    port: int,
    *,
    threads: int = DEFAULT_THREADS,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> BoundedWSGIServer:
    """A bound, listening server for the WSGI `app`; call ``serve_forever()`` on it."""
    if threads < 1 or read_timeout <= 0:
        raise ValueError("threads must be >= 1 and read_timeout > 0")
    base = _BoundedWSGIServer6 if ":" in host else BoundedWSGIServer
    # A subclass carries the limits: __init__ binds and listens before it returns.
    limits = {"max_threads": threads, "read_timeout": read_timeout}
    server_class = type("InfronLocalServer", (base,), limits)
    server = server_class((host, port), KeepAliveHandler)
    server.set_app(app)
    return server
