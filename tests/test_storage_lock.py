"""The partition lock: exclusive, kept alive while held, never released by a non-owner."""

import threading
import time

from infron_dagster import BatchStorage


def test_a_long_holder_keeps_its_lock_alive_and_excludes_others(tmp_path):
    storage = BatchStorage(str(tmp_path), "p")
    events: list[str] = []
    holding = threading.Event()

    def long_holder() -> None:
        with storage.lock("k", stale_seconds=0.6):
            events.append("A in")
            holding.set()
            time.sleep(1.5)  # longer than stale_seconds: only the heartbeat keeps it
            events.append("A out")

    worker = threading.Thread(target=long_holder)
    worker.start()
    holding.wait(5)
    with storage.lock("k", stale_seconds=0.6, wait_seconds=10):
        events.append("B in")
    worker.join()
    assert events == ["A in", "A out", "B in"]


def test_a_dead_holders_lock_is_broken_and_not_deleted_by_it_later(tmp_path):
    storage = BatchStorage(str(tmp_path), "p")
    path = storage.partition_dir("locks", "k") / "lock.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"token": "dead", "created": 0}')  # a run that died long ago
    with storage.lock("k", stale_seconds=1, wait_seconds=5):
        owner = storage._owner(path)
        assert owner not in (None, "dead")
    assert not path.exists()
