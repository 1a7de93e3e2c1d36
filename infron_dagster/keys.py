"""Row keys -> request ids: each row's ``custom_id`` from (asset, partition, key).

Pure data code, used by :mod:`prepare`. An id is stable across runs and row orders, so an
answer already paid for is found again; keys must therefore be present and unique, and a
key that is null or found twice is an :class:`~infron_dagster.validate.InputError`.

Example:
    >>> keys = pa.table({"id": [2, 1]})
    >>> ids = row_custom_ids(keys, ["id"], "reviews", "2026-11-24")
    >>> ids[1].as_py() == make_custom_id("reviews", "2026-11-24", "1")
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .validate import InputError

__all__ = ["check_unique_keys", "key_texts", "make_custom_id", "row_custom_ids"]

# Ids made at a time: memory holds them as Arrow text, never a Python string per row.
_ID_SLICE = 16_384


def make_custom_id(name: str, partition_key: str | None, key: str) -> str:
    """The stable request id of a row: from (asset, partition, key), never position.

    Example:
        >>> make_custom_id("reviews", "2026-11-24", "r-17")
        'req-1d538177935df22b091b23dcf60b2581'
    """
    raw = f"{name}\x1f{partition_key or ''}\x1f{key}".encode()
    return "req-" + hashlib.sha256(raw).hexdigest()[:32]


def row_custom_ids(
    keys: pa.Table, key_columns: Sequence[str], name: str, partition_key: str | None
) -> pa.Array:
    """Each row's custom_id (see make_custom_id), made a slice at a time: memory holds the
    ids as Arrow text (~40 bytes a row), never a Python string per row."""
    _check_key_nulls(keys, key_columns)
    prefix = f"{name}\x1f{partition_key or ''}\x1f".encode()
    sha256 = hashlib.sha256
    parts = []
    for start in range(0, max(keys.num_rows, 1), _ID_SLICE):
        texts = key_texts(keys.slice(start, _ID_SLICE), key_columns)
        ids = ["req-" + sha256(prefix + k.encode()).hexdigest()[:32] for k in texts]
        parts.append(pa.array(ids, pa.string()))
    return pa.concat_arrays(parts)


def check_unique_keys(
    ids: pa.Array, order: np.ndarray, keys: pa.Table, key_columns: Sequence[str]
) -> None:
    """Refuse a key found in two rows, naming the keys (not their hashes). On the ids in
    sorted order (``order``): equal ids are neighbours, no hash table of every id."""
    ordered = ids.take(pa.array(order))
    if len(ordered) < 2:
        return
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if not pc.any(same).as_py():
        return
    twice = np.flatnonzero(same.to_numpy(zero_copy_only=False))
    rows = pa.array(np.union1d(order[twice], order[twice + 1]))
    duplicates = sorted(set(key_texts(keys.take(rows), key_columns)))
    raise InputError(
        f"{len(duplicates)} duplicate key(s) in {list(key_columns)}: {duplicates[:10]}"
    )


def _check_key_nulls(keys: pa.Table, key_columns: Sequence[str]) -> None:
    null = None
    for column in key_columns:
        values = keys.column(column)
        missing = values.is_null()
        if pa.types.is_floating(values.type):
            missing = pc.or_kleene(missing, pc.is_nan(values))
        null = missing if null is None else pc.or_(null, missing)
    assert null is not None
    if pc.any(null).as_py():
        rows = np.flatnonzero(null.to_numpy(zero_copy_only=False)).tolist()
        raise InputError(
            f"key column(s) {list(key_columns)} are null in {len(rows)} row(s), "
            f"first rows {rows[:10]}; every row needs a key to be tracked"
        )


def key_texts(keys: pa.Table, key_columns: Sequence[str]) -> list[str]:
    """Each row's key as the text its custom_id is derived from (see make_custom_id)."""
    columns = [_texts(keys.column(c)) for c in key_columns]
    if len(columns) == 1:
        return columns[0]
    return [json.dumps(list(values)) for values in zip(*columns, strict=True)]


def _texts(values: pa.ChunkedArray) -> list[str]:
    """``str()`` of each value (Arrow casts integers to the same text, faster)."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.to_pylist()
    if pa.types.is_integer(values.type):
        return values.cast(pa.string()).to_pylist()
    return [str(v) for v in values.to_pylist()]
