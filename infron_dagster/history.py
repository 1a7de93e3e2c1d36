"""A partition's history: every manifest of one partition, read once per run.

Collection, the checks and the submit side each need the same facts about a partition: its
attempts, which of them are active (the latest initial attempt and its retries), the batches
that are its own, the in-flight attempts a newer one waits on. Reading them from storage each
time cost a listing plus a read per attempt, several times per collection; a
``PartitionHistory`` reads them once (concurrently) and is read again once, under the
partition's lock, where a decision must see what other runs wrote meanwhile.

Example::

    history = PartitionHistory.load(storage, "2026-11-24")
    [m.attempt for m in history.active]        # e.g. [1, 2]
    history = history.reload()                  # under the partition's lock
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .columns import CARRIED_FROM, CARRIED_ID, CARRIED_PARTITION, CUSTOM_ID
from .manifest import Manifest
from .storage import BatchStorage

__all__ = ["PartitionHistory", "active_attempts"]

# An attempt's snapshot columns that say what it sent and where its carried rows come from.
CARRY_COLUMNS = (CUSTOM_ID, CARRIED_FROM, CARRIED_PARTITION, CARRIED_ID)


def active_attempts(manifests: Sequence[Manifest]) -> list[Manifest]:
    """The latest initial attempt and its retries: what the partition's tables reflect.

    Example::

        [m.attempt for m in active_attempts(manifests)]   # e.g. [3, 4]
    """
    initial = [m for m in manifests if m.kind == "initial" and m.state != "abandoned"]
    if not initial:
        return []
    base = initial[-1].attempt
    return [m for m in manifests if m.base_attempt == base and m.state != "abandoned"]


@dataclass
class PartitionHistory:
    """Every manifest of one partition (ascending by attempt), and what follows from them.

    Example::

        history = PartitionHistory.load(storage, "a")
        history.by_attempt[1].state                 # 'collected'
    """

    storage: BatchStorage
    partition_key: str | None
    manifests: list[Manifest]
    _snapshots: dict[int, pa.Table] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, storage: BatchStorage, partition_key: str | None) -> PartitionHistory:
        """One listing of the partition's manifests and one read of each, concurrently."""
        numbers = storage.attempts(partition_key)
        paths = [storage.manifest_path(partition_key, n) for n in numbers]
        raw = storage.read_many(paths)
        manifests = []
        for path in paths:
            data = raw[str(path)]
            if isinstance(data, Exception):
                raise data
            manifests.append(Manifest.from_dict(json.loads(data)))
        return cls(storage, partition_key, manifests)

    def reload(self) -> PartitionHistory:
        """The history as storage holds it now (call it under the partition's lock)."""
        return PartitionHistory.load(self.storage, self.partition_key)

    @property
    def by_attempt(self) -> dict[int, Manifest]:
        """Each manifest by its attempt number."""
        return {m.attempt: m for m in self.manifests}

    @property
    def active(self) -> list[Manifest]:
        """The latest initial attempt and its retries (see :func:`active_attempts`)."""
        return active_attempts(self.manifests)

    @property
    def own_batch_ids(self) -> list[str]:
        """Every batch any attempt of this partition created, sorted."""
        return sorted({b for m in self.manifests for b in m.batch_ids})

    def waited_on(self, attempts: Sequence[Manifest]) -> list[Manifest]:
        """The in-flight attempts ``attempts`` carry answers from (their ``waits_on``)."""
        numbers = sorted({int(w["attempt"]) for m in attempts for w in m.waits_on})
        by_attempt = self.by_attempt
        missing = [n for n in numbers if n not in by_attempt]
        if missing:  # a manifest every waiting attempt names must exist: say which
            raise FileNotFoundError(
                f"partition {self.partition_key!r}: attempt(s) {missing} are waited on but "
                "have no manifest"
            )
        return [by_attempt[n] for n in numbers]

    def carry_columns(self, attempt: int) -> pa.Table:
        """An attempt's snapshot, only its custom_ids and where its carried rows come from
        (read once per history: a collection asks for the base attempt's several times)."""
        if attempt not in self._snapshots:
            self._snapshots[attempt] = read_carry_columns(self.storage, self.partition_key, attempt)
        return self._snapshots[attempt]


def read_carry_columns(storage: BatchStorage, partition_key: str | None, attempt: int) -> pa.Table:
    """An attempt's custom_ids and carry columns, read from its input snapshot."""
    path = storage.attempt_file("inputs", partition_key, attempt)
    with path.open("rb") as fh:  # one open: the footer, then only those columns
        names = pq.ParquetFile(fh).schema_arrow.names
        fh.seek(0)
        return pq.read_table(fh, columns=[c for c in CARRY_COLUMNS if c in names])
