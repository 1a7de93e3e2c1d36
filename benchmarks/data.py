"""Realistic benchmark data: what a review-labelling pipeline sends and gets back.

A templated chat request with a system prompt and a JSON-schema response format; result
lines in the OpenAI batch shape with structured content, in another order than sent, with
about 2 % error lines (half a 500 answer with an error body, as the error file holds them,
half an expired request). Deterministic for a given row count.
"""

from __future__ import annotations

import json
import random
from typing import Any

SYSTEM_PROMPT = (
    "You are a meticulous product analyst. Read the customer review and label it: the overall "
    "sentiment, a score between 0 and 1, the star rating the customer would most likely give, "
    "up to three topics the review talks about (shipping, quality, price, support, fit, "
    "durability), and whether you are confident. Answer with JSON only, following the schema."
)
TEMPLATE = "Product: {product}\nCategory: {category}\nReview title: {title}\nReview: {text}"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number"},
        "stars": {"type": "integer"},
        "topics": {"type": "array", "items": {"type": "string"}},
        "confident": {"type": "boolean"},
    },
    "required": ["sentiment", "score", "stars", "topics", "confident"],
    "additionalProperties": False,
}
SPEC_KWARGS: dict[str, Any] = dict(
    model="gpt-4o-mini",
    prompt_template=TEMPLATE,
    system_prompt=SYSTEM_PROMPT,
    key_columns=("review_id",),
    params={"temperature": 0, "max_tokens": 200},
    response_schema=SCHEMA,
    schema_name="review_label",
)
ERROR_SHARE = 0.02

_PROSE = (
    "the tent kept us dry through two nights of rain but the zipper started to stick after a "
    "week and support took days to answer; shipping was fast, the price fair, quality mixed. "
    'Würde wieder kaufen — très bien, 很好, "solid" overall and worth it for weekend trips'
)
_WORDS = _PROSE.split()
_PRODUCTS = ["Trail tent 2P", "Camp stove", "Head lamp 300lm", "Water filter", "Sleeping pad"]
_CATEGORIES = ["camping", "cooking", "lighting", "water", "sleep"]


def frame(n: int, start: int = 0):
    """``n`` reviews as a pandas DataFrame (id, product, category, title, text, rating);
    ``start``: the rows from there on of a larger frame (to write one in pieces)."""
    import pandas as pd

    rng = random.Random(7)
    pool = min(start + n, 5000)
    texts = [" ".join(rng.choices(_WORDS, k=rng.randint(20, 50))) for _ in range(pool)]
    titles = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 8))) for _ in range(pool)]
    rows = range(start, start + n)
    return pd.DataFrame(
        {
            "review_id": [f"r-{i:08d}" for i in rows],
            "product": [_PRODUCTS[i % 5] for i in rows],
            "category": [_CATEGORIES[i % 5] for i in rows],
            "title": [titles[(i * 7) % len(titles)] for i in rows],
            "text": [f"{texts[i % len(texts)]} (#{i})" for i in rows],
            "rating": [1 + i % 5 for i in rows],
        }
    )


def result_lines(custom_ids: list[str], seed: int = 11) -> tuple[list[bytes], list[bytes]]:
    """(output file lines, error file lines) answering ``custom_ids``, shuffled."""
    rng = random.Random(seed)
    order = list(custom_ids)
    rng.shuffle(order)
    output, errors = [], []
    for i, custom_id in enumerate(order):
        roll = rng.random()
        if roll < ERROR_SHARE / 2:
            errors.append(_server_error(custom_id, i))
        elif roll < ERROR_SHARE:
            errors.append(_expired(custom_id, i))
        else:
            output.append(_answer(custom_id, i, rng))
    return output, errors


def _answer(custom_id: str, i: int, rng: random.Random) -> bytes:
    label = {
        "sentiment": rng.choice(["positive", "neutral", "negative"]),
        "score": round(rng.random(), 3),
        "stars": rng.randint(1, 5),
        "topics": rng.sample(["shipping", "quality", "price", "support", "fit"], k=2),
        "confident": rng.random() < 0.8,
    }
    body = {
        "id": f"chatcmpl-{i:012x}",
        "object": "chat.completion",
        "created": 1795661446,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": json.dumps(label), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 180 + i % 60, "completion_tokens": 40, "total_tokens": 0},
        "system_fingerprint": "fp_0ba0d124f1",
    }
    body["usage"]["total_tokens"] = body["usage"]["prompt_tokens"] + 40
    return _line(custom_id, i, {"status_code": 200, "request_id": f"req_{i:x}", "body": body})


def _server_error(custom_id: str, i: int) -> bytes:
    error = {
        "message": "The server had an error",
        "type": "server_error",
        "param": None,
        "code": "server_error",
    }
    response = {"status_code": 500, "request_id": f"req_{i:x}", "body": {"error": error}}
    return _line(custom_id, i, response)


def _expired(custom_id: str, i: int) -> bytes:
    error = {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired.",
    }
    return _line(custom_id, i, None, error)


def _line(custom_id: str, i: int, response: Any, error: Any = None) -> bytes:
    record = {
        "id": f"batch_req_{i:016x}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return json.dumps(record).encode()
