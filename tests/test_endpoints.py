"""Every endpoint in both wire styles, through prepare, submit and collect on the local server."""

import pandas as pd
import pyarrow.dataset as ds
import pytest
from conftest import BOTH_STYLES, make_local_dir

from infron_dagster import (
    BatchStorage,
    RequestSpec,
    collect_partition,
    prepare_requests,
    submit_prepared,
)
from infron_dagster.local.embedded import embedded_client

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["a", "b"]}, "n": {"type": "integer"}},
    "required": ["label", "n"],
}


def _collect(tmp_path, api_style, spec):
    local_dir = make_local_dir(str(tmp_path / "srv"))
    storage = BatchStorage(str(tmp_path / "lake"), "e")
    frame = pd.DataFrame({"id": range(6), "text": [f"text {i}" for i in range(6)]})
    prepared = prepare_requests(frame, spec, name="e", partition_key="p", workdir=tmp_path / "w")
    with embedded_client(local_dir, api_style=api_style) as client:
        submit_prepared(client, storage, prepared, spec=spec, partition_key="p")
        outcome = collect_partition(client, storage, spec, "p")
    assert outcome.ready and outcome.failed.num_rows == 0
    return outcome.results.to_pandas()


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
@BOTH_STYLES
def test_text_endpoints_give_response_text_and_typed_structured_columns(
    tmp_path, api_style, endpoint
):
    spec = RequestSpec(
        model="m",
        endpoint=endpoint,
        prompt_template="Label {text}",
        key_columns=("id",),
        response_schema=SCHEMA,
    )
    results = _collect(tmp_path, api_style, spec)
    assert len(results) == 6 and results["response_text"].notna().all()
    assert set(results["label"]) <= {"a", "b"} and str(results["n"].dtype) == "int64"
    assert (results["prompt_tokens"] > 0).all() and (results["completion_tokens"] > 0).all()


@BOTH_STYLES
def test_embeddings_give_a_vector_per_row(tmp_path, api_style):
    spec = RequestSpec(
        model="e",
        endpoint="/v1/embeddings",
        prompt_template="{text}",
        key_columns=("id",),
        params={"dimensions": 4},
    )
    results = _collect(tmp_path, api_style, spec)
    assert "response_text" not in results.columns
    assert all(len(vector) == 4 for vector in results["embedding"])
    assert results["embedding"].map(tuple).nunique() == 6  # one distinct vector per text


@BOTH_STYLES
def test_input_and_schema_columns_named_like_output_columns_are_kept_apart(tmp_path, api_style):
    schema = {
        "type": "object",
        "properties": {"model": {"type": "string"}, "partition": {"type": "integer"}},
    }
    spec = RequestSpec(
        model="m", prompt_template="Label {text}", key_columns=("id",), response_schema=schema
    )
    local_dir = make_local_dir(str(tmp_path / "srv"))
    storage = BatchStorage(str(tmp_path / "lake"), "e")
    frame = pd.DataFrame(
        {
            "id": range(4),
            "text": ["a", "b", None, "d"],
            "model": "mine",
            "attempt": 7,
            "partition": "x",
            "response_text": "old",
        }
    )
    prepared = prepare_requests(frame, spec, name="e", partition_key="p", workdir=tmp_path / "w")
    with embedded_client(local_dir, api_style=api_style) as client:
        submit_prepared(client, storage, prepared, spec=spec, partition_key="p")
        outcome = collect_partition(client, storage, spec, "p")
    for table in (outcome.results, outcome.failed):
        assert len(table.column_names) == len(set(table.column_names))
        assert {"input_model", "input_attempt", "input_partition"} <= set(table.column_names)
    results = outcome.results.to_pandas()
    assert set(results["input_model"]) == {"mine"} and set(results["model"]) == {"m"}
    assert {"output_model", "output_partition", "input_response_text"} <= set(results.columns)
    for kind in ("results", "failed"):  # the hive table stays readable
        whole = ds.dataset(str(storage.table_root(kind)), partitioning="hive").to_table()
        assert set(whole.column("partition").to_pylist()) == {"p"}


def test_structured_output_of_the_wrong_type_fails_the_row_instead_of_the_column():
    import pyarrow as pa

    from infron_dagster.results import Outcome
    from infron_dagster.tables import FinalOutcome, build_tables

    spec = RequestSpec(
        model="m",
        prompt_template="{text}",
        key_columns=("id",),
        response_schema={
            "type": "object",
            "required": ["score"],
            "properties": {"score": {"type": "integer"}},
        },
    )
    texts = {
        "a": '{"score": 1}',
        "b": '{"score": "2"}',
        "c": '{"score": 2.5}',
        "d": '{"score": 3.0}',
        "e": "{}",
        "f": "not json",
    }
    inputs = pa.table({"id": list(texts), "custom_id": list(texts)})
    invalid = inputs.slice(0, 0).append_column("error_code", pa.array([], pa.string()))
    invalid = invalid.append_column("error_message", pa.array([], pa.string()))
    final = {k: FinalOutcome(Outcome(k, ok=True, text=t), 1) for k, t in texts.items()}
    results, failed = build_tables(inputs, invalid, final, spec=spec)
    assert results.column("id").to_pylist() == ["a", "d"]
    assert results.schema.field("score").type == pa.int64()
    assert results.column("score").to_pylist() == [1, 3]
    bad = dict(
        zip(failed.column("id").to_pylist(), failed.column("error_code").to_pylist(), strict=True)
    )
    assert bad == dict.fromkeys("bcef", "invalid_structured_output")
    assert all(failed.column("retryable").to_pylist())
