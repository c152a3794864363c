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
from . import _checks
from . import _numerics as nx
from . import bitpack
from . import distributions as D
from . import search as S
from . import spec as _spec
from .qarray import QArray, layout_for, outlier_values, pack_positions, record_nonfinite
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


def _build(spec, x, codes, codebook, scale, loc, bits, n, method, layout, grid=None,
           finite=None, traced=False) -> QArray:
    """The QArray; under a trace (``traced``), the positions of non-finite values are recorded
    (:func:`distq.core.qarray.record_nonfinite`) so that they decode as NaN."""
    nonfinite = None
    if traced:
        nonfinite, overflow = record_nonfinite(~finite)
        scale = jnp.where(overflow, -scale, scale)  # (-0.0 too: the sign bit marks the group)
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
        nonfinite=nonfinite,
    )


# ------------------------------------------------------------------- magnitudes and non-finite
# Every quantiser works on each group's values scaled by a power of two, 2**k, so that their
# largest finite magnitude lies in [1, 2) ("unit space"; exact, subnormal values included), and
# stores its scales and locations scaled back by 2**-k. Statistics, squares and divisions then
# never leave float32's normal range, and a value's code does not depend on its magnitude.
# Non-finite values (possible only under a trace: outside one the input is checked) are replaced
# by 0 there and excluded from every statistic and fit.
def _unit_rows(rows: jax.Array):
    """``(finite mask, k per group, rows in unit space with non-finite values as 0)``."""
    finite = jnp.isfinite(rows)
    safe = jnp.where(finite, rows, 0.0)
    k = -_checks.max_exponent(safe, axis=1)
    return finite, k, _checks.ldexp(safe, k[:, None])


def _stored(v_unit: jax.Array, k: jax.Array, dtype: str):
    """A per-group unit-space quantity as stored (true units, rounded to ``dtype``; 0 below the
    normal range, inf above it) and the stored value back in unit space (what encoding uses,
    so that codes agree with the stored scale)."""
    stored = _round_dtype(_checks.ldexp(v_unit, -k), dtype)
    return stored, _checks.ldexp(stored, k)


def _safe_scale(used: jax.Array, computed: jax.Array) -> jax.Array:
    """The unit-space scale codes are taken with: the stored one, or where that is 0 (a group
    too small to store, see :func:`_diagnose`) the computed one, so its codes stay meaningful;
    1 for an all-zero group."""
    return jnp.where(used > 0, used, jnp.where(computed > 0, computed, 1.0))


def _dtype_range(dtype: str) -> tuple[float, float]:
    info = jnp.finfo(dtype)
    return float(info.tiny), float(info.max)


def _diagnose(spec, k, amax_u, scale_u, scale, gap, ext_u, live, finite, const=None,
              const_u=None, const_stored=None):
    """Problems a concrete input is refused for (see :func:`_raise_problems`), as a few scalars:
    ``(flags, non-finite count, the first bad group's [amax, step, scale, extreme] in unit
    space, its k)``.

    ``scale_u``: each group's scale in unit space as computed, ``scale``: as stored (true
    units, 0 or inf where it is out of range); ``gap``: the smallest distance between levels,
    so that ``scale * gap`` is the step between decoded values; ``ext_u``: the largest decoded
    magnitude or intermediate product in unit space; ``live``: groups whose scale matters (not
    constant, not all zero); ``const*``: constant groups and their value (unit, stored)."""
    tiny, big = _dtype_range(spec.scale_dtype)
    step_u = scale_u * gap
    # a group whose largest magnitude is below 2**-24 of the array's may fall below the range
    # (it then decodes as 0, or its location): its error is below float32's resolution at the
    # array's scale. Overflow is refused everywhere.
    e = jnp.where(amax_u > 0, _checks.exponent(amax_u) - k, jnp.iinfo(jnp.int32).min // 2)
    small = e < jnp.max(e) - 24
    p_scale = live & ((~small & ~(scale >= tiny)) | ~(scale <= big))
    p_step = live & ~small & ~(_checks.ldexp(step_u, -k) >= _checks.F32_TINY)
    p_ext = ~(_checks.ldexp(ext_u, -k) <= _checks.F32_MAX)
    p_const = jnp.zeros_like(live)
    if const is not None:
        mag = jnp.abs(const_stored)
        p_const = const & (const_u != 0) & ((~small & ~(mag >= tiny)) | ~(mag <= big))
    flags = (jnp.any(p_scale).astype(jnp.int32) | (jnp.any(p_step).astype(jnp.int32) << 1)
             | (jnp.any(p_ext).astype(jnp.int32) << 2) | (jnp.any(p_const).astype(jnp.int32) << 3))
    i = jnp.argmax(p_ext)  # the reported group: one with the problem the message names
    for p in (p_step, p_const, p_scale):
        i = jnp.where(jnp.any(p), jnp.argmax(p), i)
    vals = jnp.stack([amax_u[i], step_u[i], scale_u[i], ext_u[i]])
    return flags, jnp.sum(~finite), vals, k[i]


def _group_range(spec) -> tuple[str, float, float] | None:
    """What a (non-zero) group of a Uniform/NF4 spec must keep within which bounds: its largest
    magnitude, or for an affine grid its span ``max(x, 0) - min(x, 0)``."""
    tiny, big = _dtype_range(spec.scale_dtype)
    if isinstance(spec, NF4):
        return "largest magnitude", max(tiny, _checks.F32_TINY / _NF4_GAP), big
    if isinstance(spec, Uniform):
        if spec.symmetric:
            q = 1 if spec.bits == 1 else (1 << (spec.bits - 1)) - 1
            return "largest magnitude", max(tiny, _checks.F32_TINY) * q, min(
                big * q, _checks.F32_MAX)
        q = (1 << spec.bits) - 1
        return "span max(x, 0) - min(x, 0)", max(tiny, _checks.F32_TINY) * q, min(
            big * q, _checks.F32_MAX)
    return None


def _raise_problems(spec, diag, name: str) -> None:
    """Raises a ``ValueError`` naming the range for an input a spec cannot represent."""
    flags, bad, vals, k = jax.device_get(diag)
    if int(bad):
        raise ValueError(f"x contains {int(bad)} NaN/inf value(s); quantisation needs finite "
                         "input (mask or replace them first)")
    flags = int(flags)
    if not flags:
        return
    amax, step, scale, ext = (math.ldexp(float(v), -int(k)) for v in vals)
    tiny, big = _dtype_range(spec.scale_dtype)
    fix = ("multiply the array by a power of two first (and divide what dequantize returns "
           "by it)")
    rng = _group_range(spec)
    need = ""
    if rng is not None:
        what, lo, hi = rng
        need = (f" (this spec needs each group's {what} to be 0 or "
                + (f"at least {lo:.3g})" if hi >= _checks.F32_MAX else
                   f"in [{lo:.3g}, {hi:.4g}])"))
    if flags & 1:
        raise ValueError(
            f"{name} cannot represent this array: a group with largest magnitude {amax:.3g} "
            f"needs a scale of {scale:.3g}, outside {spec.scale_dtype}'s normal range "
            f"[{tiny:.3g}, {big:.4g}]{need}; {fix}"
            + ("" if spec.scale_dtype != "float16" else ", or use scale_dtype='float32'"))
    if flags & 8:
        raise ValueError(
            f"{name} cannot represent this array: a constant group's value {amax:.3g} lies "
            f"outside {spec.scale_dtype}'s normal range [{tiny:.3g}, {big:.4g}], where it is "
            f"stored (XLA flushes float32 numbers below {_checks.F32_TINY:.3g} to zero); {fix}")
    if flags & 2:
        raise ValueError(
            f"{name} cannot represent this array: a group with largest magnitude {amax:.3g} "
            f"would have {step:.3g} between its decoded levels, below float32's smallest normal "
            f"number {_checks.F32_TINY:.3g} (XLA flushes smaller numbers to zero, so the group "
            f"would decode wrongly){need}; {fix}")
    span = ("" if not isinstance(spec, Uniform) or spec.symmetric else
            " (a group's span max(x, 0) - min(x, 0) must stay below it; symmetric=True needs "
            "only its largest magnitude to)")
    raise ValueError(
        f"{name} cannot represent this array: a group with largest magnitude {amax:.3g} would "
        f"decode through values up to {ext:.3g} (scale x level + location), beyond float32's "
        f"largest number {_checks.F32_MAX:.4g}{span}; {fix}")


def _checked(fn):
    """The registered quantiser: runs ``fn(x, spec, traced)``; outside a trace it refuses input
    that is not finite or out of the spec's range (``ValueError``), and the QArray records the
    caller's dtype (``x`` may be a NumPy float64 array, which JAX holds as float32)."""

    def quantize(x, spec, key=None):
        del key
        dtype = _checks.dtype_name(x)
        traced = not _checks.is_concrete(x)
        if not traced:  # float64 beyond float32's range: refused by name, not as "NaN/inf"
            x = _checks.check_float32_range(x)
            if dtype != "float32":  # float32 before the jitted stages: one compilation per
                x = jnp.asarray(x).astype(jnp.float32)  # shape, whatever the input's dtype
        resolved = spec.resolve(tuple(np.shape(x)))
        q, diag = fn(x, resolved, traced)
        if not traced:
            _raise_problems(resolved, diag, _spec.spec_str(spec))
        return q if q.dtype == dtype else dataclasses.replace(q, dtype=dtype)

    return quantize


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


def _masked_moments(u: jax.Array, finite: jax.Array, length: int):
    """Mean and standard deviation per row over the finite values only (sample std, ddof 1,
    for rows of more than one value)."""
    cnt = jnp.sum(finite, axis=1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(finite, u, 0.0), axis=1) / jnp.maximum(cnt, 1.0)
    dev = jnp.where(finite, u - mean[:, None], 0.0)
    ddof = 1.0 if length > 1 else 0.0
    var = jnp.sum(dev * dev, axis=1) / jnp.maximum(cnt - ddof, 1.0)
    return mean, jnp.sqrt(var)


def _prepare_scalar(x: jax.Array, spec: Scalar):
    """Stage 1 (compiled per shape, cheap): group statistics and the sorted fitting samples.

    Everything is computed in each group's unit space (see :func:`_unit_rows`), over its finite
    values only (the others get zero weight in the fit)."""
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    g, length = rows.shape
    finite, k, u = _unit_rows(rows)
    cmax = jnp.max(jnp.where(finite, u, -jnp.inf), axis=1)
    const = cmax <= jnp.min(jnp.where(finite, u, jnp.inf), axis=1)  # (or no finite value)
    cmax = jnp.where(jnp.isfinite(cmax), cmax, 0.0)
    if spec.robust:
        un = jnp.where(finite, u, jnp.nan)
        centre = jnp.nanmedian(un, axis=1)
        spread = 1.482602218505602 * jnp.nanmedian(jnp.abs(un - centre[:, None]), axis=1)
        # a group whose MAD is 0 (mostly one value) falls back to its standard deviation
        spread = jnp.where(spread > 0, spread, _masked_moments(u, finite, length)[1])
        centre = jnp.where(jnp.isfinite(centre), centre, 0.0)
    else:
        centre, spread = _masked_moments(u, finite, length)
    live = (spread > 0) & ~const
    spread0 = spread
    spread, spread_u = _stored(jnp.where(live, spread, 1.0), k, spec.scale_dtype)
    spread_u = jnp.where(live, spread_u, 1.0)  # (constant groups: any unit, they decode as loc)
    centre, centre_u = _stored(centre, k, spec.scale_dtype)
    loc0 = _round_dtype(jnp.full((g,), 0.0 if spec.zero is None else spec.zero, jnp.float32),
                        spec.scale_dtype)
    loc0_u = _checks.ldexp(loc0, k)
    safe_u = _safe_scale(spread_u, jnp.where(live, spread0, 1.0))

    classes = {_unit_class(spec, d.family) for d in spec.candidate_dists()}
    zsorted, weights = {}, {}
    w_fit = finite.astype(jnp.float32)
    if g > 1:
        # each group's values weigh as its scale (squared for "mse") relative to the largest,
        # so that the shared codebook minimises the error in the data's own units
        e = _checks.exponent(safe_u) - k
        e_top = jnp.max(jnp.where(live, e, jnp.iinfo(jnp.int32).min))
        rel = jnp.where(live, _checks.ldexp(safe_u, -k - e_top), 0.0)
        rel = jnp.where(jnp.any(live), rel, 1.0)
        w_fit = w_fit * (rel * rel if spec.objective == "mse" else rel)[:, None]
    w_fit = w_fit.reshape(-1)
    k_out = spec.n_outliers(g * length)
    out_idx = None
    if k_out:
        # the k values farthest from their group's centre; the codebook is fitted without them
        dev = jnp.abs((u - centre_u[:, None]) / safe_u[:, None])
        dev = jnp.where(finite, dev, -1.0).reshape(-1)
        _, out_idx = jax.lax.top_k(dev, k_out)
        w_fit = w_fit.at[out_idx].set(0.0)
    w_fit = _strided_sample(w_fit, spec.fit_size)
    bucket = _fit_bucket(min(g * length, spec.fit_size), spec.fit_size)
    for cls, loc in (("A", centre_u), ("B", loc0_u)):
        if cls not in classes:
            continue
        z = ((u - loc[:, None]) / safe_u[:, None]).reshape(-1)
        z = _strided_sample(z, spec.fit_size)
        # non-finite values sit with zero weight among the largest values, where the padding
        # goes too: the weighted sample is the same as without them
        ok = _strided_sample(finite.reshape(-1), spec.fit_size)
        top = jnp.max(jnp.where(ok, z, -jnp.inf))
        z = jnp.where(ok, z, jnp.where(jnp.isfinite(top), top, 0.0))
        zs, w = nx.sort_float(z, w_fit)
        zsorted[cls], weights[cls] = _pad_sorted(zs, w, bucket)
    stats = (k, centre, centre_u, spread, spread0, safe_u, loc0, loc0_u, live, const, cmax,
             finite, out_idx)
    return stats, zsorted, weights


def _encode_scalar(x, spec: Scalar, stats, codebook, use_a, traced: bool = False):
    """Stage 3 (compiled per shape, cheap): codes against the fitted codebook."""
    (k, centre, centre_u, spread, spread0, safe_u, loc0, loc0_u, live, const, cmax, finite,
     out_idx) = stats
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    u = _checks.ldexp(jnp.where(finite, rows, 0.0), k[:, None])
    loc_u = jnp.where(use_a, centre_u, loc0_u)
    z = (u - loc_u[:, None]) / safe_u[:, None]
    codes = nx.bucketize(z, 0.5 * (codebook[1:] + codebook[:-1]))
    scale = jnp.where(const, 0.0, spread)
    cval = _round_dtype(_checks.ldexp(cmax, -k), spec.scale_dtype)
    loc = jnp.where(const, cval, jnp.where(use_a, centre, loc0))
    # the smallest distance between distinct levels (a refined codebook may repeat one)
    d = codebook[1:] - codebook[:-1]
    gap = jnp.min(jnp.where(d > 0, d, jnp.inf)) if spec.levels > 1 else jnp.float32(jnp.inf)
    lv_max = jnp.maximum(jnp.abs(codebook[0]), jnp.abs(codebook[-1]))
    ext = jnp.where(const, jnp.abs(cmax), jnp.abs(loc_u) + safe_u * lv_max)
    amax = jnp.max(jnp.abs(u), axis=1)
    diag = _diagnose(spec, k, amax, spread0, scale, gap, ext, live, finite, const, cmax, cval)
    q = _build(spec, x, codes, codebook, scale, loc, spec.code_bits, spec.levels,
               "distributional", layout, None, finite, traced)
    if out_idx is None:
        return q, diag
    idx = out_idx.astype(jnp.uint32)
    return dataclasses.replace(q, outlier_index=pack_positions(idx, q.index_bits),
                               outlier_value=outlier_values(z.reshape(-1)[out_idx]),
                               n_outliers=int(out_idx.shape[0])), diag


# The three stages are compiled separately: the expensive one (search + Lloyd-Max, stage 2)
# sees only the padded sorted sample, so it compiles once per (spec, bucket) instead of once per
# tensor shape. Inside a caller's jit they are inlined into one computation.
_prepare_jit = jax.jit(_prepare_scalar, static_argnums=1)
_fit_jit = jax.jit(_fit_codebook, static_argnums=(2, 3))
_encode_jit = jax.jit(_encode_scalar, static_argnums=(1, 5))


def _quantize_scalar(x: jax.Array, spec: Scalar, traced: bool = False):
    spec = spec.resolve(tuple(x.shape))
    stats, zsorted, weights = _prepare_jit(x, spec)
    codebook, use_a = _fit_jit(zsorted, weights, spec, spec.levels)
    return _encode_jit(x, spec, stats, codebook, use_a, traced)


# ------------------------------------------------------------------------------------ uniform
def _quantize_uniform(x: jax.Array, spec: Uniform, traced: bool = False):
    bits = spec.bits
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    finite, k, u = _unit_rows(rows)
    if spec.symmetric:
        amax = jnp.max(jnp.abs(u), axis=1)
        if bits == 1:  # levels -1, +1
            grid, qmax = (-1.0, 2.0), 1
            scale, s_used = _stored(amax, k, spec.scale_dtype)
            codes = (u >= 0).astype(jnp.int32)
        else:  # levels -qmax..qmax
            qmax = (1 << (bits - 1)) - 1
            grid = (float(-qmax), 1.0)
            scale, s_used = _stored(amax / qmax, k, spec.scale_dtype)
            safe = _safe_scale(s_used, amax / qmax)
            codes = jnp.clip(jnp.round(u / safe[:, None]), -qmax, qmax).astype(jnp.int32) + qmax
        diag = _diagnose(spec, k, amax, amax / qmax, scale, 1.0, s_used * qmax, amax > 0,
                         finite)
        return _build(spec, x, codes, None, scale, None, bits, spec.levels, "uniform", layout,
                      grid, finite, traced), diag
    n = 1 << bits
    hi = jnp.maximum(u.max(axis=1), 0.0)  # (non-finite values are 0 in u: no effect here)
    lo = jnp.minimum(u.min(axis=1), 0.0)
    scale, s_used = _stored((hi - lo) / (n - 1), k, spec.scale_dtype)
    safe = _safe_scale(s_used, (hi - lo) / (n - 1))
    zp = jnp.clip(jnp.round(-lo / safe), 0, n - 1)
    loc, loc_used = _stored(-(zp * s_used), k, spec.scale_dtype)
    codes = jnp.clip(jnp.round(u / safe[:, None]) + zp[:, None], 0, n - 1).astype(jnp.int32)
    # a constant group decodes exactly: scale 0 and the value itself as location
    cval = jnp.max(jnp.where(finite, u, -jnp.inf), axis=1)
    const = cval <= jnp.min(jnp.where(finite, u, jnp.inf), axis=1)
    cval = jnp.where(jnp.isfinite(cval), cval, 0.0)
    cval_stored = _round_dtype(_checks.ldexp(cval, -k), spec.scale_dtype)
    scale = jnp.where(const, 0.0, scale)
    loc = jnp.where(const, cval_stored, loc)
    # decoding computes scale * code, then adds loc: both must stay finite
    ext = jnp.maximum(jnp.abs(loc_used), s_used * (n - 1))
    ext = jnp.where(const, jnp.abs(cval), ext)
    diag = _diagnose(spec, k, jnp.max(jnp.abs(u), axis=1), (hi - lo) / (n - 1), scale, 1.0,
                     ext, ~const, finite, const, cval, cval_stored)
    return _build(spec, x, codes, None, scale, loc, bits, n, "uniform", layout, (0.0, 1.0),
                  finite, traced), diag


_NF4_GAP = float(np.min(np.diff(nf4_levels())))


def _quantize_nf4(x: jax.Array, spec: NF4, traced: bool = False):
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    finite, k, u = _unit_rows(rows)
    codebook = jnp.asarray(nf4_levels())
    amax = jnp.max(jnp.abs(u), axis=1)
    scale, s_used = _stored(amax, k, spec.scale_dtype)
    safe = _safe_scale(s_used, amax)
    codes = nx.bucketize(u / safe[:, None], 0.5 * (codebook[1:] + codebook[:-1]))
    diag = _diagnose(spec, k, amax, amax, scale, _NF4_GAP, s_used, amax > 0, finite)
    return _build(spec, x, codes, codebook, scale, None, 4, 16, "nf4", layout, None, finite,
                  traced), diag


# Compiled once per (shape, dtype, spec); inside a caller's jit they are simply inlined.
_QUANTIZERS = {
    Scalar: _quantize_scalar,
    Uniform: jax.jit(_quantize_uniform, static_argnums=(1, 2)),
    NF4: jax.jit(_quantize_nf4, static_argnums=(1, 2)),
}

_spec.register_leaf(QArray)
for _cls, _fn in _QUANTIZERS.items():
    _spec.register_quantizer(_cls, _checked(_fn))
