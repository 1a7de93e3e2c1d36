"""The retry queue: collected partitions whose retryable failures the sensor retries itself.

With ``auto_retry``, a collection that leaves retryable failed rows while attempts remain
writes a marker ``<base>/retries/partition=<p>/attempt=<n>.json`` saying when the retry is
due (the backoff after attempt ``n``). Each sensor tick lists that folder once (what it
costs follows the partitions waiting for a retry, not the lake's history) and requests the
retry run of every due partition whose latest attempt is still the marker's, collected.

The manifests stay the truth; a marker is a cache: one whose attempt is no longer the
partition's latest (a retry was submitted, by the sensor or by a person, or the input
changed) is dropped, and the marker is written before the collection's commit point, so a
collection killed in between is collected again and its marker is still there.

Example::

    queue = RetryQueue(storage)
    queue.mark("2026-11-24", attempt=1, due_at=time.time() + 600, rows=12)
    [m.partition_key for m in queue.due(time.time() + 601)]   # ['2026-11-24']
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .manifest import now_iso
from .storage import BatchStorage, encode_partition

__all__ = ["DEFAULT_BACKOFF_SECONDS", "QueuedRetry", "RetryQueue", "retry_delay"]

QUEUE = "retries"
# Before attempt 2, before attempt 3 (and every later one): long enough for a provider's
# bad hour to pass, short enough to converge the same night.
DEFAULT_BACKOFF_SECONDS = (600.0, 1800.0)
_MARKER_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")


def retry_delay(backoff: Sequence[float], attempts: int) -> float:
    """Seconds to wait after ``attempts`` attempts before the next one.

    Example:
        >>> retry_delay((600.0, 1800.0), 1), retry_delay((600.0, 1800.0), 5)
        (600.0, 1800.0)
    """
    if not backoff:
        return 0.0
    return float(backoff[min(max(attempts, 1), len(backoff)) - 1])


@dataclass(frozen=True)
class QueuedRetry:
    """One partition waiting for its automatic retry."""

    segment: str
    partition_key: str | None
    attempt: int
    due_at: float
    rows: int


class RetryQueue:
    """Markers of partitions whose retryable failed rows wait for an automatic retry.

    Example::

        RetryQueue(storage).due(time.time())   # what the sensor retries this tick
    """

    def __init__(self, storage: BatchStorage) -> None:
        self.storage = storage

    def _path(self, segment: str, attempt: int):
        return self.storage.segment_dir(QUEUE, segment) / f"attempt={attempt}.json"

    def mark(self, partition_key: str | None, attempt: int, due_at: float, rows: int) -> None:
        """Queue the retry of ``attempt``'s retryable rows, due at ``due_at`` (UNIX time)."""
        body = {
            "partition_key": partition_key,
            "attempt": attempt,
            "due_at": float(due_at),
            "rows": int(rows),
            "marked_at": now_iso(),
        }
        self.storage.write_json(self._path(encode_partition(partition_key), attempt), body)

    def drop(self, retry: QueuedRetry) -> None:
        """Forget one queued retry (it was requested, replaced or cannot run)."""
        self.storage.delete(self._path(retry.segment, retry.attempt))

    def queued(self) -> list[QueuedRetry]:
        """Every queued retry: one listing, then a read of each marker. A marker that cannot
        be read is dropped (the collection of its partition writes it again)."""
        names = self.storage.list_files(self.storage.base / QUEUE)
        found = [(m.group(1), int(m.group(2))) for n in names if (m := _MARKER_RE.match(n))]
        paths = {key: self._path(*key) for key in found}
        raw = self.storage.read_many(paths.values())
        queued = []
        for (segment, attempt), path in paths.items():
            retry = _parse(segment, attempt, raw[str(path)])
            if retry is None:
                self.storage.delete(path)
                continue
            queued.append(retry)
        return sorted(queued, key=lambda r: (r.due_at, r.segment))

    def due(self, now: float) -> list[QueuedRetry]:
        """The queued retries whose time has come, the oldest first."""
        return [r for r in self.queued() if r.due_at <= now]


def _parse(segment: str, attempt: int, data: bytes | Exception) -> QueuedRetry | None:
    if isinstance(data, Exception):
        return None
    try:
        body = json.loads(data)
        key = body["partition_key"]
        if (key is not None and not isinstance(key, str)) or encode_partition(key) != segment:
            return None
        return QueuedRetry(segment, key, attempt, float(body["due_at"]), int(body["rows"]))
    except (ValueError, KeyError, TypeError):
        return None
