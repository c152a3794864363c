"""Scalar quantisers: distributional codebooks with Lloyd-Max refinement, uniform integers, NF4.

Three frozen, hashable specs (usable as static ``jax.jit`` arguments) and one entry point,
:func:`quantize`, returning a :class:`distq.QArray`.

The distributional pipeline (:class:`Scalar`), per tensor, channel or group of values:

1. Standardise: location and spread per group (mean and std, or median and 1.4826 MAD if
   ``robust``); each family maps them to its own location/scale (:mod:`distq.distributions`).
2. Codebook from the prior: ``n`` levels ``G_p^{-1}((c + 1/2) / n)`` scaled by ``beta``.
3. ``beta=None``: grid over the reference's 37 values, then a zoom on ``log beta``; ``dist=None``:
   the same over every family. Both score all candidates on one sorted sample with prefix sums,
   in one jitted computation, under the chosen ``objective``.
4. ``refine=True``: Lloyd-Max iterations from the companding levels to the codebook that is
   optimal for the data at hand (centroids for "mse", medians for "mae").
5. Encode every value to its nearest level (always in range), bit-pack the codes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Union

import jax
import jax.numpy as jnp
import numpy as np
from . import _numerics as nx
from . import bitpack
from . import distributions as D
from . import search as S
from . import spec as _spec
from .qarray import QArray, layout_for, outlier_values, pack_positions
from .specs import AUTO, INPUT_AXIS, NF4, Scalar, Uniform, nf4_levels

# ------------------------------------------------------------------------------------- helpers
def _round_dtype(v: jax.Array, name: str) -> jax.Array:
    return v.astype(name).astype(jnp.float32)


def _strided_sample(v: jax.Array, size: int) -> jax.Array:
    n = v.shape[0]
    if n <= size:
        return v
    stride = n // size
    return v[: size * stride : stride]


def _pack(codes: jax.Array, bits: int) -> jax.Array:
    return bitpack.pack(codes.reshape(-1).astype(jnp.uint32), bits)


def _build(spec, x, codes, codebook, scale, loc, bits, n, method, layout, grid=None) -> QArray:
    return QArray(
        codes=_pack(codes, bits),
        codebook=None if codebook is None else codebook.astype(jnp.float32),
        scale=scale.astype(spec.scale_dtype),
        loc=None if loc is None else loc.astype(spec.scale_dtype),
        grid=grid,
        value_shape=tuple(x.shape),
        dtype=str(x.dtype),
        bits=bits,
        n=n,
        method=method,
        layout=layout,
    )


# ------------------------------------------------------------------------------- distributional
_CLASS_A = ("gaussian", "logistic", "gumbel")
_SEARCH_LEVELS = 1024


def _unit_class(spec: Scalar, family: str) -> str:
    """"A": units centred on the data (location families without ``zero``); "B": on ``zero``/0."""
    return "A" if spec.zero is None and family in _CLASS_A else "B"


def _family_affine(family: str) -> tuple[float, float]:
    """(offset, mult) of a family's standard units in (x - centre) / spread units."""
    loc, scale = D.standardise_from_moments(family, 0.0, 1.0)
    if family == "cauchy":
        scale = 1.0  # distq scales Cauchy by the spread too; beta's wide grid does the rest
    return float(loc), float(scale)


def _fit_codebook(zsorted: dict, weights: dict, spec: Scalar, n: int):
    """Searches dist/beta per unit class, refines; returns (codebook, class_is_A)."""
    dists = spec.candidate_dists()
    best = {}
    for cls, zs in zsorted.items():
        w = weights[cls]
        members = [d for d in dists if _unit_class(spec, d.family) == cls]
        if not members:
            continue
        aff = [_family_affine(d.family) for d in members]
        offs = np.array([0.0 if cls == "B" else a[0] for a in aff], np.float32)
        muls = np.array([a[1] for a in aff], np.float32)
        # candidates are ranked on at most _SEARCH_LEVELS levels: beyond that the ranking no
        # longer changes (high-rate regime), and a float32 squared-error score of a finer
        # codebook would drown in rounding
        cands = S.Candidates(members, min(n, _SEARCH_LEVELS), offs, muls, encode="nearest")
        final = cands if n <= _SEARCH_LEVELS else S.Candidates(members, n, offs, muls, "nearest")
        sums = S.prefix_sums(zs, spec.objective, w)
        if spec.beta is None:
            _, row, col = S.grid_search(zs, cands, spec.objective, w, sums)
            b, e = S.zoom_search(zs, cands, spec.objective, row, col, w=w, sums=sums)
        else:
            rows = jnp.arange(len(members))
            bs = jnp.full((len(members),), spec.beta, jnp.float32)
            errs = S.score(zs, cands, spec.objective, rows, bs, w, sums)
            row = jnp.argmin(errs)
            b, e = bs[row], errs[row]
        _, lv = final.codebooks(row, b)
        best[cls] = (e, lv)
    if len(best) == 2:
        use_a = best["A"][0] <= best["B"][0]
        lv = jnp.where(use_a, best["A"][1], best["B"][1])
        zs = jnp.where(use_a, zsorted["A"], zsorted["B"])
        w = None if weights["A"] is None else jnp.where(use_a, weights["A"], weights["B"])
    else:
        (cls,) = best
        use_a = jnp.asarray(cls == "A")
        lv, zs, w = best[cls][1], zsorted[cls], weights[cls]
    fixed = None  # (levels are increasing: tables of increasing ppf times a positive scale)
    if spec.zero is not None:
        j = jnp.argmin(jnp.abs(lv))
        lv = lv.at[j].set(0.0)
        fixed = jnp.arange(n) == j
    if spec.refine and spec.max_iter > 0:
        lv, _ = nx.lloyd_sorted(
            zs, lv, objective=spec.objective, weights=w, fixed=fixed, max_iter=spec.max_iter
        )
    return lv, use_a


def _fit_bucket(size: int, fit_size: int) -> int:
    """The padded length of a fitting sample of ``size`` values: ``2**16``, ``2**18``, ``2**20``,
    ... (or ``fit_size``), so that tensors of many shapes share one compiled search-and-refine
    (the padding carries zero weight and costs little: the fit is O(levels log N) per candidate).
    """
    if size >= fit_size:
        return fit_size
    b = 1 << 16
    while b < size:
        b <<= 2
    return min(b, fit_size)


def _pad_sorted(zs: jax.Array, w: jax.Array | None, bucket: int):
    """Appends zero-weight copies of the largest value: same weighted data, ``bucket`` long."""
    pad = bucket - zs.shape[0]
    if pad == 0:
        return zs, w
    w = jnp.ones_like(zs) if w is None else w
    zs = jnp.concatenate([zs, jnp.broadcast_to(zs[-1], (pad,))])
    return zs, jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])


def _prepare_scalar(x: jax.Array, spec: Scalar):
    """Stage 1 (compiled per shape, cheap): group statistics and the sorted fitting samples."""
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(x.astype(jnp.float32))
    g, length = rows.shape
    mx, mn = rows.max(axis=1), rows.min(axis=1)
    const = mx == mn
    # statistics of rows divided by their absolute maximum: squares cannot overflow
    amax = jnp.maximum(jnp.abs(mx), jnp.abs(mn))
    unit = jnp.where(amax > 0, amax, 1.0)
    scaled = rows / unit[:, None]
    if spec.robust:
        centre = jnp.median(scaled, axis=1)
        spread = 1.482602218505602 * jnp.median(jnp.abs(scaled - centre[:, None]), axis=1)
        # a group whose MAD is 0 (mostly one value) falls back to its standard deviation
        spread = jnp.where(spread > 0, spread, jnp.std(scaled, axis=1))
    else:
        centre = scaled.mean(axis=1)
        spread = jnp.std(scaled, axis=1, ddof=1 if length > 1 else 0)
    centre, spread = centre * unit, spread * unit
    spread = _round_dtype(jnp.where((spread > 0) & ~const, spread, 1.0), spec.scale_dtype)
    centre = _round_dtype(centre, spec.scale_dtype)
    loc0 = jnp.full((g,), 0.0 if spec.zero is None else spec.zero, jnp.float32)
    loc0 = _round_dtype(loc0, spec.scale_dtype)

    classes = {_unit_class(spec, d.family) for d in spec.candidate_dists()}
    zsorted, weights = {}, {}
    w_fit = None  # per-value weights (the group's scale) of the fitted sample
    if g > 1:
        w_fit = _strided_sample(jnp.broadcast_to(
            (spread**2 if spec.objective == "mse" else spread)[:, None], rows.shape
        ).reshape(-1), spec.fit_size)
    k = spec.n_outliers(g * length)
    out_idx = None
    if k:
        # the k values farthest from their group's centre; the codebook is fitted without them
        dev = jnp.abs((rows - centre[:, None]) / spread[:, None]).reshape(-1)
        _, out_idx = jax.lax.top_k(dev, k)
        keep = jnp.ones((g * length,), jnp.float32).at[out_idx].set(0.0)
        keep = _strided_sample(keep, spec.fit_size)
        w_fit = keep if w_fit is None else w_fit * keep
    bucket = _fit_bucket(min(g * length, spec.fit_size), spec.fit_size)
    for cls, loc in (("A", centre), ("B", loc0)):
        if cls not in classes:
            continue
        z = ((rows - loc[:, None]) / spread[:, None]).reshape(-1)
        z = _strided_sample(z, spec.fit_size)
        if w_fit is None:
            zs, w = nx.sort_float(z), None
        else:
            zs, w = nx.sort_float(z, w_fit)
        zsorted[cls], weights[cls] = _pad_sorted(zs, w, bucket)
    return (centre, spread, loc0, mx, const, out_idx), zsorted, weights


def _encode_scalar(x, spec: Scalar, stats, codebook, use_a) -> QArray:
    """Stage 3 (compiled per shape, cheap): codes against the fitted codebook."""
    centre, spread, loc0, mx, const, out_idx = stats
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(x.astype(jnp.float32))
    loc = jnp.where(use_a, centre, loc0)
    z = (rows - loc[:, None]) / spread[:, None]
    codes = nx.bucketize(z, 0.5 * (codebook[1:] + codebook[:-1]))
    scale = jnp.where(const, 0.0, spread)
    loc = jnp.where(const, mx, loc)
    q = _build(spec, x, codes, codebook, scale, loc, spec.code_bits, spec.levels,
               "distributional", layout)
    if out_idx is None:
        return q
    idx = out_idx.astype(jnp.uint32)
    return dataclasses.replace(q, outlier_index=pack_positions(idx, q.index_bits),
                               outlier_value=outlier_values(z.reshape(-1)[out_idx]),
                               n_outliers=int(out_idx.shape[0]))


# The three stages are compiled separately: the expensive one (search + Lloyd-Max, stage 2)
# sees only the padded sorted sample, so it compiles once per (spec, bucket) instead of once per
# tensor shape. Inside a caller's jit they are inlined into one computation.
_prepare_jit = jax.jit(_prepare_scalar, static_argnums=1)
_fit_jit = jax.jit(_fit_codebook, static_argnums=(2, 3))
_encode_jit = jax.jit(_encode_scalar, static_argnums=1)


def _quantize_scalar(x: jax.Array, spec: Scalar) -> QArray:
    spec = spec.resolve(tuple(x.shape))
    stats, zsorted, weights = _prepare_jit(x, spec)
    codebook, use_a = _fit_jit(zsorted, weights, spec, spec.levels)
    return _encode_jit(x, spec, stats, codebook, use_a)


# ------------------------------------------------------------------------------------ uniform
def _quantize_uniform(x: jax.Array, spec: Uniform) -> QArray:
    bits = spec.bits
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(x.astype(jnp.float32))
    if spec.symmetric:
        absmax = jnp.max(jnp.abs(rows), axis=1)
        if bits == 1:  # levels -1, +1
            grid = (-1.0, 2.0)
            scale = _round_dtype(absmax, spec.scale_dtype)
            codes = (rows >= 0).astype(jnp.int32)
        else:  # levels -qmax..qmax
            qmax = (1 << (bits - 1)) - 1
            grid = (float(-qmax), 1.0)
            scale = _round_dtype(absmax / qmax, spec.scale_dtype)
            safe = jnp.where(scale > 0, scale, 1.0)
            codes = jnp.clip(jnp.round(rows / safe[:, None]), -qmax, qmax).astype(jnp.int32) + qmax
        return _build(spec, x, codes, None, scale, None, bits, spec.levels, "uniform", layout,
                      grid)
    n = 1 << bits
    hi = jnp.maximum(rows.max(axis=1), 0.0)
    lo = jnp.minimum(rows.min(axis=1), 0.0)
    scale = _round_dtype((hi - lo) / (n - 1), spec.scale_dtype)
    safe = jnp.where(scale > 0, scale, 1.0)
    zp = jnp.clip(jnp.round(-lo / safe), 0, n - 1)
    loc = _round_dtype(-(zp * scale), spec.scale_dtype)
    codes = jnp.clip(jnp.round(rows / safe[:, None]) + zp[:, None], 0, n - 1).astype(jnp.int32)
    # a constant group decodes exactly: scale 0 and the value itself as location
    const = rows.max(axis=1) == rows.min(axis=1)
    scale = jnp.where(const, 0.0, scale)
    loc = jnp.where(const, _round_dtype(rows[:, 0], spec.scale_dtype), loc)
    return _build(spec, x, codes, None, scale, loc, bits, n, "uniform", layout, (0.0, 1.0))


def _quantize_nf4(x: jax.Array, spec: NF4) -> QArray:
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(x.astype(jnp.float32))
    codebook = jnp.asarray(nf4_levels())
    scale = _round_dtype(jnp.max(jnp.abs(rows), axis=1), spec.scale_dtype)
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = nx.bucketize(rows / safe[:, None], 0.5 * (codebook[1:] + codebook[:-1]))
    return _build(spec, x, codes, codebook, scale, None, 4, 16, "nf4", layout)


# Compiled once per (shape, dtype, spec); inside a caller's jit they are simply inlined.
_QUANTIZERS = {
    Scalar: _quantize_scalar,
    Uniform: jax.jit(_quantize_uniform, static_argnums=1),
    NF4: jax.jit(_quantize_nf4, static_argnums=1),
}

_spec.register_leaf(QArray)
for _cls, _fn in _QUANTIZERS.items():
    _spec.register_quantizer(_cls, lambda x, spec, key, _fn=_fn: _fn(x, spec))
