"""The entry points: :func:`quantize` any array with any registered spec, :func:`dequantize`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from . import _checks
from .specs import Scalar
from .spec import check_spec, is_quantized, is_spec, leaf_types, spec_str


def quantize(x: Any, spec: Any = None, *, key: jax.Array | None = None) -> Any:
    """Quantises one array with any spec; returns its quantised leaf.

    Jittable with the spec static: ``jax.jit(distq.quantize, static_argnums=1)``, and vmappable
    over a batch of arrays (the leaf then carries the batch axes). Outside ``jit`` the input is
    checked (finite, non-empty, floating point, within the spec's range); under ``jit`` those
    checks cannot raise.

    Precision and range: values are represented in float32 internally. float16, bfloat16 and
    float32 input converts exactly; float64 input is rounded to float32 (about 7 significant
    digits, far finer than any quantisation grid), and a float64 array with magnitudes beyond
    float32's largest number (3.4e38), or non-zero ones that would round to 0 (below 1.4e-45),
    is refused with a ``ValueError``. Any finite float32 magnitude works: each group of values
    is scaled by a power of two (exactly) before its statistics, so ``x * 2**j`` gets the codes
    of ``x`` (PQ computes its distances on rows centred per column and scaled the same way, so
    neither magnitude nor a common offset costs it accuracy). A group the spec cannot store is refused with a ``ValueError`` that names the
    range: one whose scale falls outside ``scale_dtype``'s normal range (for float32 and
    bfloat16 below 1.2e-38, for float16 outside [6.1e-5, 65504]), whose decoded levels would be
    closer than 1.2e-38 (XLA flushes smaller numbers to zero; e.g. ``Uniform(bits=8)`` needs a
    group's largest magnitude to be 0 or at least 1.5e-36), or whose decoded values would
    exceed 3.4e38; a group whose largest magnitude is below 2**-24 of the array's is not
    refused for being too small (it decodes as 0 or its location: an error below float32's
    resolution at the array's scale). ``.dequantize()`` returns the input's dtype (float64
    only with ``jax_enable_x64``: JAX has no float64 arrays without it, so they decode as
    float32).

    Non-finite values under ``jit``/``vmap`` (outside them NaN/inf input raises a
    ``ValueError``): they are excluded from every statistic and codebook fit (zero weight), so
    every finite value gets exactly the code it would get without them, and they decode as
    NaN. Nothing is stored for them (``nbytes`` is unchanged): a scalar quantiser marks the
    group that held them by the sign bit of its scale, and that group decodes entirely as NaN,
    so no non-finite value ever decodes as a number (its finite values keep their codes;
    ``abs(q.scale)`` decodes them, which :func:`distq.fake_quantize` does: its output is NaN
    exactly at the non-finite values). Out-of-range groups are not refused under a trace:
    their scale is stored as it rounds (0 or inf).

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
    dtype = _checks.dtype_name(x)
    x = _checks.as_float_array(x)
    why = spec.problem(tuple(x.shape))
    if why:
        raise ValueError(f"{spec_str(spec)} cannot take an array of shape {tuple(x.shape)}: "
                         f"{why}")
    q = spec.quantize(x, key=key)
    if getattr(type(q), "records_dtype", False) and q.dtype != dtype:  # float64 held as float32
        q = dataclasses.replace(q, dtype=dtype)
    return q


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
