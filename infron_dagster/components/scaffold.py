"""What ``dg scaffold defs infron_dagster.InfronBatchInferenceComponent <name>`` writes: a
pipeline that runs on day one, as written, in a fresh dg project.

- ``defs/<name>/defs.yaml``: the pipeline and the ``infron`` resource, commented;
- ``data/<name>/<day>.parquet`` under the project root: a few sample rows for each daily
  partition from two days ago to today (UTC), so the first launch has input.

Why daily partitions with ``end_offset: 1``: a pipeline is launched per partition
(``dg launch --partition <day>``), a backfill of the sample days works from the UI, and
today's partition exists before the day ends; a ``start_date`` of today with the default
``end_offset: 0`` would have no partition at all until tomorrow.

Why the resource says ``if_key_missing: local``: with no ``$INFRON_API_KEY`` the runs go to
the embedded local server (mock answers, no cost, a WARNING in each run's log) instead of
failing, and setting the key switches to Infron with no edit.

Example::

    dg scaffold defs infron_dagster.InfronBatchInferenceComponent nightly_labels
    dg launch --assets nightly_labels_batches --partition "$(date -u +%F)"
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from dagster.components.component_scaffolding import scaffold_component

__all__ = ["InfronBatchInferenceScaffolder", "sample_days"]

SAMPLE_DAYS = 3  # today and the two days before: enough to try a backfill
_SAMPLE_TEXTS = (
    "The tent kept us dry through two nights of storms.",
    "The headlamp strap snapped after a week.",
    "Shipping was slow, but the water filter works well.",
    "The trail shoes ran half a size small.",
    "The stove boils water fast and packs small.",
    "The rain jacket fits well but is warm on climbs.",
)
_ROWS_PER_DAY = 5
# Mock answers get a lake of their own: a collected partition is never sent again, so mock
# answers written where real ones go would stay after the key is set.
_LAKE = "{{ 'lake' if env.INFRON_API_KEY else 'mock_lake' }}"


def sample_days(today: date | None = None) -> list[str]:
    """The partition keys the scaffold writes sample rows for, oldest first (UTC days,
    as Dagster's daily partitions count them).

    Example:
        >>> from datetime import date
        >>> sample_days(date(2026, 12, 4))
        ['2026-12-02', '2026-12-03', '2026-12-04']
    """
    today = today or datetime.now(timezone.utc).date()
    return [(today - timedelta(days=n)).isoformat() for n in range(SAMPLE_DAYS - 1, -1, -1)]


class InfronBatchInferenceScaffolder(dg.Scaffolder):
    """``dg scaffold defs infron_dagster.InfronBatchInferenceComponent <path>``.

    Writes a commented ``defs.yaml`` that loads, passes ``dg check defs`` and runs as it
    is (see this module's docstring), and a few sample rows per partition to read.
    """

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = identifier(request.target_path.name)
        days = sample_days()
        if request.project_root is not None:
            data_dir = Path(request.project_root) / "data" / name
            source = f"{{{{ context.project_root }}}}/data/{name}/{{partition_key}}.parquet"
            root = "{{ context.project_root }}/.infron_data"
        else:  # outside a project: nothing to be relative to, so say where it is
            data_dir = Path(request.target_path).resolve() / "data"
            source = f"{data_dir}/{{partition_key}}.parquet"
            root = str(Path(request.target_path).resolve() / ".infron_data")
        if request.scaffold_format != "yaml" or request.append:
            scaffold_component(request, _attributes(name, source, days[0], root))
        else:
            text = _PIPELINE_DOC.format(
                type_name=request.type_name,
                name=name,
                source=source,
                start=days[0],
                root=root,
                today=days[-1],
                lake=_LAKE,
            )
            (request.target_path / "defs.yaml").write_text(
                text + _RESOURCE_DOC.format(root=root), encoding="utf-8"
            )
        _write_samples(data_dir, days)


def identifier(folder: str) -> str:
    """A folder name as a Dagster name: letters, digits and _ only.

    Example:
        >>> identifier("2nd-pipeline")
        'p_2nd_pipeline'
    """
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in folder).strip("_")
    return name if name and not name[0].isdigit() else f"p_{name}"


def _attributes(name: str, source: str, start: str, root: str) -> dict[str, object]:
    return {
        "name": name,
        "model": "openai/gpt-4o-mini-batch",
        "prompt_template": "Summarise in one sentence: {text}",
        "key_columns": ["id"],
        "params": {"max_tokens": 200},
        "source": {"parquet": source},
        "partitions": {"daily": {"start_date": start, "end_offset": 1}},
        "storage_root": f"{root}/{_LAKE}",
    }


def _write_samples(folder: Path, days: list[str]) -> None:
    """A few rows (``id``, ``text``) per day; an existing file is the user's and is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, day in enumerate(days):
        path = folder / f"{day}.parquet"
        if path.exists():
            continue
        texts = [_SAMPLE_TEXTS[(n + i) % len(_SAMPLE_TEXTS)] for i in range(_ROWS_PER_DAY)]
        ids = [f"{day}-{i:03d}" for i in range(_ROWS_PER_DAY)]
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.table({"id": ids, "text": texts}), tmp)
        tmp.replace(path)


# Written as text, not dumped, so the file explains itself to whoever opens it first.
_PIPELINE_DOC = """\
# {name}: LLM batch inference (infron-dagster), one day of rows per partition.
#
# Day one, from the project root (no key needed: see the resource below):
#   dg launch --assets {name}_batches --partition {today}
#   dg launch --assets {name}_results,{name}_failed --partition {today} \\
#     --config-json '{{"ops": {{"{name}_collect": {{"config": {{"wait_seconds": 60}}}}}}}}'
# or `dg dev`: materialize {name}_batches there, and the sensor {name}_sensor
# collects it when its batch ends.
# Results: .infron_data/mock_lake/{name}/results/ (Parquet, hive-partitioned; .../lake/
# once INFRON_API_KEY is set).
type: {type_name}

attributes:
  name: {name}
  # Infron's batch model name (-batch: billed at half price); any model id works on the
  # local server. For an OpenAI-compatible API use its own model names.
  model: openai/gpt-4o-mini-batch
  prompt_template: "Summarise in one sentence: {{text}}"
  key_columns: [id]          # identify a row for good: never paid for twice
  params: {{max_tokens: 200}}  # also bounds the worst-case cost estimate
  # One Parquet file per day. The scaffold wrote sample rows for {start} to {today} in
  # data/{name}/; point this at your own data, e.g.
  # s3://lake/events/date={{partition_key}}/*.parquet (with storage_options).
  source:
    parquet: "{source}"
  # Daily from {start}; end_offset: 1 makes today's partition exist before the day ends.
  # For a nightly run over complete days use end_offset: 0 (then today's partition appears
  # tomorrow).
  partitions: {{daily: {{start_date: "{start}", end_offset: 1}}}}
  # Unattended nights: retryable failed rows (rate limits, expiry, server errors) are sent
  # again by the sensor itself (10 min, then 30 min later), up to max_attempts attempts in
  # all; rows failed for good (invalid input, refusals) never are. On for a new pipeline, off
  # by default in the library: an upgrade never starts paying for retries nobody asked for.
  auto_retry: true
  max_attempts: 3
  # Mock answers (no key: see the resource) go to a lake of their own, so setting the key
  # later never carries a mock answer into real results.
  storage_root: "{root}/{lake}"
"""

# The resource in the same file, so the scaffold runs as written; with several pipelines,
# keep one such document (identical ones are merged, different ones are refused).
_RESOURCE_DOC = """\
---
# The `infron` resource. With $INFRON_API_KEY set (in the environment or the project's .env
# file), runs go to Infron; the key is read from the environment, never written here.
# Without it, `if_key_missing: local` sends them to the EMBEDDED LOCAL SERVER instead: mock
# answers, nothing paid, and a WARNING in every run's log saying so. The choice is made when
# the definitions load: restart `dg dev` after setting the key.
# In production write `if_key_missing: fail`: a missing key then fails instead.
type: infron_dagster.components.InfronResourceComponent
attributes:
  key: infron
  api_key_env: INFRON_API_KEY
  if_key_missing: local
  local_data_dir: "{root}/local"
"""
