"""``make bench``: every figure against a baseline measured in the same run.

- prepare vs the tutorial loop (``iterrows`` + ``json.dumps``), realistic requests;
- collect vs ``pyarrow.json`` + pyarrow compute doing the same job, realistic results;
- peak RSS for 1M rows (``BENCH_MEM_ROWS``), each in a fresh process: prepare (growth over
  the input DataFrame, and from a ParquetSource read a row group at a time, against the
  table read whole) and collect (the whole process);
- one sensor tick over 1,000 in-flight batches, concurrent vs sequential polling.

Each step runs in its own process; ``python -m benchmarks.run <step>`` runs one
(``prepare``, ``collect``, ``mem_prepare``, ``mem_prepare_parquet``, ``mem_collect``,
``sensor``, ``sensor_scale``). Figures are
medians of ``BENCH_REPEAT`` interleaved runs; the machine's other load makes them noisy.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

ROWS = int(os.environ.get("BENCH_ROWS", "100000"))
MEM_ROWS = int(os.environ.get("BENCH_MEM_ROWS", "1000000"))
BATCHES = int(os.environ.get("BENCH_BATCHES", "1000"))


def bench_prepare() -> dict:
    from benchmarks.columnar import bench_prepare as run

    return run(ROWS)


def bench_collect() -> dict:
    from benchmarks.columnar import bench_collect as run

    return run(ROWS)


def bench_mem_prepare() -> dict:
    from benchmarks.columnar import mem_prepare

    return mem_prepare(MEM_ROWS)


def bench_mem_prepare_parquet() -> dict:
    """Prepare from a ParquetSource: peak growth against the table read whole."""
    with tempfile.TemporaryDirectory() as work:
        env = {"BENCH_PARQUET": os.path.join(work, "input.parquet")}
        made = _step("make_parquet", env)["make_parquet"]
        measured = _step("mem_prepare_parquet_only", env)["mem_prepare_parquet_only"]
    return {**measured, "table_in_memory_mb": made["table_in_memory_mb"]}


def bench_make_parquet() -> dict:
    """Setup for mem_prepare_parquet (its own process, so its memory is not counted)."""
    from benchmarks.columnar import make_parquet_input

    return make_parquet_input(MEM_ROWS, os.environ["BENCH_PARQUET"])


def bench_mem_prepare_parquet_only() -> dict:
    from benchmarks.columnar import mem_prepare_parquet

    return mem_prepare_parquet(MEM_ROWS, os.environ["BENCH_PARQUET"])


def bench_make_lake() -> dict:
    """Setup for mem_collect (its own process, so its memory is not counted)."""
    from benchmarks.columnar import make_lake

    make_lake(MEM_ROWS, os.environ["BENCH_LAKE"])
    return {"rows": MEM_ROWS}


def bench_mem_collect() -> dict:

    with tempfile.TemporaryDirectory() as lake:
        _step("make_lake", {"BENCH_LAKE": lake})
        return _step("mem_collect_only", {"BENCH_LAKE": lake})["mem_collect_only"]


def bench_mem_collect_only() -> dict:
    from benchmarks.columnar import mem_collect

    return mem_collect(MEM_ROWS, os.environ["BENCH_LAKE"])


def bench_sensor() -> dict:
    """Tick seconds at BATCHES and 5x BATCHES in flight; the sequential baseline at BATCHES
    only (5,000 polls one after another outlast a tick's time budget)."""
    timings = {
        f"{BATCHES}_concurrent_16": _sensor_tick(16, BATCHES),
        f"{BATCHES}_sequential_baseline": _sensor_tick(1, BATCHES),
        f"{5 * BATCHES}_concurrent_16": _sensor_tick(16, 5 * BATCHES),
    }
    latency = float(os.environ.get("BENCH_LATENCY", "0.02"))
    floor = {n: round(n * latency / 16, 2) for n in (BATCHES, 5 * BATCHES)}
    return {"server_latency_s": latency, "latency_floor_s": floor, "tick_seconds": timings}


def _sensor_tick(workers: int, batches: int) -> float:
    """One tick over ``batches`` in-flight batches on a fresh served local server."""
    from concurrent.futures import ThreadPoolExecutor

    import dagster as dg

    from infron_dagster import BatchStorage, InfronClient, InfronResource, Manifest
    from infron_dagster.local.process import serve_in_subprocess
    from infron_dagster.manifest import ChunkRecord
    from infron_dagster.sensor import build_infron_batch_sensor

    work = tempfile.mkdtemp()
    latency = os.environ.get("BENCH_LATENCY", "0.02")
    flags = ("--in-progress-seconds", "3600", "--latency-seconds", latency)
    with serve_in_subprocess(os.path.join(work, "srv"), *flags) as url:
        client = InfronClient(api_key="bench", base_url=url, api_style="infron")
        req = os.path.join(work, "r.jsonl")
        with open(req, "w") as fh:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            fh.write(
                json.dumps(
                    {
                        "custom_id": "a",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda _: client.create_batch(req).id, range(batches)))
        storage = BatchStorage(os.path.join(work, "lake"), "bench")
        per = 10
        for p in range(batches // per):
            chunks = [
                ChunkRecord(index=i, path="x", requests=1, bytes=1, batch_id=ids[p * per + i])
                for i in range(per)
            ]
            m = Manifest(
                name="bench",
                partition_key=f"p{p:04d}",
                attempt=1,
                fingerprint="f",
                api_style="infron",
                endpoint="/v1/chat/completions",
                model="m",
                state="submitted",
                chunks=chunks,
            )
            storage.write_json(storage.manifest_path(m.partition_key, 1), m.to_dict())
        res = InfronResource(base_url=url, api_key="bench", api_style="infron")
        sensor = build_infron_batch_sensor(
            name="bench",
            storage=storage,
            collect_keys=[dg.AssetKey("x")],
            max_concurrent_polls=workers,
            time_budget_seconds=40,
        )
        with dg.instance_for_test() as instance:
            ctx = dg.build_sensor_context(instance=instance, resources={"infron": res})
            t = time.perf_counter()
            sensor(ctx)
            return round(time.perf_counter() - t, 2)


def _step(name: str, env: dict | None = None) -> dict:
    """Run one step in a fresh process; its JSON line."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", name],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_sensor_scale() -> dict:
    """Sensor ticks on S3 at 100 / 1,000 / 5,000 collected partitions: benchmarks.sensor_scale."""
    from benchmarks.sensor_scale import bench_sensor_scale as run

    return run()


STEPS = (
    "prepare",
    "collect",
    "mem_prepare",
    "mem_prepare_parquet",
    "mem_collect",
    "sensor",
    "sensor_scale",
)


def main() -> None:
    step = sys.argv[1] if len(sys.argv) > 1 else None
    if step:
        print(json.dumps({step: globals()[f"bench_{step}"]()}))
        return
    started = time.perf_counter()
    for name in STEPS:
        print(json.dumps(_step(name)), flush=True)
    print(json.dumps({"total_seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
