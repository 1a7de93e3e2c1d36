"""RE-ATTACH: a chunk whose create call ended ambiguously, settled by the provider's list.

A create call that fails without an answer (a timeout, a lost connection, a kill -9) may
have created the batch anyway. Its chunk is marked *uncertain* in the manifest, never "not
sent". In openai style the provider lists batches with their metadata: a batch carrying the
chunk's idempotency key is re-attached to it; a chunk the list does not show is taken as
never created only when the list can be trusted and the call is older than a grace period
(a server may still be creating it when the client gave up). Infron style has no list: an
uncertain chunk waits for a person (``resubmit_uncertain``).

The grace is :data:`infron_dagster.submit.REATTACH_GRACE_SECONDS`, passed in by the caller.

Example::

    reattached = reattach_orphans(client, manifest, grace_seconds=600)
    reattached                      # -> ['batch_9f2c...']  (chunks re-attached)
    uncertain_wait(manifest, 600)   # why the attempt still waits, if a chunk is uncertain
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from .client import InfronClient
from .errors import InfronError
from .manifest import Manifest

__all__ = ["reattach_orphans", "uncertain_wait"]

logger = logging.getLogger(__name__)


def reattach_orphans(client: InfronClient, manifest: Manifest, grace_seconds: int) -> list[str]:
    """Record batches that exist on the server (found by metadata) but not in the manifest;
    the batch ids re-attached (the manifest's chunks are updated, not saved).

    A chunk missing from the list is taken as never created only when the list can be
    trusted: it was read whole, and it shows our metadata on some batch (a provider that
    drops metadata would otherwise make every lost create look unsent), and the call was
    more than ``grace_seconds`` ago. Otherwise the chunk stays uncertain.

    (The module's example shows a call.)
    """
    missing = {c.idempotency_key for c in manifest.chunks if not c.batch_id}
    if not missing:
        return []
    try:
        orphans, trusted = _orphans_by_key(client, missing)
    except InfronError as exc:
        logger.warning("cannot list batches to re-attach orphans (%s); chunks stay uncertain", exc)
        return []
    reattached = []
    for chunk in manifest.chunks:
        if not chunk.batch_id and chunk.idempotency_key in orphans:
            chunk.batch_id, chunk.uncertain = orphans[chunk.idempotency_key], False
            reattached.append(chunk.batch_id)
        elif not chunk.batch_id and trusted and _past_grace(chunk.create_started_at, grace_seconds):
            chunk.uncertain = False
    return reattached


def uncertain_wait(manifest: Manifest, grace_seconds: int) -> str:
    """Why an attempt waits on chunks whose create call ended ambiguously (openai style).

    Example::

        uncertain_wait(manifest, 600)
        # -> 'chunk(s) [2] may have been created although the create call failed: ...'
    """
    chunks = [c.index for c in manifest.chunks if c.uncertain and not c.batch_id]
    return (
        f"chunk(s) {chunks} may have been created although the create call failed: a batch "
        "that the provider lists is re-attached by its metadata, and a chunk still not listed "
        f"{grace_seconds // 60} minutes after its call is sent; the sensor requests "
        "that run (nothing is paid twice)"
    )


def _past_grace(started: str | None, grace_seconds: int) -> bool:
    if started is None:
        return True
    try:
        when = datetime.fromisoformat(started)
    except ValueError:
        return True
    return (datetime.now(timezone.utc) - when).total_seconds() > grace_seconds


def _orphans_by_key(client: InfronClient, keys: set[str]) -> tuple[dict[str, str], bool]:
    """(key -> batch id of our orphans, whether absence from this list means anything)."""
    found: dict[str, str] = {}
    skipped: list[str] = []
    echoes_metadata, listed = False, 0
    for batch in client.list_batches(skipped=skipped):
        listed += 1
        key = batch.metadata.get("infron_dagster_key")
        echoes_metadata = echoes_metadata or key is not None
        if key in keys and key not in found:
            found[key] = batch.id
    if skipped:
        logger.warning("%d listed batch(es) could not be read: %s", len(skipped), skipped[0])
    # A complete, empty list proves absence too: a batch that existed would be listed,
    # with its metadata or without.
    return found, (echoes_metadata or listed == 0) and not skipped
