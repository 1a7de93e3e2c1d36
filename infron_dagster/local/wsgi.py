"""The request and the response as the local app's handlers see them, over WSGI.

:class:`Request` is the parts of a WSGI environ a handler reads (path parameters, query,
base URL, a body bounded by Content-Length and by the server's cap: :class:`BodyInput`);
:class:`Response` is what it returns (status, headers, an iterable body), usually built by
:func:`json_response`. No routing and no state here: that is :mod:`infron_dagster.local.app`.

Example:
    >>> request = Request({"QUERY_STRING": "limit=5&after=b1", "HTTP_HOST": "h:1"}, "GET", "/x")
    >>> request.query, request.base_url
    ({'limit': '5', 'after': 'b1'}, 'http://h:1')
    >>> json_response({"ok": True}).headers
    [('Content-Type', 'application/json'), ('Content-Length', '12')]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from .errors import ApiError

__all__ = ["BodyInput", "Request", "Response", "StartResponse", "json_response", "too_large"]

CHUNK = 1 << 20

StartResponse = Callable[..., Any]


@dataclass
class Request:
    """The parts of a WSGI environ the handlers use."""

    environ: dict[str, Any]
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, last value wins."""
        parsed = parse_qs(self.environ.get("QUERY_STRING", ""))
        return {key: values[-1] for key, values in parsed.items()}

    @property
    def base_url(self) -> str:
        """Scheme and host the client used, for absolute URLs in answers."""
        env = self.environ
        host = env.get("HTTP_HOST") or f"{env.get('SERVER_NAME')}:{env.get('SERVER_PORT')}"
        return f"{env.get('wsgi.url_scheme', 'http')}://{host}{env.get('SCRIPT_NAME', '')}"

    def content_length(self) -> int | None:
        """The declared body length, or None when absent; a malformed one is a 400."""
        raw = (self.environ.get("CONTENT_LENGTH") or "").strip()
        if not raw:
            return None
        if not raw.isdigit() or not raw.isascii():
            raise ApiError(400, "Content-Length must be a non-negative integer.")
        return int(raw)

    def body_stream(self, cap: int) -> BodyInput:
        """The body as a stream that ends after Content-Length bytes and refuses over `cap`.

        A declared length over the cap is refused before a byte is read, so a client cannot
        make the server spool (or allocate) what it will refuse anyway.
        """
        length = self.content_length()
        if length is not None and length > cap:
            raise too_large(cap)
        return BodyInput(self.environ["wsgi.input"], length, cap)


class BodyInput:
    """``wsgi.input`` bounded by Content-Length and by the body cap.

    Reading past Content-Length is undefined in WSGI (on a kept-alive socket it would read
    the next request), so the stream ends there; without a length it reads to the end,
    which the WSGI transport and infron-local's own socket handler both provide.
    """

    def __init__(self, stream: Any, length: int | None, cap: int) -> None:
        self._stream = stream
        self._left = length
        self._cap = cap
        self.received = 0

    def read(self, size: int = CHUNK) -> bytes:
        """Up to `size` bytes; b"" at the end of the body."""
        if self._left is not None:
            size = min(size, self._left)
        if size <= 0:
            return b""
        try:
            data = self._stream.read(size)
        except TimeoutError:
            raise ApiError(408, "Timed out reading the request body.", code="timeout") from None
        except (OSError, ValueError) as exc:
            raise ApiError(400, f"The request body could not be read: {exc}") from None
        self.received += len(data)
        if self._left is not None:
            self._left -= len(data)
        if self.received > self._cap:
            raise too_large(self._cap)
        return data

    @property
    def short(self) -> bool:
        """Whether the body ended before its declared length."""
        return bool(self._left)


def too_large(cap: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this server accepts ({cap} bytes; "
        "infron-local serve --max-body-bytes raises it).",
        code="body_too_large",
    )


@dataclass
class Response:
    """Status, headers and an iterable body."""

    status: int
    body: Iterable[bytes]
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(
    obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A JSON answer."""
    data = json.dumps(obj).encode("utf-8")
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    return Response(status, [data], head + list(headers or []))
