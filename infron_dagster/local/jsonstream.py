"""A JSON object body read member by member, one array of it element by element.

An Infron-style create carries its requests inline: 30 MB of JSON parsed at once is
hundreds of MB of Python objects (+169 MiB peak for 30 MB measured before this). Here only
one element of the streamed array, or one other member, is in memory at a time.

Example:
    >>> import io
    >>> seen = []
    >>> body = io.BytesIO(b'{"requests": [{"a": 1}, 2], "endpoint": "/x"}')
    >>> read_object(body.read, "requests", seen.append)
    {'requests': Streamed(count=2), 'endpoint': '/x'}
    >>> seen
    [{'a': 1}, 2]
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonStreamError", "MemberTooLarge", "Streamed", "read_object"]

CHUNK = 1 << 20
# Members other than the streamed array are small (ids, names, metadata): a larger one is
# refused rather than held.
MAX_MEMBER_CHARS = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JsonStreamError(ValueError):
    """The body is not one valid JSON object."""


class MemberTooLarge(ValueError):
    """A member other than the streamed array is over `MAX_MEMBER_CHARS`."""


@dataclass(frozen=True)
class Streamed:
    """Stands for the streamed array in the returned members: how many elements it had."""

    count: int


class _Window:
    """The decoded text of a byte stream, kept from the current value on only."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.text = ""
        self.pos = 0
        self.eof = False

    def fill(self) -> bool:
        """Read more (as much again as the window holds, so a big value costs O(n)); False
        at the end of the stream."""
        if self.eof:
            return False
        data = self._read(max(CHUNK, len(self.text) - self.pos))
        self.eof = not data
        try:
            decoded = self._utf8.decode(data, final=self.eof)
        except UnicodeDecodeError as exc:
            raise JsonStreamError(f"the body is not UTF-8: {exc}") from None
        self.text = self.text[self.pos :] + decoded
        self.pos = 0
        return not self.eof or bool(decoded)

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos : self.pos + 1]

    def expect(self, allowed: str) -> str:
        """Consume the next character, one of `allowed`."""
        char = self.peek()
        if not char or char not in allowed:
            shown = repr(char) if char else "the end of the body"
            raise JsonStreamError(f"expected one of {allowed!r} at {shown}")
        self.pos += 1
        return char

    def value(self, limit: int | None = None) -> Any:
        """The next JSON value, read across as many chunks as it spans.

        Raises RecursionError for a value nested too deeply to parse.
        """
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                error: json.JSONDecodeError | None = exc
            else:
                error = None
                # A number at the window's edge may go on in the next chunk: read on.
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return value
            if limit is not None and len(self.text) - self.pos > limit:
                raise MemberTooLarge(f"a value is over {limit} characters")
            if not self.fill() and error is not None:
                raise JsonStreamError(str(error)) from None


def read_object(
    read: Callable[[int], bytes], streamed_key: str, sink: Callable[[Any], None]
) -> dict[str, Any]:
    """The members of the JSON object `read` yields; the array under `streamed_key` goes to
    `sink` element by element and reads back as `Streamed`. An empty body is ``{}``.

    Raises JsonStreamError (not one object, invalid JSON, `streamed_key` twice),
    MemberTooLarge, or RecursionError (nested too deeply).
    """
    window = _Window(read)
    members: dict[str, Any] = {}
    if not window.peek():
        return members
    window.expect("{")
    if window.peek() == "}":
        window.pos += 1
    else:
        while True:
            key = window.value(MAX_MEMBER_CHARS)
            if not isinstance(key, str):
                raise JsonStreamError("an object key must be a string")
            window.expect(":")
            if key == streamed_key and window.peek() == "[":
                if key in members:
                    raise JsonStreamError(f"{key!r} is given twice")
                members[key] = Streamed(_stream_array(window, sink))
            else:
                members[key] = window.value(MAX_MEMBER_CHARS)
            if window.expect(",}") == "}":
                break
    if window.peek():
        raise JsonStreamError("extra data after the JSON object")
    return members


def _stream_array(window: _Window, sink: Callable[[Any], None]) -> int:
    window.expect("[")
    if window.peek() == "]":
        window.pos += 1
        return 0
    count = 0
    while True:
        sink(window.value())
        count += 1
        if window.expect(",]") == "]":
            return count
