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
from .spec import register
from .qarray import Layout, QArray, outlier_values, pack_positions, position_words

Axis = Union[int, tuple[int, ...], None]
_OBJECTIVES = ("mse", "mae")
_SCALE_DTYPES = ("float32", "float16", "bfloat16")


def _resolve_bits_n(bits, n) -> tuple[int, int]:
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int number of levels, got {n!r}")
        if not 2 <= n <= 1 << 16:
            raise ValueError(f"n (number of levels) must be in 2..65536, got {n}")
        need = max(1, math.ceil(math.log2(n)))
        if bits is None:
            return need, int(n)
        bits = _checks.check_bits(bits)
        if n > 1 << bits:
            raise ValueError(f"n={n} levels do not fit in bits={bits} (at most {1 << bits})")
        return bits, int(n)
    bits = _checks.check_bits(4 if bits is None else bits)
    return bits, 1 << bits


def _check_grouping(axis, group_size, group_axis) -> None:
    if axis is not None:
        axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
        if not isinstance(axes, tuple) or not all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
        ):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise TypeError(f"group_size must be a positive int, got {group_size!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if axis is not None:
            raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
    if group_axis is not None and (
        isinstance(group_axis, bool) or not isinstance(group_axis, (int, np.integer))
    ):
        raise TypeError(f"group_axis must be an int or None, got {group_axis!r}")


AUTO = "auto"


def _dtype_bits(name: str) -> int:
    return 16 if name in ("float16", "bfloat16") else 32


# the input (contracted) axis of a weight of rank ``ndim``, by its framework's naming convention
INPUT_AXIS = {
    "kernel": lambda ndim: ndim - 2,  # Flax Dense/Conv: (..., in, out)
    "weight": lambda ndim: 1,  # PyTorch Linear/Conv (out, in, ...), Embedding (vocab, features)
    "embedding": lambda ndim: ndim - 1,  # Flax Embed: (vocab, features)
}


def _check_scale_dtype(scale_dtype) -> None:
    _checks.check_choice(scale_dtype, "scale_dtype", _SCALE_DTYPES)


class _ScalarGrid:
    """The spec protocol shared by the scalar quantisers (see :mod:`distq.core.spec`)."""

    positional: ClassVar[tuple[str, ...]] = ("bits",)

    def quantize(self, x: jax.Array, *, key: jax.Array | None = None) -> QArray:
        """Quantises ``x`` (``key`` is unused: scalar quantisers are deterministic)."""
        del key
        return _QUANTIZERS[type(self)](x, self)

    def resolve(self, shape: tuple[int, ...], role: str | None = None):
        del shape, role
        return self

    def problem(self, shape: tuple[int, ...]) -> str | None:
        """Why an array of ``shape`` cannot take this spec (a grouping that does not fit)."""
        if math.prod(shape) == 0:
            return "the array is empty"
        try:
            layout_for(self.resolve(shape), shape)
        except ValueError as e:
            return str(e)
        return None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes of the QArray for ``shape``: codes, levels, scales, outliers."""
        spec = self.resolve(shape)
        size = math.prod(shape)
        g = layout_for(spec, shape).num_groups(shape)
        sd = jnp.dtype(spec.scale_dtype).itemsize
        total = bitpack.packed_nbytes(size, spec.code_bits) + g * sd * (1 + spec.has_loc)
        total += 4 * spec.levels if spec.stores_levels else 0
        k = spec.n_outliers(size) if isinstance(spec, Scalar) else 0
        if k:
            total += 4 * position_words(k, max(1, (size - 1).bit_length())) + 2 * k
        return total


@dataclasses.dataclass(frozen=True)
class Scalar(_ScalarGrid):
    """Distributional scalar quantisation (the default quantiser of distq).

    Attributes:
      bits: bits per code, 1..16 (default 4, or ``ceil(log2 n)`` when ``n`` is given).
      n: number of levels (``<= 2**bits``); default ``2**bits``.
      dist: prior family, one of :data:`distq.distributions.DIST_NAMES`, or ``None`` to choose the
        best by the objective.
      p: companding exponent for plain family names (0 quantile, 1 ``pdf^(1/2)``, 2 ``pdf^(1/3)``);
        ``None`` picks the one that is asymptotically optimal for ``objective`` (2 for "mse", 1
        for "mae").
      beta: range factor; ``None`` searches it (grid + zoom).
      objective: "mse" or "mae": what the searches and the refinement minimise.
      refine: run Lloyd-Max iterations from the prior's codebook (optimal for the data).
      max_iter: iteration budget of the refinement.
      zero: a value that must be reproduced exactly (e.g. ``0.0`` for sparse weights); it becomes
        the location and one level sits on it, for any ``n``.
      axis: per-channel scaling along these axes (e.g. ``-1`` for a Dense kernel's outputs);
        ``None`` one scale per tensor; ``"auto"`` (default): per tensor for a plain array, the
        input channels of a model weight (see :meth:`resolve`).
      group_size: per-group scaling in blocks of this many values along ``group_axis``
        (``group_axis=None``: blocks of the flattened array).
      robust: median/MAD standardisation instead of mean/std (heavy tails, outliers).
      fit_size: at most this many values (a strided sample) are sorted to search and refine the
        codebook; the search and refinement cost ``O(fit_size log fit_size)`` once.
      scale_dtype: storage dtype of per-group scales and locations; ``"auto"``: float32, or
        bfloat16 for the per-channel scales of a weight with codes of at most 6 bits.
      outliers: fraction (``0 < outliers <= 0.25``) of the values, those farthest from their
        group's centre in standardised units, kept apart: their positions (bit-packed, as wide
        as the tensor needs) and standardised values (float16) are stored beside the codes, and
        the codebook is fitted on the other values only. Each costs ``16 + ceil(log2 size)``
        bits; on heavy-tailed weights 0.5 % of them buys much more than those bits would as
        codes. ``None``: no outliers; ``"auto"`` (default): none for a plain array, for a model
        weight what is left of a ``bits / 16`` budget (see :meth:`resolve`).

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (1000,))
      >>> q = distq.quantize(x, distq.Scalar(bits=3))
      >>> float(((q.dequantize() - x) ** 2).mean() / x.var()) < 0.04
      True
    """

    kind: ClassVar[str] = "scalar"
    has_loc: ClassVar[bool] = True
    stores_levels: ClassVar[bool] = True
    refits_levels: ClassVar[bool] = True  # calibration may move the levels

    bits: int | None = None
    n: int | None = None
    dist: str | None = None
    p: int | None = None
    beta: float | None = None
    objective: str = "mse"
    refine: bool = True
    max_iter: int = 2000
    zero: float | None = None
    axis: Axis | str = AUTO
    group_size: int | None = None
    group_axis: int | None = -1
    robust: bool = False
    fit_size: int = 1 << 22
    scale_dtype: str = AUTO
    outliers: float | str | None = AUTO

    def __post_init__(self):
        _resolve_bits_n(self.bits, self.n)
        if self.outliers != AUTO and self.outliers is not None and (
                isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float))
                or not 0 < self.outliers <= 0.25):
            raise ValueError(f"outliers must be a fraction in (0, 0.25], None or 'auto', "
                             f"got {self.outliers!r}")
        _checks.check_choice(self.objective, "objective", _OBJECTIVES)
        if self.dist is not None:
            D.parse_dist(self.dist, self.p)
        elif self.p not in (None, 0, 1, 2):
            raise ValueError(f"p must be 0, 1 or 2, got {self.p!r}")
        if self.beta is not None and not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be a positive number or None, got {self.beta!r}")
        if self.zero is not None and not isinstance(self.zero, (int, float)):
            raise TypeError(f"zero must be a number or None, got {self.zero!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative int, got {self.max_iter!r}")
        if not isinstance(self.fit_size, int) or self.fit_size < 16:
            raise ValueError(f"fit_size must be an int >= 16, got {self.fit_size!r}")
        _check_grouping(None if self.axis == AUTO else self.axis, self.group_size,
                        self.group_axis)
        if self.scale_dtype != AUTO:
            _check_scale_dtype(self.scale_dtype)

    @property
    def code_bits(self) -> int:
        return _resolve_bits_n(self.bits, self.n)[0]

    def text_positional(self) -> dict:
        return {"bits": self.code_bits}

    def n_outliers(self, size: int) -> int:
        """How many of ``size`` values are kept apart."""
        if self.outliers is None or self.outliers == AUTO:
            return 0
        return min(int(self.outliers * size), size)  # at most the fraction

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "Scalar":
        """The concrete spec (no ``"auto"`` field) for an array of ``shape``.

        ``role`` says what the array is: ``None`` for a plain array (an i.i.d. sample: one
        scale per tensor, no outliers), or a model weight of ``ndim >= 2`` whose input (contracted)
        axis follows a framework's convention: ``"kernel"`` (Flax: ``(..., in, out)``),
        ``"weight"`` (PyTorch: ``(out, in, ...)``, and ``(vocab, features)`` embeddings),
        ``"embedding"`` (Flax ``Embed``: ``(vocab, features)``) or ``"matrix"`` (unknown layout).
        :func:`distq.quantize_tree` passes the role from the leaf's name. For a weight, the
        automatic fields spend at most ``bits / 16`` extra bits per value: per-input-channel
        scales (16-bit for codes of up to 6 bits) when they cost at most half of that, and the
        rest on outliers (at most 1 %).
        """
        if AUTO not in (self.axis, self.outliers, self.scale_dtype):
            return self
        size = math.prod(shape)
        weight = role is not None and len(shape) >= 2 and size > 0
        budget = self.code_bits / 16.0
        chan_dtype = ("bfloat16" if self.code_bits <= 6 else "float32") \
            if self.scale_dtype == AUTO else self.scale_dtype
        # bits per value beyond the codes: codebook, one scale and location, the last word
        over = (32.0 * self.levels + 64 + 32) / size if size else 0.0
        axis, chosen = self.axis, False
        if axis == AUTO:
            axis = None
            a = (INPUT_AXIS[role](len(shape))
                 if weight and self.group_size is None and role in INPUT_AXIS else None)
            if a is not None:
                cost = (2 * _dtype_bits(chan_dtype) * shape[a] - 64) / size
                if over + cost <= budget / 2:
                    axis, chosen = a, True
                    over += cost
        elif axis is not None and weight:
            axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
            if all(-len(shape) <= a < len(shape) for a in axes):  # else layout_for says why
                over += (2 * _dtype_bits(self.scale_dtype) * math.prod(shape[a] for a in axes)
                         / size)
        scale_dtype = self.scale_dtype
        if scale_dtype == AUTO:  # 16-bit scales only where distq chose the channels itself
            scale_dtype = chan_dtype if chosen else "float32"
        outliers = self.outliers
        if outliers == AUTO:
            outliers = None
            if weight:
                index_bits = max(1, (size - 1).bit_length())
                # each outlier: a float16 value and its position; two words of padding
                frac = (budget - over - 64.0 / size) / (16 + index_bits)
                frac = min(frac, 0.01)
                if frac > 0:  # three significant digits, rounded down: within the budget
                    step = 10.0 ** (math.floor(math.log10(frac)) - 2)
                    frac = math.floor(frac / step) * step
                if frac > 0 and int(frac * size) >= 1:
                    outliers = frac
        return dataclasses.replace(self, axis=axis, outliers=outliers, scale_dtype=scale_dtype)

    @property
    def levels(self) -> int:
        return _resolve_bits_n(self.bits, self.n)[1]

    def candidate_dists(self) -> tuple[D.Dist, ...]:
        p = self.p if self.p is not None else (2 if self.objective == "mse" else 1)
        if self.dist is not None:
            return (D.parse_dist(self.dist, p),)
        out = []
        for fam in D.FAMILIES:
            out.append(D.Dist(fam, 0))
            if fam != "cauchy" and p != 0:
                out.append(D.Dist(fam, p))
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class Uniform(_ScalarGrid):
    """Uniform integer quantisation (the int8/int4 baselines).

    ``symmetric=True``: absmax scaling, levels ``-qmax..qmax`` with ``qmax = 2**(bits-1) - 1``
    (``2**bits - 1`` levels; at 1 bit the two levels are ``+-absmax``). ``symmetric=False``:
    affine min-max scaling with an integer zero point, so ``0.0`` is exact, ``2**bits`` levels.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> q = distq.quantize(jnp.array([-1.0, 0.0, 0.3, 1.0]), distq.Uniform(bits=8))
      >>> [round(v, 4) for v in q.dequantize().tolist()]  # levels k/127
      [-1.0, 0.0, 0.2992, 1.0]
      >>> q.nbytes  # four 8-bit codes and one float32 scale: no level table
      8
    """

    kind: ClassVar[str] = "int"
    kind_aliases: ClassVar[tuple[str, ...]] = ("uniform",)
    stores_levels: ClassVar[bool] = False  # an integer grid: its scale is all it needs
    refits_levels: ClassVar[bool] = False

    bits: int = 8
    symmetric: bool = True
    axis: Axis = None
    group_size: int | None = None
    group_axis: int | None = -1
    scale_dtype: str = "float32"

    def __post_init__(self):
        _checks.check_bits(self.bits)
        _check_grouping(self.axis, self.group_size, self.group_axis)
        _check_scale_dtype(self.scale_dtype)

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def has_loc(self) -> bool:
        return not self.symmetric

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1 if self.symmetric and self.bits > 1 else 1 << self.bits


def nf4_levels() -> np.ndarray:
    """The 16 NormalFloat-4 levels of QLoRA, built from their definition.

    Eight positive and seven negative normal quantiles (at probabilities evenly spaced from
    ``1 - (1/2)(1/15 + 1/16)`` ... to 1/2, the end point dropped), plus an exact zero, each side
    normalised to ``[-1, 1]``.

    References:
      Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, Sec. 3 and App. E.

    Examples:
      >>> import distq
      >>> lv = distq.nf4_levels()
      >>> lv.shape, lv.dtype, float(lv[0]), float(lv[7]), float(lv[-1])
      ((16,), dtype('float32'), -1.0, 0.0, 1.0)
      >>> [round(float(v), 4) for v in lv[8:12]]  # QLoRA's table: 0.0796, 0.1609, ...
      [0.0796, 0.1609, 0.2461, 0.3379]
    """
    offset = 0.5 * (1 / 32 + 1 / 30)
    top = 1.0 - offset
    from scipy.special import ndtri  # noqa: PLC0415 (host-side, once)

    pos = ndtri(np.linspace(top, 0.5, 9)[:-1])
    neg = -ndtri(np.linspace(top, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return (v / np.max(np.abs(v))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NF4(_ScalarGrid):
    """NormalFloat-4: 16 fixed normal-quantile levels with absmax scaling per block.

    The default (blocks of 64 of the flattened tensor, float32 scales) is bitsandbytes' recipe,
    4.5 bits per value.

    Examples:
      >>> import jax, distq
      >>> w = jax.random.normal(jax.random.key(0), (256, 64))
      >>> q = distq.quantize(w, distq.NF4())
      >>> q.bits_per_value  # 4-bit codes, a float32 scale per 64 values, the 16 levels
      4.53125
      >>> float(((q.dequantize() - w) ** 2).mean() / w.var()) < 0.01
      True
      >>> distq.spec_str(distq.NF4(group_size=128, scale_dtype="bfloat16"))
      'nf4,group_size=128,scale_dtype=bfloat16'
    """

    kind: ClassVar[str] = "nf4"
    positional: ClassVar[tuple[str, ...]] = ()
    has_loc: ClassVar[bool] = False
    stores_levels: ClassVar[bool] = True
    refits_levels: ClassVar[bool] = False
    levels: ClassVar[int] = 16

    group_size: int = 64
    group_axis: int | None = None
    scale_dtype: str = "float32"

    def __post_init__(self):
        _check_grouping(None, self.group_size, self.group_axis)
        _check_scale_dtype(self.scale_dtype)

    @property
    def code_bits(self) -> int:
        return 4


# ------------------------------------------------------------------------------------- layout
def layout_for(spec, shape: tuple[int, ...]) -> Layout:
    """The :class:`Layout` a spec gives an array of ``shape`` (validates divisibility)."""
    ndim = len(shape)
    axis = getattr(spec, "axis", None)
    gs = getattr(spec, "group_size", None)
    if gs is not None:
        if spec.group_axis is None:
            size = math.prod(shape)
            if size % gs:
                raise ValueError(
                    f"group_size={gs} does not divide the array's {size} values; choose a divisor"
                )
            return Layout("block", (), gs)
        a = spec.group_axis
        if not -ndim <= a < ndim:
            raise ValueError(f"group_axis={a} is out of range for an array of rank {ndim}")
        a %= ndim
        if shape[a] % gs:
            raise ValueError(
                f"group_size={gs} does not divide axis {a} of length {shape[a]}; choose a divisor "
                "or group_axis=None for blocks of the flattened array"
            )
        return Layout("group", (a,), gs)
    if axis is not None:
        axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"axis={axis} is out of range for an array of rank {ndim}")
        axes = tuple(sorted({int(a) % ndim for a in axes}))
        return Layout("channel", axes)
    return Layout("tensor")


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

register(Scalar, QArray)
register(Uniform, QArray)
register(NF4, QArray)
