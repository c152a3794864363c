"""The entry points: :func:`quantize` any array with any registered spec, :func:`dequantize`."""

from __future__ import annotations

from typing import Any

import jax

from . import _checks
from .specs import Scalar
from .spec import check_spec, is_quantized, is_spec, leaf_types, spec_str


def quantize(x: Any, spec: Any = None, *, key: jax.Array | None = None) -> Any:
    """Quantises one array with any spec; returns its quantised leaf.

    Jittable with the spec static: ``jax.jit(distq.quantize, static_argnums=1)``, and vmappable
    over a batch of arrays (the leaf then carries the batch axes). Outside ``jit`` the input is
    checked (finite, non-empty, floating point); under ``jit`` those checks cannot raise.

    Args:
      x: a floating-point array (NumPy, JAX, or anything ``jnp.asarray`` takes).
      spec: a registered spec: :class:`distq.Scalar` (the default, ``Scalar()``: 4 bits),
        :class:`distq.Uniform`, :class:`distq.NF4`, :class:`distq.PQ` (matrices) or
        :class:`distq.Cast`.
      key: a ``jax.random`` key for randomised specs (PQ's k-means); ``None`` uses
        ``jax.random.key(0)``, so results are reproducible.

    Returns:
      The quantised leaf (:class:`distq.QArray`, :class:`distq.pq.PQArray`,
      :class:`distq.CastArray`); ``.dequantize()`` decodes it, ``.nbytes`` is its true size.

    Examples:
      >>> import numpy as np, distq
      >>> x = np.random.default_rng(0).standard_normal(60_000).astype(np.float32)
      >>> q = distq.quantize(x, distq.Scalar(bits=4, objective="mse"))
      >>> round(float(((np.asarray(q.dequantize()) - x) ** 2).mean()), 4)
      0.0096
      >>> m = np.random.default_rng(1).standard_normal((512, 32)).astype(np.float32)
      >>> type(distq.quantize(m, distq.PQ(m=4, bits=4))).__name__
      'PQArray'
    """
    spec = Scalar() if spec is None else spec
    if not is_spec(spec):
        check_spec(spec)
    x = _checks.as_float_array(x)
    why = spec.problem(tuple(x.shape))
    if why:
        raise ValueError(f"{spec_str(spec)} cannot take an array of shape {tuple(x.shape)}: "
                         f"{why}")
    return spec.quantize(x, key=key)


def dequantize(q: Any, dtype: Any = None) -> jax.Array:
    """Decodes a quantised leaf (same as ``q.dequantize(dtype)``).

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> q = distq.quantize(jnp.array([1.0, -1.0, 0.0]), distq.Uniform(bits=8))
      >>> distq.dequantize(q).tolist(), distq.dequantize(q, jnp.bfloat16).dtype
      ([1.0, -1.0, 0.0], dtype(bfloat16))
      >>> distq.dequantize(jnp.ones(2))
      Traceback (most recent call last):
        ...
      TypeError: dequantize expects a quantised leaf (...), got ...
    """
    if not is_quantized(q):
        raise TypeError(f"dequantize expects a quantised leaf "
                        f"({', '.join(c.__name__ for c in leaf_types())}), "
                        f"got {type(q).__name__}")
    return q.dequantize(dtype)
