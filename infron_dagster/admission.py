"""Admission control: never enqueue more tokens than the provider's limit allows.

Providers cap the tokens a organization may have enqueued (OpenAI: per model, counting the
input tokens of the requests of batches not yet finished); a create call over the cap is
refused. A backfill of hundreds of partitions hits it at once. With ``max_enqueued_tokens``
a submission creates only the chunks that fit under the limit together with what is already
in flight; the rest stay in the manifest as pending (no batch id, not uncertain), and the
sensor requests the run that submits them when capacity frees.

What is in flight is kept in one small ledger per storage root and resource key,
``<root>/_admission/<resource key>.json``, shared by every pipeline of that root and read
and written under a lock (``flock`` on local disk, a conditional-write lock on object
storage), so two runs submitting at once cannot both take the last capacity. Each created
(or about to be created) chunk has an entry with its estimated tokens; the sensor removes
an entry when it sees the chunk's batch terminal. A chunk's tokens are its share of the
attempt's estimated input tokens (by bytes) plus ``requests x max_output_tokens`` (the
output limit): more than the provider counts, so a submission that fits here fits there.

The ledger is a cache: the manifests are the truth. What waits is read from the manifests
(the attempts not fully submitted), never from the ledger; a ledger that is missing,
unreadable or foreign is rebuilt from the manifests of the root's pipelines (with a warning
naming the file), and an entry without a batch is checked against its manifest whenever no
run holds the partition's lock.

Example::

    control = AdmissionControl(storage, max_enqueued_tokens=2_000_000, output_tokens=256)
    control.in_flight()
    # -> 0
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import InfronError
from .manifest import ChunkRecord, Manifest, load_manifests
from .models import Batch
from .storage import BatchStorage, LockTimeout, encode_partition, pipeline_names
from .untrusted import printable

__all__ = ["AdmissionControl", "Admitted", "chunk_tokens", "is_limit_refusal"]

logger = logging.getLogger(__name__)

LEDGER = "_admission"
_VERSION = 2


def chunk_tokens(manifest: Manifest, chunk: ChunkRecord, output_tokens: int) -> int:
    """Estimated enqueued tokens of one chunk: its recorded estimate, else (manifests written
    before it was recorded) its share by bytes of the attempt's input tokens plus its output
    limit."""
    if chunk.estimated_tokens:
        return chunk.estimated_tokens
    total_bytes = sum(c.bytes for c in manifest.chunks) or 1
    share = math.ceil(manifest.estimated_input_tokens * chunk.bytes / total_bytes)
    return share + chunk.requests * max(0, output_tokens)


def is_limit_refusal(exc: InfronError) -> bool:
    """A create refused because of the provider's queue: a 429, or an enqueued-token limit."""
    text = f"{exc.code or ''} {exc.server_message}".lower()
    return exc.status_code == 429 or "token_limit" in text or "enqueued token" in text


@dataclass
class Admitted:
    """What one submission may create now, and why the rest wait."""

    chunks: list[int] = field(default_factory=list)
    pending_chunks: int = 0
    pending_requests: int = 0
    reason: str = ""
    oversize: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry_key(pipeline: str, partition_key: str | None, attempt: int, chunk: int | None) -> str:
    raw = f"{pipeline}\x1f{partition_key!r}\x1f{attempt}\x1f{chunk}"
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    tokens, chunk, attempt = entry.get("tokens"), entry.get("chunk"), entry.get("attempt")
    numbers = (tokens, chunk, attempt)
    if any(isinstance(n, bool) or not isinstance(n, int) for n in numbers):
        return False
    key, batch = entry.get("partition_key"), entry.get("batch_id")
    return (
        tokens >= 0
        and isinstance(entry.get("pipeline"), str)
        and (key is None or isinstance(key, str))
        and (batch is None or isinstance(batch, str))
    )


class AdmissionControl:
    """The enqueued-token limit of the pipelines sharing one storage root and resource.

    Example::

        AdmissionControl(storage, max_enqueued_tokens=90_000, output_tokens=0).in_flight()
        # -> 0
    """

    def __init__(
        self,
        storage: BatchStorage,
        *,
        max_enqueued_tokens: int,
        output_tokens: int,
        scope: str = "infron",
    ) -> None:
        if max_enqueued_tokens < 1:
            raise ValueError(f"max_enqueued_tokens must be >= 1, not {max_enqueued_tokens!r}")
        self.options = dict(getattr(storage.root, "storage_options", {}) or {})
        self.storage = storage
        self.limit = int(max_enqueued_tokens)
        self.output_tokens = int(output_tokens)
        self.scope = scope
        self._store = BatchStorage(str(storage.root), LEDGER, self.options)
        self._path = self._store.base / f"{encode_partition(scope)}.json"

    @property
    def path(self) -> Any:
        """The ledger file: ``<root>/_admission/<resource key>.json``."""
        return self._path

    # --- the ledger: a cache of the manifests --------------------------------------------

    def _read(self) -> dict[str, dict[str, Any]] | None:
        """The entries, or None when the file is missing, unreadable or foreign."""
        path = self._store.fresh(self._path)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning(
                "admission ledger %s is unreadable (%s): rebuilt from the manifests",
                self._path,
                printable(exc, 200),
            )
            return None
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or not all(map(_valid_entry, entries.values())):
            logger.warning(
                "admission ledger %s is not a ledger this version wrote: rebuilt from the "
                "manifests",
                self._path,
            )
            return None
        return entries

    def _load(self) -> dict[str, dict[str, Any]]:
        """The entries, rebuilt (and written) when the file cannot be used. Under the lock."""
        entries = self._read()
        if entries is None:
            entries = self._rebuild()
            self._write(entries)
        return entries

    def rebuild(self) -> int:
        """Rebuild the ledger from the manifests now (``doctor``); the entries written."""
        with self._lock():
            entries = self._rebuild()
            self._write(entries)
        return len(entries)

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        self._store.write_json(self._path, {"version": _VERSION, "entries": entries})

    def _lock(self) -> Any:
        return self._store.lock(f"lock-{self.scope}")

    def _rebuild(self) -> dict[str, dict[str, Any]]:
        """Entries for every chunk of the root's pipelines that may be enqueued now: created
        and not known finished, or uncertain. Finished ones are released by the next tick."""
        from .inflight import InFlightIndex  # the sensor's index; a lazy import keeps it light

        entries: dict[str, dict[str, Any]] = {}
        for name in self._pipelines():
            storage = BatchStorage(str(self.storage.root), name, self.options)
            partitions = InFlightIndex(storage, rescan_seconds=None, log=logger).in_flight()
            for manifest in (m for p in partitions for m in p.attempts):
                if manifest.admission_scope != self.scope or manifest.state == "collected":
                    continue
                for chunk in manifest.chunks:
                    if chunk.batch_id or (chunk.uncertain and not manifest.cancelled):
                        entry = self._entry(name, manifest, chunk)
                        entry["batch_id"] = chunk.batch_id
                        entries[
                            _entry_key(name, manifest.partition_key, manifest.attempt, chunk.index)
                        ] = entry
        # A new lake has no ledger yet: only a rebuild that found work in flight is news.
        (logger.warning if entries else logger.info)(
            "admission ledger %s rebuilt from the manifests: %d chunk(s) in flight",
            self._path,
            len(entries),
        )
        return entries

    def _pipelines(self) -> list[str]:
        """The pipeline folders under the root (those with an in-flight index)."""
        return pipeline_names(self.storage.root, ("inflight",))

    def _entry(self, name: str, manifest: Manifest, chunk: ChunkRecord) -> dict[str, Any]:
        return {
            "pipeline": name,
            "partition_key": manifest.partition_key,
            "attempt": manifest.attempt,
            "chunk": chunk.index,
            "tokens": chunk_tokens(manifest, chunk, self.output_tokens),
            "batch_id": None,
            "reserved_at": _now(),
        }

    def in_flight(self) -> int:
        """Estimated tokens of the chunks created (or being created) and not yet terminal."""
        entries = self._read()
        if entries is None:
            with self._lock():
                entries = self._load()
        return sum(int(e["tokens"]) for e in entries.values())

    # --- submission ------------------------------------------------------------------------

    def admit(self, manifest: Manifest) -> Admitted:
        """Reserve capacity for the chunks of ``manifest`` that fit, in order; the rest wait
        (in the manifest, as chunks without a batch). A chunk reserved earlier (its create
        was interrupted) is admitted again without a second reservation; a chunk bigger than
        the whole limit is admitted alone, when nothing else is in flight."""
        name, key, attempt = self.storage.name, manifest.partition_key, manifest.attempt
        manifest.admission_scope = self.scope
        result = Admitted()
        with self._lock():
            entries = self._load()
            total = sum(int(e["tokens"]) for e in entries.values())
            blocked = False
            for chunk in (c for c in manifest.chunks if not c.batch_id):
                ekey = _entry_key(name, key, attempt, chunk.index)
                if ekey in entries:  # reserved by an interrupted run: counted already
                    result.chunks.append(chunk.index)
                    continue
                tokens = chunk_tokens(manifest, chunk, self.output_tokens)
                fits = total + tokens <= self.limit
                alone = tokens > self.limit and total == 0
                if blocked or not (fits or alone):
                    blocked = True
                    result.pending_chunks += 1
                    result.pending_requests += chunk.requests
                    result.reason = result.reason or self._why(tokens, total)
                    continue
                result.oversize = result.oversize or alone
                total += tokens
                entries[ekey] = self._entry(name, manifest, chunk)
                result.chunks.append(chunk.index)
            self._write(entries)
        if result.oversize:
            logger.warning(
                "partition %r attempt %d: a chunk is bigger than max_enqueued_tokens=%d; it is "
                "sent alone, with nothing else in flight",
                key,
                attempt,
                self.limit,
            )
        return result

    def _why(self, tokens: int, total: int) -> str:
        if tokens > self.limit:
            return (
                f"a chunk of ~{tokens} tokens is bigger than max_enqueued_tokens={self.limit}: "
                f"it is sent alone once nothing else is in flight (now ~{total} tokens)"
            )
        return (
            f"max_enqueued_tokens={self.limit}: ~{total} tokens already in flight, the next "
            f"chunk needs ~{tokens}; the sensor submits the rest when batches finish"
        )

    def settle(self, manifest: Manifest, created_any: bool = True) -> None:
        """After the create calls: record the batch ids and drop the reservations of chunks
        that were not created (refused, or never tried; an uncertain chunk keeps its
        reservation: it may exist)."""
        with self._lock():
            entries = self._load()
            self._reconcile(entries, self.storage.name, manifest)
            self._write(entries)

    @staticmethod
    def _reconcile(entries: dict[str, dict[str, Any]], name: str, manifest: Manifest) -> int:
        """Make one attempt's entries agree with its manifest; how many were dropped."""
        dropped = 0
        for chunk in manifest.chunks:
            ekey = _entry_key(name, manifest.partition_key, manifest.attempt, chunk.index)
            if ekey not in entries:
                continue
            if chunk.batch_id:
                entries[ekey]["batch_id"] = chunk.batch_id
            elif not chunk.uncertain or manifest.cancelled:
                del entries[ekey]
                dropped += 1
        return dropped

    # --- the sensor ------------------------------------------------------------------------

    def release(
        self,
        polled: dict[str, Batch | Exception],
        poll: Callable[[list[str]], dict[str, Batch | Exception]],
        log: logging.Logger | None = None,
    ) -> int:
        """Release the entries of this pipeline whose batches are terminal, and the
        reservations no run holds (checked against the manifests while holding the
        partition's lock). ``polled`` holds what the tick already polled; ``poll`` polls the
        rest. Returns how many entries were released."""
        log = log or logger
        name = self.storage.name
        entries = self._read()
        if entries is None:
            with self._lock():
                entries = self._load()
        mine = {k: e for k, e in entries.items() if e["pipeline"] == name}
        ids = [e["batch_id"] for e in mine.values() if e["batch_id"]]
        missing = [bid for bid in ids if bid not in polled]
        states = {**polled, **(poll(missing) if missing else {})}
        done = {
            k
            for k, e in mine.items()
            if isinstance(states.get(e["batch_id"] or ""), Batch)
            and states[e["batch_id"]].is_terminal
        }
        unbatched = {e["partition_key"] for e in mine.values() if not e["batch_id"]}
        released = len(done)
        if done:
            with self._lock():
                entries = self._load()
                for k in done:
                    entries.pop(k, None)
                self._write(entries)
        for key in sorted(unbatched, key=lambda k: (k is None, k or "")):
            released += self.reconcile_partition(key)
        if released:
            log.info(f"{name}: released {released} chunk(s) from the queue")
        return released

    def reconcile_partition(self, partition_key: str | None) -> int:
        """Check a partition's entries against its manifests, if no run holds its lock (a
        run that reserved and died leaves entries without a batch: they are released).
        Returns how many entries were dropped; 0 when a run holds the lock."""
        try:
            with self.storage.lock(partition_key, wait_seconds=0):
                manifests = load_manifests(self.storage, partition_key)
                with self._lock():
                    entries = self._load()
                    dropped = self._drop_gone(entries, partition_key, manifests)
                    for manifest in manifests:
                        dropped += self._reconcile(entries, self.storage.name, manifest)
                    self._write(entries)
                return dropped
        except LockTimeout:
            return 0  # a submission runs now: its own settle reconciles

    def _drop_gone(
        self,
        entries: dict[str, dict[str, Any]],
        partition_key: str | None,
        manifests: Sequence[Manifest],
    ) -> int:
        """Drop the partition's unbatched entries whose attempt has no manifest any more."""
        have = {m.attempt for m in manifests}
        gone = [
            k
            for k, e in entries.items()
            if e["pipeline"] == self.storage.name
            and e["partition_key"] == partition_key
            and not e["batch_id"]
            and e["attempt"] not in have
        ]
        for k in gone:
            del entries[k]
        return len(gone)

    def ready(self, waiting: Sequence[Manifest]) -> list[Manifest]:
        """The attempts of ``waiting`` (oldest first) whose next unsent chunk fits now,
        each counted as taking its fitting chunks' room, so one tick does not promise the
        same room twice."""
        entries = self._read()
        if entries is None:
            with self._lock():
                entries = self._load()
        room = sum(int(e["tokens"]) for e in entries.values())
        name, ready = self.storage.name, []
        for manifest in waiting:
            fitted = 0
            for chunk in (c for c in manifest.chunks if not c.batch_id):
                ekey = _entry_key(name, manifest.partition_key, manifest.attempt, chunk.index)
                if ekey in entries:  # reserved already (uncertain): its room is counted
                    fitted += 1
                    continue
                tokens = chunk_tokens(manifest, chunk, self.output_tokens)
                if room + tokens <= self.limit or (room == 0 and tokens > self.limit):
                    room += tokens
                    fitted += 1
                else:
                    break
            if fitted:
                ready.append(manifest)
        return ready
