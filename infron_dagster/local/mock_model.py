"""A deterministic fake model: the same request always gets the same answer.

It answers chat completions (plain text, JSON object, or JSON valid against a JSON schema),
embeddings (stable unit vectors), the Responses API and legacy completions.

A body it cannot answer (a field of the wrong type, a JSON schema it cannot honour, an ask
over a cap) raises :class:`MockRequestError`, which the batch reports as that one request's
400 ``invalid_request`` line; nothing a client sends may fail the batch as a whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .schema_values import Dice, SchemaError, value_for_schema

__all__ = [
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "DEFAULT_MODEL",
    "MAX_EMBEDDING_DIMENSIONS",
    "MAX_EMBEDDING_INPUTS",
    "Dice",
    "MockRequestError",
    "embedding_vector",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "prompt_text",
    "respond",
    "value_for_schema",
]

DEFAULT_MODEL = "mock-model"
DEFAULT_EMBEDDING_DIMENSIONS = 8
# OpenAI's own limits: text-embedding-3-large has 3072 dimensions, a request 2048 inputs.
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_EMBEDDING_INPUTS = 2048


class MockRequestError(ValueError):
    """The request body is unusable; the batch reports it as a 400 for that request."""


def estimate_tokens(text: str) -> int:
    """The mock tokenizer: about four characters a token.

    Example:
        >>> estimate_tokens("12345678")
        3
    """
    return len(text) // 4 + 1


def prompt_text(body: dict[str, Any]) -> str:
    """All the prompt text of a request body, whatever its endpoint; never raises.

    It also runs on bodies not validated yet (token estimates at create time), so it skips
    whatever has an unexpected type instead of failing on it.

    Example:
        >>> prompt_text({"messages": [{"role": "user", "content": "hi"}]})
        'hi'
    """
    parts: list[str] = []
    for key in ("system", "instructions"):
        if isinstance(body.get(key), str):
            parts.append(body[key])
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            parts.append(_content_text(message.get("content")))
    for key in ("input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(_input_item_text(item) for item in value)
    return "\n".join(p for p in parts if p)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens the mock model will bill for `body`."""
    return estimate_tokens(prompt_text(body))


def respond(url: str, body: dict[str, Any], custom_id: str, created: int = 0) -> dict[str, Any]:
    """The response body the mock model returns for one batch request.

    Raises MockRequestError when the body cannot be answered (e.g. chat without messages).

    Example:
        >>> r = respond("/v1/chat/completions",
        ...             {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}, "a")
        >>> r["choices"][0]["message"]["content"]
        'Mock answer to: Hello'
    """
    handlers = {
        "/v1/chat/completions": _chat,
        "/v1/embeddings": _embeddings,
        "/v1/responses": _responses,
        "/v1/completions": _completions,
    }
    if url not in handlers:
        raise MockRequestError(f"unsupported url {url!r}")
    if not isinstance(body, dict):
        raise MockRequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise MockRequestError("'model' must be a string")
    return handlers[url](body, custom_id, created)


# -- endpoints -------------------------------------------------------------------------------


def _chat(body: dict[str, Any], custom_id: str, created: int) -> dict[str, Any]:
    messages = _chat_messages(body.get("messages"))
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not _positive_int(body[key]):
            raise MockRequestError(f"'{key}' must be a positive integer")
    prompt = prompt_text(body)
    content = _answer(body.get("response_format"), custom_id, prompt, _last_user_text(messages))
    prompt_tokens, completion_tokens = estimate_tokens(prompt), estimate_tokens(content)
    return {
        "id": f"chatcmpl-{_digest(custom_id, prompt)[:24]}",
        "object": "chat.completion",
        "created": created,
        "model": body.get("model") or DEFAULT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def _responses(body: dict[str, Any], custom_id: str, created: int) -> dict[str, Any]:
    if "input" not in body:
        raise MockRequestError("'input' is required")
    if not isinstance(body["input"], (str, list)):
        raise MockRequestError("'input' must be a string or a list of input items")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise MockRequestError("'instructions' must be a string")
    prompt = prompt_text(body)
    text_format = _optional_dict(body.get("text"), "text").get("format")
    content = _answer(text_format, custom_id, prompt, _last_input_text(body["input"]))
    input_tokens, output_tokens = estimate_tokens(prompt), estimate_tokens(content)
    digest = _digest(custom_id, prompt)
    return {
        "id": f"resp_{digest[:24]}",
        "object": "response",
        "created_at": created,
        "model": body.get("model") or DEFAULT_MODEL,
        "status": "completed",
        "output": [
            {
                "id": f"msg_{digest[24:48]}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _completions(body: dict[str, Any], custom_id: str, created: int) -> dict[str, Any]:
    if not isinstance(body.get("prompt"), (str, list)):
        raise MockRequestError("'prompt' is required: a string or a list")
    prompt = prompt_text(body)
    text = f"Mock completion of: {prompt[:60]}"
    return {
        "id": f"cmpl-{_digest(custom_id, prompt)[:24]}",
        "object": "text_completion",
        "created": created,
        "model": body.get("model") or DEFAULT_MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(estimate_tokens(prompt), estimate_tokens(text)),
    }


def _embeddings(body: dict[str, Any], custom_id: str, created: int) -> dict[str, Any]:
    texts = _embedding_texts(body.get("input"))
    dimensions = body.get("dimensions")
    dimensions = DEFAULT_EMBEDDING_DIMENSIONS if dimensions is None else dimensions
    if not _positive_int(dimensions) or dimensions > MAX_EMBEDDING_DIMENSIONS:
        raise MockRequestError(
            f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}, "
            f"got {dimensions!r:.40}"
        )
    data = [
        {"object": "embedding", "index": i, "embedding": embedding_vector(t, dimensions)}
        for i, t in enumerate(texts)
    ]
    tokens = sum(estimate_tokens(t) for t in texts)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model") or DEFAULT_MODEL,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _embedding_texts(raw: Any) -> list[str]:
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise MockRequestError("'input' must be a string or a non-empty list")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise MockRequestError(
            f"'input' holds {len(texts)} items; at most {MAX_EMBEDDING_INPUTS} are allowed"
        )
    for text in texts:
        # A string, or a list of token ids (OpenAI accepts both).
        tokens = isinstance(text, list) and all(_is_int(t) for t in text)
        if not isinstance(text, str) and not tokens:
            raise MockRequestError("each 'input' item must be a string or a list of token ids")
    return [t if isinstance(t, str) else json.dumps(t) for t in texts]


def embedding_vector(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """A stable unit vector for `text`.

    Example:
        >>> v = embedding_vector("hello", 4)
        >>> round(sum(x * x for x in v), 6)
        1.0
    """
    dice = Dice(f"embedding\x00{text}")
    vector = [dice.unit() * 2.0 - 1.0 for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


# -- content ---------------------------------------------------------------------------------


def _answer(response_format: Any, custom_id: str, prompt: str, last_user: str) -> str:
    fmt = _optional_dict(response_format, "response_format")
    dice = Dice(f"{custom_id}{prompt}")
    if fmt.get("type") == "json_schema":
        # Chat nests the schema under "json_schema"; the Responses API puts it at top level.
        holder = _optional_dict(fmt.get("json_schema"), "json_schema") or fmt
        try:
            return json.dumps(value_for_schema(holder.get("schema") or {}, dice))
        except SchemaError as exc:
            raise MockRequestError(f"invalid or oversized JSON schema: {exc}") from None
    if fmt.get("type") == "json_object":
        answer = f"Mock answer to: {last_user[:60]}"
        return json.dumps({"answer": answer, "score": dice.integer(0, 10)})
    return f"Mock answer to: {last_user[:60]}"


# -- helpers ---------------------------------------------------------------------------------


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise MockRequestError("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MockRequestError(f"messages[{index}] must be an object with a string 'role'")
        content = message.get("content")
        # An assistant turn may carry tool calls instead of content.
        if content is None and message["role"] == "assistant":
            continue
        if not isinstance(content, (str, list)):
            raise MockRequestError(
                f"messages[{index}].content must be a string or a list of content parts"
            )
    return messages


def _optional_dict(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MockRequestError(f"'{name}' must be an object, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _input_item_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return _content_text(item.get("content", item.get("text")))
    return ""


def _last_user_text(messages: list[Any]) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    chosen = users[-1] if users else messages[-1]
    return _content_text(chosen.get("content")) if isinstance(chosen, dict) else ""


def _last_input_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        return _last_user_text([v if isinstance(v, dict) else {"content": v} for v in value])
    return ""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()
