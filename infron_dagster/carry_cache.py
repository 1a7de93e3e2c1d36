"""The carry cache: per partition, the requests its own attempts answered, by body hash.

*Carry* is this package's word for a row that is not sent because a paid-for answer to the
same request exists: in an earlier collected attempt, in an attempt still in flight, or (with
``reuse_answers="pipeline"``) in another partition. This module holds the files that make the
last one cheap to look up (:mod:`~infron_dagster.carry` does the looking up).

A request's *body hash* is the hash of its request line without the ``custom_id`` (which is
derived from the partition, so the same prompt in two partitions is two different lines).
Collection keeps, per partition, a small Parquet file of the requests that partition's own
attempts answered successfully (the storage layout predates the word; it stays)::

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

Why this shape: the files are written where the answers are made (collection, under the
partition's lock), so there is no shared index to lock or compact. The cost of a lookup is
one LIST and one GET per collected partition (concurrent), however many attempts each had:
a year of daily partitions is ~365 GETs. Far beyond that (hundreds of thousands of
partitions) a compacted index would be the next step.

Example:
    >>> import tempfile
    >>> from infron_dagster import BatchStorage
    >>> storage = BatchStorage(tempfile.mkdtemp(), "reviews")
    >>> answers_path(storage, "2026-11-24").parts[-3:]
    ('answers', 'partition=2026-11-24', 'answers.parquet')
    >>> read_answers(storage, "2026-11-24")[0].num_rows  # none yet
    0
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import BatchStorage, encode_partition
from .untrusted import printable

__all__ = [
    "ANSWERED_SCHEMA",
    "ANSWERS",
    "ANSWERS_SCHEMA",
    "answer_files",
    "answers_path",
    "body_hashes",
    "hash64",
    "parse_answers",
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
# What collection adds to a partition's file (see :func:`write_answers`)
ANSWERED_SCHEMA = pa.schema(
    [("body_hash", pa.string()), ("custom_id", pa.string()), ("attempt", pa.int64())]
)


def answers_path(storage: BatchStorage, partition_key: str | None) -> Any:
    """``<root>/<name>/answers/partition=<key>/answers.parquet`` (see the module's example)."""
    return storage.segment_dir(ANSWERS, encode_partition(partition_key)) / _FILE


def answer_files(storage: BatchStorage, exclude: str | None) -> list[Any]:
    """Every partition's answers file but ``exclude``'s, sorted (one LIST).

    Example::

        answer_files(storage, exclude="2026-11-24")
        # -> [UPath('.../answers/partition=2026-11-23/answers.parquet')]
    """
    folder = storage.base / ANSWERS
    own = encode_partition(exclude)
    names = [
        n for n in storage.list_files(folder) if (m := _ENTRY_RE.match(n)) and m.group(1) != own
    ]
    return [folder / n for n in sorted(names)]


def body_hashes(whole: bytes, bounds: Sequence[int]) -> list[str]:
    """The hash of each request line of ``whole`` (lines between ``bounds``) without its
    ``custom_id``: the same request body in any partition has the same body hash.

    Example:
        >>> lines = [b'{"custom_id":"a-1","body":1}\\n', b'{"custom_id":"b-7","body":1}\\n']
        >>> bounds = [0, len(lines[0]), len(lines[0]) + len(lines[1])]
        >>> first, second = body_hashes(b"".join(lines), bounds)
        >>> first == second, len(first)
        (True, 32)
    """
    sha256 = hashlib.sha256
    out = []
    for a, b in itertools.pairwise(bounds):
        end = whole.index(b'"', a + _ID_START)  # a custom_id holds no quote
        out.append(sha256(whole[end + 1 : b]).hexdigest()[:32])
    return out


def hash64(hashes: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """The first 64 bits of hex body hashes, as unsigned integers (the cache's sort key).

    Example:
        >>> hash64(["00000000000000ff" + "0" * 16]).tolist()
        [255]
    """
    values = hashes.to_pylist() if not isinstance(hashes, list) else hashes
    return np.array([int(h[:16], 16) for h in values], dtype=np.uint64)


def parse_answers(data: bytes) -> tuple[pq.ParquetFile, set[int]]:
    """An answers file's reader and the attempts it covers; ValueError (or Arrow's error)
    when it is not an answers file: not Parquet, truncated, or another schema.

    Example::

        reader, covered = parse_answers(answers_path(storage, "a").read_bytes())
        reader.metadata.num_rows, covered
        # -> (20, {1, 2})
    """
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
    naming it (the caller rebuilds it from the manifests and result files).

    (The module's example reads one.)
    """
    path = answers_path(storage, partition_key)
    try:
        data = storage.fresh(path).read_bytes()
    except FileNotFoundError:
        return ANSWERS_SCHEMA.empty_table(), set()
    try:
        reader, covered = parse_answers(data)
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

    Example::

        answered = pa.table({"body_hash": ["0f3a..."], "custom_id": ["a-1"], "attempt": [1]})
        write_answers(storage, "a", answered, complete=[1])
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
            "hash64": pa.array(hash64(answered.column("body_hash")), pa.uint64()),
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
