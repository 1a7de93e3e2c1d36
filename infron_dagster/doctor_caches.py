"""The doctor's checks of the caches the manifests derive: the in-flight index, the
admission ledgers and the answers files (repair: written again from the manifests, else
deleted). See :mod:`infron_dagster.doctor` for the whole check and what each repair means.

Auto-retry markers (``retries/``) are not checked for a missing one: whether a collected
partition is owed one depends on ``auto_retry``, a setting of the code location that the
lake does not record, so from the lake alone a lost marker cannot be told from a partition
collected without ``auto_retry`` (reporting one would be a guess). The sensor, which knows
the setting, writes lost markers again at its full rescan (``auto_retry.restore_missing``)
and damaged ones when it reads them (``RetryQueue.queued``).

Example::

    [f.repair for f in check_inflight(lake) + check_admission(lake) + check_answers(lake)]
    # -> ['marker written', 'rebuilt from the manifests', 'rebuilt from the result files (10 answer(s))']
"""  # noqa: E501

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from upath import UPath

from .admission import LEDGER, AdmissionControl, _entry_key, _valid_entry
from .carry_cache import ANSWERED_SCHEMA as _ANSWERED
from .carry_cache import ANSWERS, answers_path, write_answers
from .carry_cache import parse_answers as _parse_answers
from .collect import CollectOutcome
from .doctor_lake import Finding, Lake, Pipeline
from .inflight import InFlightIndex
from .manifest import Manifest
from .merge import BATCHES_MARKER_RE as _MARKER_RE
from .merge import CarryCacheWriter as _Answers
from .storage import BatchStorage, decode_partition, encode_partition
from .untrusted import printable

__all__ = ["check_admission", "check_answers", "check_inflight"]

_MARKER_NAME_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")
_ANSWERS_RE = re.compile(r"^partition=([^/]+)/answers\.parquet$")


# --- in-flight markers ----------------------------------------------------------------------


def check_inflight(lake: Lake) -> list[Finding]:
    """In-flight markers against the manifests: an open attempt without a marker (the
    sensor misses it until its next full rescan, up to a day) is marked; a marker of an
    attempt collected, replaced or never written (older than the grace) is removed.

    Example::

        [f.problem for f in check_inflight(lake)]
        # -> ["partition 'c' attempt 1 is not collected but has no in-flight marker ..."]
    """
    findings = []
    for pipeline in lake.pipelines:
        findings += _missing_markers(lake, pipeline) + _stale_markers(lake, pipeline)
    return findings


def _markers(storage: BatchStorage) -> dict[tuple[str, int], float]:
    listed = storage.list_files(storage.base / "inflight")
    return {
        (m.group(1), int(m.group(2))): mtime
        for name, mtime in listed.items()
        if (m := _MARKER_NAME_RE.match(name))
    }


def _missing_markers(lake: Lake, pipeline: Pipeline) -> list[Finding]:
    index = InFlightIndex(pipeline.storage)
    markers = _markers(pipeline.storage)
    findings = []
    for segment in sorted(pipeline.manifests):
        if segment in pipeline.damaged:
            continue
        for manifest in pipeline.open_attempts(segment):
            if (segment, manifest.attempt) in markers:
                continue
            finding = Finding(
                str(index.marker(segment, manifest.attempt)),
                f"partition {printable(manifest.partition_key, 80)!r} attempt "
                f"{manifest.attempt} is not collected but has no in-flight marker: the sensor "
                "does not see it until its next full rescan",
                repair="marker written",
            )
            if lake.repair:
                index.mark(manifest.partition_key, manifest.attempt)
                finding.repaired = True
            findings.append(finding)
    return findings


def _stale_markers(lake: Lake, pipeline: Pipeline) -> list[Finding]:
    """Markers the sensor should have removed by now: their attempt was collected, replaced
    or never written more than ``grace_seconds`` ago (a younger one is the index's usual
    lag: the sensor's next tick removes it)."""
    index = InFlightIndex(pipeline.storage)
    now, findings, stale = time.time(), [], []
    for (segment, attempt), mtime in sorted(_markers(pipeline.storage).items()):
        if segment in pipeline.damaged:
            continue
        if attempt in {m.attempt for m in pipeline.open_attempts(segment)}:
            continue
        why, since = _why_stale(pipeline.attempts(segment), attempt, mtime)
        if now - since < lake.grace_seconds:
            continue
        path = index.marker(segment, attempt)
        findings.append(
            Finding(
                str(path),
                f"stale in-flight marker ({why}): the sensor removes these on its ticks; "
                "is it running?",
                repair="removed",
            )
        )
        stale.append(path)
    if lake.repair and stale:
        pipeline.storage.delete_many(stale)
        for finding in findings:
            finding.repaired = True
    return findings


def _why_stale(attempts: list[Manifest], attempt: int, mtime: float) -> tuple[str, float]:
    """Why a marker of a closed attempt is stale, and since when (a UNIX time).

    Example:
        >>> _why_stale([], 1, 1700000000.0)
        ('no manifest was ever written for it', 1700000000.0)
    """
    known = {m.attempt: m for m in attempts}
    if attempt not in known:
        return "no manifest was ever written for it", mtime
    manifest = known[attempt]
    if manifest.state == "collected":
        return "the attempt is collected", _timestamp(manifest.collected_at, mtime)
    newer = [m for m in attempts if m.attempt > attempt]
    if manifest.state != "abandoned" and newer:
        return "a newer attempt replaced it", _timestamp(newer[0].created_at, mtime)
    return f"the attempt is {manifest.state}", mtime


def _timestamp(iso: str | None, default: float) -> float:
    """An ISO-8601 time as a UNIX time (``default`` when absent or not a time)."""
    try:
        when = datetime.fromisoformat(str(iso))
    except ValueError:
        return default
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


# --- admission ledgers -----------------------------------------------------------------------


def _expected_admission(lake: Lake, scope: str) -> dict[str, dict[str, Any]]:
    """The entries a rebuild from the manifests gives ``scope`` (key -> batch id, chunk):
    every chunk created (or maybe created) by an open attempt counted against it."""
    expected: dict[str, dict[str, Any]] = {}
    for pipeline in lake.pipelines:
        for segment in pipeline.manifests:
            for manifest in pipeline.open_attempts(segment):
                if manifest.admission_scope != scope or manifest.state == "collected":
                    continue
                for chunk in manifest.chunks:
                    if chunk.batch_id or (chunk.uncertain and not manifest.cancelled):
                        key = _entry_key(
                            pipeline.name, manifest.partition_key, manifest.attempt, chunk.index
                        )
                        expected[key] = {"batch_id": chunk.batch_id, "manifest": manifest}
    return expected


def _read_admission(data: bytes | Exception) -> dict[str, dict[str, Any]] | Exception:
    """A ledger's entries, or why it is not a ledger this version wrote.

    Example:
        >>> _read_admission(b'{"version": 2, "entries": {}}')
        {}
    """
    if isinstance(data, Exception):
        return data
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return exc
    entries = parsed.get("entries") if isinstance(parsed, dict) else None
    if not isinstance(entries, dict):
        return ValueError("no 'entries' object: not an admission ledger")
    bad = [k for k, e in entries.items() if not _valid_entry(e)]
    if bad:
        return ValueError(f"{len(bad)} entr(y/ies) this version does not understand")
    return entries


def _stale_admission(lake: Lake, entry: dict[str, Any]) -> str | None:
    """Why a ledger entry that a rebuild would not keep is wrong; None when it is the
    reservation of a submission that may still create its chunk."""
    pipeline = next((p for p in lake.pipelines if p.name == entry["pipeline"]), None)
    where = (
        f"{entry['pipeline']} {printable(entry['partition_key'], 60)!r} attempt {entry['attempt']}"
    )
    manifest = pipeline.manifest(entry["partition_key"], entry["attempt"]) if pipeline else None
    if manifest is None:
        damaged = (
            pipeline is not None and encode_partition(entry["partition_key"]) in pipeline.damaged
        )
        return None if damaged else f"{where}: no manifest"
    if manifest.state in ("collected", "abandoned"):
        return f"{where}: {manifest.state}"
    chunk = next((c for c in manifest.chunks if c.index == entry["chunk"]), None)
    if chunk is None:
        return f"{where}: no chunk {entry['chunk']}"
    if manifest.cancelled and not chunk.batch_id:
        return f"{where}: cancelled"
    if chunk.batch_id:
        return f"{where}: not in flight (replaced, or another admission scope)"
    return None  # reserved, not created yet: its run settles it (the sensor, if it died)


def _admission_problems(
    lake: Lake, entries: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]
) -> list[str]:
    """What disagrees between a readable ledger and the manifests, as short phrases."""
    stale = [
        why
        for key, entry in sorted(entries.items())
        if key not in expected and (why := _stale_admission(lake, entry))
    ]
    missing = [
        f"{e['manifest'].name} {printable(e['manifest'].partition_key, 60)!r} attempt "
        f"{e['manifest'].attempt} batch {e['batch_id']}"
        for key, e in sorted(expected.items())
        if key not in entries
    ]
    differ = [
        f"{key}: {entries[key]['batch_id']} vs {e['batch_id']}"
        for key, e in sorted(expected.items())
        if key in entries and entries[key]["batch_id"] and entries[key]["batch_id"] != e["batch_id"]
    ]
    out = []
    if stale:
        out.append(f"{len(stale)} entr(y/ies) for attempts gone or done ({_few(stale)})")
    if missing:
        out.append(
            f"{len(missing)} chunk(s) in flight missing, their tokens not counted ({_few(missing)})"
        )
    if differ:
        out.append(
            f"{len(differ)} entr(y/ies) with another batch than the manifest ({_few(differ)})"
        )
    return out


def _few(items: Sequence[str], shown: int = 3) -> str:
    more = f", +{len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def check_admission(lake: Lake) -> list[Finding]:
    """Admission ledgers (``<root>/_admission/<scope>.json``) against the manifests:
    unreadable or foreign, entries of attempts gone, collected or cancelled, chunks in flight
    missing. Repair: rebuild from the manifests (run the in-flight check first: the rebuild
    reads the in-flight index).

    Example::

        [f.repair for f in check_admission(lake)]
        # -> ['rebuilt from the manifests']
    """
    store = lake.store(LEDGER)
    scopes = {
        m.admission_scope
        for p in lake.pipelines
        for ms in p.manifests.values()
        for m in ms.values()
        if m.admission_scope
    }
    by_file = {f"{encode_partition(s)}.json": s for s in scopes}
    listed = [n for n in store.list_files(store.base) if "/" not in n and n.endswith(".json")]
    raw = store.read_many(store.base / n for n in listed)
    findings = []
    for name in sorted(set(listed) | set(by_file)):
        scope = by_file.get(name) or decode_partition(name[: -len(".json")])
        path = store.base / name
        data = raw.get(str(path), FileNotFoundError(str(path)))
        finding = _check_ledger(lake, path, scope, data)
        if finding is not None:
            findings.append(finding)
    return findings


def _check_ledger(
    lake: Lake, path: UPath, scope: str | None, data: bytes | Exception
) -> Finding | None:
    expected = _expected_admission(lake, scope) if scope is not None else {}
    entries = _read_admission(data)
    if isinstance(entries, FileNotFoundError):
        if not expected:
            return None
        problem = f"missing while {len(expected)} chunk(s) are in flight"
    elif isinstance(entries, Exception):
        problem = f"unreadable ({type(entries).__name__}: {printable(entries, 120)})"
    else:
        problems = _admission_problems(lake, entries, expected)
        if not problems:
            return None
        problem = "; ".join(problems)
    finding = Finding(str(path), f"admission ledger {problem}", repair="rebuilt from the manifests")
    if scope is None:
        finding.repair = "deleted (a cache; its scope is unknown, rebuilt when next used)"
    if lake.repair:
        _repair_ledger(lake, path, scope)
        after = _read_admission(lake.store(LEDGER).read_many([path])[str(path)])
        if scope is None:
            finding.repaired = isinstance(after, FileNotFoundError)
        else:
            finding.repaired = isinstance(after, dict) and not _admission_problems(
                lake, after, expected
            )
        if not finding.repaired:
            finding.remedy = "still disagrees after the rebuild: a submission may run now; retry"
    return finding


def _repair_ledger(lake: Lake, path: UPath, scope: str | None) -> None:
    if scope is None:
        lake.store(LEDGER).delete(path)
        return
    # The limit and output tokens matter only to admit: a rebuild counts what manifests hold.
    control = AdmissionControl(
        lake.store("_doctor"), max_enqueued_tokens=1, output_tokens=0, scope=scope
    )
    control.rebuild()


# --- answers files ---------------------------------------------------------------------------


def check_answers(lake: Lake) -> list[Finding]:
    """Answers files (``reuse_answers="pipeline"``) that cannot be read: their answers are
    sent, and paid, again. Repair: rebuilt from the partition's result files, else deleted
    (a cache: the partition's next collection writes it again).

    Example::

        [f.repair for f in check_answers(lake)]
        # -> ['rebuilt from the result files (10 answer(s))']
    """
    findings = []
    for pipeline in lake.pipelines:
        storage = pipeline.storage
        folder = storage.base / ANSWERS
        names = sorted(n for n in storage.list_files(folder) if _ANSWERS_RE.match(n))
        raw = storage.read_many(folder / n for n in names)
        for name in names:
            error = _answers_error(raw[str(folder / name)])
            if error is None:
                continue
            segment = name.split("/", 1)[0][len("partition=") :]
            findings.append(_repair_answers(lake, pipeline, segment, folder / name, error))
    return findings


def _answers_error(data: bytes | Exception) -> Exception | None:
    if isinstance(data, FileNotFoundError):
        return None
    if isinstance(data, Exception):
        return data
    try:
        _parse_answers(data)
    except Exception as exc:
        return exc
    return None


def _repair_answers(
    lake: Lake, pipeline: Pipeline, segment: str, path: UPath, error: Exception
) -> Finding:
    finding = Finding(
        str(path),
        f"answers file unreadable ({type(error).__name__}: {printable(error, 120)}): its "
        "answers are not reused",
        repair="rebuilt from the result files (else deleted: a cache)",
    )
    if not lake.repair:
        return finding
    rows = None
    if pipeline.attempts(segment) and segment not in pipeline.damaged:
        try:
            rows = _rebuild_answers(pipeline, pipeline.key_of(segment))
        except Exception as exc:
            finding.problem += f"; rebuild failed ({type(exc).__name__}: {printable(exc, 120)})"
    if rows is None:
        pipeline.storage.delete(path)
        finding.repair = "deleted (a cache: the partition's next collection writes it again)"
    else:
        finding.repair = f"rebuilt from the result files ({rows} answer(s))"
    finding.repaired = True
    return finding


def _rebuild_answers(pipeline: Pipeline, partition_key: str | None) -> int:
    """Write a partition's answers file again from its attempts' result files; the rows.

    Example::

        _rebuild_answers(pipeline, "a")
        # -> 20
    """
    storage = pipeline.storage
    answers = _Answers(storage, partition_key, CollectOutcome(ready=True))
    raw = storage.list_files(storage.partition_dir("raw", partition_key))
    downloaded = {int(m.group(1)) for n in raw if (m := _MARKER_RE.match(n))}
    attempts = sorted(downloaded & {m.attempt for m in answers.manifests})
    write_answers(
        storage,
        partition_key,
        _ANSWERED.empty_table(),
        complete=(),  # nothing is listed yet: every attempt is read from its result files
        attempts=attempts,
        rebuild=answers._rebuild,
    )
    path = storage.fresh(answers_path(storage, partition_key))
    reader, _ = _parse_answers(path.read_bytes())
    return int(reader.metadata.num_rows)
