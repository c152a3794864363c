"""Input validation shared by the public entry points (private)."""

from __future__ import annotations

import numbers

import numpy as np


def is_concrete(x) -> bool:
    """``False`` for values that are being traced (inside ``jit``/``vmap``)."""
    import jax  # noqa: PLC0415 (specs validate their fields without JAX)

    return not isinstance(x, jax.core.Tracer)


def as_float_array(x, name: str = "x") -> jax.Array:
    """Converts to a JAX array and checks dtype, emptiness and (when concrete) finiteness."""
    import jax  # noqa: PLC0415 (specs validate their fields without JAX)
    import jax.numpy as jnp  # noqa: PLC0415
    import ml_dtypes  # noqa: PLC0415

    if hasattr(x, "__array_namespace__") or isinstance(x, (np.ndarray, jax.Array)):
        pass
    elif isinstance(x, (list, tuple, numbers.Number)):
        x = np.asarray(x)
    elif hasattr(x, "numpy") and hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    dt = np.dtype(getattr(x, "dtype", np.float32))
    if not np.issubdtype(dt, np.floating) and dt != ml_dtypes.bfloat16:
        raise TypeError(f"{name} must have a floating-point dtype, got {dt}")
    if int(np.prod(np.shape(x))) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(np.shape(x))}); nothing to quantise")
    arr = jnp.asarray(x)
    if is_concrete(arr) and not bool(jnp.all(jnp.isfinite(arr))):
        bad = int(jnp.sum(~jnp.isfinite(arr)))
        raise ValueError(
            f"{name} contains {bad} NaN/inf value(s); quantisation needs finite input "
            "(mask or replace them first)"
        )
    return arr


def check_bits(bits, name: str = "bits", lo: int = 1, hi: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {lo}..{hi}, got {bits!r}")
    if not lo <= int(bits) <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {bits}")
    return int(bits)


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in ``lo..hi`` (``hi=None``: no upper bound), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {span}, got {value}")
    return int(value)


def check_choice(value, name: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {sorted(map(str, allowed))}")
