"""Whole parameter trees: quantise by path rules, dequantise, count true bytes, fake-quantise.

A *rule set* maps each leaf of a parameter tree to a spec (or ``None``: keep the leaf):

* an ordered sequence of ``(regex, spec)`` pairs, tried in order against the leaf's path (its
  keys joined by ``/``, e.g. ``params/Dense_0/kernel``), first ``re.fullmatch`` wins;
* a callable ``(path, leaf) -> spec | None``;
* a single spec, applied to every floating-point leaf.

Specs are the scalar-core ones (:class:`distq.Scalar`, :class:`distq.Uniform`,
:class:`distq.NF4`), :class:`distq.PQ` (matrices only) and :class:`Cast` (mixed precision).
Leaves that are not floating point (integer buffers, step counters) are always kept as they are,
and leaves already quantised are left alone, so the functions compose.

The trees can be plain dicts, Flax linen ``{'params': ...}`` trees or ``nnx.state(model,
nnx.Param)``: paths of nnx variables leave out the trailing ``value``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from . import pq as _pq
from .qarray import QArray, arrays_nbytes
from .scalar import INPUT_AXIS, NF4, Scalar, Uniform
from .scalar import quantize as _quantize_scalar

_CAST_DTYPES = ("bfloat16", "float16", "float32")


# ---------------------------------------------------------------------------------- cast spec
@dataclasses.dataclass(frozen=True)
class Cast:
    """Mixed precision as a rule: store the leaf in a narrower float dtype.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> c = distq.tree.cast(jnp.ones((4, 4)), distq.Cast("bfloat16"))
      >>> c.nbytes, c.dequantize().dtype
      (32, dtype('float32'))
    """

    dtype: str = "bfloat16"

    def __post_init__(self):
        _checks.check_choice(self.dtype, "dtype", _CAST_DTYPES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CastArray:
    """A leaf stored in a narrower dtype; ``dequantize()`` restores the original dtype."""

    value: jax.Array
    dtype: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return arrays_nbytes(self.value)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * np.dtype(self.value.dtype).itemsize

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.value.astype(dtype or self.dtype)

    def metadata(self) -> dict:
        return {"dtype": self.dtype, "stored": str(self.value.dtype), "shape": list(self.shape)}

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "CastArray":
        try:
            v = jnp.asarray(arrays["value"])
            out = cls(value=v, dtype=str(metadata["dtype"]))
            if list(v.shape) != list(metadata["shape"]) or str(v.dtype) != metadata["stored"]:
                raise ValueError("shape/dtype disagree with the metadata")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt CastArray metadata or arrays: {e!r}") from None
        return out

    def __repr__(self) -> str:
        return f"CastArray(shape={self.shape}, stored={self.value.dtype}, dtype={self.dtype})"


def cast(x: Any, spec: Cast) -> CastArray:
    """Stores ``x`` as ``spec.dtype`` (see :class:`Cast`)."""
    x = _checks.as_float_array(x)
    return CastArray(value=x.astype(spec.dtype), dtype=str(x.dtype))


from .qarray import register_serialisation as _register  # noqa: E402

_register(CastArray, ("value",))

SPEC_TYPES = (Scalar, Uniform, NF4, _pq.PQ, Cast)
Spec = Scalar | Uniform | NF4 | _pq.PQ | Cast
Rules = Any  # Sequence[tuple[str, Spec | None]] | Callable[[str, Any], Spec | None] | Spec


def is_quantized(x: Any) -> bool:
    """``True`` for the compressed leaf types (QArray, PQArray, CastArray)."""
    return isinstance(x, (QArray, _pq.PQArray, CastArray))


# ---------------------------------------------------------------------------------- paths
def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path) -> str:
    """The ``/``-joined path of a ``jax.tree_util`` key path (nnx's trailing ``value`` dropped)."""
    parts = [_key_str(k) for k in path]
    if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts = parts[:-1]
    return "/".join(parts)


def _leaves_with_paths(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    return [(path_str(p), leaf) for p, leaf in flat], treedef


def _is_float(leaf) -> bool:
    dt = getattr(leaf, "dtype", None)
    if dt is None or not hasattr(leaf, "shape"):
        return False
    return bool(jnp.issubdtype(dt, jnp.floating))


class _Matcher:
    """Resolves a rule set into ``(path, leaf) -> (spec, rule index)``, tracking unused rules."""

    def __init__(self, rules: Rules):
        self.callable = None
        self.rules: list[tuple[re.Pattern, Any]] = []
        if isinstance(rules, SPEC_TYPES):
            rules = [(".*", rules)]
        if callable(rules) and not isinstance(rules, SPEC_TYPES):
            self.callable = rules
        elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
            for i, r in enumerate(rules):
                if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
                    raise TypeError(
                        f"rules[{i}] must be a (regex, spec or None) pair, got {r!r}")
                _check_spec(r[1], f"rules[{i}]")
                try:
                    pat = re.compile(r[0])
                except re.error as e:
                    raise ValueError(f"rules[{i}]: invalid regex {r[0]!r}: {e}") from None
                self.rules.append((pat, r[1]))
        else:
            raise TypeError(
                "rules must be a list of (regex, spec) pairs, a callable (path, leaf) -> spec, "
                f"or a single spec; got {type(rules).__name__}")
        self.used = [False] * len(self.rules)

    def __call__(self, path: str, leaf) -> tuple[Any, int | None]:
        if self.callable is not None:
            spec = self.callable(path, leaf)
            _check_spec(spec, f"rules({path!r})")
            return spec, None
        for i, (pat, spec) in enumerate(self.rules):
            if pat.fullmatch(path):
                self.used[i] = True
                return spec, i
        return None, None

    def unused(self) -> list[str]:
        return [pat.pattern for (pat, _), u in zip(self.rules, self.used) if not u]


def _check_spec(spec, where: str) -> None:
    if spec is not None and not isinstance(spec, SPEC_TYPES):
        raise TypeError(
            f"{where}: spec must be None, distq.Scalar, distq.Uniform, distq.NF4, distq.PQ or "
            f"distq.Cast, got {type(spec).__name__}")


# ---------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf of a :class:`TreeReport`."""

    path: str
    spec: Any
    shape: tuple[int, ...]
    dtype: str
    bytes_before: int
    bytes_after: int
    rel_error: float | None
    note: str = ""

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.bytes_after / max(math.prod(self.shape), 1)


@dataclasses.dataclass(frozen=True)
class TreeReport:
    """What :func:`quantize_tree` did: per leaf, totals and rules that matched nothing.

    ``rel_error`` is ``|x_hat - x|^2 / |x|^2`` per leaf (``None`` under ``jit``).
    """

    leaves: tuple[LeafReport, ...]
    unused_rules: tuple[str, ...] = ()

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.leaves)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.leaves)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def quantized(self) -> tuple[LeafReport, ...]:
        return tuple(r for r in self.leaves if r.spec is not None)

    def bits_per_weight(self, only_quantized: bool = True) -> float:
        """Average stored bits per value (scales and codebooks counted)."""
        rs = self.quantized() if only_quantized else self.leaves
        size = sum(math.prod(r.shape) for r in rs)
        return 8.0 * sum(r.bytes_after for r in rs) / max(size, 1)

    def table(self) -> str:
        """A plain-text table, one row per leaf, then the totals."""
        rows = [("path", "spec", "shape", "bytes", "-> bytes", "bits/val", "rel err", "note")]
        for r in self.leaves:
            rows.append((r.path, spec_str(r.spec), "x".join(map(str, r.shape)) or "()",
                         f"{r.bytes_before:,}", f"{r.bytes_after:,}", f"{r.bits_per_value:.2f}",
                         "-" if r.rel_error is None else f"{r.rel_error:.2e}", r.note))
        rows.append(("total", "", "", f"{self.bytes_before:,}", f"{self.bytes_after:,}",
                     f"{8 * self.bytes_after / max(sum(math.prod(r.shape) for r in self.leaves), 1):.2f}",
                     "", f"{self.ratio:.2f}x smaller"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.unused_rules:
            lines.append(f"rules that matched nothing: {list(self.unused_rules)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def spec_str(spec) -> str:
    """A short human-readable form of a spec (``scalar:4,axis=-1``, ``pq:16:8``, ...)."""
    if spec is None:
        return "none"
    if isinstance(spec, Cast):
        return f"cast:{spec.dtype}"
    if isinstance(spec, _pq.PQ):
        s = f"pq:{spec.m}:{spec.bits}"
        return s + (",opq" if spec.opq else "")
    name = {Scalar: "scalar", Uniform: "int", NF4: "nf4"}[type(spec)]
    bits = "" if isinstance(spec, NF4) else f":{spec.code_bits}"
    extra = []
    for f in dataclasses.fields(spec):
        if f.name in ("bits",):
            continue
        v = getattr(spec, f.name)
        if v != f.default and not (f.name == "n" and isinstance(spec, Scalar) and v is None):
            extra.append(f"{f.name}={v}")
    return name + bits + ("," + ",".join(extra) if extra else "")


# ---------------------------------------------------------------------------------- leaves
def leaf_nbytes(leaf) -> int:
    """True storage of one leaf (packed codes for quantised ones)."""
    if is_quantized(leaf):
        return int(leaf.nbytes)
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return arrays_nbytes(leaf)
    if isinstance(leaf, (bool, int, float, complex, np.generic)):
        return np.asarray(leaf).nbytes
    return 0


def tree_nbytes(tree) -> int:
    """Total true bytes of a (possibly quantised) tree: codes packed, codebooks, scales counted.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> t = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}
      >>> distq.tree_nbytes(t)
      16640
      >>> q, _ = distq.quantize_tree(t, [("w", distq.Uniform(bits=4))])
      >>> distq.tree_nbytes(q)  # 2048 B of codes, 15 levels + 1 scale, 256 B of bias
      2368
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)
    return sum(leaf_nbytes(x) for x in leaves)


def leaf_role(path: str) -> str:
    """What a parameter is, by its name: ``"kernel"`` (Flax Dense/Conv), ``"weight"`` (PyTorch
    Linear/Conv/Embedding state dicts), ``"embedding"`` (Flax Embed) or ``"matrix"``."""
    parts = [p for p in re.split(r"[/.]", path) if p not in ("value", "raw_value")]
    name = parts[-1].lower() if parts else ""
    return name if name in INPUT_AXIS else "matrix"


def resolve_spec(spec, path: str, leaf):
    """A Scalar spec's ``"auto"`` fields made concrete for a model weight at ``path``."""
    if isinstance(spec, Scalar) and not is_quantized(leaf) and _is_float(leaf):
        return spec.resolve(tuple(jnp.shape(leaf)), role=leaf_role(path))
    return spec


def quantize_leaf(x, spec, key: jax.Array | None = None):
    """Applies one spec to one array (the dispatcher :func:`quantize_tree` uses)."""
    if isinstance(spec, Cast):
        return cast(x, spec)
    if isinstance(spec, _pq.PQ):
        if jnp.ndim(x) != 2:
            raise ValueError(f"a PQ spec needs a matrix, got shape {tuple(jnp.shape(x))}")
        key = jax.random.key(0) if key is None else key
        return _pq.quantize(key, x, spec)
    return _quantize_scalar(x, spec)


@jax.jit
def _rel_error(x, xh):
    x = x.astype(jnp.float32)
    den = jnp.sum(x * x)
    err = jnp.sum((xh.astype(jnp.float32) - x) ** 2)
    return jnp.where(den > 0, err / jnp.where(den > 0, den, 1.0), err)


def _dequantize_leaf(leaf, dtype=None):
    return leaf.dequantize(dtype) if is_quantized(leaf) else leaf


# ---------------------------------------------------------------------------------- tree API
def quantize_tree(
    params,
    rules: Rules,
    *,
    key: jax.Array | None = None,
    calibration: tuple[Callable, tuple] | None = None,
    calibration_options: Any = None,
    errors: bool = True,
    warn_unused: bool = True,
):
    """Quantises every leaf of a parameter tree that a rule maps to a spec.

    Args:
      params: any pytree of arrays (plain dict, Flax linen variables, ``nnx.State``).
      rules: ``[(regex, spec | None), ...]`` (first ``re.fullmatch`` on the ``/``-joined path
        wins), a callable ``(path, leaf) -> spec | None``, or one spec for every float leaf.
      key: ``jax.random`` key for specs that need one (PQ's k-means); folded per leaf.
      calibration: ``(apply_fn, args)`` with ``apply_fn(params, *args)`` a pure JAX function of
        the float tree. distq traces it, finds the input that meets each matrix leaf in a matmul
        and quantises those leaves to minimise the error of the layer's *output* on that data
        (see :mod:`distq.calibrate`). Leaves no matmul reaches are quantised as without it.
      calibration_options: a :class:`distq.calibrate.Calibration` (damping, block size...).
      errors: compute each leaf's relative error for the report (skipped under ``jit``).
      warn_unused: warn (``UserWarning``) about rules that matched no leaf.

    Returns:
      ``(qtree, report)``: the tree with quantised leaves (QArray / PQArray / CastArray) in
      place of the matched arrays, and a :class:`TreeReport`.

    Examples:
      >>> import jax, distq
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128)),
      ...                     "bias": jax.numpy.zeros(128)}}
      >>> q, report = distq.quantize_tree(params, [(r".*kernel", distq.Scalar(bits=4))])
      >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].shape
      ('QArray', (128,))
      >>> round(report.ratio, 1)
      7.8
    """
    matcher = _Matcher(rules)
    leaves, treedef = _leaves_with_paths(params)
    key = jax.random.key(0) if key is None else key
    specs = []
    for path, leaf in leaves:
        spec, _ = matcher(path, leaf)
        specs.append(resolve_spec(spec, path, leaf))

    done = {}
    if calibration is not None:
        from . import calibrate as _cal

        eligible = [s if (s is not None and _is_float(x) and not is_quantized(x)) else None
                    for s, (_, x) in zip(specs, leaves)]
        done = _cal.quantize_all(params, calibration, [p for p, _ in leaves], eligible,
                                 calibration_options)

    out, reports = [], []
    for i, ((path, leaf), spec) in enumerate(zip(leaves, specs)):
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
        before = leaf_nbytes(leaf)
        note = ""
        if spec is not None and is_quantized(leaf):
            spec, note = None, "already quantised"
        elif spec is not None and not _is_float(leaf):
            spec, note = None, "not floating point: kept"
        elif spec is not None and math.prod(shape) == 0:
            spec, note = None, "empty: kept"
        if spec is None:
            out.append(leaf)
            reports.append(LeafReport(path, None, shape, dtype, before, before, None, note))
            continue
        try:
            if path in done:
                q = done[path]
                note = "calibrated"
            else:
                q = quantize_leaf(leaf, spec, jax.random.fold_in(key, i))
        except (ValueError, TypeError) as e:
            raise type(e)(f"leaf {path!r} (shape {shape}) with {spec_str(spec)}: {e}") from None
        err = None
        if errors and _checks.is_concrete(leaf) and _checks.is_concrete(
                jax.tree_util.tree_leaves(q)[0]):
            err = float(_rel_error(leaf, q.dequantize()))
        out.append(q)
        reports.append(LeafReport(path, spec, shape, dtype, before, leaf_nbytes(q), err, note))

    unused = tuple(matcher.unused())
    if unused and warn_unused:
        warnings.warn(f"quantize_tree: rules that matched no leaf: {list(unused)}", stacklevel=2)
    return jax.tree_util.tree_unflatten(treedef, out), TreeReport(tuple(reports), unused)


def dequantize_tree(qtree, dtype: Any = None):
    """Replaces every quantised leaf by its decoded dense array (others unchanged).

    Jittable (``jax.jit(distq.dequantize_tree)``); ``dtype`` overrides the original dtypes.
    """
    return jax.tree_util.tree_map(lambda x: _dequantize_leaf(x, dtype), qtree,
                                  is_leaf=is_quantized)


# ---------------------------------------------------------------------------------- STE
def representable_range(q: QArray) -> tuple[jax.Array, jax.Array]:
    """Per element, the smallest and largest value ``q``'s codebook can reproduce."""
    s = q.scale.astype(jnp.float32)
    lo_c, hi_c = jnp.min(q.codebook), jnp.max(q.codebook)
    a, b = s * lo_c, s * hi_c
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    if q.loc is not None:
        lo, hi = lo + q.loc.astype(jnp.float32), hi + q.loc.astype(jnp.float32)
    return q.per_value(lo), q.per_value(hi)


def fake_quantize(x: jax.Array, spec, clip: bool = True) -> jax.Array:
    """Quantise-dequantise with a straight-through gradient (for quantisation-aware training).

    The forward value is exactly ``quantize(x, spec).dequantize()``; the gradient with respect
    to ``x`` is the identity (straight-through), zeroed where ``x`` lies outside the range the
    codebook can reproduce when ``clip`` is set (those values are clipped, so moving them a little
    changes nothing). Jittable; the codebook/scales are refitted on every call (no gradient
    flows through the fit).

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> x = jax.random.normal(jax.random.key(0), (64, 64))
      >>> y = distq.fake_quantize(x, distq.Uniform(bits=4))
      >>> bool(jnp.all(y == distq.quantize(x, distq.Uniform(bits=4)).dequantize()))
      True
      >>> float(jax.grad(lambda x: distq.fake_quantize(x, distq.Uniform(bits=4)).sum())(x).mean())
      1.0
    """
    if isinstance(spec, _pq.PQ):
        raise ValueError("fake_quantize does not support PQ specs (k-means per step); use the "
                         "product-quantised layers of distq.nn, whose codebooks train directly")
    x = jnp.asarray(x)
    xs = jax.lax.stop_gradient(x)
    if isinstance(spec, Cast):
        q = cast(xs, spec)
        return jax.lax.stop_gradient(q.dequantize(x.dtype)) + (x - xs)
    q = _quantize_scalar(xs, spec)
    xq = jax.lax.stop_gradient(q.dequantize(x.dtype))
    if not clip:
        return xq + (x - xs)
    lo, hi = representable_range(q)
    mask = jax.lax.stop_gradient(((xs >= lo) & (xs <= hi)).astype(x.dtype))
    return xq + mask * (x - xs)


def fake_quantize_tree(params, rules: Rules, *, clip: bool = True, masks=None):
    """:func:`fake_quantize` on every leaf a rule maps to a spec (others unchanged).

    ``masks`` (a tree like ``params`` with boolean arrays or ``None``, e.g. from
    :func:`prune_magnitude`) is applied first, so pruned weights stay exactly zero in the
    forward pass. Differentiable and jittable (rules are static Python objects).
    """
    if masks is not None:
        params = apply_masks(params, masks)
    matcher = _Matcher(rules)
    leaves, treedef = _leaves_with_paths(params)
    out = []
    for path, leaf in leaves:
        spec, _ = matcher(path, leaf)
        spec = resolve_spec(spec, path, leaf)
        if spec is None or is_quantized(leaf) or not _is_float(leaf):
            out.append(leaf)
        else:
            out.append(fake_quantize(leaf, spec, clip))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------- optax
def _trainable(x) -> bool:
    return hasattr(x, "dtype") and bool(jnp.issubdtype(x.dtype, jnp.inexact))


def partition(tree, filter_fn: Callable[[Any], bool] | None = None):
    """Splits a tree into ``(trainable, rest)``: float arrays vs everything else (codes...).

    Both halves keep the full structure with ``None`` in the other's places, so ``jax.grad`` and
    optax see only float leaves (no float0 gradients for integer codes); :func:`combine` merges.
    The leaves inside QArrays are visited individually: codebooks and scales are trainable, codes
    are not.

    Examples:
      >>> import jax, jax.numpy as jnp, distq, optax
      >>> q, _ = distq.quantize_tree({"w": jnp.ones((8, 8))}, distq.Scalar(bits=2))
      >>> train, rest = distq.partition(q)
      >>> jax.tree.map(lambda x: x.dtype, train)["w"].codes is None
      True
      >>> opt = optax.sgd(0.1); state = opt.init(train)
      >>> g = jax.grad(lambda t: distq.dequantize_tree(distq.combine(t, rest))["w"].sum())(train)
      >>> u, state = opt.update(g, state)
      >>> distq.combine(optax.apply_updates(train, u), rest)["w"].codes.dtype
      dtype('uint32')
    """
    f = filter_fn or _trainable
    a = jax.tree_util.tree_map(lambda x: x if f(x) else None, tree)
    b = jax.tree_util.tree_map(lambda x: None if f(x) else x, tree)
    return a, b


def combine(*trees):
    """Merges trees split by :func:`partition` (first non-``None`` leaf wins)."""

    def pick(*xs):
        for x in xs:
            if x is not None:
                return x
        return None

    return jax.tree_util.tree_map(pick, *trees, is_leaf=lambda x: x is None)


def labels(tree, trainable: str = "trainable", frozen: str = "frozen"):
    """Per-leaf labels for ``optax.multi_transform`` (float arrays trainable, rest frozen)."""
    return jax.tree_util.tree_map(lambda x: trainable if _trainable(x) else frozen, tree)


# ---------------------------------------------------------------------------------- pruning
def _select(params, rules) -> tuple[list, Any, list[bool]]:
    """Leaves to prune: float arrays of rank >= 2 (``rules=None``) or matching a regex list."""
    leaves, treedef = _leaves_with_paths(params)
    if isinstance(rules, str):
        rules = [rules]
    pats = None if rules is None else [re.compile(r) for r in rules]
    chosen = []
    for path, x in leaves:
        ok = _is_float(x) and not is_quantized(x)
        if pats is None:
            ok = ok and jnp.ndim(x) >= 2
        else:
            ok = ok and any(p.fullmatch(path) for p in pats)
        chosen.append(bool(ok))
    return leaves, treedef, chosen


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)):
        raise TypeError(f"ratio must be a float in [0, 1), got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return float(ratio)


def prune_magnitude(params, ratio: float, *, rules=None, scope: str = "global"):
    """Unstructured magnitude pruning: zeroes the ``ratio`` smallest-magnitude weights.

    Args:
      params: a parameter tree.
      ratio: fraction of the selected weights to zero, in ``[0, 1)``.
      rules: which leaves to prune: ``None`` (every float leaf of rank >= 2, i.e. kernels and
        embeddings, not biases or norms) or a list of regexes on the leaf paths.
      scope: "global" (one threshold over all selected leaves) or "leaf" (the ratio per leaf).

    Returns:
      ``(pruned, masks)``: masks is a tree like ``params`` with a boolean keep-mask per pruned
      leaf and ``None`` elsewhere; keep it applied during training with :func:`apply_masks`,
      :func:`fake_quantize_tree` (``masks=``) or :func:`masked_updates`.
    """
    ratio = _check_ratio(ratio)
    _checks.check_choice(scope, "scope", ("global", "leaf"))
    leaves, treedef, chosen = _select(params, rules)
    if scope == "global" and any(chosen):
        mags = jnp.concatenate([jnp.abs(x).reshape(-1).astype(jnp.float32)
                                for (_, x), c in zip(leaves, chosen) if c])
        k = int(math.floor(ratio * mags.size))
        thr = jnp.sort(mags)[k - 1] if k > 0 else -jnp.inf
    masks = []
    for (_, x), c in zip(leaves, chosen):
        if not c:
            masks.append(None)
            continue
        a = jnp.abs(x).astype(jnp.float32)
        if scope == "leaf":
            masks.append(_exact_count_mask(a, int(math.floor(ratio * a.size))))
        else:
            masks.append(a > thr)
    masks_tree = jax.tree_util.tree_unflatten(treedef, masks)
    return apply_masks(params, masks_tree), masks_tree


def _exact_count_mask(a, k):
    """Keep-mask that removes exactly ``k`` entries (ties at the threshold broken by index)."""
    if k == 0:
        return jnp.ones(a.shape, bool)
    flat = a.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    keep = jnp.ones(flat.shape, bool).at[order[:k]].set(False)
    return keep.reshape(a.shape)


def prune_structured(params, ratio: float, *, axis: int = -1, rules=None):
    """Structured pruning: zeroes whole slices (e.g. output channels) with the smallest L2 norm.

    For each selected leaf, the slices along ``axis`` (``-1``: a Dense kernel's output columns
    or a conv's output channels) are ranked by their L2 norm and the ``ratio`` smallest are
    zeroed. Returns ``(pruned, masks)`` like :func:`prune_magnitude`.
    """
    ratio = _check_ratio(ratio)
    leaves, treedef, chosen = _select(params, rules)
    masks = []
    for (path, x), c in zip(leaves, chosen):
        if not c:
            masks.append(None)
            continue
        nd = x.ndim
        if not -nd <= axis < nd:
            raise ValueError(f"axis={axis} is out of range for leaf {path!r} of rank {nd}")
        ax = axis % nd
        other = tuple(i for i in range(nd) if i != ax)
        norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=other))
        k = int(math.floor(ratio * x.shape[ax]))
        keep = _exact_count_mask(norms, k)
        shape = [1] * nd
        shape[ax] = x.shape[ax]
        masks.append(jnp.broadcast_to(keep.reshape(shape), x.shape))
    masks_tree = jax.tree_util.tree_unflatten(treedef, masks)
    return apply_masks(params, masks_tree), masks_tree


def apply_masks(params, masks):
    """Zeroes the pruned entries: ``x * mask`` where a mask is given, unchanged elsewhere."""

    def f(x, m):
        return x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))

    return jax.tree_util.tree_map(f, params, masks, is_leaf=lambda v: v is None)


def sparsity(params, masks=None) -> float:
    """Fraction of exactly-zero values among the float leaves (or the masked leaves)."""
    leaves = jax.tree_util.tree_leaves(params)
    if masks is not None:
        ms = jax.tree_util.tree_leaves(masks)
        return float(1.0 - sum(int(jnp.sum(m)) for m in ms) / max(sum(m.size for m in ms), 1))
    fl = [x for x in leaves if _is_float(x)]
    return float(sum(int(jnp.sum(x == 0)) for x in fl) / max(sum(x.size for x in fl), 1))


def masked_updates(masks):
    """An optax transformation that zeroes updates of pruned weights (chain it last)."""
    import optax

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return apply_masks(updates, masks), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------- distillation
def distillation_loss(student_logits, teacher_logits, temperature: float = 2.0,
                      labels: jax.Array | None = None, alpha: float = 0.5) -> jax.Array:
    """Knowledge-distillation loss: ``T^2 KL(softmax(t/T) || softmax(s/T))``, mean over the batch.

    With integer ``labels`` it returns ``alpha * distillation + (1 - alpha) * cross-entropy``.
    The teacher gets no gradient.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> z = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(distq.distillation_loss(z, z))
      0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = jax.lax.stop_gradient(teacher_logits) / temperature
    s = student_logits / temperature
    lt, ls = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1).mean() * temperature ** 2
    if labels is None:
        return kl
    ce = -jnp.take_along_axis(jax.nn.log_softmax(student_logits, -1), labels[..., None],
                              axis=-1).mean()
    return alpha * kl + (1.0 - alpha) * ce
