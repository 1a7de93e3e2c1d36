"""The YAML component: loaded from defs.yaml the way Dagster loads a project's defs folder.

Everything is real: a temporary dg project (``create_defs_folder_sandbox``), Dagster's own
component loader, a test instance, the embedded local batch server and Parquet files on disk.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import dagster as dg
import pandas as pd
import pyarrow.dataset as ds
import pytest
from conftest import dagster_instance
from dagster.components.testing import create_defs_folder_sandbox

from infron_dagster import (
    Budget,
    InfronResource,
    ModelPrice,
    ParquetSource,
    RequestSpec,
    build_infron_batch_assets,
)
from infron_dagster.components import InfronBatchInferenceComponent, InfronResourceComponent
from infron_dagster.components.batch_inference import Endpoint
from infron_dagster.spec import ENDPOINTS

EXAMPLE = Path(__file__).resolve().parents[1] / "example_project" / "components_example"
COMPONENT = "infron_dagster.components.InfronBatchInferenceComponent"
SCHEMA = (
    "{type: object, required: [sentiment, score], properties: "
    "{sentiment: {type: string, enum: [pos, neg]}, score: {type: number}}}"
)


def make_body(row: Mapping[str, Any]) -> dict[str, Any]:
    """A body_fn referenced from YAML as ``test_component:make_body``."""
    return {"model": "m", "messages": [{"role": "user", "content": str(row["text"])}]}


def defs_yaml(attributes: str) -> str:
    return f"type: {COMPONENT}\nattributes:\n{textwrap.indent(textwrap.dedent(attributes), '  ')}"


@contextmanager
def load_yaml(yaml_text: str) -> Iterator[tuple[InfronBatchInferenceComponent, dg.Definitions]]:
    """Write ``defs/<folder>/defs.yaml`` in a fresh dg project and load it as Dagster does."""
    with create_defs_folder_sandbox() as sandbox:
        folder = sandbox.defs_folder_path / "llm"
        folder.mkdir()
        (folder / "defs.yaml").write_text(yaml_text)
        with sandbox.load_component_and_build_defs(defs_path=folder) as (component, defs):
            assert isinstance(component, InfronBatchInferenceComponent)
            yield component, defs


def error_text(exc: BaseException | None) -> str:
    """An exception with all its causes, as a user reads the traceback."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def with_resource(
    defs: dg.Definitions, resource: InfronResource, *upstream: dg.AssetSpec
) -> dg.Definitions:
    """The component's definitions plus what a project supplies: the resource, the upstream."""
    extra = dg.Definitions(assets=upstream, resources={"infron": resource})
    return dg.Definitions.merge(defs, extra)


@pytest.fixture
def resource(local_dir) -> InfronResource:
    return InfronResource(base_url=f"local://{local_dir}", max_retries=3)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dagster_instance() as inst:
        yield inst


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partitions_yaml", "expected"),
    [
        (
            "partitions: {daily: {start_date: 2026-11-01}}",
            dg.DailyPartitionsDefinition(start_date="2026-11-01"),
        ),
        ("partitions: {static: [a, b]}", dg.StaticPartitionsDefinition(["a", "b"])),
        (
            "partitions: {hourly: {start_date: '2026-11-01-00:00', timezone: Europe/Paris}}",
            dg.HourlyPartitionsDefinition(start_date="2026-11-01-00:00", timezone="Europe/Paris"),
        ),
        ("partitions: {dynamic: shops}", dg.DynamicPartitionsDefinition(name="shops")),
        ("", None),
    ],
    ids=["daily", "static", "hourly", "dynamic", "unpartitioned"],
)
def test_yaml_builds_every_definition_with_its_partitions(partitions_yaml, expected, resource):
    yaml_text = defs_yaml(
        f"""
        name: sentiment
        model: gpt-4o-mini
        prompt_template: "Sentiment of {{text}}"
        key_columns: [id]
        source: {{asset_key: raw/reviews}}
        group_name: llm
        {partitions_yaml}
        """
    )
    with load_yaml(yaml_text) as (component, defs):
        assert component.request_spec().prompt_template == "Sentiment of {text}"
        assert component.source == dg.AssetKey(["raw", "reviews"])
        full = with_resource(defs, resource, dg.AssetSpec(["raw", "reviews"]))
        for suffix in ("batches", "results", "failed"):
            spec = full.resolve_assets_def(f"sentiment_{suffix}").specs_by_key[
                dg.AssetKey(f"sentiment_{suffix}")
            ]
            assert spec.partitions_def == expected
            assert spec.group_name == "llm"
        batches = full.resolve_assets_def("sentiment_batches")
        assert batches.asset_deps[batches.key] == {dg.AssetKey(["raw", "reviews"])}
        assert full.resolve_sensor_def("sentiment_sensor").name == "sentiment_sensor"
        assert full.resolve_job_def("sentiment_retry").partitions_def == expected


def test_yaml_attributes_reach_the_factory():
    yaml_text = defs_yaml(
        """
        name: emb
        model: text-embedding-3-small
        endpoint: /v1/embeddings
        prompt_template: "{title}: {body} {{literal}}"
        system_prompt: "Be {{ brief }}"
        key_columns: doc_id
        params: {dimensions: 8}
        source: {parquet: "/data/docs/{partition_key}.parquet", storage_options: {anon: true}}
        partitions: {weekly: {start_date: "2026-11-02", day_offset: 1}}
        storage_root: /lake
        storage_options: {auto_mkdir: true}
        keep_columns: [doc_id]
        max_requests_per_batch: 10
        max_bytes_per_batch: 1000000
        max_attempts: 5
        max_failure_rate: 0.2
        resource_key: my_infron
        sensor_interval_seconds: 60
        sensor_default_status: stopped
        """
    )
    with load_yaml(yaml_text) as (component, defs):
        spec = component.request_spec()
        assert (spec.model, spec.endpoint, spec.key_columns) == (
            "text-embedding-3-small",
            "/v1/embeddings",
            ("doc_id",),
        )
        # Prompts are literal: Jinja does not touch {{ }}, which RequestSpec reads as braces.
        assert spec.prompt_template == "{title}: {body} {{literal}}"
        assert spec.system_prompt == "Be {{ brief }}"
        assert spec.params == {"dimensions": 8}
        assert component.source == ParquetSource(
            "/data/docs/{partition_key}.parquet", {"anon": True}
        )
        pipeline = component.build_pipeline()
        assert str(pipeline.storage.base) == "/lake/emb"
        assert "my_infron" in pipeline.batches_asset.required_resource_keys
        assert pipeline.sensor.minimum_interval_seconds == 60
        assert pipeline.sensor.default_status == dg.DefaultSensorStatus.STOPPED
        assert isinstance(pipeline.batches_asset.partitions_def, dg.WeeklyPartitionsDefinition)
        assert "emb_sensor" in {s.name for s in defs.sensors or []}


def test_yaml_scheduling_options_reach_the_assets():
    yaml_text = defs_yaml(
        """
        name: nightly
        model: m
        prompt_template: "{text}"
        source: reviews
        partitions: {daily: {start_date: 2026-11-01}}
        automation_condition: "{{ automation_condition.on_cron('0 2 * * *') }}"
        backfill_policy: {type: single_run}
        pool: infron_provider
        price: {input_per_million: 0.15, output_per_million: 0.6}
        budget: {max_cost_per_day: 20}
        owners: [team:analytics]
        tags: {tier: nightly}
        """
    )
    with load_yaml(yaml_text) as (component, _):
        pipeline = component.build_pipeline()
        batches = pipeline.batches_asset
        condition = batches.automation_conditions_by_key[batches.key]
        assert condition == dg.AutomationCondition.on_cron("0 2 * * *")
        assert batches.backfill_policy == dg.BackfillPolicy.single_run()
        assert batches.op.pool == pipeline.collect_assets.op.pool == "infron_provider"
        assert batches.specs_by_key[batches.key].owners == ["team:analytics"]
        assert batches.specs_by_key[batches.key].tags["tier"] == "nightly"
        assert component.price == ModelPrice(input_per_million=0.15, output_per_million=0.6)
        assert component.budget == Budget(max_cost_per_day=20)


def test_body_fn_from_an_import_path():
    yaml_text = defs_yaml(
        """
        name: custom
        model: m
        body_fn: "test_component:make_body"
        source: reviews
        """
    )
    with load_yaml(yaml_text) as (component, _):
        assert component.request_spec().body_fn is make_body
        assert component.source == dg.AssetKey("reviews")


def test_component_from_python_and_its_yaml_schema():
    component = InfronBatchInferenceComponent(
        name="py",
        model="gpt-4o-mini",
        prompt_template="{text}",
        source=ParquetSource("/tmp/{partition_key}.parquet"),
        partitions=dg.StaticPartitionsDefinition(["a"]),
    )
    defs = dg.build_defs_for_component(component)
    keys = {key for a in defs.assets or [] for key in a.keys}  # type: ignore[union-attr]
    assert keys == {dg.AssetKey(f"py_{s}") for s in ("batches", "results", "failed")}
    properties = InfronBatchInferenceComponent.model().model_json_schema()["properties"]
    assert {"model", "prompt_template", "source", "partitions"} <= set(properties)
    assert "llm_model" not in properties
    assert set(get_args(Endpoint)) == set(ENDPOINTS)


def test_dg_scaffold_writes_a_loadable_defs_yaml():
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(component_cls=InfronBatchInferenceComponent)
        with sandbox.load_component_and_build_defs(defs_path=path) as (composite, defs):
            pipeline, resource = composite.components  # the pipeline and its resource
            assert isinstance(pipeline, InfronBatchInferenceComponent)
            assert isinstance(resource, InfronResourceComponent)
            assert pipeline.name == path.name  # named after its folder, not made up
            assert isinstance(pipeline.source, ParquetSource)  # no upstream asset to invent
            assert f"{path.name}_sensor" in {s.name for s in defs.sensors or []}
            assert "infron" in (defs.resources or {})


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ("name: x\nprompt_template: '{t}'\nsource: a", "model\n  Field required"),
        ("name: x\nmodel: m\nsource: a", "give exactly one of prompt_template and body_fn"),
        (
            "name: x\nmodel: m\nprompt_template: '{t}'\nbody_fn: 'test_component:make_body'\n"
            "source: a",
            "give exactly one of prompt_template and body_fn",
        ),
        (
            "name: x\nmodel: m\nprompt_template: '{t}'\nsource: {asset_key: a, parquet: /p}",
            "give exactly one of `asset_key` and `parquet`",
        ),
        (
            "name: x\nmodel: m\nprompt_template: '{t}'\nsource: a\n"
            "partitions: {daily: {start_date: 2026-11-01}, static: [a]}",
            "partitions: give exactly one of hourly, daily, weekly, monthly, static, dynamic",
        ),
        (
            "name: x\nmodel: m\nprompt_template: '{t}'\nsource: a\nendpoint: /v1/completions",
            "Input should be '/v1/chat/completions', '/v1/embeddings' or '/v1/responses'",
        ),
        ("name: x\nmodel: m\nprompt_templte: '{t}'\nsource: a", "Extra inputs are not permitted"),
        (
            "name: x\nmodel: m\nprompt_template: '{t}'\nsource: a\nmax_failure_rate: 2",
            "max_failure_rate must be between 0 and 1",
        ),
    ],
    ids=[
        "missing-model",
        "no-prompt",
        "prompt-and-body-fn",
        "two-sources",
        "two-partitions",
        "bad-endpoint",
        "typo",
        "bad-rate",
    ],
)
def test_invalid_yaml_fails_clearly(attributes, message):
    with pytest.raises(Exception) as raised, load_yaml(defs_yaml(attributes)):
        pass
    assert message in error_text(raised.value)


# --- end to end --------------------------------------------------------------------------


def write_reviews(folder: Path, partition: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        {
            "id": range(n),
            "text": [f"{partition} review {i}" if i != 3 else None for i in range(n)],
            "stars": 4,
        }
    )
    frame.to_parquet(folder / f"{partition}.parquet")


def test_yaml_pipeline_end_to_end_on_parquet(tmp_path, resource, instance):
    write_reviews(tmp_path / "reviews", "a", 12)
    yaml_text = defs_yaml(
        f"""
        name: rev
        model: gpt-4o-mini
        prompt_template: "Sentiment of {{text}}"
        key_columns: [id]
        response_schema: {SCHEMA}
        source: {{parquet: "{tmp_path}/reviews/{{partition_key}}.parquet"}}
        partitions: {{static: [a, b]}}
        storage_root: "{tmp_path}/lake"
        keep_columns: [id, stars]
        max_requests_per_batch: 5
        """
    )
    with load_yaml(yaml_text) as (_, defs):
        full = with_resource(defs, resource)
        job = full.resolve_implicit_global_asset_job_def()
        submitted = job.execute_in_process(
            partition_key="a", asset_selection=[dg.AssetKey("rev_batches")], instance=instance
        )
        (materialization,) = submitted.asset_materializations_for_node("rev_batches")
        assert materialization.metadata["chunks"].value == 3
        assert materialization.metadata["invalid_rows"].value == 1

        # The sensor asks for the collection run; run exactly what it asked for.
        context = dg.build_sensor_context(
            instance=instance, definitions=full, resources={"infron": resource}
        )
        tick = full.resolve_sensor_def("rev_sensor")(context)
        (request,) = tick.run_requests
        assert request.partition_key == "a"
        assert set(request.asset_selection) == {
            dg.AssetKey("rev_results"),
            dg.AssetKey("rev_failed"),
        }
        collected = job.execute_in_process(
            partition_key="a", asset_selection=request.asset_selection, instance=instance
        )
        assert collected.success
        checks = {c.check_name: c.passed for c in collected.get_asset_check_evaluations()}
        assert checks == {"completeness": True, "failure_rate": False}  # 1 of 12 > 5%

    results = ds.dataset(str(tmp_path / "lake" / "rev" / "results"), partitioning="hive").to_table()
    failed = ds.dataset(str(tmp_path / "lake" / "rev" / "failed"), partitioning="hive").to_table()
    assert results.num_rows == 11 and failed.num_rows == 1
    assert {"id", "stars", "sentiment", "score"} <= set(results.column_names)
    assert set(results.column("partition").to_pylist()) == {"a"}
    assert failed.column("error_code").to_pylist() == ["invalid_input"]


def test_example_project_component_runs(tmp_path, local_dir, instance, monkeypatch):
    monkeypatch.setenv("INFRON_LOCAL_DATA_DIR", local_dir)
    monkeypatch.setenv("INFRON_STORAGE_ROOT", str(tmp_path / "lake"))
    monkeypatch.delenv("INFRON_API_KEY", raising=False)
    monkeypatch.delenv("INFRON_BASE_URL", raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE))  # as dg does: the project folder is on the path
    defs = dg.load_from_defs_folder(path_within_project=EXAMPLE / "review_components")
    keys = {"reviews", "review_sentiment_batches", "review_sentiment_results"}
    assert keys <= {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert defs.resources["infron"].is_local  # from defs/infron/defs.yaml, no key set
    job = defs.resolve_implicit_global_asset_job_def()
    day = "2026-11-02"
    submit = [dg.AssetKey("reviews"), dg.AssetKey("review_sentiment_batches")]
    assert job.execute_in_process(partition_key=day, asset_selection=submit, instance=instance)
    collect = [dg.AssetKey("review_sentiment_results"), dg.AssetKey("review_sentiment_failed")]
    result = job.execute_in_process(partition_key=day, asset_selection=collect, instance=instance)
    rows = {
        m.asset_key.to_user_string(): m.metadata["dagster/row_count"].value
        for m in result.asset_materializations_for_node("review_sentiment_collect")
    }
    assert rows["review_sentiment_results"] + rows["review_sentiment_failed"] == 36
    assert rows["review_sentiment_failed"] >= 1  # the empty review, as invalid_input


@pytest.mark.parametrize(
    ("option", "value", "wrong"),
    [("reuse_answers", "pipeline", "everywhere"), ("on_changed_input_in_flight", "cancel", "drop")],
)
def test_carry_options_are_checked_and_reach_the_factory(option, value, wrong, monkeypatch):
    with pytest.raises(ValueError, match=option):
        build_infron_batch_assets(
            name="rev",
            spec=RequestSpec(model="m", prompt_template="{text}", key_columns="id"),
            source="reviews",
            **{option: wrong},
        )
    import infron_dagster.components.batch_inference as component_module

    seen: dict[str, Any] = {}
    real = component_module.build_infron_batch_assets

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(component_module, "build_infron_batch_assets", spy)
    text = defs_yaml(
        f"""
        name: rev
        model: m
        prompt_template: "{{text}}"
        source: reviews
        {option}: {value}
        """
    )
    with load_yaml(text) as (component, _):
        assert getattr(component, option) == value
    assert seen[option] == value
