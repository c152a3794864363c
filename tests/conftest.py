"""Shared pytest configuration for the distq tests (kept minimal on purpose)."""

from hypothesis import HealthCheck, settings

# JAX compiles on first use, so a single example can take far longer than hypothesis' default
# deadline; keep the example count small enough for the suite's time budget.
settings.register_profile(
    "distq",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("distq")
