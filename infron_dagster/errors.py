"""Typed errors: one base, :class:`InfronDagsterError`, for every error this package raises on
purpose, so ``except InfronDagsterError`` catches them all. Each keeps its stdlib base too, so
code that catches ``ValueError`` or ``RuntimeError`` keeps working.

The tree (a class in parentheses is the stdlib base it also keeps)::

    Exception
     └── InfronDagsterError                      this module
          ├── InfronError                        the batch API (wire) errors, this module
          │    ├── InfronAuthError               401/403
          │    ├── InfronInsufficientCreditsError 402
          │    ├── InfronBadRequestError         400/422
          │    ├── InfronNotFoundError           404
          │    ├── InfronRateLimitError          429 (retryable)
          │    ├── InfronServerError             5xx/408/409 (retryable)
          │    ├── InfronConnectionError         unreachable, timed out (retryable)
          │    └── InfronProtocolError           an answer this client cannot understand
          ├── InputError (ValueError)            validate.py: the input cannot be prepared
          ├── BudgetExceeded (RuntimeError)      budget.py: a Budget refused a submission
          │    └── DamagedLedger                 the spend ledger cannot be read
          ├── SubmitIncomplete (RuntimeError)    submit.py: a chunk could not be created
          ├── SubmitRefused (RuntimeError)       this module: a submission refused before
          │                                      any paid call (nothing to retry, a budget)
          ├── LockTimeout (RuntimeError)         storage.py: a partition lock was not acquired
          └── MissingPartitionError (FileNotFoundError)
                                                 table_loader.py: a partition never collected

The wire errors name the operation and the server's own message, and never the API key.

Example:
    >>> from infron_dagster import InfronDagsterError, InfronNotFoundError
    >>> err = InfronNotFoundError("retrieve batch", "no such batch", status_code=404)
    >>> isinstance(err, InfronDagsterError), err.retryable, err.status_code
    (True, False, 404)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "InfronAuthError",
    "InfronBadRequestError",
    "InfronConnectionError",
    "InfronDagsterError",
    "InfronError",
    "InfronInsufficientCreditsError",
    "InfronNotFoundError",
    "InfronProtocolError",
    "InfronRateLimitError",
    "InfronServerError",
]


class InfronDagsterError(Exception):
    """Base class of every error infron-dagster raises on purpose (see the module docstring).

    Example:
        >>> from infron_dagster import BudgetExceeded, InputError
        >>> issubclass(InputError, InfronDagsterError), issubclass(InputError, ValueError)
        (True, True)
        >>> issubclass(BudgetExceeded, InfronDagsterError)
        True
    """


class SubmitRefused(InfronDagsterError, RuntimeError):
    """A submission refused before any paid call: a retry with nothing to retry, a partition
    over ``max_attempts``, a budget's limit. ``details`` are plain values for the run's
    metadata (the cost estimate of a budget refusal); the asset turns it into a
    ``dg.Failure``.

    Example:
        >>> err = SubmitRefused("partition 'a' has no retryable failed rows")
        >>> isinstance(err, InfronDagsterError), isinstance(err, RuntimeError), err.details
        (True, True, {})
    """

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = dict(details or {})


class InfronError(InfronDagsterError):
    """Base class of every error the batch API client raises.

    Example:
        >>> err = InfronError("retrieve batch", "no such batch", status_code=404)
        >>> str(err)
        'retrieve batch failed (HTTP 404): no such batch'
    """

    def __init__(
        self,
        operation: str,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
    ) -> None:
        self.operation = operation
        self.server_message = message
        self.status_code = status_code
        self.code = code
        # True when a non-idempotent call (create batch) may have taken effect anyway.
        self.ambiguous = False
        status = f" (HTTP {status_code})" if status_code is not None else ""
        super().__init__(f"{operation} failed{status}: {message}")

    @property
    def retryable(self) -> bool:
        """Whether repeating the same call later may succeed."""
        return False


class InfronAuthError(InfronError):
    """401 or 403: the key is missing, wrong, or lacks permission.

    Example:
        >>> err = error_for_status("create batch", 401, "invalid key", None)
        >>> type(err).__name__, err.retryable
        ('InfronAuthError', False)
    """


class InfronInsufficientCreditsError(InfronError):
    """402: the account has no credit left for this call.

    Example:
        >>> err = error_for_status("create batch", 402, "no credit", None)
        >>> type(err).__name__, err.retryable
        ('InfronInsufficientCreditsError', False)
    """


class InfronBadRequestError(InfronError):
    """400 or 422: the server rejected the request as malformed or over a limit.

    Example:
        >>> err = error_for_status("create batch", 422, "too many requests in one batch", None)
        >>> type(err).__name__, err.retryable
        ('InfronBadRequestError', False)
    """


class InfronNotFoundError(InfronError):
    """404: the batch or file does not exist (or belongs to another key).

    Example:
        >>> err = error_for_status("retrieve batch", 404, "no such batch", None)
        >>> type(err).__name__, err.retryable
        ('InfronNotFoundError', False)
    """


class InfronRateLimitError(InfronError):
    """429 after the retry budget ran out.

    Example:
        >>> err = error_for_status("create batch", 429, "slow down", "rate_limit")
        >>> type(err).__name__, err.retryable
        ('InfronRateLimitError', True)
    """

    @property
    def retryable(self) -> bool:
        return True


class InfronServerError(InfronError):
    """5xx (or 408/409) after the retry budget ran out.

    Example:
        >>> err = error_for_status("retrieve batch", 503, "unavailable", None)
        >>> type(err).__name__, err.retryable
        ('InfronServerError', True)
    """

    @property
    def retryable(self) -> bool:
        return True


class InfronConnectionError(InfronError):
    """The server could not be reached or did not answer in time.

    Example:
        >>> err = InfronConnectionError("retrieve batch", "timed out")
        >>> str(err), err.retryable
        ('retrieve batch failed: timed out', True)
    """

    @property
    def retryable(self) -> bool:
        return True


class InfronProtocolError(InfronError):
    """The server answered something this client cannot understand.

    Example:
        >>> err = InfronProtocolError("retrieve batch", "not JSON")
        >>> str(err), err.retryable
        ('retrieve batch failed: not JSON', False)
    """


def error_for_status(
    operation: str, status_code: int, message: str, code: str | None
) -> InfronError:
    """Pick the error class for an HTTP status.

    Example:
        >>> type(error_for_status("retrieve batch", 404, "no such batch", None)).__name__
        'InfronNotFoundError'
    """
    if status_code in (401, 403):
        cls: type[InfronError] = InfronAuthError
    elif status_code == 402:
        cls = InfronInsufficientCreditsError
    elif status_code == 404:
        cls = InfronNotFoundError
    elif status_code == 429:
        cls = InfronRateLimitError
    elif status_code >= 500 or status_code in (408, 409):
        cls = InfronServerError
    else:
        cls = InfronBadRequestError
    return cls(operation, message, status_code=status_code, code=code)
