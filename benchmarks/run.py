"""``make bench``: throughput of prepare and collect, and one sensor tick over 1,000 batches.

Each figure is compared with a baseline measured in the same run:
- prepare: a naive pandas ``apply`` that renders and serialises each row;
- collect: ``pandas.read_json(lines=True)`` plus a merge (which drops nothing but also
  validates nothing);
- sensor: the same tick with polling done one batch at a time.
Peak memory is the process's max RSS growth, measured in a fresh subprocess per step.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROWS = int(os.environ.get("BENCH_ROWS", "100000"))
BATCHES = int(os.environ.get("BENCH_BATCHES", "1000"))


def _frame(n: int):
    import pandas as pd

    return pd.DataFrame(
        {
            "id": range(n),
            "product": ["tent", "stove", "lamp", "filter"] * (n // 4) + ["tent"] * (n % 4),
            "text": [
                f"Review {i}: the product did what it promised on a long trip." for i in range(n)
            ],
        }
    )


SPEC = dict(
    model="gpt-4o-mini",
    prompt_template="Product {product}. Review: {text}",
    system_prompt="Label the review.",
    key_columns=("id",),
)


def _speed(seconds: float, baseline_seconds: float, rss_kb: int) -> dict:
    return {
        "seconds": round(seconds, 3),
        "rows_per_second": round(ROWS / seconds),
        "baseline_seconds": round(baseline_seconds, 3),
        "baseline_rows_per_second": round(ROWS / baseline_seconds),
        "peak_rss_growth_mb": round(rss_kb / 1024, 1),
    }


def bench_prepare() -> dict:
    from infron_dagster import RequestSpec, prepare_requests

    frame = _frame(ROWS)
    spec = RequestSpec(**SPEC)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        prepared = prepare_requests(frame, spec, name="bench", partition_key="p", workdir=work)
        ours = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as work, open(os.path.join(work, "x.jsonl"), "w") as fh:

        def render(row):
            prompt = SPEC["prompt_template"].format(**row)
            body = {
                "model": SPEC["model"],
                "messages": [
                    {"role": "system", "content": SPEC["system_prompt"]},
                    {"role": "user", "content": prompt},
                ],
            }
            fh.write(
                json.dumps(
                    {
                        "custom_id": str(row["id"]),
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )

        frame.apply(lambda r: render(r.to_dict()), axis=1)
    naive = time.perf_counter() - t
    return {
        "rows": ROWS,
        "valid": prepared.valid.num_rows,
        "chunks": len(prepared.chunks),
        **_speed(ours, naive, rss1 - rss0),
    }


def bench_collect() -> dict:
    import pandas as pd
    import pyarrow as pa

    from infron_dagster import RequestSpec, make_custom_id
    from infron_dagster.results import ParseReport, read_outcomes
    from infron_dagster.tables import FinalOutcome, build_tables

    spec = RequestSpec(**SPEC)
    frame = _frame(ROWS)
    ids = [make_custom_id("bench", "p", str(i)) for i in range(ROWS)]
    inputs = pa.Table.from_pandas(frame, preserve_index=False).append_column(
        "custom_id", pa.array(ids)
    )
    invalid = (
        inputs.slice(0, 0)
        .append_column("error_code", pa.array([], pa.string()))
        .append_column("error_message", pa.array([], pa.string()))
    )
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "out.jsonl")
        with open(path, "w") as fh:
            for cid in reversed(ids):
                body = {
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "positive"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
                }
                fh.write(
                    json.dumps(
                        {
                            "id": "x",
                            "custom_id": cid,
                            "response": {"status_code": 200, "request_id": "r", "body": body},
                            "error": None,
                        }
                    )
                    + "\n"
                )
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        report = ParseReport()
        with open(path, "rb") as fh:
            final = {o.custom_id: FinalOutcome(o, 1) for o in read_outcomes(fh, report, "b")}
        results, failed = build_tables(inputs, invalid, final, spec=spec)
        ours = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        raw = pd.read_json(path, lines=True)
        raw["text"] = raw["response"].map(lambda r: r["body"]["choices"][0]["message"]["content"])
        merged = frame.assign(custom_id=ids).merge(raw[["custom_id", "text"]], on="custom_id")
        naive = time.perf_counter() - t
    assert results.num_rows == ROWS and failed.num_rows == 0 and len(merged) == ROWS
    return {"rows": ROWS, **_speed(ours, naive, rss1 - rss0)}


def bench_collect_e2e() -> dict:
    """collect_partition end to end: retrieve, download, parse, join, write Parquet."""
    from infron_dagster import (
        BatchStorage,
        RequestSpec,
        collect_partition,
        prepare_requests,
        submit_prepared,
    )
    from infron_dagster.local import LocalServerConfig, save_config
    from infron_dagster.local.embedded import embedded_client

    work = tempfile.mkdtemp()
    local = os.path.join(work, "srv")
    os.makedirs(local)
    save_config(
        local,
        LocalServerConfig(
            validating_seconds=0, in_progress_seconds=0, finalizing_seconds=0, failure_rate=0.02
        ),
    )
    spec = RequestSpec(**SPEC)
    storage = BatchStorage(os.path.join(work, "lake"), "bench")
    client = embedded_client(local, api_style="openai")
    prepared = prepare_requests(
        _frame(ROWS), spec, name="bench", partition_key="p", workdir=os.path.join(work, "prep")
    )
    manifest = submit_prepared(client, storage, prepared, spec=spec, partition_key="p").manifest
    for batch_id in manifest.batch_ids:  # let the server write its result files first
        client.retrieve_batch(batch_id)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    outcome = collect_partition(client, storage, spec, "p")
    seconds = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert outcome.results.num_rows + outcome.failed.num_rows == ROWS
    return {
        "rows": ROWS,
        "succeeded": outcome.results.num_rows,
        "failed": outcome.failed.num_rows,
        "seconds": round(seconds, 3),
        "rows_per_second": round(ROWS / seconds),
        "peak_rss_growth_mb": round((rss1 - rss0) / 1024, 1),
    }


def bench_sensor() -> dict:
    timings = {}
    for label, workers in (("concurrent_16", 16), ("sequential_baseline", 1)):
        timings[label] = _sensor_tick(workers)
    latency = float(os.environ.get("BENCH_LATENCY", "0.02"))
    return {"in_flight_batches": BATCHES, "server_latency_s": latency, "tick_seconds": timings}


def _sensor_tick(workers: int) -> float:
    """One tick over BATCHES in-flight batches on a fresh served local server."""
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
            ids = list(pool.map(lambda _: client.create_batch(req).id, range(BATCHES)))
        storage = BatchStorage(os.path.join(work, "lake"), "bench")
        per = 10
        for p in range(BATCHES // per):
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


def main() -> None:
    step = sys.argv[1] if len(sys.argv) > 1 else None
    if step:
        print(json.dumps({step: globals()[f"bench_{step}"]()}))
        return
    for name in ("prepare", "collect", "collect_e2e", "sensor"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
