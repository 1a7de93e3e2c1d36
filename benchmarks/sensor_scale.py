"""Sensor ticks against a lake with history: S3 requests and seconds per tick.

A lake on moto's S3 server (in its own process, counting the requests it answers) holds
100 / 1,000 / 5,000 collected partitions and 200 partitions in flight, whose batches are
live on a served local batch server (one hour in progress, so every tick sees the same
work). For each size, the same sensor ticks with the in-flight index (the default) and
with the full scan it replaced (``use_in_flight_index=False``), in the same run; the one-off
tick that builds the index for a lake written before it existed (an upgrade) is measured too.

The history is written directly (manifests, markers, the index's sentinel, concurrently):
it is the shape real runs leave, without the hours of real runs.

Run: ``.venv/bin/python -m benchmarks.sensor_scale`` (sizes: ``BENCH_HISTORY=100,1000``);
``make bench`` runs it as its ``sensor_scale`` step. One line per size goes to stderr, the
figures as JSON to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.counting_s3 import CountingS3, running

HISTORY = tuple(int(n) for n in os.environ.get("BENCH_HISTORY", "100,1000,5000").split(","))
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "200"))
TICKS = int(os.environ.get("BENCH_TICKS", "3"))
NAME = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manifest(key: str, state: str, batch_id: str) -> dict[str, Any]:
    """One attempt as submit and collect leave it: one chunk, one batch."""
    from infron_dagster.manifest import ChunkRecord, Manifest

    chunk = ChunkRecord(index=0, path="requests/x.jsonl", requests=1, bytes=1, batch_id=batch_id)
    manifest = Manifest(
        name=NAME,
        partition_key=key,
        attempt=1,
        fingerprint=f"fp-{key}",
        api_style="infron",
        endpoint="/v1/chat/completions",
        model="m",
        state=state,  # type: ignore[arg-type]
        chunks=[chunk],
        submitted_at="2026-11-01T00:00:00+00:00",
    )
    return manifest.to_dict()


def _live_batches(client: Any, work: str, count: int) -> list[str]:
    """``count`` real batches on the served local server, each of one request."""
    path = os.path.join(work, "request.jsonl")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    with open(path, "w") as fh:
        fh.write(json.dumps(line) + "\n")
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda _: client.create_batch(path).id, range(count)))


def _write_lake(storage: Any, history: int, batch_ids: list[str]) -> None:
    """History (collected), in-flight attempts with their markers, and the index sentinel."""
    from infron_dagster.inflight import SENTINEL, InFlightIndex

    index = InFlightIndex(storage)
    files: dict[str, bytes] = {}
    for i in range(history):
        key = f"h{i:05d}"
        data = _manifest(key, "collected", f"batch_done_{i}")
        files[storage.manifest_path(key, 1).path] = json.dumps(data).encode()
    for i, batch_id in enumerate(batch_ids):
        key = f"f{i:04d}"
        data = _manifest(key, "submitted", batch_id)
        files[storage.manifest_path(key, 1).path] = json.dumps(data).encode()
        marker = {"partition_key": key, "attempt": 1}
        files[index.marker(key, 1).path] = json.dumps(marker).encode()
    files[(index.folder / SENTINEL).path] = b'{"built_at": "benchmark"}'
    storage.base.fs.pipe(files)  # concurrent PUTs


def _tick(sensor: Any, resource: Any, instance: Any) -> None:
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, resources={"infron": resource})
    context.log.setLevel(logging.WARNING)  # the tick logs a line per partition in flight
    result = sensor(context)
    assert not result.run_requests, "the batches are meant to stay in flight"


def _measure(s3: CountingS3, run: Any, ticks: int = TICKS) -> dict[str, Any]:
    """Median seconds over ``ticks`` runs, and the S3 requests of the last one."""
    seconds = []
    for _ in range(ticks):
        with s3.measure() as counts:
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
    return {  # the counts of the last tick
        "seconds": round(statistics.median(seconds), 3),
        "s3_requests": counts["total"],
        "s3_by_method": counts["by_method"],
    }


def _one_size(s3: CountingS3, url: str, batch_ids: list[str], history: int) -> dict[str, Any]:
    import dagster as dg

    from infron_dagster import BatchStorage, InfronResource
    from infron_dagster.sensor import build_infron_batch_sensor, find_in_flight

    storage = BatchStorage(f"s3://lake/h{history}", NAME, s3.storage_options)
    started = time.perf_counter()
    _write_lake(storage, history, batch_ids)
    built = time.perf_counter() - started
    resource = InfronResource(
        base_url=url, api_key=dg.EnvVar("INFRON_BENCH_KEY"), api_style="infron"
    )
    out: dict[str, Any] = {"historical": history, "in_flight": len(batch_ids)}
    with dg.instance_for_test() as instance:
        for label, indexed in (("index", True), ("full_scan", False)):
            sensor = build_infron_batch_sensor(
                name=NAME,
                storage=storage,
                collect_keys=[dg.AssetKey(f"{NAME}_results")],
                use_in_flight_index=indexed,
            )
            ticks = TICKS if indexed else 1  # the full scan is slow and its cost steady
            run = lambda s=sensor: _tick(s, resource, instance)  # noqa: E731
            out[f"tick_{label}"] = _measure(s3, run, ticks)
    found = find_in_flight(storage, True)
    assert len(found) == len(batch_ids), (len(found), len(batch_ids))
    out["upgrade"] = _upgrade(s3, storage, len(batch_ids))
    out["lake_written_seconds"] = round(built, 1)
    return out


def _upgrade(s3: CountingS3, storage: Any, in_flight: int) -> dict[str, Any]:
    """A lake written before the index (no ``inflight/`` at all): the ticks that build it.

    Each tick scans for at most its budget and resumes; every in-flight partition must be
    found by the time the index is complete.
    """
    from infron_dagster.inflight import SENTINEL
    from infron_dagster.sensor import find_in_flight

    storage.base.fs.rm((storage.base / "inflight").path, recursive=True)
    ticks: list[dict[str, Any]] = []
    found: list[Any] = []

    def tick() -> None:
        found[:] = find_in_flight(storage, True)

    while True:
        ticks.append(_measure(s3, tick, 1))
        if storage.exists(storage.base / "inflight" / SENTINEL):
            break
    assert len(found) == in_flight, (len(found), in_flight)
    return {
        "ticks": len(ticks),
        "s3_requests": sum(t["s3_requests"] for t in ticks),
        "seconds": round(sum(t["seconds"] for t in ticks), 3),
        "longest_tick_seconds": max(t["seconds"] for t in ticks),
    }


def bench_sensor_scale() -> dict[str, Any]:
    """Every size against one counting S3 server and one served local batch server."""
    from infron_dagster import InfronClient
    from infron_dagster.local.process import serve_in_subprocess

    os.environ.setdefault("INFRON_BENCH_KEY", "bench")
    work = tempfile.mkdtemp(prefix="infron-bench-")
    flags = ("--in-progress-seconds", "3600")
    results = []
    with running(_free_port()) as s3, serve_in_subprocess(os.path.join(work, "srv"), *flags) as url:
        client = InfronClient(api_key="bench", base_url=url, api_style="infron")
        batch_ids = _live_batches(client, work, IN_FLIGHT)
        for history in HISTORY:
            results.append(_one_size(s3, url, batch_ids, history))
            print(_line(results[-1]), file=sys.stderr, flush=True)  # stdout: the JSON
    return {"in_flight": IN_FLIGHT, "sizes": results}


def _line(row: dict[str, Any]) -> str:
    new, old = row["tick_index"], row["tick_full_scan"]
    up = row["upgrade"]
    return (
        f"sensor tick, {row['historical']:>5} collected + {row['in_flight']} in flight: "
        f"index {new['s3_requests']:>5} S3 requests {new['seconds']:>6.2f}s | "
        f"full scan {old['s3_requests']:>5} requests {old['seconds']:>6.2f}s | "
        f"upgrade: index built in {up['ticks']} tick(s), {up['s3_requests']} requests, "
        f"{up['seconds']:.2f}s"
    )


def main() -> None:
    print(json.dumps({"sensor_scale": bench_sensor_scale()}, indent=2))


if __name__ == "__main__":
    main()
