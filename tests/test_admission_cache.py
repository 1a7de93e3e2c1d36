"""The admission ledger is a cache of the manifests (issue 17, item 9): an empty, truncated
or foreign ``_admission/<key>.json`` never fails a submission or a sensor tick, it is rebuilt
from the manifests with a warning naming the file; deleting it (the natural fix) still lets
the sensor send every pending chunk. Real runs, the real sensor, the embedded local server.
"""

from __future__ import annotations

import logging

import dagster as dg
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline
from test_admission import _count_creates

from infron_dagster import InfronResource
from infron_dagster.admission import AdmissionControl
from infron_dagster.submit import load_manifests

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ROWS = 4


def _flow(tmp_path) -> Pipeline:
    local = make_local_dir(str(tmp_path / "local"), in_progress_seconds=0.2)
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    # chunks of 2 requests (~45 tokens each): one partition's two chunks fill the limit
    return Pipeline.build(
        tmp_path,
        resource,
        PARTS,
        rows=ROWS,
        max_requests_per_batch=2,
        params={"max_tokens": 16},
        max_enqueued_tokens=100,
    )


def _submit(flow: Pipeline, instance, key):
    run = flow.submit(instance, key)
    assert run.success
    return run


def _ledger(flow) -> AdmissionControl:
    return AdmissionControl(flow.pipeline.storage, max_enqueued_tokens=100, output_tokens=16)


DAMAGE = {
    "empty": b"",
    "truncated": b'{"version": 2, "entries": {"ab',
    "foreign list": b"[1, 2, 3]",
    "foreign entries": b'{"entries": {"x": {"tokens": "many"}}}',
    "deleted": None,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_ledger_is_rebuilt_and_every_partition_converges(
    tmp_path, monkeypatch, caplog, damage
):
    creates = _count_creates(monkeypatch)
    flow = _flow(tmp_path)
    ledger = _ledger(flow)
    with dagster_instance() as instance:
        _submit(flow, instance, "a")  # takes the room: a's chunks are in flight
        in_flight = ledger.in_flight()
        assert in_flight > 0
        path = tmp_path / "lake" / "_admission" / "infron.json"
        assert path.exists()
        if DAMAGE[damage] is None:
            path.unlink()
        else:
            path.write_bytes(DAMAGE[damage])
        caplog.set_level(logging.INFO)
        # b is submitted on the damaged ledger: no JSONDecodeError, and a's chunks still count
        _submit(flow, instance, "b")
        (b,) = load_manifests(flow.pipeline.storage, "b")
        assert not b.batch_ids, "b's chunks must wait: a's are still in flight"
        assert ledger.in_flight() == in_flight
        assert str(path) in caplog.text and "rebuilt from the manifests" in caplog.text
        # the sensor ticks on it, releases a's room and sends b's pending chunks unattended
        flow.drive(instance, ["a", "b"])
    for key in ("a", "b"):
        assert flow.accounted(key) == ROWS
    assert creates[200] == 4  # two chunks per partition, each created once
    assert ledger.in_flight() == 0


def test_a_sensor_tick_on_a_damaged_ledger_does_not_raise(tmp_path):
    flow = _flow(tmp_path)
    with dagster_instance() as instance:
        _submit(flow, instance, "a")
        _submit(flow, instance, "b")  # waits
        (tmp_path / "lake" / "_admission" / "infron.json").write_bytes(b"\x00garbage")
        result = flow.pipeline.sensor(flow.context(instance))
    assert isinstance(result, dg.SensorResult)
