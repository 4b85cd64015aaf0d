"""Every hook in octopusd/hookspecs.py is a documented pluggy hookspec and is tested somewhere.

The same kind of check as datasette's tests/test_docs.py: adding a hook without an example in its
docstring, or without a test that names it, fails here.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from octopusd import hookspecs

TESTS = Path(__file__).resolve().parent
HOOKS = sorted(name for name, obj in vars(hookspecs).items()
               if name.startswith("octopus_") and inspect.isfunction(obj))


def test_hookspecs_declares_one_registry_hook_per_plugin_kind():
    """The module declares the four registry hooks (aggregators, datasets, models, launchers)."""
    assert HOOKS == ["octopus_register_aggregators", "octopus_register_datasets",
                     "octopus_register_launchers", "octopus_register_models"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_a_pluggy_hookspec(hook):
    """Each octopus_* function carries the octopusd hookspec marker."""
    fn = getattr(hookspecs, hook)
    assert getattr(fn, f"{hookspecs.PROJECT}_spec", None) is not None


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_takes_a_registry(hook):
    """Each registry hook takes exactly one parameter, ``register``."""
    assert list(inspect.signature(getattr(hookspecs, hook)).parameters) == ["register"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docstring_has_an_example(hook):
    """Each hookspec's docstring contains an 'Example' showing its use."""
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert "Example" in doc
    assert f"def {hook}(register)" in doc, "the example should implement the hook itself"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_some_test(hook):
    """Each hook name appears in at least one test file other than this one."""
    others = [p for p in sorted(TESTS.rglob("test_*.py")) if p.resolve() != Path(__file__).resolve()]
    assert [p.name for p in others if hook in p.read_text(encoding="utf-8")], \
        f"no test under tests/ mentions {hook}"
