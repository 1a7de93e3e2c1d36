"""An unattended night converges (issue 18): a 10-partition backfill through a faulty
provider ends with every row answered or failed for good, and nobody launched a run after
the backfill.

The provider (the embedded local server, state on disk, Infron's own wire style) fails 20 %
of the requests of every batch (a fresh draw per batch), expires the backfill's batches
part-way (60 % of each finished), answers every 2nd call of each client with 429
(``Retry-After: 0``; create calls included), adds a little latency to every call, and has a
5xx burst (every 3rd call, 500 and 503 alternating) during the first sensor iteration after
the backfill: the polls and the collections' downloads.
``auto_retry`` is on, backoff 0, ``max_attempts`` 3, with a price, a day budget and an
enqueued-token limit, so every ledger the lake keeps is written and must settle.

Driven as the daemon would, in process: the sensor ticks with a kept cursor and each run it
requests runs once per run_key (``harness.Pipeline``). The real ``dagster dev`` daemon
(``test_daemon.py``) takes a minute for three partitions and no fault, and its run queue
and tick interval add waiting, not behaviour: the runs here are the same asset jobs with
the same run requests, tags and configs, so the sensor and the requested runs are the
whole of what the daemon would do with this pipeline.

The 5xx burst stays away from create calls on purpose: a 5xx to a create leaves the chunk
uncertain, and in infron style (no list call) only a person can say whether the batch
exists; in openai style the re-attach after the grace converges and is pinned, kill point by
kill point, by ``restart_anywhere.py`` (the ``create_batch`` points of ``test_restart_*``).

The end state:

- every input row is in results or in failed exactly once, and every failed row is either not
  retryable or its partition used all of ``max_attempts``;
- the server: every batch is recorded by a manifest (no paid orphan), no custom_id was sent
  twice within one attempt, and none was sent again after an attempt that answered it;
- the runs: besides the backfill, every run in the instance is one the sensor requested;
- the caches: no retry marker, no in-flight marker, no admission entry, every budget
  reservation settled.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import INSTANT, dagster_instance, make_local_dir
from harness import Pipeline

import infron_dagster.retry as retry_module
from infron_dagster import Budget, InfronResource, ModelPrice, ParquetSource
from infron_dagster.columns import CUSTOM_ID
from infron_dagster.history import PartitionHistory
from infron_dagster.local import LocalServerConfig, save_config
from infron_dagster.local.store import Store
from infron_dagster.retry_queue import RetryQueue

KEYS = [f"2026-11-{day:02d}" for day in range(1, 11)]
PARTS = dg.StaticPartitionsDefinition(KEYS)
ROWS = 6  # per partition, in two chunks of 3
MAX_ATTEMPTS = 3
# The provider's faults: always, only while the backfill's batches are created, and in the
# burst (the first sensor iteration after the backfill).
NIGHT = {
    **INSTANT,
    "failure_rate": 0.2,
    "rate_limit_every": 2,
    "rate_limit_retry_after": 0.0,
    "latency_seconds": 0.002,
}
BACKFILL = {**NIGHT, "expire": True, "expire_fraction": 0.6}
BURST = {**NIGHT, "server_error_every": 3}


def _write_inputs(folder) -> ParquetSource:
    folder.mkdir(parents=True)
    for n, key in enumerate(KEYS):
        ids = list(range(n * 100, n * 100 + ROWS))
        table = pa.table({"id": ids, "text": [f"night review {i}" for i in ids]})
        pq.write_table(table, folder / f"{key}.parquet")
    return ParquetSource(str(folder / "{partition_key}.parquet"))


@pytest.fixture
def fast_client_retries(monkeypatch):
    """The client's backoff between retries of a 5xx, cut to milliseconds: the waits are
    the client's business (test_client pins them), the night's outcome is the lake's."""
    real = retry_module.RetryPolicy.delay

    def delay(self, attempt, response):
        return min(real(self, attempt, response), 0.01)

    monkeypatch.setattr(retry_module.RetryPolicy, "delay", delay)


def _flow(tmp_path) -> Pipeline:
    local = make_local_dir(str(tmp_path / "local"), **BACKFILL)
    resource = InfronResource(base_url=f"local://{local}", api_style="infron", max_retries=10)
    return Pipeline.build(
        tmp_path,
        resource,
        PARTS,
        source=_write_inputs(tmp_path / "inputs"),
        max_requests_per_batch=3,
        params={"max_tokens": 16},
        backfill_policy=dg.BackfillPolicy.single_run(),
        auto_retry=True,
        auto_retry_backoff_seconds=(0.0,),
        max_attempts=MAX_ATTEMPTS,
        price=ModelPrice(input_per_million=1.0, output_per_million=4.0),
        budget=Budget(max_cost_per_day=10.0, max_cost_per_partition=1.0),
        max_enqueued_tokens=100_000,
    )


def _provider(flow: Pipeline, knobs: dict[str, Any]) -> None:
    """What the provider does from now on (each client reads the config when it opens)."""
    save_config(flow.local_dir, LocalServerConfig(**knobs))


def _settled(flow: Pipeline):
    def check() -> bool:
        if RetryQueue(flow.storage).queued():
            return False
        return all(
            (a := PartitionHistory.load(flow.storage, k).active) and a[-1].state == "collected"
            for k in KEYS
        )

    return check


def test_a_faulty_night_converges_with_no_run_launched_by_hand(
    tmp_path, fast_client_retries, caplog
):
    caplog.set_level(logging.INFO, logger="infron_dagster.client")
    flow = _flow(tmp_path)
    with dagster_instance() as instance:
        backfill = dg.materialize(
            [flow.pipeline.batches_asset],
            instance=instance,
            resources=flow.resources,
            tags={
                "dagster/asset_partition_range_start": KEYS[0],
                "dagster/asset_partition_range_end": KEYS[-1],
            },
        )
        assert backfill.success
        _provider(flow, BURST)
        ticks = [0]

        def between() -> None:
            ticks[0] += 1
            if ticks[0] == 1:
                _provider(flow, NIGHT)

        flow.drive(instance, _settled(flow), timeout=120.0, between=between, pause=0.0)
        flow.tick(instance)  # the tick after the last collection releases what ended
        runs = instance.get_runs()
    _check_faults(flow, caplog.records)
    _check_rows(flow)
    _check_server(flow)
    _check_runs(flow, runs, backfill.run_id)
    _check_caches(flow)


def _check_faults(flow: Pipeline, records: list[logging.LogRecord]) -> None:
    """The night was as bad as it says: every fault happened, and the sensor retried."""
    retried = collections.Counter()
    for record in records:
        message = record.getMessage()
        for status in ("429", "500", "503"):
            if f"(HTTP {status})" in message and "; retry " in message:
                retried[(status, message.split(" ", 1)[0])] += 1
    assert retried[("429", "create")], f"no 429 on a create call: {retried}"
    assert retried[("500", "retrieve")] + retried[("503", "retrieve")], retried
    assert any(s in ("500", "503") and op == "download" for s, op in retried), retried
    statuses = collections.Counter((b["final"] or {}).get("status") for b in flow.server_batches())
    assert statuses["expired"] == 2 * len(KEYS), statuses  # every batch of the backfill
    assert len([r for r in flow.requested if "auto-retry" in r.run_key]) >= len(KEYS)


def _check_rows(flow: Pipeline) -> None:
    storage = flow.storage
    for key in KEYS:
        active = PartitionHistory.load(storage, key).active
        assert len(active) <= MAX_ATTEMPTS
        results, failed = flow.table("results", key), flow.table("failed", key)
        ids = collections.Counter(
            i for t in (results, failed) if t is not None for i in t.column("id").to_pylist()
        )
        n = KEYS.index(key)
        assert ids == collections.Counter(range(n * 100, n * 100 + ROWS)), (key, ids)
        if failed is not None and failed.num_rows:
            retryable = pc.sum(failed.column("retryable")).as_py() or 0
            assert retryable == 0 or len(active) == MAX_ATTEMPTS, (key, retryable, len(active))


def _check_server(flow: Pipeline) -> None:
    """Every batch on record, each custom_id sent once per attempt and never after an
    attempt answered it."""
    store = Store(flow.local_dir)
    attempt_of: dict[str, tuple[str, int]] = {}
    for key in KEYS:
        for m in flow.manifests(key):
            attempt_of.update({bid: (key, m.attempt) for bid in m.batch_ids})
    sent: collections.Counter = collections.Counter()
    answered: dict[str, int] = {}
    batches = store.list_batches()
    orphans = [b["id"] for b in batches if b["id"] not in attempt_of]
    assert not orphans, f"paid batches no manifest records: {orphans}"
    for batch in batches:
        key, attempt = attempt_of[batch["id"]]
        for cid in _custom_ids(store, batch["input_file_id"]):
            sent[(cid, attempt)] += 1
        final = batch["final"] or {}
        if final.get("output_file_id"):
            for cid in _custom_ids(store, final["output_file_id"], answered_only=True):
                answered[cid] = min(attempt, answered.get(cid, attempt))
    twice = {k: n for k, n in sent.items() if n > 1}
    assert not twice, f"custom_ids sent twice within one attempt: {twice}"
    again = [(cid, a) for (cid, a) in sent if cid in answered and a > answered[cid]]
    assert not again, f"answered rows sent again (paid twice): {again}"


def _custom_ids(store: Store, file_id: str, answered_only: bool = False) -> list[str]:
    """The custom_ids of a server file's lines (only the 200 answers: an infron-style
    output file holds the error lines too)."""
    with open(store.content_path(file_id), encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    return [line[CUSTOM_ID] for line in lines if not answered_only or _answered(line)]


def _answered(line: dict[str, Any]) -> bool:
    return not line.get("error") and (line.get("response") or {}).get("status_code") == 200


def _check_runs(flow: Pipeline, runs, backfill_id: str) -> None:
    """Besides the backfill, every run in the instance is one the sensor requested (its
    partition and the request's tags; a run may gain tags of its own), and none failed."""
    unmatched = list(flow.requested)
    strangers = []
    for run in runs:
        if run.run_id == backfill_id:
            continue
        match = next(
            (
                r
                for r in unmatched
                if r.partition_key == run.tags.get("dagster/partition")
                and (r.tags or {}).items() <= run.tags.items()
            ),
            None,
        )
        if match is None:
            strangers.append((run.run_id, run.tags))
        else:
            unmatched.remove(match)
    assert not strangers, f"runs nobody requested: {strangers}"
    assert not unmatched, f"requested runs never launched: {[r.run_key for r in unmatched]}"
    failed = [r.run_id for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
    assert not failed, f"runs that failed: {failed}"


def _check_caches(flow: Pipeline) -> None:
    storage = flow.storage
    assert not RetryQueue(storage).queued()
    markers = [m for m in storage.list_files(storage.base / "inflight") if m.startswith("part")]
    assert not markers, f"in-flight markers left: {markers}"
    ledger = storage.root / "_admission" / "infron.json"
    entries = json.loads(storage.fresh(ledger).read_bytes())["entries"]
    assert not [e for e in entries.values() if e["pipeline"] == "rev"], entries
    spends = {
        (m.spend["day"], m.spend["entry"]) for k in KEYS for m in flow.manifests(k) if m.spend
    }
    found = {}
    for path in storage.fresh(storage.base / "_ledger" / "spend").glob("partition=*/*.json"):
        day = path.parent.name[len("partition=") :]
        found[(day, path.name[: -len(".json")])] = json.loads(path.read_bytes())
    assert spends and spends <= set(found)
    unsettled = {k: e for k, e in found.items() if e.get("actual_cost") is None}
    assert not unsettled, f"reservations never settled: {unsettled}"
