"""The embedded local server's timing for the example: batches slow enough to watch.

``make dev`` keeps each batch in progress for ``INFRON_LOCAL_IN_PROGRESS_SECONDS`` (default
90 s), long enough to watch its progress in the UI and to cancel a partition while it runs.
Timing is a property of the server's folder (its ``config.json``, read by every process that
shares it; each batch keeps the timing it was created with), so the example writes it there.

The example also records what it wrote (``example_config.json`` beside it). A config that is
still the example's own (or the one older versions wrote, 3 s in progress) is replaced when
the wanted one differs, so a changed default or knob applies to folders made before; a config
written by anyone else (``save_config``, ``make screenshots``) is left alone.

Example::

    apply_example_config(default_local_dir()).in_progress_seconds
    # -> 90.0
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from infron_dagster.local import LocalServerConfig, load_config, save_config

IN_PROGRESS_ENV = "INFRON_LOCAL_IN_PROGRESS_SECONDS"
DEFAULT_IN_PROGRESS_SECONDS = 90.0
RECORD_FILENAME = "example_config.json"
# What versions before the record existed saved on first use: batches done in 3 s.
LEGACY = LocalServerConfig(
    validating_seconds=1, in_progress_seconds=3, finalizing_seconds=1, failure_rate=0.04
)


def example_config() -> LocalServerConfig:
    """The timing and faults the example wants, from the environment.

    Example::

        # INFRON_LOCAL_IN_PROGRESS_SECONDS=20 make dev
        example_config().in_progress_seconds
        # -> 20.0
    """
    raw = os.environ.get(IN_PROGRESS_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_IN_PROGRESS_SECONDS
    except ValueError:
        raise ValueError(f"{IN_PROGRESS_ENV} must be a number of seconds, got {raw!r}") from None
    return LocalServerConfig(
        validating_seconds=1.0,
        in_progress_seconds=seconds,
        finalizing_seconds=1.0,
        failure_rate=0.04,  # a few failed rows, so the failed table and retry have work
    )


def apply_example_config(local_dir: str | os.PathLike[str]) -> LocalServerConfig:
    """Write :func:`example_config` into ``local_dir`` unless someone else configured it;
    return the config batches created now get."""
    wanted, current = example_config(), load_config(local_dir)
    if current == wanted:
        if _recorded(local_dir) != wanted:  # heals a record lost between the two writes
            _record(local_dir, wanted)
        return wanted
    if current is None or current in (_recorded(local_dir), LEGACY):
        save_config(local_dir, wanted)
        _record(local_dir, wanted)
        return wanted
    return current


def _recorded(local_dir: str | os.PathLike[str]) -> LocalServerConfig | None:
    try:
        data = json.loads((Path(local_dir) / RECORD_FILENAME).read_text(encoding="utf-8"))
        return LocalServerConfig.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None  # no record (or an unreadable one): the config is not known to be ours


def _record(local_dir: str | os.PathLike[str], config: LocalServerConfig) -> None:
    path = Path(local_dir) / RECORD_FILENAME
    tmp = path.with_name(f".{RECORD_FILENAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
