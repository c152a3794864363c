"""Training quantised trees with optax: split float leaves (codebooks, scales) from codes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


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
      >>> q, _ = distq.quantize_tree({"w": jnp.ones((8, 8))}, distq.NF4())
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
    """Merges trees split by :func:`partition` (first non-``None`` leaf wins).

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> q, _ = distq.quantize_tree({"w": jnp.ones((8, 8))}, distq.Uniform(bits=4))
      >>> train, rest = distq.partition(q)
      >>> train["w"].codes is None, rest["w"].scale is None
      (True, True)
      >>> merged = distq.combine(train, rest)
      >>> jax.tree.structure(merged) == jax.tree.structure(q), merged["w"].codes.dtype
      (True, dtype('uint32'))
    """

    def pick(*xs):
        for x in xs:
            if x is not None:
                return x
        return None

    return jax.tree_util.tree_map(pick, *trees, is_leaf=lambda x: x is None)


def labels(tree, trainable: str = "trainable", frozen: str = "frozen"):
    """Per-leaf labels for ``optax.multi_transform`` (float arrays trainable, rest frozen).

    Examples:
      >>> import jax, jax.numpy as jnp, distq, optax
      >>> q, _ = distq.quantize_tree({"w": jnp.ones((8, 8)), "b": jnp.zeros(8)},
      ...                            [("w", distq.Uniform(bits=4)), ("b", None)])
      >>> lab = distq.labels(q)
      >>> lab["b"], lab["w"].codes, lab["w"].scale
      ('trainable', 'frozen', 'trainable')
      >>> opt = optax.multi_transform({"trainable": optax.adam(1e-3),
      ...                              "frozen": optax.set_to_zero()}, lab)
      >>> state = opt.init(q)
    """
    return jax.tree_util.tree_map(lambda x: trainable if _trainable(x) else frozen, tree)
