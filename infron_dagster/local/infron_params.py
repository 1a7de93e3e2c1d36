"""Infron's create-batch chat params (Messages style), checked and turned into a chat body.

Infron documents ``{"custom_id", "params": {"model", "max_tokens" (required), "messages"
(user and assistant turns), "system" (a top-level string), "temperature", "top_p", "top_k",
"stop_sequences", "metadata"}}``, with OpenAI extras such as ``response_format`` passed
through. The mock model answers OpenAI chat bodies, so the params are translated back:
``system`` becomes a leading system message and ``stop_sequences`` becomes ``stop``.

A system-role message inside ``messages`` is accepted too (lenient: older clients sent
OpenAI-style bodies). Every problem raises :class:`MockRequestError`, which fails only that
request (a 400 line in the result file), never the batch.

Example:
    >>> chat_body_from_params({"model": "m", "max_tokens": 8, "system": "terse",
    ...                        "messages": [{"role": "user", "content": "hi"}]})["messages"][0]
    {'role': 'system', 'content': 'terse'}
"""

from __future__ import annotations

from typing import Any

from .mock_model import MockRequestError

__all__ = ["chat_body_from_params"]

_ROLES = ("user", "assistant")
_LENIENT_ROLES = (*_ROLES, "system")
# Messages-API fields with no OpenAI chat counterpart: checked, then left out.
_DROPPED = ("system", "stop_sequences", "top_k", "metadata")


def chat_body_from_params(params: Any, *, require_max_tokens: bool = True) -> dict[str, Any]:
    """The OpenAI chat body Infron's Messages-style `params` ask for; MockRequestError if bad."""
    if not isinstance(params, dict):
        raise MockRequestError("'params' must be an object")
    _check_max_tokens(params.get("max_tokens"), require_max_tokens)
    messages = _messages(params.get("messages"))
    system = params.get("system")
    if system is not None and not isinstance(system, str):
        raise MockRequestError("'system' must be a string")
    _check_sampling(params)
    stop = _stop_sequences(params.get("stop_sequences"))
    body = {key: value for key, value in params.items() if key not in _DROPPED}
    body["messages"] = ([{"role": "system", "content": system}] if system else []) + messages
    if stop is not None:
        body["stop"] = stop
    return body


def _check_max_tokens(value: Any, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MockRequestError(
            "'max_tokens' is required and must be a positive integer "
            f"(Infron's batch params are Messages-style), got {value!r:.40}"
        )


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise MockRequestError("'messages' must be a non-empty list of user/assistant turns")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _LENIENT_ROLES:
            raise MockRequestError(
                f"messages[{index}] must be an object whose 'role' is 'user' or 'assistant' "
                "(put instructions in the top-level 'system' string)"
            )
        if not isinstance(message.get("content"), (str, list)):
            raise MockRequestError(
                f"messages[{index}].content must be a string or a list of content blocks"
            )
    return messages


def _check_sampling(params: dict[str, Any]) -> None:
    for key in ("temperature", "top_p"):
        value = params.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise MockRequestError(f"'{key}' must be a number")
    top_k = params.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise MockRequestError("'top_k' must be an integer")
    metadata = params.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise MockRequestError("'metadata' must be an object")


def _stop_sequences(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise MockRequestError("'stop_sequences' must be a list of strings")
    return value
