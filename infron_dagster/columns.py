"""The package's vocabulary: the names of the columns it writes and the error codes it gives.

Every module takes these names from here, so a column or a code is spelled in one place.
Plain strings, no imports: the lowest module of the package.

Columns of the input snapshot (``inputs.parquet``, one per attempt)
    ``custom_id`` (:data:`CUSTOM_ID`)
        The stable id of a row's request, made from (asset, partition, key), never from the
        row's position. Also a column of the outcome table and of every written table.
    hidden bookkeeping (:data:`HIDDEN_COLUMNS`; never in results or failed)
        ``__request_hash`` (:data:`REQUEST_HASH`): hash of the exact request line sent;
        ``__carried_from`` (:data:`CARRIED_FROM`): the attempt whose paid-for answer the row
        reuses (null: sent by this attempt). Only with ``reuse_answers="pipeline"`` (older
        snapshots have none of these): ``__body_hash`` (:data:`BODY_HASH`), the hash of the
        request line without its custom_id; ``__carried_partition``
        (:data:`CARRIED_PARTITION`) and ``__carried_id`` (:data:`CARRIED_ID`), the other
        partition whose answer is reused and that answer's custom_id there.

Columns of the results and failed tables
    the kept input columns (an input column named like an output column, see
    :data:`OUTPUT_NAMES`, is kept as ``input_<name>``), then ``response_text`` or
    ``embedding``, the structured-output columns, and :data:`RESULT_COLUMNS` (results);
    ``error_code`` (:data:`ERROR_CODE`), ``error_message`` (:data:`ERROR_MESSAGE`),
    ``http_status``, ``retryable``, ``attempt``, ``batch_id``, ``cost`` (:data:`COST`) (failed).

Error codes this package gives (a provider's own codes pass through as they are)
    ``invalid_input`` (:data:`INVALID_INPUT`): the row could not be rendered, never sent;
    ``invalid_structured_output`` (:data:`INVALID_STRUCTURED_OUTPUT`): the answer does not
    fit the response schema; ``missing_result`` (:data:`MISSING_RESULT`): no result line
    for the request; ``unparseable_result`` (:data:`UNPARSEABLE`), ``result_too_large``
    (:data:`TOO_LARGE`), ``empty_response`` (:data:`EMPTY_RESPONSE`), ``missing_response``
    (:data:`MISSING_RESPONSE`): a result line that holds no usable answer;
    ``batch_cancelled`` / ``batch_expired`` (:data:`BATCH_CANCELLED`, :data:`BATCH_EXPIRED`);
    ``refusal`` (:data:`REFUSAL`): the model refused. :data:`RETRYABLE_CODES` are those a
    retry may fix.

Example:
    >>> CUSTOM_ID, COST, INVALID_INPUT in RETRYABLE_CODES, MISSING_RESULT in RETRYABLE_CODES
    ('custom_id', 'cost', False, True)
"""

from __future__ import annotations

__all__ = [
    "BATCH_CANCELLED",
    "BATCH_EXPIRED",
    "BODY_HASH",
    "CARRIED_FROM",
    "CARRIED_ID",
    "CARRIED_PARTITION",
    "COST",
    "CUSTOM_ID",
    "EMPTY_RESPONSE",
    "ERROR_CODE",
    "ERROR_MESSAGE",
    "HIDDEN_COLUMNS",
    "INVALID_INPUT",
    "INVALID_STRUCTURED_OUTPUT",
    "MISSING_RESPONSE",
    "MISSING_RESULT",
    "OUTPUT_NAMES",
    "REFUSAL",
    "REQUEST_HASH",
    "RESULT_COLUMNS",
    "RETRYABLE_CODES",
    "TOO_LARGE",
    "UNPARSEABLE",
]

# --- columns ---------------------------------------------------------------------------------

CUSTOM_ID = "custom_id"
# Hidden bookkeeping columns of the input snapshot (never in results or failed):
REQUEST_HASH = "__request_hash"  # hash of the exact request line sent for the row
CARRIED_FROM = "__carried_from"  # attempt whose paid-for success this row reuses
# Only with reuse_answers="pipeline" (older snapshots have none of these):
BODY_HASH = "__body_hash"  # hash of the request line without its custom_id
CARRIED_PARTITION = "__carried_partition"  # the other partition whose answer is reused
CARRIED_ID = "__carried_id"  # the custom_id of that answer in its partition
HIDDEN_COLUMNS = (REQUEST_HASH, CARRIED_FROM, BODY_HASH, CARRIED_PARTITION, CARRIED_ID)

ERROR_CODE = "error_code"
ERROR_MESSAGE = "error_message"
COST = "cost"  # what the row cost (null: unknown; 0 for rows never sent)

# The columns after the answer (and structured output) in the results table.
RESULT_COLUMNS = (
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    COST,
    "batch_id",
    "attempt",
)

# Names this library writes, plus the hive partition column: an input column with one of
# these names is kept as ``input_<name>`` so the tables never hold two columns of one name.
OUTPUT_NAMES = frozenset(
    {
        *RESULT_COLUMNS,
        "response_text",
        "embedding",
        ERROR_CODE,
        ERROR_MESSAGE,
        "http_status",
        "retryable",
        "partition",
    }
)

# --- error codes -----------------------------------------------------------------------------

INVALID_INPUT = "invalid_input"
INVALID_STRUCTURED_OUTPUT = "invalid_structured_output"
MISSING_RESULT = "missing_result"
UNPARSEABLE = "unparseable_result"
TOO_LARGE = "result_too_large"
EMPTY_RESPONSE = "empty_response"
MISSING_RESPONSE = "missing_response"
BATCH_CANCELLED = "batch_cancelled"
BATCH_EXPIRED = "batch_expired"
REFUSAL = "refusal"

# Codes (ours and the providers') for which sending the same request again may succeed.
RETRYABLE_CODES = frozenset(
    {
        BATCH_EXPIRED,
        BATCH_CANCELLED,
        "batch_failed",
        MISSING_RESULT,
        "server_error",
        "rate_limit_exceeded",
        "timeout",
        "overloaded_error",
        "api_error",
        INVALID_STRUCTURED_OUTPUT,
        "expired",
        "canceled",
        UNPARSEABLE,
        EMPTY_RESPONSE,
        MISSING_RESPONSE,
    }
)
