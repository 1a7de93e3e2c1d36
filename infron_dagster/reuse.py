"""Pay once across partitions (``reuse_answers="pipeline"``): where a request body was answered.

A request's *body hash* is the hash of its request line without the ``custom_id`` (which is
derived from the partition, so the same prompt in two partitions is two different lines).
Collection writes, per partition, a small Parquet file of the requests that partition's own
attempts answered successfully::

    <root>/<name>/answers/partition=<key>/answers.parquet
        hash64 (uint64), body_hash, partition_key, attempt, custom_id

A submission with ``reuse_answers="pipeline"`` loads only the ``hash64`` column of every
partition's file (one listing, then concurrent reads), keeps it as one sorted numpy array
(8 bytes per answered request, plus 8 to find the file and row again), and looks up each
slice's body hashes in it. A candidate is confirmed against the full 128-bit hash, read from
its partition's file (cached per file), so a 64-bit collision never carries a wrong answer.

Why this shape: the files are written where the answers are made (collection, under the
partition's lock), so there is no shared index to lock or compact; a partition collected
again rewrites its own file. The cost of a lookup is one LIST and one GET per collected
partition (concurrent), and 16 bytes of memory per answered request in the pipeline: a
year of daily partitions is ~365 GETs. Far beyond that (hundreds of thousands of
partitions) a compacted index would be the next step.

Example:
    >>> index = AnswerIndex.load(storage, exclude="2026-11-24")
    >>> index.find(["0f3a...", "77c1..."])
    [('2026-11-23', 1, 'req-...'), None]
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import BatchStorage, encode_partition

__all__ = ["ANSWERS", "AnswerIndex", "answers_path", "body_hashes", "write_answers"]

logger = logging.getLogger(__name__)

ANSWERS = "answers"
_FILE = "answers.parquet"
_ENTRY_RE = re.compile(r"^partition=([^/]+)/answers\.parquet$")
ANSWERS_SCHEMA = pa.schema(
    [
        pa.field("hash64", pa.uint64()),
        pa.field("body_hash", pa.string()),
        pa.field("partition_key", pa.string()),
        pa.field("attempt", pa.int64()),
        pa.field("custom_id", pa.string()),
    ]
)
_ID_START = len(b'{"custom_id":"')


def answers_path(storage: BatchStorage, partition_key: str | None) -> Any:
    """``<root>/<name>/answers/partition=<key>/answers.parquet``."""
    return storage.segment_dir(ANSWERS, encode_partition(partition_key)) / _FILE


def body_hashes(whole: bytes, bounds: Sequence[int]) -> list[str]:
    """The hash of each request line of ``whole`` (lines between ``bounds``) without its
    ``custom_id``: the same request body in any partition has the same body hash."""
    sha256 = hashlib.sha256
    out = []
    for a, b in itertools.pairwise(bounds):
        end = whole.index(b'"', a + _ID_START)  # a custom_id holds no quote
        out.append(sha256(whole[end + 1 : b]).hexdigest()[:32])
    return out


def _hash64(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The first 64 bits of hex body hashes, as unsigned integers."""
    values = hashes.to_pylist() if not isinstance(hashes, list) else hashes
    return np.array([int(h[:16], 16) for h in values], dtype=np.uint64)


def write_answers(
    storage: BatchStorage, partition_key: str | None, answered: pa.Table
) -> None:
    """Write the partition's answered requests (``body_hash``, ``custom_id``, ``attempt``)."""
    n = answered.num_rows
    table = pa.table(
        {
            "hash64": pa.array(_hash64(answered.column("body_hash")), pa.uint64()),
            "body_hash": answered.column("body_hash").cast(pa.string()),
            "partition_key": pa.array([partition_key] * n, pa.string()),
            "attempt": answered.column("attempt").cast(pa.int64()),
            "custom_id": answered.column("custom_id").cast(pa.string()),
        },
        schema=ANSWERS_SCHEMA,
    )
    storage.write_table(answers_path(storage, partition_key), table)


@dataclass
class AnswerIndex:
    """Every other partition's answered body hashes, sorted, for lookups during prepare."""

    storage: BatchStorage
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    files: list[Any] = field(default_factory=list)  # UPaths
    partitions: int = 0
    _cache: dict[int, pa.Table] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, storage: BatchStorage, exclude: str | None) -> AnswerIndex:
        """The index of every partition's answers but ``exclude``'s (its own are carried
        by the partition's usual carry)."""
        folder = storage.base / ANSWERS
        own = encode_partition(exclude)
        names = [
            n
            for n in storage.list_files(folder)
            if (m := _ENTRY_RE.match(n)) and m.group(1) != own
        ]
        index = cls(storage)
        if not names:
            return index
        paths = [folder / n for n in sorted(names)]
        raw = storage.read_many(paths)
        keys, where = [], []
        for path in paths:
            data = raw[str(path)]
            if isinstance(data, Exception):  # a file being rewritten: its answers wait
                logger.warning("cannot read answered requests %s: %s", path, data)
                continue
            column = pq.read_table(io.BytesIO(data), columns=["hash64"]).column("hash64")
            file_no = len(index.files)
            index.files.append(path)
            keys.append(column.to_numpy())
            where.append(
                np.stack(
                    [np.full(len(column), file_no, np.int64), np.arange(len(column))], axis=1
                )
            )
        if keys:
            all_keys = np.concatenate(keys)
            order = np.argsort(all_keys, kind="stable")
            index.keys, index.where = all_keys[order], np.concatenate(where)[order]
        index.partitions = len(index.files)
        return index

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, hashes: Sequence[str]) -> list[tuple[str, int, str] | None]:
        """For each body hash: (partition key, attempt, custom_id) of an answer, or None."""
        if not len(self.keys) or not hashes:
            return [None] * len(hashes)
        wanted = _hash64(list(hashes))
        first = np.searchsorted(self.keys, wanted, side="left")
        out: list[tuple[str, int, str] | None] = []
        for i, (h, start) in enumerate(zip(hashes, first.tolist(), strict=True)):
            found = None
            j = start
            while j < len(self.keys) and self.keys[j] == wanted[i]:
                file_no, row = (int(x) for x in self.where[j])
                table = self._file(file_no)
                if table.column("body_hash")[row].as_py() == h:  # the full hash, not 64 bits
                    found = (
                        table.column("partition_key")[row].as_py(),
                        int(table.column("attempt")[row].as_py()),
                        table.column("custom_id")[row].as_py(),
                    )
                    break
                j += 1
            out.append(found)
        return out

    def _file(self, file_no: int) -> pa.Table:
        if file_no not in self._cache:
            table = self.storage.read_table(self.files[file_no])
            self._cache[file_no] = table.combine_chunks()
        return self._cache[file_no]
