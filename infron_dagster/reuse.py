"""Which earlier attempt of a partition stands for a submission's requests.

Before a submission pays, under the partition's lock, its fingerprint is looked up among the
partition's attempts: the active attempt that holds the same requests is reused (or resumed,
when chunks of it wait); an older one is revived when its batches alone hold every row; an
older one some of whose chunks were never created is not (its rows were sent since by the
attempts that replaced it): the new attempt carries the rows of its created chunks instead
(:func:`revert_source`). Answers the local mock server gave never stand for a real
provider's (:mod:`~infron_dagster.provider`).

Example::

    match = reusable(load_manifests(storage, "a"), prepared.fingerprint, "initial",
                     "https://llm.onerouter.pro")
    match.attempt if match else None
    # -> 1
"""

from __future__ import annotations

from .errors import SubmitRefused
from .history import active_attempts
from .manifest import Manifest
from .provider import mock_for

__all__ = [
    "is_active",
    "latest_initial",
    "partial_retry",
    "refuse_mock_retry",
    "reusable",
    "revert_source",
    "revivable",
]


def reusable(
    manifests: list[Manifest], fingerprint: str, kind: str, provider: str | None = None
) -> Manifest | None:
    """The attempt that already holds these exact requests, if paying again is not needed
    (an attempt the local server answered never stands for a real ``provider``'s)."""
    for manifest in reversed(manifests):
        if manifest.fingerprint != fingerprint or manifest.state == "abandoned":
            continue
        if mock_for(manifest.provider, provider):
            continue
        if kind != manifest.kind:
            continue
        if kind == "retry" and manifest.state == "collected":
            return None  # the same rows failed again: a new attempt is the point of retrying
        latest = latest_initial(manifests)
        if kind == "retry" and latest is not None and manifest.base_attempt != latest.attempt:
            return None  # a retry of a replaced attempt: never collected, never reuse it
        return manifest
    return None


def partial_retry(manifests: list[Manifest], initial: Manifest) -> Manifest | None:
    """A retry of ``initial`` that is not fully submitted (its create failed part-way)."""
    for manifest in reversed(manifests):
        if (
            manifest.kind == "retry"
            and manifest.base_attempt == initial.attempt
            and manifest.state != "abandoned"
            and not manifest.settled
        ):
            return manifest
    return None


def is_active(manifests: list[Manifest], match: Manifest) -> bool:
    """Whether ``match`` is the latest initial attempt or one of its retries: an older,
    replaced attempt is never resumed (its unsent chunks were sent by the newer one)."""
    latest = latest_initial(manifests)
    return latest is not None and match.base_attempt == latest.attempt


def latest_initial(manifests: list[Manifest]) -> Manifest | None:
    """The partition's latest initial attempt that was not abandoned (None before any)."""
    initial = [m for m in manifests if m.kind == "initial" and m.state != "abandoned"]
    return initial[-1] if initial else None


def refuse_mock_retry(manifests: list[Manifest], provider: str | None) -> None:
    """A retry adds its answers to the partition's earlier ones: never to mock answers."""
    mock = [m.attempt for m in active_attempts(manifests) if mock_for(m.provider, provider)]
    if mock:
        raise SubmitRefused(
            f"partition {manifests[-1].partition_key!r}: attempt(s) {mock} were answered by "
            f"the local mock server; a retry against {provider} would mix real answers "
            "with mock ones. Materialize the partition instead: it is sent again, for real."
        )


def revivable(manifests: list[Manifest], match: Manifest) -> bool:
    """An old attempt's batches stand for the input again only if they sent every row and
    nothing was retried on top of them (else its results are not in its batches alone).

    Every chunk must have its batch: a chunk never created (it waited for admission, a
    refusal or a crash stopped the attempt) was replaced by the attempts since, which sent
    its rows or carry them; copying it would send them again. Such an attempt is not
    revived: the new attempt carries the rows of its created chunks instead
    (:func:`revert_source`) and sends only what no attempt sent."""
    retried = any(m.kind == "retry" and m.base_attempt == match.attempt for m in manifests)
    return match.carried_count == 0 and not retried and match.fully_submitted


def revert_source(
    manifests: list[Manifest], fingerprint: str, kind: str, provider: str | None = None
) -> Manifest | None:
    """The older attempt whose requests the input went back to, when it cannot be revived
    whole because some of its chunks were never created: the rows of the chunks it did
    create were paid for, and the new attempt carries them (waiting for its batches) rather
    than sending them again. None when there is no such attempt (or nothing of it was
    created).

    Example::

        revert_source(load_manifests(storage, "a"), prepared.fingerprint, "initial")
        # -> Manifest(attempt=1, ...)   (its chunk 0 created, chunk 1 waited for admission)
    """
    if kind != "initial":
        return None
    match = reusable(manifests, fingerprint, kind, provider)
    if match is None or match is latest_initial(manifests) or is_active(manifests, match):
        return None  # reused or resumed as it is (submit_prepared)
    if match.fully_submitted or not match.batch_ids:
        return None  # revived whole, or nothing of it was paid for
    if any(m.kind == "retry" and m.base_attempt == match.attempt for m in manifests):
        return None  # its batches alone do not hold its outcome
    return match
