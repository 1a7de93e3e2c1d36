"""The partition lock: exclusive across threads and processes; on S3 kept alive while held and
broken only when its holder is gone."""

import threading
import time
import uuid

import pytest

from infron_dagster import BatchStorage
from infron_dagster.storage import LockTimeout


def _overlap(storage: BatchStorage, hold: float = 1.5, **lock_kwargs) -> list[str]:
    """Two holders, the first holding longer than a stale lock lives: record who is inside."""
    events: list[str] = []
    holding = threading.Event()

    def long_holder() -> None:
        with storage.lock("k", **lock_kwargs):
            events.append("A in")
            holding.set()
            time.sleep(hold)
            events.append("A out")

    worker = threading.Thread(target=long_holder)
    worker.start()
    holding.wait(10)
    with storage.lock("k", wait_seconds=20, **lock_kwargs):
        events.append("B in")
    worker.join()
    return events


def test_local_lock_excludes_a_second_holder(tmp_path):
    assert _overlap(BatchStorage(str(tmp_path), "p")) == ["A in", "A out", "B in"]


def test_local_lock_times_out_clearly(tmp_path):
    from infron_dagster.storage import LockTimeout

    storage = BatchStorage(str(tmp_path), "p")
    with (
        storage.lock("k"),
        pytest.raises(LockTimeout, match="'k'"),
        storage.lock("k", wait_seconds=0.2),
    ):
        pass


def test_s3_lock_heartbeat_keeps_a_long_holder_exclusive(moto_s3):
    storage = BatchStorage(f"s3://lake/{uuid.uuid4().hex}", "p", moto_s3.storage_options)
    # Stale after 1.5 s, held 4 s: without the heartbeat (every 0.5 s) B would break A's lock
    # while A works. (0.6 s flaked on a loaded machine: a beat may come a second late.)
    assert _overlap(storage, hold=4.0, stale_seconds=1.5) == ["A in", "A out", "B in"]


def test_s3_lock_of_a_dead_holder_is_broken(moto_s3):
    storage = BatchStorage(f"s3://lake/{uuid.uuid4().hex}", "p", moto_s3.storage_options)
    path = storage.partition_dir("locks", "k") / "lock.json"
    storage.write_bytes(path, b'{"token": "dead", "created": 0}')  # a run that died long ago
    with storage.lock("k", stale_seconds=1, wait_seconds=5):
        assert storage._owner(path) not in (None, "dead")
    assert not storage.exists(path)


@pytest.mark.parametrize("body", [b"", b'{"token": "x", "crea', b"[1, 2]", b'{"created": "soon"}'])
def test_s3_lock_with_an_unreadable_body_goes_stale_by_its_age(moto_s3, body):
    # An empty, truncated or foreign lock.json was never stale: the partition was locked for
    # good. Its holder would have rewritten it every beat, so its age tells.
    storage = BatchStorage(f"s3://lake/{uuid.uuid4().hex}", "p", moto_s3.storage_options)
    path = storage.partition_dir("locks", "k") / "lock.json"
    storage.write_bytes(path, body)
    fresh = storage.lock("k", stale_seconds=30, wait_seconds=0.5)
    with pytest.raises(LockTimeout), fresh:  # fresh: a holder may be writing it now
        pass
    time.sleep(1.5)  # older than stale_seconds=1 below
    with storage.lock("k", stale_seconds=1, wait_seconds=10):
        assert storage._owner(path) not in (None, "x")
    assert not storage.exists(path)


def test_s3_lock_read_while_its_holder_rewrites_it_is_read_again(moto_s3):
    # The holder rewrites lock.json every beat; a waiting run that reads it at that moment met
    # an object changed under its read (s3fs FileExpired) and failed instead of waiting.
    storage = BatchStorage(f"s3://lake/{uuid.uuid4().hex}", "p", moto_s3.storage_options)
    path = storage.partition_dir("locks", "k") / "lock.json"
    storage.write_bytes(path, b'{"token": "a", "created": 0}')
    stop = threading.Event()

    def holder_beating() -> None:
        while not stop.is_set():
            storage.write_bytes(path, b'{"token": "a", "created": %d}' % time.time())

    beater = threading.Thread(target=holder_beating)
    beater.start()
    try:
        owners = {storage._owner(path) for _ in range(300)}
        stale = {storage._is_stale(path, stale_seconds=60) for _ in range(100)}
    finally:
        stop.set()
        beater.join()
    assert owners == {"a"} and stale == {False}
