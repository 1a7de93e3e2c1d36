"""``dg`` as the README documents it: the real CLI, in subprocesses, on real project folders.

A freshly scaffolded pipeline passes ``dg check defs`` as written, and so does the example
project in ``example_project/components_example``. The resource is configured from YAML with
the key's environment variable name, never the key.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest

from infron_dagster.components import InfronResourceComponent

DG = str(Path(sys.executable).with_name("dg"))
EXAMPLE = Path(__file__).resolve().parents[1] / "example_project" / "components_example"
COMPONENT = "infron_dagster.components.InfronBatchInferenceComponent"


def _dg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1", "DG_DISABLE_TELEMETRY": "1"}
    env.pop("INFRON_BASE_URL", None)
    env.pop("DAGSTER_HOME", None)
    return subprocess.run(
        [DG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )


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


@pytest.mark.parametrize("pasted", ["sk-live-abc123", "Bearer abc", "abc def"])
def test_a_key_pasted_as_the_variable_name_is_refused_without_echoing_it(pasted):
    with pytest.raises(ValueError, match="NAME of an environment variable") as raised:
        InfronResourceComponent(api_key_env=pasted)
    assert pasted not in str(raised.value)
