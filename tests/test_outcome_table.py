"""The columnar reader of result files gives exactly the per-line parser's outcomes and
counts, line for line, whatever the provider sends: every plain line, every odd one, and
files where both are mixed (so blocks the fast reader refuses are split and fall back)."""

from __future__ import annotations

import glob
import io
import json
import os
import random
import sys

import pytest

from infron_dagster.outcomes import OUTCOME_SCHEMA, read_outcome_table
from infron_dagster.results import ParseReport, read_outcomes

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from benchmarks.data import result_lines

FIELDS = [f.name for f in OUTCOME_SCHEMA if f.name != "seq"]


def _chat(cid: str, content, **extra) -> dict:
    body = {
        "model": extra.pop("model", "gpt-4o-mini"),
        "choices": extra.pop("choices", None)
        or [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": extra.pop("finish_reason", "stop"),
            }
        ],
        "usage": extra.pop("usage", {"prompt_tokens": 10, "completion_tokens": 3}),
    }
    body.update(extra.pop("body", {}))
    return {
        "id": "x",
        "custom_id": cid,
        "response": {"status_code": extra.pop("status", 200), "body": body},
        "error": extra.pop("error", None),
        **extra,
    }


def _vector(value) -> dict:
    return {"data": [{"embedding": [0.5, value]}]}


ODD_LINES = [
    json.dumps(_chat("a1", "plain answer")),
    json.dumps(_chat("a2", '{"x": 1}', usage={"input_tokens": 5, "output_tokens": 2})),
    json.dumps(_chat("a3", "x", usage={"prompt_tokens": None, "input_tokens": 5})),
    json.dumps(_chat("a4", "x", usage={"prompt_tokens": -1, "completion_tokens": 2**60})),
    json.dumps(_chat("a5", None)),
    json.dumps(_chat("a6", "x", model="m\nforged")),
    json.dumps(_chat("a7", "x", model="m" * 300, finish_reason=None)),
    json.dumps(_chat("a8", [{"type": "text", "text": "parts"}])),
    json.dumps(_chat("a9", "x", status=500)),
    json.dumps(_chat("b1", "x", status="200")),
    json.dumps(_chat("b2", "x", error={})),
    json.dumps(_chat("b3", "x", error={"code": "server_error", "message": "boom"})),
    json.dumps(
        {
            "custom_id": "b4",
            "response": None,
            "error": {"code": "batch_expired", "message": "expired"},
        }
    ),
    json.dumps({"custom_id": "b5", "error": {"type": "t", "message": "m"}}),
    json.dumps({"custom_id": "b6", "error": {"code": "", "message": "m"}}),
    json.dumps({"custom_id": "b7", "error": {"error": {"code": "inner", "message": "n"}}}),
    json.dumps(
        {
            "custom_id": "b8",
            "response": {
                "status_code": 429,
                "body": {
                    "error": {"message": "slow down", "type": "rate_limit_exceeded", "code": None}
                },
            },
        }
    ),
    json.dumps({"custom_id": "b9", "response": {"status_code": 400, "body": None}}),
    json.dumps({"custom_id": "c1", "response": {"status_code": 200, "body": {}}}),
    json.dumps(
        {"custom_id": "c2", "response": {"body": {"choices": [{"message": {"content": "bare"}}]}}}
    ),
    json.dumps({"custom_id": "c3", "response": {"choices": [{"message": {"content": "b"}}]}}),
    json.dumps({"custom_id": "c4", "body": {"choices": [{"message": {"content": "top"}}]}}),
    json.dumps(
        {
            "custom_id": "c5",
            "result": {
                "type": "succeeded",
                "message": {
                    "content": [{"type": "text", "text": "claude"}],
                    "stop_reason": "end_turn",
                },
            },
        }
    ),
    json.dumps({"custom_id": "c6", "result": {"type": "expired"}}),
    json.dumps(
        {
            "custom_id": "c7",
            "response": {
                "status_code": 200,
                "body": {
                    "data": [{"embedding": [0.5, -1, 2]}],
                    "model": "e",
                    "usage": {"prompt_tokens": 3},
                },
            },
        }
    ),
    json.dumps(
        {
            "custom_id": "c8",
            "response": {"status_code": 200, "body": {"data": [{"embedding": [0.5, None]}]}},
        }
    ),
    json.dumps(
        {
            "custom_id": "c9",
            "response": {"status_code": 200, "body": {"data": [{"embedding": "AAAAPwAAgL8="}]}},
        }
    ),
    json.dumps(
        {
            "custom_id": "d1",
            "response": {
                "status_code": 200,
                "body": {"choices": None, "data": [{"embedding": [1.0]}]},
            },
        }
    ),
    json.dumps(
        {
            "custom_id": "d2",
            "response": {
                "status_code": 200,
                "body": {
                    "output": [{"content": [{"type": "output_text", "text": "resp"}]}],
                    "status": "done",
                },
            },
        }
    ),
    json.dumps(_chat("d3", "refused", choices=[{"message": {"content": None, "refusal": "no"}}])),
    json.dumps(_chat("d4", "x", choices=[])),
    json.dumps(_chat("d5", "dup first")),
    json.dumps(_chat("d5", "dup second")),
    json.dumps({"custom_id": "d6", "error": {"code": "e", "message": "err first"}}),
    json.dumps(_chat("d6", "then ok")),
    json.dumps(_chat("d7", "esc \ud83c\udf89 \u00e9", ensure=True)),
    '{"custom_id": "d8", "response": {"status_code": 200, "body": {"choices": [{"message": '
    '{"content": "lone \\ud800"}}]}}}',
    '{"custom_id": "d9", "custom_id": "e0", "response": null}',
    '{"custom_id": 17, "response": null}',
    "not json at all",
    '{"custom_id": "e1", "response": 5}',
    "   ",
    "",
    '{"custom_id": "e2"}{"custom_id": "e3"}',
    "[1, 2]",
    '{"custom_id": "e4", "response": {"status_code": 200.0, "body": {"choices": [{"message": '
    '{"content": "float status"}}]}}}',
    json.dumps(_chat("e5", "x", status=302)),
    json.dumps(_chat("e6", "ctrl \x01 in text")),
    json.dumps({"custom_id": "e7", "error": {"code": "c\u0007", "message": "bell"}}),
    json.dumps({"custom_id": "e8", "error": {"code": "c", "message": "m" * 2500}}),
    json.dumps(_chat("e9", "a", usage={"prompt_tokens": 3.0})),
    json.dumps(_chat("f1", "secret sk-live-123456 echoed")),
    json.dumps(_chat("", "empty id")),
    json.dumps(_chat("f2", "x", body={"error": {"code": "e", "message": "m"}})),
    json.dumps(
        {
            "custom_id": "f3",
            "response": {"status_code": 500, "body": {"error": {"message": "", "code": "x"}}},
        }
    ),
    json.dumps(
        {
            "custom_id": "f4",
            "response": {
                "status_code": 200,
                "body": '{"choices": [{"message": {"content": "string body"}}]}',
            },
        }
    ),
    json.dumps(
        {
            "custom_id": "f5",
            "response": {
                "status_code": 200,
                "body": {"choices": [{"message": {"content": "result"}}]},
            },
        }
    )
    + "  ",
    json.dumps(_chat("f6", 'says "result" inside')),
    # A top-level "result" that is not an object does not make the line Anthropic-style
    json.dumps({**_chat("f7", "null result"), "result": None}),
    json.dumps({**_chat("f8", "string result"), "result": "done"}),
    json.dumps({**_chat("f9", "list result"), "result": [1]}),
    json.dumps({**_chat("g1", "empty result object"), "result": {}}),
    json.dumps({**_chat("g2", "typed result object"), "result": {"type": 3}}),
    # An error in an embedding's body at 200 (no "choices"): the body error stands
    json.dumps(
        {
            "custom_id": "g3",
            "response": {
                "status_code": 200,
                "body": {"error": {"code": "e", "message": "m"}, "data": [{"embedding": [1.0]}]},
            },
        }
    ),
    # An escaped "choices" key beside data: still the chat key for the per-line parser
    '{"custom_id": "g4", "response": {"status_code": 200, "body": '
    '{"choic\\u0065s": null, "data": [{"embedding": [1.0]}]}}}',
    # A top-level error beside a response without a status code, or a body at the top
    json.dumps({"custom_id": "g5", "response": {}, "error": {"code": "c", "message": "m"}}),
    json.dumps(
        {"custom_id": "g6", "body": {}, "status_code": 503, "error": {"code": "c", "message": "m"}}
    ),
    json.dumps({"custom_id": "g7", "response": None, "error": {"code": "c", "message": "m"}}),
    # An integer too large for a float in a vector (an infinity to the fast reader)
    json.dumps({"custom_id": "g8", "response": {"status_code": 200, "body": _vector(10**400)}}),
    json.dumps(
        {"custom_id": "g9", "response": {"status_code": 200, "body": _vector(1e999)}}
    ).replace("Infinity", "1e999"),
]


def _clean(line: str) -> str:
    return line.replace(', "ensure": true', "")


def _per_line(data: bytes, max_line_bytes: int, redact=None):
    report = ParseReport()
    rows = []
    for outcome in read_outcomes(
        io.BytesIO(data), report, "batch_1", max_line_bytes=max_line_bytes
    ):
        if redact:
            for name in ("text", "error_message", "error_code"):
                value = getattr(outcome, name)
                if value:
                    setattr(outcome, name, redact(value))
        rows.append({f: getattr(outcome, f) for f in FIELDS})
    return rows, report


def _columnar(data: bytes, max_line_bytes: int, redact=None):
    from infron_dagster.outcomes import redact_table

    report = ParseReport()
    table = read_outcome_table(
        io.BytesIO(data), report, "batch_1", first_seq=0, max_line_bytes=max_line_bytes
    )
    table = redact_table(table.sort_by("seq"), redact)
    return [{f: row[f] for f in FIELDS} for row in table.to_pylist()], report


def _same(data: bytes, max_line_bytes: int = 8 << 20, redact=None) -> None:
    expected, expected_report = _per_line(data, max_line_bytes, redact)
    got, report = _columnar(data, max_line_bytes, redact)
    assert got == expected
    for name in ("lines", "unparseable", "too_large"):
        assert getattr(report, name) == getattr(expected_report, name), name


@pytest.mark.parametrize("seed", range(6))
def test_odd_lines_mixed_with_plain_ones(seed):
    rng = random.Random(seed)
    plain, errors = result_lines([f"req-{i}" for i in range(400)], seed=seed)
    lines = [line.decode() for line in plain + errors] + [_clean(x) for x in ODD_LINES] * 2
    rng.shuffle(lines)
    _same(("\n".join(lines) + rng.choice(["", "\n"])).encode())


def test_every_odd_line_alone():
    for line in ODD_LINES:
        _same((_clean(line) + "\n").encode())


def test_over_long_lines_fail_their_rows_like_the_per_line_parser():
    plain, _ = result_lines([f"req-{i}" for i in range(50)])
    long_line = json.dumps(_chat("long1", "y" * 5000)).encode()
    data = b"\n".join([*plain[:20], long_line, *plain[20:], long_line + b" " * 3000])
    _same(data, max_line_bytes=4096)
    _same(long_line, max_line_bytes=4096)
    # A bound under the 4 KB head: the head of a long line ends with the line (it must not
    # read the next line's id), and a long blank line is skipped uncounted
    no_id = b'{"pad": "' + b"y" * 400 + b'"}'
    _same(b"\n".join([no_id, json.dumps(_chat("next", "z" * 400)).encode(), b" " * 400]), 300)


def test_an_over_long_line_across_a_read_keeps_a_4kb_head_as_the_per_line_parser_does():
    # The per-line parser reads 1 MiB at a time: a line over the bound that starts just
    # before a read's end has its head completed from the next read (its id is at the end).
    filler = b'{"pad": "' + b"p" * (1024 * 1024 - 1500 - 12) + b'"}\n'
    long_line = b'{"pad": "' + b"q" * 2000 + b'", "custom_id": "r1"}'
    _same(filler + long_line + b"\n", max_line_bytes=1024)


def test_lines_that_are_not_utf8_fail_their_rows_like_the_per_line_parser():
    plain, _ = result_lines([f"req-{i}" for i in range(300)])
    bad_text = json.dumps(_chat("u1", "cafe")).encode().replace(b"cafe", b"caf\xe9")
    bad_id = json.dumps(_chat("u2", "x")).encode().replace(b'"u2"', b'"u\xff2"')
    _same(b"\n".join([*plain[:100], bad_text, *plain[100:200], bad_id, *plain[200:]]))
    _same(bad_text + b"\n")


def test_the_key_is_redacted_as_the_per_line_path_does():
    def redact(text: str) -> str:
        return text.replace("sk-live-123456", "***")

    lines = [_clean(x) for x in ODD_LINES]
    _same("\n".join(lines).encode(), redact=redact)


def test_golden_result_files():
    root = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "lake")
    for path in glob.glob(os.path.join(root, "*", "raw", "*", "*", "*", "*.jsonl")):
        with open(path, "rb") as fh:
            _same(fh.read())


_CRASH_CHILD = """
import io, json, sys
from infron_dagster.outcomes import read_outcome_table
from infron_dagster.results import ParseReport
table = read_outcome_table(io.BytesIO(sys.stdin.buffer.read()), ParseReport(), "b", first_seq=0)
print(json.dumps(table.sort_by("seq").column("error_code").to_pylist()))
"""


def test_a_raw_carriage_return_before_null_does_not_crash_the_reader():
    # pyarrow.json also ends its blocks at a CR; a block that starts with "null" crashes
    # pyarrow 26 (a segfault, which would kill the run). Lines a few hundred bytes long,
    # each "{..}\r<spaces>null\r{..}", make every block boundary land in such a gap.
    import subprocess

    lines = [
        json.dumps(_chat(f"c{i}", "x")).encode() + b"\r" + b" " * (300 + i % 97) + b"null\r{}"
        for i in range(12_000)
    ]
    data = b"\n".join(lines) + b"\n"
    assert len(data) > 4 << 20  # several of pyarrow's blocks
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD], input=data, capture_output=True, timeout=120
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    expected, _ = _per_line(data, 8 << 20)
    assert json.loads(child.stdout) == [row["error_code"] for row in expected]


def test_a_few_lone_surrogates_cost_one_more_parse_not_a_split_per_level(monkeypatch):
    # The fast reader refuses a block holding a lone escaped surrogate; those lines are set
    # aside once (they go line by line), instead of halving the block until they stand alone.
    import infron_dagster.outcomes as outcomes

    plain, _ = result_lines([f"req-{i}" for i in range(2000)])
    for i in (10, 900, 1700):
        plain[i] = plain[i].replace(b'"content": "', b'"content": "\\ud800', 1)
    data = b"\n".join(plain) + b"\n"
    calls = []
    real = outcomes.read_json_lines
    monkeypatch.setattr(outcomes, "read_json_lines", lambda *a: calls.append(1) or real(*a))
    _same(data)
    assert len(calls) == 2
