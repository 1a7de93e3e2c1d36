"""``make demo``: the example pipeline end to end through Dagster, on the embedded server.

It materializes two days of reviews and their submit assets, then ticks the real sensors as
the daemon would while the batches are in flight, printing how far each partition is; it
cancels one partition half-way with the real ``review_sentiment_cancel`` job, runs the
collection runs the sensors ask for (the cancelled partition keeps what finished and fails the
rest as ``batch_cancelled``), retries the retryable failures once, and prints a summary.
No API key, no network: the embedded local server answers.
"""

import json
import logging
import os
import shutil
import sys
import time

DEMO_DAYS = ["2026-11-23", "2026-11-24"]
# Long enough to watch and to cancel in, short enough for a first run (90 s in `make dev`).
IN_PROGRESS_SECONDS = 10
CANCELLED = ("review_sentiment", DEMO_DAYS[-1])  # the partition the demo cancels in flight
CANCEL_AT_PERCENT = 20.0
PROGRESS_EVERY_SECONDS = 2.0
# Errors only on the terminal: each run's warning that it uses the embedded local server is
# said once, below; `make dev` shows every run's full log.
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
ROOT = os.path.abspath(".infron_data/demo")


def _prepare_environment() -> None:
    # A clean, self-contained demo: its own Dagster home, lake and local-server state.
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "dagster_home"))
    os.environ["DAGSTER_HOME"] = os.path.join(ROOT, "dagster_home")
    os.environ.setdefault("INFRON_STORAGE_ROOT", os.path.join(ROOT, "lake"))
    os.environ.setdefault("INFRON_LOCAL_DATA_DIR", os.path.join(ROOT, "local_server"))
    # The demo's own timing, whatever `make dev` was given (example_project/local_server.py).
    os.environ["INFRON_LOCAL_IN_PROGRESS_SECONDS"] = str(IN_PROGRESS_SECONDS)
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
    print(
        "No API key: every run below talks to the embedded local server (mock answers, "
        "nothing sent or paid)."
    )
    with dg.DagsterInstance.get() as instance:
        _estimate(dg, instance, ex, DEMO_DAYS[0], resources)
        for day in DEMO_DAYS:
            _run(
                dg.materialize(
                    [ex.reviews, *(p.batches_asset for p in pipelines)],
                    partition_key=day,
                    instance=instance,
                    resources=resources,
                    run_config=QUIET,
                ),
                f"submit {day}",
            )
        print(
            f"submitted {len(DEMO_DAYS)} days x {len(pipelines)} pipelines; the local server "
            f"keeps each batch in progress {IN_PROGRESS_SECONDS} s (90 s in `make dev`)."
        )
        print(
            "in flight: each sensor tick polls the batches (in `make dev` it records this "
            "progress on the `_batches` assets):"
        )
        watch = _Watch(dg, instance, ex, pipelines, resources, cancel=CANCELLED)
        watch.until_done()
        for pipeline in pipelines:
            for day in DEMO_DAYS:
                _retry(dg, instance, ex, pipeline, day, resources)
        print(f"the retries are in flight ({IN_PROGRESS_SECONDS} s) ...")
        _Watch(dg, instance, ex, pipelines, resources, show_progress=False).until_done()
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
            run_config=QUIET,
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


class _Watch:
    """Tick each pipeline's real sensor and run what it requests, as the daemon would; print
    how far the partitions in flight are; cancel one of them once it is far enough along."""

    def __init__(
        self, dg, instance, ex, pipelines, resources, *, cancel=None, show_progress=True
    ) -> None:
        self.dg, self.instance, self.ex = dg, instance, ex
        self.pipelines, self.resources = pipelines, resources
        self.cancel, self.show_progress = cancel, show_progress
        self.cancelled: tuple[str, str] | None = None
        self.cursors: dict[str, str | None] = {}
        self.percent: dict[tuple[str, str], float] = {}
        self.printed_at = 0.0

    def until_done(self, timeout: float = 120) -> None:
        from infron_dagster.sensor import find_in_flight

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pipeline in self.pipelines:
                self._tick(pipeline)
            self._print_progress()
            if self.cancel and self.percent.get(self.cancel, 0.0) >= CANCEL_AT_PERCENT:
                self._cancel(*self.cancel)
            in_flight = sum(
                len(find_in_flight(p.storage, partitioned=True)) for p in self.pipelines
            )
            if not in_flight:
                if self.cancel:  # the demo's cancel step shows nothing: say so, loudly
                    raise SystemExit(
                        f"{self.cancel[0]} {self.cancel[1]} finished before it reached "
                        f"{CANCEL_AT_PERCENT} %: nothing was cancelled (a very busy machine?)"
                    )
                return
            time.sleep(1)
        raise SystemExit("timed out waiting for batches")

    def _tick(self, pipeline) -> None:
        dg = self.dg
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursors.get(pipeline.name),
            definitions=self.ex.defs,
            resources=self.resources,
        )
        context.log.setLevel(logging.WARNING)  # its own log lines are for the UI
        result = pipeline.sensor(context)
        self.cursors[pipeline.name] = result.cursor
        for event in result.asset_events or []:
            percent = event.metadata.get("progress_percent")
            if isinstance(event, dg.AssetObservation) and percent is not None:
                self.percent[(pipeline.name, event.partition)] = float(percent.value)
        for request in result.run_requests or []:
            _run(
                dg.materialize(
                    pipeline.collect_definitions,
                    partition_key=request.partition_key,
                    instance=self.instance,
                    resources=self.resources,
                    tags=request.tags,
                    run_config=QUIET,
                ),
                f"collect {request.run_key}",
            )
            self.percent.pop((pipeline.name, request.partition_key), None)
            print(f"  collected {request.run_key}")
            if (pipeline.name, request.partition_key) == self.cancelled:
                _show_cancelled(pipeline, request.partition_key)

    def _print_progress(self) -> None:
        if not self.show_progress or not self.percent:
            return
        if time.monotonic() - self.printed_at < PROGRESS_EVERY_SECONDS:
            return
        self.printed_at = time.monotonic()
        by_name: dict[str, list[str]] = {}
        for (name, day), pct in sorted(self.percent.items()):
            by_name.setdefault(name, []).append(f"{day} {pct:.0f} %")
        print("  done: " + "; ".join(f"{n} {', '.join(d)}" for n, d in by_name.items()))

    def _cancel(self, name: str, day: str) -> None:
        """Launch ``<name>_cancel`` for the partition, as from the UI's launchpad."""
        self.cancel, self.cancelled = None, (name, day)
        print(
            f"cancelling {name} {day} at {self.percent[(name, day)]:.0f} % with the job "
            f"{name}_cancel (in `make dev`: Jobs > {name}_cancel > pick the partition):"
        )
        job = self.ex.defs.resolve_job_def(f"{name}_cancel")
        result = job.execute_in_process(partition_key=day, instance=self.instance, run_config=QUIET)
        _run(result, f"cancel {name} {day}")
        # The run's output metadata (the launchpad's run page shows it): its summary's
        # first line is the sentence the run logged.
        said = [
            event.step_output_data.metadata["summary"].value.splitlines()[0]
            for event in result.all_events
            if event.event_type_value == "STEP_OUTPUT"
        ]
        print(f"  {said[0] if said else 'the cancel run succeeded'}")
        self.percent.pop((name, day), None)


def _show_cancelled(pipeline, day: str) -> None:
    """The cancelled partition once collected: what finished is kept, the rest failed as
    ``batch_cancelled``. The demo stops here if the cancel did not cancel."""
    name, storage = pipeline.name, pipeline.storage
    results = storage.read_table(storage.table_path("results", day)).num_rows
    codes = storage.read_table(storage.table_path("failed", day)).column("error_code").to_pylist()
    cancelled = codes.count("batch_cancelled")
    if not cancelled:
        raise SystemExit(f"{name} {day}: no row failed as batch_cancelled: the cancel did nothing")
    others = len(codes) - cancelled
    print(
        f"    the cancelled partition: {results} rows answered before the cancel, kept in "
        f"results; {cancelled} in failed as batch_cancelled (retryable)"
        + (f", {others} failed otherwise" if others else "")
    )


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
    worst = meta["estimate/cost_worst_case_usd"]
    expected = meta.get("estimate/cost_expected_usd", worst)  # said once when they are equal
    print(
        f"dry run review_sentiment {day}: would send {meta['estimate/requests']} requests, "
        f"~{meta['estimate/input_tokens']} input tokens; cost expected "
        f"${expected:.4f}, worst case ${worst:.4f}"
    )


def _estimated_vs_actual(dg, instance, pipeline) -> None:
    records = instance.fetch_materializations(pipeline.results_key, limit=50).records
    latest: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.storage_id):
        latest[record.partition_key] = record.asset_materialization.metadata
    for day, meta in sorted(latest.items()):
        estimated, actual = meta.get("cost_estimated_usd"), meta.get("cost_usd")
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
