"""Result lines, one at a time: a bad line fails its own row (or is counted), never the file,
and a line over the bound is skipped in fixed-size blocks, never held whole."""

from __future__ import annotations

import io
import json

import pytest

from infron_dagster.results import ParseReport, parse_line, read_outcomes


class TrickleReader(io.BytesIO):
    """A file whose read() returns at most ``block`` bytes, like a slow object-store stream."""

    def __init__(self, data: bytes, block: int) -> None:
        super().__init__(data)
        self.block = block
        self.largest = 0

    def read(self, size: int | None = -1) -> bytes:
        want = self.block if size is None or size < 0 else min(size, self.block)
        chunk = super().read(want)
        self.largest = max(self.largest, len(chunk))
        return chunk


def ok_line(custom_id: str, text: str = "hi") -> bytes:
    body = f'{{"choices":[{{"message":{{"content":"{text}"}}}}]}}'
    return f'{{"custom_id":"{custom_id}","response":{{"status_code":200,"body":{body}}}}}'.encode()


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
def test_lines_over_the_bound_fail_their_row_whatever_the_block_size(block: int) -> None:
    data = b"\n".join([ok_line("a"), ok_line("b", "x" * 5000), b"", ok_line("c")]) + b"\n"
    report = ParseReport()
    reader = TrickleReader(data, block)
    outcomes = list(read_outcomes(reader, report, "batch_1", max_line_bytes=2048))
    assert [(o.custom_id, o.ok, o.error_code) for o in outcomes] == [
        ("a", True, None),
        ("b", False, "result_too_large"),
        ("c", True, None),
    ]
    assert report.too_large == 1 and report.lines == 3
    assert all(o.batch_id == "batch_1" for o in outcomes)


def test_a_last_line_without_newline_is_read() -> None:
    [outcome] = read_outcomes(io.BytesIO(ok_line("z")), ParseReport())
    assert outcome.ok and outcome.text == "hi"


def response_line(response: object) -> bytes:
    return json.dumps({"custom_id": "r", "response": response}).encode()


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (response_line({"status_code": 200, "body": {"choices": ["x"]}}), "unparseable_result"),
        (b'{"custom_id":"r","response":{"status_code":1e999,"body":{}}}', "unparseable_result"),
        (response_line({"status_code": 200}), "empty_response"),
        (response_line({"status_code": 200, "body": None}), "empty_response"),
        (response_line("text"), "unparseable_result"),
        (
            response_line({"status_code": 200, "body": {"data": [{"embedding": ["a"]}]}}),
            "unparseable_result",
        ),
        (b'{"custom_id":"r","result":{"type":"weird"}}', "unparseable_result"),
        (response_line({"status_code": 500, "body": {"error": {"message": "x"}}}), "error"),
    ],
)
def test_wrong_types_fail_the_row_with_a_code(line: bytes, code: str) -> None:
    outcome = parse_line(line)
    assert outcome.custom_id == "r" and not outcome.ok and outcome.error_code == code
    assert outcome.error_message


def test_garbled_usage_keeps_the_paid_answer() -> None:
    line = (
        b'{"custom_id":"r","response":{"status_code":200,"body":{"model":5,'
        b'"usage":{"prompt_tokens":"12abc","completion_tokens":1e300},'
        b'"choices":[{"message":{"content":"fine"},"finish_reason":{"a":1}}]}}}'
    )
    outcome = parse_line(line)
    assert outcome.ok and outcome.text == "fine"
    assert outcome.prompt_tokens is None and outcome.completion_tokens is None
    assert outcome.model is None and outcome.finish_reason is None


def test_an_embedding_error_key_set_to_null_is_still_a_success() -> None:
    line = (
        b'{"custom_id":"r","response":{"status_code":200,'
        b'"body":{"error":null,"data":[{"embedding":[0.5,1]}]}}}'
    )
    outcome = parse_line(line)
    assert outcome.ok and outcome.embedding == [0.5, 1.0]


def test_base64_embeddings_are_decoded() -> None:
    import base64
    import struct

    vector = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 2.0)).decode()
    line = response_line({"status_code": 200, "body": {"data": [{"embedding": vector}]}})
    assert parse_line(line).embedding == [0.5, -1.0, 2.0]


def test_unreadable_lines_without_a_visible_id_are_counted_not_raised() -> None:
    report = ParseReport()
    lines = [b"not json at all", b'{"no_id": 1}', b"[" * 5000, b'{"custom_id": 5}']
    assert list(read_outcomes(lines, report)) == []
    assert report.unparseable == 4 and len(report.samples) == 4


def test_structured_values_that_cannot_take_their_type_fail_their_row_only() -> None:
    import pyarrow as pa

    from infron_dagster import RequestSpec
    from infron_dagster.results import Outcome
    from infron_dagster.tables import FinalOutcome, build_tables

    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["n"],
    }
    spec = RequestSpec(
        model="m", prompt_template="{t}", key_columns=("id",), response_schema=schema
    )
    answers = {
        "a": {"n": 1, "tags": [1, 2]},
        "b": {"n": 2**70},  # past int64
        "c": {"n": 1e300},  # a whole float, far past int64
        "d": {"n": 3, "tags": ["x"]},  # a nested mismatch
        "e": {"n": 4},
    }
    ids = sorted(answers)
    inputs = pa.table({"id": ids, "custom_id": ids})
    invalid = pa.table(
        {"id": pa.array([], pa.string()), "custom_id": pa.array([], pa.string()),
         "error_code": pa.array([], pa.string()), "error_message": pa.array([], pa.string())}
    )  # fmt: skip
    final = {
        cid: FinalOutcome(Outcome(cid, ok=True, text=json.dumps(value)), 1)
        for cid, value in answers.items()
    }
    results, failed = build_tables(inputs, invalid, final, spec=spec)
    assert results.column("id").to_pylist() == ["a", "e"]
    assert results.schema.field("n").type == pa.int64()
    assert results.schema.field("tags").type == pa.list_(pa.int64())
    assert sorted(failed.column("id").to_pylist()) == ["b", "c", "d"]
    assert set(failed.column("error_code").to_pylist()) == {"invalid_structured_output"}
