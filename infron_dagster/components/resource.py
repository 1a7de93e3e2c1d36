"""A YAML component for the ``infron`` resource, so a project needs no Python to connect.

Example (``defs/infron/defs.yaml``):

.. code-block:: yaml

    type: infron_dagster.components.InfronResourceComponent
    attributes:
      key: infron
      api_key_env: INFRON_API_KEY        # the name of the variable, never the key itself
      base_url: https://api.infron.ai/v1
"""

import logging
import os
from typing import Any, Literal

import dagster as dg
from pydantic import ConfigDict, Field, field_validator

from ..local.embedded import parse_local_url
from ..resources import InfronResource

__all__ = ["InfronResourceComponent"]

logger = logging.getLogger(__name__)

# One resource object per distinct configuration: Dagster merges the definitions of a defs
# folder by identity, so two YAML files that configure the same resource must yield the same
# object (and two that configure it differently still fail, as they should).
_INTERNED: dict[tuple[tuple[str, Any], ...], InfronResource] = {}


class InfronResourceComponent(dg.Component, dg.Resolvable, dg.Model):
    """Defines an :class:`~infron_dagster.InfronResource` under ``key`` from YAML.

    The API key is read from the environment variable named by ``api_key_env`` when a run
    starts (``dg.EnvVar``): it never sits in YAML, in the code location snapshot or in a log.
    ``base_url: local`` (or ``local:///path``) is the embedded local server, which needs no
    key; ``api_key_env`` is then ignored.

    ``if_key_missing: local`` (what ``dg scaffold`` writes) uses the embedded local server
    while the variable is unset or empty, so a new project runs before it has a key: the
    load logs a warning and every run's log says so (mock answers, nothing paid). The choice
    is made when the definitions load. The default, ``fail``, fails the run instead: what a
    deployment wants when its secret is missing.

    Example ``defs.yaml``:

    .. code-block:: yaml

        type: infron_dagster.components.InfronResourceComponent
        attributes:
          api_key_env: INFRON_API_KEY
          base_url: "{{ env('INFRON_BASE_URL', 'local') }}"
    """

    # A key pasted where its variable's name belongs must not be echoed in the error.
    model_config = ConfigDict(hide_input_in_errors=True)

    key: str = Field(default="infron", description="Resource key the pipelines ask for.")
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key, read at run time.",
        examples=["INFRON_API_KEY"],
    )
    base_url: str | None = Field(
        default=None,
        description="API root; 'local' for the embedded server; none: Infron with a key.",
    )
    api_style: Literal["infron", "openai"] = "infron"
    timeout_seconds: float = 60.0
    max_retries: int = 6
    retry_budget_seconds: float = 180.0
    if_key_missing: Literal["fail", "local"] = Field(
        default="fail",
        description="With api_key_env unset or empty: 'fail' (runs fail) or 'local' (the "
        "embedded local server, mock answers, a warning in each run's log).",
    )
    local_data_dir: str | None = None

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "").isalnum():
            # Never echo the value: it may be a key pasted in the wrong place.
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (letters, digits, "
                "_), such as INFRON_API_KEY, not the key itself"
            )
        return value

    @classmethod
    def get_spec(cls) -> dg.ComponentTypeSpec:
        return dg.ComponentTypeSpec(tags=["infron", "llm", "resource"], produces=["resource"])

    def build_resource(self) -> InfronResource:
        """The resource this YAML configures (the same object for the same configuration)."""
        settings = self.model_dump(exclude={"key", "api_key_env", "if_key_missing"})
        base_url = self.base_url or None  # an empty templated value means "not set"
        local = base_url is not None and parse_local_url(base_url, "") is not None
        key_env = self.api_key_env if not local else None
        # Unset or empty, as the scaffold's storage_root template tests it; a key of blanks is
        # "configured" and fails the run, as in InfronResource.
        if key_env and self.if_key_missing == "local" and not os.environ.get(key_env):
            _warn_key_missing(key_env)
            base_url, key_env = "local", None
        settings["base_url"] = base_url
        identity = tuple(sorted({**settings, "api_key_env": key_env}.items()))
        if key_env:
            settings["api_key"] = dg.EnvVar(key_env)
        if identity not in _INTERNED:
            _INTERNED[identity] = InfronResource(**settings)
        return _INTERNED[identity]

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(resources={self.key: self.build_resource()})


_warned: set[str] = set()


def _warn_key_missing(key_env: str) -> None:
    """Once per variable and process: where ``dg check defs`` and ``dg dev`` show it."""
    if key_env in _warned:
        return
    _warned.add(key_env)
    logger.warning(
        f"${key_env} is not set: the infron resource uses the EMBEDDED LOCAL SERVER (mock "
        f"answers, nothing is sent or paid; if_key_missing: local). Set {key_env} and load "
        f"the definitions again (restart `dg dev`) to use the real API."
    )
