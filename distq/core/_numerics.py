"""Numerical kernels shared by the scalar quantisers (private).

* :func:`sort_float`: float32 sort through an order-preserving int32 key (XLA's CPU sort of int32
  keys runs about 6x faster than its float comparator, which also orders NaNs).
* :class:`PrefixSums`: compensated (double-float) prefix sums of sorted data, so any contiguous
  range sum costs two look-ups and is accurate to the float32 rounding of the range's own sum.
* :func:`bucketize`: the index of the cell each value falls in for sorted thresholds; a
  branch-free binary search whose thresholds are picked by select trees (no gather) for up to
  255 thresholds, one that gathers them for more (``jnp.searchsorted``'s default runs at ~60 M
  values/s here).
* :func:`range_errors`: the quantisation error of many candidate codebooks on sorted data at once.
* :func:`lloyd_sorted`: Lloyd-Max iterations (MSE: weighted centroids; MAE: weighted medians) on
  sorted data, with a convergence test inside one ``lax.while_loop``.

References:
  S. P. Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28(2), 1982.
  J. Max, "Quantizing for minimum distortion", IRE Trans. Inf. Theory 6(1), 1960.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_LOW31 = 0x7FFFFFFF


def _float_key(x: jax.Array) -> jax.Array:
    i = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return i ^ ((i >> 31) & _LOW31)


def _key_float(k: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(k ^ ((k >> 31) & _LOW31), jnp.float32)


def sort_float(x: jax.Array, payload: jax.Array | None = None):
    """Sorts a 1-D float32 array (NaN-free) ascending; optionally carries ``payload`` along."""
    key = _float_key(x)
    if payload is None:
        return _key_float(lax.sort(key))
    key, payload = lax.sort((key, payload), num_keys=1)
    return _key_float(key), payload


def _two_sum(a, b):
    """Error-free sum: ``a + b == s + e`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _df_add(x, y):
    """Sum of two double-float numbers ``(hi, lo)`` (about 48 bits of precision)."""
    s, e = _two_sum(x[0], y[0])
    return _two_sum(s, e + x[1] + y[1])


class PrefixSums(NamedTuple):
    """Exclusive prefix sums ``P[i] = sum(v[:i])`` held as double-float pairs ``hi + lo``.

    A range sum ``P[b] - P[a]`` is then accurate to about one float32 rounding of the *range's*
    sum, not of the running total (a float32 running sum over 1M sorted values is off by O(0.1),
    which swamps the cells of a fine codebook).
    """

    hi: jax.Array  # (n + 1,)
    lo: jax.Array  # (n + 1,)

    @classmethod
    def build(cls, v: jax.Array) -> "PrefixSums":
        hi, lo = _df_cumsum(v)
        z = jnp.zeros((1,), v.dtype)
        return cls(jnp.concatenate([z, hi]), jnp.concatenate([z, lo]))


    def at(self, i: jax.Array) -> jax.Array:
        return self.hi[i] + self.lo[i]

    def range(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``sum(v[a:b])`` for integer index arrays ``a <= b``."""
        s, e = _two_sum(self.hi[b], -self.hi[a])
        return s + (e + (self.lo[b] - self.lo[a]))


_LANE_STEPS = 256


def _df_cumsum(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive double-float cumulative sum of a 1-D array.

    Two-level and sequential rather than ``lax.associative_scan`` (whose unrolled levels cost
    seconds of compile time): the array is cut into lanes of ``_LANE_STEPS`` values, one
    ``lax.scan`` walks all lanes at once, and the lanes' totals are prefix-summed the same way
    (recursively) and added back, every addition error-free (TwoSum).
    """
    n = v.shape[0]
    if n <= _LANE_STEPS:
        def step(c, x):
            c = _df_add(c, (x, jnp.zeros_like(x)))
            return c, c

        zero = jnp.zeros((), v.dtype)
        _, (hi, lo) = lax.scan(step, (zero, zero), v)
        return hi, lo
    lanes = -(-n // _LANE_STEPS)
    vp = jnp.pad(v, (0, lanes * _LANE_STEPS - n)).reshape(lanes, _LANE_STEPS)

    def lane_step(c, x):
        c = _df_add(c, (x, jnp.zeros_like(x)))
        return c, c

    zero = jnp.zeros((lanes,), v.dtype)
    (th, tl), (hi, lo) = lax.scan(lane_step, (zero, zero), vp.T)  # (steps, lanes)
    # exclusive prefix of the lane totals (a double-float sum of double-floats: hi part scanned,
    # the lo parts added in a second double-float pass)
    oh, ol = _df_cumsum(th)
    eh, el = _df_cumsum(tl)
    off = _df_add((oh, ol), (eh, el))
    off = (jnp.concatenate([jnp.zeros((1,), v.dtype), off[0][:-1]]),
           jnp.concatenate([jnp.zeros((1,), v.dtype), off[1][:-1]]))
    hi, lo = _df_add((hi, lo), (off[0][None, :], off[1][None, :]))
    return hi.T.reshape(-1)[:n], lo.T.reshape(-1)[:n]


_TREE_MAX_DEPTH = 8  # select trees up to 255 thresholds; above, the gather is no slower


def select(values: list, bits: list) -> jax.Array:
    """``values[int(bits)]`` elementwise, for ``2**len(bits)`` values and boolean arrays ``bits``
    (most significant first): a tree of ``jnp.where``, no gather."""
    if not bits:
        return values[0]
    half = len(values) // 2
    return jnp.where(bits[0], select(values[half:], bits[1:]), select(values[:half], bits[1:]))


def search_bits(x: jax.Array, t: jax.Array) -> list:
    """The bits (most significant first) of the number of thresholds ``<= x``, for ``2**d - 1``
    sorted thresholds ``t``: ``d`` compares, each against the threshold the bits found so far
    select. NaN compares false everywhere (all bits 0)."""
    depth = (t.shape[0] + 1).bit_length() - 1
    if t.shape[0] != (1 << depth) - 1:
        raise ValueError(f"search_bits needs 2**d - 1 thresholds, got {t.shape[0]}")
    bits = []
    for level in range(depth):
        step = 1 << (depth - level - 1)
        options = [t[p * 2 * step + step - 1] for p in range(1 << level)]
        bits.append(x >= select(options, bits))
    return bits


def full_tree(t: jax.Array, depth: int) -> jax.Array:
    """Sorted thresholds ``t`` padded with ``+inf`` to the ``2**depth - 1`` of a search tree
    (no finite value reaches the padding)."""
    return jnp.concatenate([t, jnp.full(((1 << depth) - 1 - t.shape[0],), jnp.inf, t.dtype)])


def bucketize(x: jax.Array, t: jax.Array) -> jax.Array:
    """Number of thresholds ``t`` (sorted ascending, 1-D) that are ``<= x``, as int32.

    Equals ``jnp.searchsorted(t, x, side="right")`` for finite ``x``; NaN maps to 0.
    """
    m = t.shape[0]
    if m == 0:
        return jnp.zeros(x.shape, jnp.int32)
    depth = math.ceil(math.log2(m + 1))
    tp = full_tree(t, depth)
    if depth <= _TREE_MAX_DEPTH:
        idx = jnp.zeros(x.shape, jnp.int32)
        for bit in search_bits(x, tp):
            idx = (idx << 1) | bit.astype(jnp.int32)
    else:
        idx = jnp.zeros(x.shape, jnp.int32)
        for d in reversed(range(depth)):
            step = 1 << d
            cand = idx + step
            idx = jnp.where(x >= tp[cand - 1], cand, idx)
    return jnp.minimum(idx, m)  # +inf passes the +inf padding: keep it in range


def cell_bounds(zs: jax.Array, t: jax.Array) -> jax.Array:
    """Start indices of the ``len(t) + 1`` cells of sorted ``zs`` cut at thresholds ``t``."""
    n = zs.shape[0]
    inner = jnp.searchsorted(zs, t, side="left", method="scan").astype(jnp.int32)
    return jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), inner, jnp.full((1,), n, jnp.int32)]
    )


def range_errors(
    zs: jax.Array, p1: PrefixSums, p2: PrefixSums | None, t: jax.Array, lv: jax.Array,
    objective: str, pw: PrefixSums | None = None,
) -> jax.Array:
    """Total error of encoding sorted ``zs`` with thresholds ``t`` (n-1,) and levels ``lv`` (n,).

    ``objective`` "mae" sums ``|z - level|``; "mse" sums ``(z - level)^2`` (needs ``p2``, the
    prefix sums of ``zs**2``). Vectorise over candidates with ``jax.vmap`` over ``t`` and ``lv``.
    With per-value weights ``w``, pass ``pw`` (prefix sums of ``w``) and build ``p1``/``p2`` from
    ``w * zs`` and ``w * zs**2``: the result is the weighted error.
    """
    b = cell_bounds(zs, t)
    b0, b1 = b[:-1], b[1:]

    def count(a, b):
        return (b - a).astype(zs.dtype) if pw is None else pw.range(a, b)

    cnt = count(b0, b1)
    if objective == "mse":
        s1 = p1.range(b0, b1)
        s2 = p2.range(b0, b1)
        return jnp.sum(jnp.maximum(s2 - 2.0 * lv * s1 + lv * lv * cnt, 0.0))
    m = jnp.clip(jnp.searchsorted(zs, lv, side="left", method="scan").astype(jnp.int32), b0, b1)
    above = p1.range(m, b1) - lv * count(m, b1)
    below = lv * count(b0, m) - p1.range(b0, m)
    return jnp.sum(above + below)


def lloyd_sorted(
    zs: jax.Array,
    init: jax.Array,
    *,
    objective: str,
    weights: jax.Array | None = None,
    fixed: jax.Array | None = None,
    max_iter: int = 1000,
    tol: float = 1e-7,
) -> tuple[jax.Array, jax.Array]:
    """Lloyd-Max iterations on sorted data starting from the sorted codebook ``init``.

    Each step cuts ``zs`` at the midpoints of the current levels and moves every level to its
    cell's (weighted) mean for "mse" or (weighted) median for "mae". Empty cells keep their level;
    levels flagged in ``fixed`` never move (an exact zero). Stops when no level moves more than
    ``tol`` times the codebook's span, or after ``max_iter`` steps.

    Returns:
      ``(levels, iterations)``.
    """
    n_pts = zs.shape[0]
    dt = zs.dtype
    w = jnp.ones_like(zs) if weights is None else weights.astype(dt)
    pw = PrefixSums.build(w)
    pwz = PrefixSums.build(w * zs)
    cw = None
    if objective == "mae":
        idx = jnp.arange(n_pts + 1, dtype=jnp.int32)
        cw = pw.at(idx)  # inclusive-exclusive cumulative weights, length n+1, non-decreasing
    fixed = jnp.zeros(init.shape, bool) if fixed is None else fixed
    span = jnp.maximum(init[-1] - init[0], jnp.finfo(dt).tiny)

    def step(lv):
        t = 0.5 * (lv[:-1] + lv[1:])
        b = cell_bounds(zs, t)
        b0, b1 = b[:-1], b[1:]
        wsum = pw.range(b0, b1)
        if objective == "mse":
            new = pwz.range(b0, b1) / jnp.where(wsum > 0, wsum, 1.0)
        else:
            half = cw[b0] + 0.5 * wsum
            j = jnp.searchsorted(cw, half, side="left", method="scan").astype(jnp.int32) - 1
            j = jnp.clip(j, b0, jnp.maximum(b1 - 1, b0))
            new = zs[jnp.clip(j, 0, n_pts - 1)]
        new = jnp.where((wsum > 0) & ~fixed, new, lv)
        # an empty cell's level is dead weight: move one per step into the heaviest cell, at the
        # quartile on the far side of that cell's level, so the next step splits the cell
        empty = (wsum <= 0) & ~fixed
        big = jnp.argmax(wsum)
        lo_q = (3 * b0[big] + b1[big]) // 4
        hi_q = (b0[big] + 3 * b1[big]) // 4
        cand = jnp.where(zs[jnp.clip(hi_q, 0, n_pts - 1)] != new[big], hi_q, lo_q)
        new = jnp.where(
            empty.any() & (jnp.arange(new.shape[0]) == jnp.argmax(empty)),
            zs[jnp.clip(cand, 0, n_pts - 1)],
            new,
        )
        return jnp.sort(new)

    def cond(state):
        _, it, delta = state
        return (it < max_iter) & (delta > tol * span)

    def body(state):
        lv, it, _ = state
        new = step(lv)
        return new, it + 1, jnp.max(jnp.abs(new - lv))

    lv, it, _ = lax.while_loop(cond, body, (init.astype(dt), jnp.int32(0), jnp.array(jnp.inf, dt)))
    return lv, it
