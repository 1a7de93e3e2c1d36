"""A local emulator of the batch API (Infron and OpenAI styles) for development and tests.

It needs only the standard library: run it in-process behind ``httpx.WSGITransport`` or serve
it with ``infron-local serve``. State lives in a folder, so several processes share batches.

Example:
    >>> import tempfile
    >>> from infron_dagster.local import LocalServerConfig, create_app
    >>> app = create_app(tempfile.mkdtemp(), LocalServerConfig(validating_seconds=0,
    ...                  in_progress_seconds=0, finalizing_seconds=0))
"""

from .app import LocalBatchApp, create_app
from .config import LocalServerConfig, load_config, save_config

__all__ = ["LocalBatchApp", "LocalServerConfig", "create_app", "load_config", "save_config"]
