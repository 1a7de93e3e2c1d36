"""Upgrading never sends a partition again: golden fixtures written by the code of commit
9c9d438 (``tests/fixtures/make_golden.py``: manifests, snapshots, request files, result files,
tables) are prepared, submitted and collected again by today's code.

- the request lines are byte-identical, so are the request hashes and the fingerprint;
- submitting the unchanged input reuses the recorded batches and calls no API at all;
- a changed row sends that row only: every answered row is carried;
- collecting again yields the same results and failed rows.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))

from golden_specs import Golden, goldens

from infron_dagster import BatchStorage, collect_partition, prepare_requests
from infron_dagster.carry import carry_succeeded
from infron_dagster.columns import CUSTOM_ID, HIDDEN_COLUMNS, REQUEST_HASH
from infron_dagster.manifest import Manifest
from infron_dagster.submit import submit_prepared

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "golden")
GOLDENS = {g.name: g for g in goldens()}


class NoCallsClient:
    """A client that refuses every API call: an upgrade must not need one."""

    api_style = "openai"

    def redact(self, text: str) -> str:
        return text

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the upgrade called the API: client.{name}")


@pytest.fixture
def lake(tmp_path) -> str:
    shutil.copytree(os.path.join(FIXTURES, "lake"), tmp_path / "lake")
    return str(tmp_path / "lake")


def _rows(golden: Golden) -> pa.Table:
    return pq.read_table(os.path.join(FIXTURES, "inputs", f"{golden.name}.parquet"))


def _prepare(golden: Golden, rows: pa.Table, workdir, **kwargs: Any):
    return prepare_requests(
        rows,
        golden.spec,
        name=golden.name,
        partition_key=golden.partition_key,
        workdir=str(workdir),
        max_requests_per_batch=golden.max_requests,
        **kwargs,
    )


def _manifest(storage: BatchStorage, key: str | None, attempt: int) -> Manifest:
    return Manifest.from_dict(storage.read_json(storage.manifest_path(key, attempt)))


def _attempt_rows(storage: BatchStorage, key: str | None, attempt: int) -> pa.Table:
    """The rows an attempt was prepared from (a retry's rows are its snapshot's)."""
    rows = storage.read_table(storage.attempt_file("inputs", key, attempt))
    return rows.drop_columns([c for c in (CUSTOM_ID, *HIDDEN_COLUMNS) if c in rows.column_names])


def _sent_bytes(storage: BatchStorage, manifest: Manifest) -> list[bytes]:
    return [storage.resolve(chunk.path).read_bytes() for chunk in manifest.chunks]


def _check_same_requests(storage, golden, rows, attempt, workdir) -> None:
    manifest = _manifest(storage, golden.partition_key, attempt)
    prepared = _prepare(golden, rows, workdir)
    assert prepared.fingerprint == manifest.fingerprint
    written = [pathlib.Path(c.path).read_bytes() for c in prepared.chunks]
    assert written == _sent_bytes(storage, manifest)
    assert [c.requests for c in prepared.chunks] == [c.requests for c in manifest.chunks]
    snapshot = storage.read_table(storage.attempt_file("inputs", golden.partition_key, attempt))
    assert prepared.valid.column(CUSTOM_ID).equals(snapshot.column(CUSTOM_ID))
    assert prepared.valid.column(REQUEST_HASH).equals(snapshot.column(REQUEST_HASH))
    invalid = storage.read_table(storage.attempt_file("invalid", golden.partition_key, attempt))
    assert _sorted(prepared.invalid) == _sorted(invalid)


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_same_request_lines_hashes_and_fingerprint(name, lake, tmp_path):
    golden = GOLDENS[name]
    storage = BatchStorage(lake, name)
    _check_same_requests(storage, golden, _rows(golden), 1, tmp_path / "a1")
    if name == "chat":  # the retry attempt, prepared from its own rows
        rows = _attempt_rows(storage, golden.partition_key, 2)
        _check_same_requests(storage, golden, rows, 2, tmp_path / "a2")


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_unchanged_partition_is_not_sent_again(name, lake, tmp_path):
    golden = GOLDENS[name]
    storage = BatchStorage(lake, name)
    before = storage.attempts(golden.partition_key)
    succeeded = carry_succeeded(storage, golden.partition_key)
    prepared = _prepare(golden, _rows(golden), tmp_path / "w", succeeded=succeeded)
    outcome = submit_prepared(
        NoCallsClient(), storage, prepared, spec=golden.spec, partition_key=golden.partition_key
    )
    assert outcome.reused and not outcome.created
    assert storage.attempts(golden.partition_key) == before


def _sorted(table: pa.Table) -> list[dict[str, Any]]:
    return [_nan_equal(row) for row in table.sort_by(CUSTOM_ID).to_pylist()]


def _nan_equal(value: Any) -> Any:
    """``value`` with NaN spelled so that it equals itself."""
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, dict):
        return {k: _nan_equal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_equal(v) for v in value]
    return value


def _same_floats(table: pa.Table) -> pa.Table:
    """Embeddings as float32 whichever width a version wrote (values are float32 on the wire)."""
    if "embedding" in table.column_names:
        index = table.column_names.index("embedding")
        column = table.column(index).cast(pa.list_(pa.float32()))
        table = table.set_column(index, "embedding", column)
    return table


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_collect_again_gives_the_same_tables(name, lake):
    golden = GOLDENS[name]
    storage = BatchStorage(lake, name)
    key = golden.partition_key
    kinds = ("results", "failed")
    old = {kind: storage.read_table(storage.table_path(kind, key)) for kind in kinds}
    outcome = collect_partition(NoCallsClient(), storage, golden.spec, key)
    assert outcome.ready
    for kind in kinds:
        new = storage.read_table(storage.table_path(kind, key))
        # The upgrade adds one column, the row's cost (null without a price or fees); the
        # rest is what the old code wrote.
        assert "cost" in new.column_names and "cost" not in old[kind].column_names
        new = new.drop_columns(["cost"])
        assert new.column_names == old[kind].column_names
        assert _sorted(_same_floats(new)) == _sorted(_same_floats(old[kind]))


def test_a_changed_row_carries_every_answered_row(lake, tmp_path):
    golden = GOLDENS["chat"]
    storage = BatchStorage(lake, "chat")
    key = golden.partition_key
    answered = storage.read_table(storage.table_path("results", key))
    rows = _rows(golden)
    changed_id = answered.column("id")[0].as_py()
    texts = pc.if_else(pc.equal(rows.column("id"), changed_id), "changed text", rows.column("text"))
    rows = rows.set_column(rows.column_names.index("text"), "text", texts)
    succeeded = carry_succeeded(storage, key)
    assert len(succeeded) == answered.num_rows
    prepared = _prepare(golden, rows, tmp_path / "w", succeeded=succeeded)
    assert prepared.carried == answered.num_rows - 1
    assert sum(c.requests for c in prepared.chunks) == 1
