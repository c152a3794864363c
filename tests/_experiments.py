"""Loads a script of ``experiments/`` as a module, for the tests that check its functions."""

import importlib.util
import os
import sys

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def load(name: str):
    """``experiments/<name>.py`` as the module ``name`` (registered in ``sys.modules``:
    dataclasses and process pools look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
