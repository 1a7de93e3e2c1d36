"""The retry queue: collected partitions whose retryable failures the sensor retries itself.

With ``auto_retry``, a collection that leaves retryable failed rows while attempts remain
writes a marker ``<base>/retries/partition=<p>/attempt=<n>.json`` saying when the retry is
due (the backoff after attempt ``n``). Each sensor tick lists that folder once (what it
costs follows the partitions waiting for a retry, not the lake's history) and requests the
retry run of every due partition whose latest attempt is still the marker's, collected.

The manifests stay the truth; a marker is a cache: one whose attempt is no longer the
partition's latest (a retry was submitted, by the sensor or by a person, or the input
changed) is dropped, and the marker is written before the collection's commit point, so a
collection killed in between is collected again and its marker is still there. A marker
that cannot be read (truncated, not JSON, another partition's body) is rebuilt from the
manifest of the attempt its path names, due at once, with a warning naming the file: the
collection that wrote it does not run again, so deleting it would strand the partition.
A marker that is missing (deleted by hand, lost in a partial sync) is written again by the
sensor when its in-flight index reads every manifest (``auto_retry.restore_missing``, via
``restore``), due at once, with a warning naming the partition.

Example::

    queue = RetryQueue(storage)
    queue.mark("2026-11-24", attempt=1, due_at=time.time() + 600, rows=12)
    [m.partition_key for m in queue.due(time.time() + 601)]   # ['2026-11-24']
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from upath import UPath

from .manifest import Manifest, now_iso
from .storage import BatchStorage, encode_partition
from .untrusted import printable

__all__ = ["DEFAULT_BACKOFF_SECONDS", "QueuedRetry", "RetryQueue", "retry_delay"]

QUEUE = "retries"
# Before attempt 2, before attempt 3 (and every later one): long enough for a provider's
# bad hour to pass, short enough to converge the same night.
DEFAULT_BACKOFF_SECONDS = (600.0, 1800.0)
_MARKER_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")

logger = logging.getLogger(__name__)


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
    """One partition waiting for its automatic retry (``rows`` 0: not known, the marker
    was rebuilt)."""

    segment: str
    partition_key: str | None
    attempt: int
    due_at: float
    rows: int


class RetryQueue:
    """Markers of partitions whose retryable failed rows wait for an automatic retry.

    ``log`` gets a warning naming each marker that cannot be read (the sensor's log).

    Example::

        RetryQueue(storage).due(time.time())   # what the sensor retries this tick
    """

    def __init__(self, storage: BatchStorage, log: logging.Logger | None = None) -> None:
        self.storage = storage
        self.log = log or logger

    def _path(self, segment: str, attempt: int) -> UPath:
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

    def restore(self, partition_key: str | None, attempt: int, rows: int) -> QueuedRetry:
        """Write again the lost marker of ``attempt`` (the caller checked the manifests
        say it is owed), due at once, with a warning naming the partition."""
        due_at = 0.0  # its backoff is lost too; see auto_retry.restore_missing for why now
        self.mark(partition_key, attempt, due_at, rows)
        self.log.warning(
            f"{self.storage.name} partition {printable(partition_key or '-', 100)}: the retry "
            f"marker of attempt {attempt} was missing ({rows} retryable failed row(s), "
            "attempts left): written again from the manifests, due now"
        )
        return QueuedRetry(encode_partition(partition_key), partition_key, attempt, due_at, rows)

    def queued(self) -> list[QueuedRetry]:
        """Every queued retry: one listing, then a read of each marker. A marker that cannot
        be read is rebuilt from its attempt's manifest (due now), or deleted when that
        attempt has no manifest; either way a warning names the file."""
        names = self.storage.list_files(self.storage.base / QUEUE)
        found = [(m.group(1), int(m.group(2))) for n in names if (m := _MARKER_RE.match(n))]
        paths = {key: self._path(*key) for key in found}
        raw = self.storage.read_many(paths.values())
        queued = []
        for (segment, attempt), path in paths.items():
            data = raw[str(path)]
            if isinstance(data, FileNotFoundError):
                continue  # dropped since the listing
            retry = _parse(segment, attempt, data)
            if isinstance(retry, str):
                retry = self._rebuild(segment, attempt, path, retry)
            if retry is not None:
                queued.append(retry)
        return sorted(queued, key=lambda r: (r.due_at, r.segment))

    def due(self, now: float) -> list[QueuedRetry]:
        """The queued retries whose time has come, the oldest first."""
        return [r for r in self.queued() if r.due_at <= now]

    def _rebuild(self, segment: str, attempt: int, path: UPath, problem: str) -> QueuedRetry | None:
        """A damaged marker written again from the manifest its path names, due now (what
        the sensor then checks against the manifests decides whether it runs)."""
        shown = f"retry marker {printable(str(path), 300)}"
        source = self.storage.segment_dir("manifests", segment) / f"attempt={attempt}.json"
        try:
            manifest = Manifest.from_dict(self.storage.read_json(source))
            key = manifest.partition_key
            if manifest.attempt != attempt or encode_partition(key) != segment:
                raise ValueError("it names another partition or attempt")
        except FileNotFoundError:
            self.log.warning(
                f"{shown} cannot be read ({problem}) and its partition has no attempt "
                f"{attempt}: deleted"
            )
            self.storage.delete(path)
            return None
        except Exception as exc:  # the truth is damaged too: this partition waits for a person
            self.log.warning(
                f"{shown} cannot be read ({problem}), nor the manifest "
                f"{printable(str(source), 300)} ({type(exc).__name__}: {printable(exc)}): "
                "this partition's automatic retry waits until the manifest is repaired"
            )
            return None
        due_at = 0.0  # due since it was written: the backoff it held is lost
        self.mark(key, attempt, due_at, 0)
        self.log.warning(
            f"{shown} could not be read ({problem}): written again from the manifest of "
            f"attempt {attempt}, due now"
        )
        return QueuedRetry(segment, key, attempt, due_at, 0)


def _parse(segment: str, attempt: int, data: bytes | Exception) -> QueuedRetry | str:
    """The marker, or what is wrong with it."""
    if isinstance(data, Exception):
        return f"{type(data).__name__}: {printable(data)}"
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            return "not a JSON object"
        key = body["partition_key"]
        if (key is not None and not isinstance(key, str)) or encode_partition(key) != segment:
            return "it names another partition"
        if body.get("attempt", attempt) != attempt:
            return "it names another attempt"
        due_at, rows = float(body["due_at"]), int(body["rows"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"{type(exc).__name__}: {printable(exc, 200)}"
    if not math.isfinite(due_at):  # NaN or infinity: never due, so never run nor dropped
        return f"due_at is {due_at}"
    return QueuedRetry(segment, key, attempt, due_at, rows)
