"""Pay once across partitions (``reuse_answers="pipeline"``): where a request body was answered.

A request's *body hash* is the hash of its request line without the ``custom_id`` (which is
derived from the partition, so the same prompt in two partitions is two different lines).
Collection keeps, per partition, a small Parquet file of the requests that partition's own
attempts answered successfully::

    <root>/<name>/answers/partition=<key>/answers.parquet
        hash64 (uint64), body_hash, partition_key, attempt, custom_id
        schema metadata: the attempts whose every answer it lists

The file is a cache of what the manifests and result files say. Each collection of the
partition adds its answers and keeps the earlier entries whose attempt still has its result
files (a question the partition no longer asks was still answered, and stays reusable); an
attempt with result files that the file does not cover (an unreadable or old-layout file, an
attempt replaced while in flight) is read back from its result files once. An unreadable
file is skipped by readers, with a warning naming it: its answers are sent again, never
fail a submission.

A submission with ``reuse_answers="pipeline"`` loads only the ``hash64`` column of every
partition's file (one listing, then concurrent reads), keeps it as one sorted numpy array
(8 bytes per answered request, plus 8 to find the file and row again), and looks up each
slice's body hashes in it. A candidate is confirmed against the full 128-bit hash, read from
its partition's file (cached per file), so a 64-bit collision never carries a wrong answer;
and it is carried only while its attempt's manifest, ``batches.json`` and every result file
it lists exist (checked once per source attempt: two GETs and one LIST), else it is sent.

Why this shape: the files are written where the answers are made (collection, under the
partition's lock), so there is no shared index to lock or compact. The cost of a lookup is
one LIST and one GET per collected partition (concurrent), however many attempts each had,
plus the check of each source attempt actually used, and 16 bytes of memory per answered
request in the pipeline: a year of daily partitions is ~365 GETs. Far beyond that (hundreds
of thousands of partitions) a compacted index would be the next step.

Example::

    index = AnswerIndex.load(storage, exclude="2026-11-24")
    index.find(["0f3a...", "77c1..."])
    # -> [('2026-11-23', 1, 'req-...'), None]
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import BatchStorage, encode_partition
from .untrusted import printable

__all__ = [
    "ANSWERS",
    "AnswerIndex",
    "answers_path",
    "body_hashes",
    "read_answers",
    "write_answers",
]

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
# Schema metadata: the attempts whose every answer the file lists (JSON list of ints)
COVERED = b"infron_answers_complete_attempts"


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


def _parse(data: bytes) -> tuple[pq.ParquetFile, set[int]]:
    """An answers file's reader and the attempts it covers; ValueError (or Arrow's error)
    when it is not an answers file: not Parquet, truncated, or another schema."""
    reader = pq.ParquetFile(io.BytesIO(data))
    schema = reader.schema_arrow
    for expected in ANSWERS_SCHEMA:
        index = schema.get_field_index(expected.name)
        if index < 0 or schema.field(index).type != expected.type:
            raise ValueError(f"not an answers file: column {expected.name} ({expected.type})")
    covered = json.loads((schema.metadata or {}).get(COVERED, b"[]"))
    if not isinstance(covered, list) or not all(type(a) is int for a in covered):
        raise ValueError(f"not an answers file: {COVERED.decode()} is {covered!r}")
    return reader, set(covered)


def read_answers(storage: BatchStorage, partition_key: str | None) -> tuple[pa.Table, set[int]]:
    """A partition's answers and the attempts the file lists every answer of (a file of the
    old layout lists none). A missing file is empty; an unreadable one too, with a warning
    naming it (the caller rebuilds it from the manifests and result files)."""
    path = answers_path(storage, partition_key)
    try:
        data = storage.fresh(path).read_bytes()
    except FileNotFoundError:
        return ANSWERS_SCHEMA.empty_table(), set()
    try:
        reader, covered = _parse(data)
        table = reader.read(columns=ANSWERS_SCHEMA.names).select(ANSWERS_SCHEMA.names)
        return table.replace_schema_metadata(None).cast(ANSWERS_SCHEMA), covered
    except Exception as exc:
        logger.warning(
            "answers file %s is unreadable (%s): it is a cache, rebuilt from the manifests "
            "and result files",
            path,
            printable(str(exc), 200),
        )
        return ANSWERS_SCHEMA.empty_table(), set()


def write_answers(
    storage: BatchStorage,
    partition_key: str | None,
    answered: pa.Table,
    *,
    complete: Iterable[int] = (),
    attempts: Sequence[int] | None = None,
    rebuild: Callable[[int], pa.Table | None] | None = None,
) -> None:
    """Add answered requests (``body_hash``, ``custom_id``, ``attempt``) to the partition's
    file, keeping every earlier entry whose attempt still has its result files.

    ``complete``: the attempts ``answered`` lists every answer of. ``attempts``: those with
    result files on storage (None: only ``answered`` is written, as it is). ``rebuild(n)``:
    the answers of attempt ``n``, read from its result files, for an attempt that has
    them but is not in the file yet (an unreadable or old-layout file, an attempt replaced
    while in flight); None when it cannot be read now (tried again at the next collection).
    """
    complete = set(complete)
    parts = [_entries(answered, partition_key)]
    if attempts is not None:
        live = set(attempts)
        old, covered = read_answers(storage, partition_key)
        keep = pc.is_in(old.column("attempt"), value_set=pa.array(sorted(live), pa.int64()))
        parts.append(old.filter(keep))
        complete |= covered & live
        for attempt in sorted(live - complete):
            found = rebuild(attempt) if rebuild is not None else None
            if found is not None:
                parts.append(_entries(found, partition_key))
                complete.add(attempt)
    table = _distinct(pa.concat_tables(parts))
    metadata = {COVERED: json.dumps(sorted(complete)).encode()}
    storage.write_table(
        answers_path(storage, partition_key), table.replace_schema_metadata(metadata)
    )


def _entries(answered: pa.Table, partition_key: str | None) -> pa.Table:
    answered = answered.filter(answered.column("body_hash").is_valid())
    n = answered.num_rows
    return pa.table(
        {
            "hash64": pa.array(_hash64(answered.column("body_hash")), pa.uint64()),
            "body_hash": answered.column("body_hash").cast(pa.string()),
            "partition_key": pa.array([partition_key] * n, pa.string()),
            "attempt": answered.column("attempt").cast(pa.int64()),
            "custom_id": answered.column("custom_id").cast(pa.string()),
        },
        schema=ANSWERS_SCHEMA,
    )


def _distinct(table: pa.Table) -> pa.Table:
    """Each (attempt, custom_id) once, sorted by hash (the readers sort anyway)."""
    if not table.num_rows:
        return table
    table = table.take(
        pc.sort_indices(table, [("attempt", "ascending"), ("custom_id", "ascending")])
    )
    ids = table.column("custom_id").combine_chunks()
    attempts = table.column("attempt").combine_chunks()
    first = np.ones(table.num_rows, bool)
    if table.num_rows > 1:
        same = pc.and_(
            pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)),
            pc.equal(attempts.slice(1), attempts.slice(0, len(attempts) - 1)),
        )
        first[1:] = ~same.to_numpy(zero_copy_only=False)
    table = table.filter(pa.array(first))
    return table.take(pc.sort_indices(table, [("hash64", "ascending")]))


@dataclass
class AnswerIndex:
    """Every other partition's answered body hashes, sorted, for lookups during prepare."""

    storage: BatchStorage
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    files: list[Any] = field(default_factory=list)  # UPaths
    partitions: int = 0
    _cache: dict[int, pa.Table | None] = field(default_factory=dict, repr=False)
    _alive: dict[tuple[str | None, int], bool] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, storage: BatchStorage, exclude: str | None) -> AnswerIndex:
        """The index of every partition's answers but ``exclude``'s (its own are carried
        by the partition's usual carry). An unreadable file is skipped, with a warning
        naming it: its answers are sent again until its partition's next collection
        rebuilds it."""
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
            try:
                if isinstance(data, Exception):
                    raise data
                reader, _ = _parse(data)
                column = reader.read(columns=["hash64"]).column("hash64")
            except FileNotFoundError:
                continue  # deleted since the listing: nothing to reuse from there
            except Exception as exc:
                logger.warning(
                    "answers file %s is unreadable (%s): its answers are not reused (sent "
                    "again) until its partition is collected again and rebuilds it",
                    path,
                    printable(str(exc), 200),
                )
                continue
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
        """For each body hash: (partition key, attempt, custom_id) of an answer whose
        attempt still has its result files, or None (the request is sent)."""
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
                j += 1
                table = self._file(file_no)
                if table is None or row >= table.num_rows:
                    continue  # rewritten or gone since the index was loaded
                if table.column("body_hash")[row].as_py() != h:  # the full hash, not 64 bits
                    continue
                candidate = (
                    table.column("partition_key")[row].as_py(),
                    int(table.column("attempt")[row].as_py()),
                    table.column("custom_id")[row].as_py(),
                )
                if self._answers_exist(candidate[0], candidate[1]):
                    found = candidate
                    break
            out.append(found)
        return out

    def _file(self, file_no: int) -> pa.Table | None:
        if file_no not in self._cache:
            path = self.files[file_no]
            try:
                reader, _ = _parse(self.storage.fresh(path).read_bytes())
                self._cache[file_no] = reader.read().combine_chunks()
            except Exception as exc:
                logger.warning("answers file %s is unreadable now: %s", path, exc)
                self._cache[file_no] = None
        return self._cache[file_no]

    def _answers_exist(self, partition_key: str | None, attempt: int) -> bool:
        """Whether an attempt's answers can still be read where collection reads them: its
        manifest, its ``batches.json`` and every result file it lists (files are written
        once, when downloaded: one that exists still holds the answer listed). Once per
        source attempt: two GETs and one LIST."""
        key = (partition_key, attempt)
        if key not in self._alive:
            self._alive[key] = _attempt_files_exist(self.storage, partition_key, attempt)
        return self._alive[key]


def _attempt_files_exist(storage: BatchStorage, partition_key: str | None, attempt: int) -> bool:
    raw = storage.attempt_dir("raw", partition_key, attempt)
    manifest_path = storage.manifest_path(partition_key, attempt)
    try:
        manifest = json.loads(storage.fresh(manifest_path).read_bytes())
        batches = json.loads(storage.fresh(raw / "batches.json").read_bytes())
        listed = storage.list_files(raw)
        prefix = storage.relative(raw) + "/"
        present = {prefix + name for name in listed}
        for chunk in manifest.get("chunks") or []:
            batch_id = chunk.get("batch_id")
            if batch_id and batch_id not in batches:
                raise FileNotFoundError(f"batch {batch_id} has no downloaded files")
        for info in batches.values():
            for rel in info.get("files") or []:
                if rel not in present:
                    raise FileNotFoundError(rel)
    except Exception as exc:
        logger.info(
            "answers of partition %r attempt %d are not reused (their files are gone: %s): "
            "sent again",
            partition_key,
            attempt,
            printable(str(exc), 200),
        )
        return False
    return True
