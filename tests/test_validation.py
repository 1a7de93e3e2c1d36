"""Bad configuration and odd input fail before money is spent, naming the setting, the column
or the row. Definition-time checks of RequestSpec, and whole-input / per-row checks of prepare."""

from __future__ import annotations

import json
import os

import pytest

from infron_dagster import RequestSpec, prepare_requests

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
