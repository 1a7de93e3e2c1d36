"""Bad configuration and odd input fail before money is spent, naming the setting, the column
or the row. Definition-time checks of RequestSpec, and whole-input / per-row checks of prepare."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pytest

from infron_dagster import InputError, RequestSpec, prepare_requests
from infron_dagster.validate import to_arrow

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string"}, "score": {"type": "number"}},
    "required": ["sentiment", "score"],
}


def spec(**overrides) -> RequestSpec:
    values = {"model": "gpt-4o-mini", "prompt_template": "Sentiment of {text}", "key_columns": "id"}
    return RequestSpec(**{**values, **overrides})


def prepare(data, tmp_path, request_spec: RequestSpec | None = None, **kwargs):
    kwargs.setdefault("name", "rev")
    kwargs.setdefault("partition_key", "p1")
    workdir = tmp_path / f"work-{len(os.listdir(tmp_path))}"
    return prepare_requests(data, request_spec or spec(), workdir=str(workdir), **kwargs)


def invalid_by_key(prepared) -> dict:
    rows = prepared.invalid.to_pylist()
    return {row["id"]: (row["error_code"], row["error_message"]) for row in rows}


def sent_lines(prepared) -> list[dict]:
    lines = []
    for chunk in prepared.chunks:
        with open(chunk.path, "rb") as fh:
            lines += [json.loads(line) for line in fh.read().splitlines()]
    return lines


# --- response_schema -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "path", "why"),
    [
        ("sentiment", "response_schema", "mapping"),
        (["sentiment"], "response_schema", "mapping"),
        ({"properties": {"a": {"type": "string"}}}, "response_schema.type", "object"),
        ({"type": "array", "items": {"type": "string"}}, "response_schema.type", "object"),
        ({"type": "object", "properties": "oops"}, "response_schema.properties", "mapping"),
        ({"type": "object", "properties": {"a": "string"}}, "response_schema.properties.a", "str"),
        ({"type": "object", "properties": {"a": True}}, "response_schema.properties.a", "bool"),
        ({"type": "object", "properties": {"a": {"type": "text"}}}, "properties.a.type", "text"),
        ({"type": "object", "properties": {"a": {"type": []}}}, "properties.a.type", "empty"),
        ({"type": "object", "properties": {"a": {"type": 3}}}, "properties.a.type", "int"),
        ({"type": "object", "required": "a", "properties": {"a": {}}}, "required", "list"),
        ({"type": "object", "required": [1], "properties": {"a": {}}}, "required", "int"),
        ({"type": "object", "required": ["b"], "properties": {"a": {}}}, "required", "'b'"),
        (
            {"type": "object", "properties": {"tags": {"type": "array", "items": "string"}}},
            "response_schema.properties.tags.items",
            "str",
        ),
        (
            {"type": "object", "properties": {"tags": {"type": "array", "items": [{}]}}},
            "response_schema.properties.tags.items",
            "list",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "who": {"type": "object", "properties": {"name": {"type": "strin"}}}
                },
            },
            "response_schema.properties.who.properties.name.type",
            "strin",
        ),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, "null"]}}},
            "response_schema.properties.a.anyOf[1]",
            "str",
        ),
        ({"type": "object", "properties": {"a": {"enum": "pos"}}}, "properties.a.enum", "list"),
        (
            {"type": "object", "properties": {"a b": {"type": "nope"}}},
            "response_schema.properties['a b'].type",
            "nope",
        ),
        ({"type": "object", "properties": {"a": {"x": {1, 2}}}}, "response_schema", "JSON"),
    ],
)
def test_a_bad_response_schema_is_named_with_its_json_path(schema, path, why):
    with pytest.raises(ValueError) as raised:
        spec(response_schema=schema)
    message = str(raised.value)
    assert "response_schema" in message and path in message and why in message


def test_a_self_referencing_response_schema_is_an_error_not_a_recursion_crash():
    schema: dict = {"type": "object", "properties": {}}
    schema["properties"]["again"] = schema
    with pytest.raises(ValueError, match="response_schema"):
        spec(response_schema=schema)


def test_good_response_schemas_are_accepted():
    nested = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["a", "b"], "description": "the label"},
            "score": {"type": ["number", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "who": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "either": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/thing"}]},
        },
        "required": ["label"],
        "additionalProperties": False,
        "$defs": {"thing": {"type": "integer"}},
    }
    assert spec(response_schema=nested).response_schema == nested
    assert spec(response_schema=SCHEMA).response_schema == SCHEMA


# --- model, params, key_columns, schema_name, system_prompt, body_fn ---------------------------


@pytest.mark.parametrize("model", ["", "   ", None, 4, " gpt-4o-mini", "gpt-4o-mini\n"])
def test_model_must_be_a_non_empty_string(model):
    with pytest.raises(ValueError, match="model"):
        spec(model=model)


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ([("temperature", 0)], "mapping"),
        ("temperature=0", "mapping"),
        ({1: "x"}, "key"),
        ({"temperature": float("nan")}, "JSON"),
        ({"stop": {"a", "b"}}, "JSON"),
        ({"model": "gpt-4o"}, "'model'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "'messages'"),
    ],
)
def test_params_must_be_a_json_mapping_that_does_not_override_the_body(params, why):
    with pytest.raises(ValueError) as raised:
        spec(params=params)
    assert "params" in str(raised.value) and why in str(raised.value)


def test_params_that_the_schema_or_system_prompt_would_overwrite_are_named():
    with pytest.raises(ValueError, match="'response_format'"):
        spec(params={"response_format": {"type": "json_object"}}, response_schema=SCHEMA)
    with pytest.raises(ValueError, match="'input'"):
        spec(endpoint="/v1/embeddings", params={"input": "x"})
    with pytest.raises(ValueError, match="'instructions'"):
        spec(endpoint="/v1/responses", system_prompt="Be terse.", params={"instructions": "x"})
    # Without a schema, JSON mode through params is the user's own business.
    spec(params={"response_format": {"type": "json_object"}, "temperature": 0})


@pytest.mark.parametrize("keys", [("id", ""), ("id", 3), ("id", None), 5, ["  "]])
def test_key_columns_must_be_non_empty_strings(keys):
    with pytest.raises(ValueError, match="key_columns"):
        spec(key_columns=keys)


@pytest.mark.parametrize("name", ["", "my schema", "a.b", "x" * 65, None, "é"])
def test_schema_name_must_match_the_openai_rule(name):
    with pytest.raises(ValueError, match="schema_name"):
        spec(response_schema=SCHEMA, schema_name=name)


def test_a_valid_schema_name_is_accepted():
    assert spec(response_schema=SCHEMA, schema_name="Review-label_2").schema_name


def test_system_prompt_must_be_a_string():
    with pytest.raises(ValueError, match="system_prompt must be a string"):
        spec(system_prompt=["Be terse."])


def test_body_fn_must_be_callable():
    with pytest.raises(ValueError, match="body_fn"):
        spec(prompt_template=None, body_fn="module:function")


def test_text_settings_that_cannot_be_encoded_are_refused_at_definition_time():
    with pytest.raises(ValueError, match="system_prompt"):
        spec(system_prompt="Be terse \ud800")
    with pytest.raises(ValueError, match="prompt_template"):
        spec(prompt_template="{text} \udc80")


# --- prompt_template ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "offset", "why"),
    [
        ("Classify { this: {text}", 9, "never closed"),
        ("Classify {text} }", 16, "lone '}'"),
        ("Classify {text", 9, "never closed"),
        ("Classify {text!x}", 9, "conversion"),
        ("Say {} to {name}", 4, "empty"),
        ("Say {0} to {name}", 4, "positional"),
        ("Say {name.upper} now", 4, "attribute or index"),
        ("Say {name[0]} now", 4, "attribute or index"),
        ("Say {name:{width}} now", 4, "nested"),
        ('Answer as {"label": "pos"} for {text}', 10, "JSON"),
        ("Say {na{me} now", 4, "'{'"),
    ],
)
def test_a_bad_prompt_template_names_the_setting_the_offset_and_an_excerpt(template, offset, why):
    with pytest.raises(ValueError) as raised:
        spec(prompt_template=template)
    message = str(raised.value)
    assert "prompt_template" in message and why in message
    assert f"character {offset}" in message
    assert repr(template[offset : offset + 8])[1:-1] in message  # an excerpt from that point


def test_prompt_template_must_be_a_string():
    with pytest.raises(ValueError, match="prompt_template must be a string"):
        spec(prompt_template=["{text}"])


@pytest.mark.parametrize(
    "template",
    [
        "Sentiment of {text}",
        'Answer as {{"label": ...}} for {text}',
        "Price {price:.2f} of {review text} ({text!r:>10})",
        "{{}} {{{text}}} }}{{",
        "no placeholder at all",
    ],
)
def test_good_templates_are_accepted(template):
    assert spec(prompt_template=template).prompt_template == template


def test_the_template_check_agrees_with_pythons_own_parser():
    """Whatever the check accepts, str.format_map parses, with the same placeholders."""
    import random
    import string

    rng = random.Random(7)
    accepted = 0
    for _ in range(4000):
        template = "".join(rng.choice("{}ab:!r[].0 ") for _ in range(rng.randint(1, 9)))
        try:
            request_spec = spec(prompt_template=template)
        except ValueError:
            continue
        accepted += 1
        fields = [f for f in string.Formatter().parse(template) if f[1] is not None]
        assert tuple(dict.fromkeys(f[1] for f in fields)) == request_spec.template_columns
        assert all(f[1] and "." not in f[1] and "[" not in f[1] for f in fields)
        if all(not f[2] for f in fields):  # a format spec's validity depends on the value
            template.format_map(dict.fromkeys(request_spec.template_columns, "v"))
    assert accepted > 100


# --- the input as a whole: prepare raises InputError before any chunk is written ----------------


def no_chunks_written(tmp_path) -> bool:
    return not any(name.endswith(".jsonl") for _, _, files in os.walk(tmp_path) for name in files)


def test_an_upstream_asset_that_returned_none_is_named(tmp_path):
    with pytest.raises(InputError, match=r"no data \(None\).*DataFrame or .*Table"):
        to_arrow(None)
    with pytest.raises(InputError, match=r"upstream asset produced no data \(None\).*'p1'"):
        prepare(None, tmp_path)


def test_keep_columns_naming_a_missing_column_fails_before_any_chunk(tmp_path):
    data = pd.DataFrame({"id": [1, 2], "text": ["a", "b"], "stars": [4, 5]})
    with pytest.raises(InputError, match=r"keep_columns names 'author'.*not in the input"):
        prepare(data, tmp_path, keep_columns=["stars", "author"])
    assert no_chunks_written(tmp_path)
    with pytest.raises(InputError, match="keep_columns must be a list"):
        prepare(data, tmp_path, keep_columns="stars")
    with pytest.raises(InputError, match="keep_columns lists 'stars' twice"):
        prepare(data, tmp_path, keep_columns=["stars", "stars"])
    kept = prepare(data, tmp_path, keep_columns=["stars"])
    assert kept.valid.num_rows == 2  # naming columns that exist changes nothing


def test_column_names_that_are_not_strings_are_named(tmp_path):
    data = pd.DataFrame({"id": [1], "text": ["a"], 7: ["x"], ("a", "b"): ["y"]})
    with pytest.raises(InputError) as raised:
        prepare(data, tmp_path)
    message = str(raised.value)
    assert "7 (int)" in message and "('a', 'b') (tuple)" in message
    assert no_chunks_written(tmp_path)


def test_duplicate_column_names_are_named(tmp_path):
    data = pd.DataFrame([[1, "a", "b"]], columns=["id", "text", "text"])
    with pytest.raises(InputError, match=r"duplicate column name\(s\) \['text'\]"):
        prepare(data, tmp_path)
    table = pa.table([[1], ["a"], ["b"]], names=["id", "text", "text"])
    with pytest.raises(InputError, match=r"duplicate column name\(s\) \['text'\]"):
        prepare(table, tmp_path)
    # 1 and "1" would both become "1" if names were converted, so they are refused, not merged.
    with pytest.raises(InputError, match="1 \\(int\\)"):
        prepare(pd.DataFrame([[1, "a", "b"]], columns=["id", "text", 1]), tmp_path)


def test_a_key_held_in_the_index_gets_a_hint(tmp_path):
    data = pd.DataFrame({"id": [1, 2], "text": ["a", "b"]}).set_index("id")
    with pytest.raises(InputError, match=r"key column 'id'.*index.*reset_index\(\)"):
        prepare(data, tmp_path)


# --- odd values: that row fails as invalid_input, naming the column -----------------------------


def test_a_binary_template_column_is_decoded_and_undecodable_rows_are_named(tmp_path):
    data = pa.table({"id": [1, 2, 3], "text": pa.array([b"caf\xc3\xa9", b"\xff\xfe", None])})
    prepared = prepare(data, tmp_path)
    (line,) = sent_lines(prepared)
    assert line["body"]["messages"][0]["content"] == "Sentiment of café"  # not "b'caf\\xc3..'"
    invalid = invalid_by_key(prepared)
    assert invalid[2][0] == "invalid_input"
    assert "'text'" in invalid[2][1] and "UTF-8" in invalid[2][1]
    assert invalid[3] == ("invalid_input", "column 'text' is null")


def test_a_lone_surrogate_in_a_text_column_fails_that_row_only(tmp_path):
    data = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "text": pd.Series(["fine", "bad \ud800 text", "also fine"], dtype=object),
            "note": pd.Series(["n1", "n2", "n3 \udfff"], dtype=object),
        }
    )
    prepared = prepare(data, tmp_path)
    assert prepared.valid.column("id").to_pylist() == [1]
    assert [line["body"]["messages"][0]["content"] for line in sent_lines(prepared)] == [
        "Sentiment of fine"
    ]
    invalid = invalid_by_key(prepared)
    assert invalid[2][0] == invalid[3][0] == "invalid_input"
    assert "'text'" in invalid[2][1] and "surrogate" in invalid[2][1]
    assert "'note'" in invalid[3][1] and "surrogate" in invalid[3][1]
    rows = {row["id"]: row for row in prepared.invalid.to_pylist()}
    assert rows[2]["text"] == "bad \\ud800 text"  # the failed row is stored, visibly escaped
    assert prepared.invalid_reasons == {"invalid_input": 2}


def test_a_lone_surrogate_in_a_key_column_names_the_key_column_and_row(tmp_path):
    data = pd.DataFrame(  # "text" comes first and is bad in the same row: the key still counts
        {
            "text": pd.Series(["x", "y\udfff", "z"], dtype=object),
            "id": pd.Series(["a", "b\ud800", "c"], dtype=object),
        }
    )
    with pytest.raises(InputError, match=r"key column 'id'.*not valid Unicode.*rows? \[1\]"):
        prepare(data, tmp_path)
    assert no_chunks_written(tmp_path)


def test_a_lone_surrogate_in_body_fn_output_fails_that_row(tmp_path):
    def body(row):
        text = "odd \udc80" if row["id"] == 2 else row["text"]
        return {"model": "m", "input": text}

    data = pd.DataFrame({"id": [1, 2], "text": ["a", "b"]})
    prepared = prepare(data, tmp_path, spec(prompt_template=None, body_fn=body))
    assert prepared.valid.column("id").to_pylist() == [1]
    code, message = invalid_by_key(prepared)[2]
    assert code == "invalid_input" and "not valid Unicode" in message and "body_fn" in message


def test_to_arrow_names_the_column_and_row_of_a_surrogate(tmp_path):
    data = pd.DataFrame({"id": [1, 2], "text": pd.Series(["ok", "\ud800"], dtype=object)})
    with pytest.raises(InputError, match=r"column 'text'.*not valid Unicode.*row 1"):
        to_arrow(data)


def test_a_lone_surrogate_nested_in_a_list_cell_is_found_and_escaped(tmp_path):
    import numpy as np

    data = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "text": ["a", "b", "c"],
            "tags": pd.Series([["x"], ["y", "\ud83d"], np.array(["z"])], dtype=object),
            "mixed": pd.Series([np.int64(1), "two", 3.0], dtype=object),
        }
    )
    prepared = prepare(data.drop(columns="mixed"), tmp_path)
    assert sorted(prepared.valid.column("id").to_pylist()) == [1, 3]
    code, message = invalid_by_key(prepared)[2]
    assert code == "invalid_input" and "'tags'" in message and "'\\ud83d'" in message
    for order in (["id", "text", "tags", "mixed"], ["id", "text", "mixed", "tags"]):
        with pytest.raises(InputError, match="column 'mixed' cannot be stored"):
            prepare(data[order], tmp_path)  # named whichever error Arrow meets first
