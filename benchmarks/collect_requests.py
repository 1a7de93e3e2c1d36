"""Storage requests of one collection run on S3, for a partition with three attempts.

A partition of 20 rows is submitted, collected, retried twice (the local server fails half
the requests), and the third attempt is collected while the counting S3 server
(``benchmarks/counting_s3.py``) counts what the collection run asks of it: the manifests it
lists and reads, the snapshots, result files and tables. ``python -m benchmarks.run
collect_requests`` prints the counts by method.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from benchmarks.counting_s3 import running

ROWS = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(defs: Any, instance: Any, selection: list[Any], config: dict | None = None) -> None:
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        partition_key="a", asset_selection=selection, instance=instance, run_config=config
    )
    assert result.success


def bench_collect_requests() -> dict[str, Any]:
    import dagster as dg
    import pandas as pd

    from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets
    from infron_dagster.local import LocalServerConfig, save_config

    parts = dg.StaticPartitionsDefinition(["a"])
    work = tempfile.mkdtemp(prefix="infron-bench-")
    local = os.path.join(work, "local")
    os.makedirs(local)
    instant = {"validating_seconds": 0, "in_progress_seconds": 0, "finalizing_seconds": 0}
    save_config(local, LocalServerConfig(**instant, failure_rate=0.5))

    @dg.asset(name="reviews", partitions_def=parts)
    def reviews():
        return pd.DataFrame({"id": range(ROWS), "text": [f"review {i}" for i in range(ROWS)]})

    with running(_free_port()) as s3:
        pipeline = build_infron_batch_assets(
            name="rev",
            spec=RequestSpec(model="m", prompt_template="Sentiment of {text}", key_columns="id"),
            source="reviews",
            partitions_def=parts,
            storage_root="s3://lake/collect-requests",
            storage_options=s3.storage_options,
            max_requests_per_batch=7,
            max_attempts=5,
        )
        resources = {
            "infron": InfronResource(base_url=f"local://{local}", api_style="infron"),
            "io_manager": dg.FilesystemIOManager(base_dir=os.path.join(work, "io")),
        }
        defs = dg.Definitions.merge(
            pipeline.definitions, dg.Definitions(assets=[reviews], resources=resources)
        )
        collect = [pipeline.results_key, pipeline.failed_key]
        retry = {"ops": {"rev_batches": {"config": {"retry_failed": True}}}}
        with dg.instance_for_test() as instance:
            _run(defs, instance, [reviews.key, pipeline.batches_asset.key])
            _run(defs, instance, collect)
            _run(defs, instance, [pipeline.batches_asset.key], retry)
            _run(defs, instance, collect)
            _run(defs, instance, [pipeline.batches_asset.key], retry)
            with s3.measure() as counts:
                _run(defs, instance, collect)
            attempts = len(pipeline.storage.attempts("a"))
    return {"attempts": attempts, "s3_requests": counts["total"], "by_method": counts["by_method"]}


if __name__ == "__main__":
    import json

    print(json.dumps(bench_collect_requests()))
