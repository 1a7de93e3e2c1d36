"""A small, deterministic product-review dataset: a few hundred reviews a day."""

from __future__ import annotations

import hashlib
import random

import pandas as pd

PRODUCTS = ["trail shoes", "rain jacket", "headlamp", "camp stove", "water filter", "tent"]
OPENINGS = ["Honestly,", "After two weeks,", "For the price,", "On my last trip,", "Overall,"]
VERDICTS = [
    "it is the best purchase I made this year",
    "it broke on the second day",
    "it does the job, nothing more",
    "shipping took forever but the product is great",
    "the sizing was off and I had to return it",
    "my whole family now wants one",
]


def reviews_for_day(day: str, rows: int = 240) -> pd.DataFrame:
    """The reviews written on ``day`` (YYYY-MM-DD); the same day always gives the same rows.

    A few reviews have no text, as real exports do: they become ``invalid_input`` rows.
    """
    seed = int(hashlib.sha256(day.encode()).hexdigest()[:8], 16)
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        product = rng.choice(PRODUCTS)
        text = f"{rng.choice(OPENINGS)} the {product}: {rng.choice(VERDICTS)}."
        records.append(
            {
                "review_id": f"{day}-{i:04d}",
                "product": product,
                "stars": rng.randint(1, 5),
                "review_text": None if rng.random() < 0.01 else text,
            }
        )
    return pd.DataFrame.from_records(records)
