"""Run the docstring examples of every module of the distq package.

Every module is imported and its examples are run with :mod:`doctest` (``ELLIPSIS`` and
``NORMALIZE_WHITESPACE``; the globals are a copy of the module's, as in
``pytest --doctest-modules``), under JAX's default dtype and rank promotion so that the examples
read like user code (the suite's ``conftest.py`` turns the strict modes on). Every public module
(no name component starting with ``_``) that defines public functions or classes, or re-exports
them from its private submodules (``distq.nn``), must carry at least one example.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import jax
import pytest

import distq

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
SKIP = {"distq.__main__"}
#: public modules allowed to have no examples, and why
NO_EXAMPLES = {
    "distq.demo": "the demo script itself (python -m distq.demo); its functions run for ~20 s",
}


def _module_names() -> list[str]:
    names = ["distq"]
    for info in pkgutil.walk_packages(distq.__path__, prefix="distq."):
        if info.name not in SKIP:
            names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def _own_api(module) -> list:
    """The public functions and classes ``module`` defines, or re-exports from its own private
    submodules (``distq.nn.PQDense`` lives in ``distq.nn._pq_layers``)."""
    name = module.__name__
    own = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
            continue
        home = getattr(value, "__module__", None) or ""
        if home == name or home.startswith(name + "._"):
            own.append(value)
    return own


def test_every_module_is_collected():
    # a sanity check on the walk itself: the subpackages are all there
    for name in ("distq.core.spec", "distq.nn", "distq.compat.quantitizer", "distq.integrations.flax"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module, name)  # globals: a copy of the module's, as in pytest
    runner = doctest.DocTestRunner(verbose=False, optionflags=OPTIONFLAGS)  # not "-v" in argv
    report: list[str] = []
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for test in sorted(tests, key=lambda t: t.name):
            runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    if _is_public(name) and name not in NO_EXAMPLES:
        own = _own_api(module)
        # examples of names re-exported from private submodules run with those submodules
        elsewhere = sum(
            len(t.examples)
            for obj in own
            if obj.__module__ != name
            for t in finder.find(obj, obj.__name__, globs={})
        )
        assert not own or results.attempted + elsewhere > 0, (
            f"{name} has public functions or classes but no examples"
        )
