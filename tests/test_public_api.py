"""One public face: ``infron_dagster`` (the top level) is the public API.

``__all__`` is pinned; every name in it is importable, documented with an example; and
``docs/reference.md`` is held to the code: every public name it shows in backticks is
importable from ``infron_dagster``, it points at no internal submodule, and every parameter
of the public factories and settings classes is on the page. The two factories have an
``Args:`` section naming each parameter.

Adding a public name: add it to ``__all__`` and to ``PUBLIC`` here, give it a docstring with
an example, and document it in docs/reference.md.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import infron_dagster
from infron_dagster.errors import InfronDagsterError

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"

PUBLIC = [
    "DEFAULT_BASE_URL",
    "DEFAULT_INFRON_MAX_TOKENS",
    "DEFAULT_MAX_LINE_BYTES",
    "ApiStyle",
    "Batch",
    "BatchCancel",
    "BatchStatus",
    "BatchStorage",
    "Budget",
    "BudgetExceeded",
    "CancelOutcome",
    "ChunkRecord",
    "CollectConfig",
    "CollectOutcome",
    "CostEstimate",
    "DoctorReport",
    "Finding",
    "InfronAuthError",
    "InfronBadRequestError",
    "InfronBatchInferenceComponent",
    "InfronBatchPipeline",
    "InfronClient",
    "InfronConnectionError",
    "InfronDagsterError",
    "InfronError",
    "InfronInsufficientCreditsError",
    "InfronNotFoundError",
    "InfronProtocolError",
    "InfronRateLimitError",
    "InfronResource",
    "InfronResourceComponent",
    "InfronServerError",
    "InfronTableIOManager",
    "InputError",
    "LocalServerConfig",
    "LockTimeout",
    "Manifest",
    "MissingPartitionError",
    "ModelPrice",
    "ParquetInput",
    "ParquetSource",
    "PreparedRequests",
    "RequestSpec",
    "ResultFile",
    "RetryPolicy",
    "SpendLedger",
    "SubmitConfig",
    "SubmitIncomplete",
    "SubmitOutcome",
    "build_cancel_job",
    "build_collect_checks",
    "build_infron_batch_assets",
    "build_infron_batch_sensor",
    "cancel_partition",
    "check_lake",
    "collect_partition",
    "create_app",
    "embedded_client",
    "estimate_cost",
    "make_custom_id",
    "normalise_status",
    "prepare_requests",
    "read_batch_table",
    "submit_prepared",
]


def page() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def backticked() -> list[str]:
    return re.findall(r"`([^`\n]+)`", page().replace("\n  ", " "))


def test_all_is_pinned():
    assert sorted(infron_dagster.__all__) == sorted(PUBLIC)
    assert len(set(infron_dagster.__all__)) == len(infron_dagster.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_importable_and_has_an_example(name):
    obj = getattr(infron_dagster, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        # A constant or a type alias has no docstring of its own: the page documents it.
        assert re.search(rf"`[^`]*\b{name}\b", page()), f"{name} is not on docs/reference.md"
        return
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    assert ">>>" in doc or "Example" in doc, f"{name}'s docstring has no example"


def _package_names() -> set[str]:
    """Every name a module of the package exports in its own ``__all__``."""
    names: set[str] = set()
    for info in pkgutil.walk_packages(infron_dagster.__path__, "infron_dagster."):
        names.update(getattr(importlib.import_module(info.name), "__all__", ()))
    return names


def documented_names() -> set[str]:
    """The names the page presents as API: the identifier a backticked span starts with when
    it is a call, a CamelCase or CONSTANT name, or a name a module of the package exports;
    and any CamelCase name inside a span (a return type, a base class)."""
    defined = _package_names()
    found: set[str] = set()
    for span in backticked():
        head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", span)
        if head and not span.startswith(("dg.", "infron_dagster.", "infron-")):
            name = head.group(0)
            rest = span[head.end() :]
            camel = re.fullmatch(r"[A-Z][a-z0-9]+[A-Z][a-z]\w*", name)
            constant = re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", name)
            if rest.startswith("(") or camel or constant or name in defined:
                found.add(name)
        for word in re.finditer(r"(?<![.\w])([A-Z][a-z0-9]+[A-Z][a-z]\w*)", span):
            found.add(word.group(1))
    return {n for n in found if not hasattr(builtins, n)}


def test_every_name_the_reference_documents_is_importable_from_the_top_level():
    missing = sorted(n for n in documented_names() if n not in infron_dagster.__all__)
    assert not missing, f"docs/reference.md documents names not in infron_dagster: {missing}"


def test_the_reference_points_at_no_internal_module():
    paths = [s for s in backticked() if s.startswith("infron_dagster.")]
    # The YAML type of a component is a dotted path by Dagster's convention.
    internal = [p for p in paths if not p.startswith("infron_dagster.components.Infron")]
    assert not internal, internal


def test_the_reference_documents_every_public_name():
    text = page()
    undocumented = [n for n in PUBLIC if not re.search(rf"`[^`]*\b{n}\b", text)]
    assert not undocumented, f"not on docs/reference.md: {undocumented}"


def _parameters(obj: object) -> list[str]:
    if inspect.isclass(obj) and hasattr(obj, "model_fields"):
        return list(obj.model_fields)
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return list(inspect.signature(obj).parameters)


@pytest.mark.parametrize(
    "name",
    [
        "build_infron_batch_assets",
        "build_infron_batch_sensor",
        "InfronResource",
        "RequestSpec",
        "SubmitConfig",
        "CollectConfig",
        "ModelPrice",
        "Budget",
        "ParquetSource",
    ],
)
def test_every_parameter_of_the_public_factories_is_on_the_page(name):
    text = page()
    params = _parameters(getattr(infron_dagster, name))
    assert params
    missing = [p for p in params if not re.search(rf"\b{p}\b", text)]
    assert not missing, f"{name}: parameters not on docs/reference.md: {missing}"


@pytest.mark.parametrize("name", ["build_infron_batch_assets", "build_infron_batch_sensor"])
def test_the_factories_have_an_args_section_naming_every_parameter(name):
    factory = getattr(infron_dagster, name)
    doc = inspect.getdoc(factory) or ""
    assert "\nArgs:\n" in doc, f"{name} has no Args: section"
    section = doc.split("\nArgs:\n", 1)[1]
    section = re.split(r"\n\S", section, maxsplit=1)[0]  # up to the next unindented line
    named = re.findall(r"^    (\w+):", section, flags=re.M)
    assert named == list(inspect.signature(factory).parameters)


# The error tree drawn in errors.py: every error under one base, stdlib bases kept.
ERROR_TREE = {
    "InfronError": (Exception,),
    "InfronAuthError": ("InfronError",),
    "InfronInsufficientCreditsError": ("InfronError",),
    "InfronBadRequestError": ("InfronError",),
    "InfronNotFoundError": ("InfronError",),
    "InfronRateLimitError": ("InfronError",),
    "InfronServerError": ("InfronError",),
    "InfronConnectionError": ("InfronError",),
    "InfronProtocolError": ("InfronError",),
    "InputError": (ValueError,),
    "BudgetExceeded": (RuntimeError,),
    "SubmitIncomplete": (RuntimeError,),
    "LockTimeout": (RuntimeError,),
    "MissingPartitionError": (FileNotFoundError,),
}


@pytest.mark.parametrize("name", sorted(ERROR_TREE))
def test_every_error_sits_under_one_base_and_keeps_its_stdlib_base(name):
    cls = getattr(infron_dagster, name)
    assert issubclass(cls, InfronDagsterError)
    for base in ERROR_TREE[name]:
        parent = getattr(infron_dagster, base) if isinstance(base, str) else base
        assert issubclass(cls, parent), (name, parent)


def test_the_error_tree_is_drawn_in_the_errors_module():
    from infron_dagster import errors

    doc = errors.__doc__ or ""
    for name in ["InfronDagsterError", *ERROR_TREE]:
        assert re.search(rf"[─└├]── {name}\b", doc), f"{name} is not in errors.py's tree"
    assert issubclass(InfronDagsterError, Exception)
    assert infron_dagster.InfronDagsterError is InfronDagsterError


def test_an_input_error_is_caught_by_the_base_and_by_its_stdlib_base():
    for catch in (InfronDagsterError, ValueError):
        with pytest.raises(catch):
            raise infron_dagster.InputError("key column 'id' is not in the input")
