"""Prepare streams in slices: memory is set by the slice, and the slice size changes
nothing that is written (request files, fingerprint, hashes, snapshot, invalid rows)."""

from __future__ import annotations

import pathlib

import pandas as pd
import pyarrow.parquet as pq
import pytest

from infron_dagster import RequestSpec, prepare_requests
from infron_dagster import prepare as prepare_module
from infron_dagster.chunks import ChunkWriter


def _prepare(tmp_path, name: str, rows: pd.DataFrame, spec: RequestSpec, **kwargs):
    return prepare_requests(
        rows, spec, name="s", partition_key="p", workdir=tmp_path / name, **kwargs
    )


def _written(prepared) -> tuple:
    chunks = [pathlib.Path(c.path).read_bytes() for c in prepared.chunks]
    snapshot = pq.read_table(prepared.snapshot_path)
    return (
        prepared.fingerprint,
        chunks,
        snapshot.to_pylist(),
        prepared.invalid.to_pylist(),
        prepared.estimated_input_tokens,
        prepared.carried,
    )


@pytest.mark.parametrize(
    "spec",
    [
        RequestSpec(model="m", prompt_template="Say {text} to {name}", system_prompt="s"),
        RequestSpec(model="m", prompt_template="{text!r}", key_columns=("id",)),
        RequestSpec(model="m", body_fn=lambda row: {"input": str(row["text"])}),
    ],
)
def test_the_slice_size_changes_nothing_written(tmp_path, monkeypatch, spec):
    rows = pd.DataFrame(
        {
            "id": range(1000),
            "name": [None if i % 97 == 0 else f"n{i}" for i in range(1000)],
            "text": [f'text "{i}"\n' for i in range(1000)],
        }
    )
    whole = _prepare(tmp_path, "whole", rows, spec, max_requests_per_batch=300)
    ids = pq.read_table(whole.snapshot_path).column("custom_id").to_pylist()
    hashes = pq.read_table(whole.snapshot_path).column("__request_hash").to_pylist()
    succeeded = {cid: (h, 1) for cid, h in list(zip(ids, hashes, strict=True))[::3]}
    monkeypatch.setattr(prepare_module, "SLICE_ROWS", 37)
    sliced = _prepare(tmp_path, "sliced", rows, spec, max_requests_per_batch=300)
    assert _written(sliced) == _written(whole)
    carried = _prepare(
        tmp_path, "carried", rows, spec, max_requests_per_batch=300, succeeded=succeeded
    )
    assert carried.carried == len(succeeded)
    assert sum(c.requests for c in carried.chunks) == whole.valid_rows - len(succeeded)
    assert carried.fingerprint == whole.fingerprint  # what is carried is still the request


@pytest.mark.parametrize("max_requests,max_bytes", [(7, 10**9), (1000, 700), (5, 450), (3, 90)])
def test_block_writes_split_chunks_where_line_writes_do(tmp_path, max_requests, max_bytes):
    import random

    import numpy as np

    rng = random.Random(max_bytes)
    lines = [b"x" * rng.randint(1, 120) for _ in range(200)]
    by_line = ChunkWriter(tmp_path / "a", max_requests, max_bytes)
    with by_line:
        for line in lines:
            by_line.write(line)
    by_block = ChunkWriter(tmp_path / "b", max_requests, max_bytes)
    data = b"".join(line + b"\n" for line in lines)
    offsets = np.concatenate(([0], np.cumsum([len(line) + 1 for line in lines])))
    with by_block:
        for start in range(0, 200, 33):  # several blocks, as slices come
            end = min(start + 33, 200)
            by_block.write_block(memoryview(data), offsets[start : end + 1])
    shape = [(c.requests, c.bytes) for c in by_line.chunks]
    assert [(c.requests, c.bytes) for c in by_block.chunks] == shape
    for a, b in zip(by_line.chunks, by_block.chunks, strict=True):
        assert pathlib.Path(a.path).read_bytes() == pathlib.Path(b.path).read_bytes()
