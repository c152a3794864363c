"""Whole parameter trees: quantise by a plan, dequantise, and report what was stored.

:func:`quantize_tree` is a loop over a :class:`distq.planning.Plan` (made from rules by
:func:`distq.plan`, see :mod:`distq.planning` for the rule forms): every problem is found before any
work, then each leaf with a spec is quantised (calibrated when ``calibration`` is given) and the
:class:`TreeReport` records its bytes and error. :func:`dequantize_tree` decodes every quantised
leaf. Trees can be plain dicts, Flax linen ``{'params': ...}`` trees or ``nnx.State``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import planning as _plan
from .core import _checks
from .core import spec as _spec

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
class TreeReport(_plan.ByteTotals):
    """What :func:`quantize_tree` did: per leaf, totals and rules that matched nothing.

    ``rel_error`` is ``|x_hat - x|^2 / |x|^2`` per leaf (``None`` under ``jit``).

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "step": jnp.array(3)}
      >>> _, report = distq.quantize_tree(params, distq.Uniform(bits=4))
      >>> [(r.path, distq.spec_str(r.spec), r.bytes_after) for r in report.leaves]
      [('step', 'none', 4), ('w', 'int:4', 1028)]
      >>> [r.path for r in report.quantized()], report.bits_per_weight()
      (['w'], 4.015625)
      >>> 0.01 < report.leaves[1].rel_error < 0.05
      True
      >>> print(report)  # one row per leaf, then the totals
      path   spec   shape  bytes  -> bytes  bits/val  rel err   note
      ---...
      step   none   ()     4      4         32.00     -         not floating point: kept
      w      int:4  64x32  8,192  1,028     4.02      ...e-02
      total                8,196  1,032     4.03                7.94x smaller
    """

    leaves: tuple[LeafReport, ...]
    unused_rules: tuple[str, ...] = ()

    def bits_per_weight(self, only_quantized: bool = True) -> float:
        """Average stored bits per value (scales and codebooks counted)."""
        rs = self.quantized() if only_quantized else self.leaves
        size = sum(math.prod(r.shape) for r in rs)
        return 8.0 * sum(r.bytes_after for r in rs) / max(size, 1)

    def table(self) -> str:
        """A plain-text table, one row per leaf, then the totals."""
        rows = [("path", "spec", "shape", "bytes", "-> bytes", "bits/val", "rel err", "note")]
        for r in self.leaves:
            rows.append((r.path, _spec.spec_str(r.spec), "x".join(map(str, r.shape)) or "()",
                         f"{r.bytes_before:,}", f"{r.bytes_after:,}", f"{r.bits_per_value:.2f}",
                         "-" if r.rel_error is None else f"{r.rel_error:.2e}", r.note))
        rows.append(("total", "", "", f"{self.bytes_before:,}", f"{self.bytes_after:,}",
                     f"{8 * self.bytes_after / max(sum(math.prod(r.shape) for r in self.leaves), 1):.2f}",
                     "", f"{self.ratio:.2f}x smaller"))
        out = _plan.format_table(rows)
        if self.unused_rules:
            out += f"\nrules that matched nothing: {list(self.unused_rules)}"
        return out

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------- tree API
@jax.jit
def _rel_error(x, q):
    """``|x_hat - x|^2 / |x|^2`` of a quantised leaf ``q``, decoded inside the computation
    (one compiled program per leaf type and shape instead of the decoder's operations one by
    one, which cost more than quantising)."""
    x = x.astype(jnp.float32)
    den = jnp.sum(x * x)
    err = jnp.sum((q.dequantize().astype(jnp.float32) - x) ** 2)
    return jnp.where(den > 0, err / jnp.where(den > 0, den, 1.0), err)


def quantize_tree(
    params,
    rules: _plan.Rules,
    *,
    key: jax.Array | None = None,
    calibration: tuple[Callable, tuple] | None = None,
    calibration_options: Any = None,
    errors: bool = True,
    warn_unused: bool = True,
    progress: Callable[[int, _plan.LeafPlan], None] | None = None,
):
    """Quantises every leaf of a parameter tree that a rule maps to a spec.

    Args:
      params: any pytree of arrays (plain dict, Flax linen variables, ``nnx.State``).
      rules: ``[(regex, spec | None), ...]`` (first ``re.fullmatch`` on the ``/``-joined path
        wins), a callable ``(path, leaf) -> spec | None``, one spec for every float leaf, or a
        :class:`distq.planning.Plan` made by :func:`distq.plan` for this tree.
      key: ``jax.random`` key for specs that need one (PQ's k-means); folded per leaf.
      calibration: ``(apply_fn, args)`` with ``apply_fn(params, *args)`` a pure JAX function of
        the float tree. distq traces it, finds the input that meets each matrix leaf in a matmul
        and quantises those leaves to minimise the error of the layer's *output* on that data
        (see :mod:`distq.calibrate`). Leaves no matmul reaches are quantised as without it.
      calibration_options: a :class:`distq.calibrate.Calibration` (damping, block size...).
      errors: compute each leaf's relative error for the report (skipped under ``jit``).
      warn_unused: warn (``UserWarning``) about rules that matched no leaf.
      progress: called as ``progress(i, leaf_plan)`` before leaf ``i`` is quantised.

    Returns:
      ``(qparams, report)``: the tree with quantised leaves (same structure), and a
      :class:`TreeReport` (per leaf: spec, bytes before/after, relative error, note).

    Raises:
      ValueError: listing every leaf that cannot take its spec, before any work.

    Examples:
      >>> import jax, distq
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128)),
      ...                     "bias": jax.numpy.zeros(128)}}
      >>> q, report = distq.quantize_tree(params, [(r".*kernel", distq.NF4())])
      >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].shape
      ('QArray', (128,))
      >>> report.bytes_before, report.bytes_after, round(report.ratio, 1)
      (131584, 19008, 6.9)

      A plan (:func:`distq.plan`) is accepted as the rules, so a dry run shows what happens:

      >>> p = distq.plan(params, [(r".*kernel", distq.Uniform(bits=8)), (r".*", None)])
      >>> q, report = distq.quantize_tree(params, p)
      >>> p.bytes_after == report.bytes_after == 256 * 128 + 4 + 128 * 4
      True
    """
    p = _plan.plan(params, rules).check()
    leaves, treedef = _plan.leaves_with_paths(params)
    if p.treedef is not None and p.treedef != treedef:
        raise ValueError("rules: this plan was made for a tree of another structure")
    key = jax.random.key(0) if key is None else key

    done = {}
    if calibration is not None:
        from . import calibrate as _cal  # noqa: PLC0415 (traces apply_fn: only when asked)

        done = _cal.quantize_all(params, calibration, [r.path for r in p.leaves],
                                 [r.spec for r in p.leaves], calibration_options)

    out, reports = [], []
    for i, ((path, leaf), r) in enumerate(zip(leaves, p.leaves)):
        if r.spec is None:
            out.append(leaf)
            reports.append(LeafReport(path, None, r.shape, r.dtype, r.bytes_before,
                                      r.bytes_before, None, r.note))
            continue
        if progress is not None:
            progress(i, r)
        note = r.note
        try:
            if path in done:
                q, note = done[path], "calibrated"
            else:
                q = r.spec.quantize(_checks.as_float_array(leaf), key=jax.random.fold_in(key, i))
        except (ValueError, TypeError) as e:
            raise type(e)(f"leaf {path!r} (shape {r.shape}) with {_spec.spec_str(r.spec)}: "
                          f"{e}") from None
        err = None
        if errors and _checks.is_concrete(leaf) and _checks.is_concrete(
                jax.tree_util.tree_leaves(q)[0]):
            err = float(_rel_error(leaf, q))
        out.append(q)
        reports.append(LeafReport(path, r.spec, r.shape, r.dtype, r.bytes_before,
                                  _plan.leaf_nbytes(q), err, note))

    if p.unused_rules and warn_unused:
        warnings.warn(f"quantize_tree: rules that matched no leaf: {list(p.unused_rules)}",
                      stacklevel=2)
    return jax.tree_util.tree_unflatten(treedef, out), TreeReport(tuple(reports), p.unused_rules)


def dequantize_tree(qtree, dtype: Any = None):
    """Replaces every quantised leaf by its decoded dense array (others unchanged).

    Jittable (``jax.jit(distq.dequantize_tree)``); ``dtype`` overrides the original dtypes.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
      >>> q, _ = distq.quantize_tree(params, [("w", distq.Uniform(bits=8)), ("b", None)])
      >>> d = jax.jit(distq.dequantize_tree)(q)
      >>> d["w"].shape, d["w"].dtype, distq.is_quantized(q["b"])  # "b" was kept as it is
      ((64, 32), dtype('float32'), False)
      >>> float(jnp.abs(d["w"] - params["w"]).max()) < 0.02
      True
      >>> distq.dequantize_tree(q, jnp.bfloat16)["w"].dtype
      dtype(bfloat16)
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if _spec.is_quantized(x) else x, qtree,
        is_leaf=_spec.is_quantized)
