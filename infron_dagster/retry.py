"""One logical HTTP call to a batch API: retries with backoff, and typed errors.

:func:`send` retries 408/409/429/5xx answers and connection errors within a
:class:`RetryPolicy`, never repeats a call that may have acted when it is not idempotent
(the error then says ``ambiguous=True``), and maps every failure to an
:class:`~infron_dagster.errors.InfronError` whose text has been redacted by the caller's
``redact`` before it was cut. :func:`json_object` reads a 2xx answer as a JSON object.
:class:`~infron_dagster.client.InfronClient` is the one caller.

Example::

    response = send(http, "retrieve batch b1", "GET", "/batches/b1",
                    policy=RetryPolicy(), sleep=time.sleep, redact=str)
    json_object(response, "retrieve batch b1", redact=str)
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import httpx

from .errors import InfronConnectionError, InfronError, InfronProtocolError, error_for_status
from .untrusted import printable

__all__ = ["RetryPolicy", "json_object", "send"]

logger = logging.getLogger("infron_dagster.client")  # the client's logger, as before

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# Server messages are cut here before redaction, then to 500 characters after it.
MESSAGE_CAP = 20_000


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the client retries 408/409/429/5xx answers and connection errors.

    Waits grow exponentially from ``initial_delay`` (with full jitter) up to ``max_delay``;
    a ``Retry-After`` or ``retry-after-ms`` header from the server wins. No retry starts once
    ``budget_seconds`` have passed since the first try.

    Example:
        >>> RetryPolicy(max_retries=2, initial_delay=0.1).delay(1, None)  # doctest: +SKIP
        0.13
    """

    max_retries: int = 6
    initial_delay: float = 0.5
    max_delay: float = 30.0
    budget_seconds: float = 180.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        hinted = _retry_after(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_delay)
        ceiling = min(self.max_delay, self.initial_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _retry_after(response: httpx.Response) -> float | None:
    millis = response.headers.get("retry-after-ms")
    seconds = response.headers.get("retry-after")
    try:
        if millis is not None:
            return max(0.0, float(millis) / 1000)
        if seconds is not None:
            return max(0.0, float(seconds))
    except ValueError:
        return None  # an HTTP-date; fall back to our own backoff
    return None


def send(
    http: httpx.Client,
    operation: str,
    method: str,
    url: str,
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    redact: Callable[[str], str],
    stream: bool = False,
    content: Callable[[], Iterator[bytes] | IO[bytes]] | None = None,
    files: Callable[[], dict[str, Any]] | None = None,
    idempotent: bool = True,
    **kwargs: Any,
) -> httpx.Response:
    """One logical call: retries retryable answers within the policy's budget.

    ``content`` and ``files`` are factories, called again for every try (a body is consumed
    by sending it). Every message is passed through ``redact`` before it is cut or raised.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        request_kwargs = dict(kwargs)
        if content is not None:
            request_kwargs["content"] = content()
        if files is not None:
            request_kwargs["files"] = files()
        try:
            request = http.build_request(method, url, **request_kwargs)
        except (httpx.InvalidURL, UnicodeEncodeError) as exc:
            message = redact(f"cannot build the request: {exc}")
            raise InfronProtocolError(operation, message) from None
        response = None
        error: InfronError
        try:
            # A redirect may repeat a paid POST elsewhere: a create follows none.
            response = http.send(request, stream=True, follow_redirects=idempotent)
            if response.status_code >= 400 or not stream:
                response.read()  # inside the try: a body cut off is a transport error
        except httpx.TooManyRedirects as exc:
            error = InfronProtocolError(operation, redact(str(exc)))
            error.ambiguous = not idempotent
            raise error from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            if response is not None:
                response.close()
            error = InfronConnectionError(operation, redact(str(exc)))
            # Only a failed connect proves the server never saw the request.
            error.ambiguous = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
        else:
            if response.status_code < 400:
                return response
            error = _error(operation, response, redact)
            error.ambiguous = response.status_code >= 500 or response.status_code in (408, 409)
        finally:
            _close_files(request_kwargs.get("files"))
        if not _should_retry(policy, error, attempt, started) or (
            error.ambiguous and not idempotent
        ):
            raise error
        wait = policy.delay(attempt, response)
        logger.info("%s: %s; retry %d in %.2fs", operation, error, attempt, wait)
        sleep(wait)


def json_object(
    response: httpx.Response,
    operation: str,
    *,
    redact: Callable[[str], str],
    idempotent: bool = True,
) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or a protocol error (ambiguous after a create: a 2xx
    to it means it may well have happened)."""
    try:
        data = response.json()
    except (ValueError, RecursionError):
        shown = printable(redact(response.text[:MESSAGE_CAP]), 200)
        error = InfronProtocolError(operation, f"expected JSON, got {shown!r}")
        error.ambiguous = not idempotent
        raise error from None
    if not isinstance(data, dict):
        error = InfronProtocolError(operation, "expected a JSON object")
        error.ambiguous = not idempotent
        raise error
    return data


def _should_retry(policy: RetryPolicy, error: InfronError, attempt: int, started: float) -> bool:
    if isinstance(error, InfronConnectionError):
        retryable = True
    else:
        retryable = error.status_code in RETRY_STATUSES
    within_budget = time.monotonic() - started < policy.budget_seconds
    return retryable and attempt <= policy.max_retries and within_budget


def _error(operation: str, response: httpx.Response, redact: Callable[[str], str]) -> InfronError:
    message, code = _server_message(response)
    # Redact before cutting: a key across the cut would otherwise leave its head behind.
    text = printable(redact(message), 500)
    shown_code = printable(redact(code), 100) if code else None
    return error_for_status(operation, response.status_code, text, shown_code)


def _server_message(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return (response.text or response.reason_phrase or "no message")[:MESSAGE_CAP], None
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message") or err.get("detail") or json.dumps(err)
        code = str(err["code"])[:MESSAGE_CAP] if err.get("code") else None
        return str(message)[:MESSAGE_CAP], code
    return str(err)[:MESSAGE_CAP], None


def _close_files(files: Any) -> None:
    if isinstance(files, dict):
        for value in files.values():
            handle = value[1] if isinstance(value, tuple) else value
            if hasattr(handle, "close"):
                handle.close()
