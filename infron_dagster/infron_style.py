"""Infron's wire style for requests: OpenAI-style JSONL lines as Infron's batch body.

Requests are always prepared as OpenAI-style JSONL (``{"custom_id","method","url","body"}``);
for ``api_style="infron"`` the client streams them out as
``{"requests": [{"custom_id", "params"}, ...]}``, chat bodies turned into Infron's
Messages-style params by :func:`messages_params`. No HTTP here: pure functions over a file.

Example:
    >>> messages_params({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    {'model': 'm', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 4096}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["DEFAULT_INFRON_MAX_TOKENS", "infron_body", "messages_params"]

# Infron's create-batch params are Messages-style and require max_tokens; when a chat body
# has none, this is sent (documented in the README).
DEFAULT_INFRON_MAX_TOKENS = 4096


def infron_body(requests_path: str | os.PathLike[str], endpoint: str) -> Iterator[bytes]:
    """Stream ``{"requests": [{"custom_id", "params"}, ...]}`` from OpenAI-style JSONL.

    Chat bodies become Infron's documented Messages-style params (see
    :func:`messages_params`). Another endpoint is named explicitly so the server cannot
    mistake a Responses ``input`` for an embeddings one.
    """
    chat = endpoint == "/v1/chat/completions"
    if not chat:
        yield b'{"endpoint":' + json.dumps(endpoint).encode() + b","
    else:
        yield b"{"
    yield b'"requests":['
    first = True
    with open(requests_path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            line = json.loads(raw)
            params = messages_params(line["body"]) if chat else line["body"]
            item = {"custom_id": line["custom_id"], "params": params}
            yield (b"" if first else b",") + json.dumps(item, separators=(",", ":")).encode()
            first = False
    yield b"]}"


def messages_params(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat body as Infron's Messages-style params.

    System messages become the top-level ``system`` string; ``max_tokens`` comes from
    ``max_tokens`` or ``max_completion_tokens``, else :data:`DEFAULT_INFRON_MAX_TOKENS`
    (Infron requires it); ``stop`` becomes ``stop_sequences``. Other keys pass through.

    Example:
        >>> messages_params({"model": "m", "messages": [
        ...     {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
        {'model': 'm', 'messages': [{'role': 'user', 'content': 'Hi'}], 'system': 'Be brief.', 'max_tokens': 4096}
    """  # noqa: E501
    params = dict(body)
    messages = params.get("messages")
    if isinstance(messages, list):
        system = [m for m in messages if isinstance(m, dict) and m.get("role") in _SYSTEM_ROLES]
        if system:
            params["messages"] = [m for m in messages if m not in system]
            texts = [_message_text(m.get("content")) for m in system]
            params["system"] = "\n\n".join(t for t in texts if t)
    limit = params.pop("max_completion_tokens", None)
    if params.get("max_tokens") is None:  # absent, or an explicit None: Infron requires it
        params["max_tokens"] = limit if limit is not None else DEFAULT_INFRON_MAX_TOKENS
    if "stop" in params:
        stop = params.pop("stop")
        params["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    return params


_SYSTEM_ROLES = ("system", "developer")


def _message_text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
