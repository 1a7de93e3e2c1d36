"""Asset checks of a pipeline's collected tables, one result per partition.

They read what collection wrote (the tables and the manifests on storage), so a partition's
result stays its own: a partition with 53 % failed rows stays failed whatever another
partition does. They run in the collection run, after the tables, and are skipped when
there is nothing collected to check (the run collected nothing because the batches are still
in flight or the partition was never submitted, or the checks were launched on their own for
such a partition): Dagster then shows them as skipped, never as failed.

Example::

    checks = build_collect_checks(name="reviews", storage=storage,
        results_key=dg.AssetKey("reviews_results"), failed_key=dg.AssetKey("reviews_failed"),
        partitions_def=daily, max_failure_rate=0.05, blocking=True)
"""

import warnings
from collections.abc import Iterator

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from .collect import active_attempts
from .columns import CUSTOM_ID
from .manifest import load_manifests
from .storage import BatchStorage
from .untrusted import printable

__all__ = ["build_collect_checks"]


def build_collect_checks(
    *,
    name: str,
    storage: BatchStorage,
    results_key: dg.AssetKey,
    failed_key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition | None,
    max_failure_rate: float,
    blocking: bool = False,
) -> dg.AssetChecksDefinition:
    """``completeness`` on ``<name>_results`` and ``failure_rate`` on ``<name>_failed``.

    With ``blocking=True`` a failure rate over ``max_failure_rate`` is an error that stops
    downstream assets of that partition from running; otherwise it is a warning.

    Example::

        build_collect_checks(name="r", storage=BatchStorage("/lake", "r"),
            results_key=dg.AssetKey("r_results"), failed_key=dg.AssetKey("r_failed"),
            partitions_def=None, max_failure_rate=0.05)
    """
    with warnings.catch_warnings():
        # Partitioned checks are in preview in Dagster, and they are the point: each
        # partition keeps its own result instead of the latest one standing for all.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        specs = [
            dg.AssetCheckSpec(
                "completeness",
                asset=results_key,
                partitions_def=partitions_def,
                description="results + failed rows equal the input rows, each row once",
            ),
            dg.AssetCheckSpec(
                "failure_rate",
                asset=failed_key,
                partitions_def=partitions_def,
                blocking=blocking,
                description=f"at most {max_failure_rate:.1%} of the partition's rows failed",
            ),
        ]

    # can_subset: a check may end without a result (nothing collected), and a run may select
    # one of the two
    @dg.multi_asset_check(specs=specs, name=f"{name}_checks", can_subset=True)
    def _checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        op = context.op_execution_context
        key = op.partition_key if op.has_partition_key else None
        input_rows = _collected_input_rows(storage, key)
        if input_rows is None:
            # Nothing collected to check (never submitted, or its first attempt still in
            # flight): no result, so Dagster shows the checks as skipped, not failed.
            op.log.warning(
                f"partition {printable(key or '-', 100)!r} of {name} has nothing collected: "
                "its checks are skipped"
            )
            return
        ok = storage.read_table(storage.table_path("results", key)).column(CUSTOM_ID)
        failed = storage.read_table(storage.table_path("failed", key))
        selected = context.selected_asset_check_keys
        if dg.AssetCheckKey(results_key, "completeness") in selected:
            yield _completeness(results_key, input_rows, ok.to_pylist(), failed)
        if dg.AssetCheckKey(failed_key, "failure_rate") in selected:
            yield _failure_rate(failed_key, input_rows, failed, max_failure_rate, blocking)

    return _checks


def _collected_input_rows(storage: BatchStorage, key: str | None) -> int | None:
    """The partition's input rows, or None when none of its attempts is collected."""
    attempts = active_attempts(load_manifests(storage, key))
    if not any(m.state == "collected" for m in attempts):
        return None
    return attempts[0].row_count


def _completeness(
    asset: dg.AssetKey, input_rows: int, ok_ids: list[str], failed: pa.Table
) -> dg.AssetCheckResult:
    ids = ok_ids + failed.column(CUSTOM_ID).to_pylist()
    duplicated = len(ids) - len(set(ids))
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name="completeness",
        passed=len(ids) == input_rows and duplicated == 0,
        metadata={
            "input_rows": input_rows,
            "accounted_rows": len(ids),
            **({"duplicated_rows": duplicated} if duplicated else {}),
        },
    )


def _failure_rate(
    asset: dg.AssetKey, input_rows: int, failed: pa.Table, threshold: float, blocking: bool
) -> dg.AssetCheckResult:
    bad = failed.num_rows
    rate = bad / input_rows if input_rows else 0.0
    retryable = int(pc.sum(failed.column("retryable")).as_py() or 0) if bad else 0
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name="failure_rate",
        passed=rate <= threshold,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={
            # a share as people read it; the exact counts beside it
            "failure_rate": dg.MetadataValue.text(f"{rate:.1%} (at most {threshold:.1%})"),
            "input_rows": input_rows,
            **({"failed_rows": bad} if bad else {}),
            **({"retryable_rows": retryable} if retryable else {}),
        },
    )
