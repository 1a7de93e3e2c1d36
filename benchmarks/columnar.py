"""Prepare and collect against honest baselines, measured in the same run.

- prepare: ``prepare_requests`` vs the tutorial loop (``DataFrame.iterrows`` + ``json.dumps``
  per row, written line by line), on the realistic request of :mod:`benchmarks.data`;
- collect: ``collect_partition`` over downloaded result files vs ``pyarrow.json.read_json``
  + pyarrow compute doing the same job (parse lines and structured content, join on
  custom_id, write the results and failed Parquet tables); ~2 % error lines;
- each pair runs interleaved, ``REPEAT`` times, and the median is reported;
- peak memory of 1M rows is measured in a fresh process per step (``mem_prepare``,
  ``mem_collect``): growth over the input DataFrame for prepare, the whole process for
  collect.
"""

from __future__ import annotations

import io
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import data

REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))
FAKE_KEY = "sk-bench-0000000000000000"  # redaction runs, as with a real key; never present


def _interleaved(ours: Callable[[], Any], baseline: Callable[[], Any]) -> tuple[float, float]:
    """Median seconds of each, run one after the other ``REPEAT`` times."""
    mine, theirs = [], []
    for _ in range(REPEAT):
        for fn, out in ((baseline, theirs), (ours, mine)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(mine), statistics.median(theirs)


def _figures(rows: int, ours: float, baseline: float, baseline_name: str) -> dict[str, Any]:
    return {
        "rows": rows,
        "rows_per_second": round(rows / ours),
        f"{baseline_name}_rows_per_second": round(rows / baseline),
        f"ratio_vs_{baseline_name}": round(baseline / ours, 2),
        "median_of": REPEAT,
    }


# --- prepare ------------------------------------------------------------------------------


def tutorial_prepare(frame: Any, path: str) -> None:
    """What a tutorial does: one dict and one json.dumps per row, one write per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for _, row in frame.iterrows():
            body = {
                "model": data.SPEC_KWARGS["model"],
                "messages": [
                    {"role": "system", "content": data.SYSTEM_PROMPT},
                    {"role": "user", "content": data.TEMPLATE.format(**row)},
                ],
                **data.SPEC_KWARGS["params"],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "review_label", "schema": data.SCHEMA, "strict": True},
                },
            }
            line = {
                "custom_id": str(row["review_id"]),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            fh.write(json.dumps(line) + "\n")


def bench_prepare(rows: int) -> dict[str, Any]:
    from infron_dagster import RequestSpec, prepare_requests

    frame = data.frame(rows)
    spec = RequestSpec(**data.SPEC_KWARGS)
    with tempfile.TemporaryDirectory() as work:

        def ours() -> None:
            prepare_requests(frame, spec, name="bench", partition_key="p", workdir=work)

        def tutorial() -> None:
            tutorial_prepare(frame, os.path.join(work, "tutorial.jsonl"))

        mine, theirs = _interleaved(ours, tutorial)
    return {**_figures(rows, mine, theirs, "tutorial"), "goal_ratio": ">= 5"}


# --- collect ------------------------------------------------------------------------------


def make_lake(rows: int, root: str) -> Any:
    """A partition submitted and answered: inputs snapshot, manifest, downloaded result files
    (the realistic lines of benchmarks.data), as collection finds them."""
    import pyarrow.parquet as pq

    from infron_dagster import BatchStorage, RequestSpec, prepare_requests
    from infron_dagster.manifest import ChunkRecord, Manifest

    spec = RequestSpec(**data.SPEC_KWARGS)
    storage = BatchStorage(os.path.join(root, "lake"), "bench")
    prepared = prepare_requests(
        data.frame(rows), spec, name="bench", partition_key="p", workdir=os.path.join(root, "w")
    )
    storage.upload_file(prepared.snapshot_path, storage.attempt_file("inputs", "p", 1))
    storage.write_table(storage.attempt_file("invalid", "p", 1), prepared.invalid)
    ids = pq.read_table(prepared.snapshot_path, columns=["custom_id"]).column(0).to_pylist()
    chunks, info, start = [], {}, 0
    raw = storage.attempt_dir("raw", "p", 1)
    for chunk in prepared.chunks:
        batch_id = f"batch_{chunk.index:04d}"
        output, errors = data.result_lines(ids[start : start + chunk.requests], seed=chunk.index)
        start += chunk.requests
        files = []
        for name, lines in (("output.jsonl", output), ("errors.jsonl", errors)):
            path = raw / batch_id / name
            storage.write_bytes(path, b"\n".join(lines) + b"\n")
            files.append(storage.relative(path))
        info[batch_id] = {"status": "completed", "files": files, "errors": [], "cost": None}
        chunks.append(ChunkRecord(chunk.index, "x", chunk.requests, chunk.bytes, batch_id))
    storage.write_json(raw / "batches.json", info)
    manifest = Manifest(
        name="bench",
        partition_key="p",
        attempt=1,
        fingerprint=prepared.fingerprint,
        api_style="openai",
        endpoint=spec.endpoint,
        model=spec.model,
        state="submitted",
        chunks=chunks,
    )
    storage.write_json(storage.manifest_path("p", 1), manifest.to_dict())
    return storage


class _Redactor:
    """The client's side of collect: result files are on storage, only redaction runs."""

    api_style = "openai"

    def redact(self, text: str) -> str:
        return text.replace(FAKE_KEY, "***")


def ours_collect(storage: Any) -> Any:
    from infron_dagster import RequestSpec, collect_partition

    outcome = collect_partition(_Redactor(), storage, RequestSpec(**data.SPEC_KWARGS), "p")
    assert outcome.ready
    return outcome


def pyarrow_collect(storage: Any, out_dir: str) -> tuple[int, int]:
    """The same job with pyarrow.json and pyarrow compute, no per-line validation: read
    every result file, pull the fields, parse the structured content, join on custom_id,
    write results and failed (errors and missing rows) as Parquet."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from infron_dagster.structured import arrow_type_for_schema

    info = storage.read_json(storage.attempt_dir("raw", "p", 1) / "batches.json")
    tables = []
    for batch_id, batch in info.items():
        for rel in batch["files"]:
            table = pj.read_json(io.BytesIO(storage.resolve(rel).read_bytes()))
            tables.append(table.append_column("batch_id", pa.array([batch_id] * len(table))))
    lines = pa.concat_tables(tables, promote_options="permissive")
    response = lines.column("response").combine_chunks()
    body = pc.struct_field(response, "body")
    choice = pc.list_element(pc.struct_field(body, "choices"), 0)
    usage = pc.struct_field(body, "usage")
    body_error = pc.struct_field(body, "error")
    error = lines.column("error").combine_chunks()
    content = pc.struct_field(pc.struct_field(choice, "message"), "content")
    ok = pc.and_(pc.equal(pc.struct_field(response, "status_code"), 200), error.is_null())
    ok = ok.fill_null(False)
    props = data.SCHEMA["properties"]
    schema = pa.schema([(k, arrow_type_for_schema(v)) for k, v in props.items()])
    texts = pc.filter(content, ok)
    joined = pc.binary_join_element_wise(texts, "\n", "")
    _, offsets, values = joined.buffers()
    end = int.from_bytes(offsets.to_pybytes()[-4:], "little")
    structured = pj.read_json(
        io.BytesIO(memoryview(values)[:end]),
        parse_options=pj.ParseOptions(explicit_schema=schema),
    )
    answers = pa.table(
        {
            "custom_id": pc.filter(lines.column("custom_id"), ok),
            "response_text": texts,
            **{name: structured.column(name) for name in schema.names},
            "model": pc.filter(pc.struct_field(body, "model"), ok),
            "finish_reason": pc.filter(pc.struct_field(choice, "finish_reason"), ok),
            "prompt_tokens": pc.filter(pc.struct_field(usage, "prompt_tokens"), ok),
            "completion_tokens": pc.filter(pc.struct_field(usage, "completion_tokens"), ok),
            "batch_id": pc.filter(lines.column("batch_id"), ok),
        }
    )
    failed_lines = pc.invert(ok)
    code = pc.coalesce(pc.struct_field(error, "code"), pc.struct_field(body_error, "code"))
    message = pc.coalesce(pc.struct_field(error, "message"), pc.struct_field(body_error, "message"))
    errors = pa.table(
        {
            "custom_id": pc.filter(lines.column("custom_id"), failed_lines),
            "error_code": pc.filter(code, failed_lines),
            "error_message": pc.filter(message, failed_lines),
            "http_status": pc.filter(pc.struct_field(response, "status_code"), failed_lines),
        }
    )
    inputs = pq.read_table(storage.attempt_file("inputs", "p", 1))
    inputs = inputs.drop_columns(["__request_hash", "__carried_from"])
    index = pc.index_in(inputs.column("custom_id"), value_set=answers.column("custom_id"))
    found = pc.is_valid(index)
    results = inputs.filter(found)
    picked = answers.take(pc.drop_null(index))
    for name in picked.column_names[1:]:
        results = results.append_column(name, picked.column(name))
    results = results.append_column(
        "total_tokens", pc.add(picked.column("prompt_tokens"), picked.column("completion_tokens"))
    )
    rest = inputs.filter(pc.invert(found))
    where = pc.index_in(rest.column("custom_id"), value_set=errors.column("custom_id"))
    got = errors.take(where)
    failed = rest
    for name in got.column_names[1:]:
        failed = failed.append_column(name, got.column(name))
    failed = failed.append_column(
        "error_code_or_missing", pc.fill_null(got.column("error_code"), "missing_result")
    )
    pq.write_table(results, os.path.join(out_dir, "results.parquet"), compression="zstd")
    pq.write_table(failed, os.path.join(out_dir, "failed.parquet"), compression="zstd")
    return results.num_rows, failed.num_rows


def bench_collect(rows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        storage = make_lake(rows, work)
        outcome = ours_collect(storage)
        check = pyarrow_collect(storage, work)
        assert (outcome.results_summary.rows, outcome.failed_summary.rows) == check, check
        mine, theirs = _interleaved(
            lambda: ours_collect(storage), lambda: pyarrow_collect(storage, work)
        )
    figures = _figures(rows, mine, theirs, "pyarrow_json")
    figures["failed_rows"] = check[1]
    return {**figures, "goal_ratio": ">= 0.7"}


# --- memory, each in a fresh process -------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak is this step's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mem_prepare(rows: int) -> dict[str, Any]:
    """Peak RSS growth of prepare over the input DataFrame (already in memory)."""
    import gc

    from infron_dagster import RequestSpec, prepare_requests

    frame = data.frame(rows)
    gc.collect()
    before = _rss_mb()
    reset = _reset_peak()
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        prepare_requests(
            frame, RequestSpec(**data.SPEC_KWARGS), name="bench", partition_key="p", workdir=work
        )
        seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "dataframe_rss_mb": round(before),
        "peak_growth_over_dataframe_mb": round(_peak_mb() - before),
        "seconds": round(seconds, 1),
        "peak_reset": reset,
        "goal_mb": "<= 300",
    }


def make_parquet_input(rows: int, path: str) -> dict[str, Any]:
    """The benchmark rows as a Parquet file of 64k-row row groups; what it holds in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size, writer = 0, None
    for start in range(0, rows, 1_000_000):  # in pieces: 10M rows would not fit at once
        piece = data.frame(min(1_000_000, rows - start), start)
        table = pa.Table.from_pandas(piece, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=65_536)
        size += table.nbytes
    if writer is not None:
        writer.close()
    return {"rows": rows, "table_in_memory_mb": round(size / 2**20)}


def mem_prepare_parquet(rows: int, path: str) -> dict[str, Any]:
    """Peak RSS growth of prepare reading a ParquetSource partition (never loaded whole)."""
    import gc

    from infron_dagster import ParquetSource, RequestSpec, prepare_requests

    spec = RequestSpec(**data.SPEC_KWARGS)
    gc.collect()
    before = _rss_mb()
    reset = _reset_peak()
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        prepared = prepare_requests(
            ParquetSource(path).input(None), spec, name="bench", partition_key="p", workdir=work
        )
        seconds = time.perf_counter() - start
    return {
        "rows": prepared.valid_rows + prepared.invalid.num_rows,
        "peak_growth_mb": round(_peak_mb() - before),
        "seconds": round(seconds, 1),
        "peak_reset": reset,
    }


def mem_collect(rows: int, lake_dir: str) -> dict[str, Any]:
    """Peak RSS of a whole process that collects a partition of ``rows`` rows."""
    from infron_dagster import BatchStorage

    storage = BatchStorage(os.path.join(lake_dir, "lake"), "bench")
    start = time.perf_counter()
    outcome = ours_collect(storage)
    return {
        "rows": rows,
        "results": outcome.results_summary.rows,
        "failed": outcome.failed_summary.rows,
        "process_peak_rss_mb": round(_peak_mb()),
        "seconds": round(time.perf_counter() - start, 1),
        "goal_mb": "<= 1200",
    }
