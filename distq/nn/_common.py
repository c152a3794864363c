"""Helpers shared by the modules of :mod:`distq.nn`: argument checks, variable access, sizes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import planning as _plan
from ..core import _checks

Array = jax.Array
Initializer = Callable[..., Array]

default_bias_init = nnx.initializers.zeros_init()


def check_int(v: Any, name: str, lo: int = 1) -> int:
    """``v`` as an int ``>= lo`` (``TypeError`` for a non-int or a bool, ``ValueError`` below)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def as_weight(w: Any, name: str, ndim: int) -> Array:
    """A finite floating-point array of rank ``ndim``."""
    w = _checks.as_float_array(w, name)
    if w.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(w.shape)}")
    return w


def as_bias(bias: Any, n: int) -> Array | None:
    """A finite floating-point ``(n,)`` bias, or ``None``."""
    if bias is None:
        return None
    b = _checks.as_float_array(bias, "bias")
    if b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(b.shape)}")
    return b


def value(v: Any) -> Any:
    """The array of an nnx variable (or ``None``)."""
    return None if v is None else v[...]


def compute_dtype(dtype: Any, *arrays: Array | None):
    """``dtype``, or (when ``None``) the promoted dtype of the arrays that are not ``None``."""
    if dtype is not None:
        return jnp.dtype(dtype)
    with jax.numpy_dtype_promotion("standard"):  # the lattice, whatever the user's config
        return jnp.result_type(*[a.dtype for a in arrays if a is not None])


def model_size(model: Any) -> int:
    """True bytes of a model: PQ codes packed, codebooks, quantised leaves, other arrays.

    For an ``nnx.Module`` every variable except RNG state is counted at its stored size (the
    PQ layers keep their codes bit-packed, so their state is their true size); any other pytree
    (a params dict, ``nnx.state(...)``, a quantised tree) is counted by
    :func:`distq.tree_nbytes`.

    Examples:
      >>> from flax import nnx
      >>> from distq import nn
      >>> nn.model_size(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))  # (64 * 32 + 32) * 4
      8320
      >>> nn.model_size(nn.PQDense(16, 64, m=4, bits=4, rngs=nnx.Rngs(0)))  # 128 + 1024 + 256
      1408
    """
    tree = nnx.state(model, nnx.Not(nnx.RngState)) if isinstance(model, nnx.Module) else model
    return int(_plan.tree_nbytes(tree))
