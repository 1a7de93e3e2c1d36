"""A hard budget: a submission whose worst case would cross a limit is refused before any
paid call, and what each submission may spend is written to a ledger on storage.

The ledger keeps one small JSON entry per paid submission (``<base>/_ledger/spend/
partition=<UTC day>/<entry>.json``), reserved at its worst-case cost under the day's lock
(an ``flock`` on local disk, a conditional-write lock on object storage), so two runs
submitting at once cannot both slip under the daily limit. Collection settles an entry to
what was actually spent.

An entry belongs to one attempt of one partition: the rerun of an attempt whose submission
failed before it created anything replaces the attempt's entry (it is never counted against
itself), and :meth:`SpendLedger.release_unpaid` releases the entries of attempts that never
created anything, judged from their manifests (the truth). An entry that cannot be read is
counted conservatively (its manifest's worst case) and rebuilt from the manifest when its
partition is collected, with a warning naming the file.

Example:
    >>> budget = Budget(max_cost_per_partition=5.0, max_cost_per_day=50.0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import InfronDagsterError
from .storage import UNPARTITIONED, BatchStorage, LockTimeout
from .untrusted import printable

__all__ = ["Budget", "BudgetExceeded", "DamagedLedger", "SpendLedger"]

logger = logging.getLogger(__name__)

_ENTRY_RE = re.compile(r"^a(\d+)-[0-9a-f]{20}$")


@dataclass(frozen=True)
class Budget:
    """Money limits of one pipeline, in the currency of its :class:`ModelPrice`.

    Example:
        >>> Budget(max_cost_per_day=20.0)  # per UTC day, across the pipeline's partitions
        Budget(max_cost_per_partition=None, max_cost_per_day=20.0)
    """

    max_cost_per_partition: float | None = None
    max_cost_per_day: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_cost_per_partition", "max_cost_per_day"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"Budget: {name} must be a finite amount >= 0, not {value!r}")


class BudgetExceeded(InfronDagsterError, RuntimeError):
    """A submission was refused before any paid call because its worst case crosses a limit.

    Example::

        try:
            submit_prepared(client, storage, prepared, spec=spec, partition_key="a", gate=gate)
        except BudgetExceeded as exc:
            print(exc)  # names the limit, the worst case and what was spent already
    """


class DamagedLedger(BudgetExceeded):
    """A budget entry and its manifest are both unreadable, so a day limit cannot be kept."""


@dataclass(frozen=True)
class Reservation:
    """What one submission may spend, as recorded in the ledger."""

    day: str
    entry: str
    worst_cost: float


class SpendLedger:
    """The day-by-day record of what a pipeline's submissions may spend and did spend.

    Example::

        ledger = SpendLedger(storage)
        ledger.spent_on("2026-11-26")
        # -> 0.0
    """

    def __init__(self, storage: BatchStorage) -> None:
        options = dict(getattr(storage.root, "storage_options", {}) or {})
        self._pipeline = storage
        self._store = BatchStorage(str(storage.base), "_ledger", options)

    @staticmethod
    def today() -> str:
        """The ledger's day: UTC, so every machine of a deployment agrees on it."""
        return datetime.now(timezone.utc).date().isoformat()

    def spent_on(
        self, day: str, *, exclude: str | None = None, budget: Budget | None = None
    ) -> float:
        """Reserved worst cases not yet settled, plus settled actual costs, of ``day``.

        ``exclude`` leaves one entry out (the attempt reserving again). An entry that cannot
        be read is counted at its manifest's worst case, else at ``budget``'s partition
        limit (when no manifest records it nothing was sent under it), with a warning naming
        the file; :class:`DamagedLedger` only when its manifest is unreadable too and
        ``budget`` has a day limit that could not be kept otherwise.
        """
        total = 0.0
        for path, record in self._entries(day):
            name = path.name[: -len(".json")]
            if name == exclude:
                continue
            cost = _entry_cost(record) if not isinstance(record, Exception) else None
            if cost is None:
                cost = self._damaged_cost(day, name, path, record, budget)
            total += cost
        return total

    def reserve(
        self,
        partition_key: str | None,
        attempt: int,
        worst_cost: float,
        budget: Budget,
        *,
        allow_over_budget: bool = False,
    ) -> Reservation:
        """Check ``worst_cost`` against the budget and record it, atomically for the day.

        The attempt's own earlier entry of the day (a submission that failed before writing
        its manifest) is replaced, not counted. Raises :class:`BudgetExceeded` (and records
        nothing) when a limit would be crossed, unless ``allow_over_budget``.
        """
        if not _is_amount(worst_cost):
            raise ValueError(f"a reservation must be a finite amount >= 0, not {worst_cost!r}")
        day = self.today()
        entry = _entry_name(partition_key, attempt)
        with self._store.lock(day):
            spent = self.spent_on(day, exclude=entry, budget=budget)
            if not allow_over_budget:
                _check(partition_key, worst_cost, spent, day, budget)
            path = self._entry_path(day, entry)
            if self._store.exists(path):
                logger.info(
                    "partition %r attempt %s: its earlier reservation %s is replaced (its "
                    "submission ended before creating anything)",
                    printable(partition_key, 100),
                    attempt,
                    path,
                )
            record = {
                "partition_key": partition_key,
                "attempt": attempt,
                "worst_cost": float(worst_cost),
                "actual_cost": None,
                "over_budget_allowed": allow_over_budget,
                "reserved_at": _now(),
            }
            self._store.write_json(path, record)
        return Reservation(day, entry, float(worst_cost))

    def would_refuse(
        self, partition_key: str | None, attempt: int, worst_cost: float, budget: Budget
    ) -> str:
        """Why :meth:`reserve` would refuse this now (``""`` when it would not), without
        taking a lock or writing anything: what a dry run reports.

        Example::

            SpendLedger(storage).would_refuse("a", 1, 0.5, Budget(max_cost_per_day=0.1))
            # -> "partition 'a': worst-case cost 0.5000 on top of 0.0000 ..."
        """
        day = self.today()
        entry = _entry_name(partition_key, attempt)
        try:
            spent = self.spent_on(day, exclude=entry, budget=budget)
            _check(partition_key, worst_cost, spent, day, budget)
        except BudgetExceeded as exc:
            return str(exc)
        return ""

    def settle(
        self,
        day: str,
        entry: str,
        actual_cost: float,
        *,
        reservation: dict[str, Any] | None = None,
    ) -> None:
        """Replace an entry's reserved worst case by what the attempt actually cost.

        ``reservation`` is what the attempt's manifest recorded of it (``partition_key``,
        ``attempt``, ``worst_cost``): an entry that is missing or unreadable is rebuilt
        from it, with a warning naming the file, rather than failing the collection. An
        ``actual_cost`` that is not a finite amount >= 0 is not recorded: the entry keeps
        its reservation.
        """
        path = self._entry_path(day, entry)
        if not _is_amount(actual_cost):
            logger.warning(
                "budget entry %s: actual cost %r is not a finite amount >= 0; the entry "
                "keeps its reserved worst case",
                path,
                actual_cost,
            )
            return
        with self._store.lock(day):
            record = self._read(path)
            if isinstance(record, FileNotFoundError) and reservation is None:
                return  # reserved by an older version: nothing to settle
            if isinstance(record, Exception) or _entry_cost(record) is None:
                if reservation is None:
                    logger.warning(
                        "budget entry %s is unreadable (%s) and no manifest record was given "
                        "to rebuild it: left as it is; run `infron-dagster doctor` or delete "
                        "it if its attempt was never sent",
                        path,
                        _why(record),
                    )
                    return
                logger.warning(
                    "budget entry %s is %s: rebuilt from the manifest of partition %r attempt %s",
                    path,
                    "missing"
                    if isinstance(record, FileNotFoundError)
                    else f"unreadable ({_why(record)})",
                    printable(reservation.get("partition_key"), 100),
                    reservation.get("attempt"),
                )
                record = _rebuilt(reservation)
            record["actual_cost"] = float(actual_cost)
            record.pop("released", None)
            record.pop("released_at", None)
            self._store.write_json(path, record)

    def release_unpaid(
        self, *, grace_seconds: float = 600.0, days: list[str] | None = None
    ) -> list[str]:
        """Release the reservations of attempts that never created anything; say which.

        Judged from the manifests (the truth), for ``days`` (default: today and yesterday,
        UTC). A reservation is released when

        - its attempt has no manifest, it is older than ``grace_seconds`` and no run holds
          its partition's lock (its submission died before recording its intent: the
          reservation is written before the manifest, so a fresh one may still be staging);
        - its attempt's manifest records another reservation (the rerun reserved anew on
          another day) or none;
        - its attempt created no batch, has no chunk whose create may have happened
          (``uncertain``) and can create none any more (abandoned, cancelled, or nothing to
          send).

        An attempt still ``submitting`` with nothing created keeps its reservation: chunks
        waiting for admission, or the rerun of a killed submission, create under it. A
        released entry counts 0 and records why; settling it later records its cost again.
        Safe to call from every sensor tick of every process.

        Example::

            SpendLedger(storage).release_unpaid(grace_seconds=600)
            # -> ["budget entry .../a1-....json (partition 'a' attempt 1): no manifest ..."]
        """
        today = datetime.now(timezone.utc).date()
        wanted = (
            days
            if days is not None
            else [(today - timedelta(days=1)).isoformat(), today.isoformat()]
        )
        # Unsettled entries only (the attempts in flight), their manifests read at once.
        candidates = [
            (day, path, record, manifest)
            for day in wanted
            for path, record in self._entries(day)
            if isinstance(record, dict)
            and _unsettled(record)
            and (manifest := self._manifest_of(record)) is not None
        ]
        manifests = self._pipeline.read_many(m for *_, m in candidates)
        released: list[str] = []
        for day, path, record, manifest in candidates:
            found = manifests[str(manifest)]
            data = found if isinstance(found, Exception) else _parse(found)
            reason = _unpaid(day, path, record, data, grace_seconds)
            if reason is not None and self._release(day, path, record, reason, grace_seconds):
                released.append(
                    f"budget entry {path} (partition "
                    f"{printable(record.get('partition_key'), 100)!r} attempt "
                    f"{record.get('attempt')}): {reason}; released"
                )
        for line in released:
            logger.warning("%s", line)
        return released

    # --- internals -----------------------------------------------------------------------

    def _entry_path(self, day: str, entry: str) -> Any:
        return self._store.partition_dir("spend", day) / f"{entry}.json"

    def _entries(self, day: str) -> list[tuple[Any, Any]]:
        """Every entry of ``day``: (its path, its record or the exception reading it)."""
        folder = self._store.fresh(self._store.partition_dir("spend", day))
        if not self._store.exists(folder):
            return []
        paths = sorted(folder.glob("*.json"), key=lambda p: p.name)
        read = self._store.read_many(paths)
        out = []
        for path in paths:
            data = read[str(path)]
            if isinstance(data, FileNotFoundError):
                continue  # removed since the listing
            out.append((path, data if isinstance(data, Exception) else _parse(data)))
        return out

    def _read(self, path: Any) -> Any:
        data = self._store.read_many([path])[str(path)]
        return data if isinstance(data, Exception) else _parse(data)

    def _damaged_cost(
        self, day: str, name: str, path: Any, record: Any, budget: Budget | None
    ) -> float:
        """What an unreadable entry counts: its manifest's worst case, else the partition
        limit (no manifest: nothing was sent under it), with a warning naming the file."""
        why = _why(record)
        found = self._find_reservation(day, name)
        if isinstance(found, dict):
            worst = found["worst_cost"]
            logger.warning(
                "budget entry %s is unreadable (%s): counted at the worst case %.4f its "
                "manifest (partition %r attempt %s) records; it is rebuilt when that partition "
                "is collected again (or run `infron-dagster doctor`)",
                path,
                why,
                worst,
                printable(found["partition_key"], 100),
                found["attempt"],
            )
            return worst
        limit = budget.max_cost_per_partition if budget is not None else None
        if (
            found == "unreadable"
            and limit is None
            and budget is not None
            and (budget.max_cost_per_day is not None)
        ):
            raise DamagedLedger(
                f"budget entry {path} is unreadable ({why}) and so is the manifest of its "
                f"attempt: what it may spend is unknown, so max_cost_per_day cannot be kept "
                f"on {day} UTC. Restore either file, or delete the entry if that attempt "
                "created no batch (`infron-dagster doctor` checks), or set "
                "max_cost_per_partition (then an unknown entry counts that much)"
            )
        logger.warning(
            "budget entry %s is unreadable (%s) and %s: counted at %.4f%s. Delete the file "
            "if that attempt created no batch (`infron-dagster doctor` checks)",
            path,
            why,
            "its manifest is unreadable"
            if found == "unreadable"
            else "no manifest records it (nothing was sent under it)",
            limit or 0.0,
            " (max_cost_per_partition)" if limit else "",
        )
        return float(limit or 0.0)

    def _find_reservation(self, day: str, name: str) -> dict[str, Any] | str | None:
        """The reservation a manifest records for entry ``name``: found by the entry's
        attempt and the hash of each partition key with manifests (one listing, one read).
        ``"unreadable"`` when the manifest exists but cannot be read; None when none."""
        match = _ENTRY_RE.match(name)
        if not match:
            return None
        attempt = int(match.group(1))
        try:
            keys = self._pipeline.partitions_with_manifests()
        except Exception as exc:  # a hashed key's manifest unreadable: cannot look further
            logger.warning("could not list the manifests to find budget entry %s: %s", name, exc)
            return "unreadable"
        for key in keys:
            for candidate in [key, None] if key == UNPARTITIONED else [key]:
                if _entry_name(candidate, attempt) != name:
                    continue
                path = self._pipeline.manifest_path(candidate, attempt)
                data = self._read(path)
                if isinstance(data, FileNotFoundError):
                    return None
                spend = data.get("spend") if isinstance(data, dict) else None
                if not isinstance(spend, dict):
                    return "unreadable" if not isinstance(data, dict) else None
                if spend.get("entry") != name or spend.get("day") != day:
                    return None  # the manifest's reservation is another one
                worst = spend.get("worst_cost")
                if not _is_amount(worst):
                    return "unreadable"
                return {"partition_key": candidate, "attempt": attempt, "worst_cost": worst}
        return None

    def _manifest_of(self, record: dict[str, Any]) -> Any:
        """Where the manifest of an entry's attempt lives; None if the entry cannot say."""
        attempt, key = record.get("attempt"), record.get("partition_key")
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            return None
        if not (key is None or isinstance(key, str)):
            return None
        return self._pipeline.manifest_path(key, attempt)

    def _release(
        self, day: str, path: Any, record: dict[str, Any], reason: str, grace: float
    ) -> bool:
        """Mark one entry released, re-judged under its partition's lock and the day's."""
        key = record.get("partition_key")
        try:
            with self._pipeline.lock(key, wait_seconds=0.0), self._store.lock(day):
                now = self._read(path)
                if not isinstance(now, dict) or not _unsettled(now):
                    return False
                if now.get("reserved_at") != record.get("reserved_at"):
                    return False  # reserved again meanwhile
                manifest = self._manifest_of(now)
                if manifest is None or _unpaid(day, path, now, self._read(manifest), grace) is None:
                    return False
                now["actual_cost"] = 0.0
                now["released"] = reason
                now["released_at"] = _now()
                self._store.write_json(path, now)
        except LockTimeout:
            return False  # a run holds the partition: it may be spending under this entry
        return True


def _entry_name(partition_key: str | None, attempt: int) -> str:
    """One entry per (partition, attempt); a hash, so any partition key makes a safe name."""
    raw = f"{partition_key!r}\x1f{attempt}".encode()
    return f"a{attempt}-{hashlib.sha256(raw).hexdigest()[:20]}"


def _parse(data: bytes) -> Any:
    """An entry's record, or the exception that says why it is not one."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return exc
    if not isinstance(record, dict):
        return ValueError(f"a JSON {type(record).__name__}, not an object")
    return record


def _why(record: Any) -> str:
    if isinstance(record, Exception):
        return f"{type(record).__name__}: {printable(str(record), 200)}"
    return "its worst_cost is not a finite amount >= 0"


def _is_amount(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _unpaid(day: str, path: Any, record: dict[str, Any], data: Any, grace: float) -> str | None:
    """Why an unsettled entry is held by no attempt that may still spend under it, or None.

    ``data`` is the attempt's manifest (a dict) or the exception reading it.
    """
    name = path.name[: -len(".json")]
    if isinstance(data, FileNotFoundError):
        if _age(record) < grace:
            return None  # its submission may still be staging the intent
        return "no manifest: its submission ended before recording its intent"
    if isinstance(data, Exception) or not isinstance(data, dict):
        return None  # a damaged manifest fails its own partition; keep counting
    spend = data.get("spend")
    if not isinstance(spend, dict):
        return "its attempt's manifest records no reservation"
    if spend.get("entry") != name or spend.get("day") != day:
        return f"replaced by the attempt's reservation on another day ({spend.get('day')})"
    chunks = [c for c in data.get("chunks") or [] if isinstance(c, dict)]
    if any(c.get("batch_id") or c.get("uncertain") for c in chunks):
        return None  # created something (or may have): settled when collected
    if data.get("cancelled_at"):
        return "its attempt was cancelled before creating anything"
    if data.get("state") == "abandoned":
        return "its attempt was abandoned before creating anything"
    if data.get("state") != "submitting":
        return "its attempt had nothing to send"
    return None  # may still create: waiting for admission, or a rerun resumes it


def _entry_cost(record: dict[str, Any]) -> float | None:
    """What an entry counts: its actual cost once settled, else its reserved worst case;
    None when it is damaged (no reserved amount that can be true).

    An actual cost that cannot be true (negative, infinite: written by an older version
    from a hostile fee) counts the reservation instead.
    """
    worst = record.get("worst_cost")
    if not _is_amount(worst):
        return None
    actual = record.get("actual_cost")
    return float(actual) if _is_amount(actual) else float(worst)


def _unsettled(record: dict[str, Any]) -> bool:
    return record.get("actual_cost") is None and not record.get("released")


def _rebuilt(reservation: dict[str, Any]) -> dict[str, Any]:
    worst = reservation.get("worst_cost")
    return {
        "partition_key": reservation.get("partition_key"),
        "attempt": reservation.get("attempt"),
        "worst_cost": float(worst) if _is_amount(worst) else 0.0,
        "actual_cost": None,
        "over_budget_allowed": None,
        "reserved_at": None,
        "rebuilt_at": _now(),
        "rebuilt_from": "manifest",
    }


def _age(record: dict[str, Any]) -> float:
    """Seconds since the entry was reserved (infinite when it does not say)."""
    try:
        when = datetime.fromisoformat(str(record.get("reserved_at")))
    except ValueError:
        return math.inf
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - when).total_seconds()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check(partition_key: str | None, worst: float, spent: float, day: str, budget: Budget) -> None:
    where = f"partition {printable(partition_key, 100)!r}"
    per_partition = budget.max_cost_per_partition
    if per_partition is not None and worst > per_partition:
        raise BudgetExceeded(
            f"{where}: worst-case cost {worst:.4f} is over max_cost_per_partition "
            f"{per_partition:.4f} (already spent on {day} UTC: {spent:.4f}); nothing was sent. "
            "Lower max_tokens or the rows, raise the limit, or run once with "
            "allow_over_budget=True"
        )
    per_day = budget.max_cost_per_day
    if per_day is not None and spent + worst > per_day:
        raise BudgetExceeded(
            f"{where}: worst-case cost {worst:.4f} on top of {spent:.4f} already spent on "
            f"{day} UTC is over max_cost_per_day {per_day:.4f}; nothing was sent. "
            "Run it tomorrow, raise the limit, or run once with allow_over_budget=True"
        )
