"""Fast randomised orthogonal transforms of any length (incoherence processing).

Multiplying a weight by a random orthogonal matrix makes its entries close to Gaussian and
spreads its outliers over many entries, so a quantiser designed for a Gaussian source fits it
better; undoing the transform at decode leaves the model unchanged. A dense random matrix costs
``O(n^2)`` per vector; the transforms here cost ``O(n log n)``.

The transform of a vector of length ``n = p * m`` (``p`` the largest power of two dividing
``n``, ``m`` odd) is

    ``R = (H_p (x) C_m) S``

where ``S = diag(s)`` holds random signs, ``H_p`` is the normalised Walsh-Hadamard matrix of
order ``p`` (Sylvester's construction, applied by ``log2 p`` butterfly stages) and ``C_m`` the
normalised discrete Hartley matrix of order ``m``, ``C[j, k] = cas(2 pi j k / m) / sqrt(m)``
with ``cas = cos + sin`` (Hartley; Bracewell). Both factors are orthogonal and symmetric, so
their Kronecker product ``K = H_p (x) C_m`` is its own inverse and ``R^-1 = R^T = S K``. Every
entry of ``K`` has magnitude at most ``sqrt(2 / n)`` (``1 / sqrt(n)`` when ``m = 1``), the
flatness that incoherence processing needs. A length with no power-of-two factor (odd, prime)
uses the Hartley factor alone; ``C_m`` is applied as a dense product for ``m <= 128`` (a few
multiply-adds per value) and through the FFT beyond (``O(m log m)`` for any ``m``, primes
included).

The signs come from a counter-based integer hash of ``(seed, index)`` computed with 32-bit
integer arithmetic (the same bits in NumPy, on every backend and every JAX version), not from
``jax.random``: a stored seed must rebuild the same rotation wherever and whenever the array
is decoded, and ``jax.random``'s bits for a given key have changed between JAX releases.

References:
  J. Chee, Y. Cai, V. Kuleshov, C. De Sa, "QuIP: 2-bit quantization of large language models
  with guarantees", NeurIPS 2023 (incoherence processing, Sec. 4).
  A. Tseng, J. Chee, Q. Sun, V. Kuleshov, C. De Sa, "QuIP#: Even better LLM quantization with
  Hadamard incoherence and lattice codebooks", ICML 2024 (random-sign Hadamard transform, and
  Kronecker products for sizes that are not powers of two, Sec. 3).
  R. N. Bracewell, "Discrete Hartley transform", J. Opt. Soc. Am. 73(12), 1983.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from distq.core import hadamard
  >>> hadamard.split_size(384), hadamard.split_size(1536), hadamard.split_size(97)
  ((128, 3), (512, 3), (1, 97))
  >>> x = jax.random.normal(jax.random.key(0), (4, 384))
  >>> y = hadamard.rotate(x, seed=7)  # along the last axis
  >>> bool(jnp.allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5))
  True
  >>> float(jnp.abs(hadamard.unrotate(y, seed=7) - x).max()) < 1e-5
  True
  >>> r = hadamard.rotation_matrix(6, seed=1)  # dense, for small sizes and checks
  >>> bool(np.allclose(r @ r.T, np.eye(6), atol=1e-6))
  True
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DENSE_ODD_MAX = 128  # odd factors up to this are applied as a dense product, larger by FFT

_M1, _M2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def split_size(n: int) -> tuple[int, int]:
    """``(p, m)`` with ``n = p * m``: ``p`` the largest power of two dividing ``n``, ``m`` odd.

    Examples:
      >>> split_size(1024), split_size(12), split_size(7)
      ((1024, 1), (4, 3), (1, 7))
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    p = int(n) & -int(n)
    return p, int(n) // p


def _mix(h):
    """A 32-bit integer hash (the "lowbias32" finaliser): every input bit changes about half
    of the output bits. Works on NumPy and JAX uint32 arrays alike (arithmetic mod 2**32)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(_M1)
    h = h ^ (h >> 15)
    h = h * np.uint32(_M2)
    return h ^ (h >> 16)


def sign_bits_numpy(seed: int, n: int) -> np.ndarray:
    """The random signs of :func:`random_signs` computed in NumPy (``+1``/``-1``, float64)."""
    with np.errstate(over="ignore"):
        s = _mix(np.uint32(seed % (1 << 32)) ^ np.uint32(_GOLDEN))
        h = _mix(np.arange(n, dtype=np.uint32) * np.uint32(_GOLDEN) + s)
    return 1.0 - 2.0 * (h >> 31).astype(np.float64)


def random_signs(seed: Any, n: int) -> jax.Array:
    """``n`` random signs (``+1.0``/``-1.0``, float32) determined by ``seed``.

    ``seed``: a Python int in ``[0, 2**32)`` or a uint32 scalar array (traced values work, so
    a seed stored in a leaf can be used under ``jit``/``vmap``).

    Examples:
      >>> import numpy as np
      >>> s = random_signs(3, 10_000)
      >>> s.dtype, sorted(set(np.asarray(s).tolist())), abs(float(s.mean())) < 0.03
      (dtype('float32'), [-1.0, 1.0], True)
      >>> bool((np.asarray(random_signs(3, 8)) == sign_bits_numpy(3, 8)).all())
      True
    """
    seed = _seed_array(seed)
    s = _mix(seed ^ jnp.uint32(_GOLDEN))
    h = _mix(jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(_GOLDEN) + s)
    return 1.0 - 2.0 * (h >> 31).astype(jnp.float32)


def hartley_matrix(m: int) -> np.ndarray:
    """The normalised discrete Hartley matrix ``cas(2 pi j k / m) / sqrt(m)`` (float64):
    orthogonal, symmetric and its own inverse.

    Examples:
      >>> c = hartley_matrix(5)
      >>> bool(np.allclose(c @ c, np.eye(5))), bool(np.allclose(c, c.T))
      (True, True)
    """
    jk = np.outer(np.arange(m), np.arange(m)) % m  # (reduced: exact angles for large m)
    a = 2.0 * np.pi * jk / m
    return (np.cos(a) + np.sin(a)) / np.sqrt(m)


def _hartley_last(x: jax.Array, m: int, dense_max: int) -> jax.Array:
    """The normalised Hartley transform along the last axis (length ``m``)."""
    if m == 1:
        return x
    if m <= dense_max:
        c = jnp.asarray(hartley_matrix(m), jnp.float32)
        return jnp.matmul(x, c, precision=jax.lax.Precision.HIGHEST)
    f = jnp.fft.fft(x.astype(jnp.complex64), axis=-1)
    return (jnp.real(f) - jnp.imag(f)) * jnp.float32(1.0 / math.sqrt(m))


def _walsh_last(x: jax.Array, p: int, m: int) -> jax.Array:
    """``(H_p (x) I_m)`` along the last axis (length ``p * m``), by ``log2 p`` butterflies.

    Every second stage halves its sums (exact), so intermediate values stay within a factor
    ``sqrt(2)`` of the result's scale; the remaining ``1 / sqrt(p)`` is one multiplication."""
    lead = x.shape[:-1]
    h, stage = 1, 0
    while h < p:
        y = x.reshape(lead + (p // (2 * h), 2, h * m))
        a, b = y[..., 0, :], y[..., 1, :]
        if stage % 2:
            a, b = a * jnp.float32(0.5), b * jnp.float32(0.5)
        x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (p * m,))
        h, stage = 2 * h, stage + 1
    halvings = stage // 2  # factor applied so far: 2**-halvings; wanted: p**-1/2 = 2**-stage/2
    rest = math.ldexp(1.0, halvings) / math.sqrt(p)
    return x if rest == 1.0 else x * jnp.float32(rest)


def _transform(x: jax.Array, axis: int, dense_max: int) -> jax.Array:
    """``K`` along ``axis`` (non-negative) of a float32 array."""
    n = x.shape[axis]
    if n == 0:
        return x
    p, m = split_size(n)
    y = jnp.moveaxis(x, axis, -1)
    lead = y.shape[:-1]
    y = _walsh_last(y, p, m)
    y = _hartley_last(y.reshape(lead + (p, m)), m, dense_max).reshape(lead + (n,))
    return jnp.moveaxis(y, -1, axis)


def _rotate(x: jax.Array, seed: jax.Array, axis: int, inverse: bool) -> jax.Array:
    """``R x`` (or ``R^T x``) along ``axis`` (non-negative) of a float32 array."""
    n = x.shape[axis]
    signs = random_signs(seed, n).reshape((1,) * axis + (n,) + (1,) * (x.ndim - 1 - axis))
    if inverse:
        return _transform(x, axis, DENSE_ODD_MAX) * signs
    return _transform(x * signs, axis, DENSE_ODD_MAX)


# compiled once per shape (and axis) when called eagerly; inlined under a caller's jit
_transform_jit = jax.jit(_transform, static_argnums=(1, 2))
_rotate_jit = jax.jit(_rotate, static_argnums=(2, 3))


def _prepared(x, axis: int):
    x = jnp.asarray(x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {x.ndim}")
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return x.astype(jnp.float32), axis % x.ndim, out_dtype


def _seed_array(seed) -> jax.Array:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 1 << 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        return jnp.asarray(np.uint32(seed))
    seed = jnp.asarray(seed)
    if seed.dtype != jnp.uint32 or seed.ndim != 0:
        raise TypeError(f"seed must be an int or a uint32 scalar, got {seed.dtype}{seed.shape}")
    return seed


def hadamard_transform(x: Any, axis: int = -1, *, dense_max: int = DENSE_ODD_MAX) -> jax.Array:
    """``K = H_p (x) C_m`` applied along ``axis`` (orthogonal, symmetric, its own inverse).

    Args:
      x: a float array (computed in float32; returned in ``x``'s float dtype, float32 for
        other dtypes).
      axis: the axis transformed, of any length ``n = p * m`` (see :func:`split_size`).
      dense_max: odd factors ``m`` up to this are applied as a dense product, larger ones
        through the FFT (both give the same transform).

    Examples:
      >>> import jax.numpy as jnp
      >>> hadamard_transform(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist()
      [0.5, 0.5, 0.5, 0.5]
      >>> x = jnp.arange(12.0).reshape(2, 6)
      >>> bool(jnp.allclose(hadamard_transform(hadamard_transform(x)), x, atol=1e-5))
      True
    """
    x, axis, out_dtype = _prepared(x, axis)
    return _transform_jit(x, axis, int(dense_max)).astype(out_dtype)


def rotate(x: Any, seed: Any = 0, axis: int = -1) -> jax.Array:
    """``R x`` along ``axis``: random signs (from ``seed``), then :func:`hadamard_transform`.

    Every 1-D slice along ``axis`` is multiplied by the same orthogonal matrix ``R``
    (:func:`rotation_matrix`), in ``O(n log n)``. Jittable and vmappable (``seed`` may be a
    traced uint32 scalar; ``axis`` is static).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (8, 96))
      >>> r = rotation_matrix(96, seed=5)
      >>> bool(jnp.allclose(rotate(w, 5, axis=1), w @ r.T, atol=1e-5))  # rows: R w_i
      True
      >>> bool(jnp.allclose(jax.jit(rotate, static_argnums=2)(w, jnp.uint32(5), 1),
      ...                   rotate(w, 5, 1)))
      True
    """
    x, axis, out_dtype = _prepared(x, axis)
    return _rotate_jit(x, _seed_array(seed), axis, False).astype(out_dtype)


def unrotate(y: Any, seed: Any = 0, axis: int = -1) -> jax.Array:
    """``R^T y`` along ``axis``: the inverse of :func:`rotate` (the transform, then the signs).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(1), (3, 1000))  # 1000 = 8 * 125: FFT factor
      >>> float(jnp.abs(unrotate(rotate(x, 2), 2) - x).max()) < 1e-5
      True
    """
    y, axis, out_dtype = _prepared(y, axis)
    return _rotate_jit(y, _seed_array(seed), axis, True).astype(out_dtype)


def rotation_matrix(n: int, seed: Any = 0) -> jax.Array:
    """The dense ``(n, n)`` matrix ``R`` of :func:`rotate` (``rotate(x) == R @ x`` for a
    vector): for checks and small sizes (``n**2`` values)."""
    return rotate(jnp.eye(n, dtype=jnp.float32), seed, axis=0)


def rotate_gram(h: Any, seed: Any = 0) -> jax.Array:
    """``R H R^T``: the Gram matrix ``H = X^T X`` of inputs ``x`` in the rotated basis
    ``x' = R x`` (both axes transformed, ``O(n^2 log n)``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (50, 12))
      >>> xr = rotate(x, 4, axis=1)  # each row rotated
      >>> bool(jnp.allclose(rotate_gram(x.T @ x, 4), xr.T @ xr, atol=1e-3))
      True
    """
    return rotate(rotate(h, seed, axis=0), seed, axis=1)


__all__ = ["DENSE_ODD_MAX", "hadamard_transform", "hartley_matrix", "random_signs", "rotate",
           "rotate_gram", "rotation_matrix", "sign_bits_numpy", "split_size", "unrotate"]
