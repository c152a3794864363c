"""The built-in specs: frozen, hashable configuration of every quantiser, free of JAX.

:class:`Scalar`, :class:`Uniform` and :class:`NF4` (scalar quantisers), :class:`PQ` (product
quantisation, with its :class:`KMeans` configuration) and :class:`Cast` (mixed precision). They
validate their fields when constructed (their types too: a bool field takes only ``True`` or
``False``, an int field no bool or float, a float field only finite numbers; counts that reach
jitted code stop at ``2**31 - 1``; an error names the field and what it allows) and implement
the spec protocol of :mod:`distq.core.spec`; their quantisers live in :mod:`distq.core.scalar`,
:mod:`distq.core.pq` and :mod:`distq.core.cast`, registered there. This module imports neither
JAX nor those modules, so specs can be built, compared and parsed from text (the command line's
rules) before JAX is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Union

import numpy as np

from . import _checks
from . import distributions as D
from . import spec as _spec


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
            isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))
            for a in axes
        ):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
        for a in axes:
            _checks.check_int(a, "axis", -_checks.INT32_MAX, _checks.INT32_MAX)
    if group_size is not None:
        if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size,
                                                                      (int, np.integer)):
            raise TypeError(f"group_size must be a positive int, got {group_size!r}")
        _checks.check_int(group_size, "group_size", 1, _checks.INT32_MAX)
        if axis is not None:
            raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
    if group_axis is not None:
        if isinstance(group_axis, (bool, np.bool_)) or not isinstance(group_axis,
                                                                      (int, np.integer)):
            raise TypeError(f"group_axis must be an int or None, got {group_axis!r}")
        _checks.check_int(group_axis, "group_axis", -_checks.INT32_MAX, _checks.INT32_MAX)


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

    def quantize(self, x: Any, *, key: Any = None) -> Any:
        """Quantises ``x`` to a :class:`distq.QArray` (``key`` is unused: deterministic)."""
        return _spec.quantizer(type(self))(x, self, key)

    def resolve(self, shape: tuple[int, ...], role: str | None = None):
        del shape, role
        return self

    def problem(self, shape: tuple[int, ...]) -> str | None:
        """Why an array of ``shape`` cannot take this spec (a grouping that does not fit)."""
        if math.prod(shape) == 0:
            return "the array is empty"
        from .qarray import layout_for  # noqa: PLC0415 (JAX: only once there is work)

        try:
            layout_for(self.resolve(shape), shape)
        except ValueError as e:
            return str(e)
        return None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes of the QArray for ``shape``: codes, levels, scales, outliers."""
        from . import bitpack  # noqa: PLC0415 (JAX: only once there is work)
        from .qarray import layout_for, position_words  # noqa: PLC0415

        spec = self.resolve(shape)
        size = math.prod(shape)
        g = layout_for(spec, shape).num_groups(shape)
        sd = _dtype_bits(spec.scale_dtype) // 8
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
      beta: range factor, in [1e-6, 1e6]; ``None`` searches it (grid + zoom).
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
      >>> q = distq.quantize(x, distq.Scalar(bits=4))
      >>> float(((q.dequantize() - x) ** 2).mean() / x.var()) < 0.012  # Lloyd-Max: 0.0095
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
        if not (isinstance(self.outliers, str) and self.outliers == AUTO) and (
                self.outliers is not None and (
                    isinstance(self.outliers, (bool, np.bool_))
                    or not isinstance(self.outliers, numbers.Real)
                    or not 0 < self.outliers <= 0.25)):
            raise ValueError(f"outliers must be a fraction in (0, 0.25], None or 'auto', "
                             f"got {self.outliers!r}")
        _checks.check_choice(self.objective, "objective", _OBJECTIVES)
        if self.p is not None:
            _checks.check_int(self.p, "p (companding exponent)", 0, 2)
        if self.dist is not None:
            D.parse_dist(self.dist, self.p)
        if self.beta is not None:
            _checks.check_beta(self.beta)
        if self.zero is not None:
            _checks.check_zero(self.zero)
        _checks.check_bool(self.refine, "refine")
        _checks.check_int(self.max_iter, "max_iter", 0, _checks.INT32_MAX)
        _checks.check_bool(self.robust, "robust")
        _checks.check_int(self.fit_size, "fit_size", 16, _checks.INT32_MAX)
        _check_grouping(None if isinstance(self.axis, str) and self.axis == AUTO else self.axis,
                        self.group_size, self.group_axis)
        if not (isinstance(self.scale_dtype, str) and self.scale_dtype == AUTO):
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
        _checks.check_bool(self.symmetric, "symmetric")
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


_INITS = ("greedy", "kmeans++", "random")


@dataclasses.dataclass(frozen=True)
class KMeans:
    """How to run k-means (frozen and hashable: a static argument of the jitted functions).

    Attributes:
      k: number of centroids.
      iters: budget of Lloyd iterations, coarse ones included (the loop is traced once
        whatever the budget).
      coarse_iters: the first this many iterations run on every fourth training row, when that
        leaves at least ``32 * k`` rows (otherwise every iteration uses the whole sample);
        ``0`` turns this off.
      tol: stop early once an iteration lowers the inertia by less than ``tol`` times its value
        (``0.0``: run all ``iters`` unless the assignment stops changing).
      init: "greedy" (greedy k-means++, the default), "kmeans++" (one candidate per centre) or
        "random" (``k`` distinct random rows, as faiss and most PQ code do).
      seed_trials: candidates per centre for "greedy"; ``None`` means ``2 + floor(ln k)``.
      restarts: independent seedings + refinements; the one with the lowest inertia is kept.
      sample: at most this many rows train the centroids; ``None`` means ``512 * k``.
      seed_sample: at most this many of the training rows seed the centroids; ``None`` means
        ``32 * k``. Seeding costs ``k * trials * seed_sample * d`` multiply-adds, so this bounds
        it; the Lloyd iterations then use the whole training sample.
      seed_score: greedy candidates are scored (the potential they remove) on this many
        seeding rows drawn in proportion to their squared distance to the centres so far
        (importance sampling, redrawn every 32 centres), or on every row if there are no more
        than that; ``None`` means 256. The D^2 sampling and the running distances always use
        every seeding row.
      block: rows per block of the assignment (any value gives the same result).
      verbose: print the inertia of every iteration (``jax.debug.callback``), per problem.

    Examples:
      >>> import jax
      >>> from distq import kmeans as km
      >>> cfg = km.KMeans(k=8)
      >>> cfg.trials
      4
    """

    k: int
    iters: int = 20
    coarse_iters: int = 10
    tol: float = 1e-4
    init: str = "greedy"
    seed_trials: int | None = None
    restarts: int = 1
    sample: int | None = None
    seed_sample: int | None = None
    seed_score: int | None = None
    block: int = 4096
    verbose: bool = False

    def __post_init__(self):
        big = _checks.INT32_MAX  # every count reaches jitted code as an int32
        _checks.check_int(self.k, "k", 1, big)
        _checks.check_int(self.iters, "iters", 0, big)
        _checks.check_int(self.coarse_iters, "coarse_iters", 0, big)
        _checks.check_float(self.tol, "tol", 0.0)
        _checks.check_choice(self.init, "init", _INITS)
        if self.seed_trials is not None:
            _checks.check_int(self.seed_trials, "seed_trials", 1, big)
        _checks.check_int(self.restarts, "restarts", 1, big)
        if self.sample is not None:
            _checks.check_int(self.sample, "sample", 1, big)
        if self.seed_sample is not None:
            _checks.check_int(self.seed_sample, "seed_sample", 1, big)
        if self.seed_score is not None:
            _checks.check_int(self.seed_score, "seed_score", 1, big)
        _checks.check_int(self.block, "block", 1, big)
        _checks.check_bool(self.verbose, "verbose")

    @property
    def trials(self) -> int:
        """Candidates per centre of greedy seeding: ``seed_trials`` or ``2 + floor(ln k)``."""
        if self.init != "greedy":
            return 1
        if self.seed_trials is not None:
            return self.seed_trials
        return 2 + int(math.log(self.k))

    def sample_size(self, n: int) -> int:
        """Training rows used out of ``n``."""
        return min(n, 512 * self.k if self.sample is None else self.sample)

    def coarse_stride(self, n: int) -> int:
        """Row stride of the coarse iterations on ``n`` training rows (1: no coarse stage)."""
        if self.coarse_iters == 0 or self.iters == 0 or -(-n // 4) < 32 * self.k:
            return 1
        return 4

    def seed_size(self, n: int) -> int:
        """Seeding rows used out of ``n`` training rows."""
        return min(n, 32 * self.k if self.seed_sample is None else self.seed_sample)

    def score_size(self, n: int) -> int:
        """Rows that score greedy candidates out of ``n`` seeding rows."""
        return min(n, 256 if self.seed_score is None else self.seed_score)


_CODEBOOK_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class PQ:
    """How to product-quantise a matrix (frozen and hashable; a static ``jax.jit`` argument).

    The defaults aim at the best error reachable in about the training time of faiss's
    ``ProductQuantizer`` (random seeding, 25 iterations on at most ``256 * K`` rows): greedy
    k-means++ seeding, then at most 20 Lloyd iterations with early stopping on at most
    ``512 * K`` rows, the first 10 of them on every fourth row.

    Attributes:
      m: number of sub-spaces; must divide the row length ``D``.
      bits: bits per sub-code, 1..16 (``K = 2**bits`` centroids per sub-space).
      opq: learn an orthogonal rotation first (optimised PQ).
      iters: Lloyd iteration budget of each k-means, coarse ones included.
      coarse_iters: the first this many iterations run on every fourth training row (when that
        leaves at least ``32 * K`` rows); see :class:`distq.kmeans.KMeans`.
      tol: early stop when an iteration lowers the inertia by less than this fraction.
      restarts: independent k-means runs per sub-space; the best is kept.
      sample: training rows (at most); ``None`` means ``512 * K``.
      seed_sample: seeding rows (at most); ``None`` means ``32 * K``.
      seed_trials: greedy candidates per centre; ``None`` means ``2 + floor(ln K)``.
      seed_score: importance-sampled rows that score the greedy candidates; ``None`` means
        256 (see :class:`distq.kmeans.KMeans`).
      init: "greedy", "kmeans++" or "random" seeding (see :class:`distq.kmeans.KMeans`).
      opq_iters: alternations between codebooks and rotation when ``opq``.
      opq_lloyd_iters: Lloyd iterations per alternation (warm-started).
      codebook_dtype: storage dtype of the codebooks ("float32", "float16", "bfloat16").
      block: rows per block when assigning or encoding.
      verbose: print k-means progress (``jax.debug.callback``).

    Examples:
      >>> import distq
      >>> distq.pq.PQ(m=16, bits=8).num_centroids
      256
    """

    m: int
    bits: int = 8
    opq: bool = False
    iters: int = 20
    coarse_iters: int = 10
    tol: float = 1e-4
    restarts: int = 1
    sample: int | None = None
    seed_sample: int | None = None
    seed_trials: int | None = None
    seed_score: int | None = None
    init: str = "greedy"
    opq_iters: int = 8
    opq_lloyd_iters: int = 4
    codebook_dtype: str = "float32"
    block: int = 4096
    verbose: bool = False

    def __post_init__(self):
        _checks.check_int(self.m, "m", 1, _checks.INT32_MAX)  # sub-spaces
        _checks.check_bits(self.bits)
        _checks.check_bool(self.opq, "opq")
        _checks.check_choice(self.codebook_dtype, "codebook_dtype", _CODEBOOK_DTYPES)
        for name in ("opq_iters", "opq_lloyd_iters"):
            _checks.check_int(getattr(self, name), name, 0, _checks.INT32_MAX)
        _checks.check_bool(self.verbose, "verbose")
        self.kmeans()  # validates the k-means fields

    kind: ClassVar[str] = "pq"
    randomized: ClassVar[bool] = True  # fitted by k-means from a key
    positional: ClassVar[tuple[str, ...]] = ("m", "bits")
    text_hidden: ClassVar[tuple[str, ...]] = ("verbose",)

    @property
    def num_centroids(self) -> int:
        """``K = 2**bits``."""
        return 1 << self.bits

    # ---------------------------------------------------------------- spec protocol
    def quantize(self, x: Any, *, key: Any = None) -> Any:
        """Fits the codebooks on ``x``'s rows and encodes them to a :class:`distq.PQArray`
        (``key``: k-means' randomness, ``jax.random.key(0)`` when ``None``)."""
        return _spec.quantizer(type(self))(x, self, key)

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "PQ":
        """PQ has no automatic fields."""
        del shape, role
        return self

    def problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a matrix of ``shape`` cannot be product-quantised with this spec (or ``None``)."""
        if len(shape) != 2:
            return f"PQ needs a matrix (rows, features), got rank {len(shape)}"
        n, dim = shape
        if dim % self.m:
            return f"m={self.m} sub-spaces must divide the row length {dim}"
        if n < self.num_centroids:
            return (f"{n} rows cannot train {self.num_centroids} centroids per sub-space "
                    f"(bits={self.bits}); use bits <= {max(n.bit_length() - 1, 1)}")
        return None

    def advice(self, shape: tuple[int, ...]) -> str | None:
        """A note when the codebooks outweigh the codes (a matrix with few rows for ``bits``)."""
        from . import bitpack  # noqa: PLC0415 (JAX: only once there is work)

        n, dim = shape
        codes = bitpack.packed_nbytes(n * self.m, self.bits)
        books = self.nbytes(shape) - codes
        if books <= codes:
            return None
        return (f"codebooks ({books:,} B) outweigh the codes ({codes:,} B): "
                f"{8 * self.nbytes(shape) / (n * dim):.2f} bits/value; fewer bits per code "
                f"(e.g. pq:{self.m}:{max(self.bits - 2, 1)}) suit {n} rows better")

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes of the PQArray of a ``shape`` matrix: packed codes, codebooks, rotation."""
        from . import bitpack  # noqa: PLC0415 (JAX: only once there is work)

        n, dim = shape
        item = _dtype_bits(self.codebook_dtype) // 8
        return (bitpack.packed_nbytes(n * self.m, self.bits) + item * self.num_centroids * dim
                + (4 * dim * dim if self.opq else 0))

    def kmeans(self) -> "KMeans":
        """The :class:`distq.kmeans.KMeans` configuration used per sub-space."""
        return KMeans(
            k=self.num_centroids, iters=self.iters, coarse_iters=self.coarse_iters,
            tol=self.tol, init=self.init,
            seed_trials=self.seed_trials, restarts=self.restarts, sample=self.sample,
            seed_sample=self.seed_sample, seed_score=self.seed_score, block=self.block,
            verbose=self.verbose,
        )


_CAST_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Cast:
    """Mixed precision as a rule: store the leaf in a narrower float dtype.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> c = distq.quantize(jnp.ones((4, 4)), distq.Cast("bfloat16"))
      >>> c.nbytes, c.dequantize().dtype
      (32, dtype('float32'))
    """

    kind: ClassVar[str] = "cast"
    positional: ClassVar[tuple[str, ...]] = ("dtype",)

    dtype: str = "bfloat16"

    def __post_init__(self):
        _checks.check_choice(self.dtype, "dtype", _CAST_DTYPES)

    def quantize(self, x: Any, *, key: Any = None) -> Any:
        """``x`` stored as ``dtype``, a :class:`distq.CastArray` (``key`` is unused)."""
        return _spec.quantizer(type(self))(x, self, key)

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "Cast":
        del shape, role
        return self

    def problem(self, shape: tuple[int, ...]) -> str | None:
        del shape
        return None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * _dtype_bits(self.dtype) // 8


for _cls in (Scalar, Uniform, NF4, PQ, Cast):
    _spec.register_spec(_cls)
