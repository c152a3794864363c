"""Scalar quantisers: distributional codebooks with Lloyd-Max refinement, uniform integers, NF4.

Three frozen, hashable specs (usable as static ``jax.jit`` arguments) and one entry point,
:func:`quantize`, returning a :class:`distq.QArray`.

The distributional pipeline (:class:`Scalar`), per tensor, channel or group of values:

1. Standardise: location and spread per group (mean and std, or median and 1.4826 MAD if
   ``robust``); each family maps them to its own location/scale (:mod:`distq.distributions`).
2. Codebook from the prior: ``n`` levels ``G_p^{-1}((c + 1/2) / n)`` scaled by ``beta``.
3. ``beta=None``: grid over the reference's 37 values, then a zoom on ``log beta``; ``dist=None``:
   the same over every family. Both score all candidates on the same data with prefix sums,
   in one jitted computation, under the chosen ``objective``. Up to 64 levels the data is a
   fine histogram of (a sample of at most ``2**20`` of) the standardised values, read as a
   piecewise-uniform density (:class:`distq.core._numerics.Density`); finer codebooks use the
   sorted values themselves (at most ``fit_size``).
4. ``refine=True``: Lloyd-Max iterations from the companding levels to the codebook that is
   optimal for the data at hand (centroids for "mse", medians for "mae").
5. Encode every value to its nearest level (always in range), bit-pack the codes.

Stages 1 and 3 (statistics, outliers and fitting data; encoding) are compiled per tensor
shape, stage 2 (the search and Lloyd-Max) once per codebook configuration (see
:func:`_fit_spec`) whatever the shape. Outside a trace they run as separate computations
(with a few steps on the host, see :func:`_outliers_host`, :func:`_finish_eager`); under a
caller's ``jit`` they are one, which keeps every pass over the values fused (no tensor-sized
temporaries), so that a sharded tensor needs about its shard's memory per device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from . import _checks
from . import _numerics as nx
from . import bitpack
from . import distributions as D
from . import entropy as E
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


def _build(spec, x, codes, codebook, scale, loc, bits, n, method, layout, grid=None,
           nonfinite=None, pack: bool = True) -> QArray:
    """The QArray; a group that held non-finite values (``nonfinite``; possible only under a
    trace) gets the sign bit of its scale set (-0.0 too), so that it decodes as NaN.
    ``pack=False``: the codes are left unpacked (uint8/uint16), for :func:`_finish_eager`."""
    if nonfinite is not None:
        scale = jnp.where(nonfinite, -scale, scale)
    return QArray(
        codes=_pack(codes, bits) if pack else codes.astype(
            jnp.uint8 if bits <= 8 else jnp.uint16),
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


# ------------------------------------------------------------------- magnitudes and non-finite
# Every quantiser works on each group's values scaled by a power of two, 2**k, so that their
# largest finite magnitude lies in [1, 2) ("unit space"; exact, subnormal values included), and
# stores its scales and locations scaled back by 2**-k. Statistics, squares and divisions then
# never leave float32's normal range, and a value's code does not depend on its magnitude.
# Non-finite values (possible only under a trace: outside one the input is checked) are replaced
# by 0 there and excluded from every statistic and fit.
_INF_BITS = 0x7F800000  # magnitude bits at and above: inf, NaN


class _Summary(NamedTuple):
    """Per group: the power of two ``k`` of the unit space, the largest finite magnitude and the
    largest and smallest finite value there, whether it is constant (or has no finite value),
    and whether it held non-finite values."""

    k: jax.Array
    amax: jax.Array
    hi: jax.Array
    lo: jax.Array
    const: jax.Array
    nonfinite: jax.Array


def _summary(rows: jax.Array) -> _Summary:
    """One pass over the values: a variadic reduction of three maxima (separate reductions of
    the same values, or more operands, run several times slower on XLA:CPU), and no
    communication between the shards of a sharded array beyond the groups' own.

    XLA's float comparisons see a subnormal value as 0, so they are taken by its mantissa (an
    integer below ``2**23``, exactly a float): a group of subnormal values still gets its exact
    largest magnitude; their extremes are then exact to ``2**-126``, far below what a group
    whose scale is representable can resolve."""
    b = jax.lax.bitcast_convert_type(rows, jnp.int32)
    fin = jnp.isfinite(rows)
    big = jnp.float32(_checks.F32_MAX)  # (not inf: a select of -inf stops the vectorising)
    # a subnormal value's mantissa; 2**24 (above any) where a value is not finite
    odd = jnp.where(fin, jnp.where((b & _INF_BITS) == 0, (b & 0x7FFFFF).astype(jnp.float32),
                                   0.0), jnp.float32(2.0 ** 24))
    ops = (jnp.where(fin, rows, -big), jnp.where(fin, -rows, -big), odd)
    hi, neg_lo, odd = jax.lax.reduce(ops, (-big, -big, jnp.float32(0.0)),
                                     lambda p, q: tuple(jnp.maximum(a, c) for a, c in zip(p, q)),
                                     (1,))
    nonfinite = odd >= 2.0 ** 24
    some = hi >= -neg_lo  # any finite value
    amax = jnp.where(some, jnp.maximum(hi, neg_lo), 0.0)
    # all subnormal (or 0): the largest mantissa times 2**-149
    sub_only = (amax < _checks.F32_TINY) & (odd > 0) & ~nonfinite
    e = jnp.where(sub_only, _checks.exponent(odd) - 149, _checks.exponent(amax))
    k = -e
    amax_u = jnp.where(sub_only, _checks.ldexp(odd, k - 149), _checks.ldexp(amax, k))
    unit = lambda v: jnp.where(some, _checks.ldexp(v, k), 0.0)  # noqa: E731
    hi_u, lo_u = unit(hi), unit(-neg_lo)
    # (a group of subnormal values counts as varying: comparisons cannot tell)
    return _Summary(k, amax_u, hi_u, lo_u, ~(hi > -neg_lo) & ~sub_only, nonfinite)


def _fresh(rows: jax.Array, k: jax.Array, tag: int) -> jax.Array:
    """``rows``, through a select on a condition that is never true but that XLA cannot
    decide (a power of two below any ``k``), distinct per ``tag``. Each pass over the values
    computes from its own: XLA then cannot merge the (identical) unit-space computations of
    several passes into one shared array, which it would keep in memory (a tensor-sized
    temporary) instead of recomputing it inside each pass (a few operations a value).
    (An optimisation barrier does not survive XLA:CPU's pipeline long enough.)"""
    never = jnp.any(k < -(1 << 20) - tag)
    return jnp.where(never, jnp.float32(0.0), rows)


def _in_unit(rows: jax.Array, k: jax.Array, fn):
    """``fn(rows in unit space)``: the rows times ``2**k`` per group, exactly (subnormal values
    by their mantissa, which XLA would read as 0), non-finite values as 0; results below the
    normal range are 0. Fused into ``fn``'s pass over the values: a few operations each."""
    return fn(_to_unit(rows, k[:, None]))


def _to_unit(v: jax.Array, k: jax.Array) -> jax.Array:
    """``v * 2**k`` elementwise (``k`` broadcast to ``v``), as :func:`_in_unit` does it."""
    kn = jnp.clip(k, -126, 127)
    f1, f2 = _checks.pow2(kn), _checks.pow2(jnp.clip(k - kn, -1, 0))  # (2**k, k >= -127)
    g = jnp.where(k >= 23, _checks.pow2(jnp.clip(k - 149, -126, 0)), 0.0)  # subnormal: m * g
    b = jax.lax.bitcast_convert_type(v, jnp.int32)
    m = (b & 0x7FFFFF).astype(jnp.float32)
    sub = jnp.where(b < 0, -m, m) * g
    u = jnp.where((b & _INF_BITS) == 0, sub, v * f1 * f2)
    return jnp.where(jnp.isfinite(v), u, 0.0)


def _gather_unit(rows: jax.Array, k: jax.Array, pos: jax.Array):
    """Values at flat positions ``pos`` of ``rows`` in their group's unit space, whether each
    is finite, and its group: gathered from the input itself (a gather from a computed array
    would make XLA keep all of that array in memory)."""
    length = rows.shape[1]
    r, c = pos // length, pos % length
    v = rows[r, c]
    return _to_unit(v, k[r]), jnp.isfinite(v), r


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


def _diagnose(spec, k, amax_u, scale_u, scale, gap, ext_u, live, nonfinite, const=None,
              const_u=None, const_stored=None):
    """Problems a concrete input is refused for (see :func:`_raise_problems`), as a few scalars:
    ``(flags, groups holding non-finite values, the first bad group's [amax, step, scale,
    extreme] in unit space, its k)``.

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
    # (v * 2**-k, exactly, is a normal number iff v's exponent less k is at least -126, and
    # finite iff at most 127: compared on the exponents, nothing is scaled)
    p_step = live & ~small & ~((step_u > 0) & (_checks.exponent(step_u) - k >= -126))
    p_ext = ~(jnp.isfinite(ext_u) & (_checks.exponent(ext_u) - k <= 127))
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
    return flags, jnp.sum(nonfinite), vals, k[i]


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
        raise ValueError(f"x contains NaN/inf values (in {int(bad)} group(s)); quantisation "
                         "needs finite input (mask or replace them first)")
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
    """The registered quantiser: runs ``fn(x, spec, checked)``; outside a trace it refuses input
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
        q, diag = fn(x, resolved, not traced)
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
    """Stage 2 (compiled once per fit spec, see :func:`_fit_spec`): searches dist/beta per
    unit class, refines; returns (codebook, class_is_A).

    Per class, ``zsorted[cls]`` is either the int32 bin counts of
    :func:`distq.core._numerics.hist_edges` of the class's standardised values less
    ``weights[cls]``, a whole-number shift (the histogram path, see :func:`_use_hist`), or the
    sorted fitting sample with its weights (``None``: all 1)."""
    if _use_hist(spec):
        return _fit_hist(zsorted, weights, spec, n)
    return _fit_sorted(zsorted, weights, spec, n)


def _class_tables(spec: Scalar, cls: str, n: int, width: int):
    """The candidate tables of a unit class, padded to ``width`` dists (NaN betas)."""
    members = [d for d in spec.candidate_dists() if _unit_class(spec, d.family) == cls]
    T = np.zeros((width, n - 1), np.float32)
    L = np.zeros((width, n), np.float32)
    offs = np.zeros((width,), np.float32)
    muls = np.ones((width,), np.float32)
    betas = np.full((width, len(S.BETA_GRID)), np.nan, np.float32)
    if members:
        c = S.Candidates(members, n, np.zeros(len(members)), np.ones(len(members)), "nearest")
        k, nb = c.betas.shape
        T[:k], L[:k], betas[:k, :nb] = c.T, c.L, c.betas
        for i, d in enumerate(members):
            a = _family_affine(d.family)
            offs[i], muls[i] = (0.0 if cls == "B" else a[0]), a[1]
    return T, L, betas, offs, muls


def _fit_hist(hists: dict, shifts: dict, spec: Scalar, n: int):
    """:func:`_fit_codebook` on histograms: both unit classes are searched under one
    ``jax.vmap`` (one computation to compile), each class's candidates padded to the same
    number, then the better class's codebook is refined on its density."""
    classes = sorted(hists)
    members = {c: sum(_unit_class(spec, d.family) == c for d in spec.candidate_dists())
               for c in classes}
    width = max(members.values())
    nb = max(len(S.BETA_GRID), len(S.BETA_GRID_CAUCHY))
    tabs = [_class_tables(spec, c, n, width) for c in classes]
    T, L, betas, offs, muls = (np.stack(t) for t in zip(*tabs))
    if betas.shape[-1] < nb:
        betas = np.pad(betas, ((0, 0), (0, 0), (0, nb - betas.shape[-1])),
                       constant_values=np.nan)
    shift = jnp.stack([shifts[c] for c in classes])
    dens = nx.Density.build(jnp.stack([hists[c] for c in classes]))
    offs = jnp.asarray(offs) - shift[:, None]  # codebooks of y = z - shift

    def search(d, T, L, betas, offs, muls):
        cands = S.Candidates.from_tables(n, "nearest", T, L, betas, offs, muls)
        if spec.beta is None:
            row, b, e = S.grid_zoom_search(d, cands, spec.objective)
        else:
            rows = jnp.arange(width)
            bs = jnp.full((width,), spec.beta, jnp.float32)
            errs = S.score(d, cands, spec.objective, rows, bs)
            errs = jnp.where(jnp.isnan(betas[:, 0]), jnp.inf, errs)
            row = jnp.argmin(errs)
            b, e = bs[row], errs[row]
        return e, cands.codebooks(row, b)[1]

    errs, lvs = jax.vmap(search)(dens, jnp.asarray(T), jnp.asarray(L), jnp.asarray(betas),
                                 offs, jnp.asarray(muls))
    i = jnp.argmin(errs)  # (ties: class A, as the sorted path)
    use_a = jnp.asarray(classes[0] == "A") & (i == 0)
    lv, sh = lvs[i], shift[i]
    d = jax.tree_util.tree_map(lambda a: a[i], dens)
    fixed = None  # (levels are increasing: tables of increasing ppf times a positive scale)
    if spec.zero is not None:  # the level nearest to the (unit-space) zero sits on it
        j = jnp.argmin(jnp.abs(lv + sh))
        lv = lv.at[j].set(-sh)
        fixed = jnp.arange(n) == j
    if spec.refine and spec.max_iter > 0:
        lv, _ = nx.lloyd_density(d, lv, objective=spec.objective, fixed=fixed,
                                 max_iter=spec.max_iter)
    return lv + sh, use_a


def _fit_sorted(zsorted: dict, weights: dict, spec: Scalar, n: int):
    """:func:`_fit_codebook` on sorted samples (codebooks of more than 64 levels)."""
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
            err, row, col = S.grid_search(zs, cands, spec.objective, w, sums)
            b, e = S.zoom_search(zs, cands, spec.objective, row, col, w=w, sums=sums,
                                 best_e=err[row, col])
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


def _row_sums(a: jax.Array, b: jax.Array, lean: bool):
    """Sums of ``a`` and ``b`` along axis 1. ``lean`` (under a caller's trace, where the
    array may be a shard of a bigger one): in one variadic reduction, which XLA fuses with the
    computation of its operands; otherwise as two plain sums, which XLA:CPU runs ~10x faster
    in a library kernel that needs its operand in memory (a tensor-sized temporary, freed at
    the end of the stage)."""
    if not lean:
        return jnp.sum(a, axis=1), jnp.sum(b, axis=1)
    zero = jnp.float32(0.0)

    def add(p, q):  # ``a``'s sum with its rounding errors carried (Knuth's two-sum)
        s = p[0] + q[0]
        t = s - p[0]
        err = (p[0] - (s - t)) + (q[0] - t)
        return s, p[1] + q[1] + err, p[2] + q[2]

    # XLA:CPU runs a variadic reduction as one sequential loop per row: a plain float32 sum of
    # millions of values would lose most bits of each addend (8M unit values: 0.5 % off)
    s, err, sb = jax.lax.reduce((a, jnp.zeros_like(a), b), (zero, zero, zero), add, (1,))
    return s + err, sb


def _masked_moments(unit, finite: jax.Array, length: int, lean: bool = False):
    """Mean and standard deviation per row over the finite values only (sample std, ddof 1,
    for rows of more than one value); ``unit()`` gives the values in unit space, 0 for the
    others (``n_bad`` per row), whose share of the squared deviations (``mean**2`` each) is
    taken out. ``lean`` (under a caller's trace): see :func:`_row_sums`; otherwise the input
    is known to be finite (outside a trace anything else is refused) and nothing is counted."""
    ddof = 1.0 if length > 1 else 0.0
    if not lean:
        mean = jnp.sum(unit(), axis=1) / jnp.float32(length)
        dev = unit() - mean[:, None]
        ss = jnp.sum(dev * dev, axis=1)
        return mean, jnp.sqrt(ss / jnp.float32(max(length - ddof, 1.0)))
    s1, n_bad = _row_sums(unit(), jnp.where(finite, 0.0, 1.0), lean)
    mean = s1 / jnp.maximum(length - n_bad, 1.0)
    dev = unit() - mean[:, None]
    # (both sums of each reduction are used: XLA would otherwise drop one and hand the other
    # to the library kernel)
    ss, cnt = _row_sums(dev * dev, jnp.where(finite, 1.0, 0.0), lean)
    ss = jnp.maximum(ss - (length - cnt) * mean * mean, 0.0)
    return mean, jnp.sqrt(ss / jnp.maximum(cnt - ddof, 1.0))


_SETTLE_BITS = 12


def _settled(centre: jax.Array, spread: jax.Array):
    """``spread`` rounded to 12 significant bits, ``centre`` to a multiple of ``2**-12`` of it
    (unit space). A sum's last bits depend on the order of its additions, which XLA chooses
    (per device count and sharding); rounded, the same values give the same statistics, and so
    the same codebook and codes, whether the array is sharded or not (about 1e-4 of the spread
    is far below anything a codebook, fitted to the standardised values, can see). In unit
    space the spread's exponent lies far inside float32's range, so the grid's power of two
    and its inverse are plain (exact) factors."""
    e = jnp.clip(_checks.exponent(spread) - (_SETTLE_BITS - 1), -100, 100)
    up, down = _checks.pow2(-e), _checks.pow2(e)

    def to_grid(v):  # v rounded to a multiple of 2**e
        return jnp.round(v * up) * down

    live = spread > 0
    return jnp.where(live, to_grid(centre), centre), jnp.where(live, to_grid(spread), spread)


def _group_stats(x: jax.Array, spec: Scalar, checked: bool = False):
    """Stage 1a (compiled per shape): each group's statistics, as the tuple that stage 3
    (:func:`_encode_scalar`) takes, less the outliers' positions (``None``), and the fit's
    per-group weights (see :func:`_histograms`).

    Everything is computed in each group's unit space (see :func:`_summary`), over its finite
    values only. ``checked``: the input is known to be finite (outside a trace, where anything
    else is refused), so nothing is counted and an unweighted sample of one group needs no
    weights (the fit is faster without); otherwise (under a caller's trace, where the array
    may be a shard of a bigger one) every pass is fused with the computation of its values
    (see :func:`_fresh`, :func:`_row_sums`): no tensor-sized temporaries."""
    rows = _rows_of(x, spec)
    g, length = rows.shape
    sm = _summary(rows)
    k, const = sm.k, sm.const
    tags = iter(range(1, 100))

    def unit():  # the rows in unit space; under a trace recomputed by each pass (_fresh)
        return _in_unit(rows if checked else _fresh(rows, k, next(tags)), k, lambda v: v)

    finite = jnp.isfinite(rows)
    if spec.robust:
        un = jnp.where(finite, unit(), jnp.nan)
        centre = jnp.nanmedian(un, axis=1)
        spread = 1.482602218505602 * jnp.nanmedian(jnp.abs(un - centre[:, None]), axis=1)
        # a group whose MAD is 0 (mostly one value) falls back to its standard deviation
        spread = jnp.where(spread > 0, spread,
                           _masked_moments(unit, finite, length, not checked)[1])
        centre = jnp.where(jnp.isfinite(centre), centre, 0.0)
    else:
        centre, spread = _masked_moments(unit, finite, length, not checked)
    centre, spread = _settled(centre, spread)
    live = (spread > 0) & ~const
    spread0 = spread
    spread, spread_u = _stored(jnp.where(live, spread, 1.0), k, spec.scale_dtype)
    spread_u = jnp.where(live, spread_u, 1.0)  # (constant groups: any unit, they decode as loc)
    centre, centre_u = _stored(centre, k, spec.scale_dtype)
    loc0 = _round_dtype(jnp.full((g,), 0.0 if spec.zero is None else spec.zero, jnp.float32),
                        spec.scale_dtype)
    loc0_u = _checks.ldexp(loc0, k) if spec.zero else jnp.zeros((g,), jnp.float32)
    safe_u = _safe_scale(spread_u, jnp.where(live, spread0, 1.0))
    rel_w = None  # per-group weights of the fit (None: every value weighs the same)
    if g > 1:
        # each group's values weigh as its scale (squared for "mse") relative to the largest,
        # so that the shared codebook minimises the error in the data's own units
        e = _checks.exponent(safe_u) - k
        e_top = jnp.max(jnp.where(live, e, jnp.iinfo(jnp.int32).min))
        rel = jnp.where(live, _checks.ldexp(safe_u, -k - e_top), 0.0)
        rel = jnp.where(jnp.any(live), rel, 1.0)
        rel_w = rel * rel if spec.objective == "mse" else rel
    stats = (k, centre, centre_u, spread, spread0, safe_u, loc0, loc0_u, live, const, sm.hi,
             sm.amax, sm.nonfinite, None)
    return stats, rel_w


def _fit_data(x: jax.Array, spec: Scalar, checked: bool, stats, rel_w, out_idx=None):
    """Stage 1c (compiled per shape): the fitting data of stage 2 (see :func:`_fit_codebook`)
    and the outliers' positions: ``out_idx`` when given (found outside, see
    :func:`_outliers_host`), else found here (see :func:`_outliers`); the codebook is fitted
    without them."""
    rows = _rows_of(x, spec)
    g, length = rows.shape
    k, _, centre_u, _, _, safe_u, _, loc0_u, live = stats[:9]
    k_out = spec.n_outliers(g * length)
    if k_out and out_idx is None:
        out_idx = _outliers(rows, k, centre_u, safe_u, k_out, lean=not checked)
    classes = {_unit_class(spec, d.family) for d in spec.candidate_dists()}
    locs = {"A": centre_u, "B": loc0_u}
    if _use_hist(spec):
        zsorted, weights = _histograms(rows, k, locs, safe_u, live, rel_w, out_idx, classes,
                                       checked)
    else:
        u = _in_unit(rows, k, lambda v: v)
        zsorted, weights = _sorted_samples(u, jnp.isfinite(rows), locs, safe_u, rel_w,
                                           out_idx, classes, checked, spec.fit_size)
    return zsorted, weights, out_idx


def _prepare_scalar(x: jax.Array, spec: Scalar, checked: bool = False):
    """Stage 1 in one computation: statistics (:func:`_group_stats`) and fitting data with
    the outliers (:func:`_fit_data`); returns ``(stats, zsorted, weights)``."""
    stats, rel_w = _group_stats(x, spec, checked)
    zsorted, weights, out_idx = _fit_data(x, spec, checked, stats, rel_w)
    return stats[:-1] + (out_idx,), zsorted, weights


def _use_hist(spec: Scalar) -> bool:
    """Whether the codebook is fitted to a histogram (up to 64 levels, see
    :func:`_histograms`) rather than to sorted values (finer codebooks need finer data)."""
    return spec.levels <= _HIST_MAX_LEVELS


_HIST_MAX_LEVELS = 64
_HIST_SAMPLE = 1 << 20  # values binned at most (a strided sample of bigger tensors)
_HIST_WEIGHT = 2047  # largest integer weight of a value: 2047 * 2**20 sums within int32


def _strided(v: jax.Array, size: int) -> jax.Array:
    """``v[::stride][:size]`` for ``stride = len(v) // size`` as a reshape and a slice (which
    stays with each shard of a sharded ``v``, where a strided slice may gather it)."""
    n = v.shape[0]
    if n <= size:
        return v
    stride = n // size
    return v[: size * stride].reshape(size, stride)[:, 0]


def _histograms(rows, k, locs, safe_u, live, rel_w, out_idx, classes, checked):
    """Stage 1's fitting data on the histogram path: per unit class, the int32 counts of the
    bins of :func:`distq.core._numerics.hist_edges` of a strided sample of at most
    ``2**20`` standardised values (each value's weight an integer 1..2047 in proportion to
    its group's, 0 for non-finite values and outliers), and the whole-number shift taken off
    them first (0 for class A; for class B the middle of the groups' centres, so that values
    far from ``zero`` are still binned finely).

    Integer counts add up exactly in any order: a sharded array gets the same histogram, and
    so the same codebook and codes, as on one device, with nothing gathered."""
    g, length = rows.shape
    n = g * length
    size = min(n, _HIST_SAMPLE)
    stride = n // size
    grp = (jnp.arange(size, dtype=jnp.int32) * stride) // length
    v = _strided(rows.reshape(-1), size)
    us = _to_unit(v, k[grp])
    w = jnp.isfinite(v).astype(jnp.int32)
    if rel_w is not None:
        wi = jnp.clip(jnp.ceil(rel_w * _HIST_WEIGHT), 1, _HIST_WEIGHT).astype(jnp.int32)
        w = w * jnp.where(rel_w > 0, wi, 0)[grp]
    elif checked:
        w = jnp.ones((size,), jnp.int32)
    if out_idx is not None:  # (an outlier at a sampled position leaves the sample)
        hit = jnp.where(out_idx % stride == 0, out_idx // stride, size)
        w = w.at[hit].set(0, mode="drop")
    hists, shifts = {}, {}
    for cls in sorted(classes):
        loc = locs[cls]
        shift = jnp.float32(0.0)
        if cls == "B":  # (class A is centred on each group's own centre)
            d = (locs["A"] - loc) / safe_u
            hi = jnp.max(jnp.where(live, d, -jnp.inf))
            lo = jnp.min(jnp.where(live, d, jnp.inf))
            mid = jnp.round(0.5 * hi + 0.5 * lo)
            shift = jnp.where(jnp.isfinite(mid), mid, 0.0)
        y = (us - loc[grp]) / safe_u[grp] - shift
        b = nx.hist_bin(jnp.where(w > 0, y, 0.0))
        hists[cls] = jnp.zeros((nx.HIST_BINS,), jnp.int32).at[b].add(w)
        shifts[cls] = shift
    return hists, shifts


def _sorted_samples(u, finite, locs, safe_u, rel_w, out_idx, classes, checked, fit_size):
    """Stage 1's fitting data for codebooks of more than 64 levels: per unit class, the
    sorted strided sample of at most ``fit_size`` standardised values and their weights
    (``None``: all 1), padded to a bucket length (see :func:`_fit_bucket`)."""
    g, length = u.shape
    w_fit = None if rel_w is None else jnp.broadcast_to(rel_w[:, None], u.shape)
    if out_idx is not None:
        w_fit = (jnp.ones(u.shape, jnp.float32) if w_fit is None else w_fit)
        w_fit = w_fit.reshape(-1).at[out_idx].set(0.0).reshape(u.shape)
    if w_fit is not None:
        w_fit = _strided_sample(jnp.where(finite, w_fit, 0.0).reshape(-1), fit_size)
    ok = _strided_sample(finite.reshape(-1), fit_size)
    bucket = _fit_bucket(min(g * length, fit_size), fit_size)
    zsorted, weights = {}, {}
    for cls in sorted(classes):
        loc = locs[cls]
        z = ((u - loc[:, None]) / safe_u[:, None]).reshape(-1)
        z = _strided_sample(z, fit_size)
        # non-finite values sit with zero weight among the largest values, where the padding
        # goes too: the weighted sample is the same as without them
        top = jnp.max(jnp.where(ok, z, -jnp.inf))
        z = jnp.where(ok, z, jnp.where(jnp.isfinite(top), top, 0.0))
        if w_fit is None:  # sorted alone; the last (largest, equal) ones are the non-finite
            zs = nx.sort_float(z)
            n = zs.shape[0]
            w = None if checked else (jnp.arange(n) < n - jnp.sum(~ok)).astype(jnp.float32)
        else:
            zs, w = nx.sort_float(z, w_fit)
        zsorted[cls], weights[cls] = _pad_sorted(zs, w, bucket)
    return zsorted, weights


_TOPK_MAX = 1 << 16  # tensors up to this size take lax.top_k directly


def _dev(v, ku, centre_u, safe_u):
    """Each value's distance from its group's centre in standardised units, flattened; -1
    where not finite (ranked last). (Times the reciprocal of the scale, as every distance
    here: XLA may turn a division by a broadcast value into that product, and the ranking
    must not depend on where it did.)"""
    d = jnp.abs(_to_unit(v, ku[:, None]) - centre_u[:, None]) * (1.0 / safe_u)[:, None]
    return jnp.where(jnp.isfinite(v), d, -1.0).reshape(-1)


def _dev_key(d):
    """A distance as an int32 in the same order (``d >= 0``, or -1)."""
    return jnp.where(d >= 0, jax.lax.bitcast_convert_type(d, jnp.int32), -1)


def _outlier_cap(k: int) -> int:
    """How many candidates the threshold may let through (at least ``k``)."""
    return k + max(k // 2, 1024)


def _dev_sample(rows, ku, centre_u, safe_u):
    """The distances (see :func:`_dev`) of a strided sample of at most ``2**16`` values."""
    g, length = rows.shape
    n = g * length
    size = min(n, _TOPK_MAX)
    grp = (jnp.arange(size, dtype=jnp.int32) * (n // size)) // length
    v = _strided(rows.reshape(-1), size)
    d = jnp.abs(_to_unit(v, ku[grp]) - centre_u[grp]) * (1.0 / safe_u)[grp]
    return jnp.where(jnp.isfinite(v), d, -1.0)


def _outlier_guess(rows, ku, centre_u, safe_u, k):
    """A first threshold (a distance key) with about ``1.25 k`` values at or above it: the
    lower edge of the bin of a histogram of a strided sample where its upper tail reaches
    that many."""
    n = rows.size
    sample = _dev_sample(rows, ku, centre_u, safe_u)
    size = sample.shape[0]
    hist = jnp.zeros((nx.HIST_BINS,), jnp.int32).at[nx.hist_bin(sample)].add(1)
    tail = jnp.cumsum(hist[::-1])[::-1]  # sample values in this bin or above
    b = jnp.maximum(jnp.sum(tail.astype(jnp.float32) >= 1.25 * k * size / n) - 1, 0)
    return _dev_key(jnp.maximum(jnp.asarray(nx.hist_edges())[b], 0.0))


def _outlier_rank(rows, ku, centre_u, safe_u, pos, filled, k):
    """The ``k`` largest distances among the candidates at positions ``pos`` (in position
    order, the first ``filled`` of them real), largest first, ties to the lower position."""
    uv, fin, r = _gather_unit(rows, ku, pos)
    d = jnp.where(fin, jnp.abs(uv - centre_u[r]) * (1.0 / safe_u)[r], -1.0)
    d = jnp.where(jnp.arange(pos.shape[0]) < filled, d, -jnp.inf)
    return pos[jax.lax.top_k(d, k)[1]]


def _outliers(rows, ku, centre_u, safe_u, k, lean: bool = True):
    """Flat positions of the ``k`` values farthest from their group's centre in standardised
    units, farthest first, ties to the lower position: ``lax.top_k``'s answer (values that
    are not finite rank last).

    Beyond ``2**16`` values ``lax.top_k`` over the tensor is slow on XLA:CPU (a partial sort
    of all of it, ~60 ms per 4M values) and gathers a sharded tensor; so a threshold with
    between ``k`` and ``1.5 k`` values at or above it is found by counting (first guess from
    :func:`_outlier_guess`; each try one pass over the values, an all-reduce of its count
    when sharded), those values' positions are read off a bit mask of the tensor (one bit a
    value), and ``lax.top_k`` ranks only them. Outside a trace :func:`_outliers_host` does
    the same with the counting loop and the bit mask on the host (less to compile); here
    (``lean``, under a caller's trace) everything stays in the computation.
    """
    g, length = rows.shape
    n = g * length

    def dev(v):
        return _dev(v, ku, centre_u, safe_u)

    def fresh(tag):  # lean: the rows through _fresh (see there)
        return _fresh(rows, ku, tag) if lean else rows

    if n <= _TOPK_MAX or not lean:
        return jax.lax.top_k(dev(rows), k)[1]
    cap = _outlier_cap(k)
    t0 = _outlier_guess(rows, ku, centre_u, safe_u, k)

    def count(t, v):
        words = _bit_words(_dev_key(dev(v)) >= t)
        return words, _popcount(words)

    def off(c):
        return (c < k) | (c > cap)

    def cond(st):
        lo, hi, _, _, c = st
        return off(c) & (hi - lo > 1)

    def body(st):
        lo, hi, t, _, c = st
        lo = jnp.where(c > cap, t, lo)
        hi = jnp.where(c < k, t, hi)
        t = lo + (hi - lo) // 2
        # the values through a select on c < 0 (never true, but XLA cannot know): each pass
        # recomputes everything from the input instead of keeping tensor-sized pieces of
        # the computation hoisted out of the loop
        words, c = count(t, jnp.where(c < 0, jnp.float32(0.0), rows) if lean else rows)
        return lo, hi, t, words, c

    words, c0 = count(t0, fresh(100))
    # count(>= -1) = n, count(>= inf + 1) = 0
    lo, hi, _, words, c = jax.lax.while_loop(
        cond, body, (jnp.int32(-1), jnp.int32(_INF_BITS + 1), t0, words, c0))

    def tie_words():
        # more than cap values share the key lo (just below hi): the values above it (fewer
        # than k), and the first of the tied ones in position order, up to k in all
        above = _bit_words(_dev_key(dev(fresh(101))) >= hi)
        tied = _bit_words(_dev_key(dev(fresh(102))) == lo)
        end = _set_bits(tied, 1, k - _popcount(above))[0] + 1  # (after the last one taken)
        j = jnp.arange(tied.shape[0], dtype=jnp.int32)
        low = (jnp.uint32(1) << (end % 32).astype(jnp.uint32)) - 1
        keep = jnp.where(j < end // 32, jnp.uint32(0xFFFFFFFF),
                         jnp.where(j == end // 32, low, jnp.uint32(0)))
        return above | (tied & keep)

    words = jax.lax.cond(off(c), tie_words, lambda: words)
    return _outlier_rank(rows, ku, centre_u, safe_u, _set_bits(words, cap), _popcount(words), k)


def _rows_of(x, spec):
    """``x`` as float32 rows of the spec's layout (one row a group)."""
    return layout_for(spec, x.shape).to_rows(jnp.asarray(x).astype(jnp.float32))


# ------------------------------------------------------------- compiling the eager stages
# XLA:CPU's fusion emitters (its default) take about 1.5x as long to compile these stages as
# its loop emitters, which run them as fast (the search and Lloyd-Max, the statistics, the
# encoding, the outliers' passes; not the fitting data's histograms, which they run ~5x
# slower, see :data:`_fit_data_jit`). A new model's first call is mostly compilation (three
# stages per tensor shape), so outside a trace on CPU the stages are compiled with
# ``_CPU_COMPILE_OPTIONS``; elsewhere with XLA's defaults (under a caller's jit both are
# inlined into its computation, compiled with its options).
_CPU_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class _StageJit:
    """``jax.jit(fn, static_argnums)``, compiled with :data:`_CPU_COMPILE_OPTIONS` when the
    default backend is the CPU (``cpu``) and with XLA's defaults otherwise (``portable``);
    under a caller's trace always the latter (JAX takes compiler options at the top level only).
    """

    def __init__(self, fn, static_argnums=()):
        self.portable = jax.jit(fn, static_argnums=static_argnums)
        self.cpu = jax.jit(fn, static_argnums=static_argnums,
                           compiler_options=_CPU_COMPILE_OPTIONS)

    def pick(self):
        return self.cpu if jax.default_backend() == "cpu" else self.portable

    def __call__(self, *args):
        traced = not all(_checks.is_concrete(a) for a in jax.tree_util.tree_leaves(args))
        return (self.portable if traced else self.pick())(*args)

    def _cache_size(self) -> int:
        return self.pick()._cache_size()


def _words_at_fn(rows, ku, centre_u, safe_u, t):
    """The bit mask (see :func:`_bit_words`) of the values whose distance key is ``>= t``."""
    return _bit_words(_dev_key(_dev(rows, ku, centre_u, safe_u)) >= t)


_words_at = _StageJit(_words_at_fn)
_rank_at = _StageJit(_outlier_rank, (6,))
_sample_at = _StageJit(_dev_sample)


def _outliers_host(x, spec: Scalar, stats, k: int):
    """:func:`_outliers` for a concrete ``x`` beyond ``2**16`` values, with the counting loop
    and the positions of the set bits of the mask on the host (NumPy): only the passes over
    the values (one per try) and the final ranking are compiled."""
    rows = _rows_of(x, spec)
    ku, centre_u, safe_u = stats[0], stats[2], stats[5]
    n = rows.size
    cap = _outlier_cap(k)

    def words_at(t):
        w = np.asarray(_words_at(rows, ku, centre_u, safe_u, np.int32(t))).astype("<u4")
        return w, int(np.unpackbits(w.view(np.uint8)).sum(dtype=np.int64))

    # first guess: the sample's value at the rank that scales to ~1.25 k
    sample = np.asarray(_sample_at(rows, ku, centre_u, safe_u))
    r = min(sample.size, max(1, round(1.25 * k * sample.size / n)))
    t0 = np.partition(sample, sample.size - r)[sample.size - r]
    t = int(np.float32(t0).view(np.int32)) if t0 >= 0 else -1
    lo, hi = -1, _INF_BITS + 1  # count(>= lo) = n, count(>= hi) = 0
    words, c = words_at(t)
    while (c < k or c > cap) and hi - lo > 1:
        lo, hi = (t, hi) if c > cap else (lo, t)
        t = lo + (hi - lo) // 2
        words, c = words_at(t)

    def positions(w):  # of the set bits, ascending (only the words with any are unpacked)
        j = np.flatnonzero(w)
        bits = np.unpackbits(w[j].view(np.uint8), bitorder="little").reshape(-1, 32)
        r, b = np.nonzero(bits)
        return j[r].astype(np.int64) * 32 + b

    if k <= c <= cap:
        pos = positions(words)
    else:  # ties: everything above lo, then the first values equal to it
        above, _ = words_at(hi)
        pos_above = positions(above)
        tied = positions(words_at(lo)[0] & ~above)[: k - pos_above.size]
        pos = np.concatenate([pos_above, tied])
    filled = pos.size
    pos = np.concatenate([pos, np.zeros(cap - filled, np.int64)]).astype(np.int32)
    return _rank_at(rows, ku, centre_u, safe_u, pos, np.int32(filled), k)


def _bit_words(mask: jax.Array) -> jax.Array:
    """A 1-D bool mask as uint32 words, bit ``i`` of word ``j`` for value ``32 j + i``."""
    n = mask.shape[0]
    nw = n // 32
    sh = jnp.arange(32, dtype=jnp.uint32)
    words = jnp.sum(mask[: nw * 32].reshape(nw, 32).astype(jnp.uint32) << sh[None, :], axis=1,
                    dtype=jnp.uint32)
    if n % 32:
        tail = jnp.sum(mask[nw * 32:].astype(jnp.uint32) << sh[: n % 32], dtype=jnp.uint32)
        words = jnp.concatenate([words, tail[None]])
    return words


def _popcount(words: jax.Array) -> jax.Array:
    """The number of set bits in ``words``."""
    return jnp.sum(jax.lax.population_count(words).astype(jnp.int32))


def _set_bits(words: jax.Array, cap: int, first=0) -> jax.Array:
    """Positions of the set bits number ``first`` to ``first + cap - 1`` (from 0) of
    ``words`` (see :func:`_bit_words`), in order (where there are fewer, the rest is
    meaningless: callers count the set bits)."""
    cnt = jax.lax.population_count(words).astype(jnp.int32)
    incl = jnp.cumsum(cnt)
    s = jnp.arange(cap, dtype=jnp.int32) + first
    if cap == 1:
        j = jnp.sum((incl <= s[0]).astype(jnp.int32))[None]
    else:  # the word of the s-th set bit: how many words end at or before s (no search)
        ends = jnp.zeros((cap,), jnp.int32).at[incl - first].add(1, mode="drop")
        j = jnp.cumsum(ends)
    j = jnp.minimum(j, words.shape[0] - 1)
    r = s - (incl[j] - cnt[j])  # the bit wanted is the r-th set bit of word j
    w = words[j]
    bit = jnp.zeros((cap,), jnp.uint32)
    for step in (16, 8, 4, 2, 1):  # the largest bit position with at most r set bits below
        below = jax.lax.population_count(w & ((jnp.uint32(1) << (bit + step)) - 1))
        bit = jnp.where(below.astype(jnp.int32) <= r, bit + step, bit)
    return j * 32 + bit.astype(jnp.int32)


def _encode_scalar(x, spec: Scalar, stats, codebook, use_a, lean: bool = True):
    """Stage 3 (compiled per shape, cheap): codes against the fitted codebook."""
    (k, centre, centre_u, spread, spread0, safe_u, loc0, loc0_u, live, const, cmax, amax,
     nonfinite, out_idx) = stats
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    loc_u = jnp.where(use_a, centre_u, loc0_u)

    mids = 0.5 * (codebook[1:] + codebook[:-1])
    codes = _in_unit(_fresh(rows, k, 101) if lean else rows, k, lambda u: nx.bucketize(
        (u - loc_u[:, None]) / safe_u[:, None], mids))
    z_out = None
    if out_idx is not None:
        uv, _, r = _gather_unit(rows, k, out_idx)
        z_out = (uv - loc_u[r]) / safe_u[r]
    scale = jnp.where(const, 0.0, spread)
    cval = _round_dtype(_checks.ldexp(cmax, -k), spec.scale_dtype)
    loc = jnp.where(const, cval, jnp.where(use_a, centre, loc0))
    # the smallest distance between distinct levels (a refined codebook may repeat one)
    d = codebook[1:] - codebook[:-1]
    gap = jnp.min(jnp.where(d > 0, d, jnp.inf)) if spec.levels > 1 else jnp.float32(jnp.inf)
    lv_max = jnp.maximum(jnp.abs(codebook[0]), jnp.abs(codebook[-1]))
    ext = jnp.where(const, jnp.abs(cmax), jnp.abs(loc_u) + safe_u * lv_max)
    diag = _diagnose(spec, k, amax, spread0, scale, gap, ext, live, nonfinite, const, cmax,
                     cval)
    q = _build(spec, x, codes, codebook, scale, loc, spec.code_bits, spec.levels,
               "distributional", layout, None, nonfinite, pack=lean)
    if out_idx is None:
        return q, diag
    if not lean:  # left raw (int32 positions, float32 values) for _finish_eager
        return dataclasses.replace(q, outlier_index=out_idx, outlier_value=z_out,
                                   n_outliers=int(out_idx.shape[0])), diag
    idx = out_idx.astype(jnp.uint32)
    return dataclasses.replace(q, outlier_index=pack_positions(idx, q.index_bits),
                               outlier_value=outlier_values(z_out),
                               n_outliers=int(out_idx.shape[0])), diag


# The three stages are compiled separately: the expensive one (search + Lloyd-Max, stage 2)
# sees only a histogram of a fixed size (or, beyond 64 levels, the padded sorted sample), so it
# compiles once per fit spec (and bucket) instead of once per tensor shape. Inside a caller's
# jit they are inlined into one computation.
_prepare_jit = jax.jit(_prepare_scalar, static_argnums=(1, 2))
_fit_jit = _StageJit(_fit_codebook, (2, 3))
_encode_jit = _StageJit(_encode_scalar, (1, 5))


def _fit_spec(spec: Scalar) -> Scalar:
    """``spec`` with the fields that do not reach the fit (stage 2) at their defaults: every
    tensor whose spec differs only in grouping, outliers, statistics or storage (a model's
    leaves, whose automatic choices depend on their shapes) shares one compiled fit."""
    return dataclasses.replace(
        spec, axis=None, group_size=None, group_axis=-1, robust=False, scale_dtype="float32",
        outliers=None, fit_size=Scalar.fit_size if _use_hist(spec) else spec.fit_size)


_pack_jit = _StageJit(_pack, (1,))


def _pack_positions_host(idx: np.ndarray, bits: int) -> np.ndarray:
    """:func:`distq.core.qarray.pack_positions` in NumPy (a stream of the low 16 bits, then
    one of the ``bits - 16`` high bits when there are any)."""
    idx = np.asarray(idx).astype(np.uint32)
    hi = max(bits - 16, 0)
    parts = [E.words_from_symbols(idx & 0xFFFF if hi else idx, min(bits, 16))]
    if hi:
        parts.append(E.words_from_symbols(idx >> 16, hi))
    return np.concatenate(parts)


def _finish_eager(q: QArray) -> QArray:
    """``q`` from stage 3 outside a trace, finished: its unpacked codes (see :func:`_build`)
    packed in a computation of their own (XLA:CPU fuses the computation of the codes into
    the packing kernel, which then runs ~20x slower than packing codes held in memory), its
    outliers' positions and values (left raw by :func:`_encode_scalar`) packed on the host
    (their packing, compiled, cost as much compilation as the rest of stage 3)."""
    q = dataclasses.replace(q, codes=_pack_jit(q.codes, q.bits))
    if not q.n_outliers:
        return q
    f16 = float(np.finfo(np.float16).max)
    val = np.clip(np.asarray(q.outlier_value), -f16, f16).astype(np.float16)
    idx = _pack_positions_host(np.asarray(q.outlier_index), q.index_bits)
    return dataclasses.replace(q, outlier_index=jnp.asarray(idx), outlier_value=jnp.asarray(val))


_stats_jit = _StageJit(_group_stats, (1, 2))
# (XLA's defaults: its fusion emitters run the histograms' scatter ~5x faster)
_fit_data_jit = jax.jit(_fit_data, static_argnums=(1, 2))


def _quantize_scalar(x: jax.Array, spec: Scalar, checked: bool = False):
    spec = spec.resolve(tuple(x.shape))
    if checked:  # stage 1 in parts, the outliers' search on the host (see _outliers_host)
        stats, rel_w = _stats_jit(x, spec, True)
        k_out = spec.n_outliers(math.prod(x.shape))
        out_idx = _outliers_host(x, spec, stats, k_out) if k_out and (
            math.prod(x.shape) > _TOPK_MAX) else None
        zsorted, weights, out_idx = _fit_data_jit(x, spec, True, stats, rel_w, out_idx)
        stats = stats[:-1] + (out_idx,)
    else:
        stats, zsorted, weights = _prepare_jit(x, spec, checked)
    codebook, use_a = _fit_jit(zsorted, weights, _fit_spec(spec), spec.levels)
    q, diag = _encode_jit(x, spec, stats, codebook, use_a, not checked)
    return (q if not checked else _finish_eager(q)), diag


# ------------------------------------------------------------------------------------ uniform
def _quantize_uniform(x: jax.Array, spec: Uniform):
    bits = spec.bits
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    sm = _summary(rows)
    k, amax = sm.k, sm.amax
    if spec.symmetric:
        if bits == 1:  # levels -1, +1
            grid, qmax = (-1.0, 2.0), 1
            scale, s_used = _stored(amax, k, spec.scale_dtype)
            codes = _in_unit(rows, k, lambda u: (u >= 0).astype(jnp.int32))
        else:  # levels -qmax..qmax
            qmax = (1 << (bits - 1)) - 1
            grid = (float(-qmax), 1.0)
            scale, s_used = _stored(amax / qmax, k, spec.scale_dtype)
            safe = _safe_scale(s_used, amax / qmax)
            codes = _in_unit(rows, k, lambda u: jnp.clip(
                jnp.round(u / safe[:, None]), -qmax, qmax).astype(jnp.int32) + qmax)
        diag = _diagnose(spec, k, amax, amax / qmax, scale, 1.0, s_used * qmax, amax > 0,
                         sm.nonfinite)
        return _build(spec, x, codes, None, scale, None, bits, spec.levels, "uniform", layout,
                      grid, sm.nonfinite), diag
    n = 1 << bits
    hi = jnp.maximum(sm.hi, 0.0)
    lo = jnp.minimum(sm.lo, 0.0)
    scale, s_used = _stored((hi - lo) / (n - 1), k, spec.scale_dtype)
    safe = _safe_scale(s_used, (hi - lo) / (n - 1))
    zp = jnp.clip(jnp.round(-lo / safe), 0, n - 1)
    loc, loc_used = _stored(-(zp * s_used), k, spec.scale_dtype)
    codes = _in_unit(rows, k, lambda u: jnp.clip(
        jnp.round(u / safe[:, None]) + zp[:, None], 0, n - 1).astype(jnp.int32))
    # a constant group decodes exactly: scale 0 and the value itself as location
    cval, const = sm.hi, sm.const
    cval_stored = _round_dtype(_checks.ldexp(cval, -k), spec.scale_dtype)
    scale = jnp.where(const, 0.0, scale)
    loc = jnp.where(const, cval_stored, loc)
    # decoding computes scale * code, then adds loc: both must stay finite
    ext = jnp.maximum(jnp.abs(loc_used), s_used * (n - 1))
    ext = jnp.where(const, amax, ext)
    diag = _diagnose(spec, k, amax, (hi - lo) / (n - 1), scale, 1.0, ext, ~const,
                     sm.nonfinite, const, cval, cval_stored)
    return _build(spec, x, codes, None, scale, loc, bits, n, "uniform", layout, (0.0, 1.0),
                  sm.nonfinite), diag


_NF4_GAP = float(np.min(np.diff(nf4_levels())))


def _quantize_nf4(x: jax.Array, spec: NF4):
    layout = layout_for(spec, x.shape)
    rows = layout.to_rows(jnp.asarray(x).astype(jnp.float32))
    sm = _summary(rows)
    k, amax = sm.k, sm.amax
    codebook = jnp.asarray(nf4_levels())
    scale, s_used = _stored(amax, k, spec.scale_dtype)
    safe = _safe_scale(s_used, amax)
    t = 0.5 * (codebook[1:] + codebook[:-1])
    codes = _in_unit(rows, k, lambda u: nx.bucketize(u / safe[:, None], t))
    diag = _diagnose(spec, k, amax, amax, scale, _NF4_GAP, s_used, amax > 0, sm.nonfinite)
    return _build(spec, x, codes, codebook, scale, None, 4, 16, "nf4", layout, None,
                  sm.nonfinite), diag


# Compiled once per (shape, spec); inside a caller's jit they are simply inlined. Each takes
# (x, spec, checked): ``checked`` says that x is concrete (it is refused unless finite).
_QUANTIZERS = {
    Scalar: _quantize_scalar,
    Uniform: (lambda f: lambda x, spec, checked: f(x, spec))(
        jax.jit(_quantize_uniform, static_argnums=1)),
    NF4: (lambda f: lambda x, spec, checked: f(x, spec))(jax.jit(_quantize_nf4, static_argnums=1)),
}

_spec.register_leaf(QArray)
for _cls, _fn in _QUANTIZERS.items():
    _spec.register_quantizer(_cls, _checked(_fn))
