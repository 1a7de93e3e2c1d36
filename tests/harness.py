"""The pipeline most Dagster-level tests drive: an upstream ``reviews`` asset (or any other
source), the ``rev`` pipeline built by ``build_infron_batch_assets`` on it, its resources and
definitions, and the daemon's part played in process: submit a partition, tick the sensor
with a kept cursor and run what it requests (each run_key once), read what was collected.

Imported like the conftest helpers: ``from harness import Pipeline``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infron_dagster import RequestSpec, build_infron_batch_assets
from infron_dagster.manifest import load_manifests
from infron_dagster.resources import InfronResource

# Deadlines in tests are hang guards, not speed checks: a loaded machine gets this many times
# the time a step takes on a quiet one.
LOAD_SLACK = 4

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id")


def reviews_frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"id": range(rows), "text": [f"review {i}" for i in range(rows)]})


def metadata(result: dg.ExecuteInProcessResult, node: str = "rev_batches") -> dict[str, Any]:
    """The values of the first materialization ``node`` recorded in ``result``."""
    meta = result.asset_materializations_for_node(node)[0].metadata
    return {k: v.value for k, v in meta.items()}


def failure(result: dg.ExecuteInProcessResult) -> str:
    """The step failures of a run, for an assertion message."""
    events = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return "; ".join(str(e.step_failure_data.error.message)[:500] for e in events) or "?"


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@dataclass
class Pipeline:
    """``rev`` on ``reviews``: its definitions, resources, and the sensor's state as the
    daemon keeps it (cursor, run_keys already run, what it requested and ran)."""

    pipeline: Any
    upstream: dg.AssetsDefinition | None
    resources: dict[str, Any]
    defs: dg.Definitions
    resource_key: str = "infron"
    cursor: str | None = None
    seen: set[str] = field(default_factory=set)
    requested: list[dg.RunRequest] = field(default_factory=list)
    runs: list[dg.ExecuteInProcessResult] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        tmp_path,
        resource: InfronResource,
        partitions_def: dg.PartitionsDefinition | None,
        *,
        rows: int = 20,
        frame: Callable[[str | None], pd.DataFrame] | None = None,
        resource_key: str = "infron",
        params: dict[str, Any] | None = None,
        spec: RequestSpec | None = None,
        **factory: Any,
    ) -> Pipeline:
        """``rows`` reviews per partition (or ``frame(partition_key)``), 7 requests per
        batch, the lake and IO under tmp_path. ``params`` go into each request body (of
        the default spec); ``factory`` overrides the factory's arguments: a ``source`` of
        its own (a ``ParquetSource``) leaves out the ``reviews`` asset."""
        if spec is None:
            spec = RequestSpec(
                model=SPEC.model,
                prompt_template=SPEC.prompt_template,
                key_columns="id",
                params=params or {},
            )
        upstream = None
        if "source" not in factory:
            make = frame or (lambda _key: reviews_frame(rows))

            @dg.asset(name="reviews", partitions_def=partitions_def)
            def reviews(context):  # no annotation: Dagster cannot resolve it here
                return make(context.partition_key if context.has_partition_key else None)

            upstream = reviews
            factory["source"] = "reviews"
        pipeline = build_infron_batch_assets(
            name="rev",
            spec=spec,
            partitions_def=partitions_def,
            resource_key=resource_key,
            **{"storage_root": str(tmp_path / "lake"), "max_requests_per_batch": 7, **factory},
        )
        resources = {
            resource_key: resource,
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
        }
        assets = [upstream] if upstream is not None else []
        defs = dg.Definitions.merge(
            pipeline.definitions, dg.Definitions(assets=assets, resources=resources)
        )
        return cls(pipeline, upstream, resources, defs, resource_key)

    # -- what it is made of ---------------------------------------------------------------

    @property
    def storage(self):
        return self.pipeline.storage

    @property
    def resource(self) -> InfronResource:
        return self.resources[self.resource_key]

    @resource.setter
    def resource(self, resource: InfronResource) -> None:
        """Swap the resource the next ticks and runs see (a failing or another server)."""
        self.resources[self.resource_key] = resource

    @property
    def local_dir(self) -> str:
        """The local server's folder (a ``local://`` resource)."""
        return self.resource.base_url.removeprefix("local://")

    @property
    def batches_key(self) -> dg.AssetKey:
        return self.pipeline.batches_asset.key

    @property
    def collect_keys(self) -> list[dg.AssetKey]:
        return [self.pipeline.results_key, self.pipeline.failed_key]

    # -- what a person launches -----------------------------------------------------------

    def submit(
        self,
        instance,
        key: str | None = "a",
        *,
        upstream: bool = True,
        raise_on_error: bool = True,
        **config: Any,
    ) -> dg.ExecuteInProcessResult:
        """A materialization of the submit asset (and ``reviews`` with it, unless not
        ``upstream``: then it is loaded), as from the UI; ``config`` is the submit op's run
        config."""
        assets = [a for a in (self.upstream, self.pipeline.batches_asset) if a is not None]
        op = f"{self.pipeline.name}_batches"
        return dg.materialize(
            assets,
            selection=None if upstream else [self.pipeline.batches_asset],
            partition_key=key,
            instance=instance,
            resources=self.resources,
            run_config={"ops": {op: {"config": config}}} if config else None,
            raise_on_error=raise_on_error,
        )

    def collect(self, instance, key: str | None = "a", **kw: Any) -> dg.ExecuteInProcessResult:
        """A manual materialization of the results and failed tables (``kw``: materialize's)."""
        return dg.materialize(
            self.pipeline.collect_definitions,
            partition_key=key,
            instance=instance,
            resources=self.resources,
            **kw,
        )

    def job(self, suffix: str, instance, key: str | None = "a", **kw: Any):
        """Run ``rev_<suffix>`` (retry, cancel, ...) as the UI would: from the definitions."""
        job = self.defs.resolve_job_def(f"{self.pipeline.name}_{suffix}")
        return job.execute_in_process(partition_key=key, instance=instance, **kw)

    # -- the daemon's part ----------------------------------------------------------------

    def context(self, instance, cursor: str | None = None) -> dg.SensorEvaluationContext:
        return dg.build_sensor_context(
            instance=instance, definitions=self.defs, resources=self.resources, cursor=cursor
        )

    def sense(
        self, instance, cursor: str | None = None, *, log: list[str] | None = None
    ) -> dg.SensorResult:
        """One evaluation on ``cursor`` (None: a fresh one), nothing run, the kept cursor
        untouched; ``log`` (when given) receives the tick's log lines."""
        context = self.context(instance, cursor)
        if log is not None:
            context.log.addHandler(_ListHandler(log))
        result = self.pipeline.sensor(context)
        assert isinstance(result, dg.SensorResult)
        return result

    def evaluate(self, instance) -> dg.SensorResult:
        """One sensor tick with the kept cursor; nothing run."""
        result = self.pipeline.sensor(self.context(instance, self.cursor))
        assert isinstance(result, dg.SensorResult)
        self.cursor = result.cursor
        return result

    def tick(self, instance, *, run: bool = True) -> list[dg.RunRequest]:
        """One tick; the run requests whose run_key was not requested before, each run
        (unless ``run=False``) as the daemon runs it."""
        requests = self.evaluate(instance).run_requests or []
        fresh = [r for r in requests if r.run_key not in self.seen]
        self.seen.update(r.run_key for r in fresh)
        self.requested += fresh
        if run:
            for request in fresh:
                self.run(instance, request)
        return fresh

    def tick_runs(self, instance) -> list[dg.ExecuteInProcessResult]:
        """One tick; the runs it started."""
        before = len(self.runs)
        self.tick(instance)
        return self.runs[before:]

    def run(self, instance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        """A requested run, executed in process; it must succeed."""
        job = self.defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            tags=request.tags,
            run_config=request.run_config,
            instance=instance,
            raise_on_error=False,
        )
        self.runs.append(result)
        assert result.success, f"run {request.run_key} failed: {failure(result)}"
        return result

    def drive(
        self,
        instance,
        until: Callable[[], bool] | Iterable[str | None] = ("a",),
        *,
        timeout: float = 60.0,
        between: Callable[[], None] | None = None,
        pause: float = 0.05,
    ) -> list[dg.RunRequest]:
        """Tick and run until ``until()`` (or until each of the partitions ``until`` names
        has its latest attempt collected); ``between`` after each tick (moves a clock).
        Returns what was requested meanwhile.

        ``timeout`` is how long convergence takes at most on a quiet machine; the deadline
        is ``LOAD_SLACK`` times that, so a loaded machine (CI runs beside other work) is
        never the reason a test fails: one that does not converge fails, only later."""
        done = until if callable(until) else self.collected(*until)
        start = len(self.requested)
        deadline = time.monotonic() + timeout * LOAD_SLACK
        while not done():
            assert time.monotonic() < deadline, (
                f"not converged within {timeout} s; requested: "
                f"{[r.run_key for r in self.requested]}; manifests: {self.states()}"
            )
            self.tick(instance)
            if between is not None:
                between()
            time.sleep(pause)
        return self.requested[start:]

    def submits(self) -> list[dg.RunRequest]:
        """The submit runs the sensor requested."""
        return [r for r in self.requested if r.asset_selection == [self.batches_key]]

    # -- what it left -----------------------------------------------------------------------

    def manifests(self, key: str | None = "a"):
        return load_manifests(self.storage, key)

    def states(self) -> dict[str | None, list[Any]]:
        """What each partition's attempts say (a few partitions), for failure messages."""
        parts = self.pipeline.batches_asset.partitions_def
        if parts is None:
            keys: list[str | None] = [None]
        elif isinstance(parts, dg.StaticPartitionsDefinition):
            keys = list(parts.get_partition_keys())[:5]
        else:
            return {}
        return {
            key: [
                (m.attempt, m.state, [(c.batch_id, c.uncertain) for c in m.chunks])
                for m in self.manifests(key)
            ]
            for key in keys
        }

    def collected(self, *keys: str | None) -> Callable[[], bool]:
        """The latest attempt of each partition (``a`` by default) collected."""

        def check() -> bool:
            for key in keys or ("a",):
                manifests = [m for m in self.manifests(key) if m.state != "abandoned"]
                if not manifests or manifests[-1].state != "collected":
                    return False
            return True

        return check

    def table(self, kind: str, key: str | None = "a") -> pa.Table | None:
        """The ``results`` or ``failed`` table of a partition; None before it is written."""
        path = self.storage.table_path(kind, key)
        return pq.read_table(path.path) if self.storage.exists(path) else None

    def frame(self, kind: str, key: str | None = "a") -> pd.DataFrame:
        """The table as a DataFrame (it must exist)."""
        return self.storage.read_table(self.storage.table_path(kind, key)).to_pandas()

    def frames(self, key: str | None = "a") -> tuple[pd.DataFrame, pd.DataFrame]:
        """The results and failed tables as DataFrames (both must exist)."""
        return self.frame("results", key), self.frame("failed", key)

    def accounted_ids(self, key: str | None = "a") -> list[int]:
        """Input ids found in results or failed (each once if every row is accounted)."""
        ids: list[int] = []
        for kind in ("results", "failed"):
            table = self.table(kind, key)
            if table is not None:
                ids += table.column("id").to_pylist()
        return sorted(ids)

    def accounted(self, key: str | None = "a") -> int:
        """Rows in results plus failed."""
        return len(self.accounted_ids(key))

    def server_batches(self) -> list[dict[str, Any]]:
        """Every batch the local server holds (each one paid for)."""
        from infron_dagster.local.store import Store

        return Store(self.local_dir).list_batches()
