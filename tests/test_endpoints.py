"""Every endpoint in both wire styles, through prepare, submit and collect on the local server."""

import pandas as pd
import pytest
from conftest import make_local_dir

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
