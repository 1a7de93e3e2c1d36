"""The ``<name>_cancel`` job: :func:`cancel_partition` from the Dagster launchpad.

The use case lives in ``cancel.py`` (no Dagster); this module wraps it in a partitioned op
job and turns its :class:`CancelOutcome` into run metadata and log lines.

Example::

    job = build_cancel_job(name="reviews", storage=BatchStorage("/lake", "reviews"),
                           partitions_def=dg.StaticPartitionsDefinition(["a", "b"]))
    job.execute_in_process(partition_key="a", resources={"infron": InfronResource()})
"""

import logging
from typing import Any

import dagster as dg

from .cancel import BatchCancel, CancelOutcome, cancel_partition
from .metadata import id_metadata
from .resources import InfronResource
from .status import STATUS, cancel_status, record_status
from .storage import BatchStorage
from .untrusted import printable

__all__ = ["build_cancel_job", "cancel_metadata"]


def cancel_metadata(outcome: CancelOutcome) -> dict[str, Any]:
    """Run metadata of one cancel: its status, what was stopped, skipped or refused (only
    what happened), and a Markdown table of every batch.

    Example:
        >>> cancel_metadata(CancelOutcome(partition_key="a", submitted=False))["status"]
        'nothing in flight: never submitted'
    """
    counts = {
        "already_cancelling": len(outcome.ids("already_cancelling")),
        "already_finished": len(outcome.ids("already_finished")),
    }
    values: dict[str, Any] = {
        STATUS: cancel_status(outcome),
        "attempts": ", ".join(map(str, outcome.attempts)),
        **{k: v for k, v in counts.items() if v},
        "attempts_marked_cancelled": ", ".join(map(str, outcome.marked)),
        **id_metadata("cancelled_batch", outcome.cancelled_ids),
        **id_metadata("failed_batch", [b.batch_id for b in outcome.failed]),
        "unsent_chunks": _per_attempt(outcome.unsent_chunks),
        "uncertain_chunks": _per_attempt(outcome.uncertain_chunks),
        "summary": dg.MetadataValue.md(_summary_md(outcome)),
    }
    return {k: v for k, v in values.items() if v != ""}


def _per_attempt(counts: dict[int, int]) -> str:
    return ", ".join(f"attempt {a}: {n}" for a, n in sorted(counts.items()))


def _summary_md(outcome: CancelOutcome) -> str:
    lines = [outcome.message, ""]
    if outcome.batches:
        lines += ["| batch | attempt | action | status | finished |", "|---|---|---|---|---|"]
    for b in outcome.batches:
        done = f"{b.finished_requests}/{b.total_requests}" if b.total_requests else "-"
        action = f"{b.action}: {b.error}" if b.error else b.action
        name = printable(b.batch_id, 80).replace("|", "\\|")
        action = action.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {b.attempt} | {action} | {b.status or '-'} | {done} |")
    return "\n".join(lines)


def _log_line(name: str, key: str | None, result: BatchCancel) -> tuple[int, str]:
    where = f"{name} partition {printable(key or '-', 100)} attempt {result.attempt}"
    batch = f"batch {printable(result.batch_id, 80)}"
    done = ""
    if result.total_requests:
        done = f" ({result.finished_requests}/{result.total_requests} requests finished)"
    if result.action == "cancelled":
        return logging.INFO, f"{where}: cancelled {batch}, now {result.status}{done}"
    if result.action == "already_cancelling":
        return logging.INFO, f"{where}: {batch} is already being cancelled{done}"
    if result.action == "already_finished":
        return logging.INFO, f"{where}: {batch} already ended {result.status}; skipped{done}"
    return logging.ERROR, f"{where}: could not cancel {batch}: {result.error}"


def _failure(name: str, key: str | None, outcome: CancelOutcome) -> dg.Failure:
    named = "; ".join(
        f"{printable(b.batch_id, 80)} (attempt {b.attempt}): {b.error}" for b in outcome.failed
    )
    return dg.Failure(
        description=(
            f"could not cancel {len(outcome.failed)} batch(es) of {name} partition "
            f"{printable(key or '-', 100)!r}: {named}. The others were handled; "
            "running this job again retries only what is still in flight."
        ),
        metadata=cancel_metadata(outcome),
    )


def build_cancel_job(
    *,
    name: str,
    storage: BatchStorage,
    partitions_def: dg.PartitionsDefinition | None,
    resource_key: str = "infron",
) -> dg.JobDefinition:
    """The ``<name>_cancel`` job: cancel the in-flight batches of the chosen partition(s).

    An op job (it materializes no asset), partitioned like the pipeline so the launchpad and
    backfills pick partitions. Each batch cancelled is logged; the step output's metadata
    lists what was cancelled, skipped and refused. A partition with nothing in flight
    succeeds and says so; a batch whose cancel failed fails the run at the end, by name,
    after every other batch was tried.

    Example::

        job = build_cancel_job(name="reviews", storage=BatchStorage("/lake", "reviews"),
                               partitions_def=dg.StaticPartitionsDefinition(["a", "b"]))
        job.execute_in_process(partition_key="a", resources={"infron": InfronResource()})
    """

    batches_key = dg.AssetKey(f"{name}_batches")  # where the partition's status lives

    @dg.op(
        name=f"{name}_cancel_batches",
        required_resource_keys={resource_key},
        out=dg.Out(dg.Nothing),
        description=f"Cancels the in-flight batches of one partition of {name}.",
    )
    def _cancel(context: dg.OpExecutionContext) -> dg.Output[None]:
        key = context.partition_key if context.has_partition_key else None
        resource: InfronResource = getattr(context.resources, resource_key)

        def log(result: BatchCancel) -> None:
            level, text = _log_line(name, key, result)
            context.log.log(level, text)

        with resource.get_client() as client:
            outcome = cancel_partition(client, storage, key, on_batch=log)
        context.log.info(outcome.message)
        if outcome.submitted and not outcome.nothing_in_flight:
            status = cancel_status(outcome)
            record_status(context, batches_key, key, status, storage=storage)
        if outcome.failed:
            raise _failure(name, key, outcome)
        return dg.Output(None, metadata=cancel_metadata(outcome))

    @dg.job(
        name=f"{name}_cancel",
        partitions_def=partitions_def,
        tags={"infron/pipeline": name, "infron/action": "cancel"},
        description=(
            f"Cancel the in-flight batches of the chosen partition(s) of {name}; the sensor "
            "then collects the finished rows and fails the rest as batch_cancelled (retryable)."
        ),
    )
    def _job() -> None:
        _cancel()

    return _job
