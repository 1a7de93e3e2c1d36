"""Where a pipeline keeps track of its pilot batches: two caches under ``<base>/_pilots/``.

- ``queue/partition=<p>/attempt=<n>.json``: a pilot attempt waiting for its verdict. Written
  before the pilot's manifest, so the sensor (which lists this one folder each tick: what it
  costs follows the pilots waiting, not the lake) always finds it; dropped once the pilot is
  released, stopped, replaced or cancelled.
- ``prompts/<prompt hash>.json`` (``pilot_scope="pipeline"``): the pilot of one prompt, for
  every partition to see: ``pending`` (the other partitions wait for it), ``passed`` (they
  go, calibrated by its output tokens) or ``stopped`` (they send nothing).

The manifests stay the truth (each attempt's ``pilot`` field says its part); a lost record
at worst makes another partition send a pilot of its own, which costs ``pilot_rows`` rows.

Example::

    book = PilotBook(storage)
    book.mark("2026-11-24", attempt=1, prompt="9f2c...")
    [q.partition_key for q in book.queued()]      # ['2026-11-24']
    book.record("9f2c...")                        # None, or {"state": "pending", ...}
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .manifest import now_iso
from .storage import BatchStorage, encode_partition

__all__ = ["PilotBook", "QueuedPilot"]

_QUEUE_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")
_PROMPT_RE = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass(frozen=True)
class QueuedPilot:
    """One pilot attempt waiting for its verdict."""

    segment: str
    partition_key: str | None
    attempt: int
    prompt: str


class PilotBook:
    """The pilot queue and the per-prompt records of one pipeline.

    Example::

        PilotBook(storage).queued()     # the pilots the sensor looks at this tick
    """

    def __init__(self, storage: BatchStorage) -> None:
        options = dict(getattr(storage.root, "storage_options", {}) or {})
        self.storage = storage
        self._store = BatchStorage(str(storage.base), "_pilots", options)

    # --- the queue -------------------------------------------------------------------------

    def _queue_path(self, segment: str, attempt: int) -> Any:
        return self._store.segment_dir("queue", segment) / f"attempt={attempt}.json"

    def mark(self, partition_key: str | None, attempt: int, prompt: str) -> None:
        """Queue a pilot attempt for the sensor's verdict (before its manifest is written)."""
        body = {"partition_key": partition_key, "attempt": attempt, "prompt": prompt}
        path = self._queue_path(encode_partition(partition_key), attempt)
        self._store.write_json(path, {**body, "marked_at": now_iso()})

    def drop(self, pilot: QueuedPilot) -> None:
        """Forget one queued pilot (released, stopped, replaced or cancelled)."""
        self._store.delete(self._queue_path(pilot.segment, pilot.attempt))

    def queued(self) -> list[QueuedPilot]:
        """Every queued pilot: one listing, then a read of each marker. A marker that cannot
        be read is dropped (it is only a pointer; see the module docstring)."""
        names = self._store.list_files(self._store.base / "queue")
        found = [(m.group(1), int(m.group(2))) for n in names if (m := _QUEUE_RE.match(n))]
        paths = {key: self._queue_path(*key) for key in found}
        raw = self._store.read_many(paths.values())
        out = []
        for (segment, attempt), path in paths.items():
            pilot = _parse(segment, attempt, raw[str(path)])
            if pilot is None:
                self._store.delete(path)
                continue
            out.append(pilot)
        return sorted(out, key=lambda p: (p.segment, p.attempt))

    # --- per prompt (pipeline scope) -------------------------------------------------------

    def _prompt_path(self, prompt: str) -> Any:
        if not _PROMPT_RE.match(prompt):
            raise ValueError(f"not a prompt hash: {prompt!r}")
        return self._store.base / "prompts" / f"{prompt}.json"

    def record(self, prompt: str) -> dict[str, Any] | None:
        """What is known of the pilot of ``prompt``: ``{"state", "partition_key",
        "attempt", ...}``, or None (never piloted, or the record was lost or unreadable)."""
        try:
            data = self._store.read_json(self._store.fresh(self._prompt_path(prompt)))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("state") not in ("pending", "passed", "stopped"):
            return None
        return data

    def write(self, prompt: str, state: str, **fields: Any) -> None:
        """Record the pilot of ``prompt`` as ``pending``, ``passed`` or ``stopped``."""
        body = {"prompt": prompt, "state": state, **fields, "updated_at": now_iso()}
        self._store.write_json(self._prompt_path(prompt), body)

    def forget(self, prompt: str, partition_key: str | None, attempt: int) -> bool:
        """Drop a ``pending`` record that points to this pilot (it was cancelled or
        replaced): the partitions that wait for it decide again. True when dropped."""
        record = self.record(prompt)
        if record is None or record.get("state") != "pending":
            return False
        if record.get("partition_key") != partition_key or record.get("attempt") != attempt:
            return False
        self._store.delete(self._prompt_path(prompt))
        return True

    @contextlib.contextmanager
    def lock(self, wait_seconds: float = 120.0) -> Iterator[None]:
        """The pipeline's pilot lock: one submission at a time decides who pilots a prompt
        (held by the submission that sends the pilot, until its record is written)."""
        with self._store.lock(None, wait_seconds=wait_seconds):
            yield


def _parse(segment: str, attempt: int, data: bytes | Exception) -> QueuedPilot | None:
    if isinstance(data, Exception):
        return None
    try:
        body = json.loads(data)
        key, prompt = body["partition_key"], body["prompt"]
        if (key is not None and not isinstance(key, str)) or encode_partition(key) != segment:
            return None
        if not isinstance(prompt, str) or int(body["attempt"]) != attempt:
            return None
        return QueuedPilot(segment, key, attempt, prompt)
    except (ValueError, KeyError, TypeError):
        return None
