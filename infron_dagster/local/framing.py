r"""HTTP/1.1 request framing for the local server, sans sockets and threads.

Where a request's body ends (:func:`framing_of`: Content-Length, chunked, or a refusal for
both at once), a scanner that finds the end of a chunked body as its bytes arrive
(:class:`ChunkedScanner`), the decoded ``wsgi.input`` a worker reads (:class:`RequestBody`),
and the error answers the reading loop sends itself (:class:`Refusal`). The reading loop and
the handler in :mod:`infron_dagster.local.server` both use it, so they never disagree on
where a request ends.

Example:
    >>> scanner = ChunkedScanner()
    >>> scanner.feed(b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1")
    13
    >>> scanner.done, scanner.data_bytes
    (True, 3)
    >>> import io
    >>> RequestBody(io.BytesIO(b"3\r\nabc\r\n0\r\n\r\n"), None, chunked=True).read()
    b'abc'
"""

from __future__ import annotations

import http.client
import io
import json
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Any, BinaryIO

__all__ = [
    "MAX_HEAD",
    "MAX_LINE",
    "BadBody",
    "ChunkedScanner",
    "Framing",
    "Refusal",
    "RequestBody",
    "error_response",
    "framing_of",
    "parse_head",
    "too_large",
]

MAX_LINE = 65536
MAX_HEAD = 2 * MAX_LINE
MAX_TRAILERS = 100


class BadBody(ValueError):
    """The request body is not valid chunked transfer coding."""


class Refusal(Exception):
    """A request the reading loop answers itself with an error, then closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- framing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How a request's body is delimited, or the refusal its headers earn."""

    length: int = 0
    chunked: bool = False
    refusal: Refusal | None = None


def framing_of(headers: Message) -> Framing:
    """The body framing the headers declare; both the reading loop and the handler use it,
    so they can never disagree on where a request ends."""
    codings = headers.get_all("Transfer-Encoding") or []
    lengths = headers.get_all("Content-Length") or []
    if codings and lengths:
        # Both framings at once is the classic request-smuggling shape: refuse it.
        message = "Send Content-Length or Transfer-Encoding, not both."
        return Framing(refusal=Refusal(400, "bad_framing", message))
    if codings:
        if ",".join(codings).strip().lower() != "chunked":
            message = "Only chunked is supported."
            return Framing(refusal=Refusal(501, "unsupported_transfer_encoding", message))
        return Framing(chunked=True)
    if not lengths:
        return Framing()
    text = lengths[0].strip()
    if len(set(lengths)) > 1 or not text.isdigit() or not text.isascii():
        message = "Content-Length must be one integer."
        return Framing(refusal=Refusal(400, "bad_content_length", message))
    return Framing(length=int(text))


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    if not line.endswith(b"\n") or not size_text or len(size_text) > 16:
        raise BadBody("malformed chunk size line")
    if any(c not in b"0123456789abcdefABCDEF" for c in size_text):
        raise BadBody("malformed chunk size line")
    return int(size_text, 16)


class ChunkedScanner:
    """Finds where a chunked body ends as its bytes arrive, without decoding it.

    It follows the same grammar as `RequestBody` (which decodes the spooled body later),
    line by line, so it needs no more memory than one line.
    """

    def __init__(self) -> None:
        self._line = bytearray()
        self._left = 0  # data bytes left in the current chunk
        self._after_data = False  # the CRLF closing a chunk's data is next
        self._trailers = -1  # trailer lines read once past the last chunk
        self.data_bytes = 0
        self.done = False

    def feed(self, data: bytes | bytearray) -> int:
        """How many bytes of `data` belong to the body (all of them until it ends)."""
        at = 0
        while at < len(data) and not self.done:
            if self._left:
                taken = min(self._left, len(data) - at)
                self._left -= taken
                at += taken
                continue
            newline = data.find(b"\n", at)
            stop = len(data) if newline == -1 else newline + 1
            self._line += data[at:stop]
            at = stop
            if len(self._line) > MAX_LINE:
                raise BadBody("a chunked body line is too long")
            if newline != -1:
                self._end_line(bytes(self._line))
                self._line.clear()
        return at

    def _end_line(self, line: bytes) -> None:
        blank = line in (b"\r\n", b"\n")
        if self._trailers >= 0:
            self._trailers += 1
            self.done = blank
            if not blank and self._trailers >= MAX_TRAILERS:
                raise BadBody("too many chunked trailer lines")
        elif self._after_data:
            if not blank:
                raise BadBody("a chunk does not end with CRLF")
            self._after_data = False
        else:
            size = _chunk_size(line)
            self._left, self._after_data = size, size > 0
            self.data_bytes += size
            if size == 0:
                self._trailers = 0


class RequestBody:
    """``wsgi.input`` for one request: Content-Length bytes, or a decoded chunked body.

    It reads the spooled request, never past the body; a read error marks it broken.
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
        try:
            while (size < 0 or len(out) < size) and not self._eof:
                out += self._read_some(self._left if size < 0 else min(self._left, size - len(out)))
        except Exception:
            self.broken = True
            raise
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

    def _read_some(self, want: int) -> bytes:
        if self._chunked and self._left == 0:
            self._next_chunk()
            if self._eof:
                return b""
        data = self._rfile.read(min(want, self._left)) if want else b""
        if want and not data:
            raise ConnectionError("the request ended mid-body")
        self._left -= len(data)
        if self._left == 0:
            if self._chunked:
                self._expect_crlf()
            else:
                self._eof = True
        return data

    def _next_chunk(self) -> None:
        self._left = _chunk_size(self._rfile.readline(MAX_LINE + 1))
        if self._left == 0:
            self._skip_trailers()
            self._eof = True

    def _expect_crlf(self) -> None:
        if self._rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BadBody("a chunk does not end with CRLF")

    def _skip_trailers(self) -> None:
        for _ in range(MAX_TRAILERS):
            line = self._rfile.readline(MAX_LINE + 1)
            if not line.endswith(b"\n"):
                raise BadBody("malformed chunked trailer")
            if line in (b"\r\n", b"\n"):
                return
        raise BadBody("too many chunked trailer lines")


def error_payload(status: int, code: str, message: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def error_response(refusal: Refusal) -> bytes:
    payload = error_payload(refusal.status, refusal.code, refusal.message)
    head = (
        f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + payload


def too_large(cap: int) -> Refusal:
    return Refusal(
        413,
        "body_too_large",
        f"The request body is larger than this server accepts ({cap} bytes; "
        "infron-local serve --max-body-bytes raises it).",
    )


def parse_head(head: bytes) -> tuple[Framing, bool]:
    """The framing a request head declares, and whether it waits for ``100 Continue``."""
    request_line, _, rest = head.partition(b"\n")
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except (http.client.HTTPException, ValueError):
        # The handler fails on the same headers, answers and closes: no body to wait for.
        return Framing(), False
    expect = (headers.get("Expect") or "").strip().lower() == "100-continue"
    return framing_of(headers), expect and request_line.rstrip().endswith(b"HTTP/1.1")
