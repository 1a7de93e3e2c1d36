"""The run config of a pipeline's runs: :class:`SubmitConfig` for ``<name>_batches`` and
:class:`CollectConfig` for ``<name>_results``/``<name>_failed`` (the launchpad shows each
field's description). Their fields are pinned by tests: a removed or renamed field is
accepted with a deprecation warning for one minor version.

Example:
    >>> SubmitConfig(retry_failed=True).dry_run, CollectConfig().wait_seconds
    (False, 0.0)
"""

import warnings
from typing import Any

import dagster as dg
from pydantic import Field

__all__ = ["CollectConfig", "SubmitConfig"]


class SubmitConfig(dg.Config):
    """Run config of ``<name>_batches`` (the launchpad shows each field's description).

    Example:
        >>> SubmitConfig(dry_run=True).force_resubmit
        False
        >>> run_config = {"ops": {"review_sentiment_batches": {"config": {"retry_failed": True}}}}
    """

    force_resubmit: bool = Field(
        default=False,
        description="Send every row again as a new attempt, even rows already answered "
        "(pays again). Default: unchanged input reuses its batches and answered rows.",
    )
    retry_failed: bool = Field(
        default=False,
        description="Retry failed rows: resubmit only the retryable failed rows of the "
        "collected partition as a new attempt (what the <name>_retry job sets).",
    )
    resubmit_uncertain: bool = Field(
        default=False,
        description="A create call whose answer was lost may have created a batch: send "
        "those chunks again anyway (may pay twice). Default: refuse and say so.",
    )
    dry_run: bool = Field(
        default=False,
        description="Prepare, validate and estimate only: nothing is written or sent, the "
        "partition is not materialized; an observation shows what a real run would send "
        "and cost.",
    )
    allow_over_budget: bool = Field(
        default=False,
        description="Submit this run even if its worst case crosses the pipeline's Budget "
        "(on purpose, once; the ledger records it).",
    )


class CollectConfig(dg.Config):
    """Run config of ``<name>_results`` / ``<name>_failed``.

    A collection whose batches are still running waits at most ``wait_seconds`` (default: not
    at all), then ends without collecting; the sensor collects the partition later.

    Deprecated, accepted and ignored until 0.2.0 so that saved launchpad configs and
    schedules keep launching: ``max_run_retries`` and ``retry_after_seconds`` (a collection
    no longer retries its run while batches are running; the sensor requests it when they
    end). Setting either warns (a ``FutureWarning``, shown by default, and a log line).

    Example:
        >>> CollectConfig(wait_seconds=60).wait_seconds
        60.0
    """

    wait_seconds: float = Field(
        default=0.0,
        description="How long to wait for running batches before ending without collecting "
        "(the sensor collects them later). Default: do not hold a worker.",
    )
    poll_interval_seconds: float = Field(default=5.0, description="Seconds between polls.")
    max_run_retries: int | None = Field(
        default=None,
        description="Deprecated and ignored (removed in 0.2.0): the sensor collects a "
        "partition when its batches end; the run is no longer retried.",
    )
    retry_after_seconds: int | None = Field(
        default=None,
        description="Deprecated and ignored (removed in 0.2.0): see max_run_retries.",
    )

    def model_post_init(self, context: Any, /) -> None:
        """Warn about deprecated fields that are set (they are ignored)."""
        deprecated = ("max_run_retries", "retry_after_seconds")
        old = [f for f in deprecated if getattr(self, f) is not None]
        if old:
            message = (
                f"CollectConfig: {' and '.join(old)} {'is' if len(old) == 1 else 'are'} "
                "deprecated and ignored (removed in 0.2.0): the sensor collects a partition "
                "when its batches end; remove "
                f"{'it' if len(old) == 1 else 'them'} from the run config."
            )
            warnings.warn(message, FutureWarning, stacklevel=2)
            dg.get_dagster_logger().warning(message)
