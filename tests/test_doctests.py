"""Every ``>>>`` example in the package's docstrings runs, as a doctest.

An example that cannot run on its own (it needs a client, a lake, a running batch) is written
as a plain literal block instead (``Example::`` then indented code, output as ``# ->``
comments), so what a reader sees as a session is a session that passed.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import infron_dagster

# Modules whose examples are not doctests yet (owned elsewhere; their examples need a lake).
NOT_YET: set[str] = set()

_SUBMODULES = pkgutil.walk_packages(infron_dagster.__path__, "infron_dagster.")
MODULES = ["infron_dagster", *sorted(m.name for m in _SUBMODULES)]


@pytest.mark.parametrize("name", [m for m in MODULES if m not in NOT_YET])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False, verbose=False)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} docstring examples of {name} fail "
        f"(run python -m pytest {__file__} -k {name} -rA; an example that cannot run "
        "becomes a plain `Example::` block)"
    )


def test_the_curated_modules_have_examples():
    """The modules a user reads first keep examples that run."""
    for name in (
        "infron_dagster",
        "infron_dagster.errors",
        "infron_dagster.models",
        "infron_dagster.spec",
        "infron_dagster.untrusted",
        "infron_dagster.manifest",
        "infron_dagster.pricing",
        "infron_dagster.storage",
        "infron_dagster.prepare",
        "infron_dagster.local.config",
    ):
        tests = doctest.DocTestFinder().find(importlib.import_module(name))
        assert sum(len(t.examples) for t in tests) >= 3, name
