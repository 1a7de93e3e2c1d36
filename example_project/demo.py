"""``make demo``: the example pipeline end to end through Dagster, on the embedded server.

It materializes two days of reviews and their submit assets, ticks the real sensor until it
asks for collection, runs those collection runs, retries the retryable failures once, and
prints a summary. No API key, no network: the embedded local server answers.
"""

import json
import logging
import os
import shutil
import sys
import time

DEMO_DAYS = ["2026-11-23", "2026-11-24"]
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
ROOT = os.path.abspath(".infron_data/demo")


def _prepare_environment() -> None:
    # A clean, self-contained demo: its own Dagster home, lake and local-server state.
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "dagster_home"))
    os.environ["DAGSTER_HOME"] = os.path.join(ROOT, "dagster_home")
    os.environ.setdefault("INFRON_STORAGE_ROOT", os.path.join(ROOT, "lake"))
    os.environ.setdefault("INFRON_LOCAL_DATA_DIR", os.path.join(ROOT, "local_server"))
    # Dagster's run logs go to the event log (see them in `make dev`); keep the terminal short.
    with open(os.path.join(ROOT, "dagster_home", "dagster.yaml"), "w") as fh:
        fh.write("python_logs:\n  python_log_level: WARNING\ntelemetry:\n  enabled: false\n")


def main() -> int:
    _prepare_environment()
    started = time.monotonic()
    import dagster as dg

    logging.getLogger("dagster").setLevel(logging.WARNING)
    import pyarrow.dataset as ds

    from example_project import definitions as ex

    pipelines = [ex.review_sentiment, ex.review_embeddings]
    resources = {"infron": ex.infron_resource()}
    with dg.DagsterInstance.get() as instance:
        _estimate(dg, instance, ex, DEMO_DAYS[0], resources)
        for day in DEMO_DAYS:
            _run(
                dg.materialize(
                    [ex.reviews, *(p.batches_asset for p in pipelines)],
                    partition_key=day,
                    instance=instance,
                    resources=resources,
                ),
                f"submit {day}",
            )
        print(f"submitted {len(DEMO_DAYS)} days x {len(pipelines)} pipelines; polling ...")
        _collect_until_done(dg, instance, pipelines, resources)
        for pipeline in pipelines:
            for day in DEMO_DAYS:
                _retry(dg, instance, ex, pipeline, day, resources)
        _collect_until_done(dg, instance, pipelines, resources)
        for pipeline in pipelines:
            _summarise(ds, pipeline)
            _estimated_vs_actual(dg, instance, pipeline)
        _over_budget(dg, instance, ex, "2026-11-25", resources)
        topics = dg.materialize(
            [ex.review_sentiment.collect_assets, ex.review_topics],
            selection=[ex.review_topics],
            partition_key=DEMO_DAYS[-1],
            instance=instance,
            resources=resources,
        )
        _run(topics, "review_topics")
        table = topics.output_for_node("review_topics")
        print(f"\nreview_topics {DEMO_DAYS[-1]} (loaded from the results):")
        print(table.sort_values("reviews", ascending=False).head(5).to_string(index=False))
    print(f"demo finished in {time.monotonic() - started:.1f}s")
    return 0


def _run(result, what: str) -> None:
    if not result.success:
        raise SystemExit(f"{what} failed")


def _collect_until_done(dg, instance, pipelines, resources, timeout: float = 120) -> None:
    """Tick each pipeline's real sensor and run what it requests, as the daemon would."""
    deadline = time.monotonic() + timeout
    cursors: dict[str, str | None] = {}
    from example_project.definitions import defs

    while time.monotonic() < deadline:
        in_flight = 0
        for pipeline in pipelines:
            context = dg.build_sensor_context(
                instance=instance,
                cursor=cursors.get(pipeline.name),
                definitions=defs,
                resources=resources,
            )
            context.log.setLevel(logging.WARNING)  # its progress lines are for the UI
            result = pipeline.sensor(context)
            cursors[pipeline.name] = result.cursor
            for request in result.run_requests or []:
                _run(
                    dg.materialize(
                        pipeline.collect_definitions,
                        partition_key=request.partition_key,
                        instance=instance,
                        resources=resources,
                        tags=request.tags,
                        run_config=QUIET,
                    ),
                    f"collect {request.run_key}",
                )
                print(f"  collected {request.run_key}")
            from infron_dagster.sensor import find_in_flight

            in_flight += len(find_in_flight(pipeline.storage, partitioned=True))
        if not in_flight:
            return
        time.sleep(1)
    raise SystemExit("timed out waiting for batches")


def _estimate(dg, instance, ex, day: str, resources) -> None:
    """A dry run: what the day would send and cost, with nothing written or sent."""
    config = {"ops": {"review_sentiment_batches": {"config": {"dry_run": True}}}}
    result = dg.materialize(
        [ex.reviews, ex.review_sentiment.batches_asset],
        partition_key=day,
        instance=instance,
        resources=resources,
        run_config={**QUIET, **config},
    )
    _run(result, f"dry run {day}")
    (event,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    meta = {k: v.value for k, v in event.asset_observation_data.asset_observation.metadata.items()}
    print(
        f"dry run review_sentiment {day}: would send {meta['estimate/requests']} requests, "
        f"~{meta['estimate/input_tokens']} input tokens; cost expected "
        f"${meta['estimate/cost_expected']:.4f}, worst case ${meta['estimate/cost_worst_case']:.4f}"
    )


def _estimated_vs_actual(dg, instance, pipeline) -> None:
    records = instance.fetch_materializations(pipeline.results_key, limit=50).records
    latest: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.storage_id):
        latest[record.partition_key] = record.asset_materialization.metadata
    for day, meta in sorted(latest.items()):
        estimated, actual = meta.get("cost_estimated"), meta.get("cost")
        if estimated is not None and actual is not None:
            print(f"  {day}: estimated ${estimated.value:.6f}, actual ${actual.value:.6f}")


def _over_budget(dg, instance, ex, day: str, resources) -> None:
    """The same pipeline under a budget the day's worst case crosses: refused, unsent."""
    from infron_dagster import Budget, build_infron_batch_assets

    strict = build_infron_batch_assets(
        name="review_sentiment",
        spec=ex.SENTIMENT_SPEC,
        source=ex.reviews,
        partitions_def=ex.daily,
        storage_root=ex.STORAGE_ROOT,
        price=ex.SENTIMENT_PRICE,
        budget=Budget(max_cost_per_partition=0.005),
    )
    result = dg.materialize(
        [ex.reviews, strict.batches_asset],
        partition_key=day,
        instance=instance,
        resources=resources,
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        raise_on_error=False,
    )
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message.strip().splitlines()[-1]
    message = message.removeprefix("dagster._core.definitions.events.Failure: ")
    print(f"\nwith max_cost_per_partition=0.005, {day} is refused before any paid call:")
    print(f"  {message[:300]}")


def _retry(dg, instance, ex, pipeline, day: str, resources) -> None:
    failed = pipeline.storage.read_table(pipeline.storage.table_path("failed", day))
    retryable = sum(failed.column("retryable").to_pylist())
    if not retryable:
        return
    print(f"  retrying {retryable} retryable failed row(s) of {pipeline.name} {day}")
    job = ex.defs.resolve_job_def(pipeline.retry_job.name)
    job_config = {"ops": {f"{pipeline.name}_batches": {"config": {"retry_failed": True}}}}
    _run(
        job.execute_in_process(
            partition_key=day, instance=instance, run_config={**QUIET, **job_config}
        ),
        f"retry {day}",
    )


def _summarise(ds, pipeline) -> None:
    results = ds.dataset(
        str(pipeline.storage.table_root("results")), partitioning="hive"
    ).to_table()
    failed = ds.dataset(str(pipeline.storage.table_root("failed")), partitioning="hive").to_table()
    tokens = sum(v or 0 for v in results.column("total_tokens").to_pylist())
    codes: dict[str, int] = {}
    for code in failed.column("error_code").to_pylist():
        codes[code] = codes.get(code, 0) + 1
    total = results.num_rows + failed.num_rows
    markers = (pipeline.storage.base / "raw").rglob("batches.json")
    costs = [b.get("cost") or 0.0 for m in markers for b in json.loads(m.read_bytes()).values()]
    print(
        f"\n{pipeline.name}: {total} rows, {results.num_rows} succeeded, "
        f"{failed.num_rows} failed {codes or ''}, {tokens} tokens, "
        f"reported cost ${sum(costs):.6f}"
    )
    print(f"  results: {pipeline.storage.table_root('results')}")
    print(f"  failed:  {pipeline.storage.table_root('failed')}")


if __name__ == "__main__":
    sys.exit(main())
