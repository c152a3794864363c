"""Magnitude and structured pruning of parameter trees, with masks that stay applied."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import planning as _plan
from .core import _checks
from .core import spec as _spec


def _select(params, rules) -> tuple[list, Any, list[bool]]:
    """Leaves to prune: float arrays of rank >= 2 (``rules=None``) or matching a regex list."""
    leaves, treedef = _plan.leaves_with_paths(params)
    if isinstance(rules, str):
        rules = [rules]
    pats = None if rules is None else [re.compile(r) for r in rules]
    chosen = []
    for path, x in leaves:
        ok = _plan.is_float(x) and not _spec.is_quantized(x)
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

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.array([0.1, -0.2])}
      >>> pruned, masks = distq.prune_magnitude(params, 0.5)  # the bias (rank 1) is left alone
      >>> pruned["w"].tolist(), masks["b"]
      ([[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]], None)
      >>> distq.sparsity(pruned), distq.sparsity(pruned, masks)  # of all float leaves, of masked
      (0.4, 0.5)

      ``scope="leaf"`` prunes the ratio in every leaf instead of with one global threshold:

      >>> params = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "c": 10 * jnp.ones((2, 2))}
      >>> pruned, _ = distq.prune_magnitude(params, 0.5, scope="leaf")
      >>> distq.sparsity(pruned["a"]), distq.sparsity(pruned["c"])
      (0.5, 0.5)
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

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> kernel = jnp.array([[1.0, 0.1, 2.0], [1.0, 0.1, -2.0]])  # (in, out)
      >>> pruned, masks = distq.prune_structured({"kernel": kernel}, 1 / 3)
      >>> pruned["kernel"].tolist()  # the output column of smallest norm is gone
      [[1.0, 0.0, 2.0], [1.0, 0.0, -2.0]]
      >>> masks["kernel"][0].tolist()
      [True, False, True]
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
    """Zeroes the pruned entries: ``x * mask`` where a mask is given, unchanged elsewhere.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> masks = {"w": jnp.array([True, False, True]), "b": None}
      >>> out = distq.apply_masks({"w": jnp.ones(3), "b": jnp.ones(2)}, masks)
      >>> out["w"].tolist(), out["b"].tolist()
      ([1.0, 0.0, 1.0], [1.0, 1.0])
    """

    def f(x, m):
        return x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))

    return jax.tree_util.tree_map(f, params, masks, is_leaf=lambda v: v is None)


def sparsity(params, masks=None) -> float:
    """Fraction of exactly-zero values among the float leaves (or the masked leaves).

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> distq.sparsity({"w": jnp.array([0.0, 1.0, 0.0, 2.0]), "step": jnp.array(0)})
      0.5
      >>> distq.sparsity({"w": jnp.ones(4)}, {"w": jnp.array([True, True, True, False])})
      0.25
    """
    leaves = jax.tree_util.tree_leaves(params)
    if masks is not None:
        ms = jax.tree_util.tree_leaves(masks)
        return float(1.0 - sum(int(jnp.sum(m)) for m in ms) / max(sum(m.size for m in ms), 1))
    fl = [x for x in leaves if _plan.is_float(x)]
    return float(sum(int(jnp.sum(x == 0)) for x in fl) / max(sum(x.size for x in fl), 1))


def masked_updates(masks):
    """An optax transformation that zeroes updates of pruned weights (chain it last).

    Examples:
      >>> import jax.numpy as jnp, distq, optax
      >>> params = {"kernel": jnp.array([[1.0, 0.1, 2.0], [1.0, 0.1, -2.0]])}
      >>> pruned, masks = distq.prune_structured(params, 1 / 3)
      >>> opt = optax.chain(optax.sgd(0.5), distq.masked_updates(masks))
      >>> updates, _ = opt.update({"kernel": jnp.ones((2, 3))}, opt.init(pruned))
      >>> optax.apply_updates(pruned, updates)["kernel"].tolist()  # pruned weights stay zero
      [[0.5, 0.0, 1.5], [0.5, 0.0, -2.5]]
    """
    import optax

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return apply_masks(updates, masks), state

    return optax.GradientTransformation(init_fn, update_fn)
