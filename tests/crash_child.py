"""The child of ``test_crash_submit.py``: prepares and submits one partition through the real
code, against a served local server, and is killed (SIGKILL) by the test while its create call
is in flight. Also the one definition of the rows and spec that both the child and the test's
rerun submit, so the rerun sees the same fingerprint.

Usage: python crash_child.py STYLE BASE_URL API_KEY ROOT NAME PARTITION_KEY WORKDIR
"""

from __future__ import annotations

import sys

import pandas as pd

from infron_dagster import (
    BatchStorage,
    InfronClient,
    RequestSpec,
    prepare_requests,
    submit_prepared,
)

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Say {word}", key_columns=("id",))
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def rows() -> pd.DataFrame:
    """The input rows of the partition: the same in the child and in the rerun."""
    return pd.DataFrame({"id": range(len(WORDS)), "word": WORDS})


def submit(client: InfronClient, root: str, name: str, partition_key: str, workdir: str, **kwargs):
    """prepare_requests + submit_prepared for the partition, as a run of the asset would."""
    storage = BatchStorage(root, name)
    prepared = prepare_requests(
        rows(), SPEC, name=name, partition_key=partition_key, workdir=workdir
    )
    return submit_prepared(
        client, storage, prepared, spec=SPEC, partition_key=partition_key, **kwargs
    )


def main(argv: list[str]) -> int:
    style, base_url, api_key, root, name, partition_key, workdir = argv
    with InfronClient(api_key, base_url, style) as client:  # type: ignore[arg-type]
        outcome = submit(client, root, name, partition_key, workdir)
    # Reaching this line means the test did not kill the child in time.
    print(f"submitted {outcome.manifest.batch_ids}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
