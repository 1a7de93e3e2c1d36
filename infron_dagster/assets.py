"""The Dagster side: one factory that builds the submit asset, the collect assets, the sensor
and the retry and cancel jobs of a batch inference pipeline.

Example:
    >>> import dagster as dg
    >>> pipeline = build_infron_batch_assets(
    ...     name="review_sentiment",
    ...     spec=RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of: {text}",
    ...                      key_columns=("review_id",)),
    ...     source=dg.AssetKey("reviews"),
    ...     partitions_def=dg.DailyPartitionsDefinition(start_date="2026-11-01"),
    ...     storage_root="s3://lake/llm",
    ... )
    >>> defs = dg.Definitions.merge(pipeline.definitions, dg.Definitions(
    ...     resources={"infron": InfronResource(api_key=dg.EnvVar("INFRON_API_KEY"))}))
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dagster as dg

from .admission import AdmissionControl
from .budget import Budget
from .cancel_job import build_cancel_job
from .checks import build_collect_checks
from .collect_asset import build_collect_assets
from .errors import SubmitRefused
from .metadata import (
    dry_run_error_metadata,
    submission_metadata,
)
from .pilot import PilotPolicy
from .prepare import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS
from .pricing import ModelPrice, max_output_tokens
from .resources import InfronResource
from .results import DEFAULT_MAX_LINE_BYTES
from .retry_queue import DEFAULT_BACKOFF_SECONDS
from .run_config import CollectConfig, SubmitConfig
from .sensor import build_infron_batch_sensor
from .sources import ParquetSource
from .spec import RequestSpec
from .spend import SpendControl
from .status import STATUS, tag_run
from .storage import BatchStorage
from .submission import PipelineSettings, SubmissionReport, SubmitFlags, submit_partition
from .table_loader import tables_io_manager_key
from .untrusted import printable

__all__ = [
    "CollectConfig",
    "InfronBatchPipeline",
    "SubmitConfig",
    "build_infron_batch_assets",
]

KINDS = {"infron"}


@dataclass(frozen=True)
class InfronBatchPipeline:
    """Everything one pipeline defines; ``definitions`` puts it all in a ``dg.Definitions``.

    Example::

        pipeline.batches_asset.key
        # -> AssetKey(['review_sentiment_batches'])
    """

    name: str
    batches_asset: dg.AssetsDefinition
    collect_assets: dg.AssetsDefinition
    collect_checks: dg.AssetChecksDefinition
    sensor: dg.SensorDefinition
    retry_job: Any  # what dg.define_asset_job returns (an unresolved asset job)
    cancel_job: dg.JobDefinition
    storage: BatchStorage

    @property
    def results_key(self) -> dg.AssetKey:
        return dg.AssetKey(f"{self.name}_results")

    @property
    def failed_key(self) -> dg.AssetKey:
        return dg.AssetKey(f"{self.name}_failed")

    @property
    def tables_key(self) -> str:
        """The resource key of the IO manager that loads ``<name>_results``/``<name>_failed``
        into downstream assets; it is bound to the collect assets, so nothing to supply."""
        return tables_io_manager_key(self.name)

    @property
    def definitions(self) -> dg.Definitions:
        """The assets, sensor and jobs, ready to merge with your resources."""
        return dg.Definitions(
            assets=[self.batches_asset, self.collect_assets],
            asset_checks=[self.collect_checks],
            sensors=[self.sensor],
            jobs=[self.retry_job, self.cancel_job],
        )

    @property
    def collect_definitions(self) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
        """The collect assets and their checks, e.g. for ``dg.materialize``."""
        return [self.collect_assets, self.collect_checks]


def build_infron_batch_assets(
    *,
    name: str,
    spec: RequestSpec,
    source: dg.AssetKey | str | dg.AssetsDefinition | ParquetSource,
    partitions_def: dg.PartitionsDefinition | None = None,
    storage_root: str = ".infron_data/lake",
    storage_options: dict[str, Any] | None = None,
    keep_columns: Sequence[str] | None = None,
    max_requests_per_batch: int = DEFAULT_MAX_REQUESTS,
    max_bytes_per_batch: int = DEFAULT_MAX_BYTES,
    max_attempts: int = 3,
    max_failure_rate: float = 0.05,
    max_result_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    resource_key: str = "infron",
    group_name: str | None = None,
    owners: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
    automation_condition: dg.AutomationCondition | None = None,
    backfill_policy: dg.BackfillPolicy | None = None,
    pool: str | None = None,
    price: ModelPrice | None = None,
    budget: Budget | None = None,
    block_on_failure_rate: bool = False,
    sensor_interval_seconds: int = 30,
    sensor_default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    on_changed_input_in_flight: Literal["carry", "cancel"] = "carry",
    reuse_answers: Literal["partition", "pipeline"] = "partition",
    max_enqueued_tokens: int | None = None,
    auto_retry: bool = False,
    auto_retry_backoff_seconds: Sequence[float] = DEFAULT_BACKOFF_SECONDS,
    pilot_rows: int | None = None,
    pilot_scope: Literal["pipeline", "partition"] = "pipeline",
    pilot_max_output_tokens: int | None = None,
) -> InfronBatchPipeline:
    """Build ``<name>_batches``, ``<name>_results``/``<name>_failed``, ``<name>_sensor``,
    ``<name>_retry`` and ``<name>_cancel`` for one batch inference step.

    ``budget`` refuses a submission whose worst case crosses a limit before any paid call
    (``SubmitConfig(allow_over_budget=True)`` overrides it once).

    Args:
        name: the pipeline's name, the prefix of every asset, job and sensor it defines.
        spec: the :class:`RequestSpec` (model, prompt template or body function, schema).
        source: the upstream asset (key, name or definition; its IO manager loads the
            partition's DataFrame or Arrow table) or a :class:`ParquetSource`.
        partitions_def: the partitions of the pipeline (None: unpartitioned).
        storage_root: where files live, a local folder or ``s3://...``.
        storage_options: fsspec options for ``storage_root`` (credentials, endpoint).
        keep_columns: input columns copied to the results and failed tables.
        max_requests_per_batch: requests per batch (chunk), at most 50,000.
        max_bytes_per_batch: bytes per request file, at most 200 MB.
        max_attempts: attempts per partition, the first included, before retries stop.
        max_failure_rate: the ``failure_rate`` check's threshold.
        max_result_line_bytes: a longer result line fails its row (``result_too_large``)
            instead of taking memory.
        resource_key: the key of the :class:`InfronResource`.
        group_name: the Dagster asset group.
        owners: owners of the batches asset and the collected tables.
        tags: tags of the batches asset and the collected tables.
        automation_condition: when to submit (on the batches asset).
        backfill_policy: the batches asset's backfill policy: ``dg.BackfillPolicy.single_run()``
            submits a backfill's whole range in one run, each partition its own attempt.
        pool: a Dagster concurrency pool for submit and collect runs, so a large backfill
            does not open one connection to the provider per partition at once.
        price: the :class:`ModelPrice` of ``spec.model``: token estimates become money.
        budget: a :class:`Budget` that refuses submissions over a limit.
        block_on_failure_rate: make the ``failure_rate`` check blocking: downstream assets
            of a partition over ``max_failure_rate`` do not run.
        sensor_interval_seconds: seconds between sensor ticks.
        sensor_default_status: the sensor's status when the code location loads.
        on_changed_input_in_flight: what a changed input does to a partition whose batches
            still run: ``"carry"`` (default) sends only the changed rows, the unchanged ones
            wait for the answers being paid for; ``"cancel"`` cancels the running batches
            first and sends every row again.
        reuse_answers: ``"pipeline"`` carries a request whose exact body was answered in any
            other partition instead of sending it; ``"partition"`` (default) reuses only a
            partition's own answers (some want fresh samples per partition).
        max_enqueued_tokens: admission control (shared by the pipelines of ``storage_root``
            and ``resource_key``): a cap on the estimated tokens of created batches not yet
            finished; a submission creates the chunks that fit, and the sensor requests the
            run that submits the rest when capacity frees (None: no cap).
        auto_retry: the sensor retries a collected partition's retryable failed rows by
            itself (a ``<name>_batches`` run with ``retry_failed``), up to ``max_attempts``;
            non-retryable failures are never retried.
        auto_retry_backoff_seconds: the wait before attempt 2, attempt 3, ... (the last
            value repeats); default 10 and 30 minutes.
        pilot_rows: send this many rows of a new prompt first (a sample by ``custom_id``),
            and the rest only once the sensor has collected them and found the failure
            rate, the share of answers that fit the response schema or were cut at
            ``max_tokens`` within ``max_failure_rate`` (and the mean output tokens within
            ``pilot_max_output_tokens``); the rest is then sent with an estimate and budget
            check calibrated by the pilot's output tokens, by a run the sensor requests.
            A failed pilot sends nothing more: the other rows fail as ``pilot_stopped``
            with a message saying what failed and what to fix (None: no pilot).
        pilot_scope: ``"pipeline"`` (default): one pilot per prompt for the whole
            pipeline; partitions submitted while it runs wait for its verdict.
            ``"partition"``: each partition's first submission of a prompt pilots.
        pilot_max_output_tokens: stop the pilot when its answers average more output tokens
            than this (a prompt that rambles costs more than planned; None: no limit).

    Example::

        pipeline = build_infron_batch_assets(
            name="review_sentiment",
            spec=RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of: {text}",
                             key_columns=("review_id",)),
            source=dg.AssetKey("reviews"),
            partitions_def=dg.DailyPartitionsDefinition(start_date="2026-11-01"),
            price=ModelPrice(input_per_million=0.15, output_per_million=0.60),
            budget=Budget(max_cost_per_day=20.0),
        )
        defs = dg.Definitions.merge(pipeline.definitions, dg.Definitions(
            resources={"infron": InfronResource(api_key=dg.EnvVar("INFRON_API_KEY"))}))
    """
    _check_choices(reuse_answers, on_changed_input_in_flight, max_result_line_bytes)
    if any(not 0 <= float(b) < float("inf") for b in auto_retry_backoff_seconds):
        raise ValueError("auto_retry_backoff_seconds must be finite delays >= 0")
    _check_source(source, partitions_def)
    pilot = None
    if pilot_rows is not None:
        pilot = PilotPolicy(
            pilot_rows, pilot_scope, float(max_failure_rate), pilot_max_output_tokens
        )
    storage = BatchStorage(storage_root, name, storage_options)
    admission = None
    if max_enqueued_tokens is not None:
        admission = AdmissionControl(
            storage,
            max_enqueued_tokens=max_enqueued_tokens,
            output_tokens=max_output_tokens(spec),
            scope=resource_key,
        )
    settings = PipelineSettings(
        name,
        spec,
        storage,
        keep_columns,
        max_requests_per_batch,
        max_bytes_per_batch,
        max_attempts,
        max_failure_rate,
        resource_key,
        max_result_line_bytes,
        {"owners": list(owners or []), "tags": dict(tags or {})},
        pool,
        SpendControl(storage, spec, price, budget),
        on_changed_input_in_flight=on_changed_input_in_flight,
        reuse_answers=reuse_answers,
        admission=admission,
        auto_retry=auto_retry,
        auto_retry_backoff=tuple(float(b) for b in auto_retry_backoff_seconds),
        pilot=pilot,
    )
    batches = _batches_asset(
        settings, source, partitions_def, group_name, automation_condition, backfill_policy
    )
    collect = build_collect_assets(settings, batches.key, partitions_def, group_name)
    results_key, failed_key = dg.AssetKey(f"{name}_results"), dg.AssetKey(f"{name}_failed")
    checks = build_collect_checks(
        name=name,
        storage=storage,
        results_key=results_key,
        failed_key=failed_key,
        partitions_def=partitions_def,
        max_failure_rate=max_failure_rate,
        blocking=block_on_failure_rate,
    )
    sensor = build_infron_batch_sensor(
        name=name,
        storage=storage,
        collect_keys=[results_key, failed_key],
        resource_key=resource_key,
        partitioned=partitions_def is not None,
        minimum_interval_seconds=sensor_interval_seconds,
        default_status=sensor_default_status,
        admission=admission,
        budget_ledger=price is not None,
        auto_retry=auto_retry,
        max_attempts=max_attempts,
    )
    retry_job = _retry_job(name, batches, partitions_def)
    cancel_job = build_cancel_job(
        name=name, storage=storage, partitions_def=partitions_def, resource_key=resource_key
    )
    return InfronBatchPipeline(
        name, batches, collect, checks, sensor, retry_job, cancel_job, storage
    )


def _check_choices(reuse_answers: str, on_changed: str, max_result_line_bytes: int) -> None:
    if reuse_answers not in ("partition", "pipeline"):
        raise ValueError(f"reuse_answers must be 'partition' or 'pipeline', not {reuse_answers!r}")
    if on_changed not in ("carry", "cancel"):
        raise ValueError(
            f"on_changed_input_in_flight must be 'carry' or 'cancel', not {on_changed!r}"
        )
    if max_result_line_bytes < 1024:
        raise ValueError("max_result_line_bytes must be at least 1024")


def _retry_job(
    name: str, batches: dg.AssetsDefinition, partitions_def: dg.PartitionsDefinition | None
) -> Any:
    """``<name>_retry``: the batches asset with ``retry_failed: true``."""
    return dg.define_asset_job(
        f"{name}_retry",
        selection=[batches.key],
        partitions_def=partitions_def,
        config={"ops": {batches.op.name: {"config": {"retry_failed": True}}}},
        description=f"Retry failed rows of {name}: resubmits only the retryable failed rows "
        "of the chosen partitions as a new attempt (nothing answered is paid for again).",
    )


def _check_source(source: Any, partitions_def: dg.PartitionsDefinition | None) -> None:
    unkeyed = isinstance(source, ParquetSource) and "{partition_key}" not in source.path_template
    if unkeyed and partitions_def is not None:
        # Every partition would read (and pay for) the same rows.
        raise ValueError(
            f"ParquetSource path_template {source.path_template!r} has no "
            "{partition_key} placeholder, but the pipeline is partitioned"
        )


# --- submit ------------------------------------------------------------------------------


def _batches_asset(
    s: PipelineSettings,
    source: dg.AssetKey | str | dg.AssetsDefinition | ParquetSource,
    partitions_def: dg.PartitionsDefinition | None,
    group_name: str | None,
    automation_condition: dg.AutomationCondition | None,
    backfill_policy: dg.BackfillPolicy | None,
) -> dg.AssetsDefinition:
    upstream = _upstream_key(source)
    ins = {"rows": dg.AssetIn(key=upstream)} if upstream is not None else {}
    description = (
        f"Submits {s.spec.endpoint} requests for {s.name} to the batch API "
        f"(model {s.spec.model}); never pays twice for the same rendered requests."
    )

    def run(context: dg.AssetExecutionContext, config: SubmitConfig, rows: Any):
        resource: InfronResource = getattr(context.resources, s.resource_key)
        if context.has_partition_key_range and not context.has_partition_key:
            yield from _submit_range(s, source, resource, rows, config, context)
            return
        key = context.partition_key if context.has_partition_key else None
        if config.dry_run:
            yield from _dry_run(s, source, resource, rows, key, config, context)
            return
        report = _submit_partition(s, source, resource, rows, key, config, context.run_id)
        _log_pilot(context, key, report)
        if getattr(report, "not_reused", ""):  # mock answers are never reused for real
            context.log.warning(f"partition {key!r}: {report.not_reused}")
        metadata = _metadata(report, resource)
        tag_run(context.instance, context.run_id, s.name, key, metadata.get(STATUS, ""))
        yield dg.MaterializeResult(metadata=metadata)

    decorator = dg.asset(
        name=f"{s.name}_batches",
        ins=ins,
        partitions_def=partitions_def,
        kinds=KINDS,
        group_name=group_name,
        required_resource_keys={s.resource_key},
        description=description,
        automation_condition=automation_condition,
        backfill_policy=backfill_policy,
        pool=s.pool,
        output_required=False,  # a dry run materializes nothing
        **s.asset_options,
    )
    if upstream is None:

        def _from_storage(context: dg.AssetExecutionContext, config: SubmitConfig):
            yield from run(context, config, None)

        return decorator(_from_storage)

    def _from_upstream(context: dg.AssetExecutionContext, config: SubmitConfig, rows: Any):
        yield from run(context, config, rows)

    return decorator(_from_upstream)


def _dry_run(
    s: PipelineSettings,
    source: Any,
    resource: InfronResource,
    rows: Any,
    key: str | None,
    config: SubmitConfig,
    context: dg.AssetExecutionContext,
) -> Iterator[Any]:
    """A dry run materializes nothing, and what it finds (even a problem) is an observation:
    a failed dry run must not mark the partition failed in the UI."""
    asset_key = context.assets_def.key
    try:
        report = _submit_partition(s, source, resource, rows, key, config, context.run_id)
    except Exception as exc:  # reported as what a real run would hit, not as a failure
        why = f"{type(exc).__name__}: {printable(exc, 1000)}"
        context.log.error(f"dry run of partition {key!r}: a real run would fail: {why}")
        metadata = dry_run_error_metadata(why)
        context.log_event(dg.AssetObservation(asset_key, partition=key, metadata=metadata))
        return
    metadata = _metadata(report, resource)
    context.log_event(dg.AssetObservation(asset_key, partition=key, metadata=metadata))
    context.log.info(f"dry run of partition {key!r}: {report.summary()}")
    yield from ()


def _submit_partition(
    s: PipelineSettings,
    source: Any,
    resource: InfronResource,
    rows: Any,
    key: str | None,
    config: SubmitConfig,
    run_id: str,
) -> SubmissionReport:
    """Prepare and submit one partition: its own attempt, manifest and batches (a refusal
    before any paid call fails the run)."""
    flags = _flags(config)
    if not flags.retry_failed:  # a retry reads the partition's failed rows itself
        rows = _partition_rows(source, rows, key)
    try:
        return submit_partition(s, resource.get_client, rows, key, flags, run_id)
    except SubmitRefused as exc:  # the budget's own error stays the cause, as before
        raise dg.Failure(str(exc), metadata=exc.details or None) from exc.__cause__


def _metadata(report: SubmissionReport, resource: InfronResource) -> dict[str, Any]:
    """The submission's metadata, with what it did about a pilot."""
    return {**submission_metadata(report, resource), **report.pilot}


def _log_pilot(context: Any, key: str | None, report: SubmissionReport) -> None:
    """A stopped pilot is an error in the run's log (it says what failed and what to fix);
    any other pilot step is news."""
    if not report.pilot_note:
        return
    if report.pilot_stopped:
        context.log.error(f"partition {key!r}: nothing more is sent: {report.pilot_note}")
    else:
        context.log.info(f"partition {key!r}: {report.pilot_note}")


def _flags(config: SubmitConfig) -> SubmitFlags:
    return SubmitFlags(
        force_resubmit=config.force_resubmit,
        retry_failed=config.retry_failed,
        resubmit_uncertain=config.resubmit_uncertain,
        dry_run=config.dry_run,
        allow_over_budget=config.allow_over_budget,
    )


def _partition_rows(source: Any, rows: Any, key: str | None) -> Any:
    """The partition's input: read from a ParquetSource, or the upstream asset's value."""
    if isinstance(source, ParquetSource):
        return source.input(key)
    if rows is None:
        raise dg.Failure(
            f"the upstream asset {_upstream_key(source).to_user_string()} produced no data "
            f"(None) for partition {key!r}: it must return a pandas DataFrame or a pyarrow Table"
        )
    return rows


def _submit_range(
    s: PipelineSettings,
    source: Any,
    resource: InfronResource,
    rows: Any,
    config: SubmitConfig,
    context: dg.AssetExecutionContext,
) -> Iterator[dg.MaterializeResult]:
    """A single-run backfill: each partition of the range submitted on its own.

    One partition's failure does not stop the others (their money is already committed or
    not); the partitions that succeeded are recorded as materialized, and the run then fails
    naming the ones that did not.
    """
    done: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for key in context.partition_keys:
        try:
            part = _range_rows(s, source, rows, key, config)
            report = _submit_partition(s, source, resource, part, key, config, context.run_id)
            _log_pilot(context, key, report)
        except Exception as exc:  # reported below with its partition; the rest go on
            context.log.error(f"partition {key!r}: {type(exc).__name__}: {printable(exc)}")
            failures[key] = f"{type(exc).__name__}: {printable(exc, 300)}"
            continue
        done[key] = _metadata(report, resource)
    batches_key = context.assets_def.key
    event = dg.AssetObservation if config.dry_run else dg.AssetMaterialization
    if failures or config.dry_run:
        for key, metadata in done.items():
            context.log_event(event(batches_key, partition=key, metadata=metadata))
    if config.dry_run:  # what a real run would hit is news, not a failed partition
        for key, why in failures.items():
            metadata = dry_run_error_metadata(why)
            context.log_event(dg.AssetObservation(batches_key, partition=key, metadata=metadata))
        return
    if failures:
        raise dg.Failure(
            f"{len(failures)} of {len(context.partition_keys)} partitions were not submitted: "
            + "; ".join(f"{k}: {why}" for k, why in list(failures.items())[:5]),
            metadata={"failed_partitions": dg.MetadataValue.json(failures)},
        )
    for key, metadata in done.items():
        context.add_asset_metadata(metadata, partition_key=key)
    yield dg.MaterializeResult()


def _range_rows(s: PipelineSettings, source: Any, rows: Any, key: str, config: SubmitConfig) -> Any:
    """The upstream value of one partition of a range (IO managers load a range as a dict)."""
    if config.retry_failed or isinstance(source, ParquetSource):
        return None
    if isinstance(rows, dict):
        return rows.get(key)
    raise dg.Failure(
        f"{s.name}_batches ran over a partition range, but the upstream IO manager loaded "
        f"one {type(rows).__name__} for the whole range, so rows cannot be told apart by "
        "partition: use an IO manager that loads a dict per partition (Dagster's default "
        "and filesystem IO managers do), a ParquetSource, or a multi-run backfill policy"
    )


def _upstream_key(source: Any) -> dg.AssetKey | None:
    if isinstance(source, ParquetSource):
        return None
    if isinstance(source, (dg.AssetsDefinition, dg.AssetSpec)):
        return source.key
    return dg.AssetKey.from_coercible(source)
