"""Values valid against a JSON schema, drawn deterministically: the mock model's structured output.

A schema comes from a client, so it is input, not truth: a keyword of the wrong type
(``minItems: "many"``, ``properties: "oops"``) or an ask beyond the caps below
(``minLength: 5e7``, arrays of arrays of thousands) raises :class:`SchemaError`, which the
batch reports as that one request's 400. The caps keep a hostile schema from making the
server build gigabytes; a real model's output limit would refuse such answers too.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_ARRAY_ITEMS",
    "MAX_STRING_LENGTH",
    "Dice",
    "SchemaError",
    "value_for_schema",
]

MAX_STRING_LENGTH = 100_000
MAX_ARRAY_ITEMS = 10_000
# The whole answer: about what a 256k-token output window could hold.
MAX_ANSWER_CHARS = 1_000_000
_MAX_DEPTH = 12
_MAX_REF_HOPS = 32
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")


class SchemaError(ValueError):
    """The schema cannot be answered: a keyword of the wrong type or an ask over a cap."""


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


@dataclass
class _Draw:
    """One answer being drawn: the dice, the root schema (for $ref) and the size spent."""

    dice: Dice
    root: dict[str, Any]
    spent: int = 0
    limit: int = field(default=MAX_ANSWER_CHARS)

    def spend(self, size: int) -> None:
        """Account for `size` more characters of answer; over the limit is a SchemaError."""
        self.spent += size
        if self.spent > self.limit:
            raise SchemaError(
                f"the JSON schema asks for an answer over the mock model's limit of "
                f"{self.limit} characters"
            )


def value_for_schema(schema: dict[str, Any], dice: Dice, name: str = "value") -> Any:
    """A value valid against the JSON schema `schema`, drawn from `dice`.

    Example:
        >>> schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}},
        ...           "required": ["n"]}
        >>> 0 <= value_for_schema(schema, Dice("x"))["n"] <= 3
        True
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, got {_show(schema)}")
    return _value(schema, _Draw(dice, schema), 0, name)


def _value(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> Any:
    schema = _resolve(schema, draw.root)
    # Checked before any branching so a $ref cycle through anyOf ends too.
    if depth > _MAX_DEPTH:
        draw.spend(4)
        return None
    if "const" in schema:
        return _spent(draw, schema["const"])
    enum = schema.get("enum")
    if enum is not None:
        if not isinstance(enum, list):
            raise SchemaError(f"'enum' must be an array, got {_show(enum)}")
        if enum:
            return _spent(draw, draw.dice.choice(enum))
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if branches is None:
            continue
        if not isinstance(branches, list):
            raise SchemaError(f"'{key}' must be an array, got {_show(branches)}")
        if branches:
            return _value(_pick_branch(branches, draw.root), draw, depth + 1, name)
    kind = _schema_type(schema)
    if kind == "null":
        draw.spend(4)
        return None
    return _GENERATORS[kind](schema, draw, depth, name)


def _spent(draw: _Draw, value: Any) -> Any:
    # Copied from the schema, yet repeated by arrays: a large const counts every time.
    draw.spend(len(json.dumps(value, default=str)))
    return value


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    # Only local refs ("#/$defs/X"): Pydantic-generated schemas use nothing else.
    hops = 0
    while isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        hops += 1
        if hops > _MAX_REF_HOPS:
            raise SchemaError("the JSON schema's $ref chain does not end")
        target: Any = root
        for part in schema["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema = target if isinstance(target, dict) else {}
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
        if not all(isinstance(k, str) for k in kind):
            raise SchemaError(f"'type' must be a string or an array of strings, got {_show(kind)}")
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if non_null else "null"
    if kind is not None and not isinstance(kind, str):
        raise SchemaError(f"'type' must be a string or an array of strings, got {_show(kind)}")
    if kind in _GENERATORS or kind == "null":
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _gen_object(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    if not isinstance(properties, dict):
        raise SchemaError(f"'properties' must be an object, got {_show(properties)}")
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise SchemaError(f"'required' must be an array of strings, got {_show(required)}")
    properties = dict(properties)
    # A required key without a declared schema still has to be present.
    for key in required:
        properties.setdefault(key, {})
    draw.spend(2)
    answer = {}
    for key, sub in properties.items():
        draw.spend(len(key) + 4)
        answer[key] = _value(sub if isinstance(sub, dict) else {}, draw, depth + 1, key)
    return answer


def _gen_array(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> list[Any]:
    cap = _count(schema, "maxItems")
    low = _count(schema, "minItems")
    low = (1 if cap is None else min(1, cap)) if low is None else low
    if low > MAX_ARRAY_ITEMS:
        raise SchemaError(
            f"'minItems' {low} is over the mock model's limit of {MAX_ARRAY_ITEMS} items"
        )
    high = min(cap if cap is not None else max(low, 3), MAX_ARRAY_ITEMS)
    items = _items(schema.get("items"))
    count = draw.dice.integer(low, max(low, high))
    draw.spend(2 + count)
    values = [_value(items, draw, depth + 1, name) for _ in range(count)]
    if schema.get("uniqueItems"):
        unique = {json.dumps(v, sort_keys=True): v for v in values}
        values = list(unique.values())
    return values


def _items(items: Any) -> dict[str, Any]:
    # A list is draft-4 tuple typing and a boolean is a valid schema: both answer freely.
    if items is None or isinstance(items, (list, bool)):
        return {}
    if not isinstance(items, dict):
        raise SchemaError(f"'items' must be a schema object, got {_show(items)}")
    return items


def _gen_string(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> str:
    dice = draw.dice
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
        text = f"{name[:40]} {dice.choice(_WORDS)}"
    low, high = _count(schema, "minLength") or 0, _count(schema, "maxLength")
    if low > MAX_STRING_LENGTH:
        raise SchemaError(
            f"'minLength' {low} is over the mock model's limit of {MAX_STRING_LENGTH} characters"
        )
    text = text.ljust(low, "x")
    text = text[:high] if high is not None else text
    draw.spend(len(text) + 2)
    return text


def _gen_integer(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> int:
    low, high = _bounds(schema, 0, 100)
    low_i, high_i = math.ceil(low), math.floor(high)
    if "exclusiveMinimum" in schema and low_i == low:
        low_i += 1
    if "exclusiveMaximum" in schema and high_i == high:
        high_i -= 1
    value = draw.dice.integer(low_i, max(low_i, high_i))
    draw.spend(len(str(value)))
    return value


def _gen_number(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> float:
    low, high = _bounds(schema, 0.0, 1.0)
    draw.spend(24)
    if low >= high:
        return low
    # Stay off the bounds so exclusive limits hold too.
    value = low + (high - low) * (0.05 + 0.9 * draw.dice.unit())
    rounded = round(value, 2)
    return rounded if low < rounded < high else value


def _gen_boolean(schema: dict[str, Any], draw: _Draw, depth: int, name: str) -> bool:
    draw.spend(5)
    return draw.dice.unit() < 0.5


def _bounds(schema: dict[str, Any], low: float, high: float) -> tuple[float, float]:
    """The [low, high] range to draw from: the schema's limits, else the default range,
    shifted only as far as a one-sided limit requires."""
    lows = [_finite(schema, k) for k in ("minimum", "exclusiveMinimum") if _is_num(schema.get(k))]
    highs = [_finite(schema, k) for k in ("maximum", "exclusiveMaximum") if _is_num(schema.get(k))]
    width = high - low
    new_low = max(lows) if lows else None
    new_high = min(highs) if highs else None
    if new_low is None:
        new_low = low if new_high is None or low <= new_high else new_high - width
    if new_high is None:
        new_high = high if high >= new_low else new_low + width
    return new_low, new_high


def _finite(schema: dict[str, Any], key: str) -> float:
    # Limits beyond a double (10**400) or not finite (Infinity, NaN) cannot be drawn from.
    value = schema[key]
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > 2.0**53:
        raise SchemaError(f"'{key}' must be a finite number within ±2**53, got {_show(value)}")
    return value


def _count(schema: dict[str, Any], key: str) -> int | None:
    """A non-negative integer keyword (5e7 counts: JSON has one number type), or None."""
    value = schema.get(key)
    if value is None:
        return None
    # float.is_integer() is False for inf and NaN; huge ints stay ints (no float overflow).
    whole = _is_num(value) and value >= 0 and (isinstance(value, int) or value.is_integer())
    if not whole:
        raise SchemaError(f"'{key}' must be a non-negative integer, got {_show(value)}")
    return int(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_GENERATORS = {
    "object": _gen_object,
    "array": _gen_array,
    "string": _gen_string,
    "integer": _gen_integer,
    "number": _gen_number,
    "boolean": _gen_boolean,
}
