"""Shared pytest configuration for the distq tests.

Strict dtype promotion and rank-promotion errors are on for the whole suite (as in equinox):
silent upcasts and accidental broadcasting are the classic bugs of quantisation code, and the
library must not rely on them.
"""

import gc

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# JAX compiles on first use, so a single example can take far longer than hypothesis' default
# deadline; keep the example count small enough for the suite's time budget.
settings.register_profile(
    "distq",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("distq")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # every compiled XLA:CPU program keeps its own code mappings; a worker that has compiled a
    # few thousand of them crashed while compiling the next (always late in a run, in whatever
    # test came then). Programs are rarely shared between test modules: free them after each.
    yield
    jax.clear_caches()
    gc.collect()
