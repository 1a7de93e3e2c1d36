"""Structured output read by columns decides every text as the per-row rules do.

``parse_structured`` sends the texts it can to ``pyarrow.json`` and the rest to the per-row
rules (``_one_structured``); whatever the mix, each row's verdict, values and message must
be what the per-row rules give on their own.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from benchmarks import data
from infron_dagster import RequestSpec
from infron_dagster.structured import (
    _for_arrow,
    _one_structured,
    arrow_type_for_schema,
    parse_structured,
)

SPEC = RequestSpec(**data.SPEC_KWARGS)
TYPES = {p: arrow_type_for_schema(s) for p, s in data.SCHEMA["properties"].items()}
GOOD = {"sentiment": "positive", "score": 0.9, "stars": 5, "topics": ["fit"], "confident": True}

ODD_TEXTS = [
    json.dumps(GOOD, indent=2),  # pretty-printed: raw newlines between tokens
    "  " + json.dumps(GOOD) + "\t",  # padded
    "\t" + json.dumps(GOOD),
    json.dumps({**GOOD, "sentiment": "a\x01b"}, ensure_ascii=False).replace("\\u0001", "\x01"),
    json.dumps({**GOOD, "sentiment": "tab"}).replace("tab", "t\tb"),  # raw tab in a string
    json.dumps({**GOOD, "sentiment": "emoji \U0001f389"}),  # an escaped surrogate pair
    json.dumps({**GOOD, "sentiment": "lone"}).replace("lone", "lone \\ud800"),
    json.dumps({**GOOD, "sentiment": "low"}).replace("low", "\\udc00 low"),
    json.dumps({**GOOD, "stars": 3.0}),  # a whole float for an integer
    json.dumps({**GOOD, "stars": 3.5}),
    json.dumps({**GOOD, "stars": 2**70}),
    json.dumps({**GOOD, "score": 1}),  # an integer for a number
    json.dumps({**GOOD, "score": 2**53 + 1}),  # an integer a float cannot hold exactly
    json.dumps({**GOOD, "score": 2**53}),
    json.dumps({**GOOD, "score": 12345678901234567.5}),
    json.dumps({**GOOD, "sentiment": "1234567890123456789"}),  # digits in a string
    json.dumps({**GOOD, "confident": 1}),
    json.dumps({**GOOD, "score": True}),
    json.dumps({**GOOD, "topics": "fit"}),
    json.dumps({**GOOD, "topics": [1, 2]}),
    json.dumps({**GOOD, "extra": {"deep": [1, {"x": None}]}}),
    json.dumps({k: v for k, v in GOOD.items() if k != "stars"}),  # a required field missing
    json.dumps({**GOOD, "stars": None}),
    json.dumps(GOOD) + json.dumps(GOOD),  # two objects on one line
    json.dumps(GOOD) + " trailing",
    json.dumps(GOOD)[:-1],  # cut short
    '{"sentiment": "has } and { inside", "score": 0.1, "stars": 1, "topics": [], '
    '"confident": false}',
    "{}",
    "[]",
    "null",
    "",
    "{",
    "}",
    "not json",
    '{"sentiment": "dup", "sentiment": "last", "score": 0.1, "stars": 1, "topics": [], '
    '"confident": false}',
    None,
]


def _per_row(texts: list[str | None]):
    good, values, problems = [], {p: [] for p in TYPES}, []
    for text in texts:
        value, problem = _one_structured(text, SPEC, TYPES)
        good.append(problem is None)
        if problem is None:
            for prop, typ in TYPES.items():
                values[prop].append(_for_arrow(value.get(prop), typ))
        else:
            problems.append(problem)
    return good, values, problems


def _same(texts: list[str | None]) -> None:
    parsed = parse_structured(pa.array(texts, pa.large_string()), SPEC)
    good, values, problems = _per_row(texts)
    assert parsed.good.tolist() == good
    assert parsed.problems == problems
    for prop, typ in TYPES.items():
        assert parsed.values[prop].cast(typ).to_pylist() == values[prop], prop


def test_every_odd_text_alone() -> None:
    for text in ODD_TEXTS:
        _same([text])


@pytest.mark.parametrize("seed", range(4))
def test_odd_texts_mixed_with_plain_ones(seed: int) -> None:
    rng = random.Random(seed)
    plain = []
    for i in range(300):
        value = {**GOOD, "score": rng.random(), "stars": rng.randint(1, 5), "topics": ["x"] * i}
        plain.append(json.dumps(value))
    texts = plain + ODD_TEXTS * 3
    rng.shuffle(texts)
    _same(texts)


def test_a_sliced_array_is_read_at_its_own_offsets() -> None:
    texts = pa.array(["x", "\n", *[json.dumps(GOOD)] * 5, "{bad}"], pa.large_string())
    parsed = parse_structured(texts.slice(2, 5), SPEC)
    assert parsed.good.tolist() == [True] * 5
    assert np.all(parsed.values["stars"].to_numpy() == 5)
