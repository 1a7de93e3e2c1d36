"""Input checks: the rows given to prepare convert to Arrow and hold the columns asked for.

Pure data code, used by :mod:`prepare`. A problem with the input as a whole raises
:class:`InputError` before anything is written or paid for: no data (None), column names
that are not unique strings, a reserved column name, a missing key, template or kept column,
a key that is not valid text. Text that is not valid Unicode elsewhere (a lone surrogate,
which pandas holds but Arrow and UTF-8 cannot) is escaped and fails only its row
(:class:`NonUnicodeCell` says which).

Example:
    >>> to_arrow(pd.DataFrame({"id": [1], "text": ["a"]})).num_rows
    1
    >>> check_column_names(["id", "id"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    InputError: duplicate column name(s) ['id'] in the input; rename them
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from .columns import CUSTOM_ID, ERROR_CODE, ERROR_MESSAGE, HIDDEN_COLUMNS
from .errors import InfronDagsterError
from .spec import RequestSpec

__all__ = [
    "ARROW_ERRORS",
    "InputError",
    "NonUnicodeCell",
    "check_column_names",
    "check_columns",
    "check_key_text",
    "index_names",
    "input_table",
    "no_null_types",
    "to_arrow",
    "to_table",
]

RESERVED_COLUMNS = (CUSTOM_ID, ERROR_CODE, ERROR_MESSAGE, *HIDDEN_COLUMNS)


class InputError(InfronDagsterError, ValueError):
    """The input as a whole cannot be prepared (a missing column, duplicate keys, ...).

    Example:
        >>> import tempfile
        >>> import pandas as pd
        >>> from infron_dagster import RequestSpec, prepare_requests
        >>> spec = RequestSpec(model="gpt-4o-mini", prompt_template="{text}", key_columns=("id",))
        >>> try:
        ...     prepare_requests(pd.DataFrame({"text": ["hi"]}), spec, name="reviews",
        ...                      partition_key=None, workdir=tempfile.mkdtemp())
        ... except InputError as exc:
        ...     print(exc)
        key column 'id' is not in the input; columns are ['text']
    """


def to_arrow(data: pd.DataFrame | pa.Table) -> pa.Table:
    """Accept a pandas DataFrame or a pyarrow Table; name the column that cannot convert.

    All-null columns (an empty partition's object columns) become strings, so one partition
    cannot give a column a type that breaks reading the whole hive table. Column names must
    be unique strings; text that is not valid Unicode (a lone surrogate, which pandas holds
    but Arrow and UTF-8 cannot) is an error naming the column and row.

    Example:
        >>> to_arrow(pd.DataFrame({"id": [1], "text": ["a"]})).column_names
        ['id', 'text']
        >>> to_arrow(None)  # doctest: +ELLIPSIS, +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        InputError: the upstream asset produced no data (None) for the partition; ...
    """
    table, bad_text = input_table(data, "for the partition")
    if bad_text:
        row = min(bad_text)
        raise InputError(f"{bad_text[row][0].message} in row {row}; fix or drop the row upstream")
    return table


@dataclass(frozen=True)
class NonUnicodeCell:
    """A cell whose text is not valid Unicode (stored escaped, so the row can be kept)."""

    column: str
    detail: str

    @property
    def message(self) -> str:
        return f"column {self.column!r} holds text that is not valid Unicode ({self.detail})"


def input_table(
    data: pd.DataFrame | pa.Table | None, which: str
) -> tuple[pa.Table, dict[int, list[NonUnicodeCell]]]:
    """The input as Arrow, and the rows whose text had to be escaped to fit in it."""
    if data is None:  # an upstream asset that forgot its ``return``
        raise InputError(
            f"the upstream asset produced no data (None) {which}; "
            "expected a pandas DataFrame or a pyarrow Table"
        )
    table, bad_text = to_table(data)
    return no_null_types(table), bad_text


def no_null_types(table: pa.Table) -> pa.Table:
    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
    return table


def to_table(data: pd.DataFrame | pa.Table) -> tuple[pa.Table, dict[int, list[NonUnicodeCell]]]:
    if isinstance(data, pa.Table):
        check_column_names(data.column_names)
        return data, {}
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame or pyarrow Table, got {type(data).__name__}")
    frame = data.reset_index(drop=True)
    check_column_names(list(frame.columns))
    frame.columns = [str(c) for c in frame.columns]  # numpy str_ -> str; names are str already
    try:
        return pa.Table.from_pandas(frame, preserve_index=False), {}
    except UnicodeEncodeError:
        pass
    except ARROW_ERRORS:
        _name_unstorable_column(frame)  # else the trouble is text, which escaping fixes
    frame, bad_text = _escape_bad_text(frame)
    try:
        return pa.Table.from_pandas(frame, preserve_index=False), bad_text
    except UnicodeEncodeError as exc:  # text the scan could not reach
        raise InputError(f"the input holds text that is not valid Unicode: {exc}") from None
    except ARROW_ERRORS:
        _name_unstorable_column(frame)
        raise


ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def _name_unstorable_column(frame: pd.DataFrame) -> None:
    """Raise an InputError naming the first column Arrow cannot convert (text aside)."""
    for column in frame.columns:
        try:
            pa.array(frame[column], from_pandas=True)
        except UnicodeEncodeError:
            continue
        except ARROW_ERRORS as exc:
            raise InputError(f"column {column!r} cannot be stored as Parquet: {exc}") from None


def check_column_names(names: list[Any]) -> None:
    """Unique string names: ``str()`` would merge 1 and "1", and Arrow keeps duplicates."""
    odd = [n for n in names if not isinstance(n, str) or _bad_text(n) is not None]
    if odd:
        shown = ", ".join(f"{n!a} ({type(n).__name__})" for n in odd[:10])
        raise InputError(
            f"input column names must be valid text strings; rename {shown} "
            "(for example df.columns = [str(c) for c in df.columns])"
        )
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InputError(f"duplicate column name(s) {duplicates[:10]} in the input; rename them")


def _escape_bad_text(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, list[NonUnicodeCell]]]:
    """Escape text that UTF-8 cannot hold (lone surrogates) and record which rows had it.

    Only run after a conversion failed, so valid input never pays for the scan.
    """
    bad_text: dict[int, list[NonUnicodeCell]] = {}
    frame = frame.copy()
    for column in frame.columns:
        try:
            pa.array(frame[column], from_pandas=True)
            continue
        except UnicodeEncodeError:
            pass
        except ARROW_ERRORS:
            continue  # not a text problem: to_table names it
        values = frame[column].tolist()
        for row, value in enumerate(values):
            detail = _bad_text(value)
            if detail is not None:
                bad_text.setdefault(row, []).append(NonUnicodeCell(column, detail))
                values[row] = _escaped(value)
        frame[column] = pd.Series(values, dtype=object, index=frame.index)
    return frame, bad_text


def _bad_text(value: Any) -> str | None:
    """Why ``value`` (or text nested in it) cannot be UTF-8 encoded, or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return f"a lone surrogate {value[exc.start]!a} at character {exc.start}"
        return None
    items = _nested(value)
    if items is None:
        return None
    if isinstance(items, Mapping):
        items = [*items.keys(), *items.values()]
    return next((d for d in map(_bad_text, items) if d is not None), None)


def _escaped(value: Any) -> Any:
    """``value`` with lone surrogates written as visible ``\\udxxx`` escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    items = _nested(value)
    if isinstance(items, Mapping):
        return {_escaped(k): _escaped(v) for k, v in items.items()}
    return value if items is None else [_escaped(v) for v in items]


def _nested(value: Any) -> Mapping[Any, Any] | list[Any] | None:
    """The values inside a list, tuple, dict or numpy array cell; None for a scalar."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, (list, tuple)):
        return list(value)
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):  # an array, not a numpy scalar
        return list(value.tolist())
    return None


def check_columns(
    names: Sequence[str],
    spec: RequestSpec,
    keep_columns: Sequence[str] | None,
    index: Sequence[str] = (),
) -> None:
    """No reserved name among ``names``; every key, template and kept column among them.

    ``index``: the DataFrame's index names (dropped on the way in), named in the error.

    Example:
        >>> spec = RequestSpec(model="m", prompt_template="{text}", key_columns=("id",))
        >>> check_columns(["id", "text"], spec, keep_columns=None)
        >>> check_columns(["id", "text", "custom_id"], spec, None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        infron_dagster.validate.InputError: input column 'custom_id' is reserved; rename it
    """
    for reserved in RESERVED_COLUMNS:
        if reserved in names:
            raise InputError(f"input column {reserved!r} is reserved; rename it")
    _require_columns(names, spec.key_columns, "key column", index)
    _require_columns(names, spec.template_columns, "template column", index)
    _check_keep_columns(names, keep_columns, index)


def _require_columns(
    names: Sequence[str], columns: Iterable[str], what: str, index: Sequence[str] = ()
) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        hint = ""
        if missing[0] in index:  # the DataFrame's index is dropped, so say where it went
            hint = f"; {missing[0]!r} is the DataFrame's index: reset_index() before returning it"
        raise InputError(
            f"{what} {missing[0]!r} is not in the input; columns are {list(names)}{hint}"
        )


def index_names(data: Any) -> list[str]:
    if not isinstance(data, pd.DataFrame):
        return []
    return [str(n) for n in data.index.names if n is not None]


def _check_keep_columns(
    names: Sequence[str], keep_columns: Sequence[str] | None, index: Sequence[str]
) -> None:
    if keep_columns is None:
        return
    if isinstance(keep_columns, str) or not isinstance(keep_columns, Iterable):
        raise InputError(f"keep_columns must be a list of column names, not {keep_columns!r}")
    twice = [c for c, n in Counter(keep_columns).items() if n > 1]
    if twice:  # the results table would get two columns of one name
        raise InputError(f"keep_columns lists {twice[0]!r} twice")
    for column in keep_columns:
        if column not in names:
            _require_columns(names, [column], "keep_columns names", index)


def check_key_text(
    bad_text: Mapping[int, list[NonUnicodeCell]], key_columns: Sequence[str]
) -> None:
    """A key that is not valid text cannot be stored, so its row could never be tracked."""
    in_keys = {row: [b for b in bad if b.column in key_columns] for row, bad in bad_text.items()}
    rows = sorted(row for row, bad in in_keys.items() if bad)
    if rows:
        first = in_keys[rows[0]][0]
        raise InputError(
            f"key column {first.column!r} holds text that is not valid Unicode ({first.detail}) "
            f"in {len(rows)} row(s), first rows {rows[:10]}; every row needs a key to be tracked"
        )
