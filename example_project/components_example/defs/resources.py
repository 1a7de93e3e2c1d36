"""The ``infron`` resource: real Infron with ``INFRON_API_KEY``, else the embedded local server
(state in ``INFRON_LOCAL_DATA_DIR``, ``$DAGSTER_HOME/infron_local`` or ``.infron_data/local``)."""

import os

import dagster as dg

from infron_dagster import InfronResource


@dg.definitions
def resources() -> dg.Definitions:
    if os.environ.get("INFRON_API_KEY"):
        infron = InfronResource(
            api_key=dg.EnvVar("INFRON_API_KEY"), base_url=os.environ.get("INFRON_BASE_URL") or None
        )
    else:
        infron = InfronResource(base_url=os.environ.get("INFRON_BASE_URL") or None)
    return dg.Definitions(resources={"infron": infron})
