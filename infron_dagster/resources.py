"""The Dagster resource that builds a batch API client.

Example:
    >>> import dagster as dg
    >>> infron = InfronResource(api_key=dg.EnvVar("INFRON_API_KEY"))
    >>> local = InfronResource()  # no key, no URL: the embedded local server
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from .client import DEFAULT_BASE_URL, InfronClient, RetryPolicy
from .local.embedded import embedded_client, parse_local_url
from .provider import LOCAL, provider_of

__all__ = ["InfronResource"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_if_literal_key(api_key: str | None) -> None:
    """A literal ``api_key="sk-..."`` is stored in the code location's snapshot, which the
    UI serves to anyone who can open it.

    ``dg.EnvVar`` keeps it out. At run time Dagster rebuilds the resource with the resolved
    value, a plain string equal to an environment variable: that is not warned about.
    """
    if not api_key or isinstance(api_key, dg.EnvVar) or "literal" in _warned:
        return
    if api_key in os.environ.values():
        return
    _warned.add("literal")
    logger.warning(
        "InfronResource(api_key=...) is given as a literal string: Dagster stores it in the "
        "code location snapshot that the UI shows. Use api_key=dg.EnvVar('INFRON_API_KEY')."
    )


LOCAL_SERVER_WARNING = (
    "This run uses the EMBEDDED LOCAL SERVER, not a real batch API: answers are mock, nothing "
    "is sent or paid. Configure an API key (e.g. api_key=dg.EnvVar('INFRON_API_KEY'); in a "
    "scaffolded dg project, set INFRON_API_KEY) to use Infron."
)


def default_local_dir() -> str:
    """Where the embedded server keeps its state: shared by every process of a deployment."""
    explicit = os.environ.get("INFRON_LOCAL_DATA_DIR")
    if explicit:
        return explicit
    home = os.environ.get("DAGSTER_HOME")
    return os.path.join(home, "infron_local") if home else os.path.abspath(".infron_data/local")


class InfronResource(dg.ConfigurableResource):
    """Connection settings for Infron's Batch API or any OpenAI-compatible batch API.

    With neither ``api_key`` nor ``base_url`` set, calls go to the embedded local server
    (in-process, state on disk), so pipelines and tests run with no key and no network.
    ``base_url="local"`` or ``"local:///path"`` asks for it explicitly.

    Example::

        import dagster as dg
        InfronResource(
            api_key=dg.EnvVar("INFRON_API_KEY"),
            api_style="infron",
        )
        InfronResource(
            api_key=dg.EnvVar("OPENAI_API_KEY"),
            base_url="https://api.openai.com/v1",
            api_style="openai",
        )
    """

    api_key: str | None = Field(
        default=None,
        repr=False,  # the key must not reach a log through repr()
        description="API key; use dg.EnvVar('INFRON_API_KEY'). Never logged.",
    )
    base_url: str | None = Field(
        default=None,
        description=f"API root. Default {DEFAULT_BASE_URL} with a key, the local server without.",
    )
    api_style: Literal["infron", "openai"] = Field(
        default="infron", description="'infron' (inline requests) or 'openai' (files + batches)."
    )
    timeout_seconds: float = Field(default=60.0, description="Read timeout per HTTP call.")
    max_retries: int = Field(default=6, description="Retries of 408/409/429/5xx/connection errors.")
    retry_budget_seconds: float = Field(
        default=180.0, description="No retry starts after this long since the first try."
    )
    local_data_dir: str | None = Field(
        default=None, description="State folder of the embedded local server."
    )

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        # The value as given: an EnvVar is still an EnvVar here, not its name or value.
        _warn_if_literal_key(data.get("api_key"))

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Mock answers must never pass for real ones: say so in each run's own log (not on
        # every sensor tick, which has no run).
        if self.is_local and context.dagster_run is not None and context.log is not None:
            context.log.warning(LOCAL_SERVER_WARNING)

    @property
    def is_local(self) -> bool:
        """True when calls go to the embedded local server."""
        if self.api_key is not None and self.base_url is None:
            return False  # a key was configured, even an empty one: never fall back to mock
        return parse_local_url(self.base_url, "") is not None

    @property
    def provider(self) -> str:
        """Where this resource sends batches, as manifests record it: ``"local"`` for the
        embedded local server (mock answers), else the API's scheme and host (never the
        key). Answers the local server gave are never reused against a real provider.

        Example:
            >>> InfronResource().provider
            'local'
            >>> InfronResource(api_key="sk-...", base_url="https://api.openai.com/v1").provider
            'https://api.openai.com'
        """
        if self.is_local:
            return LOCAL
        return provider_of(self.base_url or DEFAULT_BASE_URL)

    def get_client(self) -> InfronClient:
        """A new client; close it (or use it as a context manager) when done.

        Example::

            with InfronResource().get_client() as client:
                client.retrieve_batch("batch_abc")
        """
        retry = RetryPolicy(max_retries=self.max_retries, budget_seconds=self.retry_budget_seconds)
        if self.is_local:
            folder = parse_local_url(self.base_url, self.local_data_dir or default_local_dir())
            assert folder is not None
            return embedded_client(
                folder, api_style=self.api_style, retry=retry, timeout=self.timeout_seconds
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is configured but empty (is INFRON_API_KEY set?)")
        return InfronClient(
            api_key=self.api_key,
            base_url=self.base_url or DEFAULT_BASE_URL,
            api_style=self.api_style,
            timeout=self.timeout_seconds,
            retry=retry,
        )
