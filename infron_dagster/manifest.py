"""The manifest: the record of one submission attempt of one partition.

It is written before the paid call (state ``submitting``, the intent), again after each batch
is created, and is the source of truth for the sensor and for collection.

Example:
    >>> m = Manifest(name="reviews", partition_key="2026-11-24", attempt=1,
    ...              fingerprint="ab12", api_style="infron", endpoint="/v1/chat/completions",
    ...              model="gpt-4o-mini")
    >>> m.run_key.rsplit(":", 1)[0]
    'reviews:2026-11-24:1'
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .storage import BatchStorage

__all__ = ["ChunkRecord", "Manifest", "load_manifests"]

AttemptKind = Literal["initial", "retry"]
ManifestState = Literal["submitting", "submitted", "collected", "abandoned"]


@dataclass
class ChunkRecord:
    """One request file and the batch it became.

    Example:
        >>> chunk = ChunkRecord(index=0, path="requests/chunk-00000.jsonl", requests=10, bytes=900)
        >>> chunk.batch_id is None  # not created yet
        True
    """

    index: int
    path: str
    requests: int
    bytes: int
    batch_id: str | None = None
    status: str | None = None
    idempotency_key: str = ""
    # A create call for this chunk was started and may have created the batch although its
    # answer was never recorded (it failed ambiguously, or the process died during it).
    uncertain: bool = False
    create_started_at: str | None = None
    # Estimated enqueued tokens (input share plus the output limit), for admission control;
    # 0 in manifests written before it was recorded (estimated from the manifest then).
    estimated_tokens: int = 0


@dataclass
class Manifest:
    """Everything needed to poll, collect and retry one attempt, without any process memory.

    ``base_attempt`` is the initial attempt a retry belongs to; collection merges every
    attempt from ``base_attempt`` on.

    Example:
        >>> m = Manifest(name="reviews", partition_key="2026-11-24", attempt=1, fingerprint="f",
        ...              api_style="infron", endpoint="/v1/chat/completions", model="gpt-4o")
        >>> m.state, Manifest.from_dict(m.to_dict()) == m
        ('submitting', True)
    """

    name: str
    partition_key: str | None
    attempt: int
    fingerprint: str
    api_style: str
    endpoint: str
    model: str
    kind: AttemptKind = "initial"
    base_attempt: int = 0
    state: ManifestState = "submitting"
    created_at: str = field(default_factory=lambda: _now())
    submitted_at: str | None = None
    collected_at: str | None = None
    row_count: int = 0
    invalid_count: int = 0
    carried_count: int = 0
    estimated_input_tokens: int = 0
    chunks: list[ChunkRecord] = field(default_factory=list)
    run_id: str | None = None
    # The money side, when the pipeline has a price: the estimate made before sending and
    # the ledger entry that reserved it ({"day", "entry", "expected_cost", "worst_cost"}).
    spend: dict[str, Any] | None = None
    # Earlier attempts of the partition, still in flight when this one was submitted, whose
    # answers this attempt carries instead of sending again ({"attempt", "batch_ids"}): it is
    # collected only once their batches have ended too.
    waits_on: list[dict[str, Any]] = field(default_factory=list)
    # Set by a cancel: no chunk of this attempt is created afterwards, whatever a ledger or
    # a later run says; its unsent chunks' rows fail as batch_cancelled when collected.
    cancelled_at: str | None = None
    # The admission ledger (resource key) whose enqueued-token limit this attempt's chunks
    # count against, when the pipeline has one: a lost ledger is rebuilt from these.
    admission_scope: str | None = None
    # This attempt's part in a pilot batch (``pilot_rows``; see pilot.py): {"role": "pilot"
    # | "release" | "stopped" | "held", "prompt": <prompt hash>, ...}; None without one.
    pilot: dict[str, Any] | None = None
    # Where its batches were sent (see provider.py): "local" for the embedded local server
    # (mock answers, never reused against a real API), else the API's scheme and host;
    # None in manifests written before it was recorded (unknown: trusted as before).
    provider: str | None = None

    def __post_init__(self) -> None:
        if not self.base_attempt:
            self.base_attempt = self.attempt

    @property
    def batch_ids(self) -> list[str]:
        """Ids of the batches created so far."""
        return [c.batch_id for c in self.chunks if c.batch_id]

    @property
    def waiting_batch_ids(self) -> list[str]:
        """Ids of the in-flight batches of earlier attempts this attempt carries answers from."""
        return [str(bid) for source in self.waits_on for bid in source.get("batch_ids", [])]

    @property
    def fully_submitted(self) -> bool:
        """True when every chunk has its batch."""
        return all(c.batch_id for c in self.chunks)

    @property
    def cancelled(self) -> bool:
        """True once a cancel stopped this attempt: nothing more of it is ever created."""
        return self.cancelled_at is not None

    @property
    def settled(self) -> bool:
        """True when no chunk will be created any more: every chunk has its batch, or the
        attempt was cancelled (its unsent chunks never will be)."""
        return self.fully_submitted or self.cancelled

    @property
    def run_key(self) -> str:
        """Dedup key of this attempt's collection run: includes the attempt, by design.

        Its last part hashes when the attempt was created, so attempt 1 of a lake that was
        wiped is not mistaken (and silently skipped) for attempt 1 of the old one.
        """
        stamp = hashlib.sha256(f"{self.created_at}|{self.fingerprint}".encode()).hexdigest()
        return f"{self.name}:{self.partition_key or ''}:{self.attempt}:{stamp[:8]}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse what :meth:`to_dict` wrote (unknown keys are ignored for forward compat)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        chunk_fields = set(ChunkRecord.__dataclass_fields__)
        values["chunks"] = [
            ChunkRecord(**{k: v for k, v in c.items() if k in chunk_fields})
            for c in data.get("chunks", [])
        ]
        return cls(**values)


def load_manifests(storage: BatchStorage, partition_key: str | None) -> list[Manifest]:
    """Every manifest of a partition, by attempt ascending: the record collection, the
    sensor, checks and retries all start from.

    Example:
        >>> import tempfile
        >>> from infron_dagster.storage import BatchStorage
        >>> load_manifests(BatchStorage(tempfile.mkdtemp(), "reviews"), "2026-11-24")
        []
    """
    return [
        Manifest.from_dict(storage.read_json(storage.manifest_path(partition_key, attempt)))
        for attempt in storage.attempts(partition_key)
    ]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def now_iso() -> str:
    """The current UTC time as ISO-8601."""
    return _now()
