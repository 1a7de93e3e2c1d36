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

Example:
    >>> control = AdmissionControl(storage, max_enqueued_tokens=2_000_000, output_tokens=256)
    >>> control.in_flight()
    0
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import InfronError
from .manifest import ChunkRecord, Manifest, load_manifests
from .models import Batch
from .storage import BatchStorage, encode_partition

__all__ = ["AdmissionControl", "Admitted", "chunk_tokens", "is_limit_refusal"]

logger = logging.getLogger(__name__)

LEDGER = "_admission"
# An entry reserved for a chunk that never got a batch (its run died before the create
# call, or the call was refused) is released after this long unless the chunk is uncertain.
RESERVATION_GRACE_SECONDS = 600.0
# A submit run the sensor requested that admitted nothing by then (it failed, or it was
# lost) is requested again, under a new run_key.
REQUEST_RETRY_SECONDS = 600.0


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


def _age(stamp: str | None) -> float:
    try:
        when = datetime.fromisoformat(stamp or "")
    except ValueError:
        return math.inf
    return (datetime.now(timezone.utc) - when).total_seconds()


def _entry_key(pipeline: str, partition_key: str | None, attempt: int, chunk: int | None) -> str:
    raw = f"{pipeline}\x1f{partition_key!r}\x1f{attempt}\x1f{chunk}"
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class AdmissionControl:
    """The enqueued-token limit of the pipelines sharing one storage root and resource.

    Example:
        >>> AdmissionControl(storage, max_enqueued_tokens=90_000, output_tokens=0).in_flight()
        0
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
        options = dict(getattr(storage.root, "storage_options", {}) or {})
        self.storage = storage
        self.limit = int(max_enqueued_tokens)
        self.output_tokens = int(output_tokens)
        self.scope = scope
        self._store = BatchStorage(str(storage.root), LEDGER, options)
        self._path = self._store.base / f"{encode_partition(scope)}.json"

    # --- the ledger ------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        path = self._store.fresh(self._path)
        if not self._store.exists(path):
            return {"entries": {}, "waiting": {}}
        data = self._store.read_json(path)
        data.setdefault("entries", {})
        data.setdefault("waiting", {})
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self._store.write_json(self._path, data)

    def _lock(self) -> Any:
        return self._store.lock(f"lock-{self.scope}")

    def in_flight(self) -> int:
        """Estimated tokens of the chunks created (or being created) and not yet terminal."""
        return sum(int(e.get("tokens", 0)) for e in self._read()["entries"].values())

    def waiting(self) -> list[dict[str, Any]]:
        """The attempts with pending chunks, oldest first (every pipeline of the root)."""
        return sorted(self._read()["waiting"].values(), key=lambda w: w.get("since", ""))

    # --- submission ------------------------------------------------------------------------

    def admit(self, manifest: Manifest) -> Admitted:
        """Reserve capacity for the chunks of ``manifest`` that fit, in order, and record the
        rest as waiting. A chunk reserved earlier (its create was interrupted) is admitted
        again without a second reservation; a chunk bigger than the whole limit is admitted
        alone, when nothing else is in flight."""
        name, key, attempt = self.storage.name, manifest.partition_key, manifest.attempt
        todo = [c for c in manifest.chunks if not c.batch_id]
        result = Admitted()
        with self._lock():
            data = self._read()
            entries = data["entries"]
            total = sum(int(e.get("tokens", 0)) for e in entries.values())
            blocked = False
            for chunk in todo:
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
                    if not result.reason:
                        result.reason = self._why(tokens, total)
                    continue
                result.oversize = result.oversize or alone
                total += tokens
                entries[ekey] = {
                    "pipeline": name,
                    "partition_key": key,
                    "attempt": attempt,
                    "chunk": chunk.index,
                    "tokens": tokens,
                    "batch_id": None,
                    "reserved_at": _now(),
                }
                result.chunks.append(chunk.index)
            self._set_waiting(data, manifest, admitted_any=bool(result.chunks))
            self._write(data)
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

    def settle(self, manifest: Manifest, created_any: bool) -> None:
        """After the create calls: record the batch ids, drop the reservations of chunks that
        were not created (refused, or never tried; an uncertain chunk keeps its reservation:
        it may exist), and update (or clear) the attempt's waiting record."""
        name, key, attempt = self.storage.name, manifest.partition_key, manifest.attempt
        with self._lock():
            data = self._read()
            entries = data["entries"]
            for chunk in manifest.chunks:
                ekey = _entry_key(name, key, attempt, chunk.index)
                if ekey not in entries:
                    continue
                if chunk.batch_id:
                    entries[ekey]["batch_id"] = chunk.batch_id
                elif not chunk.uncertain:
                    del entries[ekey]
            self._set_waiting(data, manifest, admitted_any=created_any)
            self._write(data)

    def _set_waiting(self, data: dict[str, Any], manifest: Manifest, admitted_any: bool) -> None:
        name, key, attempt = self.storage.name, manifest.partition_key, manifest.attempt
        wkey = _entry_key(name, key, attempt, None)
        pending = [c for c in manifest.chunks if not c.batch_id]
        entries = data["entries"]
        unreserved = [
            c for c in pending if _entry_key(name, key, attempt, c.index) not in entries
        ]
        if not unreserved:
            data["waiting"].pop(wkey, None)
            return
        old = data["waiting"].get(wkey, {})
        data["waiting"][wkey] = {
            "pipeline": name,
            "partition_key": key,
            "attempt": attempt,
            "kind": manifest.kind,  # a retry is resumed by a run with retry_failed set
            "run_key": manifest.run_key,
            "pending_chunks": len(unreserved),
            "pending_requests": sum(c.requests for c in unreserved),
            "tokens": [chunk_tokens(manifest, c, self.output_tokens) for c in unreserved],
            "since": old.get("since", _now()),
            # Bumped by a run that could create nothing: its run_key must not repeat.
            "tries": int(old.get("tries", 0)) + (0 if admitted_any or not old else 1),
        }

    # --- the sensor ------------------------------------------------------------------------

    def release_and_schedule(
        self,
        polled: dict[str, Batch | Exception],
        poll: Callable[[list[str]], dict[str, Batch | Exception]],
        log: logging.Logger | None = None,
    ) -> list[dict[str, Any]]:
        """Release the entries of this pipeline whose batches are terminal, then return the
        waiting attempts of this pipeline that now fit, oldest first (one run each).

        ``polled`` holds what the tick already polled; ``poll`` polls the rest.
        """
        log = log or logger
        name = self.storage.name
        data = self._read()
        mine = {k: e for k, e in data["entries"].items() if e.get("pipeline") == name}
        waiting = [w for w in data["waiting"].values() if w.get("pipeline") == name]
        if not mine and not waiting:
            return []
        ids = [e["batch_id"] for e in mine.values() if e.get("batch_id")]
        missing = [bid for bid in ids if bid not in polled]
        states = {**polled, **(poll(missing) if missing else {})}
        done = {
            k
            for k, e in mine.items()
            if isinstance(states.get(e.get("batch_id") or ""), Batch)
            and states[e["batch_id"]].is_terminal
        }
        stale, found = self._unbatched(mine)
        if done or stale or found:
            with self._lock():
                data = self._read()
                for k in done | stale:
                    data["entries"].pop(k, None)
                for k, bid in found.items():
                    if k in data["entries"]:
                        data["entries"][k]["batch_id"] = bid
                self._write(data)
            if done or stale:
                log.info(f"{name}: released {len(done) + len(stale)} chunk(s) from the queue")
        total = sum(int(e.get("tokens", 0)) for e in data["entries"].values())
        ready, gone = [], []
        for w in sorted(data["waiting"].values(), key=lambda w: w.get("since", "")):
            if w.get("pipeline") != name:
                continue
            fitted, room = 0, total
            for tokens in w.get("tokens", []):
                if room + tokens <= self.limit or (room == 0 and tokens > self.limit):
                    room += tokens
                    fitted += 1
                else:
                    break
            if not fitted:
                continue
            if self._stale(w):  # replaced, or submitted by another run since
                gone.append(_entry_key(name, w["partition_key"], int(w["attempt"]), None))
                continue
            total = room
            ready.append(w)
        return self._record_requests(ready, gone)

    def _record_requests(
        self, ready: list[dict[str, Any]], gone: list[str]
    ) -> list[dict[str, Any]]:
        """Drop the stale records; stamp when each ready one was requested, and give a new
        run_key (``tries``) to one whose earlier request admitted nothing in time."""
        if not ready and not gone:
            return ready
        name = self.storage.name
        with self._lock():
            data = self._read()
            for k in gone:
                data["waiting"].pop(k, None)
            fresh = []
            for w in ready:
                key = _entry_key(name, w["partition_key"], int(w["attempt"]), None)
                record = data["waiting"].get(key)
                if record is None:  # admitted by its run meanwhile
                    continue
                if record.get("requested_at") is None:
                    record["requested_at"] = _now()
                elif _age(record["requested_at"]) > REQUEST_RETRY_SECONDS:
                    record["tries"] = int(record.get("tries", 0)) + 1
                    record["requested_at"] = _now()
                fresh.append(dict(record))
            self._write(data)
        return fresh

    def _unbatched(self, mine: dict[str, dict[str, Any]]) -> tuple[set[str], dict[str, str]]:
        """Entries with no batch id past the grace: released unless their chunk is uncertain
        (it may exist); a batch id found in the manifest is recorded instead."""
        stale, found = set(), {}
        for k, e in mine.items():
            if e.get("batch_id") or _age(e.get("reserved_at")) < RESERVATION_GRACE_SECONDS:
                continue
            chunk = self._chunk(e["partition_key"], int(e["attempt"]), int(e["chunk"]))
            if chunk is None or (not chunk.batch_id and not chunk.uncertain):
                stale.add(k)
            elif chunk.batch_id:
                found[k] = chunk.batch_id
        return stale, found

    def _stale(self, w: dict[str, Any]) -> bool:
        """A waiting record whose attempt is gone, abandoned or fully submitted since, or
        replaced by a newer initial attempt (changed input): its chunks will never be sent,
        so it must not hold the queue's room."""
        attempt = int(w["attempt"])
        manifests = {m.attempt: m for m in load_manifests(self.storage, w["partition_key"])}
        manifest = manifests.get(attempt)
        if manifest is None or manifest.state == "abandoned" or manifest.fully_submitted:
            return True
        return any(
            m.attempt > attempt and m.kind == "initial" and m.state != "abandoned"
            for m in manifests.values()
        )

    def _chunk(self, partition_key: str | None, attempt: int, index: int) -> ChunkRecord | None:
        path = self.storage.manifest_path(partition_key, attempt)
        if not self.storage.exists(path):
            return None
        manifest = Manifest.from_dict(self.storage.read_json(path))
        if manifest.state == "abandoned":
            return None
        return next((c for c in manifest.chunks if c.index == index), None)
