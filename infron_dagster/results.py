"""Parse batch result lines (OpenAI, Infron and Anthropic shapes) into per-request outcomes.

Pure data code. Lines are matched to requests on ``custom_id`` only, never on position.

Example:
    >>> line = b'{"custom_id":"req-1","response":{"status_code":200,"body":{"choices":'
    ...        b'[{"message":{"content":"hi"},"finish_reason":"stop"}]}},"error":null}'
    >>> parse_line(line).text
    'hi'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["Outcome", "ParseReport", "is_retryable", "parse_line", "read_outcomes"]

_RETRYABLE_CODES = frozenset(
    {
        "batch_expired",
        "batch_cancelled",
        "batch_failed",
        "missing_result",
        "server_error",
        "rate_limit_exceeded",
        "timeout",
        "overloaded_error",
        "api_error",
        "invalid_structured_output",
        "expired",
        "canceled",
    }
)


def is_retryable(code: str | None, http_status: int | None) -> bool:
    """Whether sending the same request again may succeed.

    Example:
        >>> is_retryable("batch_expired", None), is_retryable("invalid_request_error", 400)
        (True, False)
    """
    if http_status is not None and (http_status >= 500 or http_status in (408, 409, 429)):
        return True
    return (code or "") in _RETRYABLE_CODES


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
    samples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(what[:200])


def parse_line(raw: bytes | str) -> Outcome:
    """One result line of any supported shape -> :class:`Outcome`. Raises ValueError."""
    data = json.loads(raw)
    if not isinstance(data, dict) or not data.get("custom_id"):
        raise ValueError("line has no custom_id")
    custom_id = str(data["custom_id"])
    if "result" in data and isinstance(data["result"], dict):
        return _anthropic(custom_id, data["result"])
    error = data.get("error")
    response = data.get("response")
    if isinstance(response, dict) and "status_code" not in response and "body" not in response:
        response = {"status_code": 200, "body": response}  # a bare body (Infron variants)
    if response is None and "body" in data:
        response = {"status_code": data.get("status_code", 200), "body": data["body"]}
    if error:
        return _error(custom_id, error, (response or {}).get("status_code"))
    if not isinstance(response, dict):
        return Outcome(
            custom_id, ok=False, error_code="missing_response", error_message=str(data)[:300]
        )
    status = int(response.get("status_code") or 200)
    body = response.get("body")
    if isinstance(body, str):
        body = _maybe_json(body)
    if status >= 400 or (isinstance(body, dict) and "error" in body and "choices" not in body):
        err = body.get("error") if isinstance(body, dict) else body
        return _error(custom_id, err or f"HTTP {status}", status)
    return _success(custom_id, body if isinstance(body, dict) else {})


def read_outcomes(
    lines: Iterable[bytes], report: ParseReport, batch_id: str | None = None
) -> Iterator[Outcome]:
    """Parse many lines, counting (not raising on) the ones that are not usable."""
    for raw in lines:
        if not raw.strip():
            continue
        report.lines += 1
        try:
            outcome = parse_line(raw)
        except (ValueError, TypeError, KeyError) as exc:
            report.unparseable += 1
            report.note(f"unparseable line: {exc}")
            continue
        outcome.batch_id = batch_id
        yield outcome


def iter_lines(fh: IO[bytes]) -> Iterator[bytes]:
    """Lines of a binary file, streamed."""
    yield from fh


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error(custom_id: str, err: Any, status: Any) -> Outcome:
    if isinstance(err, dict):
        inner = err.get("error") if isinstance(err.get("error"), dict) else err
        code = inner.get("code") or inner.get("type") or "error"
        message = inner.get("message") or json.dumps(inner)[:300]
    else:
        code, message = "error", str(err)
    http = int(status) if isinstance(status, (int, str)) and str(status).isdigit() else None
    return Outcome(
        custom_id, ok=False, error_code=str(code), error_message=str(message), http_status=http
    )


def _anthropic(custom_id: str, result: dict[str, Any]) -> Outcome:
    kind = result.get("type")
    if kind == "succeeded":
        return _success(custom_id, result.get("message") or {})
    if kind == "errored":
        return _error(custom_id, result.get("error") or {}, None)
    code = {"canceled": "batch_cancelled", "expired": "batch_expired"}.get(str(kind), str(kind))
    return Outcome(custom_id, ok=False, error_code=code, error_message=f"request {kind}")


def _success(custom_id: str, body: dict[str, Any]) -> Outcome:
    usage = body.get("usage") or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    outcome = Outcome(
        custom_id,
        ok=True,
        model=body.get("model"),
        prompt_tokens=prompt,
        completion_tokens=completion,
    )
    if "choices" in body:
        choice = (body.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        outcome.text = message.get("content") if message else choice.get("text")
        outcome.finish_reason = choice.get("finish_reason")
        if outcome.text is None and message.get("refusal"):
            outcome.ok, outcome.error_code = False, "refusal"
            outcome.error_message = str(message["refusal"])
    elif "data" in body:
        items = body.get("data") or [{}]
        outcome.embedding = items[0].get("embedding")
    elif "output" in body:
        outcome.text = _responses_text(body["output"])
        outcome.finish_reason = body.get("status")
    elif "content" in body:  # Anthropic message
        parts = body.get("content") or []
        outcome.text = "".join(p.get("text", "") for p in parts if isinstance(p, dict)) or None
        outcome.finish_reason = body.get("stop_reason")
    return outcome


def _responses_text(output: Any) -> str | None:
    texts = []
    for item in output or []:
        for part in item.get("content") or []:
            if part.get("type") in ("output_text", "text"):
                texts.append(part.get("text", ""))
    return "".join(texts) if texts else None
