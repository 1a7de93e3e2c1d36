"""The column-wise renderer writes exactly the bytes of the per-row renderer.

Request hashes and fingerprints are computed over these bytes, so one byte of difference
would make an upgrade send every partition again. Random text of every kind JSON treats
specially (quotes, backslashes, each control character, non-ASCII, astral characters,
Unicode whitespace), every template shape, nulls, NaN, numbers, booleans, dates and bytes.
"""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pyarrow as pa
import pytest

from infron_dagster import RequestSpec
from infron_dagster.render import ColumnRenderer, RowRenderer, line_buffer

ALPHABET = [chr(c) for c in range(0, 0x80)] + list("éü中文🎉\u2028\u2029\u00a0\u3000\x85\u200b")


def _text(rng: random.Random) -> str | None:
    if rng.random() < 0.05:
        return None
    if rng.random() < 0.05:
        return rng.choice(["", " ", "\t\n", "\u3000\x1c", "\x85"])
    return "".join(rng.choices(ALPHABET, k=rng.randint(0, 40)))


def _table(rng: random.Random, n: int) -> pa.Table:
    return pa.table(
        {
            "a": pa.array([_text(rng) for _ in range(n)], pa.large_string()),
            "b": pa.array([_text(rng) for _ in range(n)], pa.string()),
            "n": pa.array([rng.choice([None, rng.randint(-(2**62), 2**62)]) for _ in range(n)]),
            "f": [
                rng.choice([None, float("nan"), rng.random() * 10 ** rng.randint(-8, 20)])
                for _ in range(n)
            ],
            "flag": [rng.choice([True, False, None]) for _ in range(n)],
            "day": [dt.date(2026, 1, 1) + dt.timedelta(days=rng.randint(0, 900)) for _ in range(n)],
            "raw": [rng.choice([b"ok \xc3\xa9", b"\xff\xfe bad", None, b""]) for _ in range(n)],
        }
    )


TEMPLATES = [
    "{a}",
    "Review: {a}\nAgain: {a} {{literal}} {b}",
    "  {a}{b}  ",
    "{n} / {f} / {flag} / {day} / {raw}",
    'Quote " and \\ and \t in the template: {b}',
    "Zürich 🎉 {a}",
]


def _render_both(spec: RequestSpec, table: pa.Table, max_bytes: int):
    ids = pa.array([f"req-{i:032x}" for i in range(table.num_rows)])
    column = ColumnRenderer.for_spec(spec, max_request_bytes=max_bytes)
    assert column is not None
    results = []
    for renderer in (column, RowRenderer(spec, max_request_bytes=max_bytes)):
        out = renderer.render(table, ids, {0: "invalid_input: preset"})
        data, offsets = line_buffer(out.lines)
        results.append(
            (
                bytes(data[offsets[0] : offsets[-1]]),
                out.rows.tolist(),
                out.tokens.tolist(),
                dict(out.problems),
            )
        )
    return results


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize(
    "endpoint,system",
    [
        ("/v1/chat/completions", 'Be brief: "ü"\n'),
        ("/v1/embeddings", None),
        ("/v1/responses", "Sys"),
    ],
)
def test_column_renderer_matches_the_row_renderer(template, endpoint, system):
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    spec = RequestSpec(
        model="m",
        prompt_template=template,
        system_prompt=system,
        endpoint=endpoint,
        params={"temperature": 0.5, "metadata": {"k": "ü\n"}},
        response_schema=schema if endpoint != "/v1/embeddings" else None,
    )
    table = _table(random.Random(hash((template, endpoint)) % 1000), 300)
    column, row = _render_both(spec, table, max_bytes=600)
    assert column == row
    assert len(column[3]) > 1  # some rows did fail, so failure paths were compared too


def test_a_format_spec_or_body_fn_is_left_to_the_row_renderer():
    assert (
        ColumnRenderer.for_spec(
            RequestSpec(model="m", prompt_template="{x:>4}"), max_request_bytes=1000
        )
        is None
    )
    assert (
        ColumnRenderer.for_spec(
            RequestSpec(model="m", prompt_template="{x!r}"), max_request_bytes=1000
        )
        is None
    )
    assert (
        ColumnRenderer.for_spec(
            RequestSpec(model="m", body_fn=lambda row: {}), max_request_bytes=1000
        )
        is None
    )


def test_line_buffer_of_a_sliced_array():
    lines = pa.array(["ab\n", "c\n", "def\n"], pa.large_string()).slice(1)
    data, offsets = line_buffer(lines)
    assert bytes(data[offsets[0] : offsets[-1]]) == b"c\ndef\n"
    assert np.diff(offsets).tolist() == [2, 4]
