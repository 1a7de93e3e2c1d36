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

import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from .admission import AdmissionControl
from .budget import Budget, BudgetExceeded
from .cancel import cancel_partition
from .cancel_job import build_cancel_job
from .carry import CarryIndex as AnswerIndex
from .carry import InFlightCarry as InFlightRequests
from .carry import carry_in_flight as in_flight_requests
from .carry import carry_succeeded as succeeded_requests
from .checks import build_collect_checks
from .collect import CollectOutcome, active_attempts, collect_partition
from .columns import CUSTOM_ID, HIDDEN_COLUMNS
from .history import PartitionHistory
from .manifest import load_manifests
from .prepare import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS, prepare_requests
from .pricing import CostEstimate, ModelPrice, max_output_tokens
from .resources import InfronResource
from .results import DEFAULT_MAX_LINE_BYTES
from .sensor import build_infron_batch_sensor
from .sources import ParquetSource
from .spec import RequestSpec
from .spend import DryRunStop, SpendControl, cost_by_attempt, settle_collected
from .storage import BatchStorage
from .submit import SubmitOutcome, submit_prepared
from .table_loader import InfronTableIOManager, tables_io_manager_key
from .untrusted import printable

__all__ = ["InfronBatchPipeline", "build_infron_batch_assets"]

KINDS = {"infron"}


class SubmitConfig(dg.Config):
    """Run config of ``<name>_batches`` (the launchpad shows each field's description).

    Example:
        >>> SubmitConfig(dry_run=True).force_resubmit
        False
        >>> run_config = {"ops": {"review_sentiment_batches": {"config": {"retry_failed": True}}}}
    """

    force_resubmit: bool = Field(
        default=False,
        description="Send every row again as a new attempt, even rows already answered "
        "(pays again). Default: unchanged input reuses its batches and answered rows.",
    )
    retry_failed: bool = Field(
        default=False,
        description="Retry failed rows: resubmit only the retryable failed rows of the "
        "collected partition as a new attempt (what the <name>_retry job sets).",
    )
    resubmit_uncertain: bool = Field(
        default=False,
        description="A create call whose answer was lost may have created a batch: send "
        "those chunks again anyway (may pay twice). Default: refuse and say so.",
    )
    dry_run: bool = Field(
        default=False,
        description="Prepare, validate and estimate only: nothing is written or sent, the "
        "partition is not materialized; an observation shows what a real run would send "
        "and cost.",
    )
    allow_over_budget: bool = Field(
        default=False,
        description="Submit this run even if its worst case crosses the pipeline's Budget "
        "(on purpose, once; the ledger records it).",
    )


class CollectConfig(dg.Config):
    """Run config of ``<name>_results`` / ``<name>_failed``.

    A collection whose batches are still running waits at most ``wait_seconds`` (default: not
    at all), then ends without collecting; the sensor collects the partition later.

    Deprecated, accepted and ignored until 0.2.0 so that saved launchpad configs and
    schedules keep launching: ``max_run_retries`` and ``retry_after_seconds`` (a collection
    no longer retries its run while batches are running; the sensor requests it when they
    end). Setting either warns (a ``FutureWarning``, shown by default, and a log line).

    Example:
        >>> CollectConfig(wait_seconds=60).wait_seconds
        60.0
    """

    wait_seconds: float = Field(
        default=0.0,
        description="How long to wait for running batches before ending without collecting "
        "(the sensor collects them later). Default: do not hold a worker.",
    )
    poll_interval_seconds: float = Field(default=5.0, description="Seconds between polls.")
    max_run_retries: int | None = Field(
        default=None,
        description="Deprecated and ignored (removed in 0.2.0): the sensor collects a "
        "partition when its batches end; the run is no longer retried.",
    )
    retry_after_seconds: int | None = Field(
        default=None,
        description="Deprecated and ignored (removed in 0.2.0): see max_run_retries.",
    )

    def model_post_init(self, context: Any, /) -> None:
        """Warn about deprecated fields that are set (they are ignored)."""
        deprecated = ("max_run_retries", "retry_after_seconds")
        old = [f for f in deprecated if getattr(self, f) is not None]
        if old:
            message = (
                f"CollectConfig: {' and '.join(old)} {'is' if len(old) == 1 else 'are'} "
                "deprecated and ignored (removed in 0.2.0): the sensor collects a partition "
                "when its batches end; remove "
                f"{'it' if len(old) == 1 else 'them'} from the run config."
            )
            warnings.warn(message, FutureWarning, stacklevel=2)
            dg.get_dagster_logger().warning(message)


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
) -> InfronBatchPipeline:
    """Build ``<name>_batches``, ``<name>_results``/``<name>_failed``, ``<name>_sensor``,
    ``<name>_retry`` and ``<name>_cancel`` for one batch inference step.

    ``source`` is an upstream asset (its DataFrame or Arrow table for the partition is loaded
    by its IO manager) or a :class:`ParquetSource`. ``max_result_line_bytes`` bounds one
    result line: a longer one fails its row (``result_too_large``) instead of taking memory.
    ``owners``, ``tags`` and ``automation_condition`` apply to the batches asset (the
    condition decides when to submit) and the first two to the collected tables as well.
    ``backfill_policy`` applies to the batches asset: ``dg.BackfillPolicy.single_run()``
    submits a backfill's whole range in one run, each partition its own attempt and manifest.
    ``pool`` puts submit and collect runs in a Dagster concurrency pool, so a large backfill
    does not open one connection to the provider per partition at once.
    ``price`` (a :class:`ModelPrice` for ``spec.model``) turns token estimates into money in
    the metadata; ``budget`` refuses a submission whose worst case crosses a limit before
    any paid call (``SubmitConfig(allow_over_budget=True)`` overrides it once).
    ``block_on_failure_rate`` makes the ``failure_rate`` check blocking: downstream assets
    of a partition over ``max_failure_rate`` do not run.
    ``on_changed_input_in_flight`` says what a changed input does to a partition whose
    batches are still running: ``"carry"`` (default) sends only the changed rows, and the
    unchanged ones wait for the answers the running batches are paid to give; ``"cancel"``
    cancels the running batches first and sends every row again.
    ``reuse_answers="pipeline"`` carries a request whose exact body was already answered in
    any other partition of the pipeline instead of sending it (default ``"partition"``: only
    a partition's own answers are reused; some want fresh samples per partition).
    ``max_enqueued_tokens`` (admission control, shared by the pipelines of ``storage_root``
    and ``resource_key``) caps the estimated tokens of created batches not yet finished: a
    submission creates the chunks that fit and leaves the rest pending; the sensor requests
    the run that submits them when capacity frees.

    Args:
        name: the pipeline's name, the prefix of every asset, job and sensor it defines.
        spec: the :class:`RequestSpec` (model, prompt template or body function, schema).
        source: the upstream asset (key, name or definition) or a :class:`ParquetSource`.
        partitions_def: the partitions of the pipeline (None: unpartitioned).
        storage_root: where files live, a local folder or ``s3://...``.
        storage_options: fsspec options for ``storage_root`` (credentials, endpoint).
        keep_columns: input columns copied to the results and failed tables.
        max_requests_per_batch: requests per batch (chunk), at most 50,000.
        max_bytes_per_batch: bytes per request file, at most 200 MB.
        max_attempts: attempts per partition, the first included, before retries stop.
        max_failure_rate: the ``failure_rate`` check's threshold.
        max_result_line_bytes: a longer result line fails its row (``result_too_large``).
        resource_key: the key of the :class:`InfronResource`.
        group_name: the Dagster asset group.
        owners: owners of the batches asset and the collected tables.
        tags: tags of the batches asset and the collected tables.
        automation_condition: when to submit (on the batches asset).
        backfill_policy: the batches asset's backfill policy.
        pool: a Dagster concurrency pool for submit and collect runs.
        price: the :class:`ModelPrice` of ``spec.model``: costs in money.
        budget: a :class:`Budget` that refuses submissions over a limit.
        block_on_failure_rate: make the ``failure_rate`` check blocking.
        sensor_interval_seconds: seconds between sensor ticks.
        sensor_default_status: the sensor's status when the code location loads.
        on_changed_input_in_flight: ``"carry"`` or ``"cancel"`` (see above).
        reuse_answers: ``"partition"`` or ``"pipeline"`` (see above).
        max_enqueued_tokens: admission control's limit of tokens in flight (None: none).

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
    if reuse_answers not in ("partition", "pipeline"):
        raise ValueError(f"reuse_answers must be 'partition' or 'pipeline', not {reuse_answers!r}")
    if on_changed_input_in_flight not in ("carry", "cancel"):
        raise ValueError(
            "on_changed_input_in_flight must be 'carry' or 'cancel', "
            f"not {on_changed_input_in_flight!r}"
        )
    if max_result_line_bytes < 1024:
        raise ValueError("max_result_line_bytes must be at least 1024")
    _check_source(source, partitions_def)
    storage = BatchStorage(storage_root, name, storage_options)
    admission = None
    if max_enqueued_tokens is not None:
        admission = AdmissionControl(
            storage,
            max_enqueued_tokens=max_enqueued_tokens,
            output_tokens=max_output_tokens(spec),
            scope=resource_key,
        )
    settings = _Settings(
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
    )
    batches = _batches_asset(
        settings, source, partitions_def, group_name, automation_condition, backfill_policy
    )
    collect = _collect_assets(settings, batches.key, partitions_def, group_name)
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
    )
    retry_job = dg.define_asset_job(
        f"{name}_retry",
        selection=[batches.key],
        partitions_def=partitions_def,
        config={"ops": {batches.op.name: {"config": {"retry_failed": True}}}},
        description=f"Retry failed rows of {name}: resubmits only the retryable failed rows "
        "of the chosen partitions as a new attempt (nothing answered is paid for again).",
    )
    cancel_job = build_cancel_job(
        name=name, storage=storage, partitions_def=partitions_def, resource_key=resource_key
    )
    return InfronBatchPipeline(
        name, batches, collect, checks, sensor, retry_job, cancel_job, storage
    )


def _check_source(source: Any, partitions_def: dg.PartitionsDefinition | None) -> None:
    unkeyed = isinstance(source, ParquetSource) and "{partition_key}" not in source.path_template
    if unkeyed and partitions_def is not None:
        # Every partition would read (and pay for) the same rows.
        raise ValueError(
            f"ParquetSource path_template {source.path_template!r} has no "
            "{partition_key} placeholder, but the pipeline is partitioned"
        )


@dataclass(frozen=True)
class _Settings:
    name: str
    spec: RequestSpec
    storage: BatchStorage
    keep_columns: Sequence[str] | None
    max_requests: int
    max_bytes: int
    max_attempts: int
    max_failure_rate: float
    resource_key: str
    max_line_bytes: int
    asset_options: dict[str, Any]
    pool: str | None
    spend: SpendControl
    on_changed_input_in_flight: str = "carry"
    reuse_answers: str = "partition"
    admission: AdmissionControl | None = None


# --- submit ------------------------------------------------------------------------------


def _batches_asset(
    s: _Settings,
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
        submission = _submit_partition(s, source, resource, rows, key, config, context.run_id)
        metadata = submission.metadata(resource)
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
    s: _Settings,
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
        submission = _submit_partition(s, source, resource, rows, key, config, context.run_id)
    except Exception as exc:  # reported as what a real run would hit, not as a failure
        why = f"{type(exc).__name__}: {printable(exc, 1000)}"
        context.log.error(f"dry run of partition {key!r}: a real run would fail: {why}")
        metadata = {"dry_run": True, "would_pay": False, "dry_run_error": why}
        context.log_event(dg.AssetObservation(asset_key, partition=key, metadata=metadata))
        return
    metadata = submission.metadata(resource)
    context.log_event(dg.AssetObservation(asset_key, partition=key, metadata=metadata))
    context.log.info(f"dry run of partition {key!r}: {submission.summary()}")
    yield from ()


def _submit_partition(
    s: _Settings,
    source: Any,
    resource: InfronResource,
    rows: Any,
    key: str | None,
    config: SubmitConfig,
    run_id: str,
) -> "_Submission":
    """Prepare and submit one partition: its own attempt, manifest and batches."""
    kind = "retry" if config.retry_failed else "initial"
    if config.retry_failed:
        rows = _retry_rows(s, key)
    elif isinstance(source, ParquetSource):
        rows = source.input(key)
    elif rows is None:
        raise dg.Failure(
            f"the upstream asset {_upstream_key(source).to_user_string()} produced no data "
            f"(None) for partition {key!r}: it must return a pandas DataFrame or a pyarrow Table"
        )
    return _prepare_and_submit(s, resource, rows, key, kind, config, run_id)


def _submit_range(
    s: _Settings,
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
            submission = _submit_partition(s, source, resource, part, key, config, context.run_id)
        except Exception as exc:  # reported below with its partition; the rest go on
            context.log.error(f"partition {key!r}: {type(exc).__name__}: {printable(exc)}")
            failures[key] = f"{type(exc).__name__}: {printable(exc, 300)}"
            continue
        done[key] = submission.metadata(resource)
    batches_key = context.assets_def.key
    event = dg.AssetObservation if config.dry_run else dg.AssetMaterialization
    if failures or config.dry_run:
        for key, metadata in done.items():
            context.log_event(event(batches_key, partition=key, metadata=metadata))
    if config.dry_run:  # what a real run would hit is news, not a failed partition
        for key, why in failures.items():
            metadata = {"dry_run": True, "would_pay": False, "dry_run_error": why}
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


def _range_rows(s: _Settings, source: Any, rows: Any, key: str, config: SubmitConfig) -> Any:
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


def _prepare_and_submit(
    s: _Settings,
    resource: InfronResource,
    rows: Any,
    key: str | None,
    kind: str,
    config: SubmitConfig,
    run_id: str,
) -> "_Submission":
    carry = kind == "initial" and not config.force_resubmit
    succeeded = succeeded_requests(s.storage, key) if carry else {}
    # Unchanged rows of an attempt still in flight wait for the answers already paid for.
    wait = carry and s.on_changed_input_in_flight == "carry"
    running = in_flight_requests(s.storage, key) if wait else InFlightRequests()
    # Pipeline reuse: other partitions' answers by body hash (an empty index still records
    # this partition's body hashes, so its own answers can serve the others later).
    elsewhere = None
    if s.reuse_answers == "pipeline":
        elsewhere = AnswerIndex.load(s.storage, key) if carry else AnswerIndex(s.storage)
    with tempfile.TemporaryDirectory(prefix="infron-prepare-") as workdir:
        prepared = prepare_requests(
            rows,
            s.spec,
            name=s.name,
            partition_key=key,
            workdir=workdir,
            max_requests_per_batch=s.max_requests,
            max_bytes_per_batch=s.max_bytes,
            succeeded=succeeded,
            keep_columns=s.keep_columns,  # a typo is named before any money is spent
            in_flight=running.requests,
            elsewhere=elsewhere,
        )
        prepared.waits_on = running.waits_on(
            {a: n for a, n in prepared.carried_by_attempt.items() if a in running.attempts}
        )
        estimate = s.spend.estimate(prepared)
        gate = s.spend.gate(
            estimate, key, dry_run=config.dry_run, allow_over_budget=config.allow_over_budget
        )
        with resource.get_client() as client:
            cancelled: list[str] = []
            if kind == "initial" and s.on_changed_input_in_flight == "cancel":
                gate = _cancel_first(gate, client, s.storage, key, cancelled)
            try:
                outcome = submit_prepared(
                    client,
                    s.storage,
                    prepared,
                    spec=s.spec,
                    partition_key=key,
                    kind=kind,
                    force=config.force_resubmit,
                    run_id=run_id,
                    resubmit_uncertain=config.resubmit_uncertain,
                    gate=gate,
                    admission=s.admission,
                    dry_run=config.dry_run,
                )
            except DryRunStop as stop:
                return _Submission(
                    estimate,
                    prepared.carried,
                    stop.manifest,
                    stop.new_spend,
                    dry_run=True,
                    budget_refusal=stop.budget_refusal,
                )
            except BudgetExceeded as exc:
                raise dg.Failure(str(exc), metadata=estimate.metadata()) from exc
    return _Submission(
        estimate,
        prepared.carried,
        outcome.manifest,
        False,
        outcome,
        dry_run=config.dry_run,
        cancelled=cancelled,
        elsewhere=prepared.carried_elsewhere,
    )


def _cancel_first(
    gate: Any, client: Any, storage: BatchStorage, key: str | None, cancelled: list[str]
) -> Any:
    """The gate, then (policy ``cancel``) the partition's running batches are cancelled just
    before a new attempt that pays is written: never for a dry run, a refused budget, a
    reused or revived attempt."""

    def check(manifest: Any, new_spend: bool) -> None:
        gate(manifest, new_spend)
        new = not storage.exists(storage.manifest_path(key, manifest.attempt))
        if new and new_spend:
            outcome = cancel_partition(client, storage, key, holding_lock=True)
            cancelled.extend(outcome.cancelled_ids)

    return check


def _retry_rows(s: _Settings, key: str | None) -> pa.Table:
    attempts = active_attempts(load_manifests(s.storage, key))
    if not attempts:
        raise dg.Failure(
            f"partition {key!r} of {s.name} has never been submitted; nothing to retry"
        )
    latest = attempts[-1]
    # A retry whose create failed part-way is resumed with the same rows, not refused.
    resuming = latest.kind == "retry" and not latest.fully_submitted
    if latest.state != "collected" and not resuming:
        raise dg.Failure(
            f"attempt {latest.attempt} of partition {key!r} is not collected yet; "
            "retry once the sensor has collected it"
        )
    if len(attempts) >= s.max_attempts and not resuming:
        raise dg.Failure(
            f"partition {key!r} already had {len(attempts)} of max_attempts={s.max_attempts}"
        )
    failed = s.storage.read_table(s.storage.table_path("failed", key))
    retry_ids = pc.filter(failed.column(CUSTOM_ID), failed.column("retryable"))
    inputs = s.storage.read_table(s.storage.attempt_file("inputs", key, attempts[0].attempt))
    rows = inputs.filter(pc.is_in(inputs.column(CUSTOM_ID), value_set=retry_ids))
    if not rows.num_rows:
        raise dg.Failure(f"partition {key!r} of {s.name} has no retryable failed rows")
    return rows.drop_columns([CUSTOM_ID, *(c for c in HIDDEN_COLUMNS if c in rows.column_names)])


@dataclass(frozen=True)
class _Submission:
    """One partition's submission, or what a dry run found it would be."""

    estimate: CostEstimate
    carried: int
    manifest: Any  # the attempt's Manifest (a dry run's is never written)
    would_pay: bool  # a dry run: whether a real run would create (and pay for) batches
    outcome: SubmitOutcome | None = None  # None for a dry run stopped before writing
    dry_run: bool = False
    cancelled: list[str] = field(default_factory=list)  # running batches cancelled first
    elsewhere: int = 0  # carried rows answered in other partitions
    budget_refusal: str = ""  # a dry run: why the budget would refuse a real run

    def summary(self) -> str:
        if self.outcome is not None:
            return f"attempt {self.manifest.attempt} holds these requests: nothing to send"
        cost = self.estimate.metadata().get("estimate/cost_worst_case")
        money = f", worst case {cost}" if cost is not None else ""
        sent = self.estimate.requests if self.would_pay else 0
        return f"would send {sent} requests in {len(self.manifest.chunks)} batch(es){money}"

    def metadata(self, resource: InfronResource) -> dict[str, Any]:
        m = self.manifest
        common = {
            "dagster/row_count": m.row_count,
            "valid_rows": m.row_count - m.invalid_count,
            "invalid_rows": m.invalid_count,
            "carried_rows": self.carried,
            **self._carry_metadata(),
            "chunks": len(m.chunks),
            "attempt": m.attempt,
            "attempt_kind": m.kind,
            "api_style": m.api_style or resource.api_style,
            "local_server": resource.is_local,
            "estimated_input_tokens": self.estimate.input_tokens,
            "fingerprint": m.fingerprint[:16],
            **self.estimate.metadata(),
        }
        if self.cancelled:
            common["cancelled_in_flight_batches"] = dg.MetadataValue.json(self.cancelled)
        if self.dry_run:
            verdict = {"budget_would_refuse": self.budget_refusal} if self.budget_refusal else {}
            return {"dry_run": True, "would_pay": self.would_pay, **verdict, **common}
        assert self.outcome is not None
        return {
            **common,
            "batch_ids": dg.MetadataValue.json(m.batch_ids),
            "batches_created": len(self.outcome.created),
            "batches_reattached": len(self.outcome.reattached),
            "reused_existing_batches": self.outcome.reused,
            **self._admission_metadata(),
        }

    def _admission_metadata(self) -> dict[str, Any]:
        """Chunks waiting for admission control (created later by a run the sensor asks)."""
        outcome = self.outcome
        found: dict[str, Any] = {}
        if outcome is not None and outcome.waiting_for:
            found["waiting_for"] = outcome.waiting_for
        if outcome is not None and outcome.cancelled:
            found["cancelled"] = "this attempt was cancelled: none of its unsent chunks is sent"
        if outcome is None or not (outcome.pending_chunks or outcome.sent_alone):
            return found
        why = [outcome.pending_reason] if outcome.pending_reason else []
        if outcome.sent_alone:
            why.insert(0, "a chunk bigger than max_enqueued_tokens was sent alone")
        return {
            **found,
            "pending_chunks": outcome.pending_chunks,
            "pending_requests": outcome.pending_requests,
            "pending_why": "; ".join(why),
        }

    def _carry_metadata(self) -> dict[str, Any]:
        """How many carried rows wait for batches still running, and why none is sent."""
        waits = self.manifest.waits_on or []
        in_flight = sum(int(w.get("rows", 0)) for w in waits)
        why = []
        collected = self.carried - in_flight - self.elsewhere
        if collected > 0:
            why.append(
                f"{collected} unchanged row(s) already answered in a collected "
                "attempt: their paid-for answers are reused"
            )
        if self.elsewhere:
            why.append(
                f"{self.elsewhere} row(s) whose exact request was answered in another "
                "partition (reuse_answers='pipeline'): read from there"
            )
        for w in waits:
            why.append(
                f"{w.get('rows', 0)} unchanged row(s) sent by attempt {w['attempt']}, still in "
                f"flight: they wait for its {len(w['batch_ids'])} batch(es), collected with "
                "this attempt"
            )
        if self.cancelled:
            why.append(
                f"policy 'cancel': {len(self.cancelled)} running batch(es) cancelled first, "
                "every row sent again"
            )
        return {
            "carried_from_in_flight": in_flight,
            "carried_from_other_partitions": self.elsewhere,
            "carried_why": "; ".join(why) or "nothing carried",
        }


# --- collect -----------------------------------------------------------------------------


def _collect_assets(
    s: _Settings,
    batches_key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition | None,
    group_name: str | None,
) -> dg.AssetsDefinition:
    results_key, failed_key = dg.AssetKey(f"{s.name}_results"), dg.AssetKey(f"{s.name}_failed")
    table = {"deps": [batches_key], "kinds": {"infron", "parquet"}, "skippable": True}
    table |= {"partitions_def": partitions_def, "group_name": group_name, **s.asset_options}
    specs = [
        dg.AssetSpec(
            results_key,
            description=f"Successful responses of {s.name}, hive-partitioned Parquet.",
            metadata=_table_metadata(s.storage, "results"),
            **table,
        ),
        dg.AssetSpec(
            failed_key,
            description=f"Rows of {s.name} that failed, with error_code and retryable.",
            metadata=_table_metadata(s.storage, "failed"),
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
        outcome = _collect_waiting(s, resource, key, config, context)
        if outcome is not None:  # else still in flight: nothing is materialized or failed
            yield from _collect_results(s, key, outcome, results_key, failed_key)

    return decorator(_collect)


def _table_metadata(storage: BatchStorage, kind: str) -> dict[str, Any]:
    """Where the whole table lives: a hive-partitioned Parquet dataset, one folder per
    partition (``partition=<key>``), readable as one table by DuckDB, pyarrow or Spark."""
    return {"dagster/table_name": str(storage.table_root(kind))}


def _collect_waiting(
    s: _Settings,
    resource: InfronResource,
    key: str | None,
    config: CollectConfig,
    context: dg.AssetExecutionContext,
) -> CollectOutcome | None:
    """The collected partition, or None when its batches are still running.

    A collection never holds a worker for the hours a batch takes: after at most
    ``wait_seconds`` it logs where the batches stand and ends, and the sensor collects the
    partition when they finish. The run succeeds and the partition is not marked failed.
    """
    history = PartitionHistory.load(s.storage, key)
    if not history.manifests:
        raise dg.Failure(
            f"partition {key!r} of {s.name} was never submitted: materialize "
            f"{s.name}_batches for it first (the sensor then collects it)"
        )
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
                on_written=lambda written: settle_collected(s.spend, written),
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


def _waiting_summary(outcome: CollectOutcome) -> str:
    shown = ", ".join(printable(w, 80) for w in outcome.waiting_on[:5])
    more = len(outcome.waiting_on) - 5
    return f"waiting on {shown}" + (f" and {more} more" if more > 0 else "")


def _collect_results(
    s: _Settings,
    key: str | None,
    outcome: CollectOutcome,
    results_key: dg.AssetKey,
    failed_key: dg.AssetKey,
):
    # Summaries made while the tables were written: nothing is read back whole.
    results, failed = outcome.results_summary, outcome.failed_summary
    assert results is not None and failed is not None
    ok, bad = results.rows, failed.rows
    common = {
        "attempts": dg.MetadataValue.json(outcome.attempts),
        "input_rows": outcome.input_rows,
        "succeeded": ok,
        "failed": bad,
        "unparseable_lines": outcome.report.unparseable,
        "oversized_lines": outcome.report.too_large,
        "duplicate_lines": outcome.report.duplicates,
        "unknown_custom_ids": outcome.report.unknown_ids,
    }
    if outcome.cancelled:  # what the partition's page says: stopped, not finished
        common["state"] = "cancelled"
        common["cancelled_attempts"] = dg.MetadataValue.json(outcome.cancelled)
    tokens = outcome.tokens
    yield dg.MaterializeResult(
        asset_key=results_key,
        metadata={
            **common,
            "dagster/row_count": ok,
            "dagster/uri": str(s.storage.table_path("results", key)),
            "table_root": str(s.storage.table_root("results")),
            **tokens,
            **_money_metadata(s, key, outcome),
            "dagster/column_schema": _column_schema(results.schema),
            "summary": dg.MetadataValue.md(_summary_md(key, outcome)),
        },
    )
    yield dg.MaterializeResult(
        asset_key=failed_key,
        metadata={
            **common,
            "dagster/row_count": bad,
            "dagster/uri": str(s.storage.table_path("failed", key)),
            "dagster/column_schema": _column_schema(failed.schema),
            "error_codes": dg.MetadataValue.json(outcome.error_counts),
            "retryable": outcome.retryable_rows,
        },
    )


def _money_metadata(s: _Settings, key: str | None, outcome: CollectOutcome) -> dict[str, Any]:
    """What the partition cost (settled in the budget ledger) next to what was estimated."""
    wanted = {*outcome.attempts, *outcome.sources}  # the in-flight sources were paid for too
    assert outcome.history is not None  # the manifests as collection wrote them
    attempts = [m for m in outcome.history.manifests if m.attempt in wanted]
    by_attempt = cost_by_attempt(outcome)
    untrusted = outcome.settled  # the ledger was settled before the commit point
    reported = None if untrusted else outcome.cost  # fees that cannot be billed are not shown
    money: dict[str, Any] = dict(untrusted)  # {"cost_reported_untrusted": why} or {}
    if s.spend.price is not None or reported is not None:  # the rows' cost column is known
        money["cost"] = round(sum(by_attempt.values()), 6)
    if reported is not None:
        money["cost_reported_by_provider"] = round(reported, 6)
        tokens = sum(outcome.tokens.values())
        if tokens:  # what the provider billed per token for this model: check your price
            money["observed_price_per_million_tokens"] = round(reported / tokens * 1e6, 4)
            money["model"] = s.spec.model
    estimates = [(m.spend or {}).get("expected_cost") for m in attempts]
    if estimates and all(e is not None for e in estimates):
        money["cost_estimated"] = round(sum(estimates), 6)
    return money


def _column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The table's columns and Arrow types (structured-output fields included), for the UI."""
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


def _summary_md(key: str | None, outcome: CollectOutcome) -> str:
    lines = [
        f"**Partition** `{key or '-'}` — attempts {outcome.attempts}",
        "",
        "| outcome | rows |",
        "|---|---|",
        f"| succeeded | {outcome.results_summary.rows if outcome.results_summary else 0} |",
    ]
    lines += [f"| failed: {code} | {n} |" for code, n in sorted(outcome.error_counts.items())]
    return "\n".join(lines)
