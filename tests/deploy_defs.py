"""A code location written the way a production deployment writes one.

Everything comes from the environment, as on a Kubernetes pod or an ECS task: the storage
root on S3 (credentials and endpoint through the AWS chain: ``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...), the API's URL, and the key as a secret through ``dg.EnvVar``.
The input is Parquet on S3 too, so no step depends on a file of another machine.

Used by ``test_deploy_postgres.py`` (webserver, daemon and CLI runs against it).
"""

from __future__ import annotations

import os

import dagster as dg

from infron_dagster import InfronResource, ParquetSource, RequestSpec, build_infron_batch_assets

PARTITIONS = ["p1", "p2", "p3"]
ROOT = os.environ.get("INFRON_STORAGE_ROOT", "s3://lake/deploy")

pipeline = build_infron_batch_assets(
    name="rev",
    spec=RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id"),
    source=ParquetSource(ROOT + "/input/{partition_key}.parquet"),
    partitions_def=dg.StaticPartitionsDefinition(PARTITIONS),
    storage_root=ROOT,
    max_requests_per_batch=7,
    sensor_interval_seconds=1,
)

defs = dg.Definitions.merge(
    pipeline.definitions,
    dg.Definitions(
        # Each run's steps in its one process: the test waits less for Python to start. A
        # deployment keeps the multiprocess (or k8s) executor; nothing here depends on it.
        executor=dg.in_process_executor,
        resources={
            "infron": InfronResource(
                api_key=dg.EnvVar("INFRON_API_KEY"),
                base_url=os.environ.get("INFRON_BASE_URL", "http://127.0.0.1:1/v1"),
                api_style="infron",
            )
        },
    ),
)
