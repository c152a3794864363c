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

import functools
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


def two_sum(a, b):
    """Error-free sum: ``a + b == s + e`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _df_add(x, y):
    """Sum of two double-float numbers ``(hi, lo)`` (about 48 bits of precision)."""
    s, e = two_sum(x[0], y[0])
    return two_sum(s, e + x[1] + y[1])


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
        s, e = two_sum(self.hi[b], -self.hi[a])
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
    # exclusive prefix of the lane totals (a double-float sum of double-floats: one scan of
    # the pairs when they are few, else hi part scanned, the lo parts added in a second
    # double-float pass)
    if lanes <= _LANE_STEPS:
        def pair_step(c, x):
            c = _df_add(c, x)
            return c, c

        z = jnp.zeros((), v.dtype)
        _, off = lax.scan(pair_step, (z, z), (th, tl))
    else:
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


def _sorted_with_flags(levels, fixed):
    """Levels sorted, their ``fixed`` flags with them (a level moved past a fixed one must not
    take its flag)."""
    order = jnp.argsort(levels)
    return levels[order], fixed[order]


def _iterate_levels(step, init, fixed, max_iter: int, tol):
    """``(levels, iterations)``: ``levels, fixed = step(levels, fixed)`` until no level moves by
    more than ``tol`` or after ``max_iter`` steps (the loop of both Lloyd-Max solvers)."""

    def cond(state):
        _, _, it, delta = state
        return (it < max_iter) & (delta > tol)

    def body(state):
        lv, fixed, it, _ = state
        new, fixed = step(lv, fixed)
        return new, fixed, it + 1, jnp.max(jnp.abs(new - lv))

    lv, _, it, _ = lax.while_loop(
        cond, body, (init, fixed, jnp.int32(0), jnp.array(jnp.inf, init.dtype)))
    return lv, it


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

    def step(lv, fixed):
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
        return _sorted_with_flags(new, fixed)

    return _iterate_levels(step, init.astype(dt), fixed, max_iter, tol * span)


# ------------------------------------------------------------------------ histogram densities
# The codebook of a large tensor is fitted to a fine histogram of (a sample of) its
# standardised values instead of to the sorted values themselves: binning a sample costs one
# scatter (sorting it cost ~20x more on XLA:CPU), its integer counts add up exactly in any order
# (so the shards of a sharded array all-reduce them and get the same counts as one device),
# and the codebook search sees a fixed number of bins whatever the tensor's size, so it
# compiles once. Each bin is read as a uniform density: cells are cut at their exact
# thresholds inside a bin, so Lloyd-Max converges to the density's optimum; on a set of point
# masses (a sample, or bin means) it stalls at one of their many discrete fixed points, which
# at 4 bits on 2**16 points costs 0.3 % of squared error and at 6 bits on 2**-9-wide bins 29 %.
HIST_HALF_RANGE = 16  # uniform bins over [-16, 16) (standard deviations) ...
HIST_STEP_BITS = 8  # ... of width 2**-8;
HIST_TAIL_BITS = 4  # beyond, 2**4 bins per octave up to float32's largest number
_TAIL_E0 = HIST_HALF_RANGE.bit_length() - 1  # the first tail octave's exponent (16 = 2**4)
_NU = (2 * HIST_HALF_RANGE) << HIST_STEP_BITS
_NT = (128 - _TAIL_E0) << HIST_TAIL_BITS
HIST_BINS = _NU + 2 * _NT


@functools.lru_cache(maxsize=1)
def hist_edges() -> "np.ndarray":
    """The ``HIST_BINS + 1`` increasing bin edges (float32), from ``-F32_MAX`` to ``F32_MAX``.

    Examples:
      >>> e = hist_edges()
      >>> e.shape == (HIST_BINS + 1,), float(e[_NT]), float(e[_NT + 1]), float(e[_NT + _NU])
      (True, -16.0, -15.99609375, 16.0)
    """
    import numpy as np  # noqa: PLC0415

    i = np.arange(_NT)
    tail = np.ldexp(1.0 + (i % (1 << HIST_TAIL_BITS)) / (1 << HIST_TAIL_BITS),
                    _TAIL_E0 + i // (1 << HIST_TAIL_BITS))
    tail = np.concatenate([tail, [float(np.finfo(np.float32).max)]])
    uni = -HIST_HALF_RANGE + np.arange(_NU + 1) / float(1 << HIST_STEP_BITS)
    edges = np.concatenate([-tail[::-1], uni[1:-1], tail]).astype(np.float32)
    edges.flags.writeable = False
    return edges


def hist_bin(y: jax.Array) -> jax.Array:
    """The bin of :func:`hist_edges` holding each finite float32 ``y`` (int32).

    Examples:
      >>> import numpy as np
      >>> y = np.array([-3e38, -16.0, -0.001, 0.0, 1.0, 15.999, 16.0, 40.0, 3e38], np.float32)
      >>> e, b = hist_edges(), np.asarray(hist_bin(jnp.asarray(y)))
      >>> bool(np.all((e[b] <= y) & (y <= e[b + 1])))
      True
    """
    y = y.astype(jnp.float32)
    a = jnp.minimum(jnp.abs(y), jnp.float32(3.4028234663852886e38))
    inner = a < HIST_HALF_RANGE
    iu = jnp.clip(jnp.floor((y + HIST_HALF_RANGE) * float(1 << HIST_STEP_BITS)), 0, _NU - 1)
    bits = lax.bitcast_convert_type(a, jnp.int32)
    it = ((bits >> 23) - 127 - _TAIL_E0) * (1 << HIST_TAIL_BITS) + (
        (bits >> (23 - HIST_TAIL_BITS)) & ((1 << HIST_TAIL_BITS) - 1))
    it = jnp.clip(it, 0, _NT - 1)
    return jnp.where(inner, _NT + iu.astype(jnp.int32),
                     jnp.where(y > 0, _NT + _NU + it, _NT - 1 - it))


class Density(NamedTuple):
    """A piecewise-uniform density on the bins of :func:`hist_edges`: ``mass[b]`` spread
    evenly over bin ``b``, with double-float prefix sums at the edges of its mass and of its first and second
    moments (``p[0..2]``, each ``(hi, lo)`` of shape ``(bins + 1,)``). Build with
    :meth:`build`; cell sums at any thresholds with :func:`density_cells`."""

    edges: jax.Array  # (B + 1,)
    mass: jax.Array  # (B,)
    hi: jax.Array  # (3, B + 1)
    lo: jax.Array  # (3, B + 1)

    @classmethod
    def build(cls, mass: jax.Array) -> "Density":
        """``mass`` (non-negative, any scale: it is normalised to sum 1) per bin of
        :func:`hist_edges`; a leading batch axis builds several densities at once."""
        if mass.ndim == 2:
            return jax.vmap(cls.build)(mass)
        edges = jnp.asarray(hist_edges())
        mass = mass.astype(jnp.float32)
        tot = jnp.sum(mass)
        mass = jnp.where(tot > 0, mass / jnp.where(tot > 0, tot, 1.0), 0.0)
        a, b = edges[:-1], edges[1:]
        c = 0.5 * a + 0.5 * b  # (no overflow at the outermost bins)
        w = b - a
        live = mass > 0  # (a second moment may overflow only in an empty far bin: keep it 0)
        m2 = jnp.where(live, mass * (c * c + w * w / 12.0), 0.0)
        vals = jnp.stack([mass, jnp.where(live, mass * c, 0.0), m2])
        hi, lo = jax.vmap(_df_cumsum)(vals)
        z = jnp.zeros((3, 1), jnp.float32)
        return cls(edges, mass, jnp.concatenate([z, hi], 1), jnp.concatenate([z, lo], 1))


def _density_cum(d: Density, t: jax.Array):
    """Double-float ``(hi, lo)``, each ``(3,) + t.shape``: mass and first and second moments
    of the density below each ``t``."""
    e = d.edges
    tc = jnp.clip(t, e[0], e[-1])
    b = hist_bin(tc)  # (the edges' closed form: no search)
    lo_e, w, m = e[b], e[b + 1] - e[b], d.mass[b]
    f = jnp.where(w > 0, jnp.clip((tc - lo_e) / jnp.where(w > 0, w, 1.0), 0.0, 1.0), 1.0)
    tt = lo_e + f * w
    mf = m * f
    live = mf > 0
    part = jnp.stack([mf, jnp.where(live, mf * (0.5 * lo_e + 0.5 * tt), 0.0),
                      jnp.where(live, mf * (lo_e * lo_e + lo_e * tt + tt * tt) / 3.0, 0.0)])
    return _df_add((d.hi[:, b], d.lo[:, b]), (part, jnp.zeros_like(part)))


def _df_diff(u, v):
    s, e = two_sum(u[0], -v[0])
    return s + (e + (u[1] - v[1]))


def density_cells(d: Density, t: jax.Array) -> jax.Array:
    """``(3, len(t) + 1)``: mass, first and second moment of each cell that the sorted
    thresholds ``t`` cut the density into (the first from ``-inf``, the last to ``+inf``)."""
    h, l = _density_cum(d, t)
    z = jnp.zeros((3, 1), jnp.float32)
    top_h, top_l = d.hi[:, -1:], d.lo[:, -1:]
    uh = jnp.concatenate([h, top_h], 1)
    ul = jnp.concatenate([l, top_l], 1)
    dh = jnp.concatenate([z, h], 1)
    dl = jnp.concatenate([z, l], 1)
    return _df_diff((uh, ul), (dh, dl))


def density_errors(d: Density, t: jax.Array, lv: jax.Array, objective: str) -> jax.Array:
    """Error of encoding the density with thresholds ``t`` (n-1,) and levels ``lv`` (n,):
    the expected squared ("mse") or absolute ("mae") error (the density has mass 1)."""
    m, s1, s2 = density_cells(d, t)
    if objective == "mse":
        return jnp.sum(jnp.maximum(s2 - 2.0 * lv * s1 + lv * lv * m, 0.0))
    # |z - l| over a cell [a, b) with l clamped into it: l (M(l) - M(a)) - (S1(l) - S1(a))
    # + (S1(b) - S1(l)) - l (M(b) - M(l)); the cells cut at a_0, l_0, a_1, l_1, ... (sorted)
    # give the parts [a_i, l_i) as every other cell
    lo_t = jnp.concatenate([jnp.full((1,), -jnp.inf, t.dtype), t])
    hi_t = jnp.concatenate([t, jnp.full((1,), jnp.inf, t.dtype)])
    lc = jnp.clip(lv, lo_t, hi_t)
    below = density_cells(d, jnp.stack([lo_t, lc], 1).reshape(-1))[:, 1::2]
    mb, s1b = below[0], below[1]
    return jnp.sum(lc * mb - s1b + (s1 - s1b) - lc * (m - mb))


def density_quantile(d: Density, q: jax.Array, method: str = "scan") -> jax.Array:
    """The point below which the density has mass ``q`` (in [0, 1]). ``method``: of
    ``jnp.searchsorted`` ("compare_all" for a few ``q``: no loop to compile)."""
    nb = d.mass.shape[0]
    c = d.hi[0] + d.lo[0]
    b = jnp.clip(jnp.searchsorted(c, q, side="right", method=method).astype(jnp.int32) - 1,
                 0, nb - 1)
    m = d.mass[b]
    f = jnp.where(m > 0, jnp.clip((q - c[b]) / jnp.where(m > 0, m, 1.0), 0.0, 1.0), 0.5)
    return d.edges[b] + f * (d.edges[b + 1] - d.edges[b])


def lloyd_density(
    d: Density,
    init: jax.Array,
    *,
    objective: str,
    fixed: jax.Array | None = None,
    max_iter: int = 1000,
    tol: float = 1e-7,
) -> tuple[jax.Array, jax.Array]:
    """Lloyd-Max iterations on a :class:`Density` from the sorted codebook ``init``.

    As :func:`lloyd_sorted`, with cells cut at their exact thresholds inside the bins: each
    level moves to its cell's centroid ("mse") or median ("mae"); empty cells keep their level
    (one per step moves into the heaviest cell), levels flagged in ``fixed`` never move. Stops
    when no level moves more than ``tol`` times the codebook's span, or after ``max_iter``
    steps.

    Returns:
      ``(levels, iterations)``.

    Examples:
      >>> import numpy as np
      >>> from scipy import stats
      >>> e = hist_edges()
      >>> mass = np.diff(stats.norm.cdf(e.astype(np.float64)))  # N(0, 1), binned
      >>> d = Density.build(jnp.asarray(mass, jnp.float32))
      >>> lv, it = lloyd_density(d, jnp.linspace(-2.0, 2.0, 4), objective="mse")
      >>> [round(float(v), 3) for v in lv]  # Max (1960): +-0.4528, +-1.510
      [-1.51, -0.453, 0.453, 1.51]
    """
    dt = jnp.float32
    fixed = jnp.zeros(init.shape, bool) if fixed is None else fixed
    span = jnp.maximum(init[-1] - init[0], jnp.finfo(dt).tiny)
    n = init.shape[0]

    def step(lv, fixed):
        t = 0.5 * (lv[:-1] + lv[1:])
        m, s1, _ = density_cells(d, t)
        below = jnp.cumsum(m) - m  # mass below each cell
        if objective == "mse":
            new = s1 / jnp.where(m > 0, m, 1.0)
        else:
            new = density_quantile(d, below + 0.5 * m)
        new = jnp.where((m > 0) & ~fixed, new, lv)
        # an empty cell's level is dead weight: move one per step into the heaviest cell, at
        # the quartile on the far side of that cell's level, so the next step splits the cell
        empty = (m <= 0) & ~fixed
        big = jnp.argmax(m)
        q = density_quantile(d, below[big] + jnp.array([0.25, 0.75], dt) * m[big],
                             "compare_all")
        cand = jnp.where(q[1] != new[big], q[1], q[0])
        new = jnp.where(empty.any() & (jnp.arange(n) == jnp.argmax(empty)), cand, new)
        return _sorted_with_flags(new, fixed)

    return _iterate_levels(step, init.astype(dt), fixed, max_iter, tol * span)


# ------------------------------------------------------------------ error-feedback rounding
def hinv_upper(h: jax.Array, damp: float) -> jax.Array:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``H^-1 = U^T U``),
    what GPTQ/LDLQ-style rounding feeds each input's error forward with. Inputs that never fire
    (zero diagonal) are decoupled from the others.

    Examples:
      >>> h = jnp.array([[4.0, 2.0], [2.0, 3.0]])
      >>> u = hinv_upper(h, 0.0)
      >>> bool(jnp.allclose(u.T @ u, jnp.linalg.inv(h), atol=1e-6)), float(u[1, 0])
      (True, 0.0)
    """
    d = jnp.diag(h)
    dead = d <= 0
    h = jnp.where(dead[:, None] | dead[None, :], 0.0, h) + jnp.diag(jnp.where(dead, 1.0, 0.0))
    h = h + damp * jnp.mean(jnp.where(dead, 0.0, jnp.diag(h))) * jnp.eye(h.shape[0])
    lower = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
    return jnp.linalg.cholesky(hinv).T
