"""Checks for bytes that come from outside: provider ids, statuses and messages, user keys.

The lowest layer: no Dagster, no HTTP, no pandas. Everything a provider sends is input, not
truth; these helpers decide what may become a log line, a URL path or a file name.

Example:
    >>> printable("bad\\nline\\x1b[31m")
    'bad\\\\nline\\\\x1b[31m'
    >>> safe_segment("batch_abc")
    'batch_abc'
    >>> safe_segment("../../etc")[:9]
    '.._.._etc'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_ID_LENGTH", "check_provider_id", "map_strings", "printable", "safe_segment"]

MAX_ID_LENGTH = 512
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def printable(text: object, limit: int = 300) -> str:
    """``text`` fit for one log line or message: control characters escaped, length bounded.

    A provider's message could otherwise forge log lines (``\\n``), move the terminal
    (escape sequences) or fill the log.

    Example:
        >>> printable("x" * 400, limit=5)
        'xxxxx...'
    """
    raw = text if isinstance(text, str) else str(text)
    out = []
    for ch in raw[: limit + 1]:
        code = ord(ch)
        if code < 32 or code == 127 or 0xD800 <= code <= 0xDFFF:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    clean = "".join(out)
    return clean[:limit] + "..." if len(raw) > limit else clean


def safe_segment(value: str) -> str:
    """One path segment for ``value``: itself when plainly safe, else an injective encoding.

    Safe means letters, digits, ``._-``, not starting with a dot, at most 100 characters.
    Anything else (``..``, ``/``, ``%``, non-ASCII, a long id) becomes a readable prefix, a
    ``~`` and a hash; ``~`` never occurs in a safe segment, so two values never share a name.

    Example:
        >>> safe_segment("file-abc123")
        'file-abc123'
        >>> safe_segment("a/b").startswith("a_b~")
        True
    """
    if _SAFE_SEGMENT.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{_UNSAFE_CHARS.sub('_', value[:40])}~{digest}"


def check_provider_id(value: object, what: str) -> str:
    """A provider's id as a string, or ValueError: non-empty, bounded, no control characters.

    Ids still never become paths or URL paths as they are: see :func:`safe_segment`.

    Example:
        >>> check_provider_id("batch_1", "batch id")
        'batch_1'
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what} is {type(value).__name__}, not a string")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH:
        raise ValueError(f"{what} is empty or longer than {MAX_ID_LENGTH} characters")
    if text in (".", ".."):  # would climb one level of the API's paths, quoted or not
        raise ValueError(f"{what} {text!r} is a dot segment")
    if any(ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise ValueError(f"{what} {printable(text, 80)!r} contains control characters")
    return text


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of a parsed JSON value with ``change`` applied to every string in it, the keys
    of objects included (the client redacts what a provider sends this way, before anything
    is parsed, stored or logged).

    Walks without recursion: a deeply nested answer cannot exhaust the stack.

    Example:
        >>> map_strings({"a": ["x", 1, {"x": "xx"}]}, lambda s: s.replace("x", "*"))
        {'a': ['*', 1, {'*': '**'}]}
    """
    root = [value]
    todo: list[tuple[Any, Any]] = [(root, 0)]
    while todo:
        container, where = todo.pop()
        item = container[where]
        if isinstance(item, str):
            container[where] = change(item)
        elif isinstance(item, list):
            copy = list(item)
            container[where] = copy
            todo.extend((copy, i) for i in range(len(copy)))
        elif isinstance(item, dict):
            fresh = {(change(k) if isinstance(k, str) else k): v for k, v in item.items()}
            container[where] = fresh
            todo.extend((fresh, k) for k in fresh)
    return root[0]
