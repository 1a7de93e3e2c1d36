"""Streaming multipart/form-data parsing for uploads that may be hundreds of megabytes.

The raw body is spooled to a temp file, the part boundaries are located by scanning that file
chunk by chunk, and each file part is copied out by byte range. Memory stays at one chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20
_MAX_HEADER_BYTES = 16 * 1024
_MAX_FIELD_BYTES = 1 << 20


class MultipartError(ValueError):
    """The body is not valid multipart/form-data."""


@dataclass
class Part:
    """One form field: small fields carry `value`, file fields are copied to `path`."""

    name: str
    filename: str | None = None
    content_type: str | None = None
    value: bytes | None = None
    path: Path | None = None


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type header.

    Example:
        >>> boundary_of('multipart/form-data; boundary="abc"')
        b'abc'
    """
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise MultipartError("expected multipart/form-data with a boundary")
    return boundary.encode("latin-1")


def spool(stream: BinaryIO, dest: Path, length: int | None) -> int:
    """Copy at most `length` bytes (all when None) of `stream` to `dest`; return the count."""
    written = 0
    with open(dest, "wb") as out:
        while length is None or written < length:
            want = CHUNK if length is None else min(CHUNK, length - written)
            data = stream.read(want)
            if not data:
                break
            out.write(data)
            written += len(data)
    return written


def parse(
    raw: Path,
    boundary: bytes,
    new_path: Callable[[], Path],
    into: dict[str, Part] | None = None,
) -> dict[str, Part]:
    """Split the spooled body `raw` into its parts; file parts go to paths from `new_path`.

    Parts are added to `into` (a fresh dict by default) as they are read, so a caller that
    passes its own dict can remove every file written even when a later part is malformed.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "raw").write_bytes(b'--b\\r\\nContent-Disposition: form-data; name="x"'
        ...                              b'\\r\\n\\r\\nhi\\r\\n--b--\\r\\n')
        >>> parse(d / "raw", b"b", lambda: d / "part")["x"].value
        b'hi'
    """
    parts: dict[str, Part] = {} if into is None else into
    with open(raw, "rb") as handle:
        for start, end in _part_spans(handle, boundary):
            part = _read_part(handle, start, end, new_path)
            if part.name in parts:
                # The first of a repeated field wins; the copy must not linger on disk.
                if part.path is not None:
                    part.path.unlink(missing_ok=True)
                continue
            parts[part.name] = part
    return parts


def _part_spans(handle: BinaryIO, boundary: bytes) -> list[tuple[int, int]]:
    delimiter = b"\r\n--" + boundary
    handle.seek(0)
    # Treat the body as if preceded by CRLF so the first delimiter matches like the others.
    positions = [-2] if handle.read(len(boundary) + 2) == b"--" + boundary else []
    positions += _find_all(handle, delimiter)
    spans = []
    for here, after in itertools.pairwise(positions):
        handle.seek(here + len(delimiter))
        line = handle.readline(1024)
        if line.startswith(b"--"):
            break
        start = here + len(delimiter) + len(line)
        # A delimiter line must end in a newline before the next delimiter starts; a body
        # of bare delimiters ("--b\r\n--b\r\n") would otherwise give parts that end
        # before they begin.
        if not line.endswith(b"\n") or start > after:
            raise MultipartError("malformed multipart delimiter line")
        spans.append((start, after))
    if not spans:
        raise MultipartError("no parts found in multipart body")
    return spans


def _find_all(handle: BinaryIO, needle: bytes) -> list[int]:
    handle.seek(0)
    positions: list[int] = []
    offset, tail = 0, b""
    while data := handle.read(CHUNK):
        buffer, base = tail + data, offset - len(tail)
        index = buffer.find(needle)
        while index != -1:
            positions.append(base + index)
            index = buffer.find(needle, index + 1)
        # Keep less than one needle so a match is never counted twice.
        tail = buffer[-(len(needle) - 1) :]
        offset += len(data)
    return positions


def _read_part(handle: BinaryIO, start: int, end: int, new_path: Callable[[], Path]) -> Part:
    handle.seek(start)
    head = handle.read(min(_MAX_HEADER_BYTES, end - start))
    split = head.find(b"\r\n\r\n")
    if split == -1:
        raise MultipartError("multipart part without a header block")
    headers = HeaderParser().parsestr(head[:split].decode("utf-8", "replace"))
    name = _param(headers, "name")
    if name is None:
        raise MultipartError("multipart part without a name")
    part = Part(name, filename=headers.get_filename(), content_type=headers.get("content-type"))
    body_start = start + split + 4
    if part.filename is None and end - body_start <= _MAX_FIELD_BYTES:
        handle.seek(body_start)
        part.value = handle.read(end - body_start)
    else:
        part.path = new_path()
        _copy_range(handle, body_start, end, part.path)
    return part


def _param(headers: Any, key: str) -> str | None:
    value = headers.get_param(key, header="content-disposition")
    if isinstance(value, tuple):  # RFC 2231 encoded parameter
        value = value[2]
    return value if isinstance(value, str) else None


def _copy_range(handle: BinaryIO, start: int, end: int, dest: Path) -> None:
    handle.seek(start)
    remaining = end - start
    with open(dest, "wb") as out:
        while remaining > 0:
            data = handle.read(min(CHUNK, remaining))
            if not data:
                raise MultipartError("multipart body ended early")
            out.write(data)
            remaining -= len(data)
