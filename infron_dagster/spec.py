"""What to ask the model for each row: the request spec.

Example:
    >>> spec = RequestSpec(
    ...     model="gpt-4o-mini",
    ...     prompt_template="Classify the sentiment of: {review_text}",
    ...     system_prompt="You are a precise annotator.",
    ...     key_columns=("review_id",),
    ...     params={"temperature": 0},
    ... )
    >>> sorted(spec.template_columns)
    ['review_text']
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENDPOINTS", "RequestSpec"]

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses")

RowBodyFn = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RequestSpec:
    """How one input row becomes one request body.

    Give ``prompt_template`` (``{column}`` placeholders, ``{{``/``}}`` for literal braces) or
    ``body_fn`` (a callable row -> request body) for anything a template cannot say.
    ``response_schema`` (a JSON schema of an object) asks for structured output, which
    collection turns into typed columns. ``key_columns`` identify a row for good: the
    ``custom_id`` is derived from them, never from the row's position.

    Example:
        >>> embed = RequestSpec(model="text-embedding-3-small", endpoint="/v1/embeddings",
        ...                     prompt_template="{title}: {body}", key_columns=("doc_id",))
    """

    model: str
    prompt_template: str | None = None
    system_prompt: str | None = None
    endpoint: str = "/v1/chat/completions"
    key_columns: Sequence[str] = ("id",)
    params: Mapping[str, Any] = field(default_factory=dict)
    response_schema: Mapping[str, Any] | None = None
    schema_name: str = "result"
    body_fn: RowBodyFn | None = None

    def __post_init__(self) -> None:
        if isinstance(self.key_columns, str):
            object.__setattr__(self, "key_columns", (self.key_columns,))
        if not isinstance(self.key_columns, Iterable):
            raise ValueError(
                f"key_columns must be a list of column names, not {self.key_columns!r}"
            )
        object.__setattr__(self, "key_columns", tuple(self.key_columns))
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {self.endpoint!r}")
        if (self.prompt_template is None) == (self.body_fn is None):
            raise ValueError("give exactly one of prompt_template and body_fn")
        if not self.key_columns:
            raise ValueError("key_columns must name at least one column")
        if self.response_schema is not None and self.endpoint == "/v1/embeddings":
            raise ValueError("response_schema does not apply to embeddings")
        # Everything below would otherwise be paid for and fail per request, or at collect.
        _check_model(self.model)
        _check_key_columns(self.key_columns)
        self._check_texts()
        _check_params(self.params, self._body_keys())
        if self.response_schema is not None:
            _check_schema_name(self.schema_name)
            _check_response_schema(self.response_schema)

    def _check_texts(self) -> None:
        if self.body_fn is not None and not callable(self.body_fn):
            raise ValueError(f"body_fn must be a callable row -> body, not {self.body_fn!r}")
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str):
                raise ValueError(
                    f"prompt_template must be a string, not {type(self.prompt_template).__name__}"
                )
            _check_encodable("prompt_template", self.prompt_template)
            _check_template(self.prompt_template)
        if self.system_prompt is not None:
            if not isinstance(self.system_prompt, str):
                raise ValueError(
                    f"system_prompt must be a string, not {type(self.system_prompt).__name__}"
                )
            _check_encodable("system_prompt", self.system_prompt)

    def _body_keys(self) -> tuple[str, ...]:
        """The body keys build_body sets itself, which params must not also set."""
        keys = ["model", "messages" if self.endpoint == "/v1/chat/completions" else "input"]
        if self.response_schema is not None:
            keys.append("text" if self.endpoint == "/v1/responses" else "response_format")
        if self.system_prompt and self.endpoint == "/v1/responses":
            keys.append("instructions")
        return tuple(keys)

    @property
    def template_columns(self) -> tuple[str, ...]:
        """The columns the template reads, in order of first use."""
        if self.prompt_template is None:
            return ()
        names: list[str] = []
        for _, name, _, _ in string.Formatter().parse(self.prompt_template):
            if name is not None and name not in names:
                names.append(name)
        return tuple(names)

    def build_body(self, prompt: str) -> dict[str, Any]:
        """The request body for one rendered prompt."""
        if self.endpoint == "/v1/embeddings":
            return {"model": self.model, "input": prompt, **self.params}
        if self.endpoint == "/v1/responses":
            body: dict[str, Any] = {"model": self.model, "input": prompt, **self.params}
            if self.system_prompt:
                body["instructions"] = self.system_prompt
            if self.response_schema is not None:
                body["text"] = {"format": {"type": "json_schema", **self._schema_block()}}
            return body
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body = {"model": self.model, "messages": messages, **self.params}
        if self.response_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": self._schema_block()}
        return body

    def _schema_block(self) -> dict[str, Any]:
        return {
            "name": self.schema_name,
            "schema": dict(self.response_schema or {}),
            "strict": True,
        }

    def identity(self) -> dict[str, Any]:
        """What, besides the rows, makes two submissions the same (for fingerprints)."""
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "body_fn": getattr(self.body_fn, "__qualname__", None),
        }


# --- definition-time checks ----------------------------------------------------------------------
# Each names the setting (and, inside a schema or template, where), because the alternative is
# a batch that is paid for and then fails for every row, or fails only at collect.


def _check_model(model: object) -> None:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string naming the model, not {model!r}")
    if model != model.strip():  # "gpt-4o-mini " is another model to the API: every row fails
        raise ValueError(f"model {model!r} has leading or trailing whitespace")
    _check_encodable("model", model)


def _check_key_columns(key_columns: tuple[Any, ...]) -> None:
    for column in key_columns:
        if not isinstance(column, str) or not column.strip():
            raise ValueError(f"key_columns entries must be non-empty column names, not {column!r}")


def _check_encodable(setting: str, text: str) -> None:
    """A lone surrogate cannot be UTF-8 encoded, so every request line would fail to write."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{setting} is not valid Unicode text: {exc.reason} at character {exc.start}"
        ) from None


def _check_params(params: object, body_keys: tuple[str, ...]) -> None:
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping of request-body fields, not {params!r}")
    for key in params:
        if not isinstance(key, str):
            raise ValueError(f"params key {key!r} must be a string (a request-body field)")
        if key in body_keys:  # it would replace (or be replaced by) what the spec renders
            raise ValueError(
                f"params sets {key!r}, which the spec itself sets in every request body; "
                f"remove it from params (the spec sets {list(body_keys)})"
            )
    _check_json("params", params)


def _check_json(setting: str, value: object) -> None:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"{setting} cannot be sent as JSON: {exc}") from None


_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _check_schema_name(name: object) -> None:
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(
            f"schema_name must be 1-64 letters, digits, '_' or '-' (OpenAI's rule), not {name!r}"
        )


# --- response_schema ------------------------------------------------------------------------

JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})
_MAX_SCHEMA_DEPTH = 64  # deeper than any real schema; stops a dict that contains itself


def _check_response_schema(schema: object) -> None:
    """A structured-output schema: an object schema whose every part is a schema.

    Example:
        >>> _check_response_schema({"type": "object", "properties": {"a": "string"}})
        Traceback (most recent call last):
        ValueError: response_schema.properties.a must be a JSON schema (a mapping), not str 'string'
    """
    path = "response_schema"
    _check_node(schema, path, 0)
    assert isinstance(schema, Mapping)
    if schema.get("type") != "object":  # OpenAI's rule; collection makes columns of properties
        raise ValueError(
            f"{path}.type must be 'object' (structured output is an object whose properties "
            f"become columns), not {schema.get('type')!r}"
        )
    _check_json(path, schema)


def _check_node(node: object, path: str, depth: int) -> None:
    if not isinstance(node, Mapping):
        raise ValueError(f"{path} must be a JSON schema (a mapping), not {_shown(node)}")
    if depth > _MAX_SCHEMA_DEPTH:
        raise ValueError(f"{path} is nested too deeply (does the schema contain itself?)")
    _check_type(node.get("type"), f"{path}.type")
    properties = node.get("properties")
    if properties is not None:
        if not isinstance(properties, Mapping):
            raise ValueError(f"{path}.properties must be a mapping of name -> schema")
        for name, sub in properties.items():
            _check_node(sub, _child(f"{path}.properties", name), depth + 1)
    _check_required(node.get("required"), properties, f"{path}.required")
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise ValueError(f"{path}.enum must be a non-empty list, not {_shown(node['enum'])}")
    for key, sub in _subschemas(node, path):
        _check_node(sub, key, depth + 1)


def _check_type(kind: object, path: str) -> None:
    if kind is None:
        return
    kinds = [kind] if isinstance(kind, str) else kind
    if not isinstance(kinds, list) or not kinds:
        raise ValueError(
            f"{path} must be a JSON type or a non-empty list of them, not {_shown(kind)}"
        )
    for one in kinds:
        if not isinstance(one, str) or one not in JSON_TYPES:
            raise ValueError(
                f"{path}: {_shown(one)} is not a JSON type; use one of {sorted(JSON_TYPES)}"
            )


def _check_required(required: object, properties: object, path: str) -> None:
    if required is None:
        return
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        shown = _shown(required) if not isinstance(required, list) else required
        bad = [r for r in required if not isinstance(r, str)] if isinstance(required, list) else []
        detail = f"{shown}; {_shown(bad[0])} is not a name" if bad else shown
        raise ValueError(f"{path} must be a list of property names, not {detail}")
    if isinstance(properties, Mapping):
        unknown = [r for r in required if r not in properties]
        if unknown:  # every answer would then fail at collect for lacking it
            raise ValueError(f"{path} names {unknown[0]!r}, which is not in properties")


def _subschemas(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, object]]:
    """The schemas nested in ``node`` (besides properties), each with its JSON path."""
    if "items" in node:
        yield f"{path}.items", node["items"]
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        yield f"{path}.additionalProperties", extra
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            options = node[key]
            if not isinstance(options, list) or not options:
                raise ValueError(f"{path}.{key} must be a non-empty list of schemas")
            yield from ((f"{path}.{key}[{i}]", sub) for i, sub in enumerate(options))
    for key in ("$defs", "definitions"):
        if key in node:
            if not isinstance(node[key], Mapping):
                raise ValueError(f"{path}.{key} must be a mapping of name -> schema")
            yield from ((_child(f"{path}.{key}", n), sub) for n, sub in node[key].items())


def _shown(value: object) -> str:
    """A value in an error message: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _child(path: str, name: object) -> str:
    if isinstance(name, str) and name.isidentifier():
        return f"{path}.{name}"
    return f"{path}[{name!r}]"


# --- prompt_template ---------------------------------------------------------------------------


class _TemplateError(ValueError):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset, self.why = offset, why


def _check_template(template: str) -> None:
    """Every ``{...}`` in the template must name a whole column, and braces must balance.

    Positional (``{0}``, ``{}``), attribute/index (``{a.b}``, ``{a[0]}``) and nested
    (``{a:{w}}``) placeholders never render from a row of columns, so every row would fail;
    attribute access would also let a template reach into Python objects.

    Example:
        >>> _check_template("Hi {name")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: prompt_template: a '{' that is never closed ... at character 3: '{name'
    """
    try:
        for offset, name, spec, conversion in _placeholders(template):
            _check_placeholder(offset, name, spec, conversion)
        list(string.Formatter().parse(template))  # belt and braces: Python's own parser agrees
    except _TemplateError as exc:
        excerpt = template[exc.offset : exc.offset + 40]
        raise ValueError(
            f"prompt_template: {exc.why} at character {exc.offset}: {excerpt!r}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"prompt_template cannot be parsed: {exc}") from None


def _check_placeholder(offset: int, name: str, spec: str, conversion: str | None) -> None:
    if not name:
        raise _TemplateError(offset, "an empty {} placeholder; name a column, like {text}")
    if name[0] in "\"'":
        raise _TemplateError(
            offset, "a placeholder that looks like JSON; write {{ and }} for literal braces"
        )
    if name.isdigit():
        raise _TemplateError(offset, "a positional placeholder; name a column, like {text}")
    if "." in name or "[" in name:
        raise _TemplateError(
            offset, "attribute or index access is not supported; a placeholder names a column"
        )
    if conversion not in (None, "r", "s", "a"):
        raise _TemplateError(offset, f"unknown conversion !{conversion}; use !r, !s or !a")
    if "{" in spec:
        raise _TemplateError(offset, "a nested placeholder in a format spec is not supported")


def _placeholders(template: str) -> Iterator[tuple[int, str, str, str | None]]:
    """(offset, name, format spec, conversion) of each placeholder, scanning as Python does."""
    i, n = 0, len(template)
    while i < n:
        if template.startswith(("{{", "}}"), i):
            i += 2
        elif template[i] == "}":
            raise _TemplateError(i, "a lone '}' (write '}}' for a literal brace)")
        elif template[i] == "{":
            end, name, spec, conversion = _field(template, i)
            yield i, name, spec, conversion
            i = end
        else:
            i += 1


def _field(template: str, start: int) -> tuple[int, str, str, str | None]:
    """Parse the placeholder at ``start`` like CPython's MarkupIterator; return its end too."""
    unclosed = "a '{' that is never closed (write '{{' for a literal brace)"
    i, n = start + 1, len(template)
    while i < n and template[i] not in "}:!":
        if template[i] == "{":
            raise _TemplateError(start, "an unexpected '{' inside a placeholder name")
        if template[i] == "[":  # an index may hold any character up to ']'
            while i < n and template[i] != "]":
                i += 1
        i += 1
    if i >= n:
        raise _TemplateError(start, unclosed)
    name, stop = template[start + 1 : i], template[i]
    if stop == "}":
        return i + 1, name, "", None
    conversion = None
    if stop == "!":
        if i + 2 >= n:
            raise _TemplateError(start, unclosed)
        if template[i + 2] not in "}:":
            raise _TemplateError(start, "a conversion must be one letter: !r, !s or !a")
        conversion, i = template[i + 1], i + 2
        if template[i] == "}":
            return i + 1, name, "", conversion
    depth, spec_start = 1, i + 1
    for j in range(spec_start, n):
        depth += {"{": 1, "}": -1}.get(template[j], 0)
        if depth == 0:
            return j + 1, name, template[spec_start:j], conversion
    raise _TemplateError(start, unclosed)
