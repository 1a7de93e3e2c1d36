"""The local server in-process: a real client over httpx's WSGI transport, no port, no network.

Example::

    from infron_dagster.local.embedded import embedded_client
    client = embedded_client("/tmp/infron-local", api_style="openai")
    client.create_batch("requests.jsonl").status
    # -> <BatchStatus.VALIDATING: 'validating'>
"""

from __future__ import annotations

import os

import httpx

from ..client import InfronClient, RetryPolicy
from ..models import ApiStyle
from .app import create_app
from .config import LocalServerConfig
from .hosts import EMBEDDED_HOST

__all__ = ["EMBEDDED_BASE_URL", "embedded_client", "parse_local_url"]

# The app answers this host name only through the in-process transport (see hosts.py).
EMBEDDED_BASE_URL = f"http://{EMBEDDED_HOST}/v1"
_EMBEDDED_TOKEN = "local-embedded"


def parse_local_url(base_url: str | None, default_dir: str) -> str | None:
    """The data folder named by ``local`` / ``local:///path``, or None for a real URL.

    Example:
        >>> parse_local_url("local:///tmp/x", "/d")
        '/tmp/x'
        >>> parse_local_url("local", "/d")
        '/d'
        >>> parse_local_url("https://llm.onerouter.pro/v1", "/d") is None
        True
    """
    if base_url is None or base_url == "local":
        return default_dir
    if base_url.startswith("local://"):
        return base_url[len("local://") :] or default_dir
    return None


def embedded_client(
    data_dir: str | os.PathLike[str],
    *,
    api_style: ApiStyle = "infron",
    config: LocalServerConfig | None = None,
    retry: RetryPolicy | None = None,
    timeout: float = 60.0,
) -> InfronClient:
    """A client whose every call is served by the local app over ``data_dir``.

    Processes that share ``data_dir`` share batches, so a run and a sensor agree.

    Example:
        >>> import tempfile
        >>> client = embedded_client(tempfile.mkdtemp(), api_style="openai")
        >>> client.api_style, client.base_url
        ('openai', 'http://infron.local/v1')
    """
    os.makedirs(data_dir, exist_ok=True)
    app = create_app(data_dir, config)
    return InfronClient(
        api_key=_EMBEDDED_TOKEN,
        base_url=EMBEDDED_BASE_URL,
        api_style=api_style,
        retry=retry,
        timeout=timeout,
        transport=httpx.WSGITransport(app=app),
    )
