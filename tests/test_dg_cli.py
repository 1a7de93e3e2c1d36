"""``dg`` as the README documents it: the real CLI, in subprocesses, on real project folders.

Day one: in a project made by ``create-dagster``, a freshly scaffolded pipeline runs today
with no key (the embedded local server, said in every run's log) and its results exist. A
scaffold passes ``dg check defs`` as written, and so does the example project in
``example_project/components_example``. The resource is configured from YAML with the key's
environment variable name, never the key.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import INSTANT
from dagster.components.testing import create_defs_folder_sandbox

from infron_dagster.components import InfronBatchInferenceComponent, InfronResourceComponent
from infron_dagster.components.scaffold import sample_days
from infron_dagster.local.config import LocalServerConfig, save_config
from infron_dagster.resources import LOCAL_SERVER_WARNING

BIN = Path(sys.executable).parent
DG = str(BIN / "dg")
EXAMPLE = Path(__file__).resolve().parents[1] / "example_project" / "components_example"
COMPONENT = "infron_dagster.components.InfronBatchInferenceComponent"
TOP_LEVEL_COMPONENT = "infron_dagster.InfronBatchInferenceComponent"  # as the README writes it


def _dg(
    *args: str, cwd: Path, program: str = DG, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1", "DG_DISABLE_TELEMETRY": "1"}
    env["DAGSTER_DG_UPDATE_CHECK_ENABLED"] = "0"  # create-dagster asks PyPI for a newer self
    for name in ("INFRON_BASE_URL", "DAGSTER_HOME", "INFRON_API_KEY", "INFRON_LOCAL_DATA_DIR"):
        env.pop(name, None)
    env.update(extra_env)
    return subprocess.run(
        [program, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _empty_project(root: Path) -> Path:
    """What ``dg scaffold project`` lays out, minus the virtualenv it would create."""
    (root / "my_proj" / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [project]
            name = "my-proj"
            version = "0.1.0"

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "my_proj"
            """
        )
    )
    (root / "my_proj" / "__init__.py").write_text("")
    (root / "my_proj" / "defs" / "__init__.py").write_text("")
    (root / "my_proj" / "definitions.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs():
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    return root


def test_a_scaffolded_pipeline_passes_dg_check_defs_as_written(tmp_path):
    project = _empty_project(tmp_path / "proj")
    for folder in ("review_sentiment", "2nd-pipeline"):  # two pipelines share one resource
        scaffolded = _dg("scaffold", "defs", COMPONENT, folder, cwd=project)
        assert scaffolded.returncode == 0, scaffolded.stdout + scaffolded.stderr

    yaml_text = (project / "my_proj" / "defs" / "review_sentiment" / "defs.yaml").read_text()
    assert "name: review_sentiment" in yaml_text
    assert "api_key_env: INFRON_API_KEY" in yaml_text
    checked = _dg("check", "defs", cwd=project)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully." in checked.stdout

    listed = _dg("list", "defs", "--json", cwd=project)
    assert listed.returncode == 0, listed.stderr
    for name in ("review_sentiment_batches", "p_2nd_pipeline_results"):
        assert name in listed.stdout


def test_day_one_a_scaffolded_pipeline_runs_today_with_no_key(tmp_path):
    """The README's "Day one with dg", command by command: create-dagster, dg scaffold,
    dg launch of the submit asset for today, dg launch of the collect assets; the results
    exist and each run's log says once that it ran on the embedded local server."""
    _ok(
        _dg("project", "--no-uv-sync", "day_one", cwd=tmp_path, program=str(BIN / "create-dagster"))
    )
    project = tmp_path / "day_one"
    _ok(_dg("scaffold", "defs", TOP_LEVEL_COMPONENT, "nightly_labels", cwd=project))
    samples = sorted((project / "data" / "nightly_labels").glob("*.parquet"))
    today = samples[-1].stem  # the scaffold's today (UTC), even if the test spans midnight
    assert [p.stem for p in samples] == sample_days(date.fromisoformat(today))
    assert today >= (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    # The README's `pip install -e .` of the new project, without building it into this venv.
    # INSTANT: batches end as soon as they are created (the default takes a few seconds).
    save_config(project / ".infron_data" / "local", LocalServerConfig(**INSTANT))
    src = {"PYTHONPATH": os.pathsep.join([str(project / "src"), os.environ.get("PYTHONPATH", "")])}

    submitted = _ok(
        _dg(
            "launch", "--assets", "nightly_labels_batches", "--partition", today, cwd=project, **src
        )
    )
    collect_config = {"ops": {"nightly_labels_collect": {"config": {"wait_seconds": 60}}}}
    collected = _ok(
        _dg(
            "launch",
            "--assets",
            "nightly_labels_results,nightly_labels_failed",
            "--partition",
            today,
            "--config-json",
            json.dumps(collect_config),
            cwd=project,
            **src,
        )
    )

    for run_log in (submitted, collected):
        warnings = [line for line in run_log.splitlines() if LOCAL_SERVER_WARNING in line]
        assert len(warnings) == 1, run_log  # one loud line per run, in the run's own log
        assert " WARNING " in warnings[0]
    lake = project / ".infron_data" / "mock_lake" / "nightly_labels"
    results = pq.read_table(lake / "results" / f"partition={today}").to_pylist()
    inputs = pq.read_table(samples[-1]).to_pylist()
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in inputs)
    assert all(r["response_text"] for r in results)
    assert pq.read_table(lake / "failed" / f"partition={today}").num_rows == 0
    assert not (project / ".infron_data" / "lake").exists()  # mock answers stay apart


def test_the_scaffold_covers_today_and_switches_to_the_real_api_when_the_key_is_set(monkeypatch):
    monkeypatch.delenv("INFRON_API_KEY", raising=False)
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(component_cls=InfronBatchInferenceComponent)
        days = sample_days()
        with sandbox.load_component_and_build_defs(defs_path=path) as (composite, _):
            pipeline, resource = composite.components
            keys = pipeline.partitions.get_partition_keys()
            assert keys == days  # two days ago to today (UTC): each has its sample file
            for day in days:
                assert (sandbox.project_root / "data" / path.name / f"{day}.parquet").exists()
            built = resource.build_resource()
            assert built.is_local and built.api_key is None
            assert pipeline.storage_root.endswith("/.infron_data/mock_lake")
            assert pipeline.auto_retry and pipeline.max_attempts == 3  # a night needs no human
            assert built.local_data_dir == f"{sandbox.project_root.resolve()}/.infron_data/local"

        monkeypatch.setenv("INFRON_API_KEY", "sk-day-two")
        with sandbox.load_component_and_build_defs(defs_path=path) as (composite, defs):
            pipeline, resource = composite.components
            built = resource.build_resource()
            assert not built.is_local
            assert isinstance(built.api_key, dg.EnvVar)  # the name, not the value
            assert "sk-day-two" not in repr(defs.resources)
            assert pipeline.storage_root.endswith("/.infron_data/lake")


def test_the_example_component_project_passes_dg_check_defs_without_warnings():
    checked = _dg("check", "defs", cwd=EXAMPLE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully." in checked.stdout
    assert "code location" not in (checked.stdout + checked.stderr).lower()


def test_the_resource_reads_its_key_from_the_named_variable_at_run_time(monkeypatch):
    monkeypatch.setenv("MY_INFRON_KEY", "sk-from-the-environment")
    component = InfronResourceComponent(api_key_env="MY_INFRON_KEY")
    resource = component.build_resource()
    assert not resource.is_local
    defs = dg.Definitions(resources={"infron": resource})
    # The definition holds the variable's name; the value appears only once resolved.
    assert "sk-from-the-environment" not in repr(defs.resources)
    with dg.build_resources({"infron": resource}) as built:
        assert built.infron.api_key == "sk-from-the-environment"


def test_identical_resource_yaml_is_one_object_and_local_needs_no_key():
    first = InfronResourceComponent(api_key_env="INFRON_API_KEY").build_resource()
    assert InfronResourceComponent(api_key_env="INFRON_API_KEY").build_resource() is first
    other = InfronResourceComponent(api_key_env="INFRON_API_KEY", api_style="openai")
    assert other.build_resource() is not first
    local = InfronResourceComponent(api_key_env="INFRON_API_KEY", base_url="local")
    assert local.build_resource().is_local
    assert local.build_resource().api_key is None  # no variable needed for the local server


def test_if_key_missing_local_uses_the_local_server_only_while_the_variable_is_unset(
    monkeypatch, caplog
):
    monkeypatch.delenv("DAY_ONE_KEY", raising=False)
    default = InfronResourceComponent(api_key_env="DAY_ONE_KEY").build_resource()
    assert not default.is_local  # the default fails the run instead (a missing secret)
    assert isinstance(default.api_key, dg.EnvVar)

    fallback = InfronResourceComponent(api_key_env="DAY_ONE_KEY", if_key_missing="local")
    with caplog.at_level(logging.WARNING, logger="infron_dagster.components.resource"):
        assert fallback.build_resource().is_local
    assert "$DAY_ONE_KEY is not set" in caplog.text
    assert "EMBEDDED LOCAL SERVER" in caplog.text

    monkeypatch.setenv("DAY_ONE_KEY", "")
    assert fallback.build_resource().is_local  # empty is unset, as the scaffold's lake says
    monkeypatch.setenv("DAY_ONE_KEY", "sk-real")
    real = fallback.build_resource()
    assert not real.is_local and isinstance(real.api_key, dg.EnvVar)


@pytest.mark.parametrize("pasted", ["sk-live-abc123", "Bearer abc", "abc def"])
def test_a_key_pasted_as_the_variable_name_is_refused_without_echoing_it(pasted):
    with pytest.raises(ValueError, match="NAME of an environment variable") as raised:
        InfronResourceComponent(api_key_env=pasted)
    assert pasted not in str(raised.value)
