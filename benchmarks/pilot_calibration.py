"""How close the estimate of the rows sent after a pilot batch comes to what they cost.

One partition of 400 reviews of varying length, ``max_tokens`` 256, a pilot of 20 rows, on
the embedded local server (its mock answers echo up to 60 characters of the prompt, so their
length varies). The sensor alone collects the pilot and releases the rest; printed: what the
first run sent, the rest's expected output tokens (calibrated by the pilot) against the
actual, and what ``max_tokens`` for every row would have said. ``python -m
benchmarks.pilot_calibration``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets
from infron_dagster.history import PartitionHistory
from infron_dagster.local.config import LocalServerConfig, save_config
from infron_dagster.local.store import Store

ROWS, PILOT, MAX_TOKENS = 400, 20, 256


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="pilot-bench-"))
    local = str(root / "local")
    save_config(local, LocalServerConfig(0, 0, 0))
    texts = [f"review {i}: " + "so good " * (i % 7) for i in range(ROWS)]

    @dg.asset(name="reviews")
    def reviews() -> pd.DataFrame:
        return pd.DataFrame({"id": range(ROWS), "text": texts})

    pipeline = build_infron_batch_assets(
        name="rev",
        spec=RequestSpec(
            model="gpt-4o-mini",
            prompt_template="Sentiment of {text}",
            key_columns="id",
            params={"max_tokens": MAX_TOKENS},
        ),
        source="reviews",
        storage_root=str(root / "lake"),
        max_requests_per_batch=100,
        pilot_rows=PILOT,
    )
    resources = {
        "infron": InfronResource(base_url=f"local://{local}", api_style="infron"),
        "io_manager": dg.FilesystemIOManager(base_dir=str(root / "io")),
    }
    defs = dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[reviews], resources=resources)
    )
    store = Store(local)
    with dg.instance_for_test() as instance:
        first = dg.materialize(
            [reviews, pipeline.batches_asset], instance=instance, resources=resources
        )
        before = {
            k: v.value
            for k, v in first.asset_materializations_for_node("rev_batches")[0].metadata.items()
        }
        sent_first = sum(b["total"] for b in store.list_batches())
        after = _drive(defs, pipeline, instance, resources)
    release = PartitionHistory.load(pipeline.storage, None).active[0]
    results = pipeline.storage.read_table(pipeline.storage.table_path("results", None))
    results = results.to_pandas()
    actual = int(results[results.attempt == release.attempt].completion_tokens.sum())
    expected = after["estimate/output_tokens_expected"]
    print(f"first run sent {sent_first} of {ROWS} rows ({before['estimate/output_basis']})")
    print(
        f"the rest: expected {expected} output tokens ({after['estimate/output_basis']}), "
        f"actual {actual}: {100 * (expected - actual) / actual:+.1f}%"
    )
    print(
        f"max_tokens for every row would say {MAX_TOKENS * (ROWS - PILOT)} "
        f"({MAX_TOKENS * (ROWS - PILOT) / actual:.1f}x actual); the budget reserved "
        f"{after.get('estimate/output_tokens_budgeted')}"
    )
    print(f"sent in all: {sum(b['total'] for b in store.list_batches())} requests")


def _drive(defs, pipeline, instance, resources) -> dict:
    """Sensor ticks and the runs they request, until the released rest is collected; the
    release run's metadata."""
    job = defs.resolve_implicit_global_asset_job_def()
    cursor, seen, released = None, set(), {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        active = PartitionHistory.load(pipeline.storage, None).active
        if active[0].state == "collected" and (active[0].pilot or {}).get("role") == "release":
            return released
        context = dg.build_sensor_context(
            instance=instance, definitions=defs, resources=resources, cursor=cursor
        )
        result = pipeline.sensor(context)
        cursor = result.cursor
        for request in result.run_requests or []:
            if request.run_key in seen:
                continue
            seen.add(request.run_key)
            run = job.execute_in_process(
                asset_selection=request.asset_selection, tags=request.tags, instance=instance
            )
            if request.run_key.endswith(":release"):
                (mat,) = run.asset_materializations_for_node("rev_batches")
                released = {k: v.value for k, v in mat.metadata.items()}
        time.sleep(0.05)
    raise TimeoutError("the pilot was not released within 120 s")


if __name__ == "__main__":
    main()
