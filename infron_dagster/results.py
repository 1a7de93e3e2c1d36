"""Parse batch result lines (OpenAI, Infron and Anthropic shapes) into per-request outcomes.

Pure data code. Lines are matched to requests on ``custom_id`` only, never on position.

Example::

    line = b'{"custom_id":"req-1","response":{"status_code":200,"body":{"choices":'
           b'[{"message":{"content":"hi"},"finish_reason":"stop"}]}},"error":null}'
    parse_line(line).text
    # -> 'hi'
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .columns import (
    BATCH_CANCELLED,
    BATCH_EXPIRED,
    EMPTY_RESPONSE,
    MISSING_RESPONSE,
    REFUSAL,
    RETRYABLE_CODES,
    TOO_LARGE,
    UNPARSEABLE,
)
from .untrusted import printable

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "Outcome",
    "ParseReport",
    "is_retryable",
    "parse_line",
    "read_outcomes",
]

# A result line longer than this fails its row instead of taking memory; the raw file is
# kept, so collecting again with a higher bound recovers the answer without paying.
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024


def is_retryable(code: str | None, http_status: int | None) -> bool:
    """Whether sending the same request again may succeed.

    Example:
        >>> is_retryable("batch_expired", None), is_retryable("invalid_request_error", 400)
        (True, False)
    """
    if http_status is not None and (http_status >= 500 or http_status in (408, 409, 429)):
        return True
    return (code or "") in RETRYABLE_CODES


@dataclass
class Outcome:
    """What happened to one request.

    Example:
        >>> Outcome("req-1", ok=False, error_code="batch_expired").retryable
        True
    """

    custom_id: str
    ok: bool
    text: str | None = None
    embedding: list[float] | None = None
    model: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    batch_id: str | None = None

    @property
    def retryable(self) -> bool:
        """Whether a retry may succeed (only meaningful when not ok)."""
        return not self.ok and is_retryable(self.error_code, self.http_status)


@dataclass
class ParseReport:
    """Counts of lines that could not be used, reported instead of crashing."""

    lines: int = 0
    unparseable: int = 0
    duplicates: int = 0
    unknown_ids: int = 0
    too_large: int = 0
    samples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        """Keep a few examples (printable, bounded) for the run's metadata."""
        if len(self.samples) < 5:
            self.samples.append(printable(what, 200))


class _Unusable(ValueError):
    """A line that is JSON with a custom_id but whose answer cannot be read."""


def parse_line(raw: bytes | str) -> Outcome:
    """One result line of any supported shape -> :class:`Outcome`.

    Raises ValueError only when the line has no usable ``custom_id`` (then no row can be
    blamed); any other problem with the line is that row's failure (``unparseable_result``).
    """
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("line is not a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or not _is_text(custom_id):
        raise ValueError("line has no custom_id")
    try:
        return _parse_object(custom_id, data)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        return _unparseable(custom_id, exc)


def read_outcomes(
    lines: IO[bytes] | Iterable[bytes],
    report: ParseReport,
    batch_id: str | None = None,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Outcome]:
    """Parse many lines; a bad line fails its own row (or is counted), never the file.

    Example:
        >>> report = ParseReport()
        >>> [o.error_code for o in read_outcomes([b'{"custom_id":"a","response":5}'], report)]
        ['unparseable_result']
    """
    for raw, whole in _bounded_lines(lines, max_line_bytes):
        if not raw.strip():
            continue
        report.lines += 1
        if not whole:
            outcome = too_large_outcome(raw, max_line_bytes, report)
        else:
            outcome = parse_counted(raw, report)
        if outcome is not None:
            outcome.batch_id = batch_id
            yield outcome


def parse_counted(raw: bytes, report: ParseReport) -> Outcome | None:
    try:
        outcome = parse_line(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        custom_id = _sniff_custom_id(raw)
        report.unparseable += 1
        report.note(f"unparseable line: {type(exc).__name__}: {exc}")
        return _unparseable(custom_id, exc) if custom_id else None
    if outcome.error_code == UNPARSEABLE:
        report.unparseable += 1
        report.note(f"unusable answer for {outcome.custom_id}: {outcome.error_message}")
    return outcome


def _bounded_lines(source: IO[bytes] | Iterable[bytes], limit: int) -> Iterator[tuple[bytes, bool]]:
    """(line, whole) pairs; a line over ``limit`` yields only its head, the rest is skipped.

    Reads fixed-size blocks (object-store files have no bounded ``readline``), so memory is
    set by ``limit``, never by the longest line a provider sends.
    """
    read = getattr(source, "read", None)
    if read is None:
        for line in source:  # type: ignore[union-attr]  # already in memory
            yield (line, True) if len(line) <= limit else (line[:4096], False)
        return
    pending = bytearray()
    head: bytes | None = None  # set while skipping the rest of an over-long line
    while block := read(1 << 20):
        start = 0
        while start <= len(block):
            end = block.find(b"\n", start)
            piece = block[start : end if end >= 0 else len(block)]
            if head is None:
                pending += piece
                if len(pending) > limit:
                    head = bytes(pending[:4096])
                    pending.clear()
            elif len(head) < 4096:  # the head is the line's first 4 KB, across reads too
                head += piece[: 4096 - len(head)]
            if end < 0:
                break
            if head is not None:
                yield head, False
                head = None
            else:
                yield bytes(pending), True
                pending.clear()
            start = end + 1
    if head is not None:
        yield head, False
    elif pending:
        yield bytes(pending), True


_CUSTOM_ID_RE = re.compile(rb'"custom_id"\s*:\s*"([A-Za-z0-9_.:\-]{1,200})"')


def _sniff_custom_id(raw: bytes) -> str | None:
    """The custom_id of a line that does not parse, when it can be seen plainly."""
    match = _CUSTOM_ID_RE.search(raw[:8192])
    return match.group(1).decode() if match else None


def too_large_outcome(head: bytes, limit: int, report: ParseReport) -> Outcome | None:
    report.too_large += 1
    custom_id = _sniff_custom_id(head)
    report.note(f"result line over {limit} bytes for {custom_id or 'an unknown request'}")
    if custom_id is None:
        return None
    message = (
        f"the result line is over max_result_line_bytes={limit}; the raw file is kept, "
        "so collecting again with a higher bound recovers it without paying"
    )
    return Outcome(custom_id, ok=False, error_code=TOO_LARGE, error_message=message)


def _unparseable(custom_id: str, exc: BaseException) -> Outcome:
    message = f"the result line could not be read: {type(exc).__name__}: {printable(exc, 300)}"
    return Outcome(custom_id, ok=False, error_code=UNPARSEABLE, error_message=message)


def iter_lines(fh: IO[bytes]) -> Iterator[bytes]:
    """Lines of a binary file, streamed."""
    yield from fh


def _parse_object(custom_id: str, data: dict[str, Any]) -> Outcome:
    if "result" in data and isinstance(data["result"], dict):
        return _anthropic(custom_id, data["result"])
    error = data.get("error")
    response = data.get("response")
    if isinstance(response, dict) and "status_code" not in response and "body" not in response:
        response = {"status_code": 200, "body": response}  # a bare body (Infron variants)
    if response is None and "body" in data:
        response = {"status_code": data.get("status_code", 200), "body": data["body"]}
    if error:
        status = response.get("status_code") if isinstance(response, dict) else None
        return _error(custom_id, error, status)
    if response is None:
        return Outcome(
            custom_id, ok=False, error_code=MISSING_RESPONSE, error_message="no response"
        )
    if not isinstance(response, dict):
        raise _Unusable(f"response is {type(response).__name__}, not an object")
    status = _status(response.get("status_code", 200))
    if status is None:
        raise _Unusable(f"status_code {printable(response.get('status_code'), 40)} is not HTTP")
    body = response.get("body")
    if isinstance(body, str):
        body = _maybe_json(body)
    if status >= 400 or (isinstance(body, dict) and body.get("error") and "choices" not in body):
        err = body.get("error") if isinstance(body, dict) else body
        return _error(custom_id, err or f"HTTP {status}", status)
    if body is None or body == {} or body == "":
        message = f"HTTP {status} with no body: there is no answer to keep"
        return Outcome(custom_id, ok=False, error_code=EMPTY_RESPONSE, error_message=message)
    if not isinstance(body, dict):
        raise _Unusable(f"body is {type(body).__name__}, not an object")
    return _success(custom_id, body)


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _status(value: Any) -> int | None:
    """An HTTP status from the wire (``200``, ``"200"``, ``200.0``), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 100 <= number <= 599 else None


def _error(custom_id: str, err: Any, status: Any) -> Outcome:
    if isinstance(err, dict):
        inner = err.get("error") if isinstance(err.get("error"), dict) else err
        code = inner.get("code") or inner.get("type") or "error"
        message = inner.get("message") or json.dumps(inner)[:300]
    else:
        code, message = "error", err
    return Outcome(
        custom_id,
        ok=False,
        error_code=printable(code, 100),
        error_message=printable(message, 2000),
        http_status=_status(status),
    )


def _anthropic(custom_id: str, result: dict[str, Any]) -> Outcome:
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message")
        if not isinstance(message, dict) or not message:
            raise _Unusable("a succeeded result without a message")
        return _success(custom_id, message)
    if kind == "errored":
        return _error(custom_id, result.get("error") or {}, None)
    code = {"canceled": BATCH_CANCELLED, "expired": BATCH_EXPIRED}.get(str(kind))
    if code is None:
        raise _Unusable(f"unknown result type {printable(kind, 40)!r}")
    return Outcome(custom_id, ok=False, error_code=code, error_message=f"request {kind}")


def _success(custom_id: str, body: dict[str, Any]) -> Outcome:
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    outcome = Outcome(
        custom_id,
        ok=True,
        model=_label(body.get("model")),
        prompt_tokens=_tokens(usage.get("prompt_tokens", usage.get("input_tokens"))),
        completion_tokens=_tokens(usage.get("completion_tokens", usage.get("output_tokens"))),
    )
    if "choices" in body:
        _chat(outcome, body["choices"])
    elif "data" in body:
        outcome.embedding = _embedding(body["data"])
    elif "output" in body:
        outcome.text = _responses_text(body["output"])
        outcome.finish_reason = _label(body.get("status"))
    elif "content" in body:  # Anthropic message
        outcome.text = _parts_text(body["content"]) or None
        outcome.finish_reason = _label(body.get("stop_reason"))
    else:
        raise _Unusable("the body has none of choices, data, output or content")
    return outcome


def _chat(outcome: Outcome, choices: Any) -> None:
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Unusable("choices is not a list of objects")
    choice = choices[0]
    message = choice.get("message")
    if message is not None and not isinstance(message, dict):
        raise _Unusable("choices[0].message is not an object")
    if message:
        outcome.text = _content(message.get("content"))
    else:
        outcome.text = _optional_text(choice.get("text"))
    outcome.finish_reason = _label(choice.get("finish_reason"))
    if outcome.text is None and message and message.get("refusal"):
        outcome.ok, outcome.error_code = False, REFUSAL
        outcome.error_message = printable(message["refusal"], 2000)


def _content(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return _optional_text(content)
    if isinstance(content, list):  # content parts
        return _parts_text(content)
    raise _Unusable(f"message content is {type(content).__name__}, not text")


def _parts_text(parts: Any) -> str:
    if not isinstance(parts, list):
        raise _Unusable("content is not a list of parts")
    texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("text") is not None]
    return "".join(_text(t) for t in texts)


def _embedding(items: Any) -> list[float]:
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise _Unusable("data is not a list of embedding objects")
    vector = items[0].get("embedding")
    if isinstance(vector, str):  # encoding_format="base64": little-endian float32
        raw = base64.b64decode(vector, validate=True)
        if len(raw) % 4:
            raise _Unusable("a base64 embedding whose length is not a multiple of 4")
        import array

        floats = array.array("f", raw)
        if sys.byteorder != "little":
            floats.byteswap()
        return [float(x) for x in floats]
    if not isinstance(vector, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector
    ):
        raise _Unusable("embedding is not a list of numbers")
    return [float(x) for x in vector]


def _responses_text(output: Any) -> str | None:
    if not isinstance(output, list):
        raise _Unusable("output is not a list")
    texts = []
    for item in output:
        parts = item.get("content") if isinstance(item, dict) else None
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and part.get("type") in ("output_text", "text"):
                texts.append(_text(part.get("text", "")))
    return "".join(texts) if texts else None


def _tokens(value: Any) -> int | None:
    """A token count, or None when the provider sent something else (the answer is kept)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 0 <= value < 2**53 else None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Unusable(f"expected text, got {type(value).__name__}")
    if not _is_text(value):
        raise _Unusable("text holds an unpaired surrogate (not valid Unicode)")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _label(value: Any) -> str | None:
    """A descriptive field (model, finish reason): kept when it is sane text, else dropped,
    never a reason to fail a paid-for answer."""
    return printable(value, 200) if isinstance(value, str) and _is_text(value) else None
