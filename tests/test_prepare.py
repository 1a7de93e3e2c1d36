"""PREPARE: rows -> validated request JSONL chunks. Pure data code, no Dagster, no server."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pytest

from infron_dagster import InputError, RequestSpec, make_custom_id, prepare_requests

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string"}, "score": {"type": "number"}},
    "required": ["sentiment", "score"],
}


def spec(**overrides) -> RequestSpec:
    values = {"model": "gpt-4o-mini", "prompt_template": "Sentiment of {text}", "key_columns": "id"}
    return RequestSpec(**{**values, **overrides})


def frame(n: int = 10, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {"id": range(start, start + n), "text": [f"review {i}" for i in range(start, start + n)]}
    )


def prepare(data, tmp_path, request_spec: RequestSpec | None = None, **kwargs):
    kwargs.setdefault("name", "rev")
    kwargs.setdefault("partition_key", "p1")
    workdir = tmp_path / f"work-{len(os.listdir(tmp_path))}"
    return prepare_requests(data, request_spec or spec(), workdir=str(workdir), **kwargs)


def chunk_lines(prepared) -> list[list[dict]]:
    out = []
    for chunk in prepared.chunks:
        with open(chunk.path, "rb") as fh:
            raw = fh.read()
        assert len(raw) == chunk.bytes
        lines = raw.splitlines()
        assert len(lines) == chunk.requests
        out.append([json.loads(line) for line in lines])
    return out


def ids_by_key(prepared) -> dict[int, str]:
    return dict(
        zip(
            prepared.valid.column("id").to_pylist(),
            prepared.valid.column("custom_id").to_pylist(),
            strict=True,
        )
    )


def invalid_by_key(prepared) -> dict[int, tuple[str, str]]:
    table = prepared.invalid
    return {
        key: (code, message)
        for key, code, message in zip(
            table.column("id").to_pylist(),
            table.column("error_code").to_pylist(),
            table.column("error_message").to_pylist(),
            strict=True,
        )
    }


# --- custom_id -----------------------------------------------------------------------------


def test_custom_id_is_derived_from_name_partition_and_key_not_position(tmp_path):
    data = frame(10)
    shuffled = data.sample(frac=1.0, random_state=7)
    assert shuffled["id"].tolist() != data["id"].tolist()

    first = ids_by_key(prepare(data, tmp_path))
    second = ids_by_key(prepare(shuffled, tmp_path))

    assert first == second
    assert first == {i: make_custom_id("rev", "p1", str(i)) for i in range(10)}
    assert len(set(first.values())) == 10


def test_custom_id_differs_across_partitions_and_names(tmp_path):
    in_p1 = ids_by_key(prepare(frame(5), tmp_path, partition_key="p1"))
    in_p2 = ids_by_key(prepare(frame(5), tmp_path, partition_key="p2"))
    other_name = ids_by_key(prepare(frame(5), tmp_path, name="other"))

    assert not set(in_p1.values()) & set(in_p2.values())
    assert not set(in_p1.values()) & set(other_name.values())
    assert in_p2[3] == make_custom_id("rev", "p2", "3")


def test_custom_id_of_composite_key_uses_every_key_column(tmp_path):
    data = pd.DataFrame({"shop": ["x", "x", "y"], "n": [1, 2, 1], "text": ["a", "b", "c"]})
    prepared = prepare(data, tmp_path, spec(key_columns=("shop", "n")))
    ids = prepared.valid.column("custom_id").to_pylist()
    assert len(set(ids)) == 3
    expected = make_custom_id("rev", "p1", json.dumps(["y", "1"]))
    assert expected in ids


# --- whole-input errors ----------------------------------------------------------------------


def test_duplicate_keys_raise_input_error_listing_them(tmp_path):
    data = pd.DataFrame({"id": [1, 2, 2, 3, 3, 3, 4], "text": list("abcdefg")})
    with pytest.raises(InputError) as raised:
        prepare(data, tmp_path)
    message = str(raised.value)
    assert "2 duplicate key(s)" in message
    assert "['2', '3']" in message


def test_null_key_raises_input_error(tmp_path):
    data = pa.table({"id": pa.array([1, None, 3], pa.int64()), "text": ["a", "b", "c"]})
    with pytest.raises(InputError, match=r"null in 1 row\(s\), first rows \[1\]"):
        prepare(data, tmp_path)


def test_missing_key_column_is_named(tmp_path):
    data = pd.DataFrame({"review_id": [1], "text": ["a"]})
    with pytest.raises(InputError, match=r"key column 'id' is not in the input"):
        prepare(data, tmp_path)


def test_missing_template_column_is_named(tmp_path):
    data = pd.DataFrame({"id": [1], "text": ["a"]})
    request_spec = spec(prompt_template="{text} from {author}")
    with pytest.raises(InputError, match=r"template column 'author' is not in the input"):
        prepare(data, tmp_path, request_spec)


def test_reserved_column_name_is_refused(tmp_path):
    data = pd.DataFrame({"id": [1], "text": ["a"], "custom_id": ["mine"]})
    with pytest.raises(InputError, match="'custom_id' is reserved"):
        prepare(data, tmp_path)


# --- row-level validation --------------------------------------------------------------------


def test_null_and_nan_in_template_column_are_invalid_rows_naming_the_column(tmp_path):
    from_pandas = pd.DataFrame({"id": [1, 2, 3], "text": ["ok", None, float("nan")]})
    prepared = prepare(from_pandas, tmp_path)
    assert prepared.valid.column("id").to_pylist() == [1]
    invalid = invalid_by_key(prepared)
    assert set(invalid) == {2, 3}
    for code, message in invalid.values():
        assert code == "invalid_input"
        assert "'text'" in message and "null" in message

    # A float NaN that survives into Arrow (not converted to null) is caught too.
    arrow = pa.table({"id": [1, 2], "score": pa.array([0.5, float("nan")], pa.float64())})
    prepared = prepare(arrow, tmp_path, spec(prompt_template="score {score}"))
    assert prepared.valid.column("id").to_pylist() == [1]
    assert invalid_by_key(prepared) == {2: ("invalid_input", "column 'score' is null")}
    assert prepared.invalid_reasons == {"invalid_input": 1}


def test_empty_prompt_is_an_invalid_row(tmp_path):
    data = pd.DataFrame({"id": [1, 2], "text": ["fine", "   "]})
    prepared = prepare(data, tmp_path, spec(prompt_template="{text}"))
    assert prepared.valid.column("id").to_pylist() == [1]
    assert invalid_by_key(prepared) == {2: ("invalid_input", "prompt is empty after rendering")}


def test_oversize_request_is_an_invalid_row_and_never_written(tmp_path):
    data = pd.DataFrame({"id": [1, 2, 3], "text": ["short", "x" * 5000, "also short"]})
    prepared = prepare(data, tmp_path, max_request_bytes=1000)
    assert sorted(prepared.valid.column("id").to_pylist()) == [1, 3]
    code, message = invalid_by_key(prepared)[2]
    assert code == "invalid_input"
    assert message.startswith("request is ") and message.endswith("bytes, over 1000")
    sent = [line["custom_id"] for lines in chunk_lines(prepared) for line in lines]
    assert make_custom_id("rev", "p1", "2") not in sent
    assert len(sent) == 2


def test_body_fn_raising_is_an_invalid_row(tmp_path):
    def body(row):
        if row["id"] == 2:
            raise KeyError("no_such_field")
        return {"model": "m", "messages": [{"role": "user", "content": row["text"]}]}

    prepared = prepare(frame(3), tmp_path, spec(prompt_template=None, body_fn=body))
    assert sorted(prepared.valid.column("id").to_pylist()) == [0, 1]
    code, message = invalid_by_key(prepared)[2]
    assert code == "invalid_input"
    assert "body_fn raised KeyError" in message and "no_such_field" in message


def test_body_fn_returning_a_non_dict_is_an_invalid_row(tmp_path):
    prepared = prepare(frame(2), tmp_path, spec(prompt_template=None, body_fn=lambda row: "hi"))
    assert prepared.valid.num_rows == 0
    assert {c for c, _ in invalid_by_key(prepared).values()} == {"invalid_input"}
    assert "returned str, not dict" in invalid_by_key(prepared)[0][1]
    assert prepared.chunks == []


def test_unserialisable_value_is_an_invalid_row(tmp_path):
    def body(row):
        temperature = float("nan") if row["id"] == 1 else 0.0
        return {"model": "m", "input": row["text"], "temperature": temperature}

    prepared = prepare(frame(3), tmp_path, spec(prompt_template=None, body_fn=body))
    assert sorted(prepared.valid.column("id").to_pylist()) == [0, 2]
    code, message = invalid_by_key(prepared)[1]
    assert code == "invalid_input"
    assert "cannot be serialised to JSON" in message
    for lines in chunk_lines(prepared):  # the NaN never reached a request file
        assert all(line["body"]["temperature"] == 0.0 for line in lines)


def test_invalid_rows_keep_their_columns_and_custom_id(tmp_path):
    data = pd.DataFrame({"id": [1, 2], "text": ["ok", None], "extra": ["e1", "e2"]})
    prepared = prepare(data, tmp_path)
    row = prepared.invalid.to_pylist()[0]
    assert row["id"] == 2 and row["extra"] == "e2"
    assert row["custom_id"] == make_custom_id("rev", "p1", "2")


# --- chunking ----------------------------------------------------------------------------------


def test_chunks_by_max_requests_in_custom_id_order(tmp_path):
    prepared = prepare(frame(20), tmp_path, max_requests_per_batch=7)
    assert [c.requests for c in prepared.chunks] == [7, 7, 6]
    assert [c.index for c in prepared.chunks] == [0, 1, 2]
    lines = chunk_lines(prepared)
    sent = [line["custom_id"] for chunk in lines for line in chunk]
    assert sent == sorted(sent)
    assert sent == prepared.valid.column("custom_id").to_pylist()
    for chunk in lines:
        for line in chunk:
            assert line["method"] == "POST"
            assert line["url"] == "/v1/chat/completions"
            assert line["body"]["model"] == "gpt-4o-mini"
    assert prepared.request_bytes == sum(c.bytes for c in prepared.chunks)


def test_chunks_by_max_bytes(tmp_path):
    whole = prepare(frame(20), tmp_path)
    assert len(whole.chunks) == 1
    sizes = [
        len(json.dumps(line, separators=(",", ":")).encode()) + 1 for line in chunk_lines(whole)[0]
    ]
    limit = max(sizes) * 3  # about three requests per chunk
    prepared = prepare(frame(20), tmp_path, max_bytes_per_batch=limit)

    assert len(prepared.chunks) >= 7
    assert all(c.bytes <= limit for c in prepared.chunks)
    assert all(c.requests >= 2 for c in prepared.chunks)
    assert sum(c.requests for c in prepared.chunks) == 20
    sent = [line["custom_id"] for chunk in chunk_lines(prepared) for line in chunk]
    assert sent == sorted(sent) and len(set(sent)) == 20


def test_no_valid_rows_means_no_chunks(tmp_path):
    data = pd.DataFrame({"id": [1, 2], "text": [None, None]})
    prepared = prepare(data, tmp_path)
    assert prepared.chunks == []
    assert prepared.valid.num_rows == 0 and prepared.invalid.num_rows == 2


def test_limits_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        prepare(frame(2), tmp_path, max_requests_per_batch=0)


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_ignores_row_order_but_not_values(tmp_path):
    data = frame(12)
    base = prepare(data, tmp_path).fingerprint
    assert prepare(data.iloc[::-1], tmp_path).fingerprint == base

    changed = data.copy()
    changed.loc[5, "text"] = "review 5, edited"
    assert prepare(changed, tmp_path).fingerprint != base

    assert prepare(data, tmp_path, spec(model="gpt-4o")).fingerprint != base
    assert prepare(frame(11), tmp_path).fingerprint != base
    assert prepare(data, tmp_path, partition_key="p2").fingerprint != base


# --- bodies ------------------------------------------------------------------------------------


def test_chat_body_with_system_prompt_params_and_response_schema(tmp_path):
    request_spec = spec(
        system_prompt="Be terse.", params={"temperature": 0}, response_schema=SCHEMA
    )
    line = chunk_lines(prepare(frame(1), tmp_path, request_spec))[0][0]
    body = line["body"]
    assert body["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Sentiment of review 0"},
    ]
    assert body["temperature"] == 0
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "result", "schema": SCHEMA, "strict": True},
    }


def test_embeddings_body(tmp_path):
    request_spec = spec(
        model="text-embedding-3-small", endpoint="/v1/embeddings", prompt_template="{text}"
    )
    line = chunk_lines(prepare(frame(2), tmp_path, request_spec))[0][0]
    assert line["url"] == "/v1/embeddings"
    assert set(line["body"]) == {"model", "input"}
    assert line["body"]["model"] == "text-embedding-3-small"
    assert line["body"]["input"].startswith("review ")


def test_responses_body_with_schema(tmp_path):
    request_spec = spec(endpoint="/v1/responses", system_prompt="Be terse.", response_schema=SCHEMA)
    line = chunk_lines(prepare(frame(1), tmp_path, request_spec))[0][0]
    assert line["url"] == "/v1/responses"
    assert line["body"] == {
        "model": "gpt-4o-mini",
        "input": "Sentiment of review 0",
        "instructions": "Be terse.",
        "text": {
            "format": {"type": "json_schema", "name": "result", "schema": SCHEMA, "strict": True}
        },
    }


def test_literal_braces_in_template(tmp_path):
    request_spec = spec(prompt_template='Answer as {{"label": ...}} for {text}')
    line = chunk_lines(prepare(frame(1), tmp_path, request_spec))[0][0]
    assert line["body"]["messages"][0]["content"] == 'Answer as {"label": ...} for review 0'


def test_spec_rejects_bad_combinations():
    with pytest.raises(ValueError, match="exactly one of prompt_template and body_fn"):
        RequestSpec(model="m")
    with pytest.raises(ValueError, match="endpoint must be one of"):
        RequestSpec(model="m", prompt_template="{x}", endpoint="/v1/images")
    with pytest.raises(ValueError, match="does not apply to embeddings"):
        RequestSpec(
            model="m", prompt_template="{x}", endpoint="/v1/embeddings", response_schema=SCHEMA
        )


def test_a_row_the_template_cannot_format_is_invalid_not_a_crash(tmp_path):
    spec = RequestSpec(model="m", prompt_template="Price {price:.2f}", key_columns=("id",))
    frame = pd.DataFrame({"id": [1, 2], "price": ["9.50", "n/a"]})  # strings, not numbers
    prepared = prepare_requests(frame, spec, name="n", partition_key="p", workdir=tmp_path)
    assert prepared.valid.num_rows == 0 and prepared.chunks == []
    messages = prepared.invalid.column("error_message").to_pylist()
    assert len(messages) == 2
    assert all("'price'" in m and "format code" in m for m in messages)


def test_request_bytes_and_fingerprint_of_valid_input_are_pinned(tmp_path):
    """Request lines are fingerprinted: if these bytes change, every user pays twice after an
    upgrade. The digests were taken before the input validation was added; keep them."""
    import hashlib

    request_spec = spec(
        prompt_template='Rate {text} ({stars:.1f} stars) {{"x"}}',
        system_prompt="Be terse.",
        params={"temperature": 0},
        response_schema=SCHEMA,
    )
    data = pd.DataFrame(
        {
            "id": [3, 1, 2, 4],
            "text": ['naïve "quote"\nline', "emoji \N{GRINNING FACE}", "plain", None],
            "stars": [4.0, 2.5, 5.0, 1.0],
        }
    )
    prepared = prepare(data, tmp_path, request_spec, name="gold", partition_key="2026-11-24")
    with open(prepared.chunks[0].path, "rb") as fh:
        raw = fh.read()
    assert hashlib.sha256(raw).hexdigest() == (
        "f75698e20b16e00c6137f57c49f1846466d9371997aa7c55f776c6f4ab2fc873"
    )
    assert prepared.fingerprint == (
        "9e113854f990eb28bf73103e9d4213c0a81e3405c6b4cd04c17845c1d79d3f2c"
    )
