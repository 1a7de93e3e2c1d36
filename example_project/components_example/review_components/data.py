"""A few product reviews a day, deterministic, with one empty review as real exports have."""

import pandas as pd

SAMPLES = [
    ("tent", 5, "Kept us dry through two nights of storms."),
    ("headlamp", 2, "The strap snapped after a week."),
    ("rain jacket", 4, "Fits well, a little warm on climbs."),
    ("camp stove", 3, "Boils water, nothing special."),
    ("trail shoes", 1, "Ran half a size small, had to send them back."),
    ("water filter", 5, "Shipping was slow but the filter is excellent."),
]


def reviews_for_day(day: str, rows: int = 36) -> pd.DataFrame:
    """The reviews of ``day`` (YYYY-MM-DD): the same day always gives the same rows."""
    shift = int(day.replace("-", "")) % len(SAMPLES)
    picked = [SAMPLES[(i + shift) % len(SAMPLES)] for i in range(rows)]
    frame = pd.DataFrame(picked, columns=["product", "stars", "review_text"])
    frame.insert(0, "review_id", [f"{day}-{i:03d}" for i in range(rows)])
    frame.loc[rows - 1, "review_text"] = None  # becomes an invalid_input row, not a lost one
    return frame
