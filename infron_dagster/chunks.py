"""Request lines -> chunk files on local disk, each under the batch limits, ready to upload.

Pure data code, used by :mod:`prepare`: a new chunk starts at either limit (requests or
bytes); a single line over the byte limit still goes, alone.

Example:
    >>> import tempfile
    >>> with ChunkWriter(tempfile.mkdtemp(), max_requests=2, max_bytes=1000) as writer:
    ...     for line in (b'{"a":1}', b'{"a":2}', b'{"a":3}'):
    ...         writer.write(line)
    >>> [(c.index, c.requests, c.bytes) for c in writer.chunks]
    [(0, 2, 16), (1, 1, 8)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

import numpy as np

__all__ = ["ChunkWriter", "LocalChunk"]


@dataclass(frozen=True)
class LocalChunk:
    """One request JSONL file on local disk, ready to upload."""

    index: int
    path: str
    requests: int
    bytes: int


class ChunkWriter:
    """Streams lines into chunk files, starting a new one at either limit."""

    def __init__(self, workdir: str | os.PathLike[str], max_requests: int, max_bytes: int) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("max_requests_per_batch and max_bytes_per_batch must be positive")
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.chunks: list[LocalChunk] = []
        self._fh: IO[bytes] | None = None
        self._count = self._bytes = 0

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def write(self, line: bytes) -> None:
        size = len(line) + 1
        full = self._count >= self.max_requests or self._bytes + size > self.max_bytes
        if self._fh is None or (self._count and full):
            self._finish()
            self._start()
        assert self._fh is not None
        self._fh.write(line + b"\n")
        self._count += 1
        self._bytes += size

    def write_block(self, data: memoryview, offsets: np.ndarray) -> None:
        """Write consecutive lines at once: ``data[offsets[i]:offsets[i + 1]]`` is line i
        with its newline. Chunks split exactly where :meth:`write` would split them."""
        count, i = len(offsets) - 1, 0
        while i < count:
            if self._fh is None:
                self._start()
            assert self._fh is not None
            room = min(self.max_requests - self._count, count - i)
            byte_limit = offsets[i] + self.max_bytes - self._bytes
            fit = min(room, int(np.searchsorted(offsets, byte_limit, side="right")) - 1 - i)
            if fit <= 0:
                if self._count:
                    self._finish()
                    continue
                fit = 1  # one line over the byte limit still goes, alone
            end = i + fit
            self._fh.write(data[offsets[i] : offsets[end]])
            self._count += fit
            self._bytes += int(offsets[end] - offsets[i])
            i = end

    def _start(self) -> None:
        path = os.path.join(self.workdir, f"chunk-{len(self.chunks):05d}.jsonl")
        self._fh = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in _finish
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        index = len(self.chunks)
        self.chunks.append(LocalChunk(index, self._fh.name, self._count, self._bytes))
        self._fh = None
