"""The knobs of the local batch server: timing of the lifecycle and the faults it injects."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILENAME = "config.json"
# Enough for a 200 MB batch file (the client's chunk limit) plus multipart overhead.
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024

_RATES = ("failure_rate", "lost_rate", "expire_fraction")
_NON_NEGATIVE = (
    "validating_seconds",
    "in_progress_seconds",
    "finalizing_seconds",
    "rate_limit_every",
    "rate_limit_retry_after",
    "server_error_every",
    "latency_seconds",
)


@dataclass(frozen=True)
class LocalServerConfig:
    """How the emulator behaves. Every fault is off by default and every fault is deterministic.

    Example:
        >>> cfg = LocalServerConfig(validating_seconds=0, in_progress_seconds=0,
        ...                         finalizing_seconds=0, failure_rate=0.1)
        >>> LocalServerConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    validating_seconds: float = 1.0
    in_progress_seconds: float = 2.0
    finalizing_seconds: float = 1.0
    failure_rate: float = 0.0
    rate_limit_every: int = 0
    rate_limit_retry_after: float = 0.0
    server_error_every: int = 0
    expire: bool = False
    expire_fraction: float = 0.5
    lost_rate: float = 0.0
    validation_failure: bool = False
    latency_seconds: float = 0.0
    enqueued_token_limit: int | None = None
    # Host names answered besides loopback ones ("*": every host); see hosts.py.
    allowed_hosts: tuple[str, ...] = ()
    # Larger request bodies are refused with 413 before they are read.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Infron's Messages-style chat params require max_tokens; False accepts bodies without it.
    infron_require_max_tokens: bool = True
    # repr=False: a config printed in a log must not leak the key.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in _RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.enqueued_token_limit is not None and self.enqueued_token_limit < 0:
            raise ValueError("enqueued_token_limit must be >= 0 or None")
        hosts = self.allowed_hosts
        if not isinstance(hosts, (list, tuple)) or not all(isinstance(h, str) and h for h in hosts):
            raise ValueError(f"allowed_hosts must be a list of host names, got {hosts!r}")
        # JSON hands back a list; a tuple keeps the frozen config hashable and comparable.
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        cap = self.max_body_bytes
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {cap!r}")

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able values.

        Example:
            >>> LocalServerConfig().to_dict()["validating_seconds"]
            1.0
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalServerConfig:
        """Build from a dict such as `to_dict()` returns; unknown keys are an error (typos).

        Example:
            >>> LocalServerConfig.from_dict({"failure_rate": 0.2}).failure_rate
            0.2
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LocalServerConfig keys: {', '.join(unknown)}")
        return cls(**data)


def load_config(data_dir: str | os.PathLike[str]) -> LocalServerConfig | None:
    """The config persisted in `data_dir`, or None when there is none.

    Example:
        >>> load_config("/nonexistent-dir") is None
        True
    """
    path = Path(data_dir) / CONFIG_FILENAME
    if not path.exists():
        return None
    return LocalServerConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def save_config(data_dir: str | os.PathLike[str], config: LocalServerConfig) -> Path:
    """Persist `config` in `data_dir` atomically, without the API key.

    The key stays out of the file because secrets must never land on disk in clear text;
    an embedded app reading this file then accepts any bearer token.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = save_config(d, LocalServerConfig(failure_rate=0.5))
        >>> load_config(d).failure_rate
        0.5
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    data["api_key"] = None
    path = directory / CONFIG_FILENAME
    tmp = directory / f".{CONFIG_FILENAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path
