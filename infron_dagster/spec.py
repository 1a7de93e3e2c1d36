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

import string
from collections.abc import Callable, Mapping, Sequence
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
        >>> RequestSpec(model="text-embedding-3-small", endpoint="/v1/embeddings",
        ...             prompt_template="{title}: {body}", key_columns=("doc_id",))
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
        object.__setattr__(self, "key_columns", tuple(self.key_columns))
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {self.endpoint!r}")
        if (self.prompt_template is None) == (self.body_fn is None):
            raise ValueError("give exactly one of prompt_template and body_fn")
        if not self.key_columns:
            raise ValueError("key_columns must name at least one column")
        if self.response_schema is not None and self.endpoint == "/v1/embeddings":
            raise ValueError("response_schema does not apply to embeddings")

    @property
    def template_columns(self) -> tuple[str, ...]:
        """The columns the template reads, in order of first use."""
        if self.prompt_template is None:
            return ()
        names: list[str] = []
        for _, name, _, _ in string.Formatter().parse(self.prompt_template):
            if name is not None and name not in names:
                if not name.isidentifier() and not name:
                    raise ValueError("empty {} placeholder in prompt_template")
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
