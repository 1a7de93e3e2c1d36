"""The collect side of a pipeline: the ``<name>_collect`` multi-asset that writes
``<name>_results`` and ``<name>_failed`` for a partition whose batches ended.

A collection never holds a worker for the hours a batch takes: it waits at most
``CollectConfig.wait_seconds``, then ends without collecting, and the sensor requests it
again when the batches end.

Example::

    collect = build_collect_assets(settings, dg.AssetKey("reviews_batches"),
                                   partitions_def=None, group_name=None)
"""

import time
import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg

from .auto_retry import retry_blocked
from .collect import CollectOutcome, collect_partition
from .history import PartitionHistory
from .metadata import failed_metadata, results_metadata, table_metadata
from .resources import InfronResource
from .retry_queue import RetryQueue, retry_delay
from .run_config import CollectConfig
from .spend import settle_collected
from .status import collection_status, failed_status, record_status
from .submission import PipelineSettings
from .table_loader import InfronTableIOManager, tables_io_manager_key
from .untrusted import printable

__all__ = ["build_collect_assets"]


def build_collect_assets(
    s: PipelineSettings,
    batches_key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition | None,
    group_name: str | None,
) -> dg.AssetsDefinition:
    """The ``<name>_collect`` multi-asset: ``<name>_results`` and ``<name>_failed`` of a
    partition, collected once its batches ended (the sensor requests the run).

    Example::

        collect = build_collect_assets(settings, dg.AssetKey("reviews_batches"), None, None)
        [k.to_user_string() for k in collect.keys]
        # -> ['reviews_failed', 'reviews_results']
    """
    results_key, failed_key = dg.AssetKey(f"{s.name}_results"), dg.AssetKey(f"{s.name}_failed")
    table = {"deps": [batches_key], "kinds": {"infron", "parquet"}, "skippable": True}
    table |= {"partitions_def": partitions_def, "group_name": group_name, **s.asset_options}
    specs = [
        dg.AssetSpec(
            results_key,
            description=(
                f"Successful responses of {s.name}, hive-partitioned Parquet. Where a "
                f"partition stands before it is collected: the 'status' of {s.name}_batches "
                "in its Partitions tab."
            ),
            metadata=table_metadata(s.storage, "results"),
            **table,
        ),
        dg.AssetSpec(
            failed_key,
            description=f"Rows of {s.name} that failed, with error_code and retryable.",
            metadata=table_metadata(s.storage, "failed"),
            **table,
        ),
    ]
    # Downstream assets load the tables through this IO manager; it only reads, since
    # collection writes the files itself (a MaterializeResult has no value to store).
    tables_key = tables_io_manager_key(s.name)
    specs = [spec.with_io_manager_key(tables_key) for spec in specs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # resource_defs on a multi_asset
        decorator = dg.multi_asset(
            name=f"{s.name}_collect",
            specs=specs,
            pool=s.pool,
            required_resource_keys={s.resource_key},
            resource_defs={tables_key: InfronTableIOManager(s.storage)},
            can_subset=False,
        )

    def _collect(context: dg.AssetExecutionContext, config: CollectConfig):
        key = context.partition_key if context.has_partition_key else None
        resource: InfronResource = getattr(context.resources, s.resource_key)
        for old in ("max_run_retries", "retry_after_seconds"):
            if getattr(config, old) is not None:  # the run's own log, where its owner looks
                context.log.warning(
                    f"run config {old!r} is deprecated and ignored (removed in 0.2.0): the "
                    f"sensor requests a failed collection again by itself"
                )
        try:
            outcome = _collect_waiting(s, resource, key, config, context)
            if outcome is not None:  # else nothing to collect now: nothing is materialized
                yield from _collect_results(s, key, outcome, results_key, failed_key)
        except Exception as exc:  # said on the partition, then the run fails as before
            failed = failed_status("collection", exc)
            record_status(context, batches_key, key, failed, storage=s.storage)
            raise
        if outcome is not None:
            status = collection_status(outcome)
            record_status(context, batches_key, key, status, storage=s.storage)

    return decorator(_collect)


def _collect_waiting(
    s: PipelineSettings,
    resource: InfronResource,
    key: str | None,
    config: CollectConfig,
    context: dg.AssetExecutionContext,
) -> CollectOutcome | None:
    """The collected partition, or None when there is nothing to collect now: the partition
    was never submitted, or its batches are still running.

    A collection never holds a worker for the hours a batch takes: after at most
    ``wait_seconds`` it logs where the batches stand and ends, and the sensor collects the
    partition when they finish. The run succeeds and the partition is not marked failed.
    """
    history = PartitionHistory.load(s.storage, key)
    if not history.manifests:
        # Nothing is collected and nothing failed: the run ends without materializing, so
        # the partition's checks are skipped rather than marked as failed executions.
        context.log.error(
            f"partition {key!r} of {s.name} was never submitted: nothing to collect. "
            f"Materialize {s.name}_batches for it first (the sensor then collects it)"
        )
        return None
    deadline = time.monotonic() + config.wait_seconds
    with resource.get_client() as client:
        while True:
            outcome = collect_partition(
                client,
                s.storage,
                s.spec,
                key,
                keep_columns=s.keep_columns,
                max_line_bytes=s.max_line_bytes,
                price=s.spend.price,
                history=history,
                on_written=lambda written: _before_commit(s, written, context),
            )
            if outcome.ready:
                return outcome
            if time.monotonic() >= deadline:
                context.log.info(
                    f"partition {key!r} is not finished ({_waiting_summary(outcome)}); nothing "
                    f"collected now: {s.name}_sensor collects it when its batches end"
                )
                return None
            time.sleep(config.poll_interval_seconds)
            history = history.reload()


def _before_commit(
    s: PipelineSettings, outcome: CollectOutcome, context: dg.AssetExecutionContext
) -> dict[str, Any]:
    """What must hold before the manifests say collected: the budget settled, and (with
    ``auto_retry``) the partition queued for its retry. Killed in between, the collection
    runs again and does both again."""
    settled = settle_collected(s.spend, outcome)
    if s.auto_retry:
        note = queue_retry(s, outcome)
        if note:
            context.log.info(note)
            settled = {**settled, "auto_retry": note}
    return settled


def queue_retry(s: PipelineSettings, outcome: CollectOutcome) -> str:
    """Queue the automatic retry of a collection's retryable failed rows, if attempts
    remain; what was decided, in one sentence (empty when nothing failed retryably)."""
    retryable = outcome.retryable_rows
    if not retryable:
        return ""
    assert outcome.history is not None  # a collection that wrote tables has one
    # The same rule the sensor applies before it requests the retry (the history as it was
    # re-read under the partition lock, so a cancel made during the collection counts).
    if why := retry_blocked(outcome.history, s.max_attempts):
        return f"{retryable} retryable row(s) stay failed: {why}, no automatic retry"
    attempts = len(outcome.attempts)
    delay = retry_delay(s.auto_retry_backoff, attempts)
    key, latest = outcome.history.partition_key, outcome.attempts[-1]
    RetryQueue(s.storage).mark(key, latest, time.time() + delay, retryable)
    return (
        f"{retryable} retryable row(s): the sensor retries them as attempt {latest + 1} of "
        f"{s.max_attempts} in about {round(delay)} s"
    )


def _waiting_summary(outcome: CollectOutcome) -> str:
    shown = ", ".join(printable(w, 80) for w in outcome.waiting_on[:5])
    more = len(outcome.waiting_on) - 5
    return f"waiting on {shown}" + (f" and {more} more" if more > 0 else "")


def _collect_results(
    s: PipelineSettings,
    key: str | None,
    outcome: CollectOutcome,
    results_key: dg.AssetKey,
    failed_key: dg.AssetKey,
) -> Iterator[dg.MaterializeResult]:
    yield dg.MaterializeResult(asset_key=results_key, metadata=results_metadata(s, key, outcome))
    yield dg.MaterializeResult(asset_key=failed_key, metadata=failed_metadata(s, key, outcome))
