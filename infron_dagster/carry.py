"""CARRY: what a new attempt need not send, because a paid-for answer to the same request exists.

*Carry* is this package's one word for it: a carried row is not sent; its answer is read,
at collection, from where it was paid for. Before a submission prepares its requests, it
asks three places, in this order (``prepare_requests`` takes the three answers):

- :func:`carry_succeeded`: the partition's collected results (its own earlier attempts);
- :func:`carry_in_flight`: the partition's attempts still in flight (the new attempt waits
  for their batches, ``on_changed_input_in_flight="carry"``);
- :class:`CarryIndex`: every other partition's answers, by body hash
  (``reuse_answers="pipeline"``; the files it reads are in :mod:`~infron_dagster.carry_cache`).

Collection reads the carried answers back (:mod:`~infron_dagster.merge`).

Example::

    succeeded = carry_succeeded(storage, "2026-11-24")     # custom_id -> (hash, attempt)
    in_flight = carry_in_flight(storage, "2026-11-24")     # InFlightCarry
    elsewhere = CarryIndex.load(storage, exclude="2026-11-24")
    elsewhere.find(["0f3a...", "77c1..."])
    # -> [('2026-11-23', 1, 'req-...'), None]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .carry_cache import answer_files, hash64, parse_answers
from .columns import CARRIED_FROM, CUSTOM_ID, REQUEST_HASH
from .history import active_attempts
from .manifest import Manifest, load_manifests
from .provider import LOCAL, mock_for
from .storage import BatchStorage
from .untrusted import printable

__all__ = [
    "CarryIndex",
    "InFlightCarry",
    "carry_attempt",
    "carry_in_flight",
    "carry_succeeded",
]

logger = logging.getLogger(__name__)


def carry_succeeded(
    storage: BatchStorage, partition_key: str | None, provider: str | None = None
) -> dict[str, tuple[str, int]]:
    """custom_id -> (request hash, attempt) of every request the partition's collected
    results answered: what a new attempt need not pay for again if its request is unchanged.
    With ``provider`` (the API the new attempt sends to), answers of attempts the local
    mock server gave are left out when it is a real one (:mod:`~infron_dagster.provider`).

    Example::

        carry_succeeded(storage, "2026-11-24")
        # -> {'req-1f0c...': ('9a1e...', 1), ...}   ({} before the first collection)
    """
    # The results table holds only collected, paid-for answers, whatever is in flight now.
    results_path = storage.table_path("results", partition_key)
    if not storage.exists(results_path):
        return {}
    results = storage.read_table(results_path).select([CUSTOM_ID, "attempt"]).to_pylist()
    attempts = {row["attempt"] for row in results}
    if mock_for(LOCAL, provider):  # a real API: the local server's answers are mock
        manifests = load_manifests(storage, partition_key)
        attempts -= {m.attempt for m in manifests if mock_for(m.provider, provider)}
    hashes: dict[tuple[int, str], str] = {}
    for attempt in attempts:
        snapshot = storage.read_table(storage.attempt_file("inputs", partition_key, attempt))
        if REQUEST_HASH in snapshot.column_names:
            ids = snapshot.column(CUSTOM_ID).to_pylist()
            for cid, h in zip(ids, snapshot.column(REQUEST_HASH).to_pylist(), strict=True):
                hashes[(attempt, cid)] = h
    return {
        row[CUSTOM_ID]: (hashes[(row["attempt"], row[CUSTOM_ID])], row["attempt"])
        for row in results
        if (row["attempt"], row[CUSTOM_ID]) in hashes
    }


@dataclass
class InFlightCarry:
    """The requests a partition's uncollected attempts sent and are still being paid for.

    ``requests`` maps custom_id -> (request hash, attempt); ``attempts`` holds those attempts'
    manifests (a new attempt that carries from one waits for its batches).

    Example::

        running = carry_in_flight(storage, "2026-11-24")
        running.requests["req-1f0c..."]     # -> ('9a1e...', 2)
        running.waits_on({2: 40})           # -> [{'attempt': 2, 'batch_ids': [...], 'rows': 40}]
    """

    requests: dict[str, tuple[str, int]] = field(default_factory=dict)
    attempts: dict[int, Manifest] = field(default_factory=dict)

    def waits_on(self, used: dict[int, int]) -> list[dict[str, Any]]:
        """The manifest's ``waits_on`` for the source attempts a preparation used."""
        return [
            {"attempt": a, "batch_ids": list(self.attempts[a].batch_ids), "rows": used[a]}
            for a in sorted(used)
            if a in self.attempts
        ]


def carry_in_flight(
    storage: BatchStorage, partition_key: str | None, provider: str | None = None
) -> InFlightCarry:
    """What the partition's uncollected attempts sent: the latest initial attempt and its
    retries, and the in-flight attempts they themselves wait on. Of an attempt whose chunks
    are only partly created (the rest wait for admission), the rows of its created chunks
    count: they are paid for; the rest were never sent and a new attempt sends them. An
    attempt sent to the local mock server counts for none when ``provider`` is a real API.

    (:class:`InFlightCarry` shows what it returns.)
    """
    manifests = load_manifests(storage, partition_key)
    by_attempt = {m.attempt: m for m in manifests}
    wanted: set[int] = set()
    for manifest in active_attempts(manifests):
        if manifest.state != "collected":
            wanted.add(manifest.attempt)
            wanted.update(int(w["attempt"]) for w in manifest.waits_on)
    found = InFlightCarry()
    for attempt in sorted(wanted):
        source = by_attempt.get(attempt)
        if source is None or source.state not in ("submitting", "submitted"):
            continue
        if mock_for(source.provider, provider):
            continue  # mock answers never stand for a real API's
        if not source.batch_ids:
            continue  # nothing of it was created: nothing to wait for
        snapshot = _sent_hashes(storage, partition_key, attempt)
        if snapshot is None:
            continue  # written before request hashes: nothing can be matched
        snapshot = _created_rows(snapshot, source)
        ids = snapshot.column(CUSTOM_ID).to_pylist()
        hashes = snapshot.column(REQUEST_HASH).to_pylist()
        found.requests.update(zip(ids, ((h, attempt) for h in hashes), strict=True))
        found.attempts[attempt] = source
    return found


def carry_attempt(
    storage: BatchStorage, partition_key: str | None, source: Manifest
) -> InFlightCarry:
    """Every request an attempt sent itself (the rows of its created chunks), whatever
    its outcome: a new attempt that carries them takes their outcomes as they are (the
    attempt that follows a pilot batch sends none of the pilot's rows again, answered or
    failed; input that went back to an attempt whose other chunks were never created sends
    none of its created chunks' rows again). The new attempt names ``source`` in its
    ``waits_on``, which is what makes collection keep its failures.

    Example::

        carry_attempt(storage, "2026-11-24", pilot).requests["req-1f0c..."]
        # -> ('9a1e...', 1)
    """
    found = InFlightCarry()
    snapshot = _sent_hashes(storage, partition_key, source.attempt)
    if snapshot is None or not source.batch_ids:
        return found
    snapshot = _created_rows(snapshot, source)
    ids = snapshot.column(CUSTOM_ID).to_pylist()
    hashes = snapshot.column(REQUEST_HASH).to_pylist()
    found.requests.update(zip(ids, ((h, source.attempt) for h in hashes), strict=True))
    found.attempts[source.attempt] = source
    return found


def _sent_hashes(storage: BatchStorage, partition_key: str | None, attempt: int) -> pa.Table | None:
    """The custom_ids and request hashes an attempt sent itself (not those it carried);
    None for a snapshot written before request hashes."""
    with storage.attempt_file("inputs", partition_key, attempt).open("rb") as fh:
        names = pq.ParquetFile(fh).schema_arrow.names
        if REQUEST_HASH not in names:
            return None
        columns = [CUSTOM_ID, REQUEST_HASH] + ([CARRIED_FROM] if CARRIED_FROM in names else [])
        fh.seek(0)
        snapshot = pq.read_table(fh, columns=columns)
    if CARRIED_FROM in snapshot.column_names:  # only what it sent itself
        snapshot = snapshot.filter(snapshot.column(CARRIED_FROM).is_null())
    return snapshot


def _created_rows(sent: pa.Table, manifest: Manifest) -> pa.Table:
    """The rows (in chunk order, as sent) of the chunks that have a batch."""
    if manifest.fully_submitted:
        return sent
    keep = np.zeros(sent.num_rows, bool)
    start = 0
    for chunk in manifest.chunks:
        if chunk.batch_id:
            keep[start : start + chunk.requests] = True
        start += chunk.requests
    return sent.filter(pa.array(keep))


@dataclass
class CarryIndex:
    """Every other partition's answered body hashes, sorted, for lookups during prepare.

    It loads only the ``hash64`` column of every partition's answers file (one listing, then
    concurrent reads) into one sorted numpy array (8 bytes per answered request, plus 8 to
    find the file and row again). A candidate is confirmed against the full 128-bit hash,
    read from its partition's file (cached per file), so a 64-bit collision never carries a
    wrong answer; and it is carried only while its attempt's manifest, ``batches.json`` and
    every result file it lists exist (checked once per source attempt: two GETs and one
    LIST), else it is sent.

    Example::

        index = CarryIndex.load(storage, exclude="2026-11-24")
        len(index), index.partitions                  # -> (1800, 3)
        index.find(["0f3a...", "77c1..."])
        # -> [('2026-11-23', 1, 'req-...'), None]
    """

    storage: BatchStorage
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    files: list[Any] = field(default_factory=list)  # UPaths
    partitions: int = 0
    _cache: dict[int, pa.Table | None] = field(default_factory=dict, repr=False)
    _alive: dict[tuple[str | None, int], bool] = field(default_factory=dict, repr=False)
    # The API the new attempt sends to: answers the local mock server gave are not reused
    # when it is a real one (``mock``: the partitions whose answers were left out for that).
    provider: str | None = None
    mock: set[str | None] = field(default_factory=set)

    @classmethod
    def load(
        cls, storage: BatchStorage, exclude: str | None, provider: str | None = None
    ) -> CarryIndex:
        """The index of every partition's answers but ``exclude``'s (its own are carried
        by :func:`carry_succeeded`). An unreadable file is skipped, with a warning naming
        it: its answers are sent again until its partition's next collection rebuilds it.
        With ``provider`` a real API, no answer of the local mock server is found."""
        index = cls(storage, provider=provider)
        paths = answer_files(storage, exclude)
        if not paths:
            return index
        raw = storage.read_many(paths)
        keys, where = [], []
        for path in paths:
            column = _hash_column(path, raw[str(path)])
            if column is None:
                continue
            file_no = len(index.files)
            index.files.append(path)
            keys.append(column.to_numpy())
            rows = np.arange(len(column))
            where.append(np.stack([np.full(len(column), file_no, np.int64), rows], axis=1))
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
        wanted = hash64(list(hashes))
        first = np.searchsorted(self.keys, wanted, side="left")
        return [
            self._first_alive(h, key, start)
            for h, key, start in zip(hashes, wanted, first.tolist(), strict=True)
        ]

    def _first_alive(self, h: str, key: np.uint64, j: int) -> tuple[str, int, str] | None:
        """The first answer to body hash ``h`` (64 bits ``key``, from index ``j`` on)
        whose attempt still has its files."""
        while j < len(self.keys) and self.keys[j] == key:
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
                return candidate
        return None

    def _file(self, file_no: int) -> pa.Table | None:
        if file_no not in self._cache:
            path = self.files[file_no]
            try:
                reader, _ = parse_answers(self.storage.fresh(path).read_bytes())
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
            manifest = _attempt_manifest(self.storage, partition_key, attempt)
            mock = manifest is not None and mock_for(manifest.get("provider"), self.provider)
            if mock:
                self.mock.add(partition_key)
            alive = manifest is not None and not mock
            self._alive[key] = alive and _attempt_files_exist(
                self.storage, partition_key, attempt, manifest
            )
        return self._alive[key]


def _hash_column(path: Any, data: bytes | Exception) -> pa.ChunkedArray | None:
    """The ``hash64`` column of one answers file; None (with a warning) when unreadable."""
    try:
        if isinstance(data, Exception):
            raise data
        reader, _ = parse_answers(data)
        return reader.read(columns=["hash64"]).column("hash64")
    except FileNotFoundError:
        return None  # deleted since the listing: nothing to reuse from there
    except Exception as exc:
        logger.warning(
            "answers file %s is unreadable (%s): its answers are not reused (sent "
            "again) until its partition is collected again and rebuilds it",
            path,
            printable(str(exc), 200),
        )
        return None


def _attempt_manifest(
    storage: BatchStorage, partition_key: str | None, attempt: int
) -> dict[str, Any] | None:
    """An attempt's manifest as stored now; None (logged) when it is gone or unreadable."""
    try:
        data = json.loads(storage.fresh(storage.manifest_path(partition_key, attempt)).read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except Exception as exc:
        logger.info(
            "answers of partition %r attempt %d are not reused (its manifest cannot be read: "
            "%s): sent again",
            partition_key,
            attempt,
            printable(str(exc), 200),
        )
        return None


def _attempt_files_exist(
    storage: BatchStorage, partition_key: str | None, attempt: int, manifest: dict[str, Any]
) -> bool:
    raw = storage.attempt_dir("raw", partition_key, attempt)
    try:
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
