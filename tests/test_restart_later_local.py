"""Restart anywhere (admission, cancel and collect, local disk): kill -9 at each write point, then
the sensor alone; every partition converges and nothing is paid twice. Cases and checks:
``restart_anywhere.py``."""

import pytest
from restart_anywhere import bases, cases, forks, run_case

LATER_LOCAL = cases(("admission", "cancel", "collect"), "local")
__all__ = ["bases", "forks"]  # the shared module fixtures


@pytest.mark.parametrize("step, storage, k, label", LATER_LOCAL)
def test_a_kill_at_any_write_converges_unattended(
    step, storage, k, label, bases, forks, monkeypatch, request
):
    run_case(step, storage, k, label, bases, forks, monkeypatch, request)
