"""A deterministic fake model: the same request always gets the same answer.

It answers chat completions (plain text, JSON object, or JSON valid against a JSON schema),
embeddings (stable unit vectors), the Responses API and legacy completions.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

DEFAULT_MODEL = "mock-model"
DEFAULT_EMBEDDING_DIMENSIONS = 8
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")
_MAX_DEPTH = 12


class MockRequestError(ValueError):
    """The request body is unusable; the batch reports it as a 400 for that request."""


class Dice:
    """A deterministic stream of numbers drawn from a sha256 chain (stable across Pythons).

    Example:
        >>> Dice("seed").integer(0, 9) == Dice("seed").integer(0, 9)
        True
    """

    def __init__(self, seed: str) -> None:
        self._seed = hashlib.sha256(seed.encode("utf-8")).digest()
        self._counter = 0

    def unit(self) -> float:
        """A float in [0, 1)."""
        self._counter += 1
        digest = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def integer(self, low: int, high: int) -> int:
        """An int in [low, high]."""
        return low + int(self.unit() * (high - low + 1))

    def choice(self, options: list[Any] | tuple[Any, ...]) -> Any:
        """One of `options`."""
        return options[int(self.unit() * len(options))]


def estimate_tokens(text: str) -> int:
    """The mock tokenizer: about four characters a token.

    Example:
        >>> estimate_tokens("12345678")
        3
    """
    return len(text) // 4 + 1


def prompt_text(body: dict[str, Any]) -> str:
    """All the prompt text of a request body, whatever its endpoint.

    Example:
        >>> prompt_text({"messages": [{"role": "user", "content": "hi"}]})
        'hi'
    """
    parts: list[str] = []
    if isinstance(body.get("instructions"), str):
        parts.append(body["instructions"])
    for message in body.get("messages") or []:
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
    return handlers[url](body, custom_id, created)


# -- endpoints -------------------------------------------------------------------------------


def _chat(body: dict[str, Any], custom_id: str, created: int) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MockRequestError("'messages' must be a non-empty list")
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
    prompt = prompt_text(body)
    text_format = (body.get("text") or {}).get("format")
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
    if "prompt" not in body:
        raise MockRequestError("'prompt' is required")
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
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise MockRequestError("'input' must be a string or a non-empty list")
    dimensions = body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    if not isinstance(dimensions, int) or dimensions < 1:
        raise MockRequestError("'dimensions' must be a positive integer")
    texts = [t if isinstance(t, str) else json.dumps(t) for t in texts]
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
    fmt = response_format if isinstance(response_format, dict) else {}
    dice = Dice(f"{custom_id}{prompt}")
    if fmt.get("type") == "json_schema":
        # Chat nests the schema under "json_schema"; the Responses API puts it at top level.
        schema = (fmt.get("json_schema") or fmt).get("schema") or {}
        return json.dumps(value_for_schema(schema, dice))
    if fmt.get("type") == "json_object":
        answer = f"Mock answer to: {last_user[:60]}"
        return json.dumps({"answer": answer, "score": dice.integer(0, 10)})
    return f"Mock answer to: {last_user[:60]}"


def value_for_schema(
    schema: dict[str, Any],
    dice: Dice,
    root: dict[str, Any] | None = None,
    depth: int = 0,
    name: str = "value",
) -> Any:
    """A value valid against the JSON schema `schema`, drawn from `dice`.

    Example:
        >>> schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}},
        ...           "required": ["n"]}
        >>> 0 <= value_for_schema(schema, Dice("x"))["n"] <= 3
        True
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return dice.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return value_for_schema(_pick_branch(schema[key], root), dice, root, depth + 1, name)
    kind = _schema_type(schema)
    if depth > _MAX_DEPTH or kind == "null":
        return None
    return _GENERATORS[kind](schema, dice, root, depth, name)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    # Only local refs ("#/$defs/X"): Pydantic-generated schemas use nothing else.
    seen = 0
    while isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/") and seen < 32:
        target: Any = root
        for part in schema["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema, seen = target if isinstance(target, dict) else {}, seen + 1
    return schema


def _pick_branch(branches: list[Any], root: dict[str, Any]) -> dict[str, Any]:
    # Prefer a non-null branch so Optional[...] fields carry data.
    for branch in branches:
        if isinstance(branch, dict) and _schema_type(_resolve(branch, root)) != "null":
            return branch
    return branches[0] if isinstance(branches[0], dict) else {}


def _schema_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if non_null else "null"
    if kind in _GENERATORS or kind == "null":
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _gen_object(
    schema: dict[str, Any], dice: Dice, root: dict[str, Any], depth: int, name: str
) -> dict[str, Any]:
    properties = dict(schema.get("properties") or {})
    # A required key without a declared schema still has to be present.
    for key in schema.get("required") or []:
        properties.setdefault(key, {})
    return {
        key: value_for_schema(sub if isinstance(sub, dict) else {}, dice, root, depth + 1, key)
        for key, sub in properties.items()
    }


def _gen_array(
    schema: dict[str, Any], dice: Dice, root: dict[str, Any], depth: int, name: str
) -> list[Any]:
    cap = schema.get("maxItems")
    low = int(schema.get("minItems", 1 if cap is None else min(1, int(cap))))
    high = int(cap) if cap is not None else max(low, 3)
    items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
    count = dice.integer(low, max(low, high))
    values = [value_for_schema(items, dice, root, depth + 1, name) for _ in range(count)]
    if schema.get("uniqueItems"):
        unique = {json.dumps(v, sort_keys=True): v for v in values}
        values = list(unique.values())
    return values


def _gen_string(
    schema: dict[str, Any], dice: Dice, root: dict[str, Any], depth: int, name: str
) -> str:
    fmt = schema.get("format")
    if fmt == "date":
        text = f"2024-{dice.integer(1, 12):02d}-{dice.integer(1, 28):02d}"
    elif fmt == "date-time":
        text = f"2024-{dice.integer(1, 12):02d}-{dice.integer(1, 28):02d}T12:00:00Z"
    elif fmt == "email":
        text = f"{dice.choice(_WORDS)}@example.com"
    elif fmt == "uuid":
        text = hashlib.sha256(str(dice.unit()).encode()).hexdigest()[:32]
        text = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    else:
        text = f"{name} {dice.choice(_WORDS)}"
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = text.ljust(low, "x")
    return text[: int(high)] if high is not None else text


def _gen_integer(
    schema: dict[str, Any], dice: Dice, root: dict[str, Any], depth: int, name: str
) -> int:
    low, high = _bounds(schema, 0, 100)
    low_i, high_i = math.ceil(low), math.floor(high)
    if "exclusiveMinimum" in schema and low_i == low:
        low_i += 1
    if "exclusiveMaximum" in schema and high_i == high:
        high_i -= 1
    return dice.integer(low_i, max(low_i, high_i))


def _gen_number(
    schema: dict[str, Any], dice: Dice, root: dict[str, Any], depth: int, name: str
) -> float:
    low, high = _bounds(schema, 0.0, 1.0)
    if low >= high:
        return low
    # Stay off the bounds so exclusive limits hold too.
    value = low + (high - low) * (0.05 + 0.9 * dice.unit())
    rounded = round(value, 2)
    return rounded if low < rounded < high else value


def _gen_boolean(
    schema: dict[str, Any], dice: Dice, root: dict[str, Any], depth: int, name: str
) -> bool:
    return dice.unit() < 0.5


def _bounds(schema: dict[str, Any], low: float, high: float) -> tuple[float, float]:
    """The [low, high] range to draw from: the schema's limits, else the default range,
    shifted only as far as a one-sided limit requires."""
    lows = [schema[k] for k in ("minimum", "exclusiveMinimum") if _is_num(schema.get(k))]
    highs = [schema[k] for k in ("maximum", "exclusiveMaximum") if _is_num(schema.get(k))]
    width = high - low
    new_low = max(lows) if lows else None
    new_high = min(highs) if highs else None
    if new_low is None:
        new_low = low if new_high is None or low <= new_high else new_high - width
    if new_high is None:
        new_high = high if high >= new_low else new_low + width
    return new_low, new_high


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_GENERATORS = {
    "object": _gen_object,
    "array": _gen_array,
    "string": _gen_string,
    "integer": _gen_integer,
    "number": _gen_number,
    "boolean": _gen_boolean,
}


# -- helpers ---------------------------------------------------------------------------------


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
